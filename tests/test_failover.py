"""Failover under load: break a whole provider while GETs stream through the real proxy.

Three providers with two backends each (fault-injecting backends on loopback). For each fault
mode the clients must see no errors while other providers are usable, traffic to the broken
provider must stop within a stated bound, and it must come back after recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from failover_proxy.model.topology import Upstream
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import FaultBackend

from .conftest import backend_lines

StartProxy = Callable[[str], Awaitable[ProxyServer]]
PROVIDERS = ("aws", "azure", "gcp")


def failover_config(backends: list[FaultBackend], policy: str = "strategy: weighted") -> str:
    entries = backend_lines(backends)
    return f"""
listen: {{port: 0}}
upstreams:
  web:
    backends:
{entries}
    timeouts: {{connect: 250ms, read: 5s}}
    health_check: {{path: /healthz, interval: 300ms, unhealthy_interval: 100ms, timeout: 250ms,
                   healthy_threshold: 2, unhealthy_threshold: 2, jitter: 0%}}
    outlier: {{consecutive_failures: 3, base_ejection: 2s, max_ejection_percent: 50}}
    policy: {{{policy}, correlated_failures: {{backends: 2, window: 1s}}, hold_down: 1s}}
    retry: {{attempts: 3, per_try_timeout: 400ms}}
routes:
  - {{path_prefix: /, upstream: web}}
"""


@dataclass
class Cluster:
    backends: list[FaultBackend]
    proxy: ProxyServer

    @property
    def upstream(self) -> Upstream:
        assert self.proxy.plane is not None
        return self.proxy.plane.topology.upstreams["web"]

    def of(self, provider: str) -> list[FaultBackend]:
        return [b for b in self.backends if b.provider == provider]

    async def break_provider(self, provider: str, mode: str) -> None:
        for backend in self.of(provider):
            await backend.set_mode(mode)


@pytest.fixture
async def cluster(proxy: StartProxy) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    started: list[FaultBackend] = []

    async def start(policy: str = "strategy: weighted") -> Cluster:
        backends = [
            FaultBackend(f"{provider}-{suffix}", provider)
            for provider in PROVIDERS
            for suffix in ("a", "b")
        ]
        for backend in backends:
            await backend.start()
        started.extend(backends)
        return Cluster(backends, await proxy(failover_config(backends, policy)))

    yield start
    for backend in started:
        await backend.stop()


@dataclass
class Load:
    """Concurrent clients sending GETs (or POSTs) in a loop, recording every outcome."""

    port: int
    method: str = "GET"
    clients: int = 6
    ok: int = 0
    errors: list[tuple[float, str]] = field(default_factory=list)
    sent_bodies: list[bytes] = field(default_factory=list)
    _stop: bool = False

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=10, limits=limits
        ) as http:
            await asyncio.gather(*(self._client(http, n) for n in range(self.clients)))

    async def _client(self, http: httpx.AsyncClient, number: int) -> None:
        loop = asyncio.get_running_loop()
        sequence = 0
        while not self._stop:
            sequence += 1
            body = f"{number}-{sequence}".encode()
            try:
                if self.method == "POST":
                    self.sent_bodies.append(body)
                    response = await http.post("/work", content=body)
                else:
                    response = await http.get("/work")
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.errors.append((loop.time(), f"status {response.status_code}"))
            except httpx.HTTPError as exc:
                self.errors.append((loop.time(), type(exc).__name__))

    def stop(self) -> None:
        self._stop = True


def first_down(cluster: Cluster, provider: str) -> list[int]:
    """How many requests `provider`'s backends had received when it went down, recorded as
    the proxy changes state."""
    downs: list[int] = []

    def watch(upstream: Upstream) -> None:
        if upstream.providers[provider].state == "down" and not downs:
            downs.append(sum(len(b.received) for b in cluster.of(provider)))

    cluster.upstream.listeners.append(watch)
    return downs


async def run_fault(cluster: Cluster, provider: str, mode: str, seconds: float) -> tuple[Load, int]:
    """Load, then `provider` broken for `seconds`; returns the load and how many requests the
    provider had received when it broke."""
    load = Load(cluster.proxy.port)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(0.6)
    received = sum(len(b.received) for b in cluster.of(provider))
    await cluster.break_provider(provider, mode)
    await asyncio.sleep(seconds)
    load.stop()
    await task
    return load, received


# Every fault mode at 16, 64 and 256 clients through the real process: test_failover_process.py.


async def test_reset_mid_body_of_small_responses_is_retried_unseen(
    cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """Small responses (Content-Length up to 64 KiB) are written whole, so a backend dying in
    the middle of one is retried elsewhere before any byte reaches the client."""
    c = await cluster()
    downs = first_down(c, "aws")
    load, before = await run_fault(c, "aws", "reset_mid_body", 1.5)
    # Out after a few broken answers (two backends failing within the window), whatever the
    # clock says: at most one request per client on each of its backends.
    assert downs and downs[0] - before <= 2 * load.clients, (before, downs)
    assert load.errors == []
    assert load.ok > 100


async def test_provider_wide_failure_flips_the_provider_in_one_step(
    cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    c = await cluster()
    load = Load(c.proxy.port)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(0.3)
    await c.break_provider("gcp", "refusing")
    await asyncio.sleep(0.3)  # far less than health checks (2 x 100-300 ms) plus ejection need
    gcp = c.upstream.providers["gcp"]
    load.stop()
    await task
    assert gcp.state == "down"
    assert "2 backends failed within 1s" in gcp.reason
    assert load.errors == []


async def test_traffic_returns_after_recovery(cluster: Callable[..., Awaitable[Cluster]]) -> None:
    c = await cluster()
    load = Load(c.proxy.port)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(0.3)
    await c.break_provider("azure", "5xx")
    await asyncio.sleep(1.0)
    assert c.upstream.providers["azure"].state == "down"
    loop = asyncio.get_running_loop()
    restored_at = loop.time()
    await c.break_provider("azure", "healthy")
    await asyncio.sleep(3.0)  # hold-down (1 s), two passing health checks, ejection end (2 s)
    load.stop()
    await task
    azure = c.upstream.providers["azure"]
    assert azure.state == "up", azure.reason
    assert sum(len(b.requests_since(restored_at + 2.5)) for b in c.of("azure")) > 0
    assert load.errors == []


async def test_priority_policy_fails_over_in_order_and_fails_back(
    cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    c = await cluster("strategy: priority, providers: [gcp, aws, azure]")
    load = Load(c.proxy.port)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.sleep(0.3)
    assert all(not b.requests_since(start) for b in c.of("aws") + c.of("azure"))
    await c.break_provider("gcp", "refusing")
    await asyncio.sleep(0.6)
    moved = loop.time()
    await asyncio.sleep(0.5)
    assert all(not b.requests_since(moved) for b in c.of("gcp"))
    assert sum(len(b.requests_since(moved)) for b in c.of("aws")) > 10
    assert all(not b.requests_since(moved) for b in c.of("azure"))
    await c.break_provider("gcp", "healthy")
    await asyncio.sleep(2.5)
    back = loop.time()
    await asyncio.sleep(0.4)
    load.stop()
    await task
    assert sum(len(b.requests_since(back)) for b in c.of("gcp")) > 10
    assert load.errors == []


async def test_posts_are_never_delivered_twice(cluster: Callable[..., Awaitable[Cluster]]) -> None:
    c = await cluster()
    load = Load(c.proxy.port, method="POST")
    task = asyncio.create_task(load.run())
    await asyncio.sleep(0.4)
    await c.break_provider("aws", "reset_after_headers")
    await asyncio.sleep(0.6)
    await c.break_provider("azure", "refusing")
    await asyncio.sleep(0.6)
    load.stop()
    await task
    delivered = [r.body for b in c.backends for r in b.received if r.method == "POST"]
    assert len(delivered) == len(set(delivered)), "a POST reached backends twice"
    # Refused connections carry nothing, so those POSTs were retried and answered.
    assert load.ok > 50


async def test_nothing_usable_is_an_immediate_503_with_retry_after(
    cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    c = await cluster()
    for provider in PROVIDERS:
        await c.break_provider(provider, "5xx")
    await asyncio.sleep(0.8)  # health checks mark every backend unhealthy
    unanswered = c.upstream.unanswered_durations  # the proxy's own time for such requests
    counted, spent = sum(unanswered[:-1]), unanswered[-1]
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{c.proxy.port}/work")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "no usable backend" in response.text
    # At once: no backend was tried, and the proxy's own time for the request (head read to
    # answer written, as its duration histogram counts it) is far below any timeout it could
    # have waited on (connect 250 ms), however busy the machine running this test is.
    assert sum(unanswered[:-1]) == counted + 1
    assert unanswered[-1] - spent < 0.05, unanswered[-1] - spent


async def test_circuit_breaker_answers_503_at_once(proxy: StartProxy) -> None:
    slow = FaultBackend("slow", "aws", mode="slow", delay=0.5)
    await slow.start()
    try:
        server = await proxy(
            "listen: {port: 0}\nupstreams:\n  web:\n    backends:\n"
            f'      - {{name: slow, url: "http://127.0.0.1:{slow.port}", provider: aws}}\n'
            "    circuit_breaker: {max_requests_per_backend: 2}\n"
            "routes:\n  - {path_prefix: /, upstream: web}\n"
        )
        loop = asyncio.get_running_loop()
        limits = httpx.Limits(max_connections=5)
        async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=5) as http:
            started = loop.time()

            async def get() -> tuple[int, float, str]:
                response = await http.get(f"http://127.0.0.1:{server.port}/")
                return response.status_code, loop.time() - started, response.text

            results = await asyncio.gather(*(get() for _ in range(5)))
        assert sorted(status for status, _, _ in results) == [200, 200, 503, 503, 503]
        answered = min(took for status, took, _ in results if status == 200)
        for status, took, text in results:
            if status == 503:  # at once: before the slow backend answered anyone
                assert took < answered and "circuit breaker open" in text
        assert len(slow.received) == 2
    finally:
        await slow.stop()


@pytest.mark.parametrize("panic", ["spread", "fail"])
async def test_panic_when_health_checks_fail_everywhere(
    cluster: Callable[..., Awaitable[Cluster]], panic: str
) -> None:
    c = await cluster(f"strategy: weighted, panic_threshold: 50%, panic: {panic}")
    for backend in c.backends:
        backend.health_mode = "5xx"  # probes fail, real requests still work
    await asyncio.sleep(1.0)
    assert all(not b.healthy for b in c.upstream.backends)
    assert c.upstream.panic
    async with httpx.AsyncClient(trust_env=False) as http:
        responses = [await http.get(f"http://127.0.0.1:{c.proxy.port}/x") for _ in range(6)]
    if panic == "spread":
        assert [r.status_code for r in responses] == [200] * 6
        assert len({r.json()["provider"] for r in responses}) == 3
    else:
        assert {r.status_code for r in responses} == {503}
        assert "panic" in responses[0].text


async def test_recovered_provider_ramps_up_through_slow_start(
    cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    c = await cluster("strategy: weighted, slow_start: 3s")
    returned: list[float] = []
    came_back = asyncio.Event()
    loop = asyncio.get_running_loop()

    def watch(upstream: Upstream) -> None:
        azure = upstream.providers["azure"]
        if azure.state == "up" and azure.down_since and not returned:
            returned.append(loop.time())
            came_back.set()

    c.upstream.listeners.append(watch)
    load = Load(c.proxy.port)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(0.3)
    await c.break_provider("azure", "5xx")
    await asyncio.sleep(0.8)
    await c.break_provider("azure", "healthy")
    await asyncio.wait_for(came_back.wait(), 10)
    await asyncio.sleep(3.2)
    load.stop()
    await task
    back = returned[0]

    def azure_share(start: float, end: float) -> float:
        def count(backends: list[FaultBackend]) -> int:
            return sum(1 for b in backends for r in b.received if start <= r.at - OFFSET < end)

        return count(c.of("azure")) / max(1, count(c.backends))

    OFFSET = time.monotonic() - loop.time()  # FaultBackend stamps with time.monotonic()
    early, late = azure_share(back, back + 0.6), azure_share(back + 2.5, back + 3.2)
    print(f"azure share right after return {early:.2f}, after the ramp {late:.2f}")
    assert 0 < early < late
    assert late > 0.25  # about a third once ramped up
    assert load.errors == []


async def test_hedged_request_takes_the_first_answer(proxy: StartProxy) -> None:
    slow = FaultBackend("aws-a", "aws", mode="slow", delay=3.0)
    fast = FaultBackend("gcp-a", "gcp")
    for backend in (slow, fast):
        await backend.start()
    try:
        server = await proxy(
            "listen: {port: 0}\nupstreams:\n  web:\n    backends:\n"
            f'      - {{name: aws-a, url: "http://127.0.0.1:{slow.port}", provider: aws}}\n'
            f'      - {{name: gcp-a, url: "http://127.0.0.1:{fast.port}", provider: gcp}}\n'
            "    policy: {strategy: priority, providers: [aws, gcp]}\n"
            "    retry: {hedge_after: 100ms}\n"
            "routes:\n  - {path_prefix: /, upstream: web}\n"
        )
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            started = loop.time()
            response = await http.get(f"http://127.0.0.1:{server.port}/hedge")
            took = loop.time() - started
            slow.mode = "healthy"
            posted = await http.post(f"http://127.0.0.1:{server.port}/once", content=b"x")
        assert response.status_code == 200 and response.json()["provider"] == "gcp"
        # Hedged after hedge_after, and answered by the first answer: not after the slow one
        # (3 s; half of that is the margin for a busy machine).
        assert 0.09 <= took < 1.5, took
        assert [r.path for r in slow.received] == ["/hedge", "/once"]  # both went to aws first
        assert [r.path for r in fast.received] == ["/hedge"]  # a POST is never hedged
        assert posted.json()["provider"] == "aws"
        upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
        assert upstream.store.counters["hedges"] == {("web",): 1}
        assert all(b.in_flight == 0 for b in upstream.backends)
    finally:
        for backend in (slow, fast):
            await backend.stop()


def budget_config(backends: list[FaultBackend], retry: str) -> str:
    """Priority in the backends' order, a retry budget of `retry`, no health checks (retries
    alone)."""
    order = ", ".join(dict.fromkeys(b.provider for b in backends))
    return f"""
listen: {{port: 0}}
access_log: {{enabled: false}}
upstreams:
  web:
    backends:
{backend_lines(backends)}
    timeouts: {{connect: 250ms, read: 5s}}
    outlier: {{consecutive_failures: 1000}}
    policy: {{strategy: priority, providers: [{order}],
             correlated_failures: {{backends: 2, window: 1s}}, hold_down: 5s}}
    retry: {{attempts: 3, {retry}}}
routes:
  - {{path_prefix: /, upstream: web}}
"""


async def concurrent_gets(port: int, count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=10) as http:
        responses = await asyncio.gather(
            *(http.get(f"http://127.0.0.1:{port}/x") for _ in range(count))
        )
    return [r.status_code for r in responses]


async def test_connect_failures_are_retried_outside_the_budget(
    proxy: StartProxy, fault_backends: Callable[..., Awaitable[list[FaultBackend]]],
) -> None:
    """A budget of nothing: refused connections reached no backend, so they are retried on
    another provider all the same (bounded by attempts)."""
    backends = await fault_backends("aws-a", "aws-b", "gcp-a", "gcp-b")
    server = await proxy(budget_config(backends, "budget_percent: 0, min_retry_concurrency: 0"))
    for backend in backends[:2]:
        await backend.set_mode("refusing")
    assert await concurrent_gets(server.port, 16) == [200] * 16
    upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
    assert upstream.store.counters["retry_budget_exhausted"] == {}
    assert upstream.active_retries == 0


async def test_a_provider_wide_failure_is_retried_whatever_the_budget(
    proxy: StartProxy, fault_backends: Callable[..., Awaitable[list[FaultBackend]]],
) -> None:
    """aws answers 503 from both backends to 16 requests at once. The budget allows one retry
    in flight; from the second aws backend's failure on, aws is failing as a whole, and those
    retries are the failover itself: none is refused."""
    backends = await fault_backends("aws-a", "aws-b", "gcp-a", "gcp-b")
    server = await proxy(budget_config(backends, "budget_percent: 0, min_retry_concurrency: 1"))
    for backend in backends[:2]:
        backend.mode = "5xx"
        backend.delay = 0.0
    assert await concurrent_gets(server.port, 16) == [200] * 16
    assert sum(len(b.received) for b in backends[2:]) >= 15


async def test_one_failing_backend_is_retried_whatever_the_budget(
    proxy: StartProxy, fault_backends: Callable[..., Awaitable[list[FaultBackend]]],
) -> None:
    """A budget of nothing, and aws-a alone answers 503 to 16 requests at once: a failure
    confined to one backend while the others answer is the outlier case retries are for, and
    its retries add load only in proportion to that backend's share. None is refused."""
    backends = await fault_backends("aws-a", "aws-b", "gcp-a", "gcp-b")
    server = await proxy(budget_config(backends, "budget_percent: 0, min_retry_concurrency: 0"))
    backends[0].mode = "5xx"
    backends[0].delay = 0.0
    assert await concurrent_gets(server.port, 16) == [200] * 16
    assert len(backends[0].received) > 0
    upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
    assert upstream.store.counters["retry_budget_exhausted"] == {}


async def test_when_everything_fails_the_budget_and_attempts_bound_the_load(
    proxy: StartProxy, fault_backends: Callable[..., Awaitable[list[FaultBackend]]],
) -> None:
    """Every provider answers 503: no provider can take over, so retries are not exempt. Each
    request makes at most `attempts` tries, and the budget refuses retries beyond its share."""
    backends = await fault_backends("aws-a", "aws-b", "azure-a", "azure-b", "gcp-a", "gcp-b")
    server = await proxy(budget_config(backends, "budget_percent: 20, min_retry_concurrency: 2"))
    for backend in backends:
        backend.mode = "5xx"
    statuses = await concurrent_gets(server.port, 40)
    assert statuses == [503] * 40
    reached = sum(len(b.received) for b in backends)
    assert 40 <= reached <= 3 * 40
    upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
    assert upstream.store.counters["retry_budget_exhausted"][("web",)] > 0
    assert reached < 3 * 40  # the budget refused some retries
    assert upstream.active_retries == 0 and upstream.active_requests == 0


async def test_hedges_are_charged_to_the_retry_budget(
    proxy: StartProxy, fault_backends: Callable[..., Awaitable[list[FaultBackend]]],
) -> None:
    backends = await fault_backends("aws-a", "gcp-a")
    backends[0].mode, backends[0].delay = "slow", 0.3
    server = await proxy(budget_config(
        backends, "budget_percent: 0, min_retry_concurrency: 0, hedge_after: 50ms"))
    assert await concurrent_gets(server.port, 4) == [200] * 4
    upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
    assert upstream.store.counters["hedges"] == {}  # the budget had no room for one
    assert upstream.store.counters["retry_budget_exhausted"][("web",)] == 4
    assert not backends[1].received


async def test_an_abandoned_exchange_cancels_its_hedges_connect(
    proxy: StartProxy, fault_backends: Callable[..., Awaitable[list[FaultBackend]]],
) -> None:
    """The hedge's backend accepts nothing (a full backlog): its connect is still pending
    when the client leaves, and must not outlive the exchange."""
    slow = (await fault_backends("aws-a"))[0]
    slow.mode, slow.delay = "slow", 5.0
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue: further connects hang in SYN-SENT
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(silent.getsockname())
            fillers.append(filler)
        port = silent.getsockname()[1]
        server = await proxy(
            "listen: {port: 0}\nupstreams:\n  web:\n    backends:\n"
            f'      - {{name: aws-a, url: "http://127.0.0.1:{slow.port}", provider: aws}}\n'
            f'      - {{name: gcp-a, url: "http://127.0.0.1:{port}", provider: gcp}}\n'
            "    timeouts: {connect: 10s}\n"
            "    policy: {strategy: priority, providers: [aws, gcp]}\n"
            "    retry: {hedge_after: 50ms}\n"
            "routes:\n  - {path_prefix: /, upstream: web}\n"
        )
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # the hedge is connecting
        # The client leaves with a reset (a FIN alone is a half-close: it would still be owed
        # its answer).
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        await asyncio.sleep(0.3)
        pending = [t for t in asyncio.all_tasks() if "_connect_hedge" in repr(t.get_coro())]
        assert pending == []
        upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
        assert upstream.active_retries == 0 and upstream.active_requests == 0
    finally:
        for filler in fillers:
            filler.close()
        silent.close()


async def test_a_recovered_provider_in_hold_down_is_the_last_resort(proxy: StartProxy) -> None:
    """gcp fails its checks and is taken down for a 30 s hold-down; it recovers (its checks
    pass again) but waits out the hold-down. Now aws, the only provider in rotation, refuses
    connections: rather than 502 or 503, requests go to gcp as a last resort. Reproduces what
    benchmarks/soak.py found when faults came faster than hold-downs ended."""
    backends = [FaultBackend("aws-a", "aws"), FaultBackend("gcp-a", "gcp")]
    for backend in backends:
        await backend.start()
    try:
        server = await proxy(failover_config(backends).replace("hold_down: 1s", "hold_down: 30s"))
        assert server.plane is not None
        upstream = server.plane.topology.upstreams["web"]
        aws, gcp = backends
        await gcp.set_mode("5xx")
        for _ in range(100):
            if upstream.providers["gcp"].state == "down":
                break
            await asyncio.sleep(0.05)
        assert upstream.providers["gcp"].state == "down"
        await gcp.set_mode("healthy")
        gcp_backend = next(b for b in upstream.backends if b.provider == "gcp")
        for _ in range(100):
            if gcp_backend.state == "healthy":
                break
            await asyncio.sleep(0.05)
        assert gcp_backend.state == "healthy" and upstream.providers["gcp"].state == "down"
        await aws.set_mode("refusing")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}",
                                     trust_env=False) as http:
            answers = [await http.get("/work") for _ in range(10)]
        assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers]
        assert all(a.json()["provider"] == "gcp" for a in answers)
        reason = upstream.choose([], [], peek=True)[1]
        assert upstream.providers["aws"].state == "down" or "last resort" in reason, reason
        # An operator's force-down is never overridden.
        upstream.health.force(upstream.providers["gcp"], True, asyncio.get_running_loop().time())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}",
                                     trust_env=False) as http:
            refused = await http.get("/work")
        assert refused.status_code in (502, 503)
    finally:
        for backend in backends:
            await backend.stop()
