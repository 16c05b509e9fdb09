"""A worker process of `failover-proxy run` (`workers: N`), started by the supervisor.

It serves the data plane on the listening socket it inherited and takes everything else from
the supervisor over its message socket: the config (validated there, and received as the
objects themselves, so a worker never imports yaml or pydantic), the shared health view,
reloads and the order to drain. It sends back its passive failures, and its counts when asked and
every COUNTS_INTERVAL (so the supervisor still holds them, at most that old, if the worker dies).
Ctrl-C reaches the whole process group, so a worker ignores SIGINT and waits for its orders; if
the supervisor goes away, the worker drains and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

from ..config.schema import ProxyConfig
from ..model.backends import Backend
from ..model.healthview import HealthSnapshot
from ..model.topology import apply_snapshot
from . import ipc
from .server import ProxyServer

COUNTS_INTERVAL = 1.0

log = logging.getLogger("failover_proxy.worker")


async def run_worker(listen_fd: int, ipc_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=ipc_fd))
    first = await ipc.receive(reader)
    if first is None or first.get("t") != "config":
        raise SystemExit("worker: the supervisor sent no config")
    config: ProxyConfig = first["config"]

    def report(kind: str, upstream: str, backend: Backend, why: str) -> None:
        ipc.send(writer, {"t": kind, "upstream": upstream, "backend": backend.name, "why": why})

    server = ProxyServer(
        config,
        listen_socket=socket.socket(fileno=listen_fd),
        report_outcome=report,
    )
    await server.start()
    order = DrainOrder(0.0, server.config.drain.timeout)
    loop.add_signal_handler(signal.SIGTERM, order.given.set)
    ipc.send(writer, {"t": "ready", "pid": os.getpid()})
    following = loop.create_task(_follow(server, reader, writer, order))
    sent: dict[tuple[str, Any], Any] = {}
    reporting = loop.create_task(_report_counts(server, writer, sent))
    await order.given.wait()
    await server.drain(order.delay, order.grace)
    following.cancel()
    reporting.cancel()
    ipc.send(writer, {"t": "counts", "store": server.store.to_wire(sent)})  # the final ones
    writer.close()


class DrainOrder:
    """When and how to stop: from the supervisor, SIGTERM, or the supervisor going away."""

    def __init__(self, delay: float, grace: float) -> None:
        self.delay = delay
        self.grace = grace
        self.given = asyncio.Event()


async def _follow(
    server: ProxyServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    order: DrainOrder,
) -> None:
    """Carry out the supervisor's messages (also while draining: it still asks for counts)."""
    loop = asyncio.get_running_loop()

    def held(name: object) -> object:
        """A config names the upstreams a reload left unchanged: this worker holds them."""
        return server.config.upstreams[str(name)]

    while (message := await ipc.receive(reader, held)) is not None:
        kind = message["t"]
        if kind == "health":
            _adopt(server, message["snapshot"], loop.time())
        elif kind == "stats":
            ipc.send(writer, {"t": "stats", "id": message["id"], **_stats(server)})
        elif kind == "config":
            started = time.perf_counter()
            await server.apply_config(message["config"])
            server.store.config_generation = message["generation"]
            log.info("worker %d: config generation %d in service (%.1f ms)", os.getpid(),
                     message["generation"], (time.perf_counter() - started) * 1000)
        elif kind == "drain":
            order.delay, order.grace = message["delay"], message["grace"]
            order.given.set()
    order.given.set()  # the supervisor is gone: nobody is left to give orders


def _adopt(server: ProxyServer, snapshot: HealthSnapshot, now: float) -> None:
    """Take the supervisor's health picture: new requests are routed by it from here on (the
    access log names its version, and a region or provider it moves is logged with it)."""
    plane = server.plane
    if plane is not None:
        plane.health_view = snapshot.version
    server.health_view_sent = snapshot.sent_at
    apply_snapshot(server.topology, snapshot, now)


async def _report_counts(
    server: ProxyServer, writer: asyncio.StreamWriter, sent: dict[tuple[str, Any], Any]
) -> None:
    """What changed in this worker's counts, every COUNTS_INTERVAL."""
    while True:
        await asyncio.sleep(COUNTS_INTERVAL)
        ipc.send(writer, {"t": "counts", "store": server.store.to_wire(sent)})


def _stats(server: ProxyServer) -> dict[str, Any]:
    """This worker's counts and live numbers, for the supervisor to add up."""
    plane = server.plane
    assert plane is not None
    upstreams = plane.topology.upstreams.values()
    return {
        "pid": os.getpid(),
        "store": server.store.to_wire(),
        "requests": server.store.total_requests(),
        "connections": len(plane.connections),
        "active": {u.name: u.active_requests for u in upstreams},
        "backends": [
            [u.name, b.name, b.in_flight, b.ewma_latency, b.connector.open_connections,
             b.connector.active_streams()] for u in upstreams for b in u.backends
        ],
    }
