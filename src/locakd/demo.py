"""``locakd demo``: teacher, then CE / KD / KD+LoCa / DKD / DKD+LoCa students on MNIST-1D, on a laptop CPU.

Everything is generated locally (MNIST-1D via the ``mnist1d`` package) and trained by the
project's image trainer (:func:`~locakd.image.trainer.train_teacher` and
:func:`~locakd.image.trainer.distill`); this module only builds the configs,
runs them (two worker processes by default), and reports.

The regime (:data:`DEMO_SETTING`, see :mod:`locakd.experiments.mnist1d`) comes from the
MNIST-1D benchmark suite (``BENCHMARKS_mnist1d.md``): a small CNN teacher (``cnn_8``, ~74 %
test accuracy) teaching an MLP student (``mlp_128``, ~70 % alone) on noisy inputs. There
distillation beats cross-entropy by 3-4 points, and the teacher is wrong on about a quarter
of the training stream -- the situation LoCa is designed for (with a strong teacher that
is almost never wrong on its training data, LoCa has next to nothing to change). Nothing
is tuned per run and every number is printed as it comes out; with the default 3 seeds a
LoCa-vs-KD difference of about one point is within the noise (see the printed interval).

Outputs in ``out_dir``: ``results.json`` (settings, per-run and aggregated accuracy,
teacher accuracy and mis-instruction rate, paired differences, timing, machine),
``demo_accuracy.png`` (bar chart with +-1 std error bars) and ``runs/<setting>/`` with
one folder per run (the teacher's is reused on the next call; finished student runs
too). Settings that differ (``--quick``, ``--epochs``, ...) get separate run folders.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distiller import LOCA_METHODS, METHODS
from .errors import ConfigError, LocakdError
from .experiments.machine import cpu_seconds, load_average, machine_info
from .experiments.mnist1d import (
    DEFAULT_SETTING,
    QUICK_SETTING,
    Mnist1dSetting,
    mnist1d_models,
    model_name,
    short_model,
    uncalibrated_method,
)
from .experiments.runner import RunResult, default_workers, run_specs
from .experiments.stats import mean_std, paired_by_seed

__all__ = [
    "DEMO_METHODS",
    "DEMO_SEEDS",
    "DEMO_SETTING",
    "DEMO_STUDENT",
    "DEMO_TEACHER",
    "QUICK_SEEDS",
    "QUICK_SETTING",
    "DemoOptions",
    "format_report",
    "run_demo",
]

DEMO_TEACHER = "cnn_8"
DEMO_STUDENT = "mlp_128"
# Cross-entropy alone, then every LoCa method next to the method it calibrates.
DEMO_METHODS: tuple[str, ...] = (
    "ce",
    *(m for loca in LOCA_METHODS for m in (uncalibrated_method(loca), loca)),
)
DEMO_SETTING = DEFAULT_SETTING
DEMO_SEEDS = 3
QUICK_SEEDS = 2
CHART_NAME = "demo_accuracy.png"


@dataclass
class DemoOptions:
    """What ``locakd demo`` runs; ``None`` fields take the value of the (quick) setting."""

    out_dir: str = "runs/demo"
    seeds: int | None = None
    quick: bool = False
    workers: int | None = None
    teacher: str = DEMO_TEACHER
    student: str = DEMO_STUDENT
    methods: tuple[str, ...] = DEMO_METHODS
    epochs: int | None = None
    teacher_epochs: int | None = None
    samples: int | None = None
    noise_std: float | None = None
    loca_alpha: float | None = None
    device: str = "cpu"
    progress: bool = True

    def setting(self) -> Mnist1dSetting:
        base = QUICK_SETTING if self.quick else DEMO_SETTING
        changes: dict[str, Any] = {}
        for name, key in (
            ("epochs", "epochs"),
            ("teacher_epochs", "teacher_epochs"),
            ("samples", "samples"),
            ("noise_std", "noise_std"),
            ("loca_alpha", "loca_alpha"),
        ):
            value = getattr(self, name)
            if value is not None:
                changes[key] = value
        if "epochs" in changes and "teacher_epochs" not in changes:
            changes["teacher_epochs"] = changes["epochs"]
        setting = base.replace(**changes)
        if setting.dkd_warmup > setting.epochs:
            setting = setting.replace(dkd_warmup=max(1, setting.epochs // 6))
        return setting

    def n_seeds(self) -> int:
        if self.seeds is not None:
            return self.seeds
        return QUICK_SEEDS if self.quick else DEMO_SEEDS

    def n_workers(self) -> int:
        return self.workers if self.workers is not None else default_workers()

    def validate(self) -> None:
        if self.n_seeds() < 1:
            raise ConfigError(f"--seeds must be >= 1, got {self.n_seeds()}")
        if self.n_workers() < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.n_workers()}")
        if not self.methods:
            raise ConfigError("--methods needs at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"--methods lists a method twice: {list(self.methods)}")
        choices = mnist1d_models()
        for flag, name in (("--teacher", self.teacher), ("--student", self.student)):
            if short_model(model_name(name)) not in choices:
                raise ConfigError(
                    f"{flag} {name!r} is not an MNIST-1D model; choose from {', '.join(choices)}"
                )
        s = self.setting()
        if s.epochs < 1 or s.teacher_epochs < 1:
            raise ConfigError("--epochs must be >= 1")
        if s.samples < 20:
            raise ConfigError(f"--samples must be >= 20, got {s.samples}")
        if s.noise_std < 0:
            raise ConfigError(f"--noise must be >= 0, got {s.noise_std}")
        if not 0.0 < s.loca_alpha < 1.0:
            raise ConfigError(f"--alpha must lie in (0, 1), got {s.loca_alpha}")


def _aggregate(results: dict[str, RunResult], methods: tuple[str, ...], seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        runs = []
        for seed in seeds:
            res = results.get(f"{method}/seed{seed}")
            if res is None or not res.ok or res.summary is None:
                runs.append(
                    {
                        "seed": seed,
                        "status": "failed" if res is None else res.status,
                        "error": res and res.error,
                    }
                )
                continue
            s = res.summary
            runs.append(
                {
                    "seed": seed,
                    "status": res.status,
                    "best_top1": s["best_top1"],
                    "best_epoch": s["best_epoch"],
                    "last_top1": s["last_top1"],
                    "misinstruction_rate": s.get("misinstruction_rate"),
                    "teacher_top1": s.get("teacher_top1"),
                    "wall_time_s": s.get("wall_time_s"),
                    "run_dir": s.get("run_dir"),
                }
            )
        ok = [r for r in runs if "best_top1" in r]
        best = mean_std(r["best_top1"] for r in ok)
        last = mean_std(r["last_top1"] for r in ok)
        out[method] = {
            "n": len(ok),
            "best_mean": best[0],
            "best_std": best[1],
            "last_mean": last[0],
            "last_std": last[1],
            "runs": runs,
        }
    return out


def _paired(methods: dict[str, Any], a: str, b: str, metric: str) -> dict[str, Any] | None:
    if a not in methods or b not in methods:
        return None
    ra = {r["seed"]: r[metric] for r in methods[a]["runs"] if metric in r}
    rb = {r["seed"]: r[metric] for r in methods[b]["runs"] if metric in r}
    return paired_by_seed(ra, rb)


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Train the teacher and every (method, seed) student; write results.json and the chart; return the results."""
    opts.validate()
    setting = opts.setting()
    seeds = list(range(opts.n_seeds()))
    workers = opts.n_workers()
    out = Path(opts.out_dir).expanduser()
    tag = f"{'quick' if opts.quick else 'full'}-{short_model(opts.teacher)}-{short_model(opts.student)}-{setting.digest()}"
    runs_root = out / "runs" / tag
    cache = out / "data_cache"

    teacher = setting.teacher_spec(
        "teacher",
        runs_root / f"teacher_{short_model(opts.teacher)}",
        opts.teacher,
        cache_dir=cache,
        device=opts.device,
    )
    specs = [teacher]
    # CE students need no teacher: they start alongside it.
    order = sorted(opts.methods, key=lambda m: m != "ce")
    for method in order:
        for seed in seeds:
            specs.append(
                setting.student_spec(
                    f"{method}/seed{seed}",
                    runs_root / method.replace("+", "_") / f"seed{seed}",
                    opts.student,
                    method,
                    seed,
                    teacher_spec=teacher,
                    teacher=opts.teacher,
                    cache_dir=cache,
                    device=opts.device,
                )
            )

    info = machine_info()
    print(
        f"locakd demo: {short_model(opts.teacher)} teacher -> {short_model(opts.student)} student, "
        f"{len(opts.methods)} methods x {len(seeds)} seeds ({len(specs)} runs, {workers} worker process"
        f"{'es' if workers > 1 else ''}){' [quick]' if opts.quick else ''}\n"
        f"  {setting.describe()}\n  output: {out}",
        file=sys.stderr,
        flush=True,
    )
    t0, cpu0 = time.time(), cpu_seconds()
    results = run_specs(specs, workers=workers, progress=opts.progress, desc="demo runs")
    wall, cpu = time.time() - t0, cpu_seconds() - cpu0

    failed = {k: r.error for k, r in results.items() if not r.ok}
    t_res = results.get("teacher")
    methods = _aggregate(results, tuple(opts.methods), seeds)
    mis = [
        r["misinstruction_rate"]
        for m in methods.values()
        for r in m["runs"]
        if r.get("misinstruction_rate") is not None
    ]
    t_summary = t_res.summary if (t_res is not None and t_res.ok) else None
    report: dict[str, Any] = {
        "command": "locakd demo",
        "quick": opts.quick,
        "setting": setting.to_dict(),
        "setting_description": setting.describe(),
        "teacher": {
            "model": short_model(opts.teacher),
            "test_top1_last": None if t_summary is None else t_summary["last_top1"],
            "test_top1_best": None if t_summary is None else t_summary["best_top1"],
            "checkpoint_used": "last.pt",
            "misinstruction_rate_train_stream": mean_std(mis)[0] if mis else None,
            "status": None if t_res is None else t_res.status,
            "run_dir": teacher.out_dir,
        },
        "student": short_model(opts.student),
        "seeds": seeds,
        "methods": methods,
        "paired": {
            "kd+loca - kd (best)": _paired(methods, "kd+loca", "kd", "best_top1"),
            "kd+loca - kd (last)": _paired(methods, "kd+loca", "kd", "last_top1"),
            "dkd+loca - dkd (best)": _paired(methods, "dkd+loca", "dkd", "best_top1"),
            "kd - ce (best)": _paired(methods, "kd", "ce", "best_top1"),
        },
        "runs_total": len(specs),
        "runs_reused": sum(1 for r in results.values() if r.status == "skipped"),
        "runs_failed": failed,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "workers": workers,
        "machine": info,
        "load_average_end": load_average(),
        "chart": CHART_NAME,
    }
    report["paired"] = {k: v for k, v in report["paired"].items() if v is not None}

    out.mkdir(parents=True, exist_ok=True)
    plotted = [m for m in opts.methods if methods[m]["n"] > 0]
    if plotted:
        from .experiments.plots import accuracy_bar_chart

        accuracy_bar_chart(
            out / CHART_NAME,
            plotted,
            [(methods[m]["best_mean"], methods[m]["best_std"]) for m in plotted],
            [(methods[m]["last_mean"], methods[m]["last_std"]) for m in plotted],
            title=f"MNIST-1D: {short_model(opts.teacher)} -> {short_model(opts.student)}"
            + (" [quick: numbers mean nothing]" if opts.quick else ""),
            teacher_acc=report["teacher"]["test_top1_last"],
            n_seeds=len(seeds),
        )
    else:
        report["chart"] = None
    from .engine.io import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    if failed:
        first = next(iter(failed.items()))
        raise LocakdError(
            f"{len(failed)} of {len(specs)} demo runs failed (first: {first[0]}: {first[1]}); "
            f"partial results in {out / 'results.json'}"
        )
    return report


def _pm(mean: float, std: float) -> str:
    return f"{mean:6.2f} +- {std:4.2f}"


def format_report(report: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """The demo's console table."""
    t = report["teacher"]
    lines = [
        f"MNIST-1D distillation demo: teacher {t['model']} -> student {report['student']}, "
        f"{len(report['seeds'])} seed{'s' if len(report['seeds']) != 1 else ''}"
        + ("  [--quick: a smoke test, the numbers mean nothing]" if report.get("quick") else ""),
        f"setting: {report['setting_description']}",
    ]
    mis = t["misinstruction_rate_train_stream"]
    acc = t["test_top1_last"]
    lines.append(
        f"teacher {t['model']}: test top-1 {acc:.2f}%"
        + (f" | mis-instructs {100 * mis:.1f}% of the (noisy) training stream" if mis is not None else "")
    )
    lines.append("")
    ce = report["methods"].get("ce")
    header = f"{'method':<10} {'best top-1 (%)':>16} {'last top-1 (%)':>16} {'vs ce (best)':>13}  n"
    lines += [header, "-" * len(header)]
    for method, m in report["methods"].items():
        if m["n"] == 0:
            lines.append(f"{method:<10} {'failed':>16}")
            continue
        delta = (
            "" if ce is None or ce["n"] == 0 or method == "ce" else f"{m['best_mean'] - ce['best_mean']:+.2f}"
        )
        lines.append(
            f"{method:<10} {_pm(m['best_mean'], m['best_std']):>16} {_pm(m['last_mean'], m['last_std']):>16} "
            f"{delta:>13}  {m['n']}"
        )
    lines.append("(mean +- sample std over seeds; best = best epoch on the test set, last = final epoch)")
    for name, ci in report.get("paired", {}).items():
        if ci["n"] >= 2:
            lines.append(
                f"{name}, paired by seed: {ci['mean_diff']:+.2f} points, 95% CI [{ci['ci_low']:+.2f}, "
                f"{ci['ci_high']:+.2f}], higher in {ci['wins']}/{ci['n']} seeds"
            )
        else:
            lines.append(f"{name}: {ci['mean_diff']:+.2f} points (one seed: no interval)")
    reused = report.get("runs_reused", 0)
    lines.append(
        f"wall time {report['wall_time_s']:.0f} s ({report['workers']} worker process"
        f"{'es' if report['workers'] > 1 else ''}, CPU time {report['cpu_time_s']:.0f} s"
        + (f"; {reused} of {report['runs_total']} runs reused from an earlier call" if reused else "")
        + ")"
    )
    if out_dir is not None:
        out = Path(out_dir)
        lines.append(
            f"results: {out / 'results.json'}"
            + (f", chart: {out / report['chart']}" if report.get("chart") else "")
        )
    return "\n".join(lines)
