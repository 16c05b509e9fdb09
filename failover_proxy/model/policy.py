"""Choosing a provider (or a provider's region): priority failover, or a weighted split that
re-spreads when one fails.

What the policy chooses between are tiers: providers, or the regions of a provider where
`policy.providers` names them. The policy is rebuilt whenever a tier's state changes (rare) so
that a pick on the hot path is one table lookup (priority) or one smooth-WRR step (weighted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.schema import PolicyConfig
from .balance import SmoothWeightedRoundRobin

if TYPE_CHECKING:
    from .backends import Domain


def provider_latency(provider: Domain) -> float:
    """Mean recent latency of the tier's usable backends that have been measured."""
    values = [b.ewma_latency for b in provider.backends if b.usable and b.ewma_latency > 0]
    return sum(values) / len(values) if values else 0.0


def spare_capacity(tier: Domain, now: float) -> float:
    """Requests the tier's usable backends would admit right now (infinite when one of them
    declares no capacity)."""
    spare = 0.0
    for backend in tier.backends:
        if backend.usable:
            limit = backend.limit
            if limit is None:
                return float("inf")
            spare += limit.spare(now)
    return spare


class ProviderPolicy:
    """Orders the tiers (providers or regions) of one upstream for each request."""

    def __init__(self, config: PolicyConfig, tiers: list[Domain]) -> None:
        self.config = config
        self.providers = tiers
        """The tiers in the configured order."""
        self.preferred: Domain | None = tiers[0] if tiers else None
        self._split: SmoothWeightedRoundRobin[Domain] | None = None
        self._split_of: tuple[object, ...] = ()
        """The tiers and weights `_split` was built from: kept while they hold, so that a
        rebuild after every event does not start its cycle over (always the same tier next)."""
        self._up: list[Domain] = []

    def rebuild(self, everyone: bool = False) -> None:
        """Recompute the preferred provider / the weighted split from the providers' states.

        `everyone` (panic: spread) ignores provider states: every provider with backends left.
        """
        up = [p for p in self.providers if p.usable] if not everyone else []
        if not up:
            # Every provider is down: rather than refuse, use whatever backends still answer
            # (providers taken down by an operator excepted).
            up = [p for p in self.providers if p.balancer is not None and not p.forced]
        if self.config.strategy == "priority":
            self.preferred = up[0] if up else None
            share = round(100 * up[0].ramp) if up else 100
            if len(up) > 1 and share < 100:
                # The first provider is back but ramping up: the next one keeps the rest
                # (until the first's share rounds to all of it: a weight of 0 is no split).
                self._set_split(up[:2], [share, 100 - share])
            else:
                self._set_split([], [])
        else:
            weighted = [p for p in up if p.weight > 0] or up
            if self.config.strategy == "latency" and len(weighted) > 1:
                weighted = self._fastest(weighted)
            self._set_split(
                weighted, [max(1, round(max(p.weight, 1) * 100 * p.ramp)) for p in weighted]
            )
            self.preferred = weighted[0] if weighted else None
        self._up = up

    def _set_split(self, tiers: list[Domain], weights: list[int]) -> None:
        """Split new requests over `tiers` by `weights` (none: no split)."""
        wanted = (*tiers, *weights)
        if wanted == self._split_of:
            return
        self._split_of = wanted
        self._split = SmoothWeightedRoundRobin(tiers, weights) if tiers else None

    def _fastest(self, providers: list[Domain]) -> list[Domain]:
        """The providers within `latency_tolerance` of the fastest (unmeasured ones included,
        so that they get measured)."""
        latency = {p.name: provider_latency(p) for p in providers}
        measured = [value for value in latency.values() if value > 0]
        if not measured:
            return providers
        limit = min(measured) * (1 + self.config.latency_tolerance)
        return [p for p in providers if latency[p.name] <= limit]

    def pick(self, exclude: list[str], peek: bool = False) -> Domain | None:
        """The tier for this attempt, avoiding the named ones when another is usable; `peek`
        leaves the split where it is."""
        if self._split is not None:
            provider = self._split.peek([]) if peek else self._split.pick()
            if not exclude or provider.name not in exclude:
                return provider
        for provider in self._up:
            if provider.name not in exclude:
                return provider
        return None

    def spill_order(self, first: Domain | None, tried: list[str], now: float) -> list[Domain]:
        """Where what `first` (a tier whose backend is at capacity) cannot take goes: its own
        other backends first, then the tiers in rotation not tried yet: by priority, the next
        in order; weighted, the one with the most room left first."""
        others = [t for t in self._up if t is not first and t.name not in tried]
        if self.config.strategy != "priority":
            others.sort(key=lambda tier: -spare_capacity(tier, now))
        return [first, *others] if first is not None else others

    def shares(self) -> dict[str, float]:
        """The fraction of new requests each provider gets now."""
        shares = {p.name: 0.0 for p in self.providers}
        if self._split is not None:
            shares.update((provider.name, share) for provider, share in self._split.shares())
        elif self.preferred is not None:
            shares[self.preferred.name] = 1.0
        return shares

    def why_not_preferred(self) -> str:
        """Why traffic is not on the first tier of the configured order."""
        first = self.providers[0] if self.providers else None
        if first is None or first.usable or self.config.strategy != "priority":
            return ""
        parent = first.parent
        if parent is not None and parent.state == "down":
            return parent.reason or f"provider {parent.name} down"
        kind = "provider" if parent is None else "region"
        return first.reason or f"{kind} {first.name} down"
