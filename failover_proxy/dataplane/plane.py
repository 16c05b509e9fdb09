"""The data plane of one process: its config generation, its client connections, its clocks.

Timeouts of client connections (slow request heads, idle keep-alive, stalled writes), of
attempts (a silent backend) and of idle backend connections are enforced by one sweep every
SWEEP_INTERVAL instead of a timer per request: the hot path only writes a deadline number.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from ..config.schema import Http2Config, LimitsConfig
from ..model.counters import MetricStore
from .request import Request

if TYPE_CHECKING:
    from ..model.topology import Topology
    from ..ops.accesslog import AccessLog

log = logging.getLogger("failover_proxy")


class AcceptGate(Protocol):
    """Whoever accepts this process's client connections (process/listener.py)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

SWEEP_INTERVAL = 0.2
"""Resolution of every timeout the sweep enforces (client deadlines, backend read timeouts):
5 a second."""


class ClientConnection:
    """A client connection as the data plane keeps it (plane.py): swept for its deadlines,
    closed when idle at shutdown, aborted at the end."""

    def is_busy(self) -> bool:
        """A request is in progress (or a tunnel open) on it."""
        raise NotImplementedError

    def sweep(self, now: float) -> None:
        raise NotImplementedError

    def close_if_idle(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class ClientLimits:
    """The client limits as plain attributes (read on every request; a config model is slower)."""

    def __init__(self, config: LimitsConfig) -> None:
        self.header_timeout: float = config.header_timeout
        self.keepalive_timeout: float = config.keepalive_timeout
        self.lingering_timeout: float = config.lingering_timeout
        self.lingering_time: float = config.lingering_time
        self.send_timeout: float = config.send_timeout
        self.body_timeout: float = config.body_timeout
        self.max_url_bytes: int = config.max_url_bytes
        self.max_header_bytes: int = config.max_header_bytes
        self.max_headers: int = config.max_headers
        self.max_body_bytes: int | None = config.max_body_bytes
        self.tunnel_idle_timeout: float = config.tunnel_idle_timeout or 0.0
        """0: tunnels may stay idle for ever."""
        self.max_per_ip: int = config.max_connections_per_ip or 0
        """0: no limit (and no counting)."""
        self.max_connections: int = config.max_connections or 0
        """0: no limit."""
        self.max_requests: int = config.max_requests_per_connection or 0
        """0: no limit."""
        self.underscores_in_headers: bool = config.underscores_in_headers


class Http2Limits:
    """listen.http2 as plain attributes, for HTTP/2 client connections opened from now on."""

    def __init__(self, config: Http2Config, limits: LimitsConfig) -> None:
        self.max_concurrent_streams: int = config.max_concurrent_streams
        self.initial_window: int = config.initial_window
        self.connection_window: int = config.connection_window
        self.max_frame_size: int = config.max_frame_size
        self.max_header_list: int = (config.max_header_list_bytes
                                     or limits.max_header_bytes + limits.max_url_bytes)
        self.idle_timeout: float = (limits.keepalive_timeout if config.idle_timeout is None
                                    else config.idle_timeout)
        self.ping_interval: float = config.ping_interval or 0.0
        """0: no PINGs."""
        self.ping_timeout: float = config.ping_timeout


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
        self.connections: set[ClientConnection] = set()
        self.connections_per_ip: dict[bytes, int] = {}
        """Open client connections by address, while limits.max_connections_per_ip is set."""
        self.listener: AcceptGate | None = None
        """Whoever accepts this process's client connections (limits.max_connections pauses
        it); None in tests that feed the plane connections themselves."""
        self.accepting = True
        """False while limits.max_connections holds accepting back."""
        self.draining = False
        self.h2c = False
        """Serve HTTP/2 with prior knowledge on this plain listener (listen.http2.h2c)."""
        self.http2 = Http2Limits(Http2Config(), limits)
        self.health_view = 0
        """The version of the supervisor's health picture this worker routes by (0: a single
        process, whose own machines decide)."""
        self.clock = loop.time()
        """The loop's time as of the last sweep: timeouts here are only as fine as the sweep, so
        the hot path reads this number instead of asking the clock several times a request."""
        self._sweeper: asyncio.Task[None] | None = None

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

    def connection_ended(self, connection: ClientConnection, client_ip: bytes | None) -> None:
        """A client connection is gone: forget it, and its address's count when it was
        counted (`client_ip`, limits.max_connections_per_ip); accept again if the
        connection limit held accepting back."""
        self.connections.discard(connection)
        if not self.accepting:
            self.accept_below_limit()
        if client_ip is not None:
            per_ip = self.connections_per_ip
            held = per_ip.get(client_ip, 1) - 1
            if held > 0:
                per_ip[client_ip] = held
            else:
                per_ip.pop(client_ip, None)

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
            connection.sweep(now)
        for upstream in self.topology.upstreams.values():
            upstream.health.tick(now)
            for backend in upstream.backends:
                backend.connector.sweep(now)

    def close_idle_connections(self) -> None:
        """Close client connections that have no request in progress (for shutdown)."""
        for connection in list(self.connections):
            connection.close_if_idle()

    @property
    def busy_connections(self) -> int:
        return sum(1 for c in self.connections if c.is_busy())
