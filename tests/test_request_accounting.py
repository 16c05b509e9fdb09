"""One owner for request accounting: every way a request can go (answered, retried, hedged and
won or lost, timed out, refused, abandoned by its client while waiting, mid-body or while the
proxy dials) leaves every backend's in-flight count, and its upstream's requests and retries
in flight, back at zero. A leak would slowly close the circuit breakers and skew the
least-request balancer, so each path is run against the real proxy and real backends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from failover_proxy.model.counters import ATTEMPT_CANCELLED
from failover_proxy.model.topology import Upstream
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import FaultBackend

from .conftest import StartFaultBackends

StartProxy = Callable[[str], Awaitable[ProxyServer]]


def config(aws: FaultBackend, gcp: FaultBackend, extra: str = "") -> str:
    return (
        "listen: {host: 127.0.0.1, port: 0}\naccess_log: {enabled: false}\n"
        "upstreams:\n  web:\n    backends:\n"
        f'      - {{name: aws-a, url: "http://127.0.0.1:{aws.port}", provider: aws}}\n'
        f'      - {{name: gcp-a, url: "http://127.0.0.1:{gcp.port}", provider: gcp}}\n'
        "    policy: {strategy: priority, providers: [aws, gcp]}\n"
        "    outlier: {consecutive_failures: 1000}\n"
        "    timeouts: {connect: 300ms, read: 5s}\n"
        "    retry: {attempts: 3, on: [connect-failure, reset, timeout, '503'],"
        " budget_percent: 100, min_retry_concurrency: 100, hedge_after: 150ms}\n"
        f"{extra}"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )


def upstream_of(server: ProxyServer) -> Upstream:
    assert server.plane is not None
    return server.plane.topology.upstreams["web"]


async def settled(upstream: Upstream) -> None:
    """Wait (bounded) for every count to come back to zero, then check them all."""
    for _ in range(200):
        if (
            upstream.active_requests == 0
            and upstream.active_retries == 0
            and all(b.in_flight == 0 for b in upstream.backends)
        ):
            break
        await asyncio.sleep(0.01)
    assert upstream.active_requests == 0
    assert upstream.active_retries == 0
    assert {b.name: b.in_flight for b in upstream.backends} == {"aws-a": 0, "gcp-a": 0}


@pytest.fixture
async def setup(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> AsyncIterator[tuple[FaultBackend, FaultBackend, ProxyServer, httpx.AsyncClient]]:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(config(aws, gcp))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.port}", trust_env=False, timeout=10
    ) as client:
        yield aws, gcp, server, client


Setup = tuple[FaultBackend, FaultBackend, ProxyServer, httpx.AsyncClient]


async def leave_after(port: int, data: bytes, until: Callable[[], bool]) -> None:
    """Send `data` as a client, wait until `until()` holds, then go away without a word: a
    reset (a client that only ends its side still gets its answer: it may be reading)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    for _ in range(500):
        if until():
            break
        await asyncio.sleep(0.01)
    assert until(), "the proxy never reached the state to leave in"
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    writer.transport.abort()


async def test_answered_retried_and_timed_out_requests_give_their_places_back(
    setup: Setup,
) -> None:
    aws, _, server, client = setup
    upstream = upstream_of(server)
    assert (await client.get("/ok")).json()["provider"] == "aws"
    await settled(upstream)
    await aws.set_mode("5xx")  # a failure status, retried on gcp
    assert (await client.get("/5xx")).json()["provider"] == "gcp"
    await settled(upstream)
    await aws.set_mode("reset_after_headers")  # a reset after the head: retried unseen
    assert (await client.get("/reset")).json()["provider"] == "gcp"
    await settled(upstream)
    await aws.set_mode("refusing")  # a connect failure, retried
    assert (await client.get("/refused")).json()["provider"] == "gcp"
    await settled(upstream)
    assert upstream.store.counters["retries"]


async def test_a_race_won_or_lost_leaves_nothing_behind(setup: Setup) -> None:
    aws, gcp, server, client = setup
    upstream = upstream_of(server)
    aws.mode, aws.delay = "slow", 2.0  # the hedge to gcp wins; aws's attempt is abandoned
    response = await client.get("/hedge-wins")
    assert response.json()["provider"] == "gcp"
    await settled(upstream)
    aws.delay = 0.4  # aws answers first; the hedge to gcp (which never answers) loses
    gcp.mode = "blackhole"
    response = await client.get("/hedge-loses")
    assert response.json()["provider"] == "aws"
    await settled(upstream)
    assert upstream.store.counters["hedges"] == {("web",): 2}
    cancelled = {b.name: b.attempt_counts[ATTEMPT_CANCELLED] for b in upstream.backends}
    assert cancelled == {"aws-a": 1, "gcp-a": 1}


async def test_clients_that_leave_at_any_point_give_their_places_back(setup: Setup) -> None:
    aws, _, server, _ = setup
    upstream = upstream_of(server)
    aws_backend = upstream.backends[0]
    aws.mode = "blackhole"
    # Waiting for the answer (a POST: never hedged, never retried unasked).
    await leave_after(
        server.port,
        b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1",
        lambda: aws_backend.in_flight == 1 and len(aws.received) == 1,
    )
    await settled(upstream)
    # In the middle of its body, sent on to aws as it comes.
    await leave_after(
        server.port,
        b"POST /half HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10,
        lambda: aws_backend.in_flight == 1,
    )
    await settled(upstream)
    # A pipelined request queued behind one in progress, and the one in progress.
    await leave_after(
        server.port,
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n",
        lambda: upstream.store.counters["hedges"].get(("web",), 0) >= 1,
    )
    await settled(upstream)
    assert aws_backend.attempt_counts[ATTEMPT_CANCELLED] >= 3


async def test_a_client_that_leaves_while_the_proxy_dials_gives_its_place_back(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """A backend whose accept queue is full: the proxy's connect hangs (its SYN is dropped)
    until the connect timeout, and the client leaves meanwhile."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # more than the queue holds: the extra ones hang too
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        (gcp,) = await fault_backends("gcp-a")
        stuck = FaultBackend("aws-a", "aws", port=port)
        server = await proxy(config(stuck, gcp, "    request_buffering: {enabled: false}\n")
                             .replace("connect: 300ms", "connect: 5s"))
        upstream = upstream_of(server)
        aws_backend = upstream.backends[0]
        connector = aws_backend.connector
        await leave_after(
            server.port,
            b"POST /dial HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1",
            lambda: aws_backend.in_flight == 1,
        )
        assert connector.open_connections == 0  # it left while the proxy was still dialling
        await settled(upstream)
        assert aws_backend.attempt_counts[ATTEMPT_CANCELLED] == 1
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_refused_and_overflowing_requests_hold_no_place(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """Refused before any backend was tried (a body over the limit while it is read whole),
    or by a circuit breaker: nothing held, nothing given back twice."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(config(
        aws, gcp,
        "    request_buffering: {enabled: true, max_bytes: 64KiB}\n"
        "    circuit_breaker: {max_requests: 1}\n",
    ).replace("access_log: {enabled: false}\n", "access_log: {enabled: false}\n"
              "limits: {max_body_bytes: 16}\n"))
    upstream = upstream_of(server)

    async def send(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    answer = await send(b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"20\r\n" + b"x" * 32 + b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    await settled(upstream)
    aws.mode, aws.delay = "slow", 0.5
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", trust_env=False,
                                 timeout=10) as client:
        first = asyncio.create_task(client.post("/slow", content=b"1"))
        for _ in range(200):
            if upstream.active_requests == 1:
                break
            await asyncio.sleep(0.01)
        overflow = await client.post("/overflow", content=b"1")
        assert overflow.status_code == 503 and "circuit breaker" in overflow.text
        assert (await first).status_code == 200
    await settled(upstream)
