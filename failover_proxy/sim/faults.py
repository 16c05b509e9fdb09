"""Simulated backends whose failure mode can be switched while traffic flows through the proxy.

Each is a real HTTP/1.1 server on a loopback port (raw asyncio, so it can misbehave in ways an
HTTP library would not allow) that answers JSON naming its provider, region and backend, and
records the requests it receives (the latest RECORDED of them). The demo, the failover tests,
the soak and the failover benchmark all break providers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass, field

_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

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
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode()
                method, path, _ = request_line.split(" ", 2)
                body = await read_request_body(reader, head)
                lower = head.lower()
                if path == "/healthz":
                    self.probed.append(time.monotonic())
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
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(
        self, writer: asyncio.StreamWriter, method: str, path: str, request_id: str, size: int
    ) -> bool:
        mode = self.mode
        if mode == "flapping":
            self._flip = not self._flip
            mode = "5xx" if self._flip else "healthy"
        body = (
            json.dumps(
                {
                    "provider": self.provider,
                    "region": self.region,
                    "backend": self.name,
                    "method": method,
                    "path": path,
                    "request_id": request_id,
                    "body_bytes": size,
                }
            )
            + "\n"
        ).encode()
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
