"""kdarena.experiments.stats: paired t-intervals (plain and Bonferroni-corrected), p-values, Holm and Wilcoxon,
checked on hand-made numbers against closed forms and published tables, and against scipy.stats."""
from __future__ import annotations

import math
import statistics

import pytest

from kdarena.experiments.stats import holm, paired_difference

stats = pytest.importorskip("scipy.stats")


def _t2_quantile(p: float) -> float:
    """Student's t with 2 degrees of freedom has a closed-form quantile: (2p - 1) / sqrt(2 p (1 - p))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def test_the_plain_interval_is_the_students_t_one_over_matched_seeds():
    a = {0: 71.0, 1: 72.5, 2: 70.0, 7: 99.0}
    b = {0: 70.0, 1: 71.0, 2: 70.5, 3: 10.0}  # seeds 3 and 7 have no partner: left out
    d = paired_difference(a, b)
    diffs = [1.0, 1.5, -0.5]
    m, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(3)
    half = _t2_quantile(0.975) * se  # t_{0.975, 2} = 4.3027 (tables)
    assert _t2_quantile(0.975) == pytest.approx(4.3027, abs=1e-4)
    assert d.n == 3 and d.mean == pytest.approx(m) and d.confidence == 0.95
    assert (d.low, d.high) == (pytest.approx(m - half, abs=1e-9), pytest.approx(m + half, abs=1e-9))
    assert (d.low, d.high) == pytest.approx(stats.t.interval(0.95, 2, loc=m, scale=se))
    assert d.verdict == "n.s." and d.text() == "+0.67 [-1.92, +3.25]"


def test_the_bonferroni_interval_uses_the_quantile_at_alpha_over_twice_the_comparisons():
    a = {s: 70.0 + 0.3 * s for s in range(10)}
    b = {s: 69.0 + 0.25 * s + (0.4 if s % 2 else -0.4) for s in range(10)}
    diffs = [a[s] - b[s] for s in range(10)]
    m, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(10)
    three = paired_difference(a, b, comparisons=3)
    # t_{1 - 0.05/6, 9} = 2.9333 (tables): the family-wise 95 % interval over three comparisons
    assert three.high - three.mean == pytest.approx(2.9333 * se, rel=1e-4)
    assert three.high - three.mean == pytest.approx(stats.t.ppf(1 - 0.05 / 6, 9) * se, rel=1e-12)
    assert three.confidence == pytest.approx(1 - 0.05 / 3)
    one = paired_difference(a, b)
    assert one.high - one.mean == pytest.approx(2.2622 * se, rel=1e-4)  # t_{0.975, 9}
    assert three.mean == pytest.approx(m) and three.p == one.p  # the p-value is not corrected; Holm reads it


def test_the_p_value_is_the_two_sided_paired_t_tests():
    # diffs 1.0, 1.1, 1.0: t = 1.0333 / 0.03333 = 31; with 2 degrees of freedom P(|T| > t) = 1 - t / sqrt(2 + t^2)
    d = paired_difference({0: 2.0, 1: 2.1, 2: 2.2}, {0: 1.0, 1: 1.0, 2: 1.2})
    assert d.p == pytest.approx(1 - 31 / math.sqrt(2 + 31 ** 2), rel=1e-9)
    assert d.p == pytest.approx(stats.ttest_rel([2.0, 2.1, 2.2], [1.0, 1.0, 1.2]).pvalue, rel=1e-12)
    assert d.verdict == "better"


def test_wilcoxon_is_beside_the_t_test_with_its_exact_small_sample_p_value():
    # five positive differences: the most extreme of 2^5 sign patterns, two-sided p = 2/32
    up = paired_difference({s: float(s + 2) for s in range(5)}, {s: 1.0 for s in range(5)})
    assert up.wilcoxon_p == pytest.approx(2 / 32)
    # ranks 1..5, the one of rank 2 negative: W- = 2; sign patterns with W- <= 2 are {}, {1}, {2}: p = 2 * 3/32
    mixed = paired_difference({0: 1.0, 1: -2.0, 2: 3.0, 3: 4.0, 4: 5.0}, {s: 0.0 for s in range(5)})
    assert mixed.wilcoxon_p == pytest.approx(6 / 32)
    assert mixed.wilcoxon_p == pytest.approx(stats.wilcoxon([1.0, -2.0, 3.0, 4.0, 5.0]).pvalue)


def test_degenerate_pairs():
    assert paired_difference({0: 1.0}, {0: 2.0}).text() == "-1.00 (1 seed)"
    empty = paired_difference({0: 1.0}, {1: 2.0})
    assert empty.n == 0 and empty.text() == "-" and empty.verdict == "-"
    same = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # no spread: the interval is the point
    assert (same.low, same.high, same.p) == (1.0, 1.0, 0.0) and same.verdict == "better"
    tie = paired_difference({0: 2.0, 1: 3.0}, {0: 2.0, 1: 3.0})
    assert (tie.p, tie.verdict) == (1.0, "n.s.") and math.isnan(tie.wilcoxon_p)
    with pytest.raises(ValueError, match="comparisons"):
        paired_difference({0: 1.0}, {0: 1.0}, comparisons=0)


def test_holm_steps_down_and_stops_at_the_first_failure():
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]  # 0.03 > 0.05/2 stops it
    assert holm([0.01, 0.02, 0.03]) == [True, True, True]
    assert holm([0.2, 0.001]) == [False, True]
    assert holm([math.nan, 0.001]) == [False, True]  # no p-value (one seed): never significant
    assert holm([0.03, 0.03], alpha=0.1) == [True, True]
