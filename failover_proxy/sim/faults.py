"""Simulated backends whose failure mode can be switched while traffic flows through the proxy.

Each is a real HTTP/1.1 server on a loopback port (raw asyncio, so it can misbehave in ways an
HTTP library would not allow) that answers JSON naming its provider, region and backend, and
records the requests it receives (the latest RECORDED of them). The demo, the failover tests,
the soak and the failover benchmark all break providers with it.

The same port speaks HTTP/2 in cleartext (h2c, prior knowledge) to a client that opens with the
HTTP/2 preface, with the same failure modes per stream (the `h2` library's frames): an upstream
with `protocol: h2c` in front of it is failed over the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MODES = (
    "healthy",
    "refusing",  # the port is closed: connections are refused
    "blackhole",  # accepts and reads, never answers
    "slow",  # answers after `delay`
    "5xx",  # answers 503
    "reset_after_headers",  # sends the response head, then resets
    "reset_mid_body",  # sends half the body, then resets
    "flapping",  # alternates healthy and 503, request by request
)


async def read_request_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The body of a request whose head was just read (Content-Length or chunked, as the proxy
    frames what it sends; trailers are read and dropped)."""
    lower = head.lower()
    if b"content-length: " in lower:
        length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
        return await reader.readexactly(length)
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) != 0:
            body += (await reader.readexactly(size + 2))[:-2]
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
    return body


RECORDED = 20_000
"""Requests (and probes) a backend remembers. A bound, because the demo runs for days and the
soak sends millions: kept whole, they made the soak's own garbage collector pause for over a
second after ten minutes, long enough for every simulated provider to miss its probes."""


BACKLOG = 4096
"""Connections the kernel completes before the server accepts them. The default (100) fills
when hundreds of clients' requests are held (blackhole, slow) while the process that hosts
these backends is too busy to accept: new connections' SYNs are then dropped and time out,
which the proxy rightly reads as the backend failing, though nothing is wrong with it."""


@dataclass
class Received:
    at: float
    method: str
    path: str
    body: bytes
    request_id: str = ""
    """The proxy's X-Request-Id: joins the request to the proxy's access log."""


@dataclass
class FaultBackend:
    name: str
    provider: str
    region: str = ""
    port: int = 0
    mode: str = "healthy"
    host: str = "127.0.0.1"
    """The loopback address it listens on (several backends may share a port on 127.0.0.2,
    127.0.0.3…: the addresses one hostname resolves to)."""
    health_mode: str | None = None
    """The mode /healthz answers in, when it should differ from real requests."""
    delay: float = 0.5
    received: deque[Received] = field(default_factory=lambda: deque(maxlen=RECORDED))
    probed: deque[float] = field(default_factory=lambda: deque(maxlen=RECORDED))
    """When each /healthz request arrived (they are not in `received`)."""
    probe_protocols: Counter[str] = field(default_factory=Counter)
    """/healthz requests by the protocol they came in (`http1`, `h2`)."""
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _flip: bool = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True, backlog=BACKLOG
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        if mode == "refusing" and self._server is not None:
            await self.stop()
        elif mode != "refusing" and self._server is None:
            await self.start()
        self.mode = mode

    @property
    def open_connections(self) -> int:
        """Connections to this backend open now (the proxy's pooled ones among them)."""
        return len(self._writers)

    def requests_since(self, moment: float, path_prefix: str = "/") -> list[Received]:
        return [r for r in self.received if r.at >= moment and r.path.startswith(path_prefix)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            opening = await reader.readexactly(3)
            if opening == PREFACE[:3]:
                if await reader.readexactly(len(PREFACE) - 3) == PREFACE[3:]:
                    await self._serve_h2(reader, writer)
                return
            while True:
                head = opening + await reader.readuntil(b"\r\n\r\n")
                opening = b""
                request_line = head.split(b"\r\n", 1)[0].decode()
                method, path, _ = request_line.split(" ", 2)
                body = await read_request_body(reader, head)
                lower = head.lower()
                if path == "/healthz":
                    self.probed.append(time.monotonic())
                    self.probe_protocols["http1"] += 1
                    health_mode = self.health_mode or self.mode
                    if health_mode in ("healthy", "slow"):
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                    elif health_mode == "blackhole":
                        await asyncio.sleep(3600)
                    else:
                        writer.write(_UNAVAILABLE)
                    await writer.drain()
                    continue
                request_id = ""
                if b"x-request-id: " in lower:
                    start = lower.index(b"x-request-id: ") + 14
                    request_id = head[start : head.index(b"\r\n", start)].decode()
                self.received.append(Received(time.monotonic(), method, path, body, request_id))
                if not await self._answer(writer, method, path, request_id, len(body)):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError,
                h2.exceptions.ProtocolError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _mode_now(self) -> str:
        mode = self.mode
        if mode == "flapping":
            self._flip = not self._flip
            mode = "5xx" if self._flip else "healthy"
        return mode

    def _json(self, method: str, path: str, request_id: str, size: int) -> bytes:
        return (json.dumps({
            "provider": self.provider, "region": self.region, "backend": self.name,
            "method": method, "path": path, "request_id": request_id, "body_bytes": size,
        }) + "\n").encode()

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/2 with prior knowledge (the preface read): each stream answered as a request
        is in the current mode; the connection-level modes (blackhole, resets) act on the
        whole connection, as a failing host would."""
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        conn.initiate_connection()
        conn.receive_data(PREFACE)
        writer.write(conn.data_to_send())
        heads: dict[int, dict[bytes, bytes]] = {}
        bodies: dict[int, bytearray] = {}
        answering: set[asyncio.Task[None]] = set()
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        heads[event.stream_id] = dict(event.headers or [])
                        bodies[event.stream_id] = bytearray()
                    elif isinstance(event, h2.events.DataReceived):
                        bodies.get(event.stream_id, bytearray()).extend(event.data or b"")
                        conn.acknowledge_received_data(event.flow_controlled_length or 0,
                                                       event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        stream_id = event.stream_id
                        task = asyncio.get_running_loop().create_task(self._answer_h2(
                            conn, writer, stream_id, heads.pop(stream_id, {}),
                            bytes(bodies.pop(stream_id, b""))))
                        answering.add(task)
                        task.add_done_callback(answering.discard)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                if not writer.transport.is_closing():
                    writer.write(conn.data_to_send())
        finally:
            for task in answering:
                task.cancel()

    async def _answer_h2(self, conn: h2.connection.H2Connection, writer: asyncio.StreamWriter,
                         stream_id: int, head: dict[bytes, bytes], body: bytes) -> None:
        method = head.get(b":method", b"GET").decode()
        path = head.get(b":path", b"/").decode()

        def send(status: int, content: bytes, cut: bool = False) -> None:
            # (the proxy may have cancelled the stream meanwhile: nothing to answer)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn.send_headers(stream_id, [(b":status", b"%d" % status),
                                              (b"content-type", b"application/json"),
                                              (b"content-length", b"%d" % len(content))])
                conn.send_data(stream_id, content, end_stream=not cut)
            if not writer.transport.is_closing():
                writer.write(conn.data_to_send())

        if path == "/healthz":
            self.probed.append(time.monotonic())
            self.probe_protocols["h2"] += 1
            health_mode = self.health_mode or self.mode
            if health_mode == "blackhole":
                await asyncio.sleep(3600)
            send(200 if health_mode in ("healthy", "slow") else 503, b"ok\n")
            return
        request_id = head.get(b"x-request-id", b"").decode()
        self.received.append(Received(time.monotonic(), method, path, body, request_id))
        mode = self._mode_now()
        content = self._json(method, path, request_id, len(body))
        if mode == "blackhole":
            await asyncio.sleep(3600)
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if mode == "5xx":
            send(503, b"busy")
        elif mode == "reset_after_headers":
            send(200, b"", cut=True)
            await writer.drain()  # (no pause between the head and the reset: a busy loop's
            writer.transport.abort()  # pause would make it "a reset some time after")
        elif mode == "reset_mid_body":
            send(200, content[: len(content) // 2], cut=True)
            await writer.drain()
            writer.transport.abort()
        else:
            send(200, content)

    async def _answer(
        self, writer: asyncio.StreamWriter, method: str, path: str, request_id: str, size: int
    ) -> bool:
        mode = self._mode_now()
        body = self._json(method, path, request_id, size)
        ok = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        if mode == "blackhole":
            await asyncio.sleep(3600)
            return False
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if mode == "5xx":
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
        elif mode == "reset_after_headers":
            writer.write(ok[: ok.index(b"\r\n\r\n") + 4])
            await writer.drain()
            writer.transport.abort()
            return False
        elif mode == "reset_mid_body":
            writer.write(ok[: len(ok) - len(body) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        else:
            writer.write(ok)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return True
