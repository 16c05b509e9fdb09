"""Shared test parts: real backends on loopback, the real proxy, raw-socket clients.

Nothing here mocks the network path: backends are aiohttp servers or raw asyncio servers bound
to 127.0.0.1, the proxy is the real `ProxyServer` (in the test's uvloop event loop) or the real
`failover-proxy` process, and clients speak over real sockets.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import uvloop
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from failover_proxy.config.loading import ConfigSource, parse_config
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import FaultBackend

ROOT = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Every async test runs on uvloop, as the proxy does in production."""
    return {"uvloop": uvloop.new_event_loop}


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for localhost from a new test CA, and a client
    context that trusts that CA."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


def hello_app() -> web.Application:
    """A backend that answers GET / with "hello"."""

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    return app


async def hello_exchanges(
    start_app: Callable[[web.Application], Awaitable[int]],
    start_proxy: Callable[[str], Awaitable[ProxyServer]],
) -> tuple[ProxyServer, list[Any], list[Any]]:
    """Three small requests through the real proxy on one keep-alive connection to an aiohttp
    backend that answers "hello"; the proxy, and its client-side and backend-side connections
    after them."""
    server = await start_proxy(single_upstream_config([await start_app(hello_app())]))
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            response = await client.get(f"http://127.0.0.1:{server.port}/")
            assert response.status_code == 200 and response.text == "hello"
        assert server.plane is not None
        client_side = list(server.plane.connections)
        backend = server.plane.topology.upstreams["web"].backends[0]
        return server, client_side, list(backend.connector.idle)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def backend_lines(backends: list[FaultBackend], extra: str = "") -> str:
    """The `backends:` list entries (YAML) of fault-injecting backends (with their region when
    they have one, and `extra` keys, `capacity: 200` say, on each)."""
    return "".join(
        f'      - {{name: {b.name}, url: "http://127.0.0.1:{b.port}", provider: {b.provider}'
        + (f", region: {b.region}" if b.region else "") + (f", {extra}" if extra else "")
        + "}\n"
        for b in backends
    )


def process_config(backends: list[FaultBackend], policy: str, port: int, admin: int,
                   settings: str = "", top: str = "", backend_extra: str = "") -> str:
    """A `failover-proxy run` config before `backends`, with its admin listener and access
    log (for run_proxy); `policy` and `settings` (more keys of the upstream, as YAML lines),
    `top` (top-level keys) and `backend_extra` (keys of each backend) say the rest."""
    return f"""{top}
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
access_log: {{path: ACCESS_LOG}}
upstreams:
  web:
    backends:
{backend_lines(backends, backend_extra)}
    policy: {{{policy}}}
{settings}
routes:
  - {{path_prefix: /, upstream: web}}
"""


StartFaultBackends = Callable[..., Awaitable[list[FaultBackend]]]


@pytest.fixture
async def fault_backends() -> AsyncIterator[StartFaultBackends]:
    """Start fault-injecting backends named `provider-suffix` (e.g. "aws-a"), or given as
    (name, provider) pairs; they are stopped after the test."""
    started: list[FaultBackend] = []

    async def start(*specs: str | tuple[str, str]) -> list[FaultBackend]:
        made = [
            FaultBackend(*spec) if isinstance(spec, tuple) else FaultBackend(spec, spec.split("-")[0])
            for spec in specs
        ]
        for backend in made:
            await backend.start()
        started.extend(made)
        return made

    yield start
    for backend in started:
        await backend.stop()


def backend_entry(name: str, port: int, provider: str = "aws", **extra: Any) -> str:
    fields = ", ".join(f"{key}: {value}" for key, value in extra.items())
    tail = f", {fields}" if fields else ""
    return (
        f'      - {{name: {name}, url: "http://127.0.0.1:{port}", provider: {provider}{tail}}}\n'
    )


def single_upstream_config(
    ports: list[int], upstream_extra: str = "", top_extra: str = "", listen_port: int = 0
) -> str:
    """A config with one upstream `web` over the given backend ports, routed at `/`."""
    backends = "".join(backend_entry(f"b{i}", port) for i, port in enumerate(ports))
    return (
        f"listen: {{host: 127.0.0.1, port: {listen_port}}}\n"
        f"upstreams:\n  web:\n    backends:\n{backends}{upstream_extra}"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
        f"{top_extra}"
    )


# -- backends -------------------------------------------------------------------------------------


@pytest.fixture
async def aiohttp_backend() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Start aiohttp apps on loopback (HTTPS with an `ssl_context`); returns their ports; cleans
    up after the test."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        runners.append(runner)
        server = site._server
        assert server is not None
        port: int = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[[RawHandler], Awaitable[int]]]:
    """Start raw asyncio servers, for responses an HTTP library would refuse to produce."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> int:
        async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(guarded, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


# -- the proxy ------------------------------------------------------------------------------------


class FileProxy:
    """A proxy started from a config file (so it can reload it), with its admin listener."""

    def __init__(self, server: ProxyServer, path: Path) -> None:
        self.server = server
        self.path = path

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def admin(self) -> str:
        assert self.server.admin is not None
        return f"http://127.0.0.1:{self.server.admin.port}"


@pytest.fixture
async def file_proxy(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[FileProxy]]]:
    """Write config text to a file and start the real proxy from it, in this event loop."""
    servers: list[ProxyServer] = []

    async def start(config_text: str) -> FileProxy:
        path = tmp_path / f"proxy-{len(servers)}.yaml"
        path.write_text(config_text)
        source = ConfigSource(str(path))
        server = ProxyServer(parse_config(source.text, source.path), source)
        await server.start()
        servers.append(server)
        return FileProxy(server, path)

    yield start
    for server in servers:
        await server.stop(grace=0.5)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text → {(sample name, labels): value}, parsed by prometheus_client itself."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist: counters start there)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[[str], Awaitable[ProxyServer]]]:
    """Start the real proxy in this event loop from config text; returns the running server."""
    servers: list[ProxyServer] = []

    async def start(config_text: str) -> ProxyServer:
        server = ProxyServer(parse_config(config_text, "test.yaml"))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=0.5)


class ProxyProcess:
    """The `failover-proxy run` command as a separate process (for memory and signal tests):
    its supervisor and the workers under it."""

    STARTED = b"proxy listening on"
    """Logged by the supervisor once every worker serves (its port answers before that: the
    supervisor binds it before it starts the workers)."""

    def __init__(self, config_path: Path, port: int, *options: str, timeout: float = 15.0) -> None:
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "failover_proxy", "run", "-c", str(config_path), *options],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._early_output = b""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self.STARTED not in self._early_output:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"not started in {timeout:g}s: {self._early_output.decode()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.process.wait()
                raise RuntimeError(f"exited with {self.process.returncode}: "
                                   f"{self._early_output.decode()}")
            self._early_output += chunk

    def pids(self) -> list[int]:
        """The supervisor, then its workers."""
        pid = self.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [pid, *map(int, children.read().split())]

    def rss_bytes(self) -> int:
        """The RSS of the supervisor and its workers together."""
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status
                              if line.startswith("VmRSS:"))
        return total

    def stop(self) -> str:
        """SIGINT: a graceful stop without SIGTERM's drain delay (tests need no load balancer
        to notice)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return (self._early_output + out).decode(errors="replace")


def wait_for_port(port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            raise RuntimeError(f"process exited with {process.returncode}: {out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start `failover-proxy run` with a config text, its port and any more options."""
    started: list[ProxyProcess] = []

    def start(config_text: str, port: int, *options: str) -> ProxyProcess:
        path = tmp_path / "proxy.yaml"
        path.write_text(config_text)
        process = ProxyProcess(path, port, *options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


# -- raw clients ----------------------------------------------------------------------------------


async def raw_request(
    port: int, data: bytes, *, until_close: bool = True, timeout: float = 5.0
) -> bytes:
    """Send raw bytes; read until the proxy closes (or until one response, when not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if until_close:
            return await asyncio.wait_for(reader.read(), timeout)
        return await asyncio.wait_for(read_one_response(reader), timeout)
    finally:
        writer.close()


async def read_one_response(reader: asyncio.StreamReader, head_request: bool = False) -> bytes:
    """One HTTP/1.1 response (Content-Length or chunked framing) read off a stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    status = int(head.split(b" ", 2)[1])
    if head_request or status in (204, 304) or 100 <= status < 200:
        return head
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            chunk = await reader.readexactly(size + 2)
            body += size_line + chunk
            if size == 0:
                return head + body
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head + await reader.read()


def env_without_proxy_vars() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(name, None)
    return env


# -- the real `failover-proxy run` process, with its admin API ----------------------------------


@dataclass
class RunningProxy:
    process: asyncio.subprocess.Process
    port: int
    admin: httpx.AsyncClient
    log: Path
    access_log: Path

    def failed_requests(self) -> str:
        """The access log's lines of requests that did not end in 200: their reason and
        attempts name the cause of a client error."""
        if not self.access_log.exists():
            return ""
        lines = self.access_log.read_text().splitlines()
        return "\n".join(line for line in lines if '"status":200,' not in line)[-5000:]

    async def status(self) -> dict[str, Any]:
        response = await self.admin.get("/status")
        document: dict[str, Any] = response.json()
        return document

    async def aws_share(self) -> float:
        aws = (await self.status())["upstreams"]["web"]["providers"]["aws"]
        return float(aws["traffic_share"]) if aws["state"] == "up" else 0.0

    async def removed_at(self, after_wall: float) -> float | None:
        """Wall-clock time aws left rotation after `after_wall` (the supervisor's record)."""
        for event in (await self.status())["recent_failovers"]:
            if (event["provider"] == "aws" and event["kind"] == "failover"
                    and event["at"] >= after_wall):
                return float(event["at"])
        return None


@pytest.fixture
async def run_proxy(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[RunningProxy] = []

    async def start(text: str, port: int, admin_port: int) -> RunningProxy:
        path = tmp_path / "proxy.yaml"
        access_log = tmp_path / "access.log"
        path.write_text(text.replace("ACCESS_LOG", str(access_log)))
        log = tmp_path / "proxy.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "failover_proxy", "run", "-c", str(path),
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )
        admin = httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}", trust_env=False,
                                  timeout=10)
        running = RunningProxy(process, port, admin, log, access_log)
        started.append(running)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.returncode is None, log.read_text()
            try:
                if (await admin.get("/readyz")).status_code == 200:
                    return running
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        raise TimeoutError(log.read_text())

    yield start
    for running in started:
        running.process.send_signal(signal.SIGINT)  # a graceful stop without a drain delay
        try:
            await asyncio.wait_for(running.process.wait(), 15)
        except TimeoutError:
            running.process.kill()
            await running.process.wait()
        await running.admin.aclose()
