"""Conformance with nginx as the oracle: the same raw requests go through failover-proxy and
through nginx configured as a reverse proxy, both to a recording backend. For each, either both
refuse it, or the backend receives the same requests (method, target, body) from both.

Two sets: hand-written smuggling vectors and malformed framing, and the framing fuzz test's
generator (seeded, so every run sends the same requests). A difference must belong to a
category in KNOWN_DIFFERENCES, each recognized from the raw request by a predicate and explained
in SECURITY.md.

nginx reads bodies whole before forwarding (its request buffering) and sends them with
Content-Length, while failover-proxy may forward chunked: bodies are compared decoded. nginx's
header limits are set to failover-proxy's (32 KiB), so a difference of limits is not taken for
one of parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest

from failover_proxy.dataplane.http1.headers import HOST_BYTES
from failover_proxy.process.server import ProxyServer

from .conftest import ROOT, free_port, single_upstream_config, wait_for_port
from .test_fuzz_framing import Collector, generated_request

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None,
                                reason="nginx is not installed (make test installs it)")

VECTORS: dict[str, bytes] = {
    "plain GET": b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST with length": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    "POST chunked": (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n"),
    "CL and TE": (b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
    "two lengths, different": (b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                               b"Content-Length: 5\r\n\r\nhello"),
    "length with sign": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "length not a number": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5a\r\n\r\nhello",
    "TE xchunked": (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n"),
    "TE chunked, identity": (b"POST /p HTTP/1.1\r\nHost: x\r\n"
                             b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    "TE space before colon": (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n"
                              b"0\r\n\r\n"),
    "TE on HTTP/1.0": (b"POST /p HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"0\r\n\r\n"),
    "chunk size overflow": (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"ffffffffffffffffff1\r\nx\r\n0\r\n\r\n"),
    "chunk size 0x": (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk without CRLF": (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"5\r\nhelloXX0\r\n\r\n"),
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "bare CR in a field": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "bare LF line ends": b"GET /lf HTTP/1.1\nHost: x\n\n",
    "NUL in a field value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "control byte in a name": b"GET / HTTP/1.1\r\nHost: x\r\nX\x01A: b\r\n\r\n",
    "absolute-form": b"GET http://x/abs?q=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-form without Host": b"PURGE http://h.example:8080 HTTP/1.1\r\n\r\n",
    "OPTIONS in absolute-form": (b"OPTIONS http://h.example:8080 HTTP/1.1\r\n"
                                 b"Host: h.example:8080\r\n\r\n"),
    "percent-encoded NUL": b"GET /%00x HTTP/1.1\r\nHost: x\r\n\r\n",
    "Host between tabs": b"GET / HTTP/1.1\r\nHost:\tx\t\r\n\r\n",
    "space after the version": b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n",
    "OPTIONS *": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET *": b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/0.9": b"GET /\r\n\r\n",
    "HTTP/1.2": b"GET / HTTP/1.2\r\nHost: x\r\n\r\n",
    "HTTP/2.0 line": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    "no Host on 1.1": b"GET / HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "Host with a space": b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
    "lowercase method": b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown method": b"FOO /m HTTP/1.1\r\nHost: x\r\n\r\n",
    "underscored length": (b"POST /p HTTP/1.1\r\nHost: x\r\nContent_Length: 5\r\n"
                           b"Content-Length: 0\r\n\r\n"),
    "huge request line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "huge field": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n",
    "unknown expectation": b"GET / HTTP/1.1\r\nHost: x\r\nExpect: nonsense\r\n\r\n",
    "invalid field name": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Lengt\"h: 5\r\n\r\nhello",
    "invalid byte in Host": b"GET / HTTP/1.1\r\nHost: x.exa\xffmple\r\n\r\n",
    "absolute-form with an invalid port": b"GET http://x:99999/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "CR before the line end": b"GET / HTTP/1.1\r\nHost: x\r\r\n\r\n",
    "two spaces after the method": b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-form of another scheme": b"GET ftp://x/f HTTP/1.1\r\nHost: x\r\n\r\n",
    "upgrade with a body": (b"POST /chat HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n"
                            b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\nhello"),
    "pipelined body holds a request": (
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n"
        b"GET /inner HTTP/1.1\r\nHost: x\r\n\r\n"[:30]
        + b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"),
}


def request_line(raw: bytes) -> bytes:
    return raw.split(b"\n", 1)[0].removesuffix(b"\r")


def head(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def field_lines(raw: bytes) -> list[bytes]:
    """The head's lines after the request line, obs-folds left out."""
    return [line for line in head(raw).split(b"\r\n")[1:] if line[:1] not in (b" ", b"\t")]


def field_values(raw: bytes, name: bytes) -> list[bytes]:
    return [line.partition(b":")[2].strip(b" \t") for line in field_lines(raw)
            if line.partition(b":")[0].lower() == name]


def has_token(raw: bytes, name: bytes, token: bytes) -> bool:
    return any(token in (item.strip(b" \t").lower() for item in value.split(b","))
               for value in field_values(raw, name))


def has_invalid_port(raw: bytes) -> bool:
    """Whether an absolute-form target has an empty port or one over 65535."""
    target = re.match(rb"\S+ +https?://([^/?#\s]*)", request_line(raw), re.IGNORECASE)
    if target is None:
        return False
    _, colon, port = target[1].rpartition(b"]")[2].partition(b":")
    return bool(colon) and not (port.isdigit() and int(port) <= 65535)


def upgrade_with_body(raw: bytes) -> bool:
    return (has_token(raw, b"connection", b"upgrade") and bool(field_values(raw, b"upgrade"))
            and bool(field_values(raw, b"content-length")
                     + field_values(raw, b"transfer-encoding")))


def read_further_with_bare_lf(raw: bytes) -> bool:
    """Whether llhttp, allowed to end lines with LF alone, reads `raw` further than strictly
    (an LF after chunk data that is itself a CR, say, which no pattern tells)."""
    strict = Collector().feed(raw)
    if strict.error is None:
        return False
    lenient = Collector()
    lenient.parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    lenient.feed(raw)
    return lenient.error is None or len(lenient.complete) > len(strict.complete)


NOT_IN_A_NAME = re.compile(rb'[\x22(),/;<=>?@\[\\\]{}\x80-\xff]')
"""Printable bytes and high bytes outside a token (RFC 9110 5.6.2): nginx drops a field
whose name has one (its ignore_invalid_headers), and refuses control bytes."""


@dataclass(frozen=True)
class Known:
    """A known difference: why failover-proxy differs from nginx, and how to recognize a
    request of this kind from its bytes."""

    reason: str
    matches: Callable[[bytes], bool]


KNOWN_DIFFERENCES: dict[str, Known] = {
    "bare LF line ends": Known(
        "refused (400): a backend that ends lines only at CRLF would frame it differently; "
        "nginx accepts LF alone (RFC 9112 allows either)",
        lambda raw: re.search(rb"(?<!\r)\n", raw) is not None or read_further_with_bare_lf(raw)),
    "OPTIONS *": Known(
        "forwarded in asterisk-form (RFC 9112 3.2.4: a request about the server as a whole); "
        "nginx refuses it",
        lambda raw: request_line(raw).startswith(b"OPTIONS * ")),
    "HTTP/0.9": Known(
        "refused (505): no header fields, no Host, no framing; nginx serves it",
        lambda raw: re.fullmatch(rb"\S+ \S+ ?", request_line(raw)) is not None),
    "HTTP/1.2": Known(
        "refused (400, llhttp's version check); nginx serves it as HTTP/1.1 (RFC 9110 2.5 says "
        "a server should)",
        lambda raw: re.search(rb" HTTP/1\.[2-9]", request_line(raw)) is not None),
    "OPTIONS in absolute-form": Known(
        "forwarded as OPTIONS * (RFC 9112 3.2.4); nginx sends OPTIONS /",
        lambda raw: re.match(rb"OPTIONS https?://[^/?\s]+ ", request_line(raw)) is not None),
    "percent-encoded NUL": Known(
        "forwarded untouched (targets are never decoded); nginx decodes the path and refuses it",
        lambda raw: b"%00" in request_line(raw)),
    "Host between tabs": Known(
        "accepted: tabs are whitespace around a field value (RFC 9110 5.5); nginx refuses them "
        "in Host",
        lambda raw: re.search(rb"(?im)^host:[ \t]*\t|^host:.*\t\r?$", head(raw)) is not None),
    "space after the version": Known(
        "refused (400): the request line has exactly three parts; nginx tolerates it",
        lambda raw: re.search(rb" HTTP/\S+ +$", request_line(raw)) is not None),
    "unknown expectation": Known(
        "refused (417, as RFC 9110 10.1.1 allows): nginx ignores Expect and forwards it",
        lambda raw: any(value.lower() != b"100-continue"
                        for value in field_values(raw, b"expect"))),
    "invalid field name": Known(
        "refused (400): nginx drops the field and forwards the rest, so a misspelt "
        "Content-Length leaves the body to be read as the next request",
        lambda raw: any(NOT_IN_A_NAME.search(line.partition(b":")[0]) or b":" not in line
                        for line in field_lines(raw))),
    "invalid byte in Host": Known(
        "refused (400): a Host holds a host name or address and a port (RFC 3986 3.2.2), so "
        "no quote, no byte above 127; nginx accepts them",
        lambda raw: any(value.translate(None, HOST_BYTES)
                        for value in field_values(raw, b"host"))),
    "absolute-form with an invalid port": Known(
        "refused (400): an empty port or one over 65535 (llhttp's URL check); nginx forwards "
        "the path",
        has_invalid_port),
    "CR before the line end": Known(
        "refused (400): a CR not followed by LF is invalid (RFC 9112 2.2); nginx ignores a CR "
        "before CRLF",
        lambda raw: b"\r\r\n" in raw[: len(head(raw)) + 2]),
    "absolute-form of another scheme": Known(
        "refused (400): an HTTP proxy takes http and https targets (RFC 9112 3.2.2); nginx "
        "takes any scheme and forwards the path",
        lambda raw: re.match(rb"\S+ +[A-Za-z][A-Za-z0-9+.-]*://", request_line(raw)) is not None
        and re.match(rb"\S+ +https?://", request_line(raw), re.IGNORECASE) is None),
    "upgrade with a body": Known(
        "refused (400): llhttp-based servers read such a body as bytes of the new protocol, "
        "others as the body; nginx, not set up here to pass upgrades on, drops Upgrade and "
        "forwards the body",
        upgrade_with_body),
}
"""Category -> why failover-proxy differs from nginx there (each also in SECURITY.md). The
hand-written vector of the same name must be one."""


@dataclass
class Received:
    method: bytes
    target: bytes
    body: bytes = b""


@dataclass
class RecordingBackend:
    """Parses what it receives with llhttp and answers 200 to each request (without a body to
    HEAD: stray bytes would break the next response on a pooled connection)."""

    requests: list[Received] = field(default_factory=list)
    malformed: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self

        class Callbacks:
            current: Received | None = None
            url = b""

            def on_url(self, url: bytes) -> None:
                self.url += url

            def on_headers_complete(self) -> None:
                self.current = Received(parser.get_method(), self.url)
                self.url = b""

            def on_body(self, body: bytes) -> None:
                assert self.current is not None
                self.current.body += body

            def on_message_complete(self) -> None:
                assert self.current is not None
                backend.requests.append(self.current)
                body = b"" if self.current.method == b"HEAD" else b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)

        parser = httptools.HttpRequestParser(Callbacks())
        seen = b""
        try:
            while data := await reader.read(65536):
                seen += data
                parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # a WebSocket handshake, recorded and refused with the 200: the proxy closes
        except httptools.HttpParserError:
            self.malformed.append(seen)
        except ConnectionError:
            pass
        finally:
            writer.close()


FIRST_ANSWER = 5.0
"""How long to wait for the answers llhttp expects (a busy machine is slow)."""
SETTLE = 0.1
"""How long to wait after them for any more, or for any answer to a request llhttp reads as
unfinished (neither server forwards such a request: both wait for its end)."""


async def exchange(port: int, raw: bytes, expected: int) -> bytes:
    """Send `raw`; read until the server closes, or until `expected` final answers came and
    nothing more follows."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    answer = b""
    try:
        while True:
            wait = SETTLE if len(final_statuses(answer)) >= expected else FIRST_ANSWER
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            answer += chunk
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    return answer


STATUS_LINE = re.compile(rb"^HTTP/1\.\d (\d{3})", re.MULTILINE)


def final_statuses(answer: bytes) -> list[int]:
    """The statuses of the answers in `answer`, interim (1xx) ones left out."""
    return [status for status in map(int, STATUS_LINE.findall(answer)) if status >= 200]


def expected_answers(raw: bytes) -> int:
    """How many final answers llhttp's reading of `raw` calls for: one per complete request,
    and one more when it refuses what follows them."""
    oracle = Collector().feed(raw)
    return len(oracle.complete) + (oracle.error is not None)


def start_nginx(workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g",
         "daemon off;" + (" user root;" if os.geteuid() == 0 else "")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


Forwarded = list[tuple[bytes, bytes, bytes]]


@dataclass
class Outcome:
    """What one request did on each side: the statuses the client got, and what reached the
    backend."""

    nginx_statuses: list[int]
    nginx_forwarded: Forwarded
    our_statuses: list[int]
    our_forwarded: Forwarded

    @property
    def same(self) -> bool:
        return self.nginx_forwarded == self.our_forwarded

    def __str__(self) -> str:
        return (f"nginx {self.nginx_statuses} {self.nginx_forwarded!r:.100} | "
                f"ours {self.our_statuses} {self.our_forwarded!r:.100}")


@dataclass
class Sides:
    """nginx and failover-proxy in front of a recording backend each."""

    nginx_port: int
    nginx_backend: RecordingBackend
    our_port: int
    our_backend: RecordingBackend

    async def compare(self, raw: bytes) -> Outcome:
        """Send `raw` to both at once (each has a backend of its own)."""
        expected = expected_answers(raw)
        (nginx_statuses, nginx_forwarded), (our_statuses, our_forwarded) = await asyncio.gather(
            self.one_side(self.nginx_port, self.nginx_backend, raw, expected),
            self.one_side(self.our_port, self.our_backend, raw, expected))
        return Outcome(nginx_statuses, nginx_forwarded, our_statuses, our_forwarded)

    @staticmethod
    async def one_side(port: int, recording: RecordingBackend, raw: bytes,
                       expected: int) -> tuple[list[int], Forwarded]:
        before = len(recording.requests)
        statuses = final_statuses(await exchange(port, raw, expected))
        answered = statuses.count(200)  # each recorded by the backend
        for _ in range(250):
            if len(recording.requests) - before >= answered:
                break
            await asyncio.sleep(0.02)
        forwarded = [(r.method, r.target, r.body) for r in recording.requests[before:]]
        return statuses, forwarded


@pytest.fixture
async def sides(tmp_path: Path, proxy: object) -> AsyncIterator[Sides]:
    nginx_backend = RecordingBackend()
    nginx_origin = await asyncio.start_server(nginx_backend.serve, "127.0.0.1", 0)
    our_backend = RecordingBackend()
    our_origin = await asyncio.start_server(our_backend.serve, "127.0.0.1", 0)
    port = free_port()
    workdir = tmp_path / "nginx"
    workdir.mkdir()
    (workdir / "nginx.conf").write_text(f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    large_client_header_buffers 4 32k;
    upstream origin {{ server 127.0.0.1:{nginx_origin.sockets[0].getsockname()[1]}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://origin; proxy_http_version 1.1;
                     proxy_set_header Connection ""; proxy_set_header Host $http_host; }}
    }}
}}
""")
    process = start_nginx(workdir)
    try:
        await asyncio.to_thread(wait_for_port, port, 10.0)
        server: ProxyServer = await proxy(single_upstream_config(  # type: ignore[operator]
            [our_origin.sockets[0].getsockname()[1]], "    host_header: preserve\n"))
        yield Sides(port, nginx_backend, server.port, our_backend)
    finally:
        process.terminate()
        process.wait()
        nginx_origin.close()
        our_origin.close()
    assert not our_backend.malformed, f"failover-proxy forwarded {our_backend.malformed!r:.300}"


async def test_failover_proxy_and_nginx_agree_on_every_vector(sides: Sides) -> None:
    differences = {}
    report = []
    for name, raw in VECTORS.items():
        outcome = await sides.compare(raw)
        report.append(f"{name}: {outcome}")
        if not outcome.same:
            differences[name] = outcome
    print("\n".join(report))
    unexplained = {name: outcome for name, outcome in differences.items()
                   if name not in KNOWN_DIFFERENCES}
    assert not unexplained, "\n".join(f"{name}: {outcome}" for name, outcome in
                                      unexplained.items())
    stale = set(KNOWN_DIFFERENCES) - set(differences)
    assert not stale, f"listed as differences but now the same: {stale}"
    security = (ROOT / "SECURITY.md").read_text().replace("\\", "")
    for name, known in KNOWN_DIFFERENCES.items():
        assert f"**{name}**" in security, f"SECURITY.md does not explain {name!r}"
        assert known.matches(VECTORS[name]), f"{name!r} does not recognize its own vector"


GENERATED_CASES = 300


async def test_failover_proxy_and_nginx_agree_on_generated_requests(sides: Sides) -> None:
    rng = random.Random(29)
    unexplained = []
    report = []
    forwarded_by_both = 0
    for case in range(GENERATED_CASES):
        raw = generated_request(rng)
        outcome = await sides.compare(raw)
        forwarded_by_both += bool(outcome.same and outcome.our_forwarded)
        if outcome.same:
            continue
        categories = [name for name, known in KNOWN_DIFFERENCES.items() if known.matches(raw)]
        report.append(f"case {case} {categories}: {raw!r:.160}\n  {outcome}")
        if not categories:
            unexplained.append(report[-1])
    print("\n".join(report))
    assert not unexplained, "\n".join(unexplained)
    assert forwarded_by_both > GENERATED_CASES // 4  # the generator makes valid requests too
