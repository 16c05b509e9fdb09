"""The last minutes of traffic per provider, kept in memory for the status page's charts.

The admin listener samples the proxy's counts every `admin.history_interval` and keeps, per
upstream and provider, what happened between two samples: requests per second, the share of
5xx answers, and the p99 of request durations (from the duration histogram's buckets, as
Prometheus's `histogram_quantile` computes it). Fifteen minutes of points need no database and
cost a few kilobytes; longer history is Prometheus's job.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from ..model.counters import CODE_CLASSES, DURATION_BUCKETS, MetricStore

WINDOW = 15 * 60.0
"""Seconds of history kept."""
SERVER_ERRORS = CODE_CLASSES.index("5xx")


@dataclass(frozen=True)
class Point:
    """What happened to one provider's traffic between two samples."""

    at: float
    """Wall-clock time of the sample that ends the interval (seconds since the epoch)."""
    requests_per_second: float
    error_ratio: float | None
    """5xx answers / all answers (None: no requests)."""
    p99_seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3), "rps": round(self.requests_per_second, 3),
            "error_ratio": None if self.error_ratio is None else round(self.error_ratio, 5),
            "p99_ms": None if self.p99_seconds is None else round(self.p99_seconds * 1000, 3),
        }


@dataclass
class _Totals:
    requests: int
    errors: int
    buckets: list[float]


class TrafficHistory:
    """Points per (upstream, provider); provider "" holds what the proxy answered itself."""

    def __init__(self, interval: float, window: float = WINDOW) -> None:
        self.interval = interval
        self.window = window
        self._points: dict[tuple[str, str], deque[Point]] = {}
        self._last: dict[tuple[str, str], _Totals] = {}
        self._last_at: float | None = None

    def sample(self, store: MetricStore, now: float) -> None:
        """Add a point per provider for the time since the previous sample."""
        totals = _totals(store)
        previous_at, self._last_at = self._last_at, now
        previous, self._last = self._last, totals
        if previous_at is None or now <= previous_at:
            return
        elapsed = now - previous_at
        for key, total in totals.items():
            before = previous.get(key) or _Totals(0, 0, [0.0] * len(total.buckets))
            # Counts never go down (a restarted worker's counts are kept); be safe anyway.
            requests = max(0, total.requests - before.requests)
            errors = max(0, total.errors - before.errors)
            buckets = [max(0.0, now_count - then)
                       for now_count, then in zip(total.buckets, before.buckets, strict=True)]
            points = self._points.get(key)
            if points is None:
                points = self._points[key] = deque(maxlen=max(2, int(self.window /
                                                                     self.interval)))
            points.append(Point(now, requests / elapsed, errors / requests if requests else None,
                                quantile(0.99, buckets)))

    def as_dict(self, upstreams: list[str]) -> dict[str, Any]:
        """The points of the upstreams named (those of the running config), oldest first."""
        found: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in upstreams}
        for (upstream, provider), points in self._points.items():
            if upstream in found:
                found[upstream][provider] = [point.as_dict() for point in points]
        return {"interval_s": self.interval, "window_s": self.window, "upstreams": found}


def _totals(store: MetricStore) -> dict[tuple[str, str], _Totals]:
    totals: dict[tuple[str, str], _Totals] = {}
    for (_, upstream, provider, _), counts in store.requests.items():
        if not upstream:
            continue  # no route matched: no upstream to chart it under
        total = totals.get((upstream, provider))
        if total is None:
            total = totals[(upstream, provider)] = _Totals(0, 0, [])
        total.requests += sum(counts)
        total.errors += counts[SERVER_ERRORS]
    for (upstream, provider), slots in store.durations.items():
        total = totals.get((upstream, provider))
        if total is not None:
            total.buckets = list(slots[:-1])  # per-bucket counts and +Inf; the sum is not needed
    for total in totals.values():
        if not total.buckets:
            total.buckets = [0.0] * (len(DURATION_BUCKETS) + 1)
    return totals


def quantile(q: float, buckets: list[float]) -> float | None:
    """The q-quantile of observations counted per bucket (the bounds of DURATION_BUCKETS, then
    +Inf), interpolated linearly inside its bucket; the highest finite bound when it falls in
    +Inf. None without observations."""
    observed = sum(buckets)
    if observed <= 0:
        return None
    rank = q * observed
    seen = 0.0
    lower = 0.0
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), buckets, strict=True):
        if count and seen + count >= rank:
            if bound == float("inf"):
                return DURATION_BUCKETS[-1]
            return lower + (bound - lower) * (rank - seen) / count
        seen += count
        lower = bound
    return DURATION_BUCKETS[-1]
