"""Assembly and lifecycle of one proxy process: build from config, listen, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from .config import ProxyConfig
from .dataplane.state import DataPlane
from .health import HealthChecker
from .topology import build_topology

log = logging.getLogger("failover_proxy")


class ProxyServer:
    """The data-plane listener of one config, with a clean stop that lets requests finish."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.plane: DataPlane | None = None
        self.health: HealthChecker | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        topology = build_topology(self.config)
        self.plane = DataPlane(loop, topology, self.config.limits)
        listen = self.config.listen
        self._server = await loop.create_server(
            self.plane.protocol_factory,
            listen.host,
            listen.port,
            backlog=listen.backlog,
            reuse_address=True,
        )
        self.plane.start()
        self.health = HealthChecker(list(topology.upstreams.values()))
        self.health.start()  # probes start at once, beside the listener
        log.info("proxy listening on %s", ", ".join(self.addresses))

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def addresses(self) -> list[str]:
        assert self._server is not None
        out = []
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish within `grace`, then close the rest."""
        plane = self.plane
        if self._server is not None:
            self._server.close()
        if self.health is not None:
            await self.health.stop()
        if plane is None:
            return
        plane.draining = True
        plane.close_idle_connections()
        deadline = plane.loop.time() + grace
        while plane.busy_connections and plane.loop.time() < deadline:
            await asyncio.sleep(0.05)
            plane.close_idle_connections()
        for connection in list(plane.connections):
            connection.abort()
        plane.stop()
        plane.topology.close()


async def serve(config: ProxyConfig, ready: asyncio.Event | None = None) -> None:
    """Run a proxy until SIGINT or SIGTERM, then stop cleanly."""
    server = ProxyServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        log.info("stopping: letting requests in flight finish")
        await server.stop()
