"""The data plane of one process: its config generation, its client connections, its clocks.

Timeouts of client connections (slow request heads, idle keep-alive) and of idle backend
connections are enforced by one sweep a second instead of a timer per request: the hot path only
writes a deadline number.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from ..metrics import MetricStore
from ..schema import LimitsConfig
from .downstream import ClientLimits, DownstreamProtocol
from .request import Request

if TYPE_CHECKING:
    from ..accesslog import AccessLog
    from ..listener import ClientListener
    from ..topology import Topology

log = logging.getLogger("failover_proxy")

SWEEP_INTERVAL = 0.2
"""Resolution of every timeout the sweep enforces (client deadlines, backend read timeouts)."""


class DataPlane:
    """Shared state of every client connection in this process."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        topology: Topology,
        limits: LimitsConfig,
        scheme: bytes = b"http",
        store: MetricStore | None = None,
    ) -> None:
        self.loop = loop
        self.topology = topology
        """The config generation new requests are routed by (requests in flight keep theirs)."""
        self.limits = ClientLimits(limits)
        self.scheme = scheme
        self.store = store if store is not None else MetricStore()
        self.unrouted = self.store.request_counts("", "", "", "")
        """Requests the proxy answered before any route (404 no route, 4xx bad requests)."""
        self.access_log: AccessLog | None = None
        self.debug_headers = False
        self.connections: set[DownstreamProtocol] = set()
        self.connections_per_ip: dict[bytes, int] = {}
        """Open client connections by address, while limits.max_connections_per_ip is set."""
        self.listener: ClientListener | None = None
        """Whoever accepts this process's client connections (limits.max_connections pauses
        it); None in tests that feed the plane connections themselves."""
        self.accepting = True
        """False while limits.max_connections holds accepting back."""
        self.draining = False
        self.health_view = 0
        """The version of the supervisor's health picture this worker routes by (0: a single
        process, whose own machines decide)."""
        self.clock = loop.time()
        """The loop's time as of the last sweep: timeouts here are only as fine as the sweep, so
        the hot path reads this number instead of asking the clock several times a request."""
        self._sweeper: asyncio.Task[None] | None = None

    def protocol_factory(self) -> asyncio.Protocol:
        """What the listener calls per accepted connection (a duck-typed asyncio protocol)."""
        return cast(asyncio.Protocol, DownstreamProtocol(self))

    def stop_accepting(self) -> None:
        """The connection limit is reached: accept nothing more until below it."""
        listener = self.listener
        if listener is None or not self.accepting:
            return
        self.accepting = False
        listener.pause()
        self.store.inc("accept_pauses")

    def accept_below_limit(self) -> None:
        """A connection closed while accepting was held back: resume when under the limit
        (never while draining: the listener is closed then)."""
        listener = self.listener
        limit = self.limits.max_connections
        if listener is not None and not self.draining and (
                not limit or len(self.connections) < limit):
            self.accepting = True
            listener.resume()

    def start(self) -> None:
        self._sweeper = self.loop.create_task(self._sweep_forever())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep_forever(self) -> None:
        """Every timeout of this process hangs on this loop: a fault in one sweep is logged,
        and the next sweep runs all the same."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception:
                log.exception("data plane sweep failed")

    def record_own_answer(
        self,
        request: Request | None,
        request_id: bytes,
        client_ip: bytes,
        status: int,
        bytes_out: int,
    ) -> None:
        """Count (and log) a request the proxy refused before it reached any route."""
        self.unrouted[status // 100 - 1] += 1
        log = self.access_log
        if log is not None:
            log.record(
                request_id=request_id,
                client=client_ip,
                method=request.method if request is not None else b"",
                path=request.target if request is not None else b"",
                status=status,
                bytes_in=request.head_bytes + request.body.received
                if request is not None and request.head_bytes
                else 0,
                bytes_out=bytes_out,
                duration=0.0,
                route="",
                upstream="",
                provider="",
                backend="",
                attempts=0,
                reason="",
            )

    def sweep(self) -> None:
        now = self.clock = self.loop.time()
        if self.access_log is not None:
            self.access_log.flush()
        for connection in list(self.connections):
            stalled = connection.write_stalled_until
            if stalled and now >= stalled:
                connection.on_write_stalled()
            elif connection.deadline and now >= connection.deadline:
                connection.on_deadline()
            elif connection.exchange is not None:
                connection.exchange.check_timeout(now)
            elif connection.tunnel is not None:
                connection.tunnel.check_idle(now, self.limits.tunnel_idle_timeout)
        for upstream in self.topology.upstreams.values():
            upstream.health.tick(now)
            for backend in upstream.backends:
                backend.pool.sweep(now)

    def close_idle_connections(self) -> None:
        """Close client connections that have no request in progress (for shutdown)."""
        for connection in list(self.connections):
            if connection.exchange is None and connection.tunnel is None:
                connection.close_now()

    @property
    def busy_connections(self) -> int:
        return sum(1 for c in self.connections if c.exchange is not None or c.tunnel is not None)
