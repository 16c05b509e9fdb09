"""benchmarks/verdict.py: the interval and verdict compare.py's target table is built on."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from verdict import Interval, judge, ratio_interval, t_975


def test_interval_is_the_t_interval_of_the_log_ratios() -> None:
    ratios = [0.9, 1.1, 1.0, 0.95, 1.05, 1.2, 0.85, 1.0]
    logs = [math.log(r) for r in ratios]
    half = 2.365 * statistics.stdev(logs) / math.sqrt(8)  # t(0.975, 7 degrees of freedom)
    interval = ratio_interval(ratios)
    assert interval is not None
    assert interval.centre == pytest.approx(math.exp(statistics.fmean(logs)))
    assert interval.low == pytest.approx(math.exp(statistics.fmean(logs) - half))
    assert interval.high == pytest.approx(math.exp(statistics.fmean(logs) + half))
    assert interval.low < 1.0 < interval.high


def test_equal_rounds_give_a_point_and_too_few_rounds_none() -> None:
    interval = ratio_interval([1.25, 1.25, 1.25])
    assert interval is not None
    assert (interval.low, interval.centre, interval.high) == pytest.approx((1.25, 1.25, 1.25))
    assert ratio_interval([1.3]) is None
    assert ratio_interval([]) is None


def test_t_quantiles_past_the_table_approach_the_normal() -> None:
    assert t_975(1) == pytest.approx(12.706)
    assert t_975(30) == pytest.approx(2.042)
    assert t_975(60) == pytest.approx(2.000, abs=0.003)
    assert t_975(1000) == pytest.approx(1.962, abs=0.002)
    with pytest.raises(ValueError):
        t_975(0)


@pytest.mark.parametrize(
    ("interval", "goal", "at_least", "verdict"),
    [
        (Interval(1.10, 1.02, 1.19), 1.0, True, "met"),
        (Interval(0.90, 0.85, 0.96), 1.0, True, "missed"),
        (Interval(1.03, 0.95, 1.11), 1.0, True, "too close to call (centre meets it)"),
        (Interval(0.97, 0.90, 1.04), 1.0, True, "too close to call (centre misses it)"),
        (Interval(1.10, 0.90, 1.40), 1.5, False, "met"),
        (Interval(1.80, 1.60, 2.00), 1.5, False, "missed"),
        (Interval(1.40, 1.20, 1.70), 1.5, False, "too close to call (centre meets it)"),
        (Interval(1.60, 1.30, 1.90), 1.5, False, "too close to call (centre misses it)"),
    ],
)
def test_verdicts(interval: Interval, goal: float, at_least: bool, verdict: str) -> None:
    assert judge(interval, goal, at_least=at_least) == verdict
