"""Forwarding through the real proxy: bytes, headers, framing, ordering, balancing."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from failover_proxy.process.server import ProxyServer

from .conftest import (
    RawHandler,
    backend_entry,
    raw_request,
    read_one_response,
    read_request_head,
    single_upstream_config,
)

StartApp = Callable[[web.Application], Awaitable[int]]
StartRaw = Callable[[RawHandler], Awaitable[int]]
StartProxy = Callable[[str], Awaitable[ProxyServer]]


def echo_app(name: str = "b0") -> web.Application:
    """Answers with everything it received, so tests can see what the proxy sent."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        payload = {
            "backend": name,
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        return web.json_response(payload)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def client(proxy: ProxyServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", trust_env=False, timeout=10)


async def test_methods_paths_and_queries_pass_byte_for_byte(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    port = await aiohttp_backend(echo_app())
    server = await proxy(single_upstream_config([port]))
    targets = [b"/", b"/a/b%2Fc?x=1&y=%20z&x=2", b"/%7Euser/./../p;params?q=%E2%82%AC#", b"/?"]
    for method in (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"PURGE"):
        for target in targets:
            raw = await raw_request(
                server.port,
                method + b" " + target + b" HTTP/1.1\r\nHost: example\r\nContent-Length: 0\r\n\r\n",
                until_close=False,
            )
            body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
            assert body["method"] == method.decode()
            assert body["raw_path"] == target.decode().split("#")[0] or target.endswith(b"#")


async def test_small_and_large_held_bodies_arrive_byte_for_byte(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    """Bodies around the size where the proxy stops joining a held body to its head (and writes
    the two side by side instead), each twice on one connection: the second time the backend's
    head repeats, so the response is read without llhttp."""

    def body(size: int) -> bytes:
        return bytes((index * 7 + size) % 251 for index in range(size))

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=body(int(request.match_info["size"])))

    app = web.Application()
    app.router.add_get("/size/{size}", sized)
    server = await proxy(single_upstream_config([await aiohttp_backend(app)]))
    async with httpx.AsyncClient() as client:
        for size in (1, 4095, 4096, 4097, 30_000, 65_536):
            for _ in range(2):
                response = await client.get(f"http://127.0.0.1:{server.port}/size/{size}")
                assert response.status_code == 200
                assert response.content == body(size), size


async def test_options_asterisk_goes_to_the_hosts_root_route_as_asterisk(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """`OPTIONS *` asks about the server as a whole (RFC 9112 §3.2.4): it is routed as the
    host's root would be, and the backend gets the target `*` as the client sent it, or as
    `OPTIONS http://host` implies it."""
    seen: dict[str, list[bytes]] = {"api": [], "web": []}

    def recorder(name: str) -> RawHandler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                seen[name].append(await read_request_head(reader))
                writer.write(b"HTTP/1.1 200 OK\r\nAllow: GET, OPTIONS\r\nContent-Length: 2\r\n"
                             b"\r\n" + name[:2].encode())
                await writer.drain()

        return handler

    api_port = await raw_backend(recorder("api"))
    web_port = await raw_backend(recorder("web"))
    server = await proxy(
        "listen: {host: 127.0.0.1, port: 0}\nupstreams:\n"
        f"  api:\n    backends:\n{backend_entry('a0', api_port)}"
        f"  web:\n    backends:\n{backend_entry('w0', web_port)}"
        "routes:\n  - {path_prefix: /api, upstream: api}\n  - {path_prefix: /, upstream: web}\n"
    )
    asked = {
        b"OPTIONS * HTTP/1.1\r\nHost: shop\r\n\r\n": b"OPTIONS * HTTP/1.1",
        b"OPTIONS * HTTP/1.0\r\n\r\n": b"OPTIONS * HTTP/1.1",
        # The absolute form with an empty path and no query is the same question, and the
        # last proxy sends it on as `*` (§3.2.4); with a path or a query it is about a resource.
        b"OPTIONS http://shop HTTP/1.1\r\nHost: shop\r\n\r\n": b"OPTIONS * HTTP/1.1",
        b"OPTIONS http://shop:8080 HTTP/1.1\r\nHost: shop:8080\r\n\r\n": b"OPTIONS * HTTP/1.1",
        b"OPTIONS http://shop/ HTTP/1.1\r\nHost: shop\r\n\r\n": b"OPTIONS / HTTP/1.1",
        b"OPTIONS http://shop?q HTTP/1.1\r\nHost: shop\r\n\r\n": b"OPTIONS /?q HTTP/1.1",
        b"GET http://shop HTTP/1.1\r\nHost: shop\r\n\r\n": b"GET / HTTP/1.1",
    }
    for request in asked:
        raw = await raw_request(server.port, request, until_close=False)
        assert raw.startswith(b"HTTP/1.1 200 OK\r\nAllow: GET, OPTIONS\r\n"), raw
        assert raw.endswith(b"\r\n\r\nwe")
    assert seen["api"] == []
    assert [head.split(b"\r\n", 1)[0] for head in seen["web"]] == list(asked.values())


async def test_request_headers_rewritten_like_a_proxy(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    port = await aiohttp_backend(echo_app())
    server = await proxy(single_upstream_config([port]))
    request = (
        b"GET /h HTTP/1.1\r\nHost: shop.example.com\r\n"
        b"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"TE: deflate, trailers\r\nProxy-Connection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\nVia: 1.1 cdn\r\nX-Custom: a\r\nX-Custom: b\r\n\r\n"
    )
    raw = await raw_request(server.port, request, until_close=False)
    headers = json.loads(raw.split(b"\r\n\r\n", 1)[1])["headers"]
    names = [name.lower() for name, _ in headers]
    for hop in ("connection", "x-secret-hop", "keep-alive", "proxy-connection"):
        assert hop not in names, hop
    got = {name.lower(): value for name, value in headers}
    # TE is hop-by-hop: the client's is not forwarded, but the proxy, which passes trailers on
    # to a client that takes them, asks for them on its own hop.
    assert [v for n, v in headers if n.lower() == "te"] == ["trailers"]
    assert got["upgrade-insecure-requests"] == "1"  # not hop-by-hop despite its name
    assert got["host"] == f"127.0.0.1:{port}"  # host_header: backend (the default)
    assert got["x-forwarded-host"] == "shop.example.com"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert got["via"] == "1.1 cdn, 1.1 failover-proxy"
    assert got["x-request-id"]
    assert [v for n, v in headers if n.lower() == "x-custom"] == ["a", "b"]


async def test_heads_are_exact_on_the_usual_path_and_the_general_one(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """The request head a backend gets and the response head a client gets, byte for byte: the
    usual requests (no body, Content-Length, chunked, an X-Forwarded-For to extend) and ones
    that carry their own X-Request-Id and Via (built the general way) end up with the same
    lines in the same order."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # the raw_backend fixture ends the handler when the proxy closes
            head = await read_request_head(reader)
            seen.append(head)
            if b"Content-Length: 3" in head:
                await reader.readexactly(3)
            elif b"chunked" in head:
                await reader.readuntil(b"0\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nServer: raw\r\nContent-Length: 2\r\nX-B: 2\r\n"
                         b"Connection: keep-alive\r\n\r\nok")
            await writer.drain()

    backend_port = await raw_backend(handler)
    server = await proxy(single_upstream_config([backend_port]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    common = b"Host: shop\r\nX-A: 1\r\n"
    cases = [
        (b"GET /g HTTP/1.1\r\n" + common + b"\r\n", b"", None, b""),
        (b"POST /p HTTP/1.1\r\n" + common + b"Content-Length: 3\r\n\r\nabc", b"", None,
         b"Content-Length: 3\r\n"),
        (b"POST /c HTTP/1.1\r\n" + common + b"Transfer-Encoding: chunked\r\n\r\n"
         b"3\r\nabc\r\n0\r\n\r\n", b"", None, b"Transfer-Encoding: chunked\r\n"),
        (b"GET /own HTTP/1.1\r\n" + common + b"X-Request-Id: mine-1\r\nVia: 1.0 edge\r\n\r\n",
         b"X-Request-Id: mine-1\r\n", b"1.0 edge, ", b""),
        (b"GET /xff HTTP/1.1\r\n" + common + b"X-Forwarded-For: 203.0.113.7\r\n\r\n", b"", None,
         b""),
    ]
    for request, own_id, via_before, framing in cases:
        writer.write(request)
        response = await asyncio.wait_for(read_one_response(reader), 5)
        match = re.fullmatch(
            rb"HTTP/1\.1 200 OK\r\nServer: raw\r\nX-B: 2\r\nX-Request-Id: ([0-9a-z-]+)\r\n"
            rb"Via: 1\.1 failover-proxy\r\nContent-Length: 2\r\n\r\nok",
            response,
        )
        assert match, response
        request_id = match.group(1)
        assert request_id == b"mine-1" if own_id else request_id != b"mine-1"
        line = request.split(b"\r\n", 1)[0]
        id_line = b"" if own_id else b"X-Request-Id: %s\r\n" % request_id
        assert seen[-1] == (
            line + b"\r\nHost: 127.0.0.1:%d\r\nX-A: 1\r\n" % backend_port + own_id
            + b"X-Forwarded-For: " + (b"203.0.113.7, " if b"/xff" in line else b"")
            + b"127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: shop"
            b"\r\n" + id_line + b"Via: " + (via_before or b"") + b"1.1 failover-proxy\r\n"
            + framing + b"\r\n"
        ), seen[-1]
    writer.close()


async def test_request_id_kept_when_present_and_returned(
    aiohttp_backend: StartApp, proxy: StartProxy, tmp_path: Path
) -> None:
    """A client's own X-Request-Id is the request's id everywhere: the backend gets it, the
    client gets it back, and the proxy's access log and its own answers name it. One that is
    no short printable token is forwarded as it came, but the proxy names the request by an id
    of its own."""
    port = await aiohttp_backend(echo_app())
    log_file = tmp_path / "access.log"
    server = await proxy(
        f"listen: {{host: 127.0.0.1, port: 0}}\naccess_log: {{path: '{log_file}'}}\n"
        f"upstreams:\n  web:\n    backends:\n{backend_entry('b0', port)}"
        "routes:\n  - {host: shop.test, path_prefix: /, upstream: web}\n"
    )
    odd = "x" * 200
    async with client(server) as http:
        shop = {"Host": "shop.test"}
        given = await http.get("/", headers={**shop, "X-Request-Id": "abc-123"})
        seen = dict((k.lower(), v) for k, v in given.json()["headers"])
        assert seen["x-request-id"] == "abc-123"
        assert given.headers["x-request-id"] == "abc-123"
        unrouted = await http.get("/", headers={"Host": "other.test", "X-Request-Id": "abc-456"})
        assert unrouted.status_code == 404
        assert unrouted.headers["x-request-id"] == "abc-456" and "abc-456" in unrouted.text
        too_long = await http.get("/", headers={**shop, "X-Request-Id": odd})
        seen = dict((k.lower(), v) for k, v in too_long.json()["headers"])
        assert seen["x-request-id"] == odd
        own_id = too_long.headers["x-request-id"]
        assert own_id != odd
        fresh = await http.get("/", headers=shop)
        assert fresh.headers["x-request-id"]
        assert fresh.headers["x-request-id"] == dict(
            (k.lower(), v) for k, v in fresh.json()["headers"]
        )["x-request-id"]
        assert fresh.headers["via"] == "1.1 failover-proxy"
    await asyncio.sleep(0.5)  # the sweep hands lines to the writer thread
    logged = [json.loads(line)["request_id"] for line in log_file.read_text().splitlines()]
    assert logged == ["abc-123", "abc-456", own_id, fresh.headers["x-request-id"]]


async def test_host_header_preserve_and_base_path(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    port = await aiohttp_backend(echo_app())
    config = (
        "upstreams:\n  web:\n    host_header: preserve\n    backends:\n"
        f'      - {{name: b0, url: "http://127.0.0.1:{port}/base/", provider: aws}}\n'
        "routes:\n  - {path_prefix: /, upstream: web}\nlisten: {port: 0}\n"
    )
    server = await proxy(config)
    async with client(server) as http:
        answer = (await http.get("/v1/x?q=1", headers={"Host": "api.example.com"})).json()
    assert answer["raw_path"] == "/base/v1/x?q=1"
    assert dict((k.lower(), v) for k, v in answer["headers"])["host"] == "api.example.com"


async def test_repeated_response_headers_keep_their_order(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    async def cookies(_: web.Request) -> web.Response:
        response = web.Response(text="ok")
        for value in ("a=1; Path=/", "b=2; HttpOnly", "c=3"):
            response.headers.add("Set-Cookie", value)
        response.headers["Connection"] = "X-Drop-Me"
        response.headers["X-Drop-Me"] = "secret"
        return response

    app = web.Application()
    app.router.add_get("/", cookies)
    server = await proxy(single_upstream_config([await aiohttp_backend(app)]))
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert [h for h in head if h.startswith(b"Set-Cookie")] == [
        b"Set-Cookie: a=1; Path=/",
        b"Set-Cookie: b=2; HttpOnly",
        b"Set-Cookie: c=3",
    ]
    assert not any(h.lower().startswith(b"x-drop-me") for h in head)


async def test_bodies_are_never_decompressed(raw_backend: StartRaw, proxy: StartProxy) -> None:
    compressed = gzip.compress(b"hello " * 1000)
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request_head(reader)
        assert b"Content-Encoding: gzip" in head
        received.append(await reader.readexactly(len(compressed)))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(compressed), compressed)
        )
        await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nAccept-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % len(compressed)
    )
    raw = await raw_request(server.port, head + compressed, until_close=False)
    response_head, body = raw.split(b"\r\n\r\n", 1)
    assert received == [compressed]
    assert b"Content-Encoding: gzip" in response_head
    assert body == compressed


async def test_chunked_request_is_reframed_and_delivered(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    port = await aiohttp_backend(echo_app())
    server = await proxy(single_upstream_config([port]))
    request = (
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    raw = await raw_request(server.port, request, until_close=False)
    answer = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert answer["body"] == "hello world!"
    sent = {k.lower(): v for k, v in answer["headers"]}
    assert sent["transfer-encoding"] == "chunked"
    assert "x-trailer" not in sent


async def test_response_framings_reach_the_client_intact(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """Content-Length, chunked, and close-delimited backend responses; HEAD, 204 and 304."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            path = head.split(b" ")[1]
            if path == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
            elif path == b"/close":
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
                await writer.drain()
                return
            elif path == b"/head":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            elif path == b"/204":
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif path == b"/304":
                writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
            await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    async def ask(request: bytes, head_request: bool = False) -> bytes:
        writer.write(request)
        return await asyncio.wait_for(read_one_response(reader, head_request), 5)

    plain = await ask(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    assert plain.endswith(b"Content-Length: 5\r\n\r\nplain")
    chunked = await ask(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in chunked
    assert chunked.endswith(b"\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    head = await ask(b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n", head_request=True)
    assert b"Content-Length: 1234" in head
    no_content = await ask(b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert no_content.startswith(b"HTTP/1.1 204 ")
    not_modified = await ask(b"GET /304 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not_modified.startswith(b"HTTP/1.1 304 ") and b'ETag: "v1"' in not_modified
    # The connection is still good after all of that.
    again = await ask(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    assert again.endswith(b"plain")
    # A close-delimited body is re-framed as chunked for an HTTP/1.1 client.
    closing = await ask(b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in closing
    assert closing.endswith(b"d\r\nuntil the end\r\n0\r\n\r\n")
    writer.close()


async def test_each_response_head_on_one_backend_connection_is_read_anew(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A backend connection reuses its last parsed head when the next one has the same bytes;
    heads that repeat, grow by a field, differ by a digit, change framing, or come with an
    informational one before them, one after another on one connection, each reach the client
    as sent (one backend connection throughout)."""
    base = b"HTTP/1.1 200 OK\r\nServer: raw\r\nContent-Length: 2\r\n"
    answers = [
        base + b"\r\nok",
        base + b"\r\nok",
        base + b"X-More: 1\r\n\r\nok",  # the last head plus a field
        b"HTTP/1.1 200 OK\r\nServer: raw\r\nContent-Length: 20\r\n\r\n" + b"t" * 20,
        base + b"\r\nok",
        b"HTTP/1.1 201 Created\r\nServer: raw\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nServer: raw\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" + base + b"\r\nok",
        base + b"Connection: close\r\n\r\nok",
        base + b"\r\nok",
    ]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while answers:
            await read_request_head(reader)
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if b"Connection: close" in answer:
                return

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    got: list[tuple[bytes, bytes, bytes]] = []
    for _ in range(len(answers)):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(read_one_response(reader), 5)
        head, body = response.split(b"\r\n\r\n", 1)
        more = b"X-More: 1" if b"\r\nX-More: 1\r\n" in head else b""
        got.append((head.split(b"\r\n", 1)[0], more, body))
    writer.close()
    ok = (b"HTTP/1.1 200 OK", b"", b"ok")
    assert got == [
        ok, ok, (b"HTTP/1.1 200 OK", b"X-More: 1", b"ok"), (b"HTTP/1.1 200 OK", b"", b"t" * 20),
        ok, (b"HTTP/1.1 201 Created", b"", b"ok"), (b"HTTP/1.1 200 OK", b"", b"2\r\nok\r\n0\r\n\r\n"),
        ok, ok, ok,
    ]
    assert connections == 2  # the second after the backend's Connection: close


async def test_a_repeated_head_frames_its_body_however_the_reads_split_it(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A response whose head has the last one's bytes and a Content-Length is framed without
    llhttp (UpstreamConnection._known_response). Its body split over reads, arriving after the
    head alone, a head split over reads (llhttp's path), a HEAD answered with the same head,
    and a second response the backend sends unasked after a body: each client gets exactly
    its response, and the backend connection is given up only after the unasked bytes."""
    head = b"HTTP/1.1 200 OK\r\nServer: raw\r\nContent-Length: 10\r\n\r\n"
    unasked = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nX"
    script: list[tuple[bytes, list[bytes], bytes]] = [  # (method, the reads, the body expected)
        (b"GET", [head + b"0123456789"], b"0123456789"),  # read by llhttp, kept
        (b"GET", [head + b"01234", b"56789"], b"0123456789"),
        (b"GET", [head, b"0123", b"456789"], b"0123456789"),
        (b"GET", [head[:20], head[20:] + b"9876543210"], b"9876543210"),
        (b"HEAD", [head], b""),
        (b"GET", [head + b"abcdefghij"], b"abcdefghij"),
        (b"GET", [head + b"0123456789" + unasked], b"0123456789"),
        (b"GET", [head + b"0123456789"], b"0123456789"),  # on a new connection
    ]
    reads = [pieces for _, pieces, _ in script]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while reads:
            await read_request_head(reader)
            for piece in reads.pop(0):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)  # each piece in a read of its own

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    ids = []
    for method, _, body in script:
        writer.write(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(read_one_response(reader, method == b"HEAD"), 5)
        assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
        assert b"\r\nContent-Length: 10\r\n" in response, response
        assert response.endswith(b"\r\n\r\n" + body), (method, response)
        ids += re.findall(rb"\r\nX-Request-Id: ([^\r]+)\r\n", response)
    writer.close()
    assert connections == 2  # the second after the unasked response
    assert len(set(ids)) == len(ids) == len(script)  # the client head, built once, has each's


async def test_a_repeated_failure_head_read_without_the_parser_is_retried_elsewhere(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A failure status on a head framed without llhttp is what it is on one llhttp read: a
    POST gets it (not retried, the connection kept), a GET on that kept connection is retried
    on the other backend, and the connection that carried it is given up."""
    failing = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown"
    seen: list[tuple[int, bytes]] = []  # (connection number, request line) at the failing one
    connections = 0

    async def down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        while True:
            request = await read_request_head(reader)
            seen.append((number, request.split(b"\r\n", 1)[0]))
            writer.write(failing)
            await writer.drain()

    async def up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nup")
            await writer.drain()

    backends = backend_entry("down", await raw_backend(down)) + backend_entry(
        "up", await raw_backend(up)
    )
    server = await proxy(
        "listen: {host: 127.0.0.1, port: 0}\n"
        f"upstreams:\n  web:\n    backends:\n{backends}"
        "    balancer: hash\n    hash_on: {header: X-Key}\n"
        "    retry: {next_attempt: any}\n"
        "    outlier: {consecutive_failures: 1000000}\n"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    async def send(method: bytes, key: int) -> tuple[bytes, bytes]:
        writer.write(b"%s / HTTP/1.1\r\nHost: x\r\nX-Key: %d\r\nContent-Length: 0\r\n\r\n"
                     % (method, key))
        response = await asyncio.wait_for(read_one_response(reader), 5)
        return response.split(b" ", 2)[1], response.rsplit(b"\r\n", 1)[1]

    key = 0
    while await send(b"POST", key) != (b"503", b"down"):  # a key that hashes to the failing one
        key += 1
        assert key < 64
    got = [await send(method, key) for method in (b"POST", b"GET", b"POST")]
    writer.close()
    assert got == [(b"503", b"down"), (b"200", b"up"), (b"503", b"down")]
    assert seen == [
        (1, b"POST / HTTP/1.1"), (1, b"POST / HTTP/1.1"), (1, b"GET / HTTP/1.1"),
        (2, b"POST / HTTP/1.1"),
    ]


async def test_backend_connection_kept_after_head_response_without_length(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A response to HEAD has no body whatever its framing fields say (RFC 9110 §9.3.2): one
    with neither Content-Length nor chunking does not cost the backend connection."""
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        while True:  # the raw_backend fixture ends the handler when the proxy closes
            head = await read_request_head(reader)
            if head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
            await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for request, head_request in ((b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n", True),
                                  (b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n", False)) * 2:
        writer.write(request)
        response = await asyncio.wait_for(read_one_response(reader, head_request), 5)
        assert response.startswith(b"HTTP/1.1 200 ")
        assert response.endswith(b"\r\n\r\n" if head_request else b"body")
    writer.close()
    assert len(connections) == 1


async def test_http10_client_gets_close_delimited_body(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nold!\r\n0\r\n\r\n")
        await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    raw = await raw_request(server.port, b"GET / HTTP/1.0\r\n\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"old!"


async def test_http10_keep_alive_clients_are_still_http10(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """An HTTP/1.0 client asking to keep the connection (with Connection or the legacy
    Proxy-Connection) still gets no chunked framing it cannot read, and the headers that ask
    for a keep-alive connection never reach the backend."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nold!\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    for asking in (b"Connection: keep-alive", b"Proxy-Connection: keep-alive"):
        raw = await raw_request(server.port, b"GET / HTTP/1.0\r\nHost: x\r\n%s\r\n\r\n" % asking)
        head, body = raw.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"Transfer-Encoding" not in head and b"Connection: close" in head
        assert body == b"old!"
    assert len(seen) == 2
    assert all(b"keep-alive" not in head.lower() for head in seen)


async def test_expect_100_continue(aiohttp_backend: StartApp, proxy: StartProxy) -> None:
    server = await proxy(single_upstream_config([await aiohttp_backend(echo_app())]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"PUT /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"data")
    final = await asyncio.wait_for(read_one_response(reader), 5)
    answer = json.loads(final.split(b"\r\n\r\n", 1)[1])
    assert answer["body"] == "data"
    assert "expect" not in {k.lower() for k, _ in answer["headers"]}
    writer.close()


async def test_pipelined_requests_answered_in_order(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            path = head.split(b" ")[1]
            if path == b"/slow":
                await asyncio.sleep(0.3)  # an earlier request that finishes last
            body = path + b" "
            if b"Content-Length: " in head:
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                body += await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    # Two backends: pipelined requests may be spread, answers must still come back in order.
    server = await proxy(
        single_upstream_config([await raw_backend(handler), await raw_backend(handler)])
    )
    requests = (
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /four HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    raw = await raw_request(server.port, requests)
    bodies = [part.split(b"\r\n\r\n")[1] for part in raw.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [
        b"/slow ",
        b"/two abc",
        b"/three ",
        b"/four ",
    ]


async def test_smooth_weighted_round_robin_across_backends(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    ports = [await aiohttp_backend(echo_app(f"b{i}")) for i in range(3)]
    backends = "".join(
        f'      - {{name: b{i}, url: "http://127.0.0.1:{port}", provider: p{i}, weight: {w}}}\n'
        for i, (port, w) in enumerate(zip(ports, (3, 2, 1), strict=True))
    )
    server = await proxy(
        f"listen: {{port: 0}}\nupstreams:\n  web:\n    backends:\n{backends}"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    async with client(server) as http:
        seen = [(await http.get("/")).json()["backend"] for _ in range(60)]
    assert Counter(seen) == {"b0": 30, "b1": 20, "b2": 10}


async def test_routes_by_host_and_longest_prefix(
    aiohttp_backend: StartApp, proxy: StartProxy
) -> None:
    api, static, default = [await aiohttp_backend(echo_app(n)) for n in ("api", "static", "default")]
    config = f"""
listen: {{port: 0}}
upstreams:
  api: {{backends: [{{name: api, url: "http://127.0.0.1:{api}", provider: aws}}]}}
  static: {{backends: [{{name: static, url: "http://127.0.0.1:{static}", provider: gcp}}]}}
  default: {{backends: [{{name: default, url: "http://127.0.0.1:{default}", provider: azure}}]}}
routes:
  - {{host: "*.example.com", path_prefix: /, upstream: api}}
  - {{path_prefix: /static/, upstream: static}}
  - {{path_prefix: /, upstream: default}}
"""
    server = await proxy(config)
    async with client(server) as http:
        assert (await http.get("/x", headers={"Host": "a.example.com"})).json()["backend"] == "api"
        assert (await http.get("/static/a.css")).json()["backend"] == "static"
        assert (await http.get("/stat")).json()["backend"] == "default"


async def test_no_route_is_404(aiohttp_backend: StartApp, proxy: StartProxy) -> None:
    port = await aiohttp_backend(echo_app())
    config = single_upstream_config([port]).replace("{path_prefix: /,", "{path_prefix: /api,")
    server = await proxy(config)
    async with client(server) as http:
        response = await http.get("/other")
    assert response.status_code == 404
    assert "no route" in response.text and response.headers["x-request-id"] in response.text


async def test_interim_responses_are_absorbed_and_trailers_dropped(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            if b"/split" in head:  # interim and final response in separate writes
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsplit")
            else:  # 103 Early Hints, then a chunked body with a trailer, in one write
                writer.write(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                    b"4\r\nbody\r\n0\r\nX-Sum: 42\r\n\r\n"
                )
            await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /split HTTP/1.1\r\nHost: x\r\n\r\n")
    split = await asyncio.wait_for(read_one_response(reader), 5)
    assert split.startswith(b"HTTP/1.1 200 OK\r\n") and split.endswith(b"\r\n\r\nsplit")
    writer.write(b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n")
    hinted = await asyncio.wait_for(read_one_response(reader), 5)
    assert hinted.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Trailer" not in hinted and b"X-Sum" not in hinted
    assert hinted.endswith(b"4\r\nbody\r\n0\r\n\r\n")
    writer.close()


async def test_oversized_response_head_is_502(raw_backend: StartRaw, proxy: StartProxy) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Junk: " + b"j" * 100_000 + b"\r\n\r\n")
        await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    raw = await raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=False)
    assert raw.startswith(b"HTTP/1.1 502 ")
    assert b"response head too large" in raw


@pytest.mark.parametrize(
    ("piece", "early_hints", "pad"),
    [(1, False, 0), (1, True, 0), (100_000, False, 0), (100_000, True, 0),
     (100_000, False, 5000), (100_000, True, 5000)],
    ids=["bytewise", "bytewise-after-103", "one-write", "one-write-after-103",
         "one-write-long-head", "one-write-long-head-after-103"],
)
async def test_response_head_in_tiny_pieces_is_rewritten_whole(
    raw_backend: StartRaw, proxy: StartProxy, piece: int, early_hints: bool, pad: int
) -> None:
    """The response head is read from its raw bytes: one split over many reads (one byte per
    write) or one read that also holds the body (and maybe a 103 before it), and fields the
    proxy rewrites between forwarded ones must come out right. A head over 4 KiB is found by
    searching for its blank line rather than split with the bytes after it."""
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" if early_hints else b""
    padding = [b"X-Pad: " + b"p" * pad] if pad else []
    head = hints + (
        b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in padding)
        + b"Server: tiny\r\nKeep-Alive: timeout=5\r\nX-First: 1\r\n"
        b"Content-Length: 6\r\nconnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"
        b"X-Request-Id: from-backend\r\nVia: 1.0 cache\r\nX-Forwarded-Proto: gopher\r\n"
        b"Proxy-Connection: keep-alive\r\nX-Last:  spaced value \r\n\r\nhe\r\n\r\n"
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            for index in range(0, len(head), piece):
                writer.write(head[index : index + piece])
                await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for _ in range(2):  # the second response comes on the reused backend connection
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(read_one_response(reader), 5)
        lines = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 200 OK"
        assert lines[1:] == [
            *padding,
            b"Server: tiny",
            b"X-First: 1",
            b"X-Request-Id: from-backend",
            b"X-Last:  spaced value ",
            b"Via: 1.0 cache, 1.1 failover-proxy",
            b"Content-Length: 6",
        ]
        assert response.endswith(b"\r\n\r\nhe\r\n\r\n")
    writer.close()


async def test_unsolicited_response_from_backend_is_never_delivered(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A backend that sends a second response nobody asked for, in the same write, is broken:
    its connection is dropped rather than pooled, so the extra response never answers the next
    request (which goes out on a fresh connection)."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        while True:
            await read_request_head(reader)
            body = b"conn%d" % number
            extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!" if number == 1 else b""
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body + extra)
            await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(handler)]))
    async with client(server) as http:
        first = await http.get("/")
        second = await http.get("/")
    assert first.status_code == 200 and first.text == "conn1"
    assert second.status_code == 200 and second.text == "conn2"
    assert connections == 2
