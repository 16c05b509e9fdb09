"""Passive outlier detection from real requests, and correlated (provider-wide) failure.

A backend that fails `consecutive_failures` requests in a row is ejected for
`base_ejection * n` (n = times ejected, capped at `max_ejection`), unless that would take more
than `max_ejection_percent` of the upstream out. When failures hit several distinct backends of
one provider within a short window, the provider is taken out in one step: a provider-wide
outage is handled at once, not backend by backend. An ejected backend returns on probation:
its first failure ejects it again (for longer), its first success ends the probation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .topology import Backend, Upstream


def _reason_label(why: str) -> str:
    """A failure's description as a metric label: `status 503` -> `http_503`."""
    return why.replace("status ", "http_").replace("-", "_").replace(" ", "_")


class OutlierDetector:
    """Counts outcomes per backend for one upstream and ejects what fails."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.config = upstream.config.outlier
        self.correlated = upstream.config.policy.correlated_failures
        self.report: Callable[[str, Backend, str], None] | None = None
        """In a worker process: hand outcomes to the supervisor, whose detector decides for
        every worker at once (its decisions come back as a shared health view)."""

    def on_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0
        backend.on_probation = False
        if self.report is not None:
            self.report("success", backend, "")

    def on_failure(self, backend: Backend, now: float, why: str) -> None:
        """A request to `backend` failed (connect failure, reset, timeout or a failure status)."""
        if self.report is not None:
            self.report("failure", backend, why)
            return
        backend.consecutive_failures += 1
        upstream = self.upstream
        provider = upstream.providers[backend.provider]
        others_usable = any(p.usable for p in upstream.providers.values() if p is not provider)
        if provider.state != "down" and self._provider_wide(backend, now) and others_usable:
            # Never the last usable provider: taking it out would only turn errors into 503s.
            failing = len(provider.recent_failures)
            upstream.take_provider_down(
                provider,
                now,
                f"provider {provider.name} down: {failing} backends failed within "
                f"{self.correlated.window:g}s ({why})",
            )
        threshold = 1 if backend.on_probation else self.config.consecutive_failures
        if backend.consecutive_failures >= threshold and self._may_eject():
            self._eject(backend, now, why)

    def _provider_wide(self, backend: Backend, now: float) -> bool:
        provider = self.upstream.providers[backend.provider]
        recent = provider.recent_failures
        recent[backend.name] = now
        window = self.correlated.window
        for name, when in list(recent.items()):
            if now - when > window:
                del recent[name]
        return len(recent) >= min(self.correlated.backends, len(provider.backends))

    def _may_eject(self) -> bool:
        backends = self.upstream.backends
        ejected = sum(1 for b in backends if b.ejected_until)
        return (ejected + 1) * 100 <= self.config.max_ejection_percent * len(backends)

    def _eject(self, backend: Backend, now: float, why: str) -> None:
        backend.ejections += 1
        duration = min(self.config.base_ejection * backend.ejections, self.config.max_ejection)
        backend.ejected_until = now + duration
        backend.consecutive_failures = 0
        backend.on_probation = True  # back after its time, one failure sends it out again
        backend.reason = (
            f"ejected for {duration:g}s after {self.config.consecutive_failures} failures ({why})"
        )
        upstream = self.upstream
        upstream.store.inc(
            "ejections", (upstream.name, backend.provider, backend.name, _reason_label(why))
        )
        upstream.refresh(now)

    def sweep(self, now: float) -> None:
        """Return backends whose ejection ended and providers whose hold-down ended."""
        upstream = self.upstream
        expired = any(b.ejected_until and now >= b.ejected_until for b in upstream.backends)
        held = any(
            p.state == "down" and p.down_until and now >= p.down_until
            for p in upstream.providers.values()
        )
        if upstream.config.policy.strategy == "latency":
            # Follow the latencies as they move.
            spread = upstream.panic and upstream.config.policy.panic == "spread"
            upstream.policy.rebuild(everyone=spread)
        if expired or held or upstream.ramping:
            for provider in upstream.providers.values():
                if provider.down_until and now >= provider.down_until:
                    provider.down_until = 0.0
            upstream.refresh(now)
