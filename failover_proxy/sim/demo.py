"""Simulated cloud providers on loopback, so anyone can watch failover with no cloud account.

Six simulated backends (aws, azure, gcp; two each) answer JSON naming their provider, region and
backend. A small control API breaks and restores whole providers:

    curl -X POST http://127.0.0.1:9100/providers/aws/refusing   # or blackhole, 5xx, slow…
    curl -X POST http://127.0.0.1:9100/providers/aws/healthy
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .faults import MODES, FaultBackend

CONTROL_PORT = 9100


def demo_config_path() -> Path:
    """config/demo.yaml of the source tree (or of the working directory, as in the container)."""
    beside_package = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
    return beside_package if beside_package.exists() else Path.cwd() / "config" / "demo.yaml"


def demo_backends() -> list[FaultBackend]:
    """The simulated providers; their ports match config/demo.yaml."""
    return [
        FaultBackend("aws-use1-a", "aws", "us-east-1", 9101),
        FaultBackend("aws-use1-b", "aws", "us-east-1", 9102),
        FaultBackend("azure-eus-a", "azure", "eastus", 9103),
        FaultBackend("azure-eus-b", "azure", "eastus", 9104),
        FaultBackend("gcp-usc1-a", "gcp", "us-central1", 9105),
        FaultBackend("gcp-usc1-b", "gcp", "us-central1", 9106),
    ]


class Demo:
    """The simulated backends plus the control API that breaks them."""

    def __init__(self, host: str = "127.0.0.1", control_port: int = CONTROL_PORT) -> None:
        self.backends = demo_backends()
        self.host = host
        self.control_port = control_port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()
        app = web.Application()
        app.router.add_post("/providers/{provider}/{mode}", self._set_mode)
        app.router.add_get("/providers", self._modes)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.control_port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for backend in self.backends:
            await backend.stop()

    async def _set_mode(self, request: web.Request) -> web.Response:
        provider, mode = request.match_info["provider"], request.match_info["mode"]
        members = [b for b in self.backends if b.provider == provider]
        if not members:
            raise web.HTTPNotFound(text=f"no simulated provider {provider!r}\n")
        if mode not in MODES:
            raise web.HTTPBadRequest(text=f"unknown mode {mode!r}; modes: {', '.join(MODES)}\n")
        for backend in members:
            await backend.set_mode(mode)
        return web.Response(text=f"{provider}: {mode}\n")

    async def _modes(self, _: web.Request) -> web.Response:
        return web.json_response({b.name: b.mode for b in self.backends})
