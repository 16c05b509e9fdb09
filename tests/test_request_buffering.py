"""Request buffering: a body up to request_buffering.max_bytes is read whole before a backend
is dialled, so slow uploads hold client connections only, and such bodies can be retried.
Raw sockets on both sides; the backend counts the connections it accepts."""

from __future__ import annotations

import asyncio
import time

from failover_proxy.sim.faults import read_request_body

from .conftest import read_one_response, read_request_head, single_upstream_config
from .test_request_framing import StartProxy, StartRaw


class CountingBackend:
    """Counts accepted connections and records each request; answers `status` (200 unless
    told otherwise)."""

    def __init__(self, status: int = 200) -> None:
        self.accepted = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.status = status

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        while True:
            head = await read_request_head(reader)
            self.heads.append(head)
            self.bodies.append(await read_request_body(reader, head))
            answer = b"got %d" % len(self.bodies[-1])
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                         % (self.status, len(answer), answer))
            await writer.drain()


async def test_a_slow_upload_holds_no_backend_connection_until_its_body_is_read(
    proxy: StartProxy, raw_backend: StartRaw,
) -> None:
    backend = CountingBackend()
    server = await proxy(single_upstream_config([await raw_backend(backend)]))
    uploads = []
    for _ in range(20):  # twenty slow uploaders, each a tenth of the way through
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
        uploads.append((reader, writer))
    await asyncio.sleep(0.5)
    assert backend.accepted == 0 and backend.heads == []
    upstream = server.topology.upstreams["web"]
    assert upstream.active_requests == 0  # nothing in flight toward any backend yet
    for reader, writer in uploads:
        writer.write(b"b" * 900)
        answer = await asyncio.wait_for(read_one_response(reader), 5)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"got 1000")
        writer.close()
    assert all(body == b"a" * 100 + b"b" * 900 for body in backend.bodies)
    # A chunked body is buffered too; one larger than the limit streams as it comes.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n")
    await asyncio.sleep(0.3)
    heads_before = len(backend.heads)
    writer.write(b"0\r\n\r\n")
    assert (await asyncio.wait_for(read_one_response(reader), 5)).endswith(b"got 5")
    assert heads_before == 20 and len(backend.heads) == 21
    size = 200 * 1024
    writer.write(b"POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                 + b"c" * 1000)
    for _ in range(50):
        if len(backend.heads) == 22:
            break
        await asyncio.sleep(0.05)
    assert len(backend.heads) == 22  # dialled before its body arrived: it streams
    writer.write(b"c" * (size - 1000))
    assert (await asyncio.wait_for(read_one_response(reader), 5)).endswith(b"got %d" % size)
    writer.close()


async def test_a_buffered_body_is_retried_even_without_a_replay_buffer(
    proxy: StartProxy, raw_backend: StartRaw,
) -> None:
    failing, healthy = CountingBackend(status=503), CountingBackend()
    ports = [await raw_backend(failing), await raw_backend(healthy)]
    server = await proxy(single_upstream_config(
        ports, "    retry: {replay_max_bytes: 0}\n    request_buffering: {max_bytes: 32KiB}\n"
               "    policy: {strategy: priority, providers: [aws]}\n"))
    body = bytes(range(256)) * 40  # 10 KiB
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"PUT /doc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        await asyncio.sleep(0.05)  # the head first, the body after: read before dialling
        writer.write(body)
        answer = await asyncio.wait_for(read_one_response(reader), 5)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        writer.close()
    assert healthy.bodies and all(b == body for b in healthy.bodies)
    assert failing.bodies and all(b == body for b in failing.bodies)  # tried, then retried


async def test_a_stalled_body_is_408_and_never_reaches_a_backend(
    proxy: StartProxy, raw_backend: StartRaw,
) -> None:
    backend = CountingBackend()
    server = await proxy(single_upstream_config(
        [await raw_backend(backend)], top_extra="limits: {body_timeout: 500ms}\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.4 <= time.monotonic() - started < 2.0
    writer.close()
    # A client that leaves mid-body: nothing dialled, nothing left counted in flight.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.sleep(0.2)
    upstream = server.topology.upstreams["web"]
    assert backend.accepted == 0
    assert upstream.active_requests == 0 and upstream.backends[0].in_flight == 0
    counts = server.store.requests[("*/", "web", "aws", "b0")]
    assert counts[3] == 2  # 408 and 499, both recorded once


async def test_expect_continue_is_answered_by_the_proxy_when_it_buffers(
    proxy: StartProxy, raw_backend: StartRaw,
) -> None:
    backend = CountingBackend()
    server = await proxy(single_upstream_config([await raw_backend(backend)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert backend.accepted == 0
    writer.write(b"hello")
    answer = await asyncio.wait_for(read_one_response(reader), 5)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"got 5")
    writer.close()


async def test_buffering_can_be_turned_off(proxy: StartProxy, raw_backend: StartRaw) -> None:
    backend = CountingBackend()
    server = await proxy(single_upstream_config(
        [await raw_backend(backend)], "    request_buffering: {enabled: false}\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    for _ in range(50):
        if backend.accepted:
            break
        await asyncio.sleep(0.05)
    assert backend.accepted == 1  # streamed: dialled with half the body still to come
    writer.write(b"67890")
    assert (await asyncio.wait_for(read_one_response(reader), 5)).endswith(b"got 10")
    writer.close()
