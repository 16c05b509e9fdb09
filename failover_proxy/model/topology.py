"""Runtime objects built from the config: backends, upstreams and their connectors.

The config models are frozen descriptions; these objects carry what changes while the proxy runs
(connectors, counters, balancer position) and what the hot path needs precomputed (encoded host
headers, base paths, TLS contexts).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from ..config.schema import BackendConfig, ProxyConfig, UpstreamConfig
from .backends import Backend, Domain, Provider, Region
from .balance import Balancer, ConsistentHash, LeastRequest, SmoothWeightedRoundRobin
from .capacity import RateLimit, monotonic, process_rate
from .connector import ConnectorFactory, Dial, unconnected
from .counters import MetricStore
from .discovery import Address, Answer, DnsStatus, target_of
from .healthstate import HealthMachine, carry_backend_health
from .healthview import HealthSnapshot
from .policy import ProviderPolicy
from .routing import Route, Router

_NONE: Final[list[str]] = []
_RAMP_FLOOR: Final = 0.1  # a recovering backend or provider gets at least this share from the start
_SCALE: Final = 1000  # weights are scaled by this before shares (local region, slow start) apply


def _backend_load(backend: Backend) -> float:
    """What least_request compares: requests in flight, times recent latency."""
    return (backend.in_flight + 1) * (backend.ewma_latency or 0.001)


def ramp(now: float, since: float, slow_start: float) -> float:
    """Slow start: the share of its weight a recovered domain or backend gets now (linear)."""
    if slow_start <= 0 or since <= 0 or now - since >= slow_start:
        return 1.0
    return max(_RAMP_FLOOR, (now - since) / slow_start)


def _policy_tiers(config: UpstreamConfig, providers: dict[str, Provider]) -> list[Domain]:
    """What the policy chooses between: providers, or regions where `policy.providers` names
    them (a provider's unnamed regions right after its last named one), in the configured
    order, then the providers it does not name."""
    entries = config.policy.providers or []
    tiers: list[Domain] = []
    for entry in entries:
        provider_name, slash, _ = entry.partition("/")
        provider = providers[provider_name]
        if not slash:
            tiers.append(provider)
            continue
        tiers.extend(r for r in provider.regions if r.name == entry)
        named = [e for e in entries if e.startswith(provider_name + "/")]
        if entry == named[-1]:
            tiers.extend(r for r in provider.regions if r.name not in named)
    listed = {t.provider for t in tiers}
    tiers.extend(p for name, p in providers.items() if name not in listed)
    return tiers


class Upstream:
    """A named pool of backends spread over providers and regions, with its policy, settings and
    health machine."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        backends: list[Backend],
        store: MetricStore | None = None,
        previous: Upstream | None = None,
        now: float = 0.0,
        processes: int = 1,
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
                provider, members,
                weights.get(provider, round(sum(b.weight * b.share for b in members))),
            )
            for provider, members in by_provider.items()
        }
        self.regions = [r for p in self.providers.values() for r in p.regions]
        self._region_of = {(r.provider, r.region): r for r in self.regions}
        self.domains: list[Domain] = [*self.regions, *self.providers.values()]
        """Every region and provider: what the health machine derives states for."""
        self.tiers = tiers = _policy_tiers(config, self.providers)
        self._tier_named = {t.name: t for t in tiers}
        for tier in tiers:
            tier.weight = weights.get(tier.name, tier.weight)
            for backend in tier.backends:
                backend.tier = tier.name
        self.unanswered_durations = store.duration_slots(name, "")
        """Duration slots of requests no backend answered (503 at once, circuit breaker…)."""
        self.policy = ProviderPolicy(config.policy, tiers)
        self.failure_statuses = frozenset(config.outlier.failure_statuses)
        # Settings read per request, kept as plain attributes (cheaper than the config model).
        self.read_timeout: float = config.timeouts.read
        self.per_try_timeout: float | None = config.retry.per_try_timeout
        self.preserve_host = config.host_header == "preserve"
        self.hash_on = config.hash_on
        self.hedge_after: float | None = config.retry.hedge_after
        buffering = config.request_buffering
        self.buffer_body_bytes: int = buffering.max_bytes if buffering.enabled else 0
        """Request bodies up to this size are read whole before a backend is dialled (0: off)."""
        # A body read whole can always be sent again.
        self.replay_max_bytes: int = max(config.retry.replay_max_bytes, self.buffer_body_bytes)
        self.max_requests = config.circuit_breaker.max_requests
        self.max_requests_per_backend = config.circuit_breaker.max_requests_per_backend
        self.ramping = False
        """A domain or backend is in its slow-start ramp: the sweep refreshes weights."""
        self.panic = False
        """Too few backends usable: health is ignored (panic: spread) or all is refused (fail)."""
        self.active_requests = 0
        self.active_retries = 0
        self.generation = 0
        self.ssl_context: ssl.SSLContext | None = None
        self.connectors: ConnectorFactory = unconnected
        """Makes its backends' connectors (set by build_upstream)."""
        self.listeners: list[Callable[[Upstream], None]] = []
        """Called after every change of state (metrics, status page)."""
        self.backend_configs = {b.name: b for b in config.backends}
        self.processes = processes
        """The processes that serve traffic, each sending a backend its share of its
        capacity."""
        self.capped = False
        """Some backend has a declared capacity: picks check it (else they need not look)."""
        self._limit(backends)
        self.discovered: dict[str, tuple[Address, ...] | None] = {}
        """The addresses each backend named by a hostname has as endpoints now (None: none,
        its name not resolved yet or gone); set by build_upstream and set_endpoints alone."""
        self.dns_status: dict[str, DnsStatus] = {}
        """What the last lookups of each hostname said (the supervisor's, for /status)."""
        self.health = HealthMachine(self)
        self.health.config_changed(previous, now)  # carries state over, builds the balancers

    def set_endpoints(
        self, origin: str, addresses: tuple[Address, ...] | None, awaiting_probe: bool
    ) -> list[Backend]:
        """Make `addresses` the endpoints of the backend `origin` (None: it has none). Those
        that stay keep their object, connector and health; new ones are built (waiting for a
        passing probe when `awaiting_probe`); the removed ones are returned, their connectors closed
        (idle connections now, busy ones when their request ends). Called by the health
        machine (a DNS answer) and a worker adopting its snapshot, and by nothing else."""
        config = self.backend_configs[origin]
        old = [b for b in self.backends if b.origin == origin]
        by_name = {b.name: b for b in old}
        tier = old[0].tier if old else config.provider
        drained = bool(old) and all(b.draining for b in old)  # an operator's drain holds
        new = []
        if not addresses:
            placeholder = by_name.get(origin)
            if placeholder is None:
                placeholder = build_backend(config, self.name, self.config, self.ssl_context,
                                            self.store, connectors=self.connectors)
                placeholder.tier = tier
                placeholder.draining = drained
            new.append(placeholder)
        else:
            total = sum(a.weight for a in addresses)
            for address in addresses:
                found = by_name.get(endpoint_name(origin, address))
                if found is None:
                    found = build_backend(config, self.name, self.config, self.ssl_context,
                                          self.store, address, address.weight / total,
                                          self.connectors)
                    found.tier = tier
                    found.draining = drained
                    if awaiting_probe:
                        found.healthy = False
                        found.awaiting_probe = True
                        found.reason = "new address: waiting for a passing probe"
                found.share = address.weight / total
                new.append(found)
        removed = [b for b in old if b not in new]
        for backend in removed:
            backend.connector.close()
        provider = self.providers[config.provider]
        region = self._region_of[(config.provider, config.region)]
        for members in (self.backends, provider.backends, region.backends):
            members[:] = _spliced(members, old, new)
        self._limit(new)
        self.discovered[origin] = addresses
        return removed

    def _limit(self, backends: list[Backend]) -> None:
        """Give `backends` their part of their declared capacity, as this process's share."""
        for backend in backends:
            capacity = self.backend_configs[backend.origin].capacity
            backend.limit = (None if capacity is None else
                             RateLimit(process_rate(capacity, backend.share, self.processes)))
        self.capped = any(b.limit is not None for b in self.backends)

    def region_of(self, backend: Backend) -> Region:
        """The region (of this generation) a backend belongs to."""
        return self._region_of[(backend.provider, backend.region)]

    def rebuild(self, now: float) -> None:
        """The balancers and the policy's table from the health machine's states: called by
        the machine after every change it makes, and by nothing else."""
        policy = self.config.policy
        slow_start = policy.slow_start
        usable_share = sum(1 for b in self.backends if b.usable) / len(self.backends)
        self.panic = usable_share < policy.panic_threshold
        spread = self.panic and policy.panic == "spread"
        refuse = self.panic and policy.panic == "fail"
        ramping = False
        for tier in self.tiers:
            if spread:  # (a hostname without addresses has nowhere to send anything)
                candidates = [b for b in tier.backends if not b.draining and b.endpoint]
            else:
                candidates = [b for b in tier.backends if b.usable]
                # A provider's backends in its down regions take no traffic through it (unless
                # every region is down: the provider is then down too, its balancer only the
                # last resort when nothing else is left).
                live = [b for b in candidates if self.region_of(b).state != "down"]
                candidates = live or candidates
            weights = self._weights(tier, candidates, now, spread)
            for b in candidates:
                ramping = ramping or ramp(now, b.usable_since, slow_start) < 1.0
            tier.ramp = ramp(now, tier.up_since, slow_start)
            ramping = ramping or tier.ramp < 1.0
            kept = [(b, w) for b, w in zip(candidates, weights, strict=True) if w > 0]
            members = (tuple(kept), self.config.balancer) if kept and not refuse else None
            if members != tier.balanced:
                # Only when what it balances changed: a balancer rebuilt on every event (each
                # failure a worker reports comes back as a snapshot) would start its cycle
                # over each time, and send every next request to the same first backend.
                tier.balanced = members
                tier.balancer = (
                    self._balancer([b for b, _ in kept], [w for _, w in kept])
                    if members is not None
                    else None
                )
        self.ramping = ramping
        self.policy.rebuild(everyone=spread)

    def _weights(
        self, tier: Domain, candidates: list[Backend], now: float, spread: bool
    ) -> list[int]:
        """Each candidate's weight: its own, ramped by slow start, and shaped by the local
        region's share when the tier is a provider with backends in `policy.local_region`."""
        policy = self.config.policy
        weights = [
            round(b.weight * b.share * _SCALE * ramp(now, b.usable_since, policy.slow_start))
            for b in candidates
        ]
        local = policy.local_region
        if local is None or isinstance(tier, Region) or spread:
            return weights
        members = [b for b in tier.backends if b.region == local]
        if not members or all(b.region == local for b in candidates):
            return weights
        usable = sum(b.weight * b.share for b in members if b in candidates)
        share = min(1.0, policy.overprovisioning * usable
                    / sum(b.weight * b.share for b in members))
        local_total = sum(w for b, w in zip(candidates, weights, strict=True) if b.region == local)
        other_total = sum(weights) - local_total
        if other_total == 0:
            return weights
        shaped = []
        for b, w in zip(candidates, weights, strict=True):
            if b.region == local:
                shaped.append(round(w * _SCALE * share / local_total) if local_total else 0)
            else:
                shaped.append(round(w * _SCALE * (1.0 - share) / other_total))
        return shaped

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

    def provider_shares(self) -> dict[str, float]:
        """The fraction of new requests each provider gets now (its regions' shares added)."""
        shares = {name: 0.0 for name in self.providers}
        for tier, share in self.policy.shares().items():
            provider = tier.partition("/")[0]
            shares[provider] += share
        return shares

    def backend_shares(self) -> dict[str, float]:
        """The fraction of new requests each backend gets now."""
        shares = {b.name: 0.0 for b in self.backends}
        tiers = {t.name: t for t in self.tiers}
        for name, share in self.policy.shares().items():
            balancer = tiers[name].balancer
            for backend, inner in balancer.shares() if balancer is not None else []:
                shares[backend.name] += share * inner
        return shares

    def pick(self, key: int = 0) -> Backend | None:
        """The first attempt's backend (the hot path; `choose` explains and handles retries,
        and spills what a backend at its capacity cannot take)."""
        tier = self.policy.pick(_NONE)
        if tier is None or tier.balancer is None:
            return None
        backend = tier.balancer.pick(key)
        if self.capped:
            limit = backend.limit
            if limit is not None and not limit.admit(monotonic()):
                return None
        return backend

    def choose(
        self, tried_backends: list[Backend], tried_tiers: list[str], peek: bool = False
    ) -> tuple[Backend | None, str]:
        """The backend for an attempt, and why it was chosen when it is not the plain choice:
        within its declared capacity, else spilled to one with room, else none (shed).

        `peek` answers without moving any balancer on (the admin's /debug/route).
        """
        backend, reason = self._choose(tried_backends, tried_tiers, peek)
        if backend is None or not self.capped or peek:
            return backend, reason
        now = monotonic()
        limit = backend.limit
        if limit is None or limit.admit(now):
            return backend, reason
        return self._spill(backend, tried_backends, tried_tiers, now)

    def _spill(self, full: Backend, tried_backends: list[Backend], tried_tiers: list[str],
               now: float) -> tuple[Backend | None, str]:
        """`full` is at its capacity: the next backend with room, in its own tier first, then
        in the tiers the policy orders after it; none left: shed (counted)."""
        at = (f"{full.name} at its capacity "
              f"({self.backend_configs[full.origin].capacity:g} req/s)")
        first = self._tier_named.get(full.tier)
        for tier in self.policy.spill_order(first, tried_tiers, now):
            balancer = tier.balancer
            if balancer is None:
                continue
            for _ in range(len(balancer)):
                candidate = balancer.pick()
                if candidate is full or candidate in tried_backends:
                    continue
                limit = candidate.limit
                if limit is None or limit.admit(now):
                    if candidate.provider != full.provider:
                        self.store.inc("capacity_spills",
                                       (self.name, full.provider, candidate.provider))
                    return candidate, f"spilled to {_tier_text(tier)}: {at}"
        self.store.inc("requests_shed", (self.name,))
        return None, f"shed: {at}, and no other usable backend has room"

    def _choose(
        self, tried_backends: list[Backend], tried_tiers: list[str], peek: bool
    ) -> tuple[Backend | None, str]:
        different = self.config.retry.next_attempt == "different_provider"
        tier = self.policy.pick(tried_tiers if different else [], peek)
        reason = ""
        if tier is None and tried_tiers:
            tier = self.policy.pick([], peek)
            reason = "no other provider usable"
        if tier is None or tier.balancer is None:
            if self.panic and self.config.policy.panic == "fail":
                return None, "panic: too few usable backends, refusing (panic: fail)"
            fallback = self.last_resort(tried_backends)
            if fallback is not None:
                return fallback, (f"last resort: nothing in rotation, {fallback.name} passes "
                                  "its checks")
            return None, "no usable backend: " + "; ".join(
                p.reason or f"provider {p.name} down" for p in self.providers.values()
            )
        balancer = tier.balancer
        if peek:
            backend = balancer.peek(tried_backends)
        else:
            backend = balancer.pick()
            for _ in range(len(balancer)):
                if backend not in tried_backends:
                    break
                backend = balancer.pick()
        if backend in tried_backends:
            # Everything in rotation failed this request already: rather than the same
            # backend again, one held out of rotation (hold-down) whose own checks pass.
            fallback = self.last_resort(tried_backends)
            if fallback is not None:
                return fallback, (f"last resort after {', '.join(tried_tiers)}: "
                                  f"{fallback.name} is out of rotation but passes its checks")
        if tried_tiers and not reason:
            reason = f"retry on {_tier_text(tier)} after {', '.join(tried_tiers)}"
        elif not tried_tiers and tier is not self.policy.preferred:
            reason = self.policy.why_not_preferred()
        return backend, reason

    def last_resort(self, tried: list[Backend]) -> Backend | None:
        """A backend out of rotation only because its provider or region is held down (or
        taken down with others), while its own state is healthy: probes pass, not ejected, not
        drained, not forced down by an operator. Used only when nothing in rotation is left to
        try: an answer from a provider that has recovered but waits out its hold-down beats an
        error. The least busy such backend; None when there is none."""
        best: Backend | None = None
        for backend in self.backends:
            if backend in tried or backend.state != "healthy" or not backend.endpoint:
                continue
            if self.providers[backend.provider].forced_down or self.region_of(backend).forced_down:
                continue
            if best is None or backend.in_flight < best.in_flight:
                best = backend
        return best

    def close(self) -> None:
        for backend in self.backends:
            backend.connector.close()


def _tier_text(tier: Domain) -> str:
    return f"region {tier.name}" if isinstance(tier, Region) else f"provider {tier.name}"


ALPN: Final = {"http1": ["http/1.1"], "h2": ["h2"], "h2c": [], "auto": ["h2", "http/1.1"]}
"""What TLS offers a backend, by the upstream's `protocol`."""


def tls_context(config: UpstreamConfig) -> ssl.SSLContext:
    """Client TLS context for HTTPS backends: verification on unless the operator turns it off."""
    context = ssl.create_default_context(cafile=config.tls.ca_file)
    if config.tls.cert_file is not None and config.tls.key_file is not None:
        context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    if not config.tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if ALPN[config.protocol]:
        context.set_alpn_protocols(ALPN[config.protocol])
    return context


def connection_settings(upstream: UpstreamConfig) -> tuple[object, ...]:
    """Everything a backend's connector is built from besides its URL."""
    return (upstream.protocol, upstream.tls, upstream.pool, upstream.timeouts.connect,
            upstream.http2)


def endpoint_name(origin: str, address: Address) -> str:
    return f"{origin}@{address.label}"


def build_backend(
    backend: BackendConfig,
    upstream_name: str,
    upstream: UpstreamConfig,
    ssl_context: ssl.SSLContext | None,
    store: MetricStore,
    address: Address | None = None,
    share: float = 1.0,
    connectors: ConnectorFactory = unconnected,
) -> Backend:
    """The runtime backend of a configured one: the backend itself for an IP address; for a
    hostname, one of its endpoints (`address`), or without an address a stand-in that is
    never usable until DNS answers."""
    parts = urlsplit(backend.url)
    scheme = parts.scheme.removeprefix("srv+")
    host = parts.hostname or ""
    default_port = 443 if scheme == "https" else 80
    port = parts.port or default_port
    name_host, dial_host, dial_port = host, host, port
    if address is not None:
        name_host = address.name or host  # an SRV target is the name its server answers to
        dial_host, dial_port = address.host, address.port
    host_for_header = f"[{name_host}]" if ":" in name_host else name_host
    if dial_port != default_port:
        host_for_header = f"{host_for_header}:{dial_port}"
    tls = ssl_context if scheme == "https" else None
    dial = Dial(
        host=dial_host,
        port=dial_port,
        ssl_context=tls,
        # Whatever address is dialled, TLS names the host the URL (or SRV) gave.
        server_hostname=(upstream.tls.server_name or name_host) if tls else None,
        authority=host_for_header.encode("idna"),
        connect_timeout=upstream.timeouts.connect,
        max_idle=upstream.pool.max_idle_per_backend,
        idle_timeout=upstream.pool.idle_timeout,
        stream_window=upstream.http2.initial_window,
        connection_window=upstream.http2.connection_window,
        ping_interval=upstream.http2.ping_interval or 0.0,
        ping_timeout=upstream.http2.ping_timeout,
    )
    name = backend.name if address is None else endpoint_name(backend.name, address)
    resolved = address is not None or target_of(backend, upstream.dns) is None
    endpoint = Address(dial_host, dial_port).label if resolved else ""
    built = Backend(
        name=name,
        provider=backend.provider,
        region=backend.region,
        weight=backend.weight,
        scheme=scheme,
        host=dial_host,
        port=dial_port,
        base_path=parts.path.rstrip("/").encode(),
        connector=connectors(upstream.protocol, dial),
        attempt_counts=store.attempt_counts(upstream_name, backend.provider, backend.name,
                                            endpoint),
        durations=store.duration_slots(upstream_name, backend.provider),
        origin=backend.name,
        endpoint=endpoint,
        share=share,
    )
    if not resolved:
        built.healthy = False
        built.reason = f"DNS: {host} not resolved yet"
    built.connection_settings = connection_settings(upstream)
    return built


def _carry_backend(
    config: BackendConfig, upstream: UpstreamConfig, old: Backend | None, new: Backend
) -> Backend:
    """The backend the new generation uses: the old object itself when nothing about its
    connections changed (connector, in-flight count and health stay as they are), else the new
    one with the old one's health; the old connector then drains (closed as its requests
    finish)."""
    if old is None or old.address != new.address or old.provider != new.provider:
        return new
    if old.connection_settings == new.connection_settings and old.base_path == new.base_path:
        new.connector.close()
        old.weight = config.weight
        old.region = config.region
        old.share = new.share
        return old
    carry_backend_health(old, new)
    old.connector.close()
    return new


def build_upstream(
    name: str,
    config: UpstreamConfig,
    store: MetricStore | None = None,
    previous: Upstream | None = None,
    now: float = 0.0,
    resolved: dict[str, tuple[Address, ...]] | None = None,
    processes: int = 1,
    connectors: ConnectorFactory = unconnected,
) -> Upstream:
    """An upstream from its config; with `previous` (a reload), what is unchanged carries on,
    hostnames with the endpoints DNS last gave them; `resolved`: the endpoints of hostnames
    resolved before a start; `processes`: how many serve traffic (capacity is shared);
    `connectors`: makes its backends' connectors (none for a topology nothing sends through)."""
    store = store if store is not None else MetricStore()
    needs_tls = any(b.url.startswith(("https://", "srv+https://")) for b in config.backends)
    ssl_context = tls_context(config) if needs_tls else None
    old_backends = {b.name: b for b in previous.backends} if previous is not None else {}
    backends: list[Backend] = []
    discovered: dict[str, tuple[Address, ...] | None] = {}
    for backend in config.backends:
        if target_of(backend, config.dns) is None:
            built = [build_backend(backend, name, config, ssl_context, store,
                                   connectors=connectors)]
        else:
            addresses = _still_valid(previous, backend) or (resolved or {}).get(backend.name)
            discovered[backend.name] = addresses
            built = (
                [build_backend(backend, name, config, ssl_context, store, a,
                               a.weight / sum(b.weight for b in addresses), connectors)
                 for a in addresses]
                if addresses
                else [build_backend(backend, name, config, ssl_context, store,
                                    connectors=connectors)]
            )
        backends.extend(_carry_backend(backend, config, old_backends.get(b.name), b)
                        for b in built)
    upstream = Upstream(name, config, backends, store, previous, now, processes)
    upstream.ssl_context = ssl_context
    upstream.connectors = connectors
    upstream.discovered = discovered
    if previous is not None:
        upstream.dns_status = {k: v for k, v in previous.dns_status.items() if k in discovered}
    return upstream


def _still_valid(previous: Upstream | None, backend: BackendConfig) -> tuple[Address, ...] | None:
    """The addresses a reloaded backend's name had, when it is still the same name."""
    if previous is None:
        return None
    before = previous.backend_configs.get(backend.name)
    if before is None or before.url != backend.url or before.discovery != backend.discovery:
        return None
    return previous.discovered.get(backend.name)


def _spliced(members: list[Backend], old: list[Backend], new: list[Backend]) -> list[Backend]:
    """`members` with the backends `old` replaced by `new`, where the first of them stood."""
    if not old:
        return [*members, *new]
    at = members.index(old[0])
    kept = [b for b in members if b not in old]
    return [*kept[:at], *new, *kept[at:]]




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
            provider, name = (backend.provider, backend.origin) if backend is not None else ("", "")
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
    resolved: dict[str, dict[str, tuple[Address, ...]]] | None = None,
    connectors: ConnectorFactory = unconnected,
) -> Topology:
    """A new generation; with `previous` (a reload), an upstream whose config is unchanged
    carries on as it is (a reload of thousands of upstreams that changes one rebuilds one),
    unchanged backends keep their connectors and health, providers keep their state, and backends
    left out are closed once idle. `connectors`: see build_upstream."""
    store = store if store is not None else MetricStore()
    upstreams = build_upstreams(config, list(config.upstreams), store, previous, now, resolved,
                                connectors)
    return assemble_topology(config, upstreams, store, previous)


def build_upstreams(
    config: ProxyConfig,
    names: list[str],
    store: MetricStore,
    previous: Topology | None = None,
    now: float = 0.0,
    resolved: dict[str, dict[str, tuple[Address, ...]]] | None = None,
    connectors: ConnectorFactory = unconnected,
) -> dict[str, Upstream]:
    """The upstreams `names` of a new generation (build_topology, a part at a time: a worker
    builds a large one between turns of its event loop)."""
    old = previous.upstreams if previous is not None else {}
    upstreams = {}
    for name in names:
        cfg = config.upstreams[name]
        before = old.get(name)
        if before is not None and (before.config is cfg or before.config == cfg):
            upstreams[name] = before
        else:
            upstreams[name] = build_upstream(name, cfg, store, before, now,
                                             (resolved or {}).get(name), config.worker_count,
                                             connectors)
    return upstreams


def assemble_topology(
    config: ProxyConfig,
    upstreams: dict[str, Upstream],
    store: MetricStore,
    previous: Topology | None = None,
) -> Topology:
    """The generation of `upstreams` (all of them, from build_upstreams): its routes; the
    backends the previous one had and this one has not are closed once idle."""
    old = previous.upstreams if previous is not None else {}
    rebuilt = [u for name, u in upstreams.items() if u is not old.get(name)]
    kept = {id(b) for u in rebuilt for b in u.backends}
    for name, upstream in old.items():
        if upstreams.get(name) is upstream:
            continue  # carried on whole, every backend with it
        for backend in upstream.backends:
            if id(backend) not in kept:
                backend.connector.close()  # removed: idle connections close, busy on release
    router = Router(
        [
            Route(r.host, r.path_prefix, RouteTarget(r.label, upstreams[r.upstream], store, {}))
            for r in config.routes
        ]
    )
    return Topology(upstreams=upstreams, router=router)


def take_snapshot(
    topology: Topology, now: float, version: int, only: set[str] | None = None
) -> HealthSnapshot:
    """The health of every upstream, or of those named in `only` (the others unchanged)."""
    return HealthSnapshot(version, {
        u.name: u.health.export(now) for u in topology.upstreams.values()
        if only is None or u.name in only
    }, time.time())


def apply_snapshot(topology: Topology, snapshot: HealthSnapshot, now: float) -> None:
    """Make this process's backends, regions and providers what the supervisor says."""
    for name, health in snapshot.upstreams.items():
        upstream = topology.upstreams.get(name)
        if upstream is not None:  # else a generation this worker has not loaded yet
            upstream.health.adopt(health, now)


def apply_answer(
    topology: Topology, store: MetricStore, upstream_name: str, backend: str, answer: Answer,
    now: float, wall: float,
) -> bool:
    """Count an answer and hand it to its upstream's health machine; True when the backend's
    endpoints changed (probes must follow them)."""
    upstream = topology.upstreams.get(upstream_name)
    if upstream is None or backend not in upstream.discovered:
        return False  # a name a reload has just removed
    store.inc("dns_lookups", (upstream_name, backend, answer.result))
    return upstream.health.dns_answered(backend, answer, now, wall)
