"""Where requests begin and end in what a client sends: heads read whole from the bytes, reads
cut at each message's end, whatever way the client's bytes are split into reads."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Awaitable, Callable

import httptools
import pytest

from failover_proxy.dataplane.http1.chunked import ChunkedBodyEnd
from failover_proxy.dataplane.http1.downstream import target_in_line, usual_method
from failover_proxy.dataplane.http1.headers import (
    NOTED,
    REQUEST_TAKEN,
    parse_response_head,
    read_response_head,
)
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import read_request_body

from .conftest import (
    RawHandler,
    raw_request,
    read_request_head,
    single_upstream_config,
)
from .test_field_walk import WALKER_IDS, WALKERS, HeadEnd, WalkFields

StartRaw = Callable[[RawHandler], Awaitable[int]]
StartProxy = Callable[[str], Awaitable[ProxyServer]]


class RecordingBackend:
    """Answers each request with its path and body; keeps every head and body it received."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            body = await read_request_body(reader, head)
            self.heads.append(head)
            self.bodies.append(body)
            answer = head.split(b" ")[1] + b" " + body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()


@pytest.fixture
async def recorded(raw_backend: StartRaw, proxy: StartProxy) -> tuple[RecordingBackend, ProxyServer]:
    backend = RecordingBackend()
    server = await proxy(
        single_upstream_config(
            [await raw_backend(backend)],
            top_extra="limits: {max_header_bytes: 4KiB, max_url_bytes: 1KiB}\n",
        )
    )
    return backend, server


PIPELINE = (
    b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nGE"
    b"POST /three HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nab\r\n\r\r\n3\r\nGET\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"\r\nGET /four HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
)
"""Requests back to back: bodies holding CRLFs, a blank line and request-like bytes, a chunk
extension, a trailer, and the empty line llhttp allows before a request line."""
ANSWERS = [b"/one ", b"/two hello\r\n\r\nGE", b"/three ab\r\n\rGET", b"/four "]


def answers(raw: bytes) -> list[bytes]:
    return [part.split(b"\r\n\r\n", 1)[1] for part in raw.split(b"HTTP/1.1 200 OK")[1:]]


async def send_in_pieces(port: int, data: bytes, cuts: list[int]) -> bytes:
    """Send `data` cut at the given offsets, each piece in a read of its own, and read until
    the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        start = 0
        for cut in [*cuts, len(data)]:
            writer.write(data[start:cut])
            await writer.drain()
            await asyncio.sleep(0.01)
            start = cut
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_pipelined_requests_with_bodies_in_one_read(
    recorded: tuple[RecordingBackend, ProxyServer],
) -> None:
    backend, server = recorded
    raw = await raw_request(server.port, PIPELINE)
    assert answers(raw) == ANSWERS
    assert backend.bodies == [b"", b"hello\r\n\r\nGE", b"ab\r\n\rGET", b""]
    assert [head.split(b" ")[1] for head in backend.heads] == [b"/one", b"/two", b"/three",
                                                               b"/four"]


@pytest.mark.parametrize("step", [1, 7, 40])
async def test_pipelined_requests_cut_anywhere_into_reads(
    recorded: tuple[RecordingBackend, ProxyServer], step: int
) -> None:
    """Every boundary falls inside some read: within a method, a field, a chunk-size line, the
    CRLF after chunk data, the last chunk and the blank line ending the head."""
    backend, server = recorded
    raw = await send_in_pieces(server.port, PIPELINE, list(range(step, len(PIPELINE), step)))
    assert answers(raw) == ANSWERS
    assert backend.bodies == [b"", b"hello\r\n\r\nGE", b"ab\r\n\rGET", b""]


async def test_fields_are_forwarded_as_the_client_wrote_them(
    recorded: tuple[RecordingBackend, ProxyServer],
) -> None:
    backend, server = recorded
    request = (
        b"GET /f HTTP/1.1\r\nHost: x\r\nx-lower: a\r\nX-Spaced:\t b  c \t\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: gone\r\nKeep-Alive: timeout=5\r\n"
        b"Accept: */*\r\nX-Request-Id: client-7\r\n\r\n"
    )
    raw = await raw_request(server.port, request, until_close=False)
    assert answers(raw) == [b"/f "]
    (head,) = backend.heads
    assert b"\r\nx-lower: a\r\nX-Spaced:\t b  c \t\r\n" in head
    assert b"\r\nAccept: */*\r\nX-Request-Id: client-7\r\n" in head
    lower = head.lower()
    assert b"x-hop" not in lower and b"keep-alive" not in lower
    assert lower.count(b"x-request-id") == 1


@pytest.mark.parametrize(
    ("request_line", "method", "target", "closes"),
    [
        (b"GET /a?b=1 HTTP/1.1", b"GET", b"/a?b=1", False),
        (b"GET  /two-spaces  HTTP/1.1", b"GET", b"/two-spaces", False),
        (b"PATCH /p HTTP/1.1", b"PATCH", b"/p", False),
        (b"DELETE   /d HTTP/1.0", b"DELETE", b"/d", True),
        (b"GET http://x/abs?q HTTP/1.1", b"GET", b"/abs?q", False),
        (b"GET http://x:8080 HTTP/1.1", b"GET", b"/", False),
        (b"GET /" + b"u" * 1023 + b" HTTP/1.1", b"GET", b"/" + b"u" * 1023, False),
    ],
    ids=["plain", "spaces", "patch", "http10", "absolute", "absolute-port-no-path", "url-limit"],
)
async def test_the_request_line_is_read_from_the_head(
    recorded: tuple[RecordingBackend, ProxyServer],
    request_line: bytes, method: bytes, target: bytes, closes: bool,
) -> None:
    """Method, target and version come from the request line as llhttp accepted it, which may
    have more than one space around the target; a target at the URL limit (1 KiB) passes."""
    backend, server = recorded
    raw = await raw_request(server.port, request_line + b"\r\nHost: x\r\n\r\n", until_close=False)
    assert raw.startswith(b"HTTP/1.1 200 OK")
    (head,) = backend.heads
    assert head.startswith(method + b" " + target + b" HTTP/1.1\r\n")
    assert (b"Connection: close" in raw) == closes


async def test_a_head_growing_past_the_limit_is_refused_before_it_ends(
    recorded: tuple[RecordingBackend, ProxyServer],
) -> None:
    _, server = recorded
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setblocking(False)
        with contextlib.suppress(ConnectionError):  # refused and closed while we still send
            await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n")
            for _ in range(20):  # 20 x 400 bytes, and never the blank line
                await loop.sock_sendall(sock, b"X-Pad: " + b"p" * 391 + b"\r\n")
                await asyncio.sleep(0.005)
        raw = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
    assert raw.startswith(b"HTTP/1.1 431 ")


async def test_a_chunked_body_llhttp_reads_otherwise_is_refused(
    recorded: tuple[RecordingBackend, ProxyServer],
) -> None:
    backend, server = recorded
    raw = await raw_request(
        server.port,
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabcdef\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert all(b"/smuggled" not in head for head in backend.heads)


BODY = b"5;ext\r\nhello\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nA: b\r\nC: d\r\n\r\n"


@pytest.mark.parametrize("cut", range(len(BODY) + 1))
def test_chunked_body_end_is_found_wherever_the_reads_are_cut(cut: int) -> None:
    data = BODY + b"NEXT"
    scanner = ChunkedBodyEnd()
    first = scanner.scan(data[:cut], 0)
    if first >= 0:
        assert first == len(BODY)
    else:
        assert cut < len(BODY)
        assert cut + scanner.scan(data[cut:], 0) == len(BODY)


@pytest.mark.parametrize("body", [b"zz\r\nab\r\n", b"\r\n", b";x\r\n"])
def test_chunked_body_end_gives_up_on_what_llhttp_refuses(body: bytes) -> None:
    scanner = ChunkedBodyEnd()
    assert scanner.scan(body + b"0\r\n\r\n", 0) == -1
    assert scanner.broken


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"u" * 6000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 6000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 6000 + b"\r\n", 431),
    ],
    ids=["long-target", "long-head", "long-head-unfinished"],
)
async def test_a_head_past_both_limits_in_one_read_is_refused_unread(
    recorded: tuple[RecordingBackend, ProxyServer], request_bytes: bytes, status: int
) -> None:
    backend, server = recorded
    raw = await raw_request(server.port, request_bytes)
    assert raw.startswith(b"HTTP/1.1 %d " % status)
    assert not backend.heads


async def test_a_read_holding_more_than_any_head_still_serves_its_requests(
    recorded: tuple[RecordingBackend, ProxyServer],
) -> None:
    """A read longer than a head may be (here a body of 8 KiB, past the 5 KiB limits) is
    searched for the head's end before the head is walked; the head, its body and the request
    after them are served as usual."""
    backend, server = recorded
    body = bytes(range(256)) * 32
    raw = await raw_request(
        server.port,
        b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        + b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200 ") == 2 and raw.endswith(b"/after ")
    assert backend.bodies == [body, b""]


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody\r\n\r\nmore", 27),
        (b"GET / HTTP/1.1\r\n\r\n", 18),
        (b"GET / HTTP/1.1\r\nHost: x\r\n", -1),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r", -1),
        (b"GET / HTTP/1.1", -1),
    ],
)
@pytest.mark.parametrize("walker", WALKERS, ids=WALKER_IDS)
def test_a_head_ends_at_its_first_blank_line(
    data: bytes, end: int, walker: tuple[HeadEnd, WalkFields]
) -> None:
    head_end, walk_fields = walker
    for start in (0, 2):
        buf = b"\r\n"[:start] + data
        expected = end + start if end >= 0 else -1
        assert head_end(buf, start) == expected
        assert walk_fields(buf, start, REQUEST_TAKEN, NOTED, [])[0] == expected


RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 4\r\n"


@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("body", [b"", b"xy\r\n\r\n", b"b" * 5000], ids=["none", "short", "long"])
def test_response_head_size(start: int, body: bytes) -> None:
    """A response head ends at its first blank line, whatever the body after it holds; a head
    without one has no size."""
    buf = b"\r\n\r\n"[:start] + RESPONSE_HEAD + b"\r\n" + body
    parsed = parse_response_head(buf, start)
    assert parsed.size == len(RESPONSE_HEAD) + 2
    assert parsed.content_length == b"4" and parsed.lines == [b"Server: s\r\n"]
    assert read_response_head(buf, start).raw == RESPONSE_HEAD + b"\r\n"
    unfinished = buf[: start + len(RESPONSE_HEAD)]
    assert parse_response_head(unfinished, start).size == -1
    with pytest.raises(ValueError, match="not found"):
        read_response_head(unfinished, start)


@pytest.mark.parametrize(
    ("line", "method"),
    [(b"GET / HTTP/1.1", b"GET"), (b"POST /x HTTP/1.1", b"POST"), (b"HEAD / HTTP/1.0", b"HEAD"),
     (b"PUT / HTTP/1.1", b"PUT"), (b"DELETE /d HTTP/1.1", b"DELETE"),
     (b"PATCH / HTTP/1.1", None), (b"GETX / HTTP/1.1", None), (b"OPTIONS * HTTP/1.1", None)],
)
def test_usual_method_read_from_the_request_line(line: bytes, method: bytes | None) -> None:
    assert usual_method(line) == method


class _UrlSeen:
    """What llhttp itself reports of a request line (the reference the slicing must match)."""

    def __init__(self) -> None:
        self.url = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.complete = True


def test_the_target_sliced_from_the_line_is_the_one_llhttp_reads() -> None:
    """Generated request lines (methods, spacing, target forms, versions): for every one llhttp
    accepts, the target cut from the line is the URL llhttp reported, byte for byte."""
    rng = random.Random(20261124)
    methods = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"PURGE"]
    pieces = [b"/", b"a", b"%20", b"?", b"=", b"&", b"#", b"http://h", b":8", b"*", b";", b".."]
    accepted = 0
    for _ in range(3000):
        method = rng.choice(methods)
        target = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        line = (method + b" " * rng.randint(1, 3) + target + b" " * rng.randint(1, 3)
                + rng.choice([b"HTTP/1.1", b"HTTP/1.0"]))
        seen = _UrlSeen()
        try:
            httptools.HttpRequestParser(seen).feed_data(line + b"\r\nHost: x\r\n\r\n")
        except httptools.HttpParserError:
            continue
        assert seen.complete
        assert target_in_line(line, usual_method(line) or method) == seen.url, line
        accepted += 1
    assert accepted > 500  # a fair share of the generated lines are ones llhttp takes
