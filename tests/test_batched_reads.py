"""Batched socket reads (readpath.py, _reads.c): once a Reader takes over a connection's reading
from its transport, bytes arrive in order and whole, pause and resume hold and release them, the
end of the stream, a reset and an exception in data_received end the connection as uvloop would,
a closing transport is never read, a descriptor number reused by a new connection keeps the new
registration, and TLS connections keep reading through the transport.

Everything runs on real uvloop TCP transports over loopback (a raw client socket on the other
end) and through the real proxy."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httpx
import pytest
from aiohttp import web

from failover_proxy.dataplane.io import readpath
from failover_proxy.dataplane.io.connio import ConnectionIO
from failover_proxy.dataplane.io.readpath import TransportReading
from failover_proxy.process.server import ProxyServer

from .conftest import hello_exchanges, tls_contexts

# A plain-Python build (FAILOVER_PROXY_PURE=1) has no C extension and reads via the transport.
Reader = pytest.importorskip("failover_proxy.dataplane.io._reads").Reader

StartApp = Callable[[web.Application], Awaitable[int]]
StartProxy = Callable[[str], Awaitable[ProxyServer]]


class _Server(asyncio.Protocol):
    """A server-side connection reading through its ConnectionIO, as the data plane's protocols
    do."""

    def __init__(
        self,
        made: asyncio.Queue[_Server],
        keep_open: bool = False,
        pause_at_once: bool = False,
        detach_when_lost: bool = True,
    ) -> None:
        self.made = made
        self.keep_open = keep_open
        self.pause_at_once = pause_at_once
        self.detach_when_lost = detach_when_lost
        self.received = bytearray()
        self.eofs = 0
        self.failures: list[BaseException] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.io = ConnectionIO(
            self.transport, self.data_received, self.eof_received, self.read_failed
        )
        self.reading = self.io.reading
        if self.pause_at_once:
            self.reading.pause()
        # As soon as uvloop has started the transport reading (after this returns); the proxy
        # takes over later, once a connection is kept alive after an exchange.
        asyncio.get_running_loop().call_soon(self.reading.take_over)
        self.made.put_nowait(self)

    def data_received(self, data: bytes) -> None:
        self.received += data
        if b"boom" in data:
            raise ValueError("boom")

    def eof_received(self) -> bool:
        self.eofs += 1
        return self.keep_open

    def read_failed(self, exc: BaseException) -> None:
        self.failures.append(exc)
        self.io.fail(self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.detach_when_lost:
            self.reading.detach()
        if not self.lost.done():
            self.lost.set_result(exc)

    @property
    def reader(self) -> Any:
        assert isinstance(self.reading, Reader), "a plain TCP transport gets a Reader"
        return self.reading

    @property
    def fd(self) -> int:
        return int(self.transport.get_extra_info("socket").fileno())

    async def taken_over(self) -> Any:
        for _ in range(100):
            if self.reader.taken_over:
                return self.reader
            await asyncio.sleep(0)
        raise AssertionError("the Reader never took over")

    async def wait_for_bytes(self, expected: bytes) -> None:
        for _ in range(500):
            if len(self.received) >= len(expected):
                break
            await asyncio.sleep(0.01)
        assert bytes(self.received) == expected


class _Listener:
    """A uvloop server whose connections are _Server protocols, and raw clients for it."""

    def __init__(self, server: asyncio.Server, made: asyncio.Queue[_Server]) -> None:
        self.server = server
        self.made = made
        self.port: int = server.sockets[0].getsockname()[1]
        self.clients: list[socket.socket] = []
        self.options: dict[str, bool] = {}

    async def connect(self) -> tuple[socket.socket, _Server]:
        client = socket.socket()
        self.clients.append(client)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", self.port))
        return client, await asyncio.wait_for(self.made.get(), 5)


async def _receive(client: socket.socket, size: int = 16) -> bytes:
    """What the raw client reads next (b"" at the end), without blocking the event loop."""
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, size), 5)


async def _send(client: socket.socket, data: bytes) -> None:
    await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(client, data), 10)


@pytest.fixture
async def listener() -> AsyncIterator[_Listener]:
    made: asyncio.Queue[_Server] = asyncio.Queue()
    holder: list[_Listener] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: _Server(made, **holder[0].options), "127.0.0.1", 0
    )
    holder.append(_Listener(server, made))
    yield holder[0]
    for client in holder[0].clients:
        client.close()
    server.close()
    await server.wait_closed()


async def _held_until_resumed(client: socket.socket, server: _Server, reader: Any) -> None:
    """Bytes the client sends to a paused reader wait until it resumes."""
    await _send(client, b"held")
    await asyncio.sleep(0.1)
    assert server.received == b""
    reader.resume()
    await server.wait_for_bytes(b"held")


def _send_while_the_loop_waits(messages: list[tuple[socket.socket, bytes]]) -> None:
    """Send small messages (taken at once), then wait without letting the event loop run (this
    blocks it on purpose), so every socket is ready when the loop looks next."""
    for client, message in messages:
        client.send(message)
    time.sleep(0.05)


def _closing(index: int) -> dict[str, str]:
    return {"connection": "close"} if index % 2 else {}


def _read_loop() -> Any:
    return readpath.read_loop(asyncio.get_running_loop())


async def test_sockets_ready_together_are_read_in_one_batch(listener: _Listener) -> None:
    pairs = [await listener.connect() for _ in range(8)]
    for _, server in pairs:
        await server.taken_over()
        assert not server.transport.is_reading(), "the transport no longer reads"
        assert server.reading.is_reading()
    reads = _read_loop()
    batches, done = reads.batches, reads.reads
    _send_while_the_loop_waits([(client, b"hello %d" % i) for i, (client, _) in enumerate(pairs)])
    for index, (_, server) in enumerate(pairs):
        await server.wait_for_bytes(b"hello %d" % index)
    assert reads.reads - done == 8
    assert reads.batches - batches == 1


async def test_bytes_keep_their_order_across_the_take_over(listener: _Listener) -> None:
    """Bytes sent before the Reader takes over are read by the transport; later ones by the
    Reader; the protocol sees them all once, in order."""
    client, server = await listener.connect()
    await _send(client, b"first;")
    await server.taken_over()
    await _send(client, b"second;")
    payload = bytes(range(256)) * 4096  # 1 MiB: many reads
    await _send(client, payload)
    await server.wait_for_bytes(b"first;second;" + payload)


async def test_pause_holds_the_bytes_until_resume(listener: _Listener) -> None:
    client, server = await listener.connect()
    reader = await server.taken_over()
    reader.pause()
    assert not reader.is_reading() and not reader.registered
    await _held_until_resumed(client, server, reader)


async def test_a_connection_paused_before_the_take_over_stays_paused(
    listener: _Listener,
) -> None:
    listener.options = {"pause_at_once": True}
    client, server = await listener.connect()
    reader = await server.taken_over()
    assert not reader.registered and not server.transport.is_reading()
    await _held_until_resumed(client, server, reader)


async def test_the_end_of_the_stream_closes_unless_the_protocol_keeps_it_open(
    listener: _Listener,
) -> None:
    listener.options = {"keep_open": True}
    client, half_open = await listener.connect()
    await half_open.taken_over()
    await _send(client, b"request")
    client.shutdown(socket.SHUT_WR)
    await half_open.wait_for_bytes(b"request")
    for _ in range(100):
        if half_open.eofs:
            break
        await asyncio.sleep(0.01)
    assert half_open.eofs == 1 and not half_open.transport.is_closing()
    assert not half_open.reader.registered, "nothing more to read"
    half_open.transport.write(b"answer")
    assert await _receive(client) == b"answer"
    half_open.transport.close()
    assert await _receive(client) == b""

    listener.options = {}
    client, closing = await listener.connect()
    await closing.taken_over()
    client.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(closing.lost, 5) is None
    assert closing.eofs == 1 and await _receive(client) == b""


async def test_a_reset_fails_the_read_and_ends_the_connection(listener: _Listener) -> None:
    client, server = await listener.connect()
    await server.taken_over()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    await asyncio.wait_for(server.lost, 5)
    assert len(server.failures) == 1 and isinstance(server.failures[0], ConnectionResetError)
    assert not server.reader.registered


async def test_an_exception_in_data_received_is_logged_and_aborts(listener: _Listener) -> None:
    loop = asyncio.get_running_loop()
    logged: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: logged.append(context))
    client, server = await listener.connect()
    await server.taken_over()
    await _send(client, b"boom")
    await asyncio.wait_for(server.lost, 5)
    assert [type(exc) for exc in server.failures] == [ValueError]
    assert len(logged) == 1 and isinstance(logged[0]["exception"], ValueError)
    assert "data_received" in logged[0]["message"] and logged[0]["protocol"] is server
    assert await _receive(client) == b"", "aborted"


async def test_a_closing_transport_is_not_read(listener: _Listener) -> None:
    """close() with bytes still unsent keeps the socket open until they are flushed; bytes the
    client sends meanwhile are not delivered (as uvloop stops reading at close()): the protocol
    detaches its reading before it closes, as the data plane's protocols do."""
    client, server = await listener.connect()
    reader = await server.taken_over()
    server.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
    )
    server.transport.write(b"x" * 16_000_000)  # the client is not reading: most of it waits
    assert server.transport.get_write_buffer_size() > 0
    server.reading.detach()
    server.transport.close()
    await _send(client, b"too late")
    await asyncio.sleep(0.1)
    assert server.received == b""
    assert not reader.registered and not server.lost.done(), "open until flushed, unread"
    client.close()


async def test_a_reused_descriptor_number_keeps_the_new_registration(
    listener: _Listener,
) -> None:
    """A socket closed under its Reader (before connection_lost tells the protocol) leaves
    the set; when a new connection's Reader registers the same number, the old Reader's later
    pause or detach must not take the new socket out of the set."""
    listener.options = {"detach_when_lost": False}
    _, old = await listener.connect()
    old_reader = await old.taken_over()
    old_fd = old.fd
    listener.options = {}
    client = socket.socket()  # created first, so the new server socket gets the freed number
    listener.clients.append(client)
    old.transport.abort()  # the descriptor is closed once connection_lost (no detach) returns
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", listener.port))
    new = await asyncio.wait_for(listener.made.get(), 5)
    assert new.fd == old_fd, "the new connection got the old descriptor's number"
    new_reader = await new.taken_over()
    assert new_reader.registered and not old_reader.registered
    old_reader.pause()
    old_reader.detach()
    await _send(client, b"still read")
    await new.wait_for_bytes(b"still read")


async def test_a_socket_the_set_cannot_take_keeps_reading_through_the_transport(
    listener: _Listener,
) -> None:
    reads = _read_loop()
    asyncio.get_running_loop().remove_reader(reads.fileno())
    reads.close()  # registering now fails
    try:
        client, server = await listener.connect()
        for _ in range(100):
            if server.reader.fallbacks:
                break
            await asyncio.sleep(0)
        assert server.reader.fallbacks == 1 and not server.reader.taken_over
        assert server.transport.is_reading()
        await _send(client, b"through uvloop")
        await server.wait_for_bytes(b"through uvloop")
        server.reading.pause()
        assert not server.transport.is_reading()
    finally:
        readpath._read_loops.pop(asyncio.get_running_loop(), None)


async def test_tls_connections_and_plain_python_builds_read_through_the_transport(
    listener: _Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    server_context, client_context = tls_contexts()
    made: asyncio.Queue[_Server] = asyncio.Queue()
    server = await loop.create_server(lambda: _Server(made), "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
    )
    try:
        tls = await asyncio.wait_for(made.get(), 5)
        assert isinstance(tls.reading, TransportReading)
        writer.write(b"encrypted")
        await tls.wait_for_bytes(b"encrypted")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        server.close()
        await server.wait_closed()

    monkeypatch.setattr(readpath, "Reader", None)
    client, plain = await listener.connect()
    assert isinstance(plain.reading, TransportReading)
    await _send(client, b"plain")
    await plain.wait_for_bytes(b"plain")


async def test_the_proxy_reads_both_sides_through_readers(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    reads = _read_loop()
    before = reads.reads
    _, client_side, backend_side = await hello_exchanges(aiohttp_backend, proxy)
    for readings in ([conn.reading for conn in client_side], [c.reading for c in backend_side]):
        assert len(readings) == 1 and isinstance(readings[0], Reader)
        assert readings[0].taken_over and readings[0].registered
    # Each side's first read may come before the take-over; the other four are batched.
    assert reads.reads - before >= 4


async def test_no_registration_outlives_its_connection(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    """Clients come and go through the proxy, half of them closed by the proxy (Connection:
    close), half by themselves: once they are gone, the set holds exactly the backend
    connections resting in the pool (read for a backend's close), nothing else."""
    server, _, backend_side = await hello_exchanges(aiohttp_backend, proxy)
    assert server.plane is not None
    plane, pool = server.plane, backend_side[0].connector
    for _ in range(3):
        clients = [httpx.AsyncClient() for _ in range(20)]
        for response in await asyncio.gather(*(
            client.get(f"http://127.0.0.1:{server.port}/", headers=_closing(index))
            for index, client in enumerate(clients)
        )):
            assert response.text == "hello"
        for client in clients:
            await client.aclose()
    for _ in range(200):
        if not plane.connections:
            break
        await asyncio.sleep(0.01)
    assert not plane.connections
    assert _read_loop().registered == len(pool.idle) > 0


async def test_a_connection_that_serves_one_request_is_never_registered(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    """The proxy takes a connection's reading over only once it is kept alive: a client that
    sends one request with Connection: close is read by its transport alone, so it costs no
    epoll registration. The backend connection, kept in the pool, is taken over."""
    server, _, backend_side = await hello_exchanges(aiohttp_backend, proxy)
    reads = _read_loop()
    before = reads.reads
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"http://127.0.0.1:{server.port}/", headers={"connection": "close"}
        )
        assert response.text == "hello"
    assert server.plane is not None
    for _ in range(200):
        if not server.plane.connections:
            break
        await asyncio.sleep(0.01)
    assert not server.plane.connections
    # One read in the set: the response, on the pooled backend connection taken over before.
    # The client's request went through its transport.
    assert reads.reads - before == 1
    assert reads.registered == len(backend_side) == 1
    assert backend_side[0].reading.taken_over
