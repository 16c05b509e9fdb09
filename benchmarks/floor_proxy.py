"""The least an HTTP/1.1 proxy in Python on uvloop and llhttp (httptools) can do: a floor to
read failover-proxy's figures against, not a product.

Each client connection gets one keep-alive connection to the one backend. Requests are parsed
(method, target, header fields through llhttp's callbacks) and sent on as a rebuilt head;
responses are parsed only to find where they end and are forwarded byte for byte. Nothing
else: no routing, health, retries, limits, timeouts, metrics, request ids or header rules, and
no request bodies (the benchmark sends GETs).

    python benchmarks/floor_proxy.py LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools
import uvloop


class BackendSide(asyncio.Protocol):
    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)  # framing checked; the bytes go on unchanged
        self.client.send(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class ClientSide(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: BackendSide | None = None
        self.waiting: list[bytes] = []
        self.url = b""
        self.fields: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: BackendSide(self), *self.backend)
        self.upstream = upstream
        for head in self.waiting:
            self._forward(head)
        self.waiting = []

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        head = b"%s %s HTTP/1.1\r\n%s\r\n" % (
            self.parser.get_method(), self.url, b"".join(self.fields)
        )
        self.fields = []
        if self.upstream is None:
            self.waiting.append(head)
        else:
            self._forward(head)

    def _forward(self, head: bytes) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        self.upstream.transport.write(head)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    backend = ("127.0.0.1", backend_port)
    server = await loop.create_server(lambda: ClientSide(backend), "127.0.0.1", port,
                                      backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
