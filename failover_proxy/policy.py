"""Choosing a provider: priority failover or a weighted split that re-spreads when one fails.

The policy is rebuilt whenever a provider's state changes (rare) so that a pick on the hot path
is one table lookup (priority) or one smooth-WRR step (weighted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .balance import SmoothWeightedRoundRobin
from .schema import PolicyConfig

if TYPE_CHECKING:
    from .topology import Provider


def provider_latency(provider: Provider) -> float:
    """Mean recent latency of the provider's usable backends that have been measured."""
    values = [b.ewma_latency for b in provider.backends if b.usable and b.ewma_latency > 0]
    return sum(values) / len(values) if values else 0.0


class ProviderPolicy:
    """Orders the providers of one upstream for each request."""

    def __init__(self, config: PolicyConfig, providers: list[Provider]) -> None:
        self.config = config
        order = config.providers or []
        ranked = sorted(
            providers,
            key=lambda p: order.index(p.name) if p.name in order else len(order),
        )
        self.providers = ranked
        self.preferred: Provider | None = ranked[0] if ranked else None
        self._split: SmoothWeightedRoundRobin[Provider] | None = None
        self.rebuild()

    def rebuild(self, everyone: bool = False) -> None:
        """Recompute the preferred provider / the weighted split from the providers' states.

        `everyone` (panic: spread) ignores provider states: every provider with backends left.
        """
        up = [p for p in self.providers if p.usable] if not everyone else []
        if not up:
            # Every provider is down: rather than refuse, use whatever backends still answer
            # (providers taken down by an operator excepted).
            up = [p for p in self.providers if p.balancer is not None and not p.forced_down]
        if self.config.strategy == "priority":
            self.preferred = up[0] if up else None
            self._split = None
            if len(up) > 1 and up[0].ramp < 1.0:
                # The first provider is back but ramping up: the next one keeps the rest.
                share = round(100 * up[0].ramp)
                self._split = SmoothWeightedRoundRobin(up[:2], [share, 100 - share])
        else:
            weighted = [p for p in up if p.weight > 0] or up
            if self.config.strategy == "latency" and len(weighted) > 1:
                weighted = self._fastest(weighted)
            self._split = (
                SmoothWeightedRoundRobin(
                    weighted, [max(1, round(max(p.weight, 1) * 100 * p.ramp)) for p in weighted]
                )
                if weighted
                else None
            )
            self.preferred = weighted[0] if weighted else None
        self._up = up

    def _fastest(self, providers: list[Provider]) -> list[Provider]:
        """The providers within `latency_tolerance` of the fastest (unmeasured ones included,
        so that they get measured)."""
        latency = {p.name: provider_latency(p) for p in providers}
        measured = [value for value in latency.values() if value > 0]
        if not measured:
            return providers
        limit = min(measured) * (1 + self.config.latency_tolerance)
        return [p for p in providers if latency[p.name] <= limit]

    def pick(self, exclude: list[str]) -> Provider | None:
        """The provider for this attempt, avoiding the named ones when another is usable."""
        if self._split is not None:
            provider = self._split.pick()
            if not exclude or provider.name not in exclude:
                return provider
        for provider in self._up:
            if provider.name not in exclude:
                return provider
        return None

    def shares(self) -> dict[str, float]:
        """The fraction of new requests each provider gets now."""
        shares = {p.name: 0.0 for p in self.providers}
        if self._split is not None:
            shares.update((provider.name, share) for provider, share in self._split.shares())
        elif self.preferred is not None:
            shares[self.preferred.name] = 1.0
        return shares

    def why_not_preferred(self) -> str:
        """Why traffic is not on the first provider of the configured order."""
        first = self.providers[0] if self.providers else None
        if first is None or first.usable or self.config.strategy != "priority":
            return ""
        return first.reason or f"provider {first.name} down"
