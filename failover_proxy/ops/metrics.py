"""Every metric the proxy exports, rendered in one place.

The hot path never touches prometheus_client: it bumps plain integers in lists a
`MetricStore` hands out (model/counters.py; one list per label set, looked up once and cached by
the caller), and the collector here turns them, and the live state of the topology, into metric
families only when /metrics is scraped. prometheus_client is imported only to render (worker
processes never load it: about 5 MiB).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..model.counters import (
    ATTEMPT_OUTCOMES,
    BACKEND_STATES,
    CODE_CLASSES,
    COUNTERS,
    DURATION_BUCKETS,
    DURATION_SLOTS,
    PREFIX,
    PROVIDER_STATES,
    MetricStore,
)

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ..model.topology import Topology

@dataclass
class ProcessGauges:
    """Live numbers of the process that are not kept in the store."""

    active_requests: int
    downstream_connections: int


class ProxyCollector:
    """Renders a store and the live topology as Prometheus metric families (at scrape time;
    a prometheus_client collector by duck typing)."""

    def __init__(self, store: MetricStore, topology: Topology, gauges: ProcessGauges) -> None:
        self._store = store
        self._topology = topology
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        store = self._store
        known = KnownSeries.of(self._topology)
        yield from _request_families(store, known)
        yield from _counter_families(store, known)
        gauges = self._gauges
        active = GaugeMetricFamily(PREFIX + "active_requests", "Requests in progress.")
        active.add_metric([], gauges.active_requests)
        connections = GaugeMetricFamily(
            PREFIX + "downstream_connections", "Open client connections."
        )
        connections.add_metric([], gauges.downstream_connections)
        generation = GaugeMetricFamily(
            PREFIX + "config_generation", "Config generations loaded since start (1 = first)."
        )
        generation.add_metric([], store.config_generation)
        build = GaugeMetricFamily(
            PREFIX + "build_info", "Always 1: the version running, as labels.",
            labels=("version", "python"),
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield from (active, connections, generation, build)
        yield from _topology_families(self._topology)


DOMAIN_CAUSES = ("health", "correlated_failure", "forced_down")
"""Why a provider left rotation (the `reason` of a failover that is not a retry)."""
DNS_RESULTS = ("ok", "nxdomain", "nodata", "timeout", "error")
RELOAD_RESULTS = ("success", "failure")
REFUSAL_REASONS = ("per_ip_limit", "http2_flood")


@dataclass
class KnownSeries:
    """The label sets the config makes known before anything happens to them.

    They are rendered at 0 from the start: Prometheus's `increase()` and `rate()` see nothing
    of the first event of a series that did not exist before it, so an alert on "a failover
    happened" would miss the first failover of a process. Labels whose values come from what
    happened (an ejection's reason, a transition's state and event) are not guessed.
    """

    requests: list[tuple[str, str, str, str]]
    attempts: list[tuple[str, str, str, str]]
    durations: list[tuple[str, str]]
    counters: dict[str, list[tuple[str, ...]]]

    @classmethod
    def of(cls, topology: Topology) -> KnownSeries:
        from ..config.schema import RETRY_CONDITIONS, is_hostname

        requests: list[tuple[str, str, str, str]] = [("", "", "", "")]
        for route in topology.router.routes:
            upstream = route.target.upstream
            requests.append((route.target.label, upstream.name, "", ""))
            requests.extend((route.target.label, upstream.name, backend.provider, backend.origin)
                            for backend in upstream.backends)
        counters: dict[str, list[tuple[str, ...]]] = {name: [] for name in COUNTERS}
        counters["config_reloads"] = [(result,) for result in RELOAD_RESULTS]
        counters["tls_certificate_reloads"] = [(result,) for result in RELOAD_RESULTS]
        counters["connections_refused"] = [(reason,) for reason in REFUSAL_REASONS]
        counters["access_log_dropped"] = [()]
        counters["worker_restarts"] = [()]
        counters["accept_pauses"] = [()]
        attempts: list[tuple[str, str, str, str]] = []
        durations: list[tuple[str, str]] = []
        for upstream in topology.upstreams.values():
            name = upstream.name
            durations.append((name, ""))
            providers = list(upstream.providers)
            durations.extend((name, provider) for provider in providers)
            attempts.extend((name, b.provider, b.origin, b.endpoint) for b in upstream.backends)
            for counter in ("retry_budget_exhausted", "hedges", "circuit_breaker_overflows",
                            "replay_buffer_overflows", "requests_shed"):
                counters[counter].append((name,))
            if upstream.capped:
                counters["capacity_spills"].extend(
                    (name, source, taker)
                    for source in providers for taker in providers if taker != source)
            counters["retries"].extend(
                (name, condition.replace("-", "_")) for condition in sorted(RETRY_CONDITIONS))
            counters["failovers"].extend(
                (name, source, taker, cause)
                for source in providers for taker in (*providers, "none") if taker != source
                for cause in DOMAIN_CAUSES)
            if upstream.config.health_check is not None:
                counters["health_checks"].extend(
                    (name, backend.name, result)
                    for backend in upstream.backends if backend.endpoint
                    for result in ("ok", "fail"))
            counters["dns_lookups"].extend(
                (name, backend.name, result)
                for backend in upstream.config.backends if is_hostname(backend.url)
                for result in DNS_RESULTS)
        return cls(requests, attempts, durations, counters)


def _with_known(series: dict[Any, Any], known: list[Any], empty: Any) -> Iterator[tuple[Any, Any]]:
    """The series the store has, then the known ones it has not seen yet (at `empty`)."""
    yield from series.items()
    for key in known:
        if key not in series:
            yield key, empty


def _request_families(store: MetricStore, known: KnownSeries) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    requests = CounterMetricFamily(
        PREFIX + "requests",
        "Requests answered, by route, the backend that answered (empty when the proxy "
        "answered itself) and status class.",
        labels=("route", "upstream", "provider", "backend", "code_class"),
    )
    no_requests = [0] * len(CODE_CLASSES)
    for (route, upstream, provider, backend), counts in _with_known(
            store.requests, known.requests, no_requests):
        for code_class, count in zip(CODE_CLASSES, counts, strict=True):
            requests.add_metric([route, upstream, provider, backend, code_class], count)
    attempts = CounterMetricFamily(
        PREFIX + "upstream_attempts",
        "Tries on a backend's endpoint (the address dialled), by outcome (a request retried "
        "elsewhere makes several).",
        labels=("upstream", "provider", "backend", "endpoint", "outcome"),
    )
    no_attempts = [0] * len(ATTEMPT_OUTCOMES)
    for (upstream, provider, backend, endpoint), counts in _with_known(
            store.attempts, known.attempts, no_attempts):
        for outcome, count in zip(ATTEMPT_OUTCOMES, counts, strict=True):
            attempts.add_metric([upstream, provider, backend, endpoint, outcome], count)
    durations = HistogramMetricFamily(
        PREFIX + "request_duration_seconds",
        "Whole requests, from the end of the request head to the end of the response.",
        labels=("upstream", "provider"),
    )
    for (upstream, provider), slots in _with_known(
            store.durations, known.durations, [0.0] * DURATION_SLOTS):
        cumulative = 0.0
        buckets = []
        for bound, in_bucket in zip((*DURATION_BUCKETS, float("inf")), slots[:-1], strict=True):
            cumulative += in_bucket
            buckets.append((_bound_label(bound), cumulative))
        durations.add_metric([upstream, provider], buckets, slots[-1])
    yield from (requests, attempts, durations)


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _counter_families(store: MetricStore, known: KnownSeries) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    for name, (help_text, labels) in COUNTERS.items():
        family = CounterMetricFamily(PREFIX + name, help_text, labels=labels)
        for values, count in _with_known(store.counters[name], known.counters[name], 0.0):
            family.add_metric(list(values), count)
        yield family


def _topology_families(topology: Topology) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    backend_up = GaugeMetricFamily(
        PREFIX + "backend_up",
        "1 when the policy may send the backend's endpoint traffic, else 0 (a backend named "
        "by a hostname has one endpoint per address; endpoint is empty while it has none).",
        labels=("upstream", "provider", "backend", "endpoint"),
    )
    backend_state = GaugeMetricFamily(
        PREFIX + "backend_state", "1 for the current state of the backend's endpoint.",
        labels=("upstream", "provider", "backend", "endpoint", "state"),
    )
    provider_up = GaugeMetricFamily(
        PREFIX + "provider_up", "1 when the provider is in rotation (up or degraded), else 0.",
        labels=("upstream", "provider"),
    )
    provider_state = GaugeMetricFamily(
        PREFIX + "provider_state", "1 for the provider's current state.",
        labels=("upstream", "provider", "state"),
    )
    region_up = GaugeMetricFamily(
        PREFIX + "region_up",
        "1 when the region (a provider's backends in one region) is in rotation, else 0.",
        labels=("upstream", "provider", "region"),
    )
    share = GaugeMetricFamily(
        PREFIX + "provider_traffic_share",
        "The share of new requests the policy gives the provider now (0 to 1).",
        labels=("upstream", "provider"),
    )
    in_flight = GaugeMetricFamily(
        PREFIX + "backend_requests_in_flight", "Requests in progress on the backend's endpoint.",
        labels=("upstream", "provider", "backend", "endpoint"),
    )
    connections = GaugeMetricFamily(
        PREFIX + "backend_connections",
        "Connections open to the backend's endpoint (HTTP/2: each carries many streams).",
        labels=("upstream", "provider", "backend", "endpoint"),
    )
    streams = GaugeMetricFamily(
        PREFIX + "backend_streams",
        "Requests in progress on those connections (HTTP/1: busy connections; HTTP/2: open "
        "streams).",
        labels=("upstream", "provider", "backend", "endpoint"),
    )
    info = GaugeMetricFamily(
        PREFIX + "backend_info",
        "Always 1: where a configured backend runs, to join on (the request counts carry no "
        "region): `* on (upstream, provider, backend) group_left (region)`.",
        labels=("upstream", "provider", "region", "backend"),
    )
    for upstream in topology.upstreams.values():
        for configured in upstream.config.backends:
            info.add_metric(
                [upstream.name, configured.provider, configured.region, configured.name], 1)
        shares = upstream.provider_shares()
        for provider in upstream.providers.values():
            labels = [upstream.name, provider.name]
            provider_up.add_metric(labels, 1 if provider.state != "down" else 0)
            for region in provider.regions:
                region_up.add_metric([*labels, region.region], 1 if region.usable else 0)
            for state in PROVIDER_STATES:
                provider_state.add_metric([*labels, state], 1 if provider.state == state else 0)
            share.add_metric(labels, shares.get(provider.name, 0.0))
            for backend in provider.backends:
                backend_labels = [*labels, backend.origin, backend.endpoint]
                backend_up.add_metric(backend_labels, 1 if backend.usable else 0)
                in_flight.add_metric(backend_labels, backend.in_flight)
                connections.add_metric(backend_labels, backend.connector.open_connections)
                streams.add_metric(backend_labels, backend.connector.active_streams())
                current = backend.state
                for state in BACKEND_STATES:
                    backend_state.add_metric(
                        [*backend_labels, state], 1 if current == state else 0
                    )
    yield from (backend_up, backend_state, provider_up, provider_state, region_up, share,
                in_flight, connections, streams, info)


def exposition(store: MetricStore, topology: Topology, gauges: ProcessGauges) -> bytes:
    """The Prometheus text format of every metric of the proxy."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(store, topology, gauges))
    return generate_latest(registry)
