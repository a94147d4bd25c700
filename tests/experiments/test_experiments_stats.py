"""The paired confidence interval and t quantiles of the benchmark statistics."""

import math
import sys

import pytest

from locakd.experiments.stats import _T_TABLE, paired_by_seed, paired_ci, t_quantile

EPS = sys.float_info.epsilon  # float64: every statistic here is computed in Python floats


def test_paired_ci_hand_computed():
    # diffs 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) = 1.2909944, t_{0.975, 3} = 3.1824
    # half width 3.1824 * 1.2909944 / 2 = 2.0542303 (truncated to 7 decimals)
    ci = paired_ci([71.0, 72.0, 73.0, 74.0], [70.0, 70.0, 70.0, 70.0])
    assert ci["n"] == 4
    assert ci["mean_diff"] == 2.5  # exact: integer sums and a division by 4
    # float64: 5/3 and its sqrt are each rounded once (<= eps/2 relative each).
    assert ci["sd_diff"] == pytest.approx(math.sqrt(5 / 3), rel=2 * EPS, abs=0)
    assert ci["t"] == 3.1824  # the tabulated value itself
    # The hand-computed half width above is truncated to 7 decimals: off by less than 1e-7.
    assert ci["ci_low"] == pytest.approx(2.5 - 2.0542303, abs=1e-7)
    assert ci["ci_high"] == pytest.approx(2.5 + 2.0542303, abs=1e-7)
    # The same formula in float64: a few roundings (<= eps/2 each) on terms of size <= 2.5 + half.
    half = 3.1824 * math.sqrt(5 / 3) / 2
    assert ci["ci_low"] == pytest.approx(2.5 - half, rel=0, abs=8 * EPS * (2.5 + half))
    assert ci["ci_high"] == pytest.approx(2.5 + half, rel=0, abs=8 * EPS * (2.5 + half))
    assert ci["wins"] == 4
    assert ci["diffs"] == [1.0, 2.0, 3.0, 4.0]


def test_paired_ci_is_antisymmetric_and_uses_pairs_not_groups():
    a, b = [10.0, 20.0, 30.0], [9.0, 19.5, 29.0]  # large spread between seeds, tiny paired spread
    ab, ba = paired_ci(a, b), paired_ci(b, a)
    # Exact: IEEE rounding is symmetric in sign, so negated differences give negated results.
    assert ab["mean_diff"] == -ba["mean_diff"]
    assert ab["ci_low"] == -ba["ci_high"]
    # diffs 1, 0.5, 1: mean 5/6, sd sqrt(1/12), t(2) = 4.3027
    half = 4.3027 * math.sqrt(1 / 12) / math.sqrt(3)
    # float64: a few roundings (<= eps/2 each) in the mean and the half width; the difference
    # 5/6 - half cancels, so the error is absolute, relative to 5/6 + half.
    tol = 8 * EPS * (5 / 6 + half)
    assert ab["ci_low"] == pytest.approx(5 / 6 - half, rel=0, abs=tol)
    assert ab["ci_high"] == pytest.approx(5 / 6 + half, rel=0, abs=tol)


def test_paired_ci_edge_cases():
    one = paired_ci([1.0], [0.5])
    assert one["mean_diff"] == 0.5 and one["ci_low"] == -math.inf and one["ci_high"] == math.inf
    same = paired_ci([1.0, 2.0], [0.0, 1.0])  # identical diffs: zero-width interval
    assert same["ci_low"] == same["ci_high"] == 1.0  # exact: the sd of equal values is exactly 0
    with pytest.raises(ValueError):
        paired_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_ci([], [])


def test_paired_by_seed_pairs_common_seeds_with_values():
    a = {0: 71.0, 1: 72.0, 2: None, 3: 74.0, 4: 75.0}
    b = {1: 70.0, 0: 70.0, 2: 70.0, 3: None, 5: 70.0}
    ci = paired_by_seed(a, b)
    assert ci["seeds"] == [0, 1] and ci["diffs"] == [1.0, 2.0]
    assert ci == {**paired_ci([71.0, 72.0], [70.0, 70.0]), "seeds": [0, 1]}
    assert paired_by_seed({0: 1.0}, {1: 1.0}) is None
    assert paired_by_seed({0: None}, {0: 1.0}) is None


def test_t_quantile_table_and_beyond():
    # The tabulated values themselves.
    assert t_quantile(1) == 12.7062
    assert t_quantile(4) == 2.7764
    assert t_quantile(4, 0.90) == 2.1318
    pytest.importorskip("scipy")
    # References printed to 6 decimals (R: qt(0.975, 60), qt(0.975, 1000)): half a unit of the last digit.
    assert t_quantile(60) == pytest.approx(2.000298, rel=0, abs=5e-7)
    assert t_quantile(1000) == pytest.approx(1.962339, rel=0, abs=5e-7)
    with pytest.raises(ValueError):
        t_quantile(0)


def test_t_table_is_exact_to_four_decimals():
    stats = pytest.importorskip("scipy.stats")
    for confidence, table in _T_TABLE.items():
        for df, value in enumerate(table, start=1):
            exact = float(stats.t.ppf(1.0 - (1.0 - confidence) / 2.0, df))
            # Rounded to 4 decimals: half a unit of the 4th decimal, plus float64 rounding of the value.
            assert value == pytest.approx(exact, rel=0, abs=5e-5 + 4 * EPS * exact), (confidence, df)
