"""What independent conformance and smuggling tools found, each with nginx's answer as the
oracle: an invalid Host is a 400 (RFC 9112 §3.2), Transfer-Encoding on an HTTP/1.0 request is a
400 (RFC 9112 §6.1), and header names with an underscore, which some backends read as their
dashed twin (`Transfer_Encoding` as `Transfer-Encoding`), are dropped unless allowed
(nginx's `underscores_in_headers off`)."""

from __future__ import annotations

import pytest

from failover_proxy.process.server import ProxyServer

from .conftest import raw_request, single_upstream_config
from .test_request_framing import RecordingBackend, StartProxy, StartRaw


@pytest.fixture
async def recording(raw_backend: StartRaw) -> tuple[RecordingBackend, int]:
    backend = RecordingBackend()
    return backend, await raw_backend(backend)


async def start(proxy: StartProxy, port: int, limits: str = "") -> ProxyServer:
    return await proxy(single_upstream_config(
        [port], top_extra=f"limits: {{{limits}}}\n" if limits else ""))


@pytest.mark.parametrize("request_head", [
    b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\tb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x/y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: user@x\r\n\r\n",
    b"GET http://example.com/ HTTP/1.1\r\nHost:  \t \r\n\r\n",
    b"GET http://example.com/ HTTP/1.1\r\nHost: bad host\r\n\r\n",
], ids=["space", "tab", "empty", "slash", "userinfo", "absolute-blank-host",
        "absolute-bad-host"])
async def test_an_invalid_host_is_a_400(
    proxy: StartProxy, recording: tuple[RecordingBackend, int], request_head: bytes,
) -> None:
    backend, port = recording
    server = await start(proxy, port)
    raw = await raw_request(server.port, request_head)
    assert raw.startswith(b"HTTP/1.1 400 "), raw
    assert not backend.heads


@pytest.mark.parametrize("host", [b"example.com", b"example.com:8080", b"127.0.0.1:80",
                                  b"[::1]:8080", b"xn--bcher-kva.example", b"a_b.example"])
async def test_a_valid_host_passes(
    proxy: StartProxy, recording: tuple[RecordingBackend, int], host: bytes,
) -> None:
    backend, port = recording
    server = await start(proxy, port)
    raw = await raw_request(server.port, b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                            until_close=False)
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    assert b"\r\nX-Forwarded-Host: " + host + b"\r\n" in backend.heads[0]


async def test_transfer_encoding_on_http10_is_a_400(
    proxy: StartProxy, recording: tuple[RecordingBackend, int],
) -> None:
    backend, port = recording
    server = await start(proxy, port)
    raw = await raw_request(
        server.port,
        b"POST /c HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 400 "), raw
    assert not backend.heads


UNDERSCORED = (b"GET /u HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n"
               b"Content_Length: 5\r\nX_Custom: 1\r\nX-Dashed: 2\r\n\r\n")


async def test_header_names_with_underscores_are_dropped(
    proxy: StartProxy, recording: tuple[RecordingBackend, int],
) -> None:
    backend, port = recording
    server = await start(proxy, port)
    raw = await raw_request(server.port, UNDERSCORED, until_close=False)
    assert raw.startswith(b"HTTP/1.1 200 ")
    (head,) = backend.heads
    assert b"_" not in head.split(b"\r\n\r\n")[0].replace(b"X-Request-Id", b"")
    assert b"\r\nX-Dashed: 2\r\n" in head


async def test_underscores_in_headers_can_be_allowed(
    proxy: StartProxy, recording: tuple[RecordingBackend, int],
) -> None:
    backend, port = recording
    server = await start(proxy, port, "underscores_in_headers: true")
    raw = await raw_request(server.port, UNDERSCORED, until_close=False)
    assert raw.startswith(b"HTTP/1.1 200 ")
    (head,) = backend.heads
    assert b"\r\nTransfer_Encoding: chunked\r\nContent_Length: 5\r\nX_Custom: 1\r\n" in head


@pytest.mark.parametrize("request_head", [
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
], ids=["bare-cr", "obs-fold", "nul", "control-byte", "duplicate-length", "length-and-chunked",
        "two-hosts", "space-before-colon", "bare-lf"])
async def test_the_vectors_security_md_lists_are_refused(
    proxy: StartProxy, recording: tuple[RecordingBackend, int], request_head: bytes,
) -> None:
    """SECURITY.md promises these are refused: each gets a 400 and nothing reaches the
    backend."""
    backend, port = recording
    server = await start(proxy, port)
    raw = await raw_request(server.port, request_head)
    assert raw.startswith(b"HTTP/1.1 400 "), raw
    assert not backend.heads
