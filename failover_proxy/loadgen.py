"""Keep-alive HTTP/1.1 clients on raw sockets that record every outcome: the load behind the
failover tests and benchmarks, light enough that hundreds of them fit beside the backends in one
process.

Each client holds one connection and sends GETs back to back (the next once the previous
response is read whole); anything but a whole 200 response is an error, recorded with when it
happened and what it was, and the client reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    started: float
    """time.monotonic() when the request was sent."""
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class KeepAliveLoad:
    port: int
    clients: int
    path: str = "/work"
    host: str = "127.0.0.1"
    authority: str = ""
    """The Host header (default: host:port)."""
    timeout: float = 10.0
    """Longest wait for one response: past it the request counts as an error."""
    samples: list[Sample] = field(default_factory=list)
    _stopping: bool = False

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]

    @property
    def ok(self) -> int:
        return sum(1 for s in self.samples if s.ok)

    def since(self, moment: float) -> list[Sample]:
        return [s for s in self.samples if s.started >= moment]

    async def run(self) -> None:
        """Until `stop()`; every client finishes the request it has in flight."""
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    def stop(self) -> None:
        self._stopping = True

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
                    status, keep = await asyncio.wait_for(_response(reader), self.timeout)
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


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response whole: (status, whether the connection stays open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
        elif name == "transfer-encoding":
            raise ValueError("chunked responses are not expected here")
    if length:
        await reader.readexactly(length)
    return status, keep
