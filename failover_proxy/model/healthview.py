"""The one health picture of a multi-process proxy, as typed data.

The supervisor runs the health checks and the health machines (fed by every worker's request
outcomes) on its own copy of the topology; after each change it sends every worker a
`HealthSnapshot`, and each worker's machines adopt it as an event of their own. Moments (ejected
until, down until, back since) travel as offsets from the sender's now, so the two processes
need not share a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .discovery import Address


@dataclass(frozen=True)
class BackendHealth:
    healthy: bool
    ejected_until: float | None
    ejections: int
    consecutive_failures: int
    on_probation: bool
    draining: bool
    usable_since: float | None
    reason: str
    last_check: str
    last_check_at: float


@dataclass(frozen=True)
class DomainHealth:
    """A region's or a provider's state."""

    state: str
    reason: str
    forced_down: bool
    down_cause: str
    downs: int
    down_until: float | None
    down_since: float | None
    up_since: float | None


@dataclass(frozen=True)
class UpstreamHealth:
    backends: dict[str, BackendHealth]
    domains: dict[str, DomainHealth]
    """Regions (`aws/us-east-1`) and providers (`aws`) by name."""
    endpoints: dict[str, tuple[Address, ...] | None] = field(default_factory=dict)
    """The addresses of each backend named by a hostname (the worker builds the same
    endpoints before it adopts their health)."""


@dataclass(frozen=True)
class HealthSnapshot:
    version: int
    """The supervisor's count of pictures sent: a worker's access log names the one each
    request was routed by, so what a request did can be set against when a failover reached
    that worker."""
    upstreams: dict[str, UpstreamHealth]
    sent_at: float = 0.0
    """Wall-clock time the supervisor sent it: the worker says how long the decision took to
    reach it."""
