"""Generated malformed requests and responses, checked against llhttp as the oracle.

The data plane reads request lines, fields and response heads from the raw bytes itself (for
speed) and lets llhttp validate them; these tests check, over many seeded random inputs, that
the two never disagree in a way a client or backend could exploit:

- requests: whatever reaches the backend is exactly what strict llhttp parses from the client's
  bytes (same method, target, Host and body, in order), never more requests than llhttp sees,
  nothing after the first malformed byte; every connection gets answers, never an exception;
- responses: the client gets the backend's status and body when llhttp accepts the response,
  502 when it does not, and the proxy keeps working.

Real sockets, the real proxy and raw backends; the seed makes every run the same inputs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest

from failover_proxy.process.server import ProxyServer

from .conftest import single_upstream_config

StartProxy = Callable[[str], Awaitable[ProxyServer]]

LIMITS = (
    "limits: {max_header_bytes: 4KiB, max_url_bytes: 1KiB, max_body_bytes: 64KiB,"
    " header_timeout: 300ms}\n"
)
CASE_TIMEOUT = 2.0
"""Longest a case may take: every way of ending a connection is well inside it."""


# -- the oracle: llhttp (strict, as httptools builds it) --------------------------------------


@dataclass
class Message:
    method: bytes = b""
    url: bytes = b""
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    keep_alive: bool = True

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Collector:
    """llhttp's view of a byte stream: the messages it completes before any error."""

    def __init__(self, response: bool = False) -> None:
        self.messages: list[Message] = []
        self.error: str | None = None
        self.upgraded = False
        self.response = response
        self.parser: Any = (
            httptools.HttpResponseParser(self) if response else httptools.HttpRequestParser(self)
        )

    def feed(self, data: bytes) -> Collector:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgraded = True
        except httptools.HttpParserError as exc:
            if not any(not message.keep_alive for message in self.complete):
                self.error = str(exc) or type(exc).__name__
            # else: bytes after a request that ends its connection, which nobody reads
        return self

    @property
    def complete(self) -> list[Message]:
        return [message for message in self.messages if message.complete]

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        message = self.messages[-1]
        if self.response:
            message.status = self.parser.get_status_code()
        else:
            message.method = self.parser.get_method()
        message.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


# -- generated requests -----------------------------------------------------------------------

METHODS = [b"GET"] * 6 + [b"POST"] * 3 + [b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                          b"PURGE", b"M-SEARCH"]
ODD_METHODS = [b"get", b"G\x00T", b"CONNECT", b"PRI", b"GET\t", b"", b"G E T"]
TARGETS = [b"/", b"/", b"/a/b?q=1&r=2", b"/%00x", b"*", b"http://h.example/abs?x",
           b"http://h.example:8080", b"https://h.example/p", b"//double", b"/a#frag",
           b"/?", b"/a?b?c", b"/x;p=1"]
ODD_TARGETS = [b"/sp ace", b"", b"/\xffbin", b"/" + b"u" * 1100, b"/tab\there", b"nope",
               b"http://", b"http:///path", b"http://[::1/x", b"http://h:99999/"]
VERSIONS = [b"HTTP/1.1"] * 12 + [b"HTTP/1.0"] * 2 + [b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9",
                                                      b"HTTP/1.", b"http/1.1", b"HTTP/11", b""]
HOSTS = [b"Host: x.example"] * 8 + [b"Host: x.example:80", b"host: x", b"HOST: x",
                                    b"Host:\tx\t", b"Host: [::1]:8080", b"Host:", b"Host : x",
                                    b"Host: a\r\nHost: b", b"Host: x y", b""]
FIELDS = [b"Accept: */*", b"X-Empty:", b"X-Spaces:   padded   ", b"Connection: keep-alive",
          b"Connection: close", b"Connection: x-hop", b"X-Hop: dropped",
          b"Proxy-Connection: close", b"Connection: upgrade", b"Upgrade: websocket",
          b"Expect: 100-continue", b"X-Forwarded-For: 10.0.0.1", b"Via: 1.1 other",
          b"X-Request-Id: client-chosen", b"Te: trailers", b"Keep-Alive: 5",
          b"X-Utf8: caf\xc3\xa9", b"Content-Type: text/plain", b"Cookie: a=1; b=2",
          b"X-" + b"n" * 300 + b": long", b"Connection: keep-alive, x-hop"]
ODD_FIELDS = [b" X-Lead: space", b"X-Obs:\r\n folded", b"X:\x01ctl", b"Bad Name: x",
              b"X-Colon:: double", b"\tX-Tab: x", b"Expect: nonsense", b": no-name",
              b"X-Nul: a\x00b", b"X-Cr: a\rb"]
LENGTHS = [b"Content-Length: %d"] * 6 + [
    b"Content-Length:  %d ", b"Content-Length: +%d", b"Content-Length: %d, %d",
    b"Content-Length: 0x%x", b"Content-Length: -%d", b"Content-Length: %d\r\nContent-Length: %d",
    b"Content-Length: 99999999999999999999999", b"Content-Length: %d0"]
CODINGS = [b"Transfer-Encoding: chunked"] * 6 + [
    b"Transfer-Encoding: Chunked", b"Transfer-Encoding:  chunked ",
    b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked, gzip",
    b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x",
    b"Transfer-Encoding: xchunked"]
NOISE = [b"\x00", b"\r", b"\n", b"\r\n", b"\t", b" ", b":", b";", b",", b'"', b"\x7f", b"\x80",
         b"\xff", b"0", b"\r\n\r\n", b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"]


def chunked_body(rng: random.Random, body: bytes, odd: bool) -> bytes:
    """`body` in chunks, with extensions and trailers; when `odd`, sometimes broken: wrong
    sizes, bare LFs, spaces, an unfinished end."""
    out = b""
    pos = 0
    while pos < len(body):
        size = rng.randint(1, max(1, len(body) - pos))
        piece = body[pos : pos + size]
        pos += size
        style = rng.random() if odd else rng.random() * 0.8
        if style < 0.7:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
        elif style < 0.8:
            out += b"%X;ext=1\r\n%s\r\n" % (len(piece), piece)
        elif style < 0.85:
            out += b"%x\n%s\n" % (len(piece), piece)
        elif style < 0.9:
            out += b"%x\r\n%s\r\n" % (len(piece) + 1, piece)
        elif style < 0.95:
            out += b" %x \r\n%s\r\n" % (len(piece), piece)
        else:
            out += b"0x%x\r\n%s\r\n" % (len(piece), piece)
    end = rng.random() if odd else rng.random() * 0.85
    if end < 0.75:
        out += b"0\r\n\r\n"
    elif end < 0.85:
        out += b"0\r\nX-Trailer: t\r\n\r\n"
    elif end < 0.9:
        out += b"00000\r\n\r\n"
    elif end < 0.95:
        out += b"0\r\n"  # unfinished
    return out


def generated_request(rng: random.Random) -> bytes:
    """One request: half of them plausible (forwarded unless a rule of the proxy's refuses
    them), half built from hostile parts as well and perhaps mutated byte-wise after."""
    hostile = rng.random() < 0.5
    odd = hostile and rng.random() < 0.5
    method = rng.choice(ODD_METHODS if odd and rng.random() < 0.2 else METHODS)
    target = rng.choice(ODD_TARGETS if odd and rng.random() < 0.3 else TARGETS)
    version = rng.choice(VERSIONS[14:] if odd and rng.random() < 0.3 else VERSIONS[:14])
    line = b"%s %s %s" % (method, target, version)
    if odd and rng.random() < 0.1:
        line = line.replace(b" ", b"  ", 1)
    fields = [rng.choice(HOSTS if odd else HOSTS[:12]), *rng.sample(FIELDS, rng.randint(0, 4))]
    if odd and rng.random() < 0.3:
        fields.append(rng.choice(ODD_FIELDS))
    body = b""
    framing = rng.random()
    if framing < 0.3 or method in (b"POST", b"PUT", b"PATCH"):
        body = bytes(rng.choice(b"abcxyz") for _ in range(rng.randint(0, 40)))
        if framing < 0.6:
            template = rng.choice(LENGTHS if odd else LENGTHS[:6])
            count = template.count(b"%")
            fields.append(template % ((len(body),) * count) if count else template)
        else:
            fields.append(rng.choice(CODINGS if odd else CODINGS[:6]))
            body = chunked_body(rng, body, odd)
    rng.shuffle(fields)
    ending = rng.choice([b"\n", b"\r", b"\r\r\n"]) if odd and rng.random() < 0.1 else b"\r\n"
    request = line + b"\r\n" + b"".join(f + ending for f in fields if f) + b"\r\n" + body
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3]) if hostile else 0):
        at = rng.randint(0, len(request))
        action = rng.random()
        if action < 0.6:
            request = request[:at] + rng.choice(NOISE) + request[at:]
        elif action < 0.8:
            request = request[:at] + request[at + 1 :]
        else:
            request = request[:at] + request[at : at + 8] + request[at:]
    return request


# -- the backend: llhttp as well, answering each complete request ------------------------------


class StrictBackend:
    """Parses what the proxy forwards with strict llhttp, answers each request 'ok'."""

    def __init__(self) -> None:
        self.received: list[Message] = []
        self.malformed: list[tuple[str, bytes]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        collector = Collector()
        seen = b""
        try:
            while data := await reader.read(65536):
                seen += data
                answered = len(collector.complete)
                collector.feed(data)
                if collector.error is not None:
                    self.malformed.append((collector.error, seen))
                    return
                for message in collector.complete[answered:]:
                    self.received.append(message)
                    body = b"" if message.method == b"HEAD" else b"ok"
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)
                if collector.upgraded:
                    return  # refused by answering 200: the proxy closes the connection
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def fuzz_target(proxy: StartProxy) -> AsyncIterator[tuple[StrictBackend, int, list[str]]]:
    backend = StrictBackend()
    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(str(context)))
    proxy_server = await proxy(
        single_upstream_config(
            [port],
            upstream_extra="    timeouts: {read: 10s}\n    retry: {attempts: 1}\n",
            top_extra=LIMITS,
        )
    )
    yield backend, proxy_server.port, errors
    loop.set_exception_handler(None)
    server.close()


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, half-close, and read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), CASE_TIMEOUT)
    except TimeoutError:
        return b"(no close within %gs)" % CASE_TIMEOUT
    finally:
        writer.close()


def statuses_of(raw: bytes, methods: list[bytes]) -> list[int]:
    """The statuses of the responses the proxy sent, each head checked by llhttp; `methods`:
    those of the client's requests in order, b"" where neither llhttp nor the request's first
    bytes tell (a response to HEAD has no body, refusals included)."""
    statuses: list[int] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\r\n\r\n", pos)
        assert end >= 0, f"unfinished response head {raw[pos:]!r}"
        head = raw[pos : end + 4]
        check = Collector(response=True).feed(head)
        assert check.error is None and check.messages, f"bad response head {head!r}"
        status = check.messages[0].status
        pos = end + 4
        if status == 100:
            continue
        length = check.messages[0].header(b"content-length")
        assert length is not None, f"response without Content-Length {head!r}"
        answered = len(statuses)
        head_request = answered < len(methods) and methods[answered] == b"HEAD"
        if not head_request:
            pos += int(length)
        statuses.append(status)
    assert pos == len(raw), f"bytes after the last response {raw!r}"
    return statuses


def expected_target(method: bytes, url: bytes) -> bytes:
    """The target a backend sees for a client's target (absolute form becomes origin form, or
    `*` for OPTIONS without path and query: RFC 9112 §3.2.4)."""
    if url.startswith((b"http://", b"https://")):
        parsed: Any = httptools.parse_url(url)
        if method == b"OPTIONS" and not parsed.path and not parsed.query:
            return b"*"
        path = parsed.path or b"/"
        return path + (b"?" + parsed.query if parsed.query else b"")
    return url


REQUEST_CASES = 1000


async def test_generated_requests_reach_the_backend_exactly_as_llhttp_reads_them(
    fuzz_target: tuple[StrictBackend, int, list[str]],
) -> None:
    backend, port, errors = fuzz_target
    rng = random.Random(20261124)
    forwarded_total = 0
    for case in range(REQUEST_CASES):
        data = generated_request(rng)
        if rng.random() < 0.3:  # a pipelined request after it must be served, or never forwarded
            data += b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
        oracle = Collector().feed(data)
        before = len(backend.received)
        started = time.monotonic()
        raw = await exchange(port, data)
        took = time.monotonic() - started
        got = backend.received[before:]
        forwarded_total += len(got)
        where = f"case {case}: {data!r}\n-> {raw[:300]!r}"
        assert not errors, f"{where}\n{errors}"
        assert not backend.malformed, f"{where}\nbackend got {backend.malformed}"
        assert took < CASE_TIMEOUT, where
        expected = oracle.complete
        assert len(got) <= len(expected), where
        methods = [message.method for message in oracle.messages]
        if methods and not methods[0] and data.lstrip(b"\r\n").startswith(b"HEAD "):
            methods[0] = b"HEAD"  # refused before llhttp read its method: known from its start
        statuses = statuses_of(raw, methods)
        assert all(status == 200 or 400 <= status < 600 for status in statuses), where
        assert statuses.count(200) == len(got), where
        forwarded = iter(got)
        for sent, status in zip(expected, statuses, strict=False):
            if status != 200:
                continue  # answered by the proxy itself
            seen = next(forwarded)
            assert seen.method == sent.method, where
            assert seen.url == expected_target(sent.method, sent.url), where
            assert seen.body == sent.body, where
            host = sent.header(b"host")
            if host is not None and not sent.url.startswith((b"http://", b"https://")):
                assert seen.header(b"x-forwarded-host") == host.strip(b" \t"), where
        served = expected
        for index, message in enumerate(expected):
            if not message.keep_alive:
                served = expected[: index + 1]  # the connection ends with this one
                break
        if oracle.error is not None:
            # llhttp refuses part of it: the client is told, after the answers before it
            assert len(statuses) > len(expected) or statuses[-1] >= 400, where
        if len(statuses) < len(served):
            assert statuses and statuses[-1] >= 400, where  # a refusal ended the connection
    assert forwarded_total > REQUEST_CASES // 3  # the generator makes valid requests too


# -- generated responses ----------------------------------------------------------------------

STATUS_LINES = [b"HTTP/1.1 200 OK"] * 6 + [
    b"HTTP/1.1 404 Not Found", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 500 Internal Server Error", b"HTTP/1.1 200",
    b"HTTP/1.1 201 ", b"HTTP/1.1 418 I'm a teapot"]
ODD_STATUS_LINES = [b"HTTP/1.1 2000 X", b"HTTP/2 200 OK", b"ICY 200 OK", b"HTTP/1.1 99 X",
                    b"HTTP/1.1  200 OK", b"HTTP/1.1 200 OK\x00", b"HTTP/1.1 101 Switching",
                    b"http/1.1 200 OK", b"HTTP/1.1 20 OK"]
RESPONSE_FIELDS = [b"Server: fuzz", b"Date: Tue, 24 Nov 2026 10:00:00 GMT",
                   b"Content-Type: text/plain", b"Set-Cookie: a=1", b"Set-Cookie: b=2",
                   b"Connection: keep-alive", b"Connection: close", b"Keep-Alive: timeout=5",
                   b"Via: 1.1 cdn", b"X-Request-Id: backend-chosen", b"Connection: x-secret",
                   b"X-Secret: hop", b"Proxy-Connection: keep-alive", b"Cache-Control: no-store",
                   b"X-Empty:", b"Vary: Accept-Encoding"]
ODD_RESPONSE_FIELDS = [b"Bad Name: x", b" X-Lead: y", b"X-Obs: a\r\n folded", b"X: \x01",
                       b"Transfer-Encoding: gzip", b"Content-Length: 5, 6", b"X-Cr: a\rb",
                       b"Content-Length: -1", b": empty-name"]
PREFIXES = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"]


def generated_response(rng: random.Random) -> tuple[bytes, bool]:
    """A backend's response, plausible or hostile, and whether the backend closes after it."""
    odd = rng.random() < 0.4
    line = rng.choice(ODD_STATUS_LINES if odd and rng.random() < 0.3 else STATUS_LINES)
    fields = rng.sample(RESPONSE_FIELDS, rng.randint(0, 5))
    if odd and rng.random() < 0.4:
        fields.append(rng.choice(ODD_RESPONSE_FIELDS))
    body = bytes(rng.choice(b"0123456789abcdef") for _ in range(rng.randint(0, 300)))
    framing = rng.random()
    close = rng.random() < 0.3
    if framing < 0.55:
        length = len(body)
        if odd and rng.random() < 0.3:
            length += rng.choice([-3, -1, 1, 5])
        fields.append(b"Content-Length: %d" % max(length, 0))
    elif framing < 0.85:
        fields.append(b"Transfer-Encoding: chunked")
        body = chunked_body(rng, body, odd)
    else:
        close = True  # close-delimited: the backend's close ends the body
    rng.shuffle(fields)
    ending = b"\n" if odd and rng.random() < 0.1 else b"\r\n"
    response = line + b"\r\n" + b"".join(f + ending for f in fields) + b"\r\n" + body
    if rng.random() < 0.1:
        response = rng.choice(PREFIXES) + response
    if odd and rng.random() < 0.3:
        at = rng.randint(0, len(response))
        response = response[:at] + rng.choice(NOISE) + response[at:]
    return response, close


class ScriptedBackend:
    """Answers every request with the response the current case chose."""

    def __init__(self) -> None:
        self.response = b""
        self.close_after = False

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # the proxy sends GET and HEAD only here
                writer.write(self.response)
                await writer.drain()
                if self.close_after:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def backend_view(response: bytes, close: bool, head_request: bool) -> tuple[Message | None, bool]:
    """The final response llhttp reads from the backend's bytes (None when it refuses them
    first), and whether it refused them."""
    collector = Collector(response=True).feed(response)
    for message in collector.messages:
        if 100 <= message.status < 200 and message.status != 101:
            continue
        if head_request and message.status:
            return message, False  # a response to HEAD ends with its head
        if message.complete:
            return message, False
        framed = message.header(b"content-length") is not None or any(
            key.lower() == b"transfer-encoding" for key, _ in message.headers)
        if collector.error is None and close and not framed and message.status:
            return message, False  # close-delimited, ended by the close
        return None, collector.error is not None
    return None, collector.error is not None


def client_view(raw: bytes, head_request: bool, where: str) -> tuple[int, bytes, bool]:
    """The one response the client got, read strictly by llhttp: status, body, and whether it
    is whole (a response cut short tells the client something broke after it began)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    check = Collector(response=True).feed(head + b"\r\n\r\n")
    assert check.error is None and check.messages, f"bad head: {where}"
    status = check.messages[0].status
    if head_request or status in (204, 304):
        assert rest == b"", f"bytes after a response without a body: {where}"
        return status, b"", True
    whole = Collector(response=True).feed(raw)
    assert whole.error is None and len(whole.messages) == 1, f"bad response: {where}"
    return status, whole.messages[0].body, whole.messages[0].complete


RESPONSE_CASES = 600


async def test_generated_responses_reach_the_client_as_llhttp_reads_them_or_get_502(
    proxy: StartProxy,
) -> None:
    backend = ScriptedBackend()
    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(str(context)))
    try:
        proxy_server = await proxy(
            single_upstream_config(
                [server.sockets[0].getsockname()[1]],
                upstream_extra="    timeouts: {read: 300ms}\n    retry: {attempts: 1}\n"
                "    outlier: {consecutive_failures: 1000000}\n",
                top_extra=LIMITS,
            )
        )
        rng = random.Random(11242026)
        passed = 0
        for case in range(RESPONSE_CASES):
            response, close = generated_response(rng)
            backend.response, backend.close_after = response, close
            head_request = rng.random() < 0.1
            method = b"HEAD" if head_request else b"GET"
            # Twice when the backend keeps the connection: the second response then comes on
            # the pooled connection that parsed the same head just before, and reuses it.
            for repeat in range(1 if close else 2):
                request = b"%s /case HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % method
                started = time.monotonic()
                raw = await exchange(proxy_server.port, request)
                where = f"case {case}.{repeat}: {response!r} (close={close}, {method!r})\n-> {raw[:400]!r}"
                assert time.monotonic() - started < CASE_TIMEOUT, where
                assert not errors, f"{where}\n{errors}"
                expected, refused = backend_view(response, close, head_request)
                if not raw:
                    # cut off: only when the head went out before the body broke
                    assert expected is None, where
                    continue
                status, body, whole = client_view(raw, head_request, where)
                if not whole:  # streamed, then cut off when the backend broke its body
                    assert expected is None and status != 502, where
                    continue
                if expected is None or expected.status == 101:  # 101: switching protocols unasked
                    # 504: the backend stopped short of the length it announced, and went silent
                    assert status == 502 or (status == 504 and not refused), where
                    continue
                assert status == expected.status, where
                passed += 1
                if not head_request and expected.status not in (204, 304):
                    assert body == expected.body, where
        assert passed > RESPONSE_CASES // 3
    finally:
        loop.set_exception_handler(None)
        server.close()
