"""The supervisor that `failover-proxy run` starts, for any number of workers (`workers: N` or
`auto`), one included, as nginx's master starts even one worker.

Why one worker gets a supervisor too: the data plane then never waits on the control plane (a
reload's YAML and pydantic, a /metrics render, the health probes run in another process), a
worker that dies is restarted while the supervisor holds its socket and its queued connections,
and a worker idles at about 28 MiB instead of 53 (it never imports yaml, pydantic or aiohttp).
The price is the supervisor's own 50-odd MiB. (`ProxyServer` still runs everything in one
process for the demo and for embedding.)

It binds one listening socket per worker slot with SO_REUSEPORT, so that the kernel spreads new
connections evenly over the workers. (One shared socket lets whichever worker wakes first take
a whole burst of connections: measured at 64 connections and 2 workers, splits of 12/52 and
48/16, and the busier worker sets the pace.) The supervisor keeps every socket open itself: when
a worker dies, the connections waiting in its queue wait for the replacement, which inherits the
same socket, instead of being reset as they would be if the socket closed with its worker. A
second proxy on the same port is refused, as without SO_REUSEPORT (see
`_bind_listening_sockets`). It owns the one health picture: the
active health checks run here, once, not once per worker; every worker's passive failures come
here and feed one outlier detector, so a failure correlated across workers takes a provider
down for all of them; each change goes to every worker at once (well under the 100 ms the
design allows). It serves the admin API with the sum of all workers' counts, carries reloads
and drains to every worker, and restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..config.loading import ConfigSource
from ..config.reload import ReloadResult
from ..config.schema import ConfigError, ProxyConfig
from ..dataplane.plane import SWEEP_INTERVAL
from ..model.counters import MetricStore, merge_wire
from ..model.discovery import Answer, Discovery, resolved
from ..model.probes import HealthChecker
from ..model.topology import Topology, Upstream, apply_answer, build_topology, take_snapshot
from ..ops.admin import AdminServer
from ..ops.metrics import ProcessGauges
from . import ipc
from .server import (
    address_text,
    catch_signals,
    reload_failed,
    reload_succeeded,
    run_until_stopped,
    settle_garbage_collector,
)

log = logging.getLogger("failover_proxy.supervisor")

STATS_TIMEOUT = 2.0
WORKER_START_TIMEOUT = 30.0
RESTART_BACKOFF = 0.5


@dataclass(eq=False)
class WorkerHandle:
    slot: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pid: int = 0
    counts: dict[str, Any] | None = None
    """The worker's counts as it last reported them (MetricStore.to_wire)."""


class Supervisor:
    """Starts, feeds and watches the worker processes; implements admin.AdminTarget."""

    def __init__(self, config: ProxyConfig, config_source: ConfigSource) -> None:
        self.config = config
        self.config_source = config_source
        self.store = MetricStore()
        self.health = HealthChecker()
        self.discovery = Discovery(self._dns_answer)
        self.admin: AdminServer | None = None
        self.draining = False
        self.workers: dict[int, WorkerHandle] = {}
        self._topology: Topology | None = None
        self._sockets: list[socket.socket] = []
        """One listening socket per worker slot (SO_REUSEPORT group), owned here."""
        self._reporting: set[WorkerHandle] = set()
        """Workers whose message socket is open: their last reported counts are in the sums."""
        self._retired = MetricStore()
        """What workers that have gone counted (as they last reported it), so the sums on
        /metrics never step back: Prometheus would read a smaller sum as a counter reset."""
        self._view_version = 0
        self._view_pending = False
        self._changed: set[str] = set()
        """Upstreams whose health changed since the last broadcast."""
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._worker_status: list[dict[str, int]] = []

    @property
    def topology(self) -> Topology:
        assert self._topology is not None, "not started"
        return self._topology

    # -- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self._sockets = _bind_listening_sockets(
            listen.host, listen.port, listen.backlog, self.config.worker_count
        )
        self.store.config_generation = 1
        # Hostnames are resolved first: the topology, and the workers, start with endpoints.
        answers = await self.discovery.resolve_now(self.config.upstreams)
        self._topology = topology = build_topology(
            self.config, self.store, now=loop.time(), resolved=resolved(answers, self.config))
        for (upstream, backend), answer in answers.items():
            self._dns_answer(upstream, backend, answer)  # counted, shown; nothing changes
        self._adopt(topology)
        for slot in range(self.config.worker_count):
            await self._spawn(slot)
        try:
            async with asyncio.timeout(WORKER_START_TIMEOUT):
                await asyncio.gather(*(w.ready.wait() for w in self.workers.values()))
        except TimeoutError:
            await self.stop(grace=0)
            raise OSError(f"workers did not start within {WORKER_START_TIMEOUT:g}s") from None
        self._keep(self._sweep_forever())
        if self.config.admin is not None:
            self.admin = AdminServer(self)
            await self.admin.start(self.config.admin.host, self.config.admin.port)
        if self.config.watch_config:
            self._keep(self.config_source.watch(self.reload))
        settle_garbage_collector()
        count = len(self.workers)
        log.info("proxy listening on %s:%d with %d worker%s", listen.host, self.port, count,
                 "" if count == 1 else "s")

    @property
    def port(self) -> int:
        port: int = self._sockets[0].getsockname()[1]
        return port

    def _adopt(self, topology: Topology) -> None:
        """Make `topology` the health picture: probed here, sent to workers on every change.
        Upstreams a reload left unchanged carry on as they were, in the workers too: only the
        new ones' health goes out now."""
        self._topology = topology
        for upstream in topology.upstreams.values():
            if self._state_changed not in upstream.listeners:
                upstream.listeners.append(self._state_changed)
                self._state_changed(upstream)
        self.health.update(list(topology.upstreams.values()))
        self.discovery.update({u.name: u.config for u in topology.upstreams.values()})

    def _dns_answer(self, upstream: str, backend: str, answer: Answer) -> None:
        """A lookup ended: the machine decides; probes follow the endpoints it leaves."""
        now = asyncio.get_running_loop().time()
        if apply_answer(self.topology, self.store, upstream, backend, answer, now, time.time()):
            self.health.update(list(self.topology.upstreams.values()))

    def _keep(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- workers ---------------------------------------------------------------------------------

    async def _spawn(self, slot: int) -> None:
        listening = self._sockets[slot]
        ours, theirs = socket.socketpair()
        theirs.set_inheritable(True)
        # Inheritable only while this worker starts: each worker must hold its own socket only,
        # or a drained worker's socket would stay open in the others and keep taking connections.
        listening.set_inheritable(True)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "failover_proxy", "worker",
                "--listen-fd", str(listening.fileno()), "--ipc-fd", str(theirs.fileno()),
                pass_fds=(listening.fileno(), theirs.fileno()),
            )
        finally:
            listening.set_inheritable(False)
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        worker = WorkerHandle(slot, process, writer)
        self.workers[slot] = worker
        ipc.send(writer, {"t": "config", "config": self.config})
        ipc.send(writer, self._view())
        self._keep(self._listen(worker, reader))
        self._keep(self._watch(worker))

    async def _listen(self, worker: WorkerHandle, reader: asyncio.StreamReader) -> None:
        self._reporting.add(worker)
        try:
            while (message := await ipc.receive(reader)) is not None:
                self._take(worker, message)
        finally:
            # Its last message has been read: its counts move to the retired, in one step.
            self._reporting.discard(worker)
            if worker.counts is not None:
                self._retired.add(worker.counts)

    def _take(self, worker: WorkerHandle, message: ipc.Message) -> None:
        kind = message["t"]
        if kind in ("failure", "success"):
            upstream = self.topology.upstreams.get(message["upstream"])
            backend = self.topology.backend(message["upstream"], message["backend"])
            if upstream is None or backend is None:
                return  # from a generation since replaced
            if kind == "failure":
                upstream.health.request_failed(backend, asyncio.get_running_loop().time(),
                                               message["why"])
            else:
                upstream.health.request_succeeded(backend)
            self._state_changed(upstream)
        elif kind == "counts":
            if worker.counts is None:
                worker.counts = message["store"]
            else:
                merge_wire(worker.counts, message["store"])
        elif kind == "stats":
            worker.counts = message["store"]
            reply = self._replies.pop(message["id"], None)
            if reply is not None and not reply.done():
                reply.set_result(message)
        elif kind == "ready":
            worker.pid = message["pid"]
            worker.ready.set()

    async def _watch(self, worker: WorkerHandle) -> None:
        """Restart a worker that dies (unless stopping), logged and counted."""
        code = await worker.process.wait()
        worker.writer.close()
        if self._stopping or self.workers.get(worker.slot) is not worker:
            return
        log.error("worker %d (pid %d) died with exit code %d; restarting it",
                  worker.slot, worker.process.pid, code)
        self.store.inc("worker_restarts")
        await asyncio.sleep(RESTART_BACKOFF)
        if not self._stopping:
            await self._spawn(worker.slot)

    # -- the shared health view ------------------------------------------------------------------

    def _state_changed(self, upstream: Upstream) -> None:
        """Send every worker the health of the upstreams that changed, once per turn of the
        event loop however many changes it had: with a thousand upstreams, one backend's probe
        must not make every worker re-adopt them all."""
        self._changed.add(upstream.name)
        if not self._view_pending:
            self._view_pending = True
            asyncio.get_running_loop().call_soon(self._broadcast)

    def _broadcast(self) -> None:
        self._view_pending = False
        changed, self._changed = self._changed, set()
        view = self._view(changed)
        for worker in self.workers.values():
            ipc.send(worker.writer, view)

    def _view(self, only: set[str] | None = None) -> dict[str, Any]:
        """The health of every upstream (or of those in `only`) for the workers."""
        self._view_version += 1
        snapshot = take_snapshot(self.topology, asyncio.get_running_loop().time(),
                                 self._view_version, only)
        return {"t": "health", "snapshot": snapshot}

    async def _sweep_forever(self) -> None:
        """Ejections and hold-downs end, slow starts ramp: on the supervisor's clock. A fault
        in one upstream's tick is logged and the sweep goes on: were it to end, no ejection
        or hold-down would end again for the life of the process."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for upstream in self.topology.upstreams.values():
                try:
                    upstream.health.tick(loop.time())
                except Exception:
                    log.exception("upstream %s: health sweep failed", upstream.name)

    # -- admin.AdminTarget -----------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down"
        if not any(w.ready.is_set() for w in self.workers.values()):
            return False, "no worker running"
        unready = self.topology.unready_reason()
        return (False, unready) if unready else (True, "ready")

    async def live_stats(self) -> tuple[MetricStore, ProcessGauges]:
        """Ask every worker for its counts and add them up; in-flight requests and latency
        go onto this process's backends, so /status shows the whole proxy."""
        loop = asyncio.get_running_loop()
        asked = []
        for worker in self.workers.values():
            request_id = next(self._request_ids)
            reply: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._replies[request_id] = reply
            ipc.send(worker.writer, {"t": "stats", "id": request_id})
            asked.append((request_id, reply))
        done, _ = await asyncio.wait([r for _, r in asked], timeout=STATS_TIMEOUT) if asked else (
            set(), set())
        for request_id, _ in asked:
            self._replies.pop(request_id, None)
        replies = [reply.result() for reply in done]
        if len(replies) < len(asked):
            log.warning("%d of %d workers did not report in time", len(asked) - len(replies),
                        len(asked))
        self._worker_status = [
            {"pid": answer["pid"], "connections": answer["connections"],
             "requests": answer["requests"]}
            for answer in replies
        ]
        total = MetricStore()
        total.add(self.store.to_wire())
        total.add(self._retired.to_wire())
        for reporting in self._reporting:
            if reporting.counts is not None:
                total.add(reporting.counts)
        total.config_generation = self.store.config_generation
        total.events = self.store.events
        for upstream in self.topology.upstreams.values():
            upstream.active_requests = 0
            for backend in upstream.backends:
                backend.in_flight = 0
                backend.connector.open_connections = backend.connector.reported_streams = 0
        latencies: dict[tuple[str, str], list[float]] = {}
        connections = 0
        for answer in replies:
            connections += answer["connections"]
            for name, active in answer["active"].items():
                if name in self.topology.upstreams:
                    self.topology.upstreams[name].active_requests += active
            for upstream_name, backend_name, in_flight, latency, *open_now in answer["backends"]:
                serving = self.topology.backend(upstream_name, backend_name)
                if serving is not None:
                    serving.in_flight += in_flight
                    if open_now:  # connections and streams (from a worker of this version)
                        serving.connector.open_connections += open_now[0]
                        serving.connector.reported_streams += open_now[1]
                    if latency:
                        latencies.setdefault((upstream_name, backend_name), []).append(latency)
        for (upstream_name, backend_name), values in latencies.items():
            measured = self.topology.backend(upstream_name, backend_name)
            if measured is not None:
                measured.ewma_latency = sum(values) / len(values)
        active = sum(u.active_requests for u in self.topology.upstreams.values())
        return total, ProcessGauges(active, connections)

    def worker_status(self) -> list[dict[str, int]]:
        return self._worker_status

    async def reload(self, source: str = "request") -> ReloadResult:
        """Validate here; when good, rebuild the health picture and send every worker the new
        config (each swaps generations the way a single process does)."""
        try:
            new, warnings = await self.config_source.read(self.config, source)
        except ConfigError as exc:
            return reload_failed(self.store, source, exc)
        loop = asyncio.get_running_loop()
        old = self.config
        self.config = new = new.keeping_restart_only(old).keeping_unchanged_upstreams(old)
        result = reload_succeeded(self.store, source, warnings)
        topology = build_topology(new, self.store, previous=self.topology, now=loop.time())
        message = {"t": "config", "config": new, "generation": result.generation}
        # An upstream the reload left as it was goes to the workers by name alone: they hold
        # it already (a reload of thousands of upstreams that changes one sends one).
        unchanged = {id(cfg): name for name, cfg in old.upstreams.items()
                     if new.upstreams.get(name) is cfg}
        for worker in self.workers.values():
            ipc.send(worker.writer, message, lambda item: unchanged.get(id(item)))
        self._adopt(topology)
        return result

    # -- stopping --------------------------------------------------------------------------------

    async def drain(self, delay: float, grace: float) -> None:
        """Every worker drains (serving `delay` more, then finishing requests within `grace`);
        the supervisor closes its copies of the sockets so that, once the workers close theirs,
        new connections are refused rather than left waiting."""
        self.draining = True
        self._stopping = True
        for worker in self.workers.values():
            ipc.send(worker.writer, {"t": "drain", "delay": delay, "grace": grace})
        self._close_sockets()
        processes = [w.process for w in self.workers.values()]
        try:
            async with asyncio.timeout(delay + grace):
                await asyncio.gather(*(p.wait() for p in processes))
        except TimeoutError:
            pass
        await self.stop(grace=5.0)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop: workers still running after `grace` are killed."""
        self._stopping = True
        processes = [w.process for w in self.workers.values()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in processes))
        for process in processes:
            if process.returncode is None:
                log.error("worker pid %d still running: killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in list(self._tasks):
            task.cancel()
        await self.health.stop()
        await self.discovery.stop()
        if self.admin is not None:
            await self.admin.stop()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()


def _bind_listening_sockets(host: str, port: int, backlog: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on one address, in one SO_REUSEPORT group.

    SO_REUSEPORT would also let a second proxy (same user) join the group and silently take a
    share of the traffic, so the port is first bound without it: a port already in use fails
    with EADDRINUSE, as it does without workers.
    """
    sockets: list[socket.socket] = []
    try:
        # A name binds the first address it resolves to (localhost: 127.0.0.1 on Debian).
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        host = str(address[0])
        if port != 0:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others join the port the first got
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise OSError(exc.errno,
                      f"cannot listen on {address_text(host, port)}: {exc.strerror}") from exc
    return sockets


async def supervise(config: ProxyConfig, config_source: ConfigSource) -> None:
    """Run a multi-process proxy until it is stopped (see server.run_until_stopped)."""
    supervisor = Supervisor(config, config_source)
    received = catch_signals()
    await supervisor.start()
    await run_until_stopped(supervisor, received=received)
