"""Runtime objects built from the config: backends, upstreams and their connection pools.

The config models are frozen descriptions; these objects carry what changes while the proxy runs
(pools, counters, balancer position) and what the hot path needs precomputed (encoded host
headers, base paths, TLS contexts).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from .balance import Balancer, ConsistentHash, LeastRequest, SmoothWeightedRoundRobin
from .dataplane.headers import host_line
from .dataplane.upstream import UpstreamPool
from .metrics import MetricStore, ProviderEvent
from .outlier import OutlierDetector
from .policy import ProviderPolicy
from .routing import Route, Router
from .schema import BackendConfig, ProxyConfig, UpstreamConfig


class Backend:
    """One origin: where it is, its provider and region, its pool, and what we know of its health.

    `usable` is what the policy reads on the hot path; it is recomputed by `Upstream.refresh`
    whenever a health check, an ejection or an operator changes one of its inputs.
    """

    def __init__(
        self,
        *,
        name: str,
        provider: str,
        region: str,
        weight: int,
        scheme: str,
        host: str,
        port: int,
        base_path: bytes,
        host_header: bytes,
        pool: UpstreamPool,
        attempt_counts: list[int],
        durations: list[float],
    ) -> None:
        self.name = name
        self.provider = provider
        self.region = region
        self.weight = weight
        self.scheme = scheme
        self.host = host
        self.port = port
        self.base_path = base_path
        self.host_header = host_header
        self.host_line = host_line(host_header)
        """The end of the request line and the Host line it is sent with (host_header)."""
        self.pool = pool
        self.connection_settings: tuple[object, ...] = ()
        """What the pool was built from: a reload keeps the pool only when these are equal."""
        self.attempt_counts = attempt_counts
        """Tries on this backend by outcome (indexes in metrics.ATTEMPT_OUTCOMES)."""
        self.durations = durations
        """Duration histogram slots of its provider (metrics.observe_duration)."""
        self.in_flight = 0
        self.attempts_total = 0
        self.healthy = True
        """Active health checks' verdict (optimistic until they say otherwise)."""
        self.last_check = ""
        self.last_check_at = 0.0
        """Wall-clock time of the last probe's result (0: not probed yet)."""
        self.ejected_until = 0.0
        self.ejections = 0
        self.consecutive_failures = 0
        self.on_probation = False
        self.draining = False
        self.usable = True
        self.usable_since = 0.0
        self.ewma_latency = 0.0
        """Recent latency of real requests (seconds, EWMA of each successful attempt)."""
        self.reason = ""

    @property
    def address(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if not self.healthy:
            return "unhealthy"
        if self.ejected_until:
            return "ejected"
        return "healthy"


class Provider:
    """The backends of one provider inside one upstream, and the provider's own state."""

    def __init__(self, name: str, backends: list[Backend], weight: int) -> None:
        self.name = name
        self.backends = backends
        self.weight = weight
        self.state = "up"
        self.reason = ""
        self.down_until = 0.0
        """While in the future the provider stays down (hold-down, correlated failure)."""
        self.down_since = 0.0
        self.up_since = 0.0
        self.downs = 0
        """Times taken down in a row without a healthy stretch; each doubles the hold-down."""
        self.ramp = 1.0
        """Slow start: the share of its weight the provider gets now (1.0 once ramped up)."""
        self.forced_down = False
        """Taken down by an operator (a failover drill) until restored."""
        self.balancer: Balancer[Backend] | None = SmoothWeightedRoundRobin(
            backends, [b.weight for b in backends]
        )
        self.recent_failures: dict[str, float] = {}

    @property
    def usable(self) -> bool:
        return self.state != "down" and self.balancer is not None


_NONE: Final[list[str]] = []
_RAMP_FLOOR: Final = 0.1  # a recovering backend or provider gets at least this share from the start


def _backend_load(backend: Backend) -> float:
    """What least_request compares: requests in flight, times recent latency."""
    return (backend.in_flight + 1) * (backend.ewma_latency or 0.001)


def _ramp(now: float, since: float, slow_start: float) -> float:
    """Slow start: the share of its weight a recovered provider or backend gets now (linear)."""
    if slow_start <= 0 or since <= 0 or now - since >= slow_start:
        return 1.0
    return max(_RAMP_FLOOR, (now - since) / slow_start)


def _ramp_percent(now: float, since: float, slow_start: float) -> int:
    return max(1, round(100 * _ramp(now, since, slow_start)))


class Upstream:
    """A named pool of backends spread over providers, with its policy and settings."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        backends: list[Backend],
        store: MetricStore | None = None,
        previous: Upstream | None = None,
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.config = config
        self.backends = backends
        self.store = store = store if store is not None else MetricStore()
        by_provider: dict[str, list[Backend]] = {}
        for backend in backends:
            by_provider.setdefault(backend.provider, []).append(backend)
        weights = config.policy.provider_weights or {}
        self.providers = {
            provider: Provider(
                provider, members, weights.get(provider, sum(b.weight for b in members))
            )
            for provider, members in by_provider.items()
        }
        self.unanswered_durations = store.duration_slots(name, "")
        """Duration slots of requests no backend answered (503 at once, circuit breaker…)."""
        self.policy = ProviderPolicy(config.policy, list(self.providers.values()))
        self.outlier = OutlierDetector(self)
        self.failure_statuses = frozenset(config.outlier.failure_statuses)
        # Settings read per request, kept as plain attributes (cheaper than the config model).
        self.read_timeout: float = config.timeouts.read
        self.per_try_timeout: float | None = config.retry.per_try_timeout
        self.preserve_host = config.host_header == "preserve"
        self.hash_on = config.hash_on
        self.hedge_after: float | None = config.retry.hedge_after
        self.replay_max_bytes: int = config.retry.replay_max_bytes
        self.max_requests = config.circuit_breaker.max_requests
        self.max_requests_per_backend = config.circuit_breaker.max_requests_per_backend
        self.ramping = False
        """A provider or backend is in its slow-start ramp: the sweep refreshes weights."""
        self.panic = False
        """Too few backends usable: health is ignored (panic: spread) or all is refused (fail)."""
        self.active_requests = 0
        self.active_retries = 0
        self.generation = 0
        self.ssl_context: ssl.SSLContext | None = None
        self.listeners: list[Callable[[Upstream], None]] = []
        """Called after every change of state (metrics, status page)."""
        self.records_moves = True
        """Count providers leaving rotation; off in worker processes, whose supervisor counts
        them once for all."""
        if previous is not None:  # a reload: providers carry on in the state they were in
            for provider in self.providers.values():
                old_provider = previous.providers.get(provider.name)
                if old_provider is not None:
                    for field in _CARRIED_PROVIDER_STATE:
                        setattr(provider, field, getattr(old_provider, field))
        self.refresh(now)  # builds the configured balancers

    def refresh(self, now: float) -> None:
        """Recompute backend usability, provider states and balancers after any change."""
        policy = self.config.policy
        minimum = policy.min_healthy_fraction
        hold_down = policy.hold_down
        slow_start = policy.slow_start
        ramping = False
        left: list[tuple[Provider, str]] = []
        returned: list[Provider] = []
        for backend in self.backends:
            if backend.ejected_until and now >= backend.ejected_until:
                backend.ejected_until = 0.0  # back on probation
            was_usable = backend.usable
            backend.usable = backend.healthy and not backend.ejected_until and not backend.draining
            if backend.usable and not was_usable:
                backend.usable_since = now
        usable_share = sum(1 for b in self.backends if b.usable) / len(self.backends)
        self.panic = usable_share < policy.panic_threshold
        spread = self.panic and policy.panic == "spread"
        for provider in self.providers.values():
            usable = [b for b in provider.backends if b.usable]
            candidates = [b for b in provider.backends if not b.draining] if spread else usable
            fraction = len(usable) / len(provider.backends)
            was_down = provider.state == "down"
            if provider.forced_down or now < provider.down_until:
                state = "down"
            elif not usable or fraction < minimum:
                state = "down"
                provider.reason = (
                    f"provider {provider.name} down: {len(usable)} of "
                    f"{len(provider.backends)} backends usable"
                )
            else:
                state = "up" if len(usable) == len(provider.backends) else "degraded"
                provider.reason = "" if state == "up" else (
                    f"provider {provider.name} degraded: {len(usable)} of "
                    f"{len(provider.backends)} backends usable"
                )
            if state == "down" and not was_down:
                provider.down_since = now
                if provider.forced_down:
                    cause = "forced_down"
                elif now < provider.down_until:
                    cause = "correlated_failure"
                else:
                    cause = "health"
                left.append((provider, cause))
                if not provider.forced_down:
                    provider.down_until = max(provider.down_until, now + hold_down)
            elif state != "down" and was_down:
                provider.up_since = now
                returned.append(provider)
            provider.state = state
            provider.ramp = _ramp(now, provider.up_since, slow_start)
            percents = [_ramp_percent(now, b.usable_since, slow_start) for b in candidates]
            weights = [b.weight * p for b, p in zip(candidates, percents, strict=True)]
            ramping = ramping or provider.ramp < 1.0 or any(p < 100 for p in percents)
            provider.balancer = (
                self._balancer(candidates, weights)
                if candidates and not (self.panic and policy.panic == "fail")
                else None
            )
        self.ramping = ramping
        self.policy.rebuild(everyone=spread)
        if (left or returned) and self.records_moves:
            self._record_moves(left, returned)
        self.generation += 1
        for listener in self.listeners:
            listener(self)

    def _record_moves(self, left: list[tuple[Provider, str]], returned: list[Provider]) -> None:
        """Count providers leaving rotation (failovers, to whoever takes their traffic now) and
        keep both directions in the recent history the status page shows."""
        store = self.store
        wall = time.time()
        shares = self.policy.shares()
        for provider, cause in left:
            takers = tuple(n for n, share in shares.items() if share > 0 and n != provider.name)
            for taker in takers or ("none",):
                store.inc("failovers", (self.name, provider.name, taker, cause))
            store.record_event(
                ProviderEvent(wall, self.name, provider.name, "failover", takers,
                              provider.reason or cause)
            )
        for provider in returned:
            givers = tuple(n for n, share in shares.items() if share > 0 and n != provider.name)
            store.record_event(
                ProviderEvent(wall, self.name, provider.name, "recovered", givers,
                              "back in rotation")
            )

    def _balancer(self, backends: list[Backend], weights: list[int]) -> Balancer[Backend]:
        kind = self.config.balancer
        if kind == "least_request":
            return LeastRequest(backends, weights, _backend_load)
        if kind == "hash":
            names = [b.name for b in backends]
            return ConsistentHash(backends, [b.weight for b in backends], names)
        return SmoothWeightedRoundRobin(backends, weights)

    def record_latency(self, backend: Backend, seconds: float) -> None:
        """Feed the EWMA that least_request and the latency strategy read."""
        previous = backend.ewma_latency
        backend.ewma_latency = seconds if previous == 0.0 else previous + 0.2 * (seconds - previous)

    def take_provider_down(self, provider: Provider, now: float, reason: str) -> None:
        """A provider-wide failure: out of rotation at once, for at least the hold-down.

        A provider that fails again soon after coming back stays down twice as long each time
        (capped at outlier.max_ejection), so a provider that passes health checks but fails real
        traffic is not flapped in and out.
        """
        policy = self.config.policy
        stable = now - provider.up_since > 10 * policy.hold_down
        provider.downs = 1 if stable else provider.downs + 1
        hold = min(policy.hold_down * 2 ** (provider.downs - 1), self.config.outlier.max_ejection)
        provider.down_until = now + max(hold, policy.hold_down)
        provider.reason = reason
        self.refresh(now)

    def pick(self, key: int = 0) -> Backend | None:
        """The first attempt's backend (the hot path; `choose` explains and handles retries)."""
        provider = self.policy.pick(_NONE)
        if provider is None or provider.balancer is None:
            return None
        return provider.balancer.pick(key)

    def choose(
        self, tried_backends: list[Backend], tried_providers: list[str]
    ) -> tuple[Backend | None, str]:
        """The backend for an attempt, and why it was chosen when it is not the plain choice."""
        different = self.config.retry.next_attempt == "different_provider"
        provider = self.policy.pick(tried_providers if different else [])
        reason = ""
        if provider is None and tried_providers:
            provider = self.policy.pick([])
            reason = "no other provider usable"
        if provider is None or provider.balancer is None:
            if self.panic and self.config.policy.panic == "fail":
                return None, "panic: too few usable backends, refusing (panic: fail)"
            return None, "no usable backend: " + "; ".join(
                p.reason or f"provider {p.name} down" for p in self.providers.values()
            )
        backend = provider.balancer.pick()
        for _ in range(len(provider.balancer)):
            if backend not in tried_backends:
                break
            backend = provider.balancer.pick()
        if tried_providers and not reason:
            reason = f"retry on provider {provider.name} after {', '.join(tried_providers)}"
        elif not tried_providers and provider is not self.policy.preferred:
            reason = self.policy.why_not_preferred()
        return backend, reason

    def close(self) -> None:
        for backend in self.backends:
            backend.pool.close()


def tls_context(config: UpstreamConfig) -> ssl.SSLContext:
    """Client TLS context for HTTPS backends: verification on unless the operator turns it off."""
    context = ssl.create_default_context(cafile=config.tls.ca_file)
    if not config.tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def connection_settings(upstream: UpstreamConfig) -> tuple[object, ...]:
    """Everything a backend's connection pool is built from besides its URL."""
    return (upstream.tls, upstream.pool, upstream.timeouts.connect)


def build_backend(
    backend: BackendConfig,
    upstream_name: str,
    upstream: UpstreamConfig,
    ssl_context: ssl.SSLContext | None,
    store: MetricStore,
) -> Backend:
    parts = urlsplit(backend.url)
    scheme = parts.scheme
    host = parts.hostname or ""
    default_port = 443 if scheme == "https" else 80
    port = parts.port or default_port
    host_for_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_for_header = f"{host_for_header}:{port}"
    tls = ssl_context if scheme == "https" else None
    pool = UpstreamPool(
        host=host,
        port=port,
        ssl_context=tls,
        server_hostname=(upstream.tls.server_name or host) if tls else None,
        connect_timeout=upstream.timeouts.connect,
        max_idle=upstream.pool.max_idle_per_backend,
        idle_timeout=upstream.pool.idle_timeout,
    )
    built = Backend(
        name=backend.name,
        provider=backend.provider,
        region=backend.region,
        weight=backend.weight,
        scheme=scheme,
        host=host,
        port=port,
        base_path=parts.path.rstrip("/").encode(),
        host_header=host_for_header.encode("idna"),
        pool=pool,
        attempt_counts=store.attempt_counts(upstream_name, backend.provider, backend.name),
        durations=store.duration_slots(upstream_name, backend.provider),
    )
    built.connection_settings = connection_settings(upstream)
    return built


_CARRIED_BACKEND_STATE = (
    "healthy", "last_check", "last_check_at", "ejected_until", "ejections",
    "consecutive_failures", "on_probation", "draining", "usable", "usable_since",
    "ewma_latency", "reason",
)
_CARRIED_PROVIDER_STATE = (
    "state", "reason", "down_until", "down_since", "up_since", "downs", "ramp", "forced_down",
    "recent_failures",
)


def _carry_backend(
    config: BackendConfig, upstream: UpstreamConfig, old: Backend | None, new: Backend
) -> Backend:
    """The backend the new generation uses: the old object itself when nothing about its
    connections changed (pool, in-flight count and health stay as they are), else the new one
    with the old one's health; the old pool then drains (closed as its requests finish)."""
    if old is None or old.address != new.address or old.provider != new.provider:
        return new
    if old.connection_settings == new.connection_settings and old.base_path == new.base_path:
        new.pool.close()
        old.weight = config.weight
        old.region = config.region
        return old
    for name in _CARRIED_BACKEND_STATE:
        setattr(new, name, getattr(old, name))
    old.pool.close()
    return new


def build_upstream(
    name: str,
    config: UpstreamConfig,
    store: MetricStore | None = None,
    previous: Upstream | None = None,
    now: float = 0.0,
) -> Upstream:
    """An upstream from its config; with `previous` (a reload), what is unchanged carries on."""
    store = store if store is not None else MetricStore()
    needs_tls = any(b.url.startswith("https://") for b in config.backends)
    ssl_context = tls_context(config) if needs_tls else None
    old_backends = {b.name: b for b in previous.backends} if previous is not None else {}
    backends = [
        _carry_backend(
            backend,
            config,
            old_backends.get(backend.name),
            build_backend(backend, name, config, ssl_context, store),
        )
        for backend in config.backends
    ]
    upstream = Upstream(name, config, backends, store, previous, now)
    upstream.ssl_context = ssl_context
    return upstream


@dataclass(eq=False)
class RouteTarget:
    """What a route sends to: its upstream, and its request counts by answering backend."""

    label: str
    upstream: Upstream
    store: MetricStore
    counts: dict[Backend | None, list[int]]
    """Counts per status class, by the backend that answered (None: the proxy itself)."""

    def counts_for(self, backend: Backend | None) -> list[int]:
        """The counts list of one backend (found once, then kept in `counts`)."""
        counts = self.counts.get(backend)
        if counts is None:
            provider, name = (backend.provider, backend.name) if backend is not None else ("", "")
            counts = self.store.request_counts(self.label, self.upstream.name, provider, name)
            self.counts[backend] = counts
        return counts


@dataclass(eq=False)
class Topology:
    """Everything one config generation routes to."""

    upstreams: dict[str, Upstream]
    router: Router[RouteTarget]

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()

    def unready_reason(self) -> str | None:
        """Why this generation cannot serve everything it routes: an upstream without a usable
        backend (outside any provider an operator forced down); None when it can."""
        for upstream in self.upstreams.values():
            providers = upstream.providers
            if not any(b.usable and not providers[b.provider].forced_down
                       for b in upstream.backends):
                return f"upstream {upstream.name} has no usable backend"
        return None

    def backend(self, upstream: str, name: str) -> Backend | None:
        found = self.upstreams.get(upstream)
        for backend in found.backends if found is not None else []:
            if backend.name == name:
                return backend
        return None


def build_topology(
    config: ProxyConfig,
    store: MetricStore | None = None,
    previous: Topology | None = None,
    now: float = 0.0,
) -> Topology:
    """A new generation; with `previous` (a reload), unchanged backends keep their pools and
    health, providers keep their state, and backends left out are closed once idle."""
    store = store if store is not None else MetricStore()
    old = previous.upstreams if previous is not None else {}
    upstreams = {
        name: build_upstream(name, cfg, store, old.get(name), now)
        for name, cfg in config.upstreams.items()
    }
    kept = {id(b) for u in upstreams.values() for b in u.backends}
    for upstream in old.values():
        for backend in upstream.backends:
            if id(backend) not in kept:
                backend.pool.close()  # removed: idle connections close, busy ones on release
    router = Router(
        [
            Route(r.host, r.path_prefix, RouteTarget(r.label, upstreams[r.upstream], store, {}))
            for r in config.routes
        ]
    )
    return Topology(upstreams=upstreams, router=router)
