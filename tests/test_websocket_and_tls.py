"""WebSocket tunnels, and HTTPS backends with SNI and certificate verification (trustme CA)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import pytest
import trustme
from aiohttp import web

from failover_proxy.process.server import ProxyServer

StartApp = Callable[[web.Application], Awaitable[int]]
StartProxy = Callable[[str], Awaitable[ProxyServer]]


def ws_echo_app() -> web.Application:
    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                await socket.send_str("echo:" + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await socket.send_bytes(message.data[::-1])
        return socket

    async def plain(_: web.Request) -> web.Response:
        return web.Response(text="plain")

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/plain", plain)
    return app


def config_for(url: str, extra: str = "") -> str:
    return (
        "listen: {port: 0}\nupstreams:\n  web:\n    backends:\n"
        f'      - {{name: b0, url: "{url}", provider: aws}}\n{extra}'
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )


async def test_websocket_echo_through_the_proxy(aiohttp_backend: StartApp, proxy: StartProxy) -> None:
    port = await aiohttp_backend(ws_echo_app())
    server = await proxy(config_for(f"http://127.0.0.1:{port}"))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{server.port}/ws") as socket:
            for i in range(50):
                await socket.send_str(f"hello {i}")
                assert (await socket.receive_str(timeout=5)) == f"echo:hello {i}"
            big = bytes(range(256)) * 4096  # 1 MiB frame, both ways
            await socket.send_bytes(big)
            assert (await socket.receive_bytes(timeout=10)) == big[::-1]
            await socket.close()
        # The tunnel ended with the socket; plain HTTP still works on a new connection.
        async with session.get(f"http://127.0.0.1:{server.port}/plain") as response:
            assert await response.text() == "plain"


async def test_refused_upgrade_is_answered_and_closed(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    port = await aiohttp_backend(ws_echo_app())
    server = await proxy(config_for(f"http://127.0.0.1:{port}"))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"http://127.0.0.1:{server.port}/plain")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


StartHttps = Callable[[list[str | None]], Awaitable[int]]


@pytest.fixture
async def https_backend(
    ca: trustme.CA, aiohttp_backend: Callable[..., Awaitable[int]]
) -> StartHttps:
    """HTTPS aiohttp backends with a certificate for `localhost` from the test CA."""

    async def start(seen_sni: list[str | None]) -> int:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(context)

        def remember(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
            seen_sni.append(name)

        context.sni_callback = remember  # type: ignore[assignment]

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text=f"secure {request.secure} host={request.host}")

        app = web.Application()
        app.router.add_get("/", hello)
        return await aiohttp_backend(app, context)

    return start


async def test_https_backend_with_sni_and_verification(
    ca: trustme.CA, https_backend: StartHttps, proxy: StartProxy, tmp_path: Path
) -> None:
    seen_sni: list[str | None] = []
    port = await https_backend(seen_sni)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = await proxy(
        config_for(f"https://localhost:{port}", f"    tls: {{verify: true, ca_file: {ca_file}}}\n")
    )
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{server.port}/")
    assert response.status_code == 200
    assert response.text == f"secure True host=localhost:{port}"
    assert seen_sni == ["localhost"]


async def test_https_backend_with_untrusted_certificate_is_refused(
    https_backend: StartHttps, proxy: StartProxy
) -> None:
    port = await https_backend([])
    server = await proxy(config_for(f"https://localhost:{port}"))  # system trust store only
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{server.port}/")
    assert response.status_code == 502
    assert "CERTIFICATE_VERIFY_FAILED" in response.text or "certificate" in response.text


async def test_https_backend_verification_can_be_turned_off(
    https_backend: StartHttps, proxy: StartProxy
) -> None:
    port = await https_backend([])
    server = await proxy(config_for(f"https://localhost:{port}", "    tls: {verify: false}\n"))
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{server.port}/")
    assert response.status_code == 200


async def test_an_idle_tunnel_is_closed_and_a_busy_one_is_not(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    """limits.tunnel_idle_timeout: 600ms. A WebSocket that talks every 200 ms for 1.4 s stays
    open; once it falls silent it is closed no sooner than the timeout after its last byte
    (less the echo's way from the proxy to this client, under 100 ms even on a busy machine),
    and within the timeout, a sweep and a busy machine's lag."""
    port = await aiohttp_backend(ws_echo_app())
    server = await proxy(config_for(f"http://127.0.0.1:{port}")
                         + "limits: {tunnel_idle_timeout: 600ms}\n")
    url = f"http://127.0.0.1:{server.port}/ws"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as socket:
        for i in range(8):
            if i:
                await asyncio.sleep(0.2)
            await socket.send_str(f"tick {i}")
            assert (await socket.receive_str(timeout=5)) == f"echo:tick {i}"
        silent_at = time.monotonic()  # the last byte crossed the tunnel just before
        message = await socket.receive(timeout=5)
        closed_after = time.monotonic() - silent_at
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR), message
    assert 0.6 - 0.1 <= closed_after <= 0.6 + 0.2 + 1.0, closed_after
