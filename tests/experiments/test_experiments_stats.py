"""The paired confidence interval and t quantiles of the benchmark statistics."""

import math

import pytest

from locakd.experiments.stats import paired_ci, t_quantile


def test_paired_ci_hand_computed():
    # diffs 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) = 1.2909944, t_{0.975, 3} = 3.1824
    # half width 3.1824 * 1.2909944 / 2 = 2.0542303
    ci = paired_ci([71.0, 72.0, 73.0, 74.0], [70.0, 70.0, 70.0, 70.0])
    assert ci["n"] == 4
    assert ci["mean_diff"] == pytest.approx(2.5)
    assert ci["sd_diff"] == pytest.approx(math.sqrt(5 / 3))
    assert ci["t"] == pytest.approx(3.1824)
    assert ci["ci_low"] == pytest.approx(2.5 - 2.0542303, abs=1e-6)
    assert ci["ci_high"] == pytest.approx(2.5 + 2.0542303, abs=1e-6)
    assert ci["wins"] == 4
    assert ci["diffs"] == [1.0, 2.0, 3.0, 4.0]


def test_paired_ci_is_antisymmetric_and_uses_pairs_not_groups():
    a, b = [10.0, 20.0, 30.0], [9.0, 19.5, 29.0]  # large spread between seeds, tiny paired spread
    ab, ba = paired_ci(a, b), paired_ci(b, a)
    assert ab["mean_diff"] == pytest.approx(-ba["mean_diff"])
    assert ab["ci_low"] == pytest.approx(-ba["ci_high"])
    # diffs 1, 0.5, 1: mean 5/6, sd sqrt(1/12), t(2) = 4.3027
    half = 4.3027 * math.sqrt(1 / 12) / math.sqrt(3)
    assert ab["ci_low"] == pytest.approx(5 / 6 - half, abs=1e-4)
    assert ab["ci_high"] == pytest.approx(5 / 6 + half, abs=1e-4)


def test_paired_ci_edge_cases():
    one = paired_ci([1.0], [0.5])
    assert one["mean_diff"] == 0.5 and one["ci_low"] == -math.inf and one["ci_high"] == math.inf
    same = paired_ci([1.0, 2.0], [0.0, 1.0])  # identical diffs: zero-width interval
    assert same["ci_low"] == same["ci_high"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        paired_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_ci([], [])


def test_t_quantile_table_and_beyond():
    assert t_quantile(1) == pytest.approx(12.7062)
    assert t_quantile(4) == pytest.approx(2.7764)
    assert t_quantile(4, 0.90) == pytest.approx(2.1318)
    pytest.importorskip("scipy")
    assert t_quantile(60) == pytest.approx(2.0003, abs=1e-4)
    assert t_quantile(1000) == pytest.approx(1.9623, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile(0)
