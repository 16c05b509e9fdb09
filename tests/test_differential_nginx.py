"""Conformance with nginx as the oracle: the same raw requests (smuggling vectors and malformed
framing) go through failover-proxy and through nginx configured as a reverse proxy, both to a
recording backend. For each, either both refuse it, or the backend receives the same requests
(method, target, body) from both. A difference must be listed, with its reason, in
KNOWN_DIFFERENCES, and each of those must be explained in SECURITY.md.

nginx reads bodies whole before forwarding (its request buffering) and sends them with
Content-Length, while failover-proxy may forward chunked: bodies are compared decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest

from failover_proxy.server import ProxyServer

from .conftest import ROOT, free_port, single_upstream_config, wait_for_port

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
    "pipelined body holds a request": (
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n"
        b"GET /inner HTTP/1.1\r\nHost: x\r\n\r\n"[:30]
        + b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"),
}

KNOWN_DIFFERENCES: dict[str, str] = {
    "bare LF line ends": "refused (400): a backend that ends lines only at CRLF would frame it "
                         "differently; nginx accepts LF alone (RFC 9112 allows either)",
    "OPTIONS *": "forwarded in asterisk-form (RFC 9112 3.2.4: a request about the server as a "
                 "whole); nginx refuses it",
    "HTTP/0.9": "refused (505): no header fields, no Host, no framing; nginx serves it",
    "HTTP/1.2": "refused (400, llhttp's version check); nginx serves it as HTTP/1.1 (RFC 9110 "
                "2.5 says a server should)",
    "OPTIONS in absolute-form": "forwarded as OPTIONS * (RFC 9112 3.2.4); nginx sends OPTIONS /",
    "percent-encoded NUL": "forwarded untouched (targets are never decoded); nginx decodes the "
                           "path and refuses it",
    "Host between tabs": "accepted: tabs are whitespace around a field value (RFC 9110 5.5); "
                         "nginx refuses them in Host",
    "space after the version": "refused (400): the request line has exactly three parts; "
                               "nginx tolerates it",
}
"""Vector name -> why failover-proxy differs from nginx there (each also in SECURITY.md)."""


@dataclass
class Received:
    method: bytes
    target: bytes
    body: bytes = b""


@dataclass
class RecordingBackend:
    """Parses what it receives with llhttp and answers 200 to each request."""

    requests: list[Received] = field(default_factory=list)

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
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        parser = httptools.HttpRequestParser(Callbacks())
        try:
            while data := await reader.read(65536):
                parser.feed_data(data)
        except (httptools.HttpParserError, ConnectionError):
            pass
        finally:
            writer.close()


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    answer = b""
    wait = 5.0  # for the first answer (a busy machine is slow), then until idle or closed
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), wait):
            answer += chunk
            wait = 0.4
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    return answer


def statuses(answer: bytes) -> list[int]:
    return [int(line.split(b" ")[1]) for line in answer.split(b"\r\n")
            if line.startswith(b"HTTP/1.") and len(line.split(b" ")) > 1
            and line.split(b" ")[1].isdigit()]


def start_nginx(workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g",
         "daemon off;" + (" user root;" if os.geteuid() == 0 else "")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[tuple[int, RecordingBackend]]:
    recording = RecordingBackend()
    server = await asyncio.start_server(recording.serve, "127.0.0.1", 0)
    backend_port = server.sockets[0].getsockname()[1]
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
    upstream origin {{ server 127.0.0.1:{backend_port}; keepalive 8; }}
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
        yield port, recording
    finally:
        process.terminate()
        process.wait()
        server.close()


async def test_failover_proxy_and_nginx_agree_on_every_vector(
    nginx: tuple[int, RecordingBackend], proxy: object,
) -> None:
    nginx_port, nginx_backend = nginx
    ours_backend = RecordingBackend()
    backend = await asyncio.start_server(ours_backend.serve, "127.0.0.1", 0)
    server: ProxyServer = await proxy(single_upstream_config(  # type: ignore[operator]
        [backend.sockets[0].getsockname()[1]], "    host_header: preserve\n"))
    differences = {}
    report = []
    for name, raw in VECTORS.items():
        seen = []
        for port, recording in ((nginx_port, nginx_backend), (server.port, ours_backend)):
            before = len(recording.requests)
            answer = await exchange(port, raw)
            answered = statuses(answer).count(200)  # each from the backend, which recorded it
            for _ in range(100):
                if len(recording.requests) - before >= answered:
                    break
                await asyncio.sleep(0.02)
            forwarded = [(r.method, r.target, r.body) for r in recording.requests[before:]]
            seen.append((statuses(answer), forwarded))
        (nginx_status, nginx_forwarded), (our_status, our_forwarded) = seen
        report.append(f"{name}: nginx {nginx_status} {nginx_forwarded!r:.80} | "
                      f"ours {our_status} {our_forwarded!r:.80}")
        if nginx_forwarded != our_forwarded:
            differences[name] = (nginx_status, nginx_forwarded, our_status, our_forwarded)
    backend.close()
    print("\n".join(report))
    unexplained = {name: seen for name, seen in differences.items()
                   if name not in KNOWN_DIFFERENCES}
    assert not unexplained, "\n".join(f"{name}: {seen!r:.300}" for name, seen in
                                      unexplained.items())
    stale = set(KNOWN_DIFFERENCES) - set(differences)
    assert not stale, f"listed as differences but now the same: {stale}"
    security = (ROOT / "SECURITY.md").read_text().replace("\\", "")
    for name in KNOWN_DIFFERENCES:
        assert f"**{name}**" in security, f"SECURITY.md does not explain {name!r}"
