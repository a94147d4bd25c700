"""Small statistics for benchmark tables: mean +- std and the paired t confidence interval.

``paired_ci(a, b)`` compares two methods run with the same seeds (same initial weights
and data order): it takes the per-seed differences ``d_i = a_i - b_i`` and returns their
mean and the two-sided t interval ``mean +- t_{1-(1-c)/2, n-1} * sd / sqrt(n)`` (sd with
n - 1 in the denominator); :func:`paired_by_seed` does the pairing from ``{seed: value}``
maps. The t quantiles are tabulated (95 % and 90 %, df 1..30, exact to
4 decimals) so that no scipy is needed; other levels or df > 30 use scipy when installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..image.summarize import mean_std

__all__ = ["mean_std", "paired_by_seed", "paired_ci", "t_quantile"]

# Two-sided critical values t_{1 - (1 - c)/2, df}, df = 1..30.
# fmt: off
_T_TABLE: dict[float, tuple[float, ...]] = {
    0.95: (
        12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
    ),
    0.90: (
        6.3138, 2.9200, 2.3534, 2.1318, 2.0150, 1.9432, 1.8946, 1.8595, 1.8331, 1.8125,
        1.7959, 1.7823, 1.7709, 1.7613, 1.7531, 1.7459, 1.7396, 1.7341, 1.7291, 1.7247,
        1.7207, 1.7171, 1.7139, 1.7109, 1.7081, 1.7056, 1.7033, 1.7011, 1.6991, 1.6973,
    ),
}
# fmt: on


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """Two-sided critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    table = _T_TABLE.get(round(confidence, 6))
    if table is not None and df <= len(table):
        return table[df - 1]
    try:
        from scipy import stats
    except ImportError as err:  # pragma: no cover - scipy comes with mnist1d
        raise ValueError(
            f"t quantile for confidence {confidence} and df {df} needs scipy (tabulated: 0.90 and 0.95, df <= 30)"
        ) from err
    return float(stats.t.ppf(1.0 - (1.0 - confidence) / 2.0, df))


def paired_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``a_i - b_i`` with its two-sided t confidence interval.

    Returns a dict: ``n``, ``mean_diff``, ``sd_diff`` (sample std of the differences),
    ``t`` (critical value), ``ci_low``, ``ci_high``, ``confidence``, ``wins`` (how many
    differences are > 0), ``diffs``. With one pair the interval is ``(-inf, inf)``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("paired_ci needs at least one pair")
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean, sd = mean_std(diffs)
    if n < 2:
        t, low, high = math.nan, -math.inf, math.inf
    else:
        t = t_quantile(n - 1, confidence)
        half = t * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    return {
        "n": n,
        "mean_diff": mean,
        "sd_diff": sd,
        "t": t,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "wins": sum(d > 0 for d in diffs),
        "diffs": diffs,
    }


def paired_by_seed(
    a: Mapping[int, float | None], b: Mapping[int, float | None], confidence: float = 0.95
) -> dict[str, Any] | None:
    """:func:`paired_ci` of ``a`` and ``b`` over the seeds both have a value for (``None`` = no value).

    The result also lists those ``seeds`` (ascending); ``None`` when the two share no seed.
    """
    seeds = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    if not seeds:
        return None
    ci = paired_ci([a[s] for s in seeds], [b[s] for s in seeds], confidence)  # type: ignore[misc]
    ci["seeds"] = seeds
    return ci
