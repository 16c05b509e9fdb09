"""The counts of one process: plain integers and lists the hot path bumps by index.

They live in a `MetricStore` that outlives config generations, so counters never reset on a
reload, and that is plain data, so the counts of several processes can be added up. Nothing
here renders them: ops/metrics.py turns them into Prometheus families when /metrics is scraped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Final

PREFIX = "failover_proxy_"
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
"""Index `status // 100 - 1` of a request-count list (status 100-599)."""

ATTEMPT_OUTCOMES = (
    "ok",
    "connect_failure",
    "reset",
    "timeout",
    "http_5xx",
    "bad_response",
    "cancelled",
    "client_error",
)
"""Index of an attempt-count list: what one try on one backend came to."""
# Final literals: the compiled data plane inlines them instead of looking them up.
ATTEMPT_OK: Final = 0
ATTEMPT_CONNECT_FAILURE: Final = 1
ATTEMPT_RESET: Final = 2
ATTEMPT_TIMEOUT: Final = 3
ATTEMPT_HTTP_5XX: Final = 4
ATTEMPT_BAD_RESPONSE: Final = 5
ATTEMPT_CANCELLED: Final = 6
ATTEMPT_CLIENT_ERROR: Final = 7

DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
"""Upper bounds (seconds) of the request duration histogram; its list of slots has a count per
bound, one for +Inf, then the sum of observed seconds (the data plane fills it in place)."""
DURATION_SLOTS = len(DURATION_BUCKETS) + 2

BACKEND_STATES = ("healthy", "unhealthy", "ejected", "draining")
PROVIDER_STATES = ("up", "degraded", "down")

# Counters bumped off the hot path (retries, ejections, probes…): name -> (help, label names).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "retries": ("Retries, by the condition that caused them.", ("upstream", "reason")),
    "retry_budget_exhausted": (
        "Retries refused because the retry budget was spent.", ("upstream",)
    ),
    "failovers": (
        "Traffic moved from one provider to another: a provider leaving rotation "
        "(reason: health, correlated_failure, forced_down) or one request retried on another "
        "provider (reason: retry_<condition>).",
        ("upstream", "from_provider", "to_provider", "reason"),
    ),
    "ejections": (
        "Backends ejected by passive outlier detection.",
        ("upstream", "provider", "backend", "reason"),
    ),
    "health_checks": ("Active health probes, by result.", ("upstream", "backend", "result")),
    "dns_lookups": (
        "Lookups of backend hostnames, by result (ok, nxdomain, nodata, timeout, error).",
        ("upstream", "backend", "result"),
    ),
    "health_transitions": (
        "Changes of state of a backend, region or provider (level), by the state entered and "
        "the event that caused it.",
        ("upstream", "level", "name", "state", "event"),
    ),
    "connections_refused": (
        "Client connections refused or cut off at once, by reason (per_ip_limit,"
        " http2_flood).", ("reason",)
    ),
    "http2_stream_errors": (
        "HTTP/2 streams the proxy reset for breaking the protocol, by reason"
        " (malformed_request).", ("reason",)
    ),
    "accept_pauses": (
        "Times a process stopped accepting because it held limits.max_connections client "
        "connections (new ones wait in the backlog or go to another worker).", ()
    ),
    "config_reloads": ("Config reloads, by result (success, failure).", ("result",)),
    "tls_certificate_reloads": (
        "Times the listener's certificates were read again (reload or changed files), by "
        "result (success, failure: the running ones kept serving).", ("result",)
    ),
    "hedges": ("Hedged second attempts sent.", ("upstream",)),
    "circuit_breaker_overflows": ("Requests refused by a circuit breaker.", ("upstream",)),
    "requests_shed": (
        "Requests answered 503 with Retry-After at once because the backend chosen and every "
        "other usable one were at their declared capacity.", ("upstream",)
    ),
    "capacity_spills": (
        "Requests sent to another provider because the backend chosen was at its declared "
        "capacity.", ("upstream", "from_provider", "to_provider"),
    ),
    "replay_buffer_overflows": (
        "Failed requests not retried because their body outgrew the replay buffer.",
        ("upstream",),
    ),
    "access_log_dropped": (
        "Access log lines dropped because their reader could not keep up.", ()
    ),
    "worker_restarts": ("Worker processes restarted after dying.", ()),
}


@dataclass(frozen=True)
class ProviderEvent:
    """A provider leaving or re-entering rotation, for the status page's recent history."""

    at: float
    """Wall-clock time (seconds since the epoch)."""
    upstream: str
    provider: str
    kind: str
    """failover (left rotation) or recovered."""
    to: tuple[str, ...]
    """Where its traffic went (failover) or came from (recovered)."""
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at, "upstream": self.upstream, "provider": self.provider,
            "kind": self.kind, "to": list(self.to), "reason": self.reason,
        }


class MetricStore:
    """The counts of one process, kept across config generations.

    Request, attempt and duration counts are lists the data plane bumps by index; the store
    hands out one list per label set (the same list again for the same labels, so a backend
    that survives a reload keeps counting where it was).
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], list[int]] = {}
        """(route, upstream, provider, backend) -> counts per code class."""
        self.attempts: dict[tuple[str, str, str, str], list[int]] = {}
        """(upstream, provider, backend) -> counts per attempt outcome."""
        self.durations: dict[tuple[str, str], list[float]] = {}
        """(upstream, provider) -> bucket counts, +Inf count, sum of seconds."""
        self.counters: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in COUNTERS}
        self.events: deque[ProviderEvent] = deque(maxlen=50)
        self.config_generation = 0

    def request_counts(self, route: str, upstream: str, provider: str, backend: str) -> list[int]:
        key = (route, upstream, provider, backend)
        counts = self.requests.get(key)
        if counts is None:
            counts = self.requests[key] = [0] * len(CODE_CLASSES)
        return counts

    def attempt_counts(
        self, upstream: str, provider: str, backend: str, endpoint: str
    ) -> list[int]:
        key = (upstream, provider, backend, endpoint)
        counts = self.attempts.get(key)
        if counts is None:
            counts = self.attempts[key] = [0] * len(ATTEMPT_OUTCOMES)
        return counts

    def duration_slots(self, upstream: str, provider: str) -> list[float]:
        key = (upstream, provider)
        slots = self.durations.get(key)
        if slots is None:
            slots = self.durations[key] = [0.0] * DURATION_SLOTS
        return slots

    def total_requests(self) -> int:
        return sum(sum(counts) for counts in self.requests.values())

    def inc(self, name: str, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
        series = self.counters[name]
        series[labels] = series.get(labels, 0.0) + amount

    def record_event(self, event: ProviderEvent) -> None:
        self.events.append(event)

    def to_wire(self, sent: dict[tuple[str, Any], Any] | None = None) -> dict[str, Any]:
        """The counts as plain data (a worker's report to its supervisor). With `sent` (what
        earlier reports said, updated here), only what changed since: with thousands of
        backends, a report a second of every count would cost both processes more than the
        traffic does. Values are totals, never increments: a report applies by replacing."""
        wire: dict[str, Any] = {}
        for section, series in (("requests", self.requests), ("attempts", self.attempts),
                                ("durations", self.durations)):
            wire[section] = _changed(section, series, sent)
        wire["counters"] = {
            name: changed for name, values in self.counters.items()
            if (changed := _changed(name, values, sent))
        }
        return wire

    def add(self, wire: dict[str, Any]) -> None:
        """Add another process's counts (from `to_wire`) to these."""
        for key, counts in wire["requests"].items():
            _add_into(self.request_counts(*key), counts)
        for key, counts in wire["attempts"].items():
            _add_into(self.attempt_counts(*key), counts)
        for key, slots in wire["durations"].items():
            _add_into(self.duration_slots(*key), slots)
        for name, series in wire["counters"].items():
            for key, value in series.items():
                self.inc(name, key, value)


def merge_wire(base: dict[str, Any], report: dict[str, Any]) -> None:
    """Bring `base` (a process's counts as `to_wire` gave them) up to a later report of what
    changed."""
    for section in ("requests", "attempts", "durations"):
        base[section].update(report[section])
    for name, series in report["counters"].items():
        base["counters"].setdefault(name, {}).update(series)


def _changed(
    section: str, series: dict[Any, Any], sent: dict[tuple[str, Any], Any] | None
) -> dict[Any, Any]:
    if sent is None:
        return {key: _copy(value) for key, value in series.items()}
    changed = {}
    for key, value in series.items():
        if sent.get((section, key)) != value:
            changed[key] = sent[(section, key)] = _copy(value)
    return changed


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _add_into(target: list[Any], values: list[Any]) -> None:
    for index, value in enumerate(values):
        target[index] += value
