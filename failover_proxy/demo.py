"""Simulated cloud providers on loopback, so anyone can watch the proxy work with no cloud account.

Each simulated backend is a small aiohttp server that answers every path with JSON naming its
provider, region and backend, and `/healthz` with 200.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web


def demo_config_path() -> Path:
    """config/demo.yaml of the source tree (or of the working directory, as in the container)."""
    beside_package = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
    return beside_package if beside_package.exists() else Path.cwd() / "config" / "demo.yaml"


@dataclass(frozen=True)
class SimulatedBackend:
    name: str
    provider: str
    region: str
    port: int


DEMO_BACKENDS = (
    SimulatedBackend("aws-use1-a", "aws", "us-east-1", 9101),
    SimulatedBackend("aws-use1-b", "aws", "us-east-1", 9102),
    SimulatedBackend("azure-eus-a", "azure", "eastus", 9103),
    SimulatedBackend("azure-eus-b", "azure", "eastus", 9104),
    SimulatedBackend("gcp-usc1-a", "gcp", "us-central1", 9105),
    SimulatedBackend("gcp-usc1-b", "gcp", "us-central1", 9106),
)


def backend_app(backend: SimulatedBackend) -> web.Application:
    """An app that says who it is for any path and method."""
    identity = {"provider": backend.provider, "region": backend.region, "backend": backend.name}

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        payload = {
            **identity,
            "method": request.method,
            "path": request.path_qs,
            "request_id": request.headers.get("X-Request-Id"),
            "body_bytes": len(body),
        }
        return web.Response(text=json.dumps(payload) + "\n", content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", health)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def start_backends(
    backends: tuple[SimulatedBackend, ...] = DEMO_BACKENDS, host: str = "127.0.0.1"
) -> list[web.AppRunner]:
    """Start every simulated backend; the caller cleans up the runners."""
    runners = []
    for backend in backends:
        runner = web.AppRunner(backend_app(backend), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, backend.port).start()
        runners.append(runner)
    return runners


async def stop_backends(runners: list[web.AppRunner]) -> None:
    await asyncio.gather(*(runner.cleanup() for runner in runners))
