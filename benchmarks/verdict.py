"""Whether a ratio measured over alternating rounds meets a target, with the run's own noise
taken into account.

On this VM one round's ratio to nginx swings by 20-30%, so a median of 8 rounds can land a few
percent either side of the truth. A bare "0.97x" against a target of 1.0x says nothing about
whether the proxy is slower or the run was unlucky; a 95% interval does. Each round's ratio is
paired in time (both figures from the same minute), and the rounds' log ratios are treated as
independent samples: the interval is the geometric mean times exp(+-t * s / sqrt(n)), Student's
t with n - 1 degrees of freedom.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal

# Student's t, two-sided 95% (0.975 quantile), by degrees of freedom 1..30.
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_975(degrees_of_freedom: int) -> float:
    if degrees_of_freedom < 1:
        raise ValueError("an interval needs at least two rounds")
    if degrees_of_freedom <= len(_T_975):
        return _T_975[degrees_of_freedom - 1]
    return 1.96 + 2.4 / degrees_of_freedom  # within 0.3% of the exact value above 30


@dataclass(frozen=True)
class Interval:
    centre: float
    """The geometric mean of the rounds' ratios."""
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.centre:.2f}x ({self.low:.2f}-{self.high:.2f})"


def ratio_interval(ratios: list[float]) -> Interval | None:
    """The 95% interval of the typical ratio, from each round's ratio; None under 2 rounds."""
    logs = [math.log(r) for r in ratios if r > 0]
    if len(logs) < 2:
        return None
    mean = statistics.fmean(logs)
    half = t_975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half))


Verdict = Literal["met", "missed", "too close to call (centre meets it)",
                  "too close to call (centre misses it)"]


def judge(interval: Interval, target: float, *, at_least: bool) -> Verdict:
    """"met" when the whole interval is on the target's good side, "missed" when the whole of
    it is on the bad side, else too close to call in this run (saying on which side the
    centre lies)."""
    if at_least:
        met, missed, good_centre = (interval.low >= target, interval.high < target,
                                    interval.centre >= target)
    else:
        met, missed, good_centre = (interval.high <= target, interval.low > target,
                                    interval.centre <= target)
    if met:
        return "met"
    if missed:
        return "missed"
    if good_centre:
        return "too close to call (centre meets it)"
    return "too close to call (centre misses it)"
