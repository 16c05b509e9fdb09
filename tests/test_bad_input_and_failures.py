"""Malformed, oversized and smuggling requests; dead, hung and rude backends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from failover_proxy.model.counters import ATTEMPT_OUTCOMES
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import read_request_body

from .conftest import (
    RawHandler,
    free_port,
    raw_request,
    read_one_response,
    read_request_head,
    single_upstream_config,
)

StartRaw = Callable[[RawHandler], Awaitable[int]]
StartProxy = Callable[[str], Awaitable[ProxyServer]]


class CountingBackend:
    """Answers every request with 'ok' and remembers each request head it saw."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            self.heads.append(head)
            await read_request_body(reader, head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def failures_counted(server: ProxyServer) -> int:
    """The consecutive failures the proxy holds against the one backend `b0`."""
    backend = server.topology.backend("web", "b0")
    assert backend is not None
    return backend.consecutive_failures


@pytest.fixture
async def counted(raw_backend: StartRaw, proxy: StartProxy) -> tuple[CountingBackend, ProxyServer]:
    backend = CountingBackend()
    server = await proxy(
        single_upstream_config(
            [await raw_backend(backend)],
            top_extra="limits: {max_header_bytes: 4KiB, max_url_bytes: 1KiB, max_body_bytes: 1KiB,"
            " header_timeout: 500ms}\n",
        )
    )
    return backend, server


@pytest.fixture
async def api_only(raw_backend: StartRaw, proxy: StartProxy) -> tuple[CountingBackend, ProxyServer]:
    """A proxy routing /api alone: any other path is a request without a route (404)."""
    backend = CountingBackend()
    config = single_upstream_config([await raw_backend(backend)])
    return backend, await proxy(config.replace("{path_prefix: /,", "{path_prefix: /api,"))


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET nothing HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (b"GET /\r\nHost: x\r\n\r\n", 505),  # HTTP/0.9 to llhttp
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n\r\n", 417),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"800\r\n" + b"a" * 2048 + b"\r\n0\r\n\r\n", 413),
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-N: 1\r\n" * 150 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 400),
    ],
)
async def test_bad_requests_get_4xx_and_close_and_smuggle_nothing(
    counted: tuple[CountingBackend, ProxyServer], request_bytes: bytes, status: int
) -> None:
    backend, server = counted
    raw = await raw_request(server.port, request_bytes)  # reads until the proxy closes
    assert status_of(raw) == status, raw[:200]
    assert raw.count(b"HTTP/1.1 ") == 1 or raw.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in raw.split(b"\r\n\r\n")[0]
    assert b"request id" in raw
    assert all(b"/smuggled" not in head for head in backend.heads)
    assert b"Traceback" not in raw


async def test_answers_ahead_of_a_bad_pipelined_request_still_arrive(
    counted: tuple[CountingBackend, ProxyServer],
) -> None:
    backend, server = counted
    raw = await raw_request(
        server.port,
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\nBROKEN\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.rindex(b"HTTP/1.1 400 ") > raw.rindex(b"HTTP/1.1 200 OK")
    assert len(backend.heads) == 2


async def test_slow_request_head_gets_408(counted: tuple[CountingBackend, ProxyServer]) -> None:
    _, server = counted
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    raw = await asyncio.wait_for(reader.read(), 5)
    assert status_of(raw) == 408
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"HEAD /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"HEAD / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
        # past both limits together: refused from its size, before llhttp reads any of it
        (b"HEAD / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
        (b"HEAD / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"HEAD / HTTP/1.1\r\nHost: x\r\n", 408),  # and never the blank line
    ],
)
@pytest.mark.parametrize("first_read", [0, 2], ids=["whole", "HE-first"])
async def test_a_head_request_refused_before_its_head_is_read_gets_no_body(
    counted: tuple[CountingBackend, ProxyServer], request_bytes: bytes, status: int,
    first_read: int,
) -> None:
    """An answer to HEAD has no body (RFC 9110 §9.3.2), even when the proxy refuses the request
    before reading its head: the request is known as HEAD from its first bytes, also when they
    come in a read too short to hold the method."""
    _, server = counted
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    if first_read:
        writer.write(request_bytes[:first_read])
        await writer.drain()
        await asyncio.sleep(0.05)
    writer.write(request_bytes[first_read:])
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert status_of(raw) == status, raw[:200]
    assert raw.endswith(b"\r\n\r\n") and raw.count(b"\r\n\r\n") == 1, raw[-200:]


async def test_connection_refused_is_502_naming_the_backend(proxy: StartProxy) -> None:
    server = await proxy(single_upstream_config([free_port()]))
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
    assert status_of(raw) == 502
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert b"cannot connect to backend b0" in body and b"request id" in body


async def test_hung_backend_is_504_after_read_timeout(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await asyncio.sleep(30)

    server = await proxy(
        single_upstream_config([await raw_backend(hang)], "    timeouts: {read: 300ms}\n")
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
    assert status_of(raw) == 504
    assert b"sent nothing for 0.3s" in raw
    assert 0.25 <= loop.time() - started < 2.0


async def test_connect_timeout_is_504(proxy: StartProxy) -> None:
    # A listening socket whose accept queue is full never completes new handshakes.
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    port = blocker.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        server = await proxy(
            single_upstream_config([port], "    timeouts: {connect: 200ms}\n")
        )
        raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
        assert status_of(raw) in (502, 504)
        if status_of(raw) == 504:
            assert b"timed out" in raw
    finally:
        for filler in fillers:
            filler.close()
        blocker.close()


async def test_garbage_from_backend_is_502(raw_backend: StartRaw, proxy: StartProxy) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(garbage)]))
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
    assert status_of(raw) == 502
    assert b"invalid response" in raw


async def test_backend_reset_mid_body_cuts_the_client_off(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A large response streams: once bytes reached the client, a reset must show as a cut."""
    part = b"p" * 100_000

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + part)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    server = await proxy(single_upstream_config([await raw_backend(cut)]))
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    # The client sees a truncated response, never one that looks complete.
    assert b"Content-Length: 1000000" in head and body == part


async def test_small_response_cut_mid_body_is_a_502_not_a_truncation(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """Small responses are written whole: a backend dying inside one is a clean error."""

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.transport.abort()

    server = await proxy(single_upstream_config([await raw_backend(cut)]))
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
    assert status_of(raw) == 502
    assert b"in the middle of the response" in raw


async def test_small_response_stalled_mid_body_is_still_held_whole(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """The rest of a small body comes slowly (past the second sweep, which sends a head
    whose body has not started), then the backend dies: the part already received is still
    held, so the client gets a clean 502, not a truncated 200."""

    async def stall_then_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        await asyncio.sleep(0.8)  # four sweeps
        writer.transport.abort()

    server = await proxy(single_upstream_config([await raw_backend(stall_then_cut)]))
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
    assert status_of(raw) == 502
    assert b"only part" not in raw


async def test_backend_closing_before_answering_is_502(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)

    server = await proxy(single_upstream_config([await raw_backend(close_at_once)]))
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
    assert status_of(raw) == 502
    assert b"before responding" in raw


# -- found by the generated requests of test_fuzz_framing.py --------------------------------------


async def test_upgrade_offer_without_a_route_is_answered_and_closed(
    api_only: tuple[CountingBackend, ProxyServer],
) -> None:
    """What follows an upgrade offer is not HTTP: after the 404 nobody reads it, so the
    connection must end (it used to stay open, unread, until the keep-alive timeout)."""
    _, server = api_only
    raw = await raw_request(
        server.port,
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x05hello",
        timeout=2.0,
    )
    assert status_of(raw) == 404
    assert b"Connection: close" in raw


async def test_upgrade_offer_with_a_body_is_refused(
    counted: tuple[CountingBackend, ProxyServer],
) -> None:
    """llhttp reads a body on a request to upgrade as bytes of the new protocol, other servers
    as the body: the two would frame the connection differently, so it is refused (found by
    the differential test against nginx, where the body was held back and never forwarded)."""
    backend, server = counted
    upgrade = b"Host: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
    for framing in (b"Content-Length: 5\r\n\r\nhello",
                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"):
        raw = await raw_request(server.port, b"POST /chat HTTP/1.1\r\n" + upgrade + framing)
        assert status_of(raw) == 400, raw
        assert b"a body on a request to upgrade" in raw
    assert backend.heads == []
    # An empty body is no body: the handshake goes on to the backend.
    raw = await raw_request(server.port, b"GET /chat HTTP/1.1\r\n" + upgrade
                            + b"Content-Length: 0\r\n\r\n")
    assert status_of(raw) == 200  # the backend refused to switch; the proxy then closes
    assert len(backend.heads) == 1


async def test_absolute_form_with_an_invalid_port_is_refused(
    counted: tuple[CountingBackend, ProxyServer],
) -> None:
    """An empty port or one over 65535 is no authority to route by (nginx forwards the path)."""
    backend, server = counted
    for target in (b"http://x:99999/", b"http://x:/a", b"https://h.exs://h.example/p"):
        raw = await raw_request(server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(raw) == 400, raw
        assert b"invalid request target" in raw
    assert backend.heads == []


async def test_asterisk_form_is_for_options_alone(
    counted: tuple[CountingBackend, ProxyServer],
) -> None:
    """`*` names the server as a whole, and only OPTIONS may ask for it (RFC 9112 §3.2.4):
    any other method with it is refused, not forwarded."""
    backend, server = counted
    for method in (b"GET", b"POST", b"DELETE"):
        raw = await raw_request(
            server.port, method + b" * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        assert status_of(raw) == 400, raw
        assert b"only OPTIONS may have the target *" in raw
    assert backend.heads == []


async def test_own_answers_to_head_requests_carry_no_body(
    api_only: tuple[CountingBackend, ProxyServer],
) -> None:
    """A body after a response to HEAD would be read as the start of the next response."""
    backend, server = api_only
    raw = await raw_request(
        server.port,
        b"HEAD /none HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /api/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    first, rest = raw.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 404 ") and b"Content-Length: " in first
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:100]
    assert rest.endswith(b"\r\n\r\nok")
    assert [head.split(b" ")[1] for head in backend.heads] == [b"/api/next"]


async def test_a_request_after_an_answer_that_closes_never_reaches_the_backend(
    api_only: tuple[CountingBackend, ProxyServer],
) -> None:
    """The 404 is sent with Connection: close (its body had not arrived when it was decided);
    the request pipelined behind it used to be forwarded all the same, its answer lost."""
    backend, server = api_only
    warm = await raw_request(
        server.port, b"GET /api/warm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status_of(warm) == 200  # leaves an idle backend connection: the next would be sent
    raw = await raw_request(
        server.port,
        b"POST /none HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
        b"\r\nPOST /api/transfer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    )
    assert status_of(raw) == 404
    assert b"Connection: close" in raw
    assert raw.count(b"HTTP/1.1 ") == 1
    await asyncio.sleep(0.1)
    assert [head.split(b" ")[1] for head in backend.heads] == [b"/api/warm"]


async def send_until_stopped(
    writer: asyncio.StreamWriter, piece: bytes, pause: float = 0.0
) -> None:
    """Keep sending `piece` (`pause` seconds apart) until the connection breaks or the task is
    cancelled."""
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)


async def until_gone(server: ProxyServer, timeout: float) -> float:
    """Seconds until the proxy holds no client connection (fails after `timeout`)."""
    assert server.plane is not None
    loop = asyncio.get_running_loop()
    start = loop.time()
    while server.plane.connections:
        assert loop.time() - start < timeout, "the proxy still holds the connection"
        await asyncio.sleep(0.02)
    return loop.time() - start


async def test_a_refusal_reaches_a_client_still_sending_its_body(
    counted: tuple[CountingBackend, ProxyServer],
) -> None:
    """Lingering close: a body over the limit is refused while the client is still sending
    it; closing with its bytes unread would make the kernel reset the connection, and the
    client could lose the 413 before reading it. Every time, the client reads the whole 413,
    then the end of the connection; once it stops sending, the proxy lets go of it."""
    backend, server = counted
    for framing in (b"Content-Length: 67108864\r\n", b"Transfer-Encoding: chunked\r\n"):
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n")
            piece = b"x" * 65536 if framing.startswith(b"Content") else b"10000\r\n" + b"x" * 65536
            sending = asyncio.create_task(send_until_stopped(writer, piece))
            raw = await asyncio.wait_for(reader.read(), 5.0)  # a reset would raise here
            assert status_of(raw) == 413, raw[:200]
            assert b"request body over 1024 bytes" in raw and b"request id" in raw
            sending.cancel()
            writer.close()
            await until_gone(server, 2.0)
    # A declared length over the limit is refused before any backend sees it; a chunked body
    # is streamed until it passes the limit, and its backend request then abandoned.
    assert all(b"Transfer-Encoding: chunked" in head for head in backend.heads)


async def test_a_body_refused_mid_stream_is_recorded_once_with_the_refusal(
    raw_backend: StartRaw, proxy: StartProxy, tmp_path: Path
) -> None:
    """A body that passes the limit after its request went to a backend: the client's answer
    is the 413, and the request is counted and logged once, as that 413 on its route."""
    log_file = tmp_path / "access.log"
    server = await proxy(
        single_upstream_config(
            [await raw_backend(CountingBackend())],
            top_extra=f"limits: {{max_body_bytes: 1KiB}}\naccess_log: {{path: '{log_file}'}}\n",
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"400\r\n" + b"x" * 1024 + b"\r\n")
    await asyncio.sleep(0.2)  # forwarded by now
    writer.write(b"10\r\n" + b"y" * 16 + b"\r\n")
    raw = await asyncio.wait_for(reader.read(), 2.0)
    writer.close()
    assert status_of(raw) == 413, raw
    await asyncio.sleep(0.5)  # the sweep hands lines to the writer thread
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(line["status"], line["upstream"]) for line in lines] == [(413, "web")]
    assert server.plane is not None and sum(server.plane.unrouted) == 0


@pytest.mark.parametrize("client", ["ends its side", "goes quiet", "goes on sending"])
async def test_lingering_close_ends(
    raw_backend: StartRaw, proxy: StartProxy, client: str
) -> None:
    """How long a refused client is read after its answer: until it ends its side, until it
    is quiet for lingering_timeout, and at most for lingering_time."""
    server = await proxy(
        single_upstream_config(
            [await raw_backend(CountingBackend())],
            top_extra="limits: {max_body_bytes: 1KiB, lingering_timeout: 400ms,"
            " lingering_time: 1200ms}\n",
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 2.0)
    assert status_of(raw) == 413
    sending: asyncio.Task[None] | None = None
    if client == "ends its side":
        writer.write_eof()
        assert await until_gone(server, 0.3) < 0.3
    elif client == "goes quiet":
        assert await until_gone(server, 1.0) > 0.3  # 400 ms, give or take the 200 ms sweep
    else:
        sending = asyncio.create_task(send_until_stopped(writer, b"x" * 100, pause=0.1))
        assert await until_gone(server, 2.0) > 1.0
    if sending is not None:
        sending.cancel()
    writer.close()


async def test_client_ending_its_side_mid_body_gets_400_and_the_backend_is_not_blamed(
    counted: tuple[CountingBackend, ProxyServer],
) -> None:
    _, server = counted
    for body_start in (
        b"Content-Length: 10\r\n\r\nabc",
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ):
        for _ in range(2):  # the second time on the pooled connection the first one left
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\n" + body_start)
            writer.write_eof()
            raw = await asyncio.wait_for(reader.read(), 2.0)
            writer.close()
            assert status_of(raw) == 400, raw
            assert b"before the request body was complete" in raw
    assert failures_counted(server) == 0


async def test_stalled_request_body_gets_408_and_the_backend_is_not_blamed(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    backend = CountingBackend()
    server = await proxy(
        single_upstream_config(
            [await raw_backend(backend)],
            upstream_extra="    timeouts: {read: 5s}\n",
            top_extra="limits: {body_timeout: 500ms}\n",
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    raw = await asyncio.wait_for(reader.read(), 3.0)  # the proxy closes after its answer
    writer.close()
    assert status_of(raw) == 408, raw
    assert b"request body not received in time" in raw
    assert failures_counted(server) == 0


async def test_a_slow_upload_is_not_a_slow_backend(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A client that sends its body in pieces, each pause longer than the backend's read and
    per-try timeouts but within `body_timeout`: the backend, waiting for the body, is not timed
    out (those timeouts start once the body is sent), and the request succeeds first time."""
    backend = CountingBackend()
    server = await proxy(
        single_upstream_config(
            [await raw_backend(backend)],
            upstream_extra="    timeouts: {read: 300ms}\n"
            "    retry: {attempts: 2, per_try_timeout: 300ms}\n",
            top_extra="limits: {body_timeout: 3s}\n",
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n")
    for piece in (b"a" * 10, b"b" * 10, b"c" * 10):
        await asyncio.sleep(0.7)
        writer.write(piece)
    raw = await asyncio.wait_for(read_one_response(reader), 3.0)
    writer.close()
    assert status_of(raw) == 200, raw
    assert len(backend.heads) == 1  # not retried
    assert failures_counted(server) == 0


async def test_backend_that_stops_reading_the_body_is_the_one_timed_out(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """The other side of the stalled-body rule: here the client is held back by the proxy
    because the backend stopped reading, so the timeout is the backend's (504)."""
    stopped = asyncio.Event()

    async def never_reads_the_body(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        stopped.set()
        await asyncio.sleep(10)

    server = await proxy(
        single_upstream_config(
            [await raw_backend(never_reads_the_body)],
            upstream_extra="    timeouts: {read: 500ms}\n    retry: {attempts: 1}\n",
        )
    )
    size = 32 * 1024 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)

    async def send_body() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()

    sending = asyncio.create_task(send_body())
    raw = await asyncio.wait_for(reader.read(), 5.0)  # no reset: the close lingers
    sending.cancel()
    writer.close()
    assert stopped.is_set()
    assert status_of(raw) == 504, raw[:200]
    assert failures_counted(server) == 1  # the backend is blamed


def download_backend(size: int) -> RawHandler:
    """Answers every request with `size` body bytes, as fast as the proxy takes them."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // 65536):
                writer.write(b"z" * 65536)
                await writer.drain()

    return handler


async def test_a_client_that_stops_reading_holds_the_backend_back_without_blaming_it(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A client that stops reading a download pauses the backend (back-pressure). The backend,
    silent only because the proxy stopped reading it, is not timed out: when the client reads
    on, four read timeouts later, it gets the whole body, and no failure is counted."""
    size = 16 * 1024 * 1024
    server = await proxy(
        single_upstream_config(
            [await raw_backend(download_backend(size))],
            upstream_extra="    timeouts: {read: 500ms}\n    retry: {attempts: 1}\n",
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=65536)
    writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    received = len(await reader.read(65536))
    await asyncio.sleep(2.0)  # the proxy's buffer for this client fills, and the backend waits
    while received < size:
        chunk = await asyncio.wait_for(reader.read(1024 * 1024), 5.0)
        assert chunk, f"cut off after {received} of {size} bytes"
        received += len(chunk)
    writer.close()
    assert failures_counted(server) == 0


async def test_a_client_that_reads_nothing_more_is_dropped_after_send_timeout(
    raw_backend: StartRaw, proxy: StartProxy, tmp_path: Path
) -> None:
    """A client that never reads on is dropped once the proxy's buffer for it has stayed full
    for `send_timeout` (nginx's send_timeout), whatever the backend's read timeout; the
    request is recorded as the client's (499), and the backend is not blamed."""
    log_file = tmp_path / "access.log"
    server = await proxy(
        single_upstream_config(
            [await raw_backend(download_backend(64 * 1024 * 1024))],
            upstream_extra="    timeouts: {read: 300ms}\n    retry: {attempts: 1}\n",
            top_extra=f"limits: {{send_timeout: 1500ms}}\naccess_log: {{path: '{log_file}'}}\n",
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=65536)
    writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    held = await until_gone(server, 5.0)  # reading nothing more from here on
    writer.close()
    assert 1.4 <= held <= 3.0, held
    assert failures_counted(server) == 0
    await asyncio.sleep(0.5)  # the sweep hands lines to the writer thread
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(line["status"], line["backend"]) for line in lines] == [(499, "b0")]


async def test_a_closing_connection_the_client_does_not_read_is_dropped_after_send_timeout(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A response that closes the connection, all of it in the proxy but not taken by a
    client that reads nothing: the proxy waits `send_timeout` for the client to take the rest,
    not for ever. (The client connection's transport is given a buffer larger than the
    response, so the whole of it is in the proxy when the connection closes.)"""
    size = 8 * 1024 * 1024  # more than the kernel buffers between the proxy and the client
    server = await proxy(
        single_upstream_config(
            [await raw_backend(download_backend(size))],
            top_extra="limits: {send_timeout: 1s, lingering_timeout: 200ms}\n",
        )
    )
    assert server.plane is not None
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, ("127.0.0.1", server.port))
    for _ in range(200):  # accepted in this loop, soon
        if server.plane.connections:
            break
        await asyncio.sleep(0.01)
    (connection,) = server.plane.connections
    assert connection.transport is not None
    connection.transport.set_write_buffer_limits(high=2 * size)
    await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        held = await until_gone(server, 5.0)  # the client reads nothing
    finally:
        client.close()
    assert 1.0 <= held <= 3.0, held


async def test_malformed_backend_response_is_a_backend_failure_retried_elsewhere(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A response llhttp refuses counts against the backend (toward its ejection) as a reset
    would, and an idempotent request is retried on a sibling instead of answered 502."""

    async def smuggler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            # Two framings at once: refused, never forwarded.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
            await writer.drain()

    async def good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    ports = [await raw_backend(smuggler), await raw_backend(good)]
    server = await proxy(single_upstream_config(
        ports, "    outlier: {consecutive_failures: 2, base_ejection: 30s}\n"
               "    retry: {attempts: 2}\n"))
    for _ in range(6):
        raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                until_close=False)
        assert status_of(raw) == 200 and raw.endswith(b"ok"), raw
    bad = server.topology.backend("web", "b0")
    assert bad is not None and bad.state == "ejected", bad.reason
    attempts = server.store.attempts[("web", "aws", "b0", f"127.0.0.1:{ports[0]}")]
    assert attempts[ATTEMPT_OUTCOMES.index("bad_response")] == 2
