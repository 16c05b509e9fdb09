"""The one health state machine of an upstream: events in, transitions logged and counted,
balancers rebuilt, snapshots out.

Every change of state of a backend, a region or a provider is one of the named events below,
applied by a method of `HealthMachine` and by nothing else: active probes, real requests'
outcomes (passive outlier detection and correlated failure), time passing (ejections and
hold-downs ending, slow start ramping), an operator's drain or force-down, a config reload, and,
in a worker process, the supervisor's snapshot. After each event the machine derives what
follows from it, in one pass from the bottom up:

- a backend is usable while healthy (active checks), not ejected (passive) and not draining;
- a region (the backends of one provider in one region) is down while forced, held down, or
  with too few usable backends (`min_healthy_fraction`);
- a provider is down while forced, held down, with all its regions down, or with too few usable
  backends in the regions that are not;

then logs each transition (WARNING for leaving rotation, INFO for the rest), counts it
(`failover_proxy_health_transitions_total`), has the upstream rebuild its balancers, and tells
its listeners (metrics, status page, the supervisor's broadcast).

Correlated failure: K distinct backends of one region failing within the window take the
region out in one step (for a provider with several regions); K distinct backends of a provider,
in more than one of its regions (or in its only one), take the provider out. A domain taken out
stays out for its hold-down, doubled each time it fails again soon after coming back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .counters import ProviderEvent
from .discovery import DnsStatus, endpoints_in
from .healthview import BackendHealth, DomainHealth, UpstreamHealth

if TYPE_CHECKING:
    from ..config.schema import HealthCheckConfig
    from .backends import Backend, Domain, Provider, Region
    from .discovery import Answer
    from .topology import Upstream

log = logging.getLogger("failover_proxy.health")

# The events, as they appear in logs and in the `event` label of the transitions counter.
PROBE_PASSED: Final = "probe_passed"
PROBE_FAILED: Final = "probe_failed"
REQUEST_FAILED: Final = "request_failed"
TIME_PASSED: Final = "time_passed"
DRAINED: Final = "drained"
UNDRAINED: Final = "undrained"
FORCED_DOWN: Final = "forced_down"
RESTORED: Final = "restored"
CONFIG_CHANGED: Final = "config_changed"
DNS_CHANGED: Final = "dns_changed"
SNAPSHOT: Final = "snapshot"

_OPERATOR_EVENTS: Final = frozenset({DRAINED, UNDRAINED, FORCED_DOWN, RESTORED})
"""An operator's own moves are not failures: they take no hold-down."""
_NO_HOLD_DOWN: Final = _OPERATOR_EVENTS | {CONFIG_CHANGED}
"""Nor is a new config generation (a start included, with hostnames not resolved yet)."""

PROBE_TESTABLE: Final = frozenset({"connect-failure", "timeout"})
"""Failures an active probe tests: it connects and is answered in time. A passing probe ends an
ejection earned by these alone; failure statuses, resets and broken responses on real traffic
are what a health endpoint that answers 200 does not show (a gray failure), so such an ejection
runs its time."""

Reporter = Callable[[str, "Backend", str], None]
"""(kind: failure | success, backend, why): a worker hands request outcomes to its supervisor."""
Mover = Callable[[str, list[str]], None]
"""(event, ['provider aws: up -> down', …]): regions and providers that moved in a worker."""


def _reason_label(why: str) -> str:
    """A failure's description as a metric label: `status 503` -> `http_503`."""
    return why.replace("status ", "http_").replace("-", "_").replace(" ", "_")


class _Transition:
    __slots__ = ("after", "before", "cause", "domain", "level", "name", "reason")

    def __init__(self, level: str, name: str, before: str, after: str, reason: str,
                 cause: str = "", domain: Domain | None = None) -> None:
        self.level = level
        self.name = name
        self.before = before
        self.after = after
        self.reason = reason
        self.cause = cause
        self.domain = domain


class HealthMachine:
    """Owns the health of one upstream's backends, regions and providers."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.report: Reporter | None = None
        """In a worker: request outcomes go to the supervisor, whose machine decides for every
        worker (its decisions come back as snapshots)."""
        self.quiet = False
        """In a worker: transitions are logged and counted once, by the supervisor."""
        self.moved: Mover | None = None
        """In a worker: told of every region and provider that changes state here, whether a
        snapshot moved it or this process's own clock did (a hold-down ending), so the worker
        can say when each change took effect in it."""
        self.next_deadline = 0.0
        """The earliest moment an ejection or a hold-down ends (0: none pending): until then,
        time passing changes nothing unless something ramps."""

    # -- events ----------------------------------------------------------------------------------

    def probe_result(self, backend: Backend, passed: bool, detail: str, check: HealthCheckConfig,
                     now: float, wall: float) -> None:
        """An active probe of `backend` passed or failed."""
        backend.last_check = f"{'ok' if passed else 'failed'}: {detail}"
        backend.last_check_at = wall
        changed = False
        if passed:
            backend.probe_passes += 1
            backend.probe_failures = 0
            if not backend.healthy and (backend.probe_passes >= check.healthy_threshold
                                        or backend.awaiting_probe):
                backend.healthy = True
                backend.awaiting_probe = False
                backend.usable_since = now  # a new address ramps up from its first pass
                backend.reason = ""
                changed = True
            uneject = self.upstream.config.outlier.uneject_on_passing_check
            if (backend.healthy and backend.ejected_until and uneject
                    and backend.ejection_cause in PROBE_TESTABLE):
                backend.ejected_until = 0.0  # still on probation: one failure ejects it again
                backend.ejection_cause = ""
                backend.reason = ""
                changed = True
        else:
            backend.probe_failures += 1
            backend.probe_passes = 0
            if backend.healthy and backend.probe_failures >= check.unhealthy_threshold:
                backend.healthy = False
                backend.reason = f"health check failed {backend.probe_failures} times: {detail}"
                changed = True
        if changed:
            self._settle(now, PROBE_PASSED if passed else PROBE_FAILED)

    def request_succeeded(self, backend: Backend) -> None:
        """A real request to `backend` succeeded: its failure streak and probation end."""
        backend.consecutive_failures = 0
        backend.on_probation = False
        if self.report is not None:
            self.report("success", backend, "")

    def request_failed(self, backend: Backend, now: float, why: str) -> None:
        """A real request to `backend` failed (connect failure, reset, timeout, failure status)."""
        region, provider = self._domains_of(backend)
        if _all_endpoints_failing(backend, region):
            span = self.upstream.config.policy.correlated_failures.window
            _note(region, backend, now, span)
            _note(provider, backend, now, span)
        if self.report is not None:
            self.report("failure", backend, why)
            return
        backend.consecutive_failures += 1
        changed = False
        window = f"{self.upstream.config.policy.correlated_failures.window:g}s"
        if (region.state != "down" and self._region_wide(region)
                and self._others_usable(region.backends)):
            failed = len(region.recent_failures)
            self._take_down(region, now, f"region {region.name} down: {failed} backends "
                            f"failed within {window} ({why})")
            changed = True
        if (provider.state != "down" and self._provider_wide(provider)
                and self._others_usable(provider.backends)):
            # Never the last usable domain: taking it out would only turn errors into 503s.
            self._take_down(provider, now, f"provider {provider.name} down: "
                            f"{len(provider.recent_failures)} backends failed within {window} "
                            f"({why})")
            changed = True
        outlier = self.upstream.config.outlier
        threshold = 1 if backend.on_probation else outlier.consecutive_failures
        if backend.consecutive_failures >= threshold and self._may_eject():
            self._eject(backend, now, why)
            changed = True
        if changed:
            self._settle(now, REQUEST_FAILED)

    def tick(self, now: float) -> None:
        """Time passed: ejections and hold-downs that ended, slow starts that ramp."""
        upstream = self.upstream
        if upstream.config.policy.strategy == "latency":
            spread = upstream.panic and upstream.config.policy.panic == "spread"
            upstream.policy.rebuild(everyone=spread)  # follow the latencies as they move
        due = self.next_deadline and now >= self.next_deadline
        if due or upstream.ramping:
            self._settle(now, TIME_PASSED)

    def drain(self, backend: Backend, draining: bool, now: float) -> None:
        """An operator drains a backend (no new requests) or takes it back."""
        backend.draining = draining
        backend.reason = "drained by an operator" if draining else ""
        self._settle(now, DRAINED if draining else UNDRAINED)

    def force(self, domain: Domain, down: bool, now: float) -> None:
        """An operator (or a drill) forces a provider or region down, or restores it."""
        domain.forced_down = down
        kind = _kind(domain)
        domain.reason = f"{kind} {domain.name} forced down by an operator" if down else ""
        if not down:
            domain.down_until = 0.0
        self._settle(now, FORCED_DOWN if down else RESTORED)

    def config_changed(self, previous: Upstream | None, now: float) -> None:
        """A new generation of the upstream: domains carry on in the state they were in
        (backends that carry on are carried by the topology builder)."""
        if previous is not None:
            old = {d.name: d for d in previous.domains}
            for domain in self.upstream.domains:
                before = old.get(domain.name)
                if before is not None and type(before) is type(domain):
                    _carry_domain(before, domain)
        self._settle(now, CONFIG_CHANGED)

    def dns_answered(self, origin: str, answer: Answer, now: float, wall: float) -> bool:
        """A lookup of backend `origin`'s hostname ended. New addresses become endpoints
        (waiting for a passing probe when the backend had endpoints before and probes are
        configured); addresses no longer in the answer drain; a failed lookup keeps the last
        good answer; a name that no longer exists (NXDOMAIN) leaves the backend unusable, a
        failure of its region and provider like any other. True when the endpoints changed."""
        upstream = self.upstream
        status = upstream.dns_status.setdefault(origin, DnsStatus())
        status.at, status.ttl = wall, answer.ttl
        status.result = answer.result
        current = upstream.discovered.get(origin)
        name = f"{upstream.name} backend {origin}"
        changed = False
        if answer.addresses is not None:
            status.failures = 0
            status.detail = ""
            wanted = endpoints_in(upstream.backend_configs[origin], answer.addresses)
            if wanted != current:
                awaiting = current is not None and upstream.config.health_check is not None
                before = {a.label for a in current or ()}
                after = {a.label for a in wanted}
                upstream.set_endpoints(origin, wanted, awaiting)
                log.info("%s: DNS answer changed: endpoints %s (added %s, removed %s)", name,
                         ", ".join(sorted(after)), ", ".join(sorted(after - before)) or "none",
                         ", ".join(sorted(before - after)) or "none")
                changed = True
        else:
            status.failures += 1
            if answer.detail != status.detail:  # logged once per change, not per lookup
                kept = f"keeping {len(current)} endpoints" if current else "no endpoints"
                log.warning("%s: DNS lookup failed (%s): %s; %s", name, answer.result,
                            answer.detail, "none left" if answer.result == "nxdomain" else kept)
                status.detail = answer.detail
            if answer.result == "nxdomain" and current is not None:
                upstream.set_endpoints(origin, None, awaiting_probe=False)
                changed = True
        placeholder = next((b for b in upstream.backends if b.name == origin and not b.endpoint),
                           None)
        if placeholder is not None:
            placeholder.reason = f"DNS: {answer.detail or 'not resolved yet'}"
            if answer.result == "nxdomain":
                self.request_failed(placeholder, now, "dns_nxdomain")
        if changed or placeholder is not None:
            self._settle(now, DNS_CHANGED)
        return changed

    def adopt(self, health: UpstreamHealth, now: float) -> None:
        """A worker takes the supervisor's decisions (moments travel as offsets from the
        sender's now, so the two processes need not share a clock)."""
        upstream = self.upstream
        before = {d.name: d.state for d in upstream.domains}
        for origin, addresses in health.endpoints.items():
            if origin in upstream.discovered and upstream.discovered[origin] != addresses:
                upstream.set_endpoints(origin, addresses, awaiting_probe=False)
        for backend in self.upstream.backends:
            state = health.backends.get(backend.name)
            if state is not None:
                _adopt_backend(backend, state, now)
        for domain in self.upstream.domains:
            found = health.domains.get(domain.name)
            if found is not None:
                _adopt_domain(domain, found, now)
        self._settle(now, SNAPSHOT, before)

    def export(self, now: float) -> UpstreamHealth:
        """This upstream's health, for the workers."""
        return UpstreamHealth(
            backends={b.name: _export_backend(b, now) for b in self.upstream.backends},
            domains={d.name: _export_domain(d, now) for d in self.upstream.domains},
            endpoints=dict(self.upstream.discovered),
        )

    # -- questions -------------------------------------------------------------------------------

    def failure_confined(self, backend: Backend, now: float) -> bool:
        """Whether a failure of `backend` is confined to one failure domain (that backend
        alone, or its whole region or provider, down or failing across its backends right now)
        that another domain can take over: its retry is not a storm to protect against but
        the failover itself, and adds load only in proportion to the failing domain's share."""
        region, provider = self._domains_of(backend)
        if provider.state == "down" or self._provider_wide(provider):
            failing = provider.backends
        elif region.state == "down" or self._region_wide(region):
            failing = region.backends
        elif self._failing_alone(backend, now):
            failing = [backend]
        else:
            return False
        # Only while something else can take the traffic: when everything fails, the retry
        # budget keeps retries from multiplying the load on whatever still half-answers.
        return self._others_usable(failing)

    # -- the derivation --------------------------------------------------------------------------

    def _settle(self, now: float, event: str,
                domains_before: dict[str, str] | None = None) -> None:
        """Derive every state from the inputs just changed, rebuild, log, count, tell.
        (`domains_before`: the states regions and providers had before a snapshot set them, in
        a worker, where the snapshot itself changes them.)"""
        upstream = self.upstream
        transitions: list[_Transition] = []
        for backend in upstream.backends:
            if backend.ejected_until and now >= backend.ejected_until:
                backend.ejected_until = 0.0  # back on probation
                backend.ejection_cause = ""
                backend.reason = ""
            was_usable = backend.usable
            backend.usable = (
                backend.healthy and not backend.ejected_until and not backend.draining
            )
            if backend.usable and not was_usable:
                backend.usable_since = now
            state = backend.state
            if state != backend.logged_state:
                transitions.append(
                    _Transition("backend", backend.name, backend.logged_state, state,
                                backend.reason or "back in rotation")
                )
                backend.logged_state = state
        for provider in upstream.providers.values():
            # A provider's only region is the provider itself: its transitions say it all.
            told = transitions if len(provider.regions) > 1 else []
            for region in provider.regions:
                usable = sum(1 for b in region.backends if b.usable)
                self._derive(region, usable, now, False, event, told)
            live = [r for r in provider.regions if r.state != "down"]
            usable = sum(1 for r in live for b in r.backends if b.usable)
            self._derive(provider, usable, now, len(provider.regions) > 1 and not live, event,
                         transitions)
        upstream.rebuild(now)
        deadlines = [b.ejected_until for b in upstream.backends if b.ejected_until]
        deadlines += [d.down_until for d in upstream.domains if d.down_until]
        self.next_deadline = min(deadlines, default=0.0)
        if transitions and not self.quiet:
            self._announce(transitions, event)
        upstream.generation += 1
        for listener in upstream.listeners:
            listener(upstream)
        if self.moved is not None:
            started = dict(domains_before or {})  # a snapshot sets states before this pass
            for change in transitions:
                if change.domain is not None:
                    started.setdefault(change.domain.name, change.before)
            moves = [f"{_kind(d)} {d.name}: {started[d.name]} -> {d.state}"
                     for d in upstream.domains
                     if d.name in started and started[d.name] != d.state]
            if moves:
                self.moved(event, moves)

    def _derive(self, domain: Domain, usable: int, now: float, all_regions_down: bool,
                event: str, transitions: list[_Transition]) -> None:
        policy = self.upstream.config.policy
        kind = _kind(domain)
        total = len(domain.backends)
        was = domain.state
        if domain.down_until and now >= domain.down_until:
            domain.down_until = 0.0  # the hold-down is over
        if all_regions_down:
            unhealthy = f"provider {domain.name} down: all its regions are down"
        elif not usable or usable / total < policy.min_healthy_fraction:
            unhealthy = f"{kind} {domain.name} down: {usable} of {total} backends usable"
        else:
            unhealthy = ""
        if domain.forced_down:
            state = "down"
        elif domain.down_until:
            state = "down"  # held down: by a correlated failure, or after one of health
            if unhealthy and domain.down_cause == "health":
                domain.reason = unhealthy  # say how it is now
        elif unhealthy:
            state = "down"
            domain.reason = unhealthy
            domain.down_cause = "health"
        else:
            state = "up" if usable == total else "degraded"
            domain.reason = "" if state == "up" else (
                f"{kind} {domain.name} degraded: {usable} of {total} backends usable"
            )
        cause = ""
        if state == "down" and was != "down":
            domain.down_since = now
            cause = "forced_down" if domain.forced_down else domain.down_cause
            if cause == "health" and event not in _NO_HOLD_DOWN:
                domain.down_until = now + policy.hold_down  # no flapping back at once
        elif state != "down" and was == "down":
            domain.up_since = now
        domain.state = state
        if state != was:
            reason = domain.reason or (
                "back in rotation" if was == "down" else "all its backends usable")
            transitions.append(_Transition(kind, domain.name, was, state, reason, cause, domain))

    def _announce(self, transitions: list[_Transition], event: str) -> None:
        upstream = self.upstream
        store = upstream.store
        shares = upstream.provider_shares()
        for change in transitions:
            store.inc("health_transitions",
                      (upstream.name, change.level, change.name, change.after, event))
            leaving = change.after in ("down", "unhealthy", "ejected", "draining")
            domain_move = change.domain is not None and "down" in (change.before, change.after)
            level = logging.WARNING if leaving or domain_move else logging.INFO
            log.log(level, "%s %s %s: %s -> %s (%s; %s)", upstream.name, change.level,
                    change.name, change.before, change.after, change.reason, event)
            if domain_move and change.domain is not None:
                self._record_move(change, change.domain, shares)

    def _record_move(self, change: _Transition, domain: Domain,
                     shares: dict[str, float]) -> None:
        """A region or provider leaving or re-entering rotation: counted as a failover (to
        whoever takes its traffic now) and kept in the history the status page shows."""
        upstream = self.upstream
        others = tuple(n for n, share in shares.items() if share > 0 and n != domain.provider)
        if change.after == "down":
            if domain.parent is None:
                for taker in others or ("none",):
                    upstream.store.inc("failovers",
                                       (upstream.name, domain.name, taker, change.cause))
            upstream.store.record_event(ProviderEvent(
                time.time(), upstream.name, domain.name, "failover", others,
                domain.reason or change.cause))
        else:
            upstream.store.record_event(ProviderEvent(
                time.time(), upstream.name, domain.name, "recovered", others, "back in rotation"))

    # -- helpers ---------------------------------------------------------------------------------

    def _domains_of(self, backend: Backend) -> tuple[Region, Provider]:
        upstream = self.upstream
        return upstream.region_of(backend), upstream.providers[backend.provider]

    def _region_wide(self, region: Region) -> bool:
        """K distinct backends of a region failed within the window (regions of a provider
        with several; a provider's only region is the provider itself)."""
        provider = self.upstream.providers[region.provider]
        if len(provider.regions) < 2:
            return False
        threshold = self.upstream.config.policy.correlated_failures.backends
        return len(region.recent_failures) >= min(threshold, _origins(region))

    def _provider_wide(self, provider: Provider) -> bool:
        """K distinct backends of the provider failed within the window, in more than one of
        its regions when it has several (one region failing is that region's failure)."""
        threshold = self.upstream.config.policy.correlated_failures.backends
        recent = provider.recent_failures
        if len(recent) < min(threshold, _origins(provider)):
            return False
        if len(provider.regions) < 2:
            return True
        failing = {r.name for r in provider.regions
                   if any(b.origin in recent for b in r.backends)}
        return len(failing) > 1

    def _failing_alone(self, backend: Backend, now: float) -> bool:
        """No other backend of the upstream failed a request within the window."""
        window = self.upstream.config.policy.correlated_failures.window
        for provider in self.upstream.providers.values():
            for name, when in provider.recent_failures.items():
                if name != backend.origin and now - when <= window:
                    return False
        return True

    def _others_usable(self, members: list[Backend]) -> bool:
        """Whether anything outside `members` (a failing domain's backends) could take their
        traffic."""
        upstream = self.upstream
        for backend in upstream.backends:
            if backend.usable and backend not in members:
                region, provider = self._domains_of(backend)
                if region.state != "down" and provider.state != "down":
                    return True
        return False

    def _take_down(self, domain: Domain, now: float, reason: str) -> None:
        """A domain-wide failure: out of rotation at once, for at least the hold-down; a domain
        that fails again soon after coming back stays down twice as long each time (capped at
        outlier.max_ejection), so one that passes probes but fails real traffic is not flapped
        in and out."""
        config = self.upstream.config
        hold_down = config.policy.hold_down
        stable = now - domain.up_since > 10 * hold_down
        domain.downs = 1 if stable else domain.downs + 1
        hold = min(hold_down * 2 ** (domain.downs - 1), config.outlier.max_ejection)
        domain.down_until = now + max(hold, hold_down)
        domain.down_cause = "correlated_failure"
        domain.reason = reason

    def _may_eject(self) -> bool:
        backends = self.upstream.backends
        ejected = sum(1 for b in backends if b.ejected_until)
        percent = self.upstream.config.outlier.max_ejection_percent
        return (ejected + 1) * 100 <= percent * len(backends)

    def _eject(self, backend: Backend, now: float, why: str) -> None:
        config = self.upstream.config.outlier
        failures = backend.consecutive_failures
        backend.ejections += 1
        duration = min(config.base_ejection * backend.ejections, config.max_ejection)
        backend.ejected_until = now + duration
        backend.ejection_cause = why
        backend.consecutive_failures = 0
        backend.on_probation = True  # back after its time, one failure sends it out again
        ends = "" if why in PROBE_TESTABLE else "; runs its time, probes cannot vouch for it"
        backend.reason = (
            f"ejected for {duration:g}s after {failures} failures ({why}{ends})"
        )
        upstream = self.upstream
        upstream.store.inc(
            "ejections", (upstream.name, backend.provider, backend.name, _reason_label(why))
        )


def _kind(domain: Domain) -> str:
    """What a domain is called in logs and reasons: a region, or a provider."""
    return "region" if domain.parent is not None else "provider"


def _note(domain: Domain, backend: Backend, now: float, window: float) -> None:
    """Remember a failure of `backend` in the domain's window of recent failures."""
    recent = domain.recent_failures
    recent[backend.origin] = now
    for name, when in list(recent.items()):
        if now - when > window:
            del recent[name]


def _origins(domain: Domain) -> int:
    """How many configured backends a domain has (a hostname's endpoints count once)."""
    return len({b.origin for b in domain.backends})


def _all_endpoints_failing(backend: Backend, region: Region) -> bool:
    """A configured backend fails (for correlated failure) when every endpoint of it does."""
    if backend.name == backend.origin:
        return True  # an IP address, or a hostname without addresses: its only endpoint
    return all(
        b is backend or b.consecutive_failures > 0 or not b.usable
        for b in region.backends if b.origin == backend.origin
    )


def carry_backend_health(old: Backend, new: Backend) -> None:
    """A reload replaced a backend's object (its connection settings changed): the new one
    carries on with the old one's health."""
    new.healthy = old.healthy
    new.probe_passes = old.probe_passes
    new.probe_failures = old.probe_failures
    new.last_check = old.last_check
    new.last_check_at = old.last_check_at
    new.ejected_until = old.ejected_until
    new.ejection_cause = old.ejection_cause
    new.ejections = old.ejections
    new.consecutive_failures = old.consecutive_failures
    new.on_probation = old.on_probation
    new.draining = old.draining
    new.usable = old.usable
    new.usable_since = old.usable_since
    new.ewma_latency = old.ewma_latency
    new.reason = old.reason
    new.logged_state = old.logged_state


def _carry_domain(old: Domain, new: Domain) -> None:
    new.state = old.state
    new.reason = old.reason
    new.down_until = old.down_until
    new.down_since = old.down_since
    new.up_since = old.up_since
    new.downs = old.downs
    new.ramp = old.ramp
    new.forced_down = old.forced_down
    new.down_cause = old.down_cause
    new.recent_failures = old.recent_failures


def _offset(moment: float, now: float) -> float | None:
    return moment - now if moment else None


def _moment(offset: float | None, now: float) -> float:
    return now + offset if offset is not None else 0.0


def _export_backend(backend: Backend, now: float) -> BackendHealth:
    return BackendHealth(
        healthy=backend.healthy,
        ejected_until=_offset(backend.ejected_until, now),
        ejections=backend.ejections,
        consecutive_failures=backend.consecutive_failures,
        on_probation=backend.on_probation,
        draining=backend.draining,
        usable_since=_offset(backend.usable_since, now),
        reason=backend.reason,
        last_check=backend.last_check,
        last_check_at=backend.last_check_at,
    )


def _adopt_backend(backend: Backend, state: BackendHealth, now: float) -> None:
    backend.healthy = state.healthy
    backend.ejected_until = _moment(state.ejected_until, now)
    backend.ejections = state.ejections
    backend.consecutive_failures = state.consecutive_failures
    backend.on_probation = state.on_probation
    backend.draining = state.draining
    backend.usable_since = _moment(state.usable_since, now)
    backend.reason = state.reason
    backend.last_check = state.last_check
    backend.last_check_at = state.last_check_at


def _export_domain(domain: Domain, now: float) -> DomainHealth:
    return DomainHealth(
        state=domain.state,
        reason=domain.reason,
        forced_down=domain.forced_down,
        down_cause=domain.down_cause,
        downs=domain.downs,
        down_until=_offset(domain.down_until, now),
        down_since=_offset(domain.down_since, now),
        up_since=_offset(domain.up_since, now),
    )


def _adopt_domain(domain: Domain, state: DomainHealth, now: float) -> None:
    domain.state = state.state
    domain.reason = state.reason
    domain.forced_down = state.forced_down
    domain.down_cause = state.down_cause
    domain.downs = state.downs
    domain.down_until = _moment(state.down_until, now)
    domain.down_since = _moment(state.down_since, now)
    domain.up_since = _moment(state.up_since, now)
