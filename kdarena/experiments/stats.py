"""Statistics for reports: mean, sample std, and the paired difference with a 95 % t-interval.

"Method A beats B" has one meaning in kdarena: over seeds run for both (matched by seed, so each
pair shares its data order and initial weights), the mean of the differences A - B has a 95 %
confidence interval (Student's t, n - 1 degrees of freedom) entirely above zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

#: two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1..30, then 40, 60, 120 and infinity
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423]
_T975_TAIL = [(40, 2.0211), (60, 2.0003), (120, 1.9799), (math.inf, 1.9600)]


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


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table; interpolated in 1/df past 30)."""
    if df < 1:
        return math.nan
    if df <= 30:
        return _T975[df - 1]
    low_df, low_t = 30, _T975[-1]
    for high_df, high_t in _T975_TAIL:
        if df <= high_df:
            # t is close to linear in 1/df between the table's rows
            w = (1 / low_df - 1 / df) / (1 / low_df - (0 if math.isinf(high_df) else 1 / high_df))
            return low_t + w * (high_t - low_t)
        low_df, low_t = high_df, high_t
    return 1.96


@dataclass(frozen=True)
class Paired:
    """Mean of the matched differences a - b and its 95 % interval."""

    n: int
    mean: float
    low: float
    high: float

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


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """Paired t-interval of a - b over the seeds present in both (``{seed: value}``)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return Paired(0, math.nan, math.nan, math.nan)
    m = mean(diffs)
    if len(diffs) < 2:
        return Paired(1, m, math.nan, math.nan)
    half = t975(len(diffs) - 1) * sample_std(diffs) / math.sqrt(len(diffs))
    return Paired(len(diffs), m, m - half, m + half)
