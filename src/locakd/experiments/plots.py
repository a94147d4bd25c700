"""Plots for the demo and the benchmark suite (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["accuracy_bar_chart", "alpha_sweep_plot"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib ships with the [plot] extra
        raise ImportError("plots need matplotlib: pip install 'locakd[plot]'") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def accuracy_bar_chart(
    path: str | Path,
    methods: Sequence[str],
    best: Sequence[tuple[float, float]],
    last: Sequence[tuple[float, float]] | None = None,
    *,
    title: str = "",
    teacher_acc: float | None = None,
    n_seeds: int | None = None,
    ylabel: str = "test top-1 accuracy (%; axis does not start at 0)",
) -> Path:
    """Grouped bars (best / last epoch) with +-1 std error bars, one group per method; returns ``path``."""
    plt = _pyplot()
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(len(methods))
    width = 0.38 if last is not None else 0.6
    fig, ax = plt.subplots(figsize=(max(6.0, 1.25 * len(methods) + 2), 4.2), dpi=120)
    series = [("best epoch", best, -width / 2 if last is not None else 0.0, "#4C72B0")]
    if last is not None:
        series.append(("last epoch", last, width / 2, "#DD8452"))
    lows = []
    for label, values, offset, color in series:
        means = np.array([m for m, _ in values], dtype=float)
        stds = np.array([s for _, s in values], dtype=float)
        bars = ax.bar(x + offset, means, width, yerr=stds, capsize=4, label=label, color=color, alpha=0.9)
        for rect, m, s in zip(bars, means, stds, strict=True):
            ax.annotate(
                f"{m:.1f}",
                (rect.get_x() + rect.get_width() / 2, m + s),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        lows.append(float(np.nanmin(means - stds)))
    top = max(float(np.nanmax([m + s for m, s in v])) for _, v, _, _ in series)
    if teacher_acc is not None:
        ax.axhline(
            teacher_acc, color="0.3", linestyle="--", linewidth=1, label=f"teacher ({teacher_acc:.1f})"
        )
        top = max(top, teacher_acc)
        lows.append(teacher_acc)
    low = min(lows)
    span = max(top - low, 1.0)
    ax.set_ylim(max(0.0, low - 0.6 * span), min(100.0, top + 0.45 * span))
    ax.set_xticks(x)
    ax.set_xticklabels(
        methods, rotation=0 if len(methods) <= 6 else 30, ha="center" if len(methods) <= 6 else "right"
    )
    ax.set_ylabel(ylabel)
    suffix = f" (mean +- std over {n_seeds} seeds)" if n_seeds else ""
    ax.set_title((title + suffix).strip(), fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def alpha_sweep_plot(
    path: str | Path,
    alphas: Sequence[float],
    loca: Sequence[tuple[float, float]],
    *,
    kd: tuple[float, float] | None = None,
    ce: tuple[float, float] | None = None,
    title: str = "",
    n_seeds: int | None = None,
    ylabel: str = "best test top-1 accuracy (%)",
) -> Path:
    """KD+LoCa accuracy against alpha (mean +- std error bars), with KD / CE as horizontal bands."""
    plt = _pyplot()
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    means = np.array([m for m, _ in loca], dtype=float)
    stds = np.array([s for _, s in loca], dtype=float)
    ax.errorbar(alphas, means, yerr=stds, marker="o", capsize=4, color="#4C72B0", label="KD+LoCa")
    for ref, name, color in ((kd, "KD", "#C44E52"), (ce, "CE only", "0.4")):
        if ref is None:
            continue
        m, s = ref
        ax.axhline(m, color=color, linestyle="--", linewidth=1, label=f"{name} ({m:.2f} +- {s:.2f})")
        ax.axhspan(m - s, m + s, color=color, alpha=0.08)
    ax.set_xlabel("LoCa alpha")
    ax.set_ylabel(ylabel)
    suffix = f" (mean +- std over {n_seeds} seeds)" if n_seeds else ""
    ax.set_title((title + suffix).strip(), fontsize=9)
    ax.set_xticks(list(alphas))
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
