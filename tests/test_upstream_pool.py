"""Keep-alive pools: reuse, idle eviction, and the stale-connection race."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx

from failover_proxy.process.server import ProxyServer

from .conftest import RawHandler, read_request_head, single_upstream_config

StartRaw = Callable[[RawHandler], Awaitable[int]]
StartProxy = Callable[[str], Awaitable[ProxyServer]]


class ConnectionLog:
    """A backend that numbers its connections and can drop a connection's Nth request."""

    def __init__(self, drop_request_number: int | None = None) -> None:
        self.connections = 0
        self.closed = 0
        self.answered: list[tuple[int, bytes]] = []
        self.drop_request_number = drop_request_number

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        served = 0
        try:
            while True:
                head = await read_request_head(reader)
                served += 1
                if served == self.drop_request_number:
                    return  # closed after reading, before one response byte: the race
                body = b""
                if b"Content-Length: " in head:
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                self.answered.append((number, head.split(b" ")[0] + b" " + body))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % (number % 10))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            self.closed += 1


async def test_connections_are_reused(raw_backend: StartRaw, proxy: StartProxy) -> None:
    log = ConnectionLog()
    server = await proxy(single_upstream_config([await raw_backend(log)]))
    async with httpx.AsyncClient(trust_env=False) as http:
        for _ in range(20):
            assert (await http.get(f"http://127.0.0.1:{server.port}/")).status_code == 200
    assert log.connections == 1


async def test_idle_connections_are_evicted(raw_backend: StartRaw, proxy: StartProxy) -> None:
    log = ConnectionLog()
    server = await proxy(
        single_upstream_config([await raw_backend(log)], "    pool: {idle_timeout: 300ms}\n")
    )
    async with httpx.AsyncClient(trust_env=False) as http:
        await http.get(f"http://127.0.0.1:{server.port}/")
        await asyncio.sleep(0.1)
        assert log.closed == 0
        await asyncio.sleep(0.7)  # idle timeout plus a sweep
        assert log.closed == 1, "the proxy, not the backend, closes an idle connection"
        await http.get(f"http://127.0.0.1:{server.port}/")
    assert log.connections == 2


async def test_stale_keepalive_connection_is_retried_once_for_any_method(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    log = ConnectionLog(drop_request_number=2)  # every connection dies on its second request
    server = await proxy(single_upstream_config([await raw_backend(log)]))
    async with httpx.AsyncClient(trust_env=False) as http:
        url = f"http://127.0.0.1:{server.port}/"
        first = await http.post(url, content=b"one")
        second = await http.post(url, content=b"two")  # hits the dying pooled connection
        third = await http.post(url, content=b"three")
    assert [r.status_code for r in (first, second, third)] == [200, 200, 200]
    # Each POST reached a backend exactly once, and was answered.
    assert [entry[1] for entry in log.answered] == [b"POST one", b"POST two", b"POST three"]
    assert log.connections == 3


async def test_max_idle_per_backend_caps_the_pool(raw_backend: StartRaw, proxy: StartProxy) -> None:
    log = ConnectionLog()
    server = await proxy(
        single_upstream_config([await raw_backend(log)], "    pool: {max_idle_per_backend: 2}\n")
    )
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
    async with httpx.AsyncClient(trust_env=False, limits=limits) as http:
        url = f"http://127.0.0.1:{server.port}/"
        await asyncio.gather(*(http.get(url) for _ in range(10)))
    await asyncio.sleep(0.1)
    assert log.connections - log.closed <= 2
