"""What the policy and the health machine work on: backends, and the failure domains above them
(a provider, and its regions).

Plain objects, written by the upstream's `HealthMachine` alone for their health (healthstate.py)
and read by the policy and the balancers on the hot path; the upstream that holds them, and how
they are built from the config, is topology.py.
"""

from __future__ import annotations

from .balance import Balancer, SmoothWeightedRoundRobin
from .capacity import RateLimit
from .connector import Connector


class Backend:
    """One origin: where it is, its provider and region, its connector, and what we know of its
    health.

    Its health fields are written by the upstream's `HealthMachine` alone (healthstate.py);
    `usable` is what the policy reads on the hot path.
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
        connector: Connector,
        attempt_counts: list[int],
        durations: list[float],
        origin: str = "",
        endpoint: str = "",
        share: float = 1.0,
    ) -> None:
        self.name = name
        """Unique in its upstream: the configured name, or `name@address:port` for one of the
        endpoints DNS gave a hostname (discovery.py)."""
        self.origin = origin or name
        """The configured backend this is (an endpoint of)."""
        self.endpoint = endpoint
        """The address traffic is dialled at (`127.0.0.2:8443`); empty while a hostname has
        no address (not resolved yet, or NXDOMAIN): such a backend is never usable."""
        self.share = share
        """Its part of the configured backend's weight (1/n of n endpoints, or by SRV
        weight)."""
        self.awaiting_probe = False
        """A new address of a known name: one passing probe brings it in (slow start)."""
        self.provider = provider
        self.region = region
        self.tier = provider
        """The policy entry this backend is chosen through: its provider, or `provider/region`
        when the policy names its region (retries move to another tier)."""
        self.weight = weight
        self.scheme = scheme
        self.host = host
        self.port = port
        self.base_path = base_path
        self.connector = connector
        """Holds its connections and hands out streams to it (one codec's subclass)."""
        self.dial = connector.dial
        self.host_header = connector.dial.authority
        self.connection_settings: tuple[object, ...] = ()
        """What the connector was built from: a reload keeps it only when these are equal."""
        self.attempt_counts = attempt_counts
        """Tries on this backend by outcome (indexes in metrics.ATTEMPT_OUTCOMES)."""
        self.durations = durations
        """Duration histogram slots of its provider (metrics.observe_duration)."""
        self.in_flight = 0
        self.attempts_total = 0
        self.limit: RateLimit | None = None
        """Its declared capacity as this process's share of it (None: no capacity declared):
        the policy sends it no more, and spills the rest (capacity.py)."""
        self.healthy = True
        """Active health checks' verdict (optimistic until they say otherwise)."""
        self.probe_passes = 0
        self.probe_failures = 0
        """The active checks' current streak (passes or failures in a row)."""
        self.last_check = ""
        self.last_check_at = 0.0
        """Wall-clock time of the last probe's result (0: not probed yet)."""
        self.ejected_until = 0.0
        self.ejection_cause = ""
        """The failure that earned the ejection (`status 503`, `reset`, `connect-failure`…):
        a passing probe ends it only when the probe tests that (healthstate.PROBE_TESTABLE)."""
        self.ejections = 0
        self.consecutive_failures = 0
        self.on_probation = False
        self.draining = False
        self.usable = True
        self.usable_since = 0.0
        self.ewma_latency = 0.0
        """Recent latency of real requests (seconds, EWMA of each successful attempt)."""
        self.reason = ""
        self.logged_state = "healthy"
        """The state last logged and counted as a transition."""

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


class Domain:
    """A failure domain above backends: one region of a provider, or a provider. Its state is
    derived from its members by the health machine, or held down (correlated failure,
    hold-down) or forced down by an operator."""

    def __init__(self, name: str, provider: str, backends: list[Backend], weight: int) -> None:
        self.name = name
        self.provider = provider
        """The provider's name (its own name for a provider)."""
        self.backends = backends
        self.weight = weight
        self.parent: Domain | None = None
        """A region's provider (None for a provider)."""
        self.state = "up"
        self.reason = ""
        self.down_until = 0.0
        """While in the future the domain stays down (hold-down, correlated failure)."""
        self.down_since = 0.0
        self.up_since = 0.0
        self.down_cause = "health"
        """Why it was last taken down: health or correlated_failure (forced: forced_down)."""
        self.downs = 0
        """Times taken down in a row without a healthy stretch; each doubles the hold-down."""
        self.ramp = 1.0
        """Slow start: the share of its weight the domain gets now (1.0 once ramped up)."""
        self.forced_down = False
        """Taken down by an operator (a failover drill) until restored."""
        self.balancer: Balancer[Backend] | None = SmoothWeightedRoundRobin(
            backends, [b.weight for b in backends]
        )
        self.balanced: tuple[object, ...] | None = ()
        """What `balancer` was built from (its backends with their weights, and the kind; None
        for no balancer; () before the first build): the upstream rebuilds it only when that
        changes, so its position in the cycle holds."""
        self.recent_failures: dict[str, float] = {}
        """Backend name -> when it last failed, within the correlated-failure window."""

    @property
    def usable(self) -> bool:
        parent = self.parent
        return (
            self.state != "down"
            and self.balancer is not None
            and (parent is None or parent.state != "down")
        )

    @property
    def forced(self) -> bool:
        """Forced down by an operator, itself or through its provider."""
        parent = self.parent
        return self.forced_down or (parent is not None and parent.forced_down)


class Region(Domain):
    """The backends of one provider in one region (`aws/us-east-1`)."""

    def __init__(self, provider: Domain, region: str, backends: list[Backend]) -> None:
        super().__init__(
            f"{provider.name}/{region}", provider.name, backends,
            round(sum(b.weight * b.share for b in backends)),
        )
        self.region = region
        self.parent = provider


class Provider(Domain):
    """The backends of one provider inside one upstream, by region."""

    def __init__(self, name: str, backends: list[Backend], weight: int) -> None:
        super().__init__(name, name, backends, weight)
        by_region: dict[str, list[Backend]] = {}
        for backend in backends:
            by_region.setdefault(backend.region, []).append(backend)
        self.regions = [Region(self, region, members) for region, members in by_region.items()]
