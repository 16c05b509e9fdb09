"""HTTP/2 to backends (`protocol: h2c` and `h2`): real HTTP/2 servers as backends (the
simulated providers, which speak h2c on their HTTP/1 port, and servers on the `h2` library's
frames for what they cannot show: the fields a backend receives, trailers, REFUSED_STREAM,
GOAWAY, a connection that goes silent, TLS with ALPN)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import httpx
import pytest
import trustme
from hyperframe.frame import GoAwayFrame

from failover_proxy.ops.admin import backend_status
from failover_proxy.process.server import ProxyServer

from .conftest import StartFaultBackends
from .test_http2 import H2Client, two_providers

StartProxy = Callable[[str], Awaitable[ProxyServer]]


def over_h2c(config: str, extra: str = "") -> str:
    """An upstream config turned to `protocol: h2c` (with `extra` upstream lines)."""
    return config.replace("    policy:", f"    protocol: h2c\n{extra}    policy:", 1)


@dataclass
class Seen:
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)


class H2Backend:
    """An HTTP/2 server on the `h2` library (h2c with prior knowledge, or TLS with ALPN h2)
    whose misbehaviour a test sets: refuse the first `refuse` streams, send GOAWAY after
    `goaway_after` streams (naming none of the later ones processed), or go silent (read and
    answer nothing, PINGs included) once `silent` is set. With `graceful_goaway` it says
    GOAWAY (NO_ERROR) naming a request it then answers 100 ms later (a backend shutting down
    gracefully), or never (`silent_after_goaway`: a host lost while draining)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.seen: list[Seen] = []
        """The requests answered."""
        self.received: list[bytes] = []
        """The path of every request received whole, answered or not."""
        self.connections = 0
        self.refuse = 0
        self.goaway_after = 0
        self.silent = False
        self.graceful_goaway = False
        self.silent_after_goaway = False
        self.trailers: list[tuple[bytes, bytes]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        requests: dict[int, Seen] = {}
        answered = 0
        with contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
            while data := await reader.read(65536):
                if self.silent:
                    continue
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        requests[event.stream_id] = Seen(list(event.headers or []))
                    elif isinstance(event, h2.events.DataReceived):
                        requests[event.stream_id].body += event.data or b""
                        conn.acknowledge_received_data(event.flow_controlled_length or 0,
                                                       event.stream_id)
                    elif isinstance(event, h2.events.TrailersReceived):
                        requests[event.stream_id].trailers = list(event.headers or [])
                    elif isinstance(event, h2.events.StreamEnded):
                        seen = requests.pop(event.stream_id)
                        self.received.append(dict(seen.headers)[b":path"])
                        if self.refuse > 0:
                            self.refuse -= 1
                            conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                            continue
                        if self.goaway_after and answered >= self.goaway_after:
                            self.goaway_after = 0
                            conn.close_connection(last_stream_id=event.stream_id - 2)
                            writer.write(conn.data_to_send())
                            await writer.drain()
                            writer.close()
                            return
                        if self.graceful_goaway:
                            self.graceful_goaway = False
                            # (by hand: `h2` would take the connection for closed after it)
                            writer.write(GoAwayFrame(0, last_stream_id=event.stream_id,
                                                     error_code=0).serialize())
                            if self.silent_after_goaway:
                                self.silent = True
                                break
                            await asyncio.sleep(0.1)
                        answered += 1
                        self.seen.append(seen)
                        self._answer(conn, event.stream_id, seen)
                writer.write(conn.data_to_send())
        writer.close()

    def _answer(self, conn: h2.connection.H2Connection, stream_id: int, seen: Seen) -> None:
        body = json.dumps({"backend": "h2", "body_bytes": len(seen.body)}).encode()
        conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/json"),
                                      (b"connection-test", b"kept")])
        conn.send_data(stream_id, body, end_stream=not self.trailers)
        if self.trailers:
            conn.send_headers(stream_id, self.trailers, end_stream=True)


@pytest.fixture
async def h2_backend() -> Any:
    started: list[H2Backend] = []

    async def start(tls: ssl.SSLContext | None = None) -> H2Backend:
        backend = H2Backend(tls)
        await backend.start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()


def one_backend(port: int, protocol: str = "h2c", scheme: str = "http", extra: str = "") -> str:
    return (
        "listen: {host: 127.0.0.1, port: 0, http2: {h2c: true}}\n"
        f"upstreams:\n  web:\n    protocol: {protocol}\n{extra}    backends:\n"
        f'      - {{name: b0, url: "{scheme}://127.0.0.1:{port}", provider: aws}}\n'
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )


async def test_clients_of_both_protocols_share_one_connection_to_an_h2c_backend(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(over_h2c(two_providers(aws, gcp)))
    url = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(trust_env=False, headers={"host": "example.test"}) as http1:
        answers = await asyncio.gather(*(http1.get(f"{url}/one{n}") for n in range(30)))
        assert {(a.status_code, a.json()["provider"]) for a in answers} == {(200, "aws")}
        posted = await http1.post(f"{url}/post", content=b"p" * 300_000)
        assert posted.json()["body_bytes"] == 300_000
        assert aws.received[-1].body == b"p" * 300_000
    client = await H2Client.connect(server.port)
    try:
        ids = [client.request("GET", f"/two{n}") for n in range(40)]
        answers2 = [await client.answer(i) for i in ids]
        assert {json.loads(a.body)["provider"] for a in answers2} == {"aws"}
        # Each request's id, made by the proxy, reached the backend and came back.
        assert {a.headers[b"x-request-id"].decode() for a in answers2} <= {
            r.request_id for r in aws.received}
    finally:
        await client.close()
    assert aws.open_connections == 1  # 71 requests, 30 of them at once: one connection
    upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
    aws.mode, aws.delay = "slow", 0.5
    async with httpx.AsyncClient(trust_env=False, headers={"host": "example.test"}) as http1:
        slow = asyncio.gather(*(http1.get(f"{url}/slow{n}") for n in range(5)))
        await asyncio.sleep(0.25)
        during = backend_status(upstream.backends[0], upstream)
        await slow
    assert (during["connections"], during["streams"]) == (1, 5)  # what /status shows
    aws.mode = "healthy"
    await aws.set_mode("refusing")
    async with httpx.AsyncClient(trust_env=False, headers={"host": "example.test"}) as http1:
        moved = await asyncio.gather(*(http1.get(f"{url}/moved{n}") for n in range(10)))
    assert {(a.status_code, a.json()["provider"]) for a in moved} == {(200, "gcp")}


async def test_fields_and_trailers_are_translated_both_ways(
    h2_backend: Any, proxy: StartProxy
) -> None:
    """What an h2c backend receives from an HTTP/1 client: :authority for Host, no
    connection-specific field, the proxy's forwarding fields, `te: trailers` when asked; and
    the backend's trailers reach an HTTP/1 client (chunked) and an HTTP/2 one."""
    backend = await h2_backend()
    backend.trailers = [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]
    server = await proxy(one_backend(backend.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /up?x=1 HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, X-Hop\r\n"
                 b"X-Hop: no\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nCookie: a=1\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    rest = b""
    while not rest.endswith(b"\r\n\r\n"):
        rest += await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"connection-test: kept" in head.lower()
    assert rest.endswith(b"0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n")
    seen = backend.seen[-1]
    fields = dict(seen.headers)
    assert fields[b":authority"] == b"127.0.0.1:%d" % backend.port
    assert fields[b":path"] == b"/up?x=1" and fields[b":scheme"] == b"http"
    assert fields[b"x-forwarded-host"] == b"example.test"
    assert fields[b"x-forwarded-for"] == b"127.0.0.1"
    assert fields[b"te"] == b"trailers" and fields[b"cookie"] == b"a=1"
    assert b"x-request-id" in fields and fields[b"via"] == b"1.1 failover-proxy"
    names = {name for name, _ in seen.headers}
    assert not names & {b"host", b"connection", b"keep-alive", b"x-hop", b"transfer-encoding"}
    assert seen.body == b"abc" and seen.trailers == [(b"x-sum", b"9")]
    client = await H2Client.connect(server.port)
    try:
        answer = await client.answer(client.request("GET", "/h2", headers=[("te", "trailers")]))
    finally:
        await client.close()
    assert answer.status == 200 and answer.trailers == backend.trailers


@pytest.mark.parametrize("misbehaviour", ["refused_stream", "goaway"])
async def test_a_request_the_backend_never_processed_is_sent_again_whatever_its_method(
    h2_backend: Any, proxy: StartProxy, misbehaviour: str
) -> None:
    """RFC 9113 §8.7: a stream refused (REFUSED_STREAM) or above a GOAWAY's last stream id
    never reached the application, so even a POST is sent again (on a new connection after
    a GOAWAY), and the client sees nothing but its answer."""
    backend = await h2_backend()
    server = await proxy(one_backend(backend.port))
    url = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.post(f"{url}/first", content=b"1")).status_code == 200
        if misbehaviour == "refused_stream":
            backend.refuse = 1
        else:
            backend.goaway_after = 1  # (counted on the connection: the first was answered)
        answer = await client.post(f"{url}/again", content=b"12345")
    assert answer.status_code == 200 and answer.json()["body_bytes"] == 5
    assert [dict(s.headers)[b":path"] for s in backend.seen] == [b"/first", b"/again"]
    assert backend.connections == (2 if misbehaviour == "goaway" else 1)
    retries = server.store.counters["retries"]
    assert retries == {("web", "unprocessed"): 1.0}
    backend_state = server.plane.topology.upstreams["web"].backends[0]  # type: ignore[union-attr]
    assert backend_state.consecutive_failures == 0  # not the backend's failure


async def test_a_graceful_goaway_lets_the_streams_below_it_finish(
    h2_backend: Any, proxy: StartProxy
) -> None:
    """A backend going away gracefully (GOAWAY NO_ERROR naming the request in progress)
    still answers that request on the old connection: the client gets it, nothing is retried,
    and the next request opens a new connection."""
    backend = await h2_backend()
    server = await proxy(one_backend(backend.port))
    url = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"{url}/first")).status_code == 200
        backend.graceful_goaway = True
        answer = await client.post(f"{url}/during", content=b"123")
        assert answer.status_code == 200 and answer.json()["body_bytes"] == 3
        assert (await client.get(f"{url}/after")).status_code == 200
    assert backend.received == [b"/first", b"/during", b"/after"]  # (no second try)
    assert backend.connections == 2
    assert not server.store.counters["retries"]


@pytest.mark.parametrize("draining", [False, True])
async def test_a_connection_that_goes_silent_is_found_by_ping(
    h2_backend: Any, fault_backends: StartFaultBackends, proxy: StartProxy, draining: bool
) -> None:
    """A backend that stops answering on its connection, PINGs included (a host gone without
    a word): the PING unanswered within ping_timeout ends the connection, and the request on
    it is retried elsewhere long before its 10 s read timeout. `draining`: the connection was
    retired by the backend's GOAWAY first, with the request in progress on it (retired
    connections are PINGed too)."""
    backend = await h2_backend()
    (gcp,) = await fault_backends("gcp-a")
    server = await proxy(
        "listen: {host: 127.0.0.1, port: 0}\n"
        "upstreams:\n  web:\n    protocol: h2c\n"
        "    http2: {ping_interval: 200ms, ping_timeout: 300ms}\n"
        "    timeouts: {read: 10s}\n    backends:\n"
        f'      - {{name: aws-a, url: "http://127.0.0.1:{backend.port}", provider: aws}}\n'
        f'      - {{name: gcp-a, url: "http://127.0.0.1:{gcp.port}", provider: gcp}}\n'
        "    policy: {strategy: priority, providers: [aws, gcp]}\n"
        "routes:\n  - {path_prefix: /, upstream: web}\n")
    url = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        assert (await client.get(f"{url}/warm")).json()["backend"] == "h2"
        if draining:
            backend.graceful_goaway = backend.silent_after_goaway = True
        else:
            backend.silent = True
        started = asyncio.get_running_loop().time()
        answer = await client.get(f"{url}/after")
        took = asyncio.get_running_loop().time() - started
    assert answer.status_code == 200 and answer.json()["provider"] == "gcp"
    assert took < 2.0, took  # ping_interval + ping_timeout + sweeps, not the read timeout


async def test_health_checks_speak_http2_to_http2_backends(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(over_h2c(two_providers(aws, gcp), (
        "    health_check: {path: /healthz, interval: 100ms, unhealthy_interval: 100ms,"
        " healthy_threshold: 1, unhealthy_threshold: 1, jitter: 0%}\n")))
    backend = server.plane.topology.upstreams["web"].backends[0]  # type: ignore[union-attr]
    aws.health_mode = "5xx"
    for _ in range(100):
        if not backend.healthy:
            break
        await asyncio.sleep(0.05)
    assert not backend.healthy and "status 503" in backend.reason
    aws.health_mode = None
    for _ in range(100):
        if backend.healthy:
            break
        await asyncio.sleep(0.05)
    assert backend.healthy
    assert aws.probe_protocols["h2"] >= 2 and not aws.probe_protocols["http1"]


def backend_tls(tmp_path: Path, alpn: list[str]) -> tuple[ssl.SSLContext, str]:
    """A backend's TLS context (certificate for backend.test, offering `alpn`) and the upstream
    lines that trust it."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("backend.test").configure_cert(context)
    context.set_alpn_protocols(alpn)
    ca_file = tmp_path / f"ca-{len(list(tmp_path.glob('ca-*')))}.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, f"    tls: {{ca_file: {ca_file}, server_name: backend.test}}\n"


async def test_h2_over_tls_agreed_by_alpn(
    tmp_path: Path, h2_backend: Any, proxy: StartProxy
) -> None:
    context, tls = backend_tls(tmp_path, ["h2"])
    backend = await h2_backend(context)
    server = await proxy(one_backend(
        backend.port, "h2", "https", tls))
    async with httpx.AsyncClient(trust_env=False) as client:
        answers = await asyncio.gather(*(
            client.get(f"http://127.0.0.1:{server.port}/tls{n}") for n in range(10)))
    assert {a.status_code for a in answers} == {200}
    assert backend.connections == 1


async def test_a_backend_that_does_not_agree_to_h2_is_a_connect_failure(
    tmp_path: Path, h2_backend: Any, proxy: StartProxy
) -> None:
    """`protocol: h2` over TLS needs the backend to pick h2 by ALPN (RFC 9113 §3.2); one that
    offers only HTTP/1.1 fails the connect, and the client is told why."""
    context, tls = backend_tls(tmp_path, ["http/1.1"])
    backend = await h2_backend(context)
    server = await proxy(one_backend(backend.port, "h2", "https", tls))
    async with httpx.AsyncClient(trust_env=False) as client:
        answer = await client.get(f"http://127.0.0.1:{server.port}/no-h2")
    assert answer.status_code in (502, 503)
    assert "did not agree to HTTP/2" in answer.text or "no usable backend" in answer.text
    assert not backend.seen


async def test_auto_speaks_h2_where_the_backend_agrees_and_http1_where_not(
    tmp_path: Path, h2_backend: Any, proxy: StartProxy
) -> None:
    h2_context, h2_tls = backend_tls(tmp_path, ["h2"])
    http1_context, http1_tls = backend_tls(tmp_path, ["http/1.1"])
    h2_only = await h2_backend(h2_context)
    http1_seen: list[bytes] = []

    async def http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                http1_seen.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhttp1\n")
                await writer.drain()

    server1 = await asyncio.start_server(http1, "127.0.0.1", 0, ssl=http1_context)
    port1 = server1.sockets[0].getsockname()[1]
    try:
        for port, expect, tls in ((h2_only.port, "h2", h2_tls), (port1, "http1", http1_tls)):
            server = await proxy(one_backend(port, "auto", "https", tls))
            async with httpx.AsyncClient(trust_env=False) as client:
                answers = [await client.get(f"http://127.0.0.1:{server.port}/auto{n}")
                           for n in range(3)]
            assert {a.status_code for a in answers} == {200}
            if expect == "h2":
                assert {a.json()["backend"] for a in answers} == {"h2"}
                assert len(h2_only.seen) == 3
            else:
                assert {a.text for a in answers} == {"http1\n"} and len(http1_seen) == 3
    finally:
        server1.close()
