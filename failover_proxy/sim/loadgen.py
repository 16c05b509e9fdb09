"""Keep-alive HTTP/1.1 clients on raw sockets that record every outcome: the load behind the
failover tests and benchmarks, light enough that hundreds of them fit beside the backends in one
process.

Each client of `KeepAliveLoad` holds one connection and sends GETs back to back (the next once
the previous response is read whole); anything but a whole 200 response is an error, recorded
with when it happened and what it was, and the client reconnects. `PacedLoad` offers a fixed
rate instead, whatever the answers, and keeps each answer's status, body and Retry-After.
`Http2Load` is `KeepAliveLoad` over HTTP/2: stream loops sharing a few connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class Sample:
    started: float
    """time.monotonic() when the request was sent."""
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class Recorded:
    """Every outcome of a load, and its stop switch."""

    samples: list[Sample] = field(default_factory=list, kw_only=True)
    _stopping: bool = field(default=False, kw_only=True)

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]

    @property
    def ok(self) -> int:
        return sum(1 for s in self.samples if s.ok)

    def since(self, moment: float) -> list[Sample]:
        return [s for s in self.samples if s.started >= moment]

    def stop(self) -> None:
        """Every client finishes the request it has in flight, then `run` returns."""
        self._stopping = True


@dataclass
class KeepAliveLoad(Recorded):
    port: int
    clients: int
    path: str = "/work"
    host: str = "127.0.0.1"
    authority: str = ""
    """The Host header (default: host:port)."""
    timeout: float = 10.0
    """Longest wait for one response: past it the request counts as an error."""

    async def run(self) -> None:
        """Until `stop()`; every client finishes the request it has in flight."""
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    async def _client(self) -> None:
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.authority or f'{self.host}:{self.port}'}\r\n"
            "User-Agent: failover-proxy-loadgen\r\n\r\n"
        ).encode()
        while not self._stopping:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout
                )
            except (OSError, TimeoutError) as exc:
                self.samples.append(Sample(time.monotonic(), 0.0, False, f"connect: {exc!r}"))
                await asyncio.sleep(0.01)
                continue
            try:
                while not self._stopping:
                    started = time.monotonic()
                    writer.write(request)
                    reply = await asyncio.wait_for(_response(reader), self.timeout)
                    status, keep = reply.status, reply.keep
                    seconds = time.monotonic() - started
                    self.samples.append(
                        Sample(started, seconds, status == 200,
                               "" if status == 200 else f"status {status}")
                    )
                    if not keep:
                        break
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.samples.append(Sample(started, time.monotonic() - started, False, repr(exc)))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


@dataclass
class Reply:
    status: int
    keep: bool
    """Whether the connection stays open."""
    body: bytes
    retry_after: str | None


async def _response(reader: asyncio.StreamReader) -> Reply:
    """Read one response whole."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    keep = True
    retry_after = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
        elif name == "retry-after":
            retry_after = value.strip()
        elif name == "transfer-encoding":
            raise ValueError("chunked responses are not expected here")
    body = await reader.readexactly(length) if length else b""
    return Reply(status, keep, body, retry_after)


@dataclass
class Answer:
    started: float
    """time.monotonic() when the request was sent."""
    seconds: float
    status: int
    """0: no answer (the detail says why)."""
    body: bytes = b""
    retry_after: str | None = None
    detail: str = ""


@dataclass
class PacedLoad:
    """`rate` requests a second, spread evenly over `clients` keep-alive connections, whatever
    the answers: an offered load, as traffic from many users is (a client whose answer is late
    sends its next request as soon as it has it, to catch up)."""

    port: int
    rate: float
    clients: int = 32
    path: str = "/work"
    host: str = "127.0.0.1"
    timeout: float = 10.0
    answers: list[Answer] = field(default_factory=list)
    _stopping: bool = False

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.answers if start <= a.started < end]

    def stop(self) -> None:
        self._stopping = True

    async def run(self) -> None:
        """Until `stop()`; every client finishes the request it has in flight."""
        begin = time.monotonic()
        await asyncio.gather(*(self._client(begin + n / self.rate) for n in range(self.clients)))

    async def _client(self, first: float) -> None:
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "User-Agent: failover-proxy-loadgen\r\n\r\n"
        ).encode()
        every = self.clients / self.rate
        due = first
        while not self._stopping:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout)
            except (OSError, TimeoutError) as exc:
                self.answers.append(Answer(time.monotonic(), 0.0, 0, detail=f"connect: {exc!r}"))
                await asyncio.sleep(0.01)
                continue
            try:
                while not self._stopping:
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    due += every
                    started = time.monotonic()
                    writer.write(request)
                    reply = await asyncio.wait_for(_response(reader), self.timeout)
                    self.answers.append(Answer(started, time.monotonic() - started, reply.status,
                                               reply.body, reply.retry_after))
                    if not reply.keep:
                        break
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.answers.append(Answer(started, time.monotonic() - started, 0,
                                           detail=repr(exc)))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


@dataclass
class Http2Load(Recorded):
    """`streams` HTTP/2 clients with prior knowledge (h2c), each a stream loop sending GETs back
    to back on one of `connections` connections (the `h2` library's frames), recording every
    outcome as `KeepAliveLoad` does: anything but a whole 200 answer is an error (a reset
    stream, a lost connection, a timeout), and a lost connection is opened again."""

    port: int
    streams: int
    connections: int = 1
    path: str = "/work"
    host: str = "127.0.0.1"
    authority: str = ""
    timeout: float = 10.0

    async def run(self) -> None:
        """Until `stop()`; every stream finishes the request it has in flight."""
        shares = [self.streams // self.connections + (n < self.streams % self.connections)
                  for n in range(self.connections)]
        await asyncio.gather(*(self._connection(share) for share in shares if share))

    async def _connection(self, share: int) -> None:
        while not self._stopping:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout)
            except (OSError, TimeoutError) as exc:
                self.samples.append(Sample(time.monotonic(), 0.0, False, f"connect: {exc!r}"))
                await asyncio.sleep(0.01)
                continue
            session = _Http2Session(reader, writer, self.authority or f"{self.host}:{self.port}")
            try:
                await asyncio.gather(*(self._stream_loop(session) for _ in range(share)))
            finally:
                session.close()

    async def _stream_loop(self, session: _Http2Session) -> None:
        while not self._stopping and session.alive:
            started = time.monotonic()
            try:
                status = await asyncio.wait_for(session.get(self.path), self.timeout)
            except (OSError, TimeoutError, ValueError) as exc:
                self.samples.append(Sample(started, time.monotonic() - started, False, repr(exc)))
                return
            self.samples.append(Sample(started, time.monotonic() - started, status == 200,
                                       "" if status == 200 else f"status {status}"))


class _Http2Session:
    """One client connection of Http2Load: requests out, their answers' statuses back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 authority: str) -> None:
        self.writer = writer
        self.authority = authority
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        self.h2.initiate_connection()
        self.waiting: dict[int, asyncio.Future[int]] = {}
        self.statuses: dict[int, int] = {}
        self.alive = True
        writer.write(self.h2.data_to_send())
        self.pump = asyncio.get_running_loop().create_task(self._read(reader))

    async def get(self, path: str) -> int:
        if not self.alive:
            raise ConnectionResetError("connection lost")
        stream_id = self.h2.get_next_available_stream_id()
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[stream_id] = done
        self.h2.send_headers(stream_id, [
            (":method", "GET"), (":path", path), (":scheme", "http"),
            (":authority", self.authority), ("user-agent", "failover-proxy-loadgen"),
        ], end_stream=True)
        self.writer.write(self.h2.data_to_send())
        return await done

    async def _read(self, reader: asyncio.StreamReader) -> None:
        lost: Exception = ConnectionResetError("connection lost")
        try:
            while data := await reader.read(65536):
                for event in self.h2.receive_data(data):
                    stream_id = getattr(event, "stream_id", 0) or 0
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers or []).get(b":status", b"0")
                        self.statuses[stream_id] = int(status)
                    elif isinstance(event, h2.events.DataReceived):
                        self.h2.acknowledge_received_data(event.flow_controlled_length or 0,
                                                          stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        self._settle(stream_id, self.statuses.pop(stream_id, 0), None)
                    elif isinstance(event, h2.events.StreamReset):
                        self._settle(stream_id, 0, ConnectionResetError(
                            f"stream reset ({event.error_code!r})"))
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        lost = ConnectionResetError(f"GOAWAY ({event.error_code!r})")
                self.writer.write(self.h2.data_to_send())
        except (OSError, h2.exceptions.ProtocolError) as exc:
            lost = exc
        finally:
            self.alive = False
            for stream_id in list(self.waiting):
                self._settle(stream_id, 0, lost)

    def _settle(self, stream_id: int, status: int, exc: Exception | None) -> None:
        done = self.waiting.pop(stream_id, None)
        if done is None or done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(status)

    def close(self) -> None:
        self.alive = False
        self.pump.cancel()
        self.writer.close()
