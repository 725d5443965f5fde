"""Statistics for reports and comparisons: mean, sample std, and paired differences with t-intervals.

"Method A beats B" has one meaning in kdarena: over seeds run for both (matched by seed, so each
pair shares its data order and initial weights), the mean of the differences A - B has a confidence
interval (Student's t, n - 1 degrees of freedom) entirely above zero. When several comparisons are
read together, each interval is widened by Bonferroni's correction (level 1 - alpha / comparisons)
so that all of them hold at once with probability 1 - alpha, and Holm's step-down procedure decides
which differences are significant. The distributions come from :mod:`scipy.stats`; the Wilcoxon
signed-rank p-value is given beside the t-test's as a check that does not assume normal differences.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

#: family-wise error rate of every interval and test here (95 % intervals)
ALPHA = 0.05


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def sample_std(values: Sequence[float]) -> float:
    """Standard deviation with ddof=1 (NaN for fewer than two values)."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    dof = len(a) + len(b) - 2
    if len(a) < 2 or len(b) < 2 or dof <= 0:
        return math.nan
    return math.sqrt(((len(a) - 1) * sample_std(a) ** 2 + (len(b) - 1) * sample_std(b) ** 2) / dof)


@dataclass(frozen=True)
class Paired:
    """Mean of the matched differences a - b, its interval at ``confidence``, and two-sided p-values."""

    n: int
    mean: float
    low: float
    high: float
    p: float = math.nan  # paired t-test
    wilcoxon_p: float = math.nan  # Wilcoxon signed-rank test (exact for small n)
    confidence: float = 1 - ALPHA  # the interval's level: 1 - alpha / comparisons

    @property
    def width(self) -> float:
        """Upper minus lower end of the interval (NaN without one: fewer than two pairs)."""
        return self.high - self.low

    @property
    def verdict(self) -> str:
        """'better' / 'worse' when the interval excludes zero, 'n.s.' otherwise, '-' without an interval."""
        if self.n < 2 or math.isnan(self.low):
            return "-"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "n.s."

    def text(self) -> str:
        if self.n == 0:
            return "-"
        if self.n < 2:
            return f"{self.mean:+.2f} (1 seed)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], comparisons: int = 1,
                      alpha: float = ALPHA) -> Paired:
    """Paired t-interval of a - b over the seeds present in both (``{seed: value}``), Bonferroni-corrected for
    ``comparisons`` read together (1: the plain 1 - alpha interval), with the t and Wilcoxon p-values."""
    from scipy import stats

    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    confidence = 1 - alpha / comparisons
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return Paired(0, math.nan, math.nan, math.nan, confidence=confidence)
    m = mean(diffs)
    if len(diffs) < 2:
        return Paired(1, m, math.nan, math.nan, confidence=confidence)
    if max(diffs) == min(diffs):
        # no spread: the t statistic is infinite (or undefined for zero); the interval is the point itself
        return Paired(len(diffs), m, m, m, 0.0 if m else 1.0, _wilcoxon(diffs), confidence)
    test = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    interval = test.confidence_interval(confidence_level=confidence)
    return Paired(len(diffs), m, float(interval.low), float(interval.high), float(test.pvalue), _wilcoxon(diffs), confidence)


def _wilcoxon(diffs: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``diffs`` (NaN when every difference is zero)."""
    from scipy import stats

    if all(d == 0 for d in diffs):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ties or zeros: scipy notes it switches to the normal approximation
        return float(stats.wilcoxon(diffs).pvalue)


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Holm's step-down procedure at family-wise ``alpha``: which hypotheses are rejected (NaN: never)."""
    order = sorted(range(len(pvalues)), key=lambda i: math.inf if math.isnan(pvalues[i]) else pvalues[i])
    rejected, k = [False] * len(pvalues), len(pvalues)
    for rank, i in enumerate(order):
        if not pvalues[i] <= alpha / (k - rank):  # NaN compares False: stops here
            break
        rejected[i] = True
    return rejected
