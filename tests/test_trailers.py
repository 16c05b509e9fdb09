"""Trailer fields, end to end on raw sockets: a chunked response's trailers reach an HTTP/1.1
client that sent `TE: trailers` (the proxy asks for them on its own hop), and are dropped for
one that did not; a chunked request's trailers reach the backend. Fields that must not travel
after a body (framing, routing, connection fields) are dropped either way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from failover_proxy.process.server import ProxyServer

from .conftest import RawHandler, read_request_head, single_upstream_config

StartRaw = Callable[[RawHandler], Awaitable[int]]
StartProxy = Callable[[str], Awaitable[ProxyServer]]

TRAILERS = (
    b"Grpc-Status: 0\r\nHost: elsewhere.example\r\nChecksum: abc123\r\n"
    b"Connection: close\r\nX-Request-Id: forged\r\n"
)
"""What bodies end with: two fields to pass on, and three that must not travel after a body
(llhttp itself refuses Content-Length and, in requests, Transfer-Encoding there)."""
PASSED_ON = [b"Grpc-Status: 0", b"Checksum: abc123"]


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes, list[bytes]]:
    """A head, its chunked body and its trailer lines, read off a stream."""
    head = await read_request_head(reader)
    body = b""
    while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) != 0:
        body += (await reader.readexactly(size + 2))[:-2]
    trailers = []
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        trailers.append(line[:-2])
    return head, body, trailers


async def test_response_trailers_reach_a_client_that_takes_them(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    heads: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            heads.append(await read_request_head(reader))
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n" + TRAILERS + b"\r\n"
            )
            await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(backend)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /with HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        head, body, trailers = await asyncio.wait_for(read_chunked(reader), 5)
        writer.write(b"GET /without HTTP/1.1\r\nHost: x\r\n\r\n")
        _, again, dropped = await asyncio.wait_for(read_chunked(reader), 5)
        writer.write(b"GET /again HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        *_, third = await asyncio.wait_for(read_chunked(reader), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in head
    assert body == again == b"hello world"
    assert trailers == third == PASSED_ON  # framing and connection fields dropped
    assert dropped == []  # a client that did not send TE: trailers gets none
    # TE is hop-by-hop: the proxy asks for trailers on its own hop, for a client that takes them.
    assert [h.lower().count(b"\r\nte: trailers\r\n") for h in heads] == [1, 0, 1], heads


async def test_request_trailers_reach_the_backend(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    got: asyncio.Queue[tuple[bytes, bytes, list[bytes]]] = asyncio.Queue()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await got.put(await read_chunked(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    # Streamed as it comes (no buffering), and read whole first: both paths end with trailers.
    for buffering in ("false", "true"):
        server = await proxy(single_upstream_config(
            [await raw_backend(backend)], f"    request_buffering: {{enabled: {buffering}}}\n"
        ))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # the body's end and trailers in a later read
            writer.write(b"0\r\n" + TRAILERS + b"\r\n")
            response = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        finally:
            writer.close()
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        head, body, trailers = await asyncio.wait_for(got.get(), 5)
        assert head.startswith(b"POST /up HTTP/1.1\r\n") and body == b"abc"
        assert trailers == PASSED_ON, buffering


async def test_oversized_request_trailers_are_refused(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_chunked(reader)

    server = await proxy(single_upstream_config(
        [await raw_backend(backend)], top_extra="limits: {max_header_bytes: 1024}\n"
    ))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\n" + b"X-Big: " + b"y" * 2000 + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
