"""Hot reload without dropping a request, and graceful drain on SIGTERM / SIGINT.

Reloads go through the real admin API (and SIGHUP / file watching on the real process); load
comes from real keep-alive clients; drains are tested on the `failover-proxy run` process.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web

from failover_proxy.sim.faults import FaultBackend

from .conftest import ROOT, FileProxy, free_port, parse_metrics, sample, wait_for_port
from .test_failover import Load

StartFileProxy = Callable[[str], Awaitable[FileProxy]]


@pytest.fixture
async def backends() -> AsyncIterator[list[FaultBackend]]:
    started = [FaultBackend("b0", "aws"), FaultBackend("b1", "gcp"), FaultBackend("b2", "azure")]
    for backend in started:
        await backend.start()
    yield started
    for backend in started:
        await backend.stop()


def config(backends: list[FaultBackend], weights: dict[str, int], extra: str = "") -> str:
    lines = "".join(
        f'      - {{name: {b.name}, url: "http://127.0.0.1:{b.port}", provider: {b.provider}, '
        f"weight: {weights[b.name]}}}\n"
        for b in backends
        if b.name in weights
    )
    return (
        "listen: {port: 0}\nadmin: {port: 0}\naccess_log: {enabled: false}\n"
        f"upstreams:\n  web:\n    backends:\n{lines}{extra}"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )


async def reload(admin: httpx.AsyncClient) -> httpx.Response:
    return await admin.post("/reload")


async def test_fifty_reloads_under_load_lose_no_request(
    file_proxy: StartFileProxy, backends: list[FaultBackend]
) -> None:
    one = config(backends, {"b0": 1, "b1": 1})
    other = config(backends, {"b0": 3, "b1": 1, "b2": 2}, "    timeouts: {read: 20s}\n")
    proxy = await file_proxy(one)
    b0_before = proxy.server.topology.backend("web", "b0")
    load = Load(proxy.port, clients=8)
    running = asyncio.create_task(load.run())
    async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
        await asyncio.sleep(0.2)
        for number in range(50):
            proxy.path.write_text(other if number % 2 == 0 else one)
            answer = await reload(admin)
            assert answer.status_code == 200, answer.text
            await asyncio.sleep(0.03)
        load.stop()
        await running
        m = parse_metrics((await admin.get("/metrics")).text)
    assert load.errors == [], load.errors[:5]
    assert load.ok > 200
    assert sample(m, "failover_proxy_config_reloads_total", result="success") == 50
    assert sample(m, "failover_proxy_config_generation") == 51
    # Every backend of both generations served, and b2 only while it was configured.
    assert all(b.received for b in backends)
    # b0 never changed in a way that touches its connections: the same backend (pool, health,
    # counters) served throughout. Its weight followed the file.
    assert proxy.server.topology.backend("web", "b0") is b0_before
    assert b0_before is not None and b0_before.weight == 1
    counted = sample(m, "failover_proxy_requests_total", route="*/", upstream="web",
                     provider="aws", backend="b0", code_class="2xx")
    assert counted == len([r for r in backends[0].received if r.path == "/work"])


async def test_reload_keeps_health_ejections_and_drills(
    file_proxy: StartFileProxy, backends: list[FaultBackend]
) -> None:
    health = "    health_check: {path: /healthz, interval: 100ms, jitter: 0%}\n"
    outlier = "    outlier: {consecutive_failures: 1, base_ejection: 30s, max_ejection_percent: 100}\n"
    policy = "    policy: {correlated_failures: {backends: 5}}\n"
    proxy = await file_proxy(config(backends, {"b0": 1, "b1": 1, "b2": 1}, health + outlier + policy))
    _, b1, b2 = backends
    b1.health_mode = "5xx"  # fails its probes
    b2.mode, b2.health_mode = "5xx", "healthy"  # passes probes, fails requests: ejected
    async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", trust_env=False) as http:
        await asyncio.sleep(0.35)
        for _ in range(6):
            await http.get("/")
        await admin.post("/providers/web/aws/force-down")
        before = (await admin.get("/status")).json()["upstreams"]["web"]["providers"]
        assert before["gcp"]["backends"]["b1"]["state"] == "unhealthy"
        assert before["azure"]["backends"]["b2"]["state"] == "ejected"
        assert before["aws"]["state"] == "down"
        # Reload with only a weight changed: nothing above may be forgotten.
        b1.health_mode = "healthy"
        proxy.path.write_text(config(backends, {"b0": 2, "b1": 1, "b2": 1}, health + outlier + policy))
        assert (await reload(admin)).status_code == 200
        after = (await admin.get("/status")).json()["upstreams"]["web"]["providers"]
    assert after["gcp"]["backends"]["b1"]["state"] == "unhealthy"  # until two probes pass
    assert after["azure"]["backends"]["b2"]["state"] == "ejected"
    assert after["azure"]["backends"]["b2"]["ejected_until_in_s"] > 20
    assert after["aws"]["state"] == "down" and after["aws"]["forced_down"] is True
    assert after["aws"]["backends"]["b0"]["weight"] == 2


async def test_a_bad_reload_changes_nothing(
    file_proxy: StartFileProxy, backends: list[FaultBackend]
) -> None:
    good = config(backends, {"b0": 1})
    proxy = await file_proxy(good)
    proxy.path.write_text(good.replace("weight: 1", "weight: -4"))
    async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", trust_env=False) as http:
        answer = await reload(admin)
        served = await http.get("/still")
        m = parse_metrics((await admin.get("/metrics")).text)
    assert answer.status_code == 400
    body = answer.json()
    assert body["ok"] is False and body["generation"] == 1
    assert body["errors"] == [
        f"{proxy.path}:7: upstreams.web.backends.0.weight: Input should be greater than 0"
    ]
    assert served.status_code == 200 and served.json()["backend"] == "b0"
    assert sample(m, "failover_proxy_config_reloads_total", result="failure") == 1
    assert sample(m, "failover_proxy_config_reloads_total", result="success") == 0
    assert sample(m, "failover_proxy_config_generation") == 1


async def test_removed_backend_finishes_its_requests_then_closes(
    file_proxy: StartFileProxy, backends: list[FaultBackend]
) -> None:
    _, b1, _ = backends
    b1.mode, b1.delay = "slow", 0.8
    proxy = await file_proxy(config(backends, {"b0": 1, "b1": 1}, "    policy: {strategy: priority, providers: [gcp, aws]}\n"))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", trust_env=False) as http, \
            httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
        slow = asyncio.create_task(http.get("/slow", timeout=5))
        await asyncio.sleep(0.2)
        removed = proxy.server.topology.backend("web", "b1")
        assert removed is not None and removed.in_flight == 1
        proxy.path.write_text(config(backends, {"b0": 1}))
        assert (await reload(admin)).status_code == 200
        after = [(await http.get("/new")).json()["backend"] for _ in range(5)]
        answer = await slow
    assert answer.status_code == 200 and answer.json()["backend"] == "b1"
    assert after == ["b0"] * 5
    assert removed.in_flight == 0 and removed.connector.closed and not removed.connector.idle


async def test_websocket_tunnel_survives_a_reload(
    file_proxy: StartFileProxy, aiohttp_backend: Callable[[web.Application], Awaitable[int]],
    backends: list[FaultBackend],
) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            await socket.send_str("echo:" + message.data)
        return socket

    app = web.Application()
    app.router.add_get("/ws", echo)
    port = await aiohttp_backend(app)
    ws_backend = f'      - {{name: ws, url: "http://127.0.0.1:{port}", provider: aws}}\n'
    text = (
        "listen: {port: 0}\nadmin: {port: 0}\naccess_log: {enabled: false}\n"
        f"upstreams:\n  web:\n    backends:\n{ws_backend}"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    proxy = await file_proxy(text)
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"http://127.0.0.1:{proxy.port}/ws") as socket:
        await socket.send_str("before")
        assert await socket.receive_str(timeout=5) == "echo:before"
        proxy.path.write_text(config(backends, {"b0": 1}))  # the tunnel's backend is gone
        async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
            assert (await reload(admin)).status_code == 200
        for i in range(5):
            await socket.send_str(f"after {i}")
            assert await socket.receive_str(timeout=5) == f"echo:after {i}"


# -- the real process: SIGHUP, file watching, drains ---------------------------------------------


def process_config(backend_port: int, port: int, admin_port: int, extra: str = "") -> str:
    return (
        f"listen: {{port: {port}}}\nadmin: {{port: {admin_port}}}\naccess_log: {{enabled: false}}\n"
        "upstreams:\n  web:\n    backends:\n"
        f'      - {{name: b0, url: "http://127.0.0.1:{backend_port}", provider: aws}}\n'
        "routes:\n  - {path_prefix: /, upstream: web}\n"
        f"{extra}"
    )


def start_process(path: Path, *ports: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "failover_proxy", "run", "-c", str(path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    for port in ports:
        wait_for_port(port, process=process)
    return process


def generation(admin_port: int) -> int:
    status = httpx.get(f"http://127.0.0.1:{admin_port}/status", trust_env=False).json()
    value: int = status["generation"]
    return value


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


async def test_sighup_and_file_changes_reload_the_process(
    tmp_path: Path, backends: list[FaultBackend]
) -> None:
    port, admin_port = free_port(), free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(process_config(backends[0].port, port, admin_port, "watch_config: true\n"))
    process = await asyncio.to_thread(start_process, path, port, admin_port)
    try:
        # Edit the file: the watcher notices within a second or two.
        path.write_text(process_config(backends[1].port, port, admin_port, "watch_config: true\n"))
        assert await asyncio.to_thread(wait_until, lambda: generation(admin_port) == 2, 5)
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(f"http://127.0.0.1:{port}/")).json()["provider"] == "gcp"
        # SIGHUP reloads too (the file is unchanged: a new generation of the same config).
        process.send_signal(signal.SIGHUP)
        assert await asyncio.to_thread(wait_until, lambda: generation(admin_port) == 3, 5)
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(process.communicate, timeout=15)
    text = out.decode()
    assert process.returncode == 0, text
    assert "reload (file changed): config generation 2 in service" in text
    assert "reload (SIGHUP): config generation 3 in service" in text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_graceful_drain_lets_a_slow_request_finish(
    tmp_path: Path, backends: list[FaultBackend], signum: signal.Signals
) -> None:
    slow = backends[0]
    slow.mode, slow.delay = "slow", 1.5
    port, admin_port = free_port(), free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(process_config(slow.port, port, admin_port,
                                   "drain: {delay: 600ms, timeout: 10s}\n"))
    process = await asyncio.to_thread(start_process, path, port, admin_port)
    url = f"http://127.0.0.1:{port}/"
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        in_flight = asyncio.create_task(http.get(url + "slow"))
        await asyncio.sleep(0.3)
        signalled = time.monotonic()
        process.send_signal(signum)
        await asyncio.sleep(0.1)
        ready = await http.get(f"http://127.0.0.1:{admin_port}/readyz")
        if signum == signal.SIGTERM:
            # The listener keeps serving for the drain delay, asking clients to reconnect.
            during = await http.get(url + "during", headers={"Connection": "keep-alive"})
            assert during.status_code == 200
            assert during.headers["connection"] == "close"
            await asyncio.sleep(0.7)
        else:
            await asyncio.sleep(0.2)
        with pytest.raises(httpx.ConnectError):
            await http.get(url + "after")
        answer = await in_flight
    out, _ = await asyncio.to_thread(process.communicate, timeout=15)
    took = time.monotonic() - signalled
    assert (ready.status_code, ready.text) == (503, "draining: shutting down\n")
    assert answer.status_code == 200 and answer.json()["path"] == "/slow"
    assert process.returncode == 0, out.decode()
    assert took < 5, took
