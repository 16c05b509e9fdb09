"""Assembly and lifecycle of one proxy process: build from config, listen, reload, drain, stop.

A reload validates the new file first and changes nothing when it is bad. A good one becomes a
new generation in one step of the event loop: new requests route by it, requests and tunnels in
flight finish on the generation they started on, and unchanged backends carry their health,
ejections and connectors over (topology.build_topology).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..config.reload import ReloadResult
from ..config.schema import AccessLogConfig, ConfigError, ProxyConfig
from ..dataplane.codecs import client_protocol, connector_for
from ..dataplane.plane import ClientLimits, DataPlane, Http2Limits
from ..model.backends import Backend
from ..model.counters import MetricStore
from ..model.healthstate import SNAPSHOT
from ..model.topology import (
    Topology,
    apply_answer,
    assemble_topology,
    build_topology,
    build_upstreams,
)
from ..ops.accesslog import AccessLog
from ..ops.metrics import ProcessGauges
from .listener import ClientListener
from .tls import ServerTls

if TYPE_CHECKING:
    from ..config.loading import ConfigSource
    from ..model.discovery import Address, Answer, Discovery
    from ..model.probes import HealthChecker
    from ..ops.admin import AdminServer

BUILD_STEP = 100
"""Upstreams a reload builds between turns of the event loop (a part well under a millisecond
when unchanged)."""

OutcomeReporter = Callable[[str, str, Backend, str], None]
"""(kind: failure | success, upstream, backend, why): a worker's passive outcomes, sent to the
supervisor whose outlier detector decides for all workers."""

log = logging.getLogger("failover_proxy")
worker_log = logging.getLogger("failover_proxy.worker")


class ProxyServer:
    """One proxy process: the data-plane listener, health checks, the admin listener.

    As a worker of a supervisor (`report_outcome` given) it serves on the supervisor's socket
    and leaves health checks, outlier decisions and the admin listener to the supervisor.
    """

    def __init__(
        self,
        config: ProxyConfig,
        config_source: ConfigSource | None = None,
        *,
        listen_socket: socket.socket | None = None,
        report_outcome: OutcomeReporter | None = None,
    ) -> None:
        self.config = config
        self.config_source = config_source
        """The file reloads read (none in a worker: its supervisor reads and validates)."""
        self.listen_socket = listen_socket
        self.report_outcome = report_outcome
        self.store = MetricStore()
        self.plane: DataPlane | None = None
        self.health: HealthChecker | None = None
        self.discovery: Discovery | None = None
        """Active probes (aiohttp, imported only here: workers leave probing to the
        supervisor and do without it)."""
        self.admin: AdminServer | None = None
        self.draining = False
        """Set by a graceful stop: /readyz answers 503 from then on."""
        self.listener: ClientListener | None = None
        self.server_tls: ServerTls | None = None
        """The listener's certificates (None: plain HTTP)."""
        self._watcher: asyncio.Task[None] | None = None
        self.health_view_sent = 0.0
        """In a worker: wall-clock time the supervisor sent the health picture in service."""

    @property
    def topology(self) -> Topology:
        assert self.plane is not None, "not started"
        return self.plane.topology

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        self.store.config_generation = 1
        answers = await self._resolve_first()
        topology = build_topology(config, self.store, now=loop.time(),
                                  resolved=_resolved(answers, config), connectors=connector_for)
        self._adopt(topology)
        listen = config.listen
        if listen.tls is not None:
            self.server_tls = ServerTls(listen.tls)
            self.server_tls.on_reload = lambda result: self.store.inc(
                "tls_certificate_reloads", (result,))
        self.plane = plane = DataPlane(loop, topology, config.limits, store=self.store,
                                       scheme=b"https" if listen.tls is not None else b"http")
        self._apply_logging(config)
        self._apply_http2(config)
        self.listener = plane.listener = ClientListener(
            loop, client_protocol(plane), listen.backlog,
            self.server_tls.front if self.server_tls is not None else None,
            listen.tls.handshake_timeout if listen.tls is not None else None)
        await self.listener.open(listen.host, listen.port, self.listen_socket)
        if self.server_tls is not None:
            log.info("TLS: serving %s", self.server_tls.summary())
            if listen.tls is not None and listen.tls.watch:
                self.server_tls.watch(loop)
        plane.start()
        if self.report_outcome is not None:
            settle_garbage_collector()
            return  # a worker: the supervisor probes, decides and answers the admin API
        for (upstream, backend), answer in answers.items():
            self._dns_answer(upstream, backend, answer)  # counted, shown; nothing changes
        self._discover(topology)
        self._probe(topology)  # probes start at once
        if config.admin is not None:
            from ..ops.admin import AdminServer

            self.admin = AdminServer(self)
            await self.admin.start(config.admin.host, config.admin.port)
        if self.config_source is not None and config.watch_config:
            self._watcher = loop.create_task(self.config_source.watch(self.reload))
        settle_garbage_collector()
        log.info("proxy listening on %s", ", ".join(self.addresses))

    @property
    def port(self) -> int:
        assert self.listener is not None
        port: int = self.listener.sockets[0].getsockname()[1]
        return port

    @property
    def addresses(self) -> list[str]:
        assert self.listener is not None
        out = []
        for sock in self.listener.sockets:
            host, port = sock.getsockname()[:2]
            out.append(address_text(host, port))
        return out

    async def live_stats(self) -> tuple[MetricStore, ProcessGauges]:
        plane = self.plane
        if plane is None:
            return self.store, ProcessGauges(0, 0)
        active = sum(u.active_requests for u in plane.topology.upstreams.values())
        return self.store, ProcessGauges(active, len(plane.connections))

    def worker_status(self) -> list[dict[str, int]]:
        connections = len(self.plane.connections) if self.plane is not None else 0
        return [{"pid": os.getpid(), "connections": connections,
                 "requests": self.store.total_requests()}]

    # -- readiness -------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Ready when not draining and every upstream has a backend it may send to."""
        if self.draining:
            return False, "draining: shutting down"
        if self.plane is None:
            return False, "starting"
        unready = self.topology.unready_reason()
        return (False, unready) if unready else (True, "ready")

    # -- reload ----------------------------------------------------------------------------------

    async def reload(self, source: str = "request") -> ReloadResult:
        """Load the config file again; apply it only when it is valid."""
        if self.config_source is None:
            self.store.inc("config_reloads", ("failure",))
            return ReloadResult(False, self.store.config_generation, ["no config file to reload"])
        try:
            new, warnings = await self.config_source.read(self.config, source)
        except ConfigError as exc:
            return reload_failed(self.store, source, exc)
        await self.apply_config(new)
        return reload_succeeded(self.store, source, warnings)

    def _probe(self, topology: Topology) -> None:
        """Health-check what `topology` asks to (aiohttp is loaded only once something is)."""
        upstreams = list(topology.upstreams.values())
        if self.health is None:
            if not any(u.config.health_check is not None for u in upstreams):
                return
            from ..model.probes import HealthChecker

            self.health = HealthChecker()
        self.health.update(upstreams)

    async def _resolve_first(self) -> dict[tuple[str, str], Answer]:
        """Resolve the backends' hostnames once before the first topology is built (not in a
        worker: its supervisor resolves)."""
        from ..model.discovery import Discovery

        if self.report_outcome is not None or not Discovery.targets(self.config.upstreams):
            return {}
        self.discovery = Discovery(self._dns_answer)
        return await self.discovery.resolve_now(self.config.upstreams)

    def _discover(self, topology: Topology) -> None:
        """Follow a reload's hostnames (the resolver starts with the first one to have any)."""
        from ..model.discovery import Discovery

        upstreams = {u.name: u.config for u in topology.upstreams.values()}
        if self.discovery is None and Discovery.targets(upstreams):
            self.discovery = Discovery(self._dns_answer)
        if self.discovery is not None:
            self.discovery.update(upstreams)

    def _dns_answer(self, upstream: str, backend: str, answer: Answer) -> None:
        loop = asyncio.get_running_loop()
        changed = apply_answer(self.topology, self.store, upstream, backend, answer,
                               loop.time(), time.time())
        if changed:
            self._probe(self.topology)

    def _apply_http2(self, config: ProxyConfig) -> None:
        """HTTP/2 from clients, for connections opened from now on."""
        plane = self.plane
        assert plane is not None
        http2 = config.listen.http2
        plane.h2c = http2.h2c and config.listen.tls is None
        plane.http2 = Http2Limits(http2, config.limits)

    def _adopt(self, topology: Topology) -> None:
        """A worker's upstreams hand outcomes to the supervisor and leave counting provider
        moves to it."""
        report = self.report_outcome
        if report is None:
            return
        for upstream in topology.upstreams.values():
            upstream.health.quiet = True
            upstream.health.report = (
                lambda kind, backend, why, name=upstream.name: report(kind, name, backend, why)
            )
            upstream.health.moved = (
                lambda event, moves, name=upstream.name: self._domains_moved(name, event, moves)
            )

    def _domains_moved(self, upstream: str, event: str, moves: list[str]) -> None:
        """A worker's regions or providers changed state, by the supervisor's snapshot or by
        this process's own clock (a hold-down ending): logged with the health picture new
        requests are routed by, so what a request routed by it could have known is on record
        (its access log line names the same version)."""
        plane = self.plane
        view = plane.health_view if plane is not None else 0
        how = (f"in service, {(time.time() - self.health_view_sent) * 1000:.1f} ms after it "
               "was sent" if event == SNAPSHOT else f"unchanged, {event} on this worker's clock")
        worker_log.info("worker %d: health view %d %s: %s", os.getpid(), view, how,
                        "; ".join(f"{upstream} {move}" for move in moves))

    async def apply_config(self, new: ProxyConfig) -> None:
        """Swap in a validated config (a reload, or a worker told to by its supervisor)."""
        plane = self.plane
        assert plane is not None
        loop = asyncio.get_running_loop()
        # Keep what only a restart can change, so the running config says what is in force.
        new = new.keeping_restart_only(self.config)
        if self.server_tls is not None and new.listen.tls is not None:
            # Read again even when unchanged in the config: a reload is how operators say
            # "new certificate files are in place".
            self.server_tls.config = new.listen.tls  # its certificates, the rest as running
            self.server_tls.reload_files("reload")
        # A large config is built a part at a time, with requests served between the parts
        # (on the generation in service: the switch below happens in one step).
        names = list(new.upstreams)
        upstreams = {}
        for start in range(0, len(names), BUILD_STEP):
            upstreams.update(build_upstreams(new, names[start:start + BUILD_STEP], self.store,
                                             plane.topology, loop.time(),
                                             connectors=connector_for))
            await asyncio.sleep(0)
        topology = assemble_topology(new, upstreams, self.store, plane.topology)
        self._adopt(topology)
        plane.topology = topology  # the switch: new requests route by the new generation
        plane.limits = ClientLimits(new.limits)
        self._apply_http2(new)
        if not plane.accepting:
            plane.accept_below_limit()  # a higher (or no) connection limit now
        if self.report_outcome is None:
            self._probe(topology)
            self._discover(topology)
        old_log = self._apply_logging(new)
        self.config = new
        if old_log is not None:
            await loop.run_in_executor(None, old_log.close)

    def _apply_logging(self, config: ProxyConfig) -> AccessLog | None:
        """Set access log and debug headers from `config`; returns a replaced log to close."""
        plane = self.plane
        assert plane is not None
        plane.debug_headers = config.debug_headers
        current = plane.access_log
        wanted: AccessLogConfig = config.access_log
        if current is not None and wanted.enabled and current.path == wanted.path:
            current.redact_query = wanted.redact_query
            return None
        plane.access_log = (
            AccessLog(wanted.path, self.store, wanted.redact_query) if wanted.enabled else None
        )
        return current

    # -- stopping --------------------------------------------------------------------------------

    async def drain(self, delay: float, grace: float) -> None:
        """Graceful stop: not ready at once, keep serving for `delay` (load balancers notice;
        responses ask clients to reconnect), then stop accepting and give requests in flight
        up to `grace` to finish."""
        self.draining = True
        if self.plane is not None:
            self.plane.draining = True
        log.info("draining: not ready; serving %gs more, then stopping", delay)
        if delay > 0:
            await asyncio.sleep(delay)
        await self.stop(grace=grace)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish within `grace`, then close the rest."""
        self.draining = True
        plane = self.plane
        if self.listener is not None:
            self.listener.close()
        if self.server_tls is not None:
            self.server_tls.stop()
        if self._watcher is not None:
            self._watcher.cancel()
        if plane is not None:
            plane.draining = True
            plane.close_idle_connections()
            deadline = plane.loop.time() + grace
            while plane.busy_connections and plane.loop.time() < deadline:
                await asyncio.sleep(0.05)
                plane.close_idle_connections()
            left = plane.busy_connections
            if left:
                log.warning("stopping with %d requests unfinished after %gs", left, grace)
            for connection in list(plane.connections):
                connection.abort()
        if self.health is not None:
            await self.health.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.admin is not None:
            await self.admin.stop()
        if plane is None:
            return
        plane.stop()
        plane.topology.close()
        if plane.access_log is not None:
            await asyncio.get_running_loop().run_in_executor(None, plane.access_log.close)
            plane.access_log = None


GC_YOUNG_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Once started: everything allocated so far (modules, config models, the topology) moves
    out of the collector's sight (gc.freeze), and young collections run less often. Requests
    free their objects by reference counting; left as it is, the cyclic collector would walk
    every start-up object in each full collection, a pause of milliseconds in the latency tail.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def reload_failed(store: MetricStore, source: str, error: ConfigError) -> ReloadResult:
    """Count and log a reload refused for a bad file (nothing changed)."""
    store.inc("config_reloads", ("failure",))
    errors = [str(issue) for issue in error.issues]
    for line in errors:
        log.error("reload (%s) refused, still serving the old config: %s", source, line)
    return ReloadResult(False, store.config_generation, errors)


def reload_succeeded(store: MetricStore, source: str, warnings: list[str]) -> ReloadResult:
    """Count a new generation in service."""
    store.config_generation += 1
    store.inc("config_reloads", ("success",))
    log.info("reload (%s): config generation %d in service", source, store.config_generation)
    return ReloadResult(True, store.config_generation, [], warnings)


class Stoppable(Protocol):
    """A running proxy, one process or a supervisor of workers, as its signals steer it."""

    config: ProxyConfig

    async def reload(self, source: str = "request") -> ReloadResult: ...
    async def drain(self, delay: float, grace: float) -> None: ...
    async def stop(self, grace: float = 10.0) -> None: ...


_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def catch_signals() -> asyncio.Queue[int]:
    """Take SIGINT, SIGTERM and SIGHUP from now on, before the proxy starts: a signal that
    arrives while it starts (workers spawning, probes starting) is kept, and acted on once it
    has started, instead of killing the process with nothing drained."""
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[int] = asyncio.Queue()
    for signum in _HANDLED:
        loop.add_signal_handler(signum, received.put_nowait, signum)
    return received


async def run_until_stopped(
    proxy: Stoppable, ready: asyncio.Event | None = None,
    received: asyncio.Queue[int] | None = None,
) -> None:
    """Serve until SIGTERM (graceful drain) or SIGINT (drain without the delay); SIGHUP
    reloads the config file. A second stop signal skips what is left of the drain.
    `received`: the signals caught since before the start (catch_signals)."""
    loop = asyncio.get_running_loop()
    stop_requested = received if received is not None else catch_signals()
    if ready is not None:
        ready.set()
    try:
        while (signum := await stop_requested.get()) == signal.SIGHUP:
            await proxy.reload("SIGHUP")  # one at a time; a stop signal waits for it
        drain = proxy.config.drain
        delay = drain.delay if signum == signal.SIGTERM else 0.0
        log.info("%s: stopping gracefully", signal.Signals(signum).name)
        draining = loop.create_task(proxy.drain(delay, drain.timeout))
        again = loop.create_task(_next_stop(stop_requested))
        await asyncio.wait({draining, again}, return_when=asyncio.FIRST_COMPLETED)
        if not draining.done():
            log.warning("second stop signal: closing connections now")
            draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await draining
            await proxy.stop(grace=0)
        again.cancel()
    finally:
        for handled in _HANDLED:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(handled)


async def _next_stop(received: asyncio.Queue[int]) -> int:
    """The next stop signal (a reload asked for while stopping is ignored)."""
    while (signum := await received.get()) == signal.SIGHUP:
        pass
    return signum


async def serve(
    config: ProxyConfig, ready: asyncio.Event | None = None,
    config_source: ConfigSource | None = None,
) -> None:
    """Run a single-process proxy until it is stopped (see run_until_stopped)."""
    server = ProxyServer(config, config_source)
    received = catch_signals()
    await server.start()
    await run_until_stopped(server, ready, received)


def address_text(host: str, port: int) -> str:
    """host:port as logs and errors show it, an IPv6 address in brackets (so its colons do not
    run into the port's)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolved(answers: dict[tuple[str, str], Answer], config: ProxyConfig) -> dict[
        str, dict[str, tuple[Address, ...]]] | None:
    if not answers:
        return None  # (discovery, and c-ares with it, is loaded only when a name needs it)
    from ..model.discovery import resolved

    return resolved(answers, config)
