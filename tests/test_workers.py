"""Several worker processes (`workers: 2`) acting as one proxy: one health picture, summed
metrics, restarts of dead workers, reload and drain across all of them.

Everything runs as real processes: the `failover-proxy run` supervisor and its workers, with
fault-injecting backends on loopback in the test process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from failover_proxy.process.supervisor import _bind_listening_sockets
from failover_proxy.process.worker import COUNTS_INTERVAL
from failover_proxy.sim.faults import FaultBackend

from .conftest import ROOT, backend_lines, free_port, parse_metrics, sample, wait_for_port


@pytest.fixture
async def backends() -> AsyncIterator[list[FaultBackend]]:
    started = [FaultBackend(f"{p}-{x}", p) for p in ("aws", "azure", "gcp") for x in "ab"]
    for backend in started:
        await backend.start()
    yield started
    for backend in started:
        await backend.stop()


class Cluster:
    """The supervisor process with two workers, and an admin client."""

    def __init__(self, tmp_path: Path, backends: list[FaultBackend], extra: str = "") -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.path = tmp_path / "proxy.yaml"
        self.write(backends, extra)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "failover_proxy", "run", "-c", str(self.path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"

    def write(self, backends: list[FaultBackend], extra: str = "") -> None:
        entries = backend_lines(backends)
        self.path.write_text(
            f"listen: {{port: {self.port}}}\nadmin: {{port: {self.admin_port}}}\n"
            "workers: 2\naccess_log: {enabled: false}\n"
            f"upstreams:\n  web:\n    backends:\n{entries}"
            "    health_check: {path: /healthz, interval: 10s}\n"  # slow: passive detection acts
            "    outlier: {consecutive_failures: 3}\n"
            "    policy: {correlated_failures: {backends: 2, window: 1s}, hold_down: 30s}\n"
            "    retry: {attempts: 3}\n"
            "routes:\n  - {path_prefix: /, upstream: web}\n" + extra
        )

    async def started(self) -> None:
        await asyncio.to_thread(wait_for_port, self.port, 20, self.process)
        await asyncio.to_thread(wait_for_port, self.admin_port, 20, self.process)

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False) as http:
            answer: dict[str, Any] = (await http.get(self.admin + "/status")).json()
            return answer

    async def stop(self, signum: int = signal.SIGINT) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        out, _ = await asyncio.to_thread(self.process.communicate, timeout=30)
        return out.decode(errors="replace")


@pytest.fixture
async def cluster(tmp_path: Path, backends: list[FaultBackend]) -> AsyncIterator[Cluster]:
    started = Cluster(tmp_path, backends)
    try:
        await started.started()
        yield started
    finally:
        await started.stop()


def mapped_files(pid: int) -> str:
    """The files a process has mapped (its loaded libraries among them)."""
    return Path(f"/proc/{pid}/maps").read_text()


async def spread_requests(url: str, count: int, path: str = "/") -> list[httpx.Response]:
    """`count` requests, each on a new connection, several at a time: the kernel spreads the
    connections over the workers' SO_REUSEPORT sockets, so both workers serve."""
    async def one(http: httpx.AsyncClient) -> httpx.Response:
        return await http.get(url + path, headers={"Connection": "close"})

    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(trust_env=False, timeout=10, limits=limits) as http:
        answers: list[httpx.Response] = []
        for _ in range(count // 8):
            answers += await asyncio.gather(*(one(http) for _ in range(8)))
        return answers


async def test_one_health_picture_for_every_worker(
    cluster: Cluster, backends: list[FaultBackend]
) -> None:
    answers = await spread_requests(cluster.url, 64)
    assert {a.status_code for a in answers} == {200}
    workers = (await cluster.status())["workers"]
    assert len(workers) == 2 and all(w["requests"] > 0 for w in workers), workers
    # aws fails real requests (probes are 10 s apart): the workers' passive failures meet in
    # the supervisor, which takes aws down for both.
    broken_at = time.monotonic()
    for backend in backends[:2]:
        backend.mode = "5xx"
    answers = await spread_requests(cluster.url, 64)
    assert {a.status_code for a in answers} == {200}  # retried on other providers
    aws = (await cluster.status())["upstreams"]["web"]["providers"]["aws"]
    assert aws["state"] == "down", aws
    assert "2 backends failed within 1s" in aws["reason"]
    down_seen = max(r.at for b in backends[:2] for r in b.received if r.at >= broken_at)
    # From 100 ms after the last request aws saw, no worker sends it anything.
    await asyncio.sleep(0.1)
    quiet_from = time.monotonic()
    answers = await spread_requests(cluster.url, 64)
    assert {a.status_code for a in answers} == {200}
    assert not [r for b in backends[:2] for r in b.requests_since(quiet_from)]
    assert down_seen - broken_at < 2
    # An operator's drill reaches every worker at once too.
    async with httpx.AsyncClient(trust_env=False) as http:
        await http.post(cluster.admin + "/providers/web/gcp/force-down")
    drilled = time.monotonic()
    await asyncio.sleep(0.1)
    answers = await spread_requests(cluster.url, 64)
    assert {a.json()["provider"] for a in answers} == {"azure"}
    assert not [r for b in backends[4:] for r in b.requests_since(drilled + 0.1)]


async def test_metrics_add_up_over_workers(cluster: Cluster) -> None:
    answers = await spread_requests(cluster.url, 96)
    assert {a.status_code for a in answers} == {200}
    async with httpx.AsyncClient(trust_env=False) as http:
        m = parse_metrics((await http.get(cluster.admin + "/metrics")).text)
    served = sum(
        sample(m, "failover_proxy_requests_total", route="*/", upstream="web", provider=p,
               backend=f"{p}-{x}", code_class="2xx")
        for p in ("aws", "azure", "gcp") for x in "ab"
    )
    assert served == 96
    assert sum(
        sample(m, "failover_proxy_request_duration_seconds_count", upstream="web", provider=p)
        for p in ("aws", "azure", "gcp")
    ) == 96
    workers = (await cluster.status())["workers"]
    assert sum(w["requests"] for w in workers) == 96 and all(w["requests"] for w in workers)
    assert sample(m, "failover_proxy_config_generation") == 1
    # Probes run once, in the supervisor: one per backend so far, not one per worker.
    probes = sum(sample(m, "failover_proxy_health_checks_total", upstream="web",
                        backend=f"{p}-{x}", result="ok")
                 for p in ("aws", "azure", "gcp") for x in "ab")
    assert probes == 6


async def test_connections_are_spread_evenly_over_workers(cluster: Cluster) -> None:
    """32 keep-alive clients connecting at once: each worker gets a fair share (one shared
    accept queue let the first worker to wake take most of such a burst)."""
    async def client() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            for _ in range(4):
                assert (await http.get(cluster.url + "/")).status_code == 200

    await asyncio.gather(*(client() for _ in range(32)))
    served = [w["requests"] for w in (await cluster.status())["workers"]]
    assert sum(served) == 128 and min(served) >= 128 // 4, served


async def test_a_second_proxy_on_the_same_port_is_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The workers' SO_REUSEPORT sockets must not let another proxy quietly share the port."""
    other = tmp_path / "other.yaml"
    other.write_text(cluster.path.read_text().replace(
        f"admin: {{port: {cluster.admin_port}}}", f"admin: {{port: {free_port()}}}"
    ))
    second = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "failover_proxy", "run", "-c", str(other)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert second.returncode != 0
    assert "Address already in use" in second.stdout + second.stderr


async def test_a_dead_worker_is_restarted(cluster: Cluster) -> None:
    await spread_requests(cluster.url, 16)
    before = [w["pid"] for w in (await cluster.status())["workers"]]
    await asyncio.sleep(COUNTS_INTERVAL + 0.5)  # each worker has reported its counts since
    os.kill(before[0], signal.SIGKILL)
    # Connections the kernel queues for the dead worker's socket meanwhile are not lost: the
    # supervisor holds the socket, and the replacement takes them over.
    answers = await spread_requests(cluster.url, 32)
    assert {a.status_code for a in answers} == {200}
    await asyncio.sleep(1.0)
    answers = await spread_requests(cluster.url, 32)
    assert {a.status_code for a in answers} == {200}
    after = [w["pid"] for w in (await cluster.status())["workers"]]
    assert len(after) == 2 and before[0] not in after and before[1] in after
    async with httpx.AsyncClient(trust_env=False) as http:
        m = parse_metrics((await http.get(cluster.admin + "/metrics")).text)
    assert sample(m, "failover_proxy_worker_restarts_total") == 1
    # Every request is still in the sums, the dead worker's too: a sum that stepped back would
    # read as a counter reset to Prometheus.
    served = sum(v for (name, _), v in m.items() if name == "failover_proxy_requests_total")
    assert served == 16 + 32 + 32
    out = await cluster.stop()
    assert f"pid {before[0]}) died with exit code -9; restarting it" in out


async def test_reload_and_drain_reach_every_worker(
    tmp_path: Path, backends: list[FaultBackend]
) -> None:
    cluster = Cluster(tmp_path, backends[:2], "drain: {delay: 500ms, timeout: 10s}\n")
    try:
        await cluster.started()
        assert {a.json()["provider"] for a in await spread_requests(cluster.url, 16)} == {"aws"}
        cluster.write(backends[4:], "drain: {delay: 500ms, timeout: 10s}\n")
        async with httpx.AsyncClient(trust_env=False) as http:
            reloaded = await http.post(cluster.admin + "/reload")
        assert reloaded.json()["generation"] == 2
        answers = await spread_requests(cluster.url, 32)
        assert {a.json()["provider"] for a in answers} == {"gcp"}
        # The supervisor validated the new file; the workers took its result without ever
        # loading the validator (pydantic alone would add about 12 MiB to each).
        assert "pydantic_core" in mapped_files(cluster.process.pid)
        for worker in (await cluster.status())["workers"]:
            assert "pydantic_core" not in mapped_files(worker["pid"])
        slow = backends[4]
        slow.mode, slow.delay = "slow", 1.5
        backends[5].mode, backends[5].delay = "slow", 1.5
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            in_flight = asyncio.create_task(http.get(cluster.url + "/slow"))
            await asyncio.sleep(0.3)
            cluster.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            ready = await http.get(cluster.admin + "/readyz")
            await asyncio.sleep(0.8)  # past the drain delay: no worker accepts any more
            with pytest.raises(httpx.ConnectError):
                await http.get(cluster.url + "/after")
            answer = await in_flight
        out = await cluster.stop(signal.SIGTERM)
    finally:
        if cluster.process.poll() is None:
            cluster.process.kill()
    assert (ready.status_code, ready.text) == (503, "draining: shutting down\n")
    assert answer.status_code == 200 and answer.json()["path"] == "/slow"
    assert cluster.process.returncode == 0, out
    assert "Traceback" not in out


@pytest.mark.parametrize(("host", "expected"), [("localhost", {"127.0.0.1", "::1"}),
                                                  ("::1", {"::1"}), ("127.0.0.2", {"127.0.0.2"})])
def test_listen_host_may_be_a_name_or_either_family(host: str, expected: set[str]) -> None:
    """The supervisor binds what the host names (a name: its first address), every socket of the
    group on the same port."""
    group = _bind_listening_sockets(host, 0, 16, 2)
    try:
        addresses = {sock.getsockname()[:2] for sock in group}
        assert len(addresses) == 1 and next(iter(addresses))[0] in expected
    finally:
        for sock in group:
            sock.close()
