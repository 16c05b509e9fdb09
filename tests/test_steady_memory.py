"""The proxy keeps nothing per request or per connection once they are over.

A proxy at the edge serves billions of requests between restarts: a few bytes kept per request
is an outage weeks later. The real proxy runs in this process, so what its objects hold can be
counted directly: after a warm-up (pools, caches, metric series), more rounds of a traffic mix
(keep-alive, bodies, closing clients, refused heads, clients that leave before their answer,
pipelined requests, connections refused by a backend and retried on another) must leave the
proxy's objects at their warm-up count, and Python's allocated blocks (bytes included, which the
garbage collector does not track) close to where they were.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import pytest

from failover_proxy.process.server import ProxyServer

from .conftest import (
    backend_entry,
    free_port,
    raw_request,
    read_one_response,
    wait_for_port,
)

StartProxy = Callable[[str], Awaitable[ProxyServer]]

KEEP_ALIVE_REQUESTS = 40
"""Per round, on each of two keep-alive connections (half GET, half POST with a body)."""
WARM_UP_ROUNDS = 24
"""Enough for the pools, metric series and the interpreter's caches to reach their size."""
ROUNDS = 16


def _proxy_object_counts() -> Counter[str]:
    """Live objects of the proxy's own classes (and the event loop's handles), by type."""
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        module = getattr(kind, "__module__", "") or ""
        if module.startswith(("failover_proxy", "uvloop", "asyncio", "_asyncio")):
            counts[f"{module}.{kind.__qualname__}"] += 1
    return counts


async def _traffic_round(port: int) -> int:
    """One round of the mix; the number of requests it made."""
    made = 0
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for index in range(KEEP_ALIVE_REQUESTS):
            if index % 2:
                body = b"x" * (100 + index)
                writer.write(
                    b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
            else:
                writer.write(b"GET /hello?i=%d HTTP/1.1\r\nHost: app\r\n\r\n" % index)
            response = await read_one_response(reader)
            assert response.startswith(b"HTTP/1.1 200 "), response[:200]
            made += 1
        writer.close()
    # Pipelined: three requests in one write, answered in order.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: app\r\n\r\n" * 3)
    for _ in range(3):
        assert (await read_one_response(reader)).startswith(b"HTTP/1.1 200 ")
    made += 3
    writer.close()
    # Clients that close: one request each, with Connection: close.
    for _ in range(5):
        answer = await raw_request(
            port, b"GET /hello HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        made += 1
    # Refused heads: a malformed request line, and a smuggling attempt (both framings).
    for bad in (
        b"GET /hello HTTP/1.1 extra\r\nHost: app\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ):
        assert (await raw_request(port, bad)).startswith(b"HTTP/1.1 400 ")
        made += 1
    # Clients that hang up before their answer: one mid-body (a FIN: the body is cut short),
    # one waiting on a slow backend that resets the connection (an RST, SO_LINGER 0).
    for request, reset in (
        (b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 1000\r\n\r\nabc", False),
        (b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n", True),
    ):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        await asyncio.sleep(0.01)
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        made += 1
    return made


BACKEND = """
import asyncio, sys
from aiohttp import web

async def hello(_):
    return web.Response(text="hello")

async def echo(request):
    return web.Response(body=await request.read())

async def slow(_):
    await asyncio.sleep(0.05)
    return web.Response(text="late")

app = web.Application()
app.router.add_get("/hello", hello)
app.router.add_post("/echo", echo)
app.router.add_get("/slow", slow)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


@pytest.fixture
def backend_port() -> Iterator[int]:
    """The backend in a process of its own: what aiohttp keeps of the connections the test
    breaks is no concern here, and would cloud the count of the proxy's objects."""
    port = free_port()
    # Its output is not read: the tracebacks aiohttp logs for the connections the proxy aborts
    # would fill a pipe and block it.
    process = subprocess.Popen(
        [sys.executable, "-c", BACKEND, str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process=process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def mix_config(backend_port: int) -> str:
    """The backend, and a second one where nothing listens: about half the requests pick it
    first, fail to connect and are retried on the other. Passive detection is set never to eject
    it, and it shares its provider with the good one (a provider whose only backend fails would
    be taken down at once)."""
    return (
        "listen: {host: 127.0.0.1, port: 0}\n"
        "upstreams:\n  web:\n    backends:\n"
        + backend_entry("good", backend_port)
        + backend_entry("dead", free_port())
        + "    retry: {attempts: 3, next_attempt: any}\n"
        + "    outlier: {consecutive_failures: 1000000}\n"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )


async def test_memory_returns_to_its_level_after_rounds_of_traffic(
    backend_port: int, proxy: StartProxy
) -> None:
    server = await proxy(mix_config(backend_port))

    for _ in range(WARM_UP_ROUNDS):
        await _traffic_round(server.port)
    await asyncio.sleep(0.1)  # the aborted clients' exchanges end
    assert server.plane is not None
    dead = next(b for b in server.plane.topology.upstreams["web"].backends if b.name == "dead")
    dead_attempts = dead.attempts_total
    gc.collect()
    objects_before = _proxy_object_counts()
    blocks_before = sys.getallocatedblocks()

    requests = 0
    for _ in range(ROUNDS):
        requests += await _traffic_round(server.port)
    await asyncio.sleep(0.1)
    gc.collect()
    objects_after = _proxy_object_counts()
    blocks_after = sys.getallocatedblocks()

    assert dead.attempts_total - dead_attempts > requests // 10  # the retry path ran too

    grown = {
        name: objects_after[name] - objects_before[name]
        for name in objects_after
        if objects_after[name] - objects_before[name] > 2
    }
    assert not grown, f"objects left behind after {requests} requests: {grown}"
    # A block kept per request would add `requests` blocks (a bytes object kept per request
    # added 1,633 over 1,472 requests when tried); after the warm-up the count moves by -5 to
    # about 190 over as many (caches still settling, the test's own client: 8 runs measured),
    # so the bound sits between the two, well clear of each.
    assert blocks_after - blocks_before < requests // 3, (
        f"{blocks_after - blocks_before} more allocated blocks after {requests} requests"
    )



async def test_ended_connections_go_by_reference_counting_alone(
    backend_port: int, proxy: StartProxy
) -> None:
    """Nothing of a connection that ended waits for the cyclic collector. An object left in a
    reference cycle (a parser holding its protocol's callbacks did that) stays until a collector
    pass, and a pass over tens of thousands of them stalls the event loop: under wrk, 1 s runs
    on fresh connections saw single requests take 10-36 ms against nginx's 9."""
    server = await proxy(mix_config(backend_port))
    await _traffic_round(server.port)  # pools and caches at their size
    await asyncio.sleep(0.1)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            await _traffic_round(server.port)
        await asyncio.sleep(0.1)  # the aborted clients' exchanges end
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        stranded = Counter(
            type(obj).__qualname__
            for obj in gc.garbage
            if (type(obj).__module__ or "").startswith(("failover_proxy", "httptools"))
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not stranded, f"left to the cyclic collector: {dict(stranded)}"
