"""Direct socket writes (writepath.py, _direct.c): the bytes and their order are what the
transport's own write would give, whether the socket takes them at once or not; a detached
writer (a connection closing or lost) never writes around the transport; a reset connection
ends through the transport as before; TLS connections keep using the transport.

The writer is exercised on real uvloop TCP transports over loopback, with a client that stops
reading to fill the socket's buffers, and through the real proxy."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest
from aiohttp import web

from failover_proxy.dataplane.io import writepath
from failover_proxy.dataplane.io.writepath import write_path
from failover_proxy.process.server import ProxyServer

from .conftest import hello_exchanges, tls_contexts

# A plain-Python build (FAILOVER_PROXY_PURE=1) has no C extension and writes via the transport.
DirectWriter = pytest.importorskip("failover_proxy.dataplane.io._direct").DirectWriter

StartApp = Callable[[web.Application], Awaitable[int]]
StartProxy = Callable[[str], Awaitable[ProxyServer]]


class _Recorder(asyncio.Protocol):
    """A server-side connection: keeps its transport and the flow-control calls it got."""

    def __init__(self, made: asyncio.Future[_Recorder]) -> None:
        self.made = made
        self.transport: asyncio.Transport | None = None
        self.paused = 0
        self.resumed = 0
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.made.set_result(self)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class _Pair:
    """A server transport on uvloop and the raw client socket it talks to."""

    def __init__(self, server: _Recorder, client: socket.socket) -> None:
        self.server = server
        self.client = client
        assert server.transport is not None
        self.transport = server.transport

    def writer(self) -> DirectWriter:
        send, _ = write_path(self.transport)
        assert isinstance(send, DirectWriter), "a plain TCP transport gets a DirectWriter"
        return send

    async def read_all(self, expected: int) -> bytes:
        """What the client receives, until `expected` bytes or the end."""
        loop = asyncio.get_running_loop()
        received = bytearray()
        while len(received) < expected:
            chunk = await asyncio.wait_for(loop.sock_recv(self.client, 1 << 16), 10)
            if not chunk:
                break
            received += chunk
        return bytes(received)


@pytest.fixture
async def pair() -> AsyncIterator[_Pair]:
    loop = asyncio.get_running_loop()
    made: asyncio.Future[_Recorder] = loop.create_future()
    server = await loop.create_server(lambda: _Recorder(made), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", port))
    recorder = await asyncio.wait_for(made, 5)
    yield _Pair(recorder, client)
    client.close()
    if recorder.transport is not None:
        recorder.transport.abort()
    server.close()
    await server.wait_closed()


def _fill_until_refused(pair: _Pair, writer: DirectWriter) -> bytes:
    """Write until the socket takes less than a whole write (the client is not reading), so the
    rest waits in the transport; the bytes written, in order."""
    sock = pair.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    written = bytearray()
    for index in range(1000):
        piece = bytes([65 + index % 26]) * 262144  # more than the transport's high-water mark
        writer(piece)
        written += piece
        if pair.transport.get_write_buffer_size():
            return bytes(written)
    raise AssertionError("the socket never refused a write")


def _read_while_the_loop_waits(client: socket.socket) -> bytes:
    """What the client can read within 0.1 s, read without letting the event loop run (this
    blocks it on purpose)."""
    early = bytearray()
    for _ in range(5):
        time.sleep(0.02)
        with contextlib.suppress(BlockingIOError):
            while chunk := client.recv(1 << 16):
                early += chunk
    return bytes(early)


async def test_tcp_transports_have_nagle_off_already(pair: _Pair) -> None:
    """write_path relies on uvloop's TCP transports setting TCP_NODELAY themselves, accepted
    and connected alike: a response head written before its body must not wait for an ACK."""
    listener = socket.create_server(("127.0.0.1", 0))
    outgoing, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, *listener.getsockname()
    )
    try:
        for transport in (pair.transport, outgoing):
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        outgoing.close()
        listener.close()


async def test_writes_the_socket_takes_whole_skip_the_transport(pair: _Pair) -> None:
    writer = pair.writer()
    writer(b"HTTP/1.1 200 OK\r\n")
    writer.writelines((b"content-length: 2\r\n", b"\r\n", b"ok"))
    writer(b"")
    writer.writelines((b"", b""))
    expected = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert await pair.read_all(len(expected)) == expected
    assert (writer.direct_writes, writer.handed_over) == (2, 0)
    assert pair.transport.get_write_buffer_size() == 0


async def test_what_the_socket_refuses_waits_in_the_transport_and_keeps_its_order(
    pair: _Pair,
) -> None:
    """A client that stops reading: the unwritten end goes to the transport, which applies flow
    control (pause_writing); later writes queue behind it, whole or in parts, and once the
    client has read everything, writes go straight to the socket again."""
    writer = pair.writer()
    written = _fill_until_refused(pair, writer)
    handed = writer.handed_over
    assert handed >= 1
    assert pair.server.paused == 1, "the transport's flow control still pauses the writer"
    # The client reads some, so the socket has room again, while the event loop (which would
    # move the transport's bytes to the socket) does not run: a direct write now would overtake
    # them.
    early = _read_while_the_loop_waits(pair.client)
    assert early, "the client read some"
    writer(b"<after>")
    writer.writelines((b"<part one>", b"<part two>"))
    assert writer.handed_over == handed + 2, "nothing overtakes the bytes the transport holds"
    tail = b"<after><part one><part two>"
    received = early + await pair.read_all(len(written) + len(tail) - len(early))
    assert received == written + tail
    for _ in range(100):
        if pair.transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.01)
    assert pair.server.resumed == 1
    direct = writer.direct_writes
    writer(b"<direct again>")
    assert writer.direct_writes == direct + 1
    assert await pair.read_all(14) == b"<direct again>"


async def test_a_part_write_hands_over_the_rest_of_its_parts_in_order(pair: _Pair) -> None:
    """writelines with parts bigger than the socket takes: the write stops inside some part, and
    that part's end and every later part reach the client after it, each once."""
    sock = pair.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    parts = (b"<head>", *(bytes([97 + index]) * 300_000 for index in range(5)))
    writer = pair.writer()
    writer.writelines(parts)
    assert writer.handed_over == 1
    assert pair.transport.get_write_buffer_size() > 0
    expected = b"".join(parts)
    assert await pair.read_all(len(expected)) == expected


async def test_a_detached_writer_never_writes_around_the_transport(pair: _Pair) -> None:
    """Once detached (as the data plane's protocols do before they close a transport, and in
    connection_lost), writes go to the transport (which drops them after close) and never to
    the descriptor: after the close, its number is reused by the next socket, which must not
    receive them."""
    writer = pair.writer()
    old_fd = pair.transport.get_extra_info("socket").fileno()
    writer.detach()
    assert writer.detached
    pair.transport.close()
    with contextlib.suppress(RuntimeError):
        writer(b"after close")
    await asyncio.wait_for(pair.server.lost, 5)
    assert await pair.read_all(1) == b"", "the client sees the end and nothing written after it"
    # The descriptor is closed now: the lowest free number goes to the next socket.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    newcomers = [socket.create_connection(listener.getsockname())]
    accepted = [listener.accept()[0]]
    try:
        reused = [s for s in (*newcomers, *accepted, listener) if s.fileno() == old_fd]
        assert reused, "the closed descriptor's number went to a new socket"
        with contextlib.suppress(RuntimeError):
            writer(b"leak")
        with contextlib.suppress(RuntimeError):
            writer.writelines((b"le", b"ak"))
        for sock in (*newcomers, *accepted):
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(16)
        assert writer.direct_writes == 0
    finally:
        for sock in (*newcomers, *accepted, listener):
            sock.close()


async def test_a_reset_connection_is_ended_by_the_transport_without_raising(pair: _Pair) -> None:
    """The client resets the connection while the server is not reading (so only a write can
    find out): the direct write fails, the transport's own write meets the same error and ends
    the connection as it always does (connection_lost with the error), and the writer's caller
    sees no exception."""
    writer = pair.writer()
    pair.transport.pause_reading()
    pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pair.client.close()
    await asyncio.sleep(0.05)  # the reset arrives
    writer(b"to nobody")
    writer.writelines((b"to ", b"nobody"))
    lost = await asyncio.wait_for(pair.server.lost, 5)
    assert isinstance(lost, ConnectionError), lost
    assert writer.direct_writes == 0


async def test_tls_connections_and_plain_python_builds_write_through_the_transport(
    pair: _Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    server_context, client_context = tls_contexts()
    made: asyncio.Future[_Recorder] = loop.create_future()
    server = await loop.create_server(
        lambda: _Recorder(made), "127.0.0.1", 0, ssl=server_context
    )
    port = server.sockets[0].getsockname()[1]
    reader, client = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
    )
    try:
        recorder = await asyncio.wait_for(made, 5)
        assert recorder.transport is not None
        send, send_parts = write_path(recorder.transport)
        assert not isinstance(send, DirectWriter)
        send(b"encrypted ")
        send_parts((b"as ", b"ever"))
        assert await asyncio.wait_for(reader.readexactly(17), 5) == b"encrypted as ever"
    finally:
        client.close()
        server.close()
        await server.wait_closed()

    monkeypatch.setattr(writepath, "DirectWriter", None)
    send, _ = write_path(pair.transport)
    assert send == pair.transport.write


async def test_the_proxy_writes_small_exchanges_straight_to_both_sockets(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    """Through the real proxy: the client's and the backend's connections get DirectWriters,
    and small requests and their responses go out without the transports."""
    _, client_side, backend_side = await hello_exchanges(aiohttp_backend, proxy)
    for writers in ([conn.send for conn in client_side], [conn.send for conn in backend_side]):
        assert len(writers) == 1 and isinstance(writers[0], DirectWriter)
        assert (writers[0].direct_writes, writers[0].handed_over) == (3, 0)


async def test_the_proxy_stops_direct_reads_and_writes_when_a_connection_ends(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    """Through the real proxy: a client connection that ended, and a backend connection the
    proxy closed, have their writer detached and their reader out of the set, so neither can
    touch the descriptor once uvloop closes it; a connection still open keeps both."""
    _, client_side, backend_side = await hello_exchanges(aiohttp_backend, proxy)
    (downstream,) = client_side  # its client has closed: the proxy closed its side
    (upstream,) = backend_side  # idle in the pool, open
    for _ in range(200):
        if downstream.closed:
            break
        await asyncio.sleep(0.01)
    assert downstream.closed and downstream.send.detached and not downstream.reading.registered
    assert not upstream.send.detached and upstream.reading.registered
    upstream.close()  # as the pool closes an idle connection
    assert upstream.send.detached and not upstream.reading.registered


async def test_a_failed_read_detaches_before_the_transport_is_aborted(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    """A read that fails (the path a reset takes) ends the connection with its writer detached
    and its reader out of the set at once, not only later in connection_lost: nothing written
    in between goes around the aborted transport."""
    _, _, backend_side = await hello_exchanges(aiohttp_backend, proxy)
    (upstream,) = backend_side  # idle in the pool, open
    assert not upstream.send.detached and upstream.reading.registered
    upstream.read_failed(ConnectionResetError("reset by the test"))
    assert upstream.send.detached and not upstream.reading.registered
    assert upstream.transport is not None and upstream.transport.is_closing()
    for _ in range(200):
        if upstream.closed:
            break
        await asyncio.sleep(0.01)
    assert upstream.closed  # connection_lost followed
