"""HTTP/2 from clients with prior knowledge (h2c), on the same port as HTTP/1.1, through the
same exchange to HTTP/1.1 backends: real clients (curl, and the `h2` library over a raw
socket for what curl cannot show: many streams at once, trailers, a stream reset)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx
import pytest
import trustme
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    SettingsFrame,
)

from failover_proxy.dataplane.http2 import engine
from failover_proxy.dataplane.http2.downstream import Http2Connection
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import FaultBackend

from .conftest import RawHandler, StartFaultBackends, read_request_head, single_upstream_config

StartProxy = Callable[[str], Awaitable[ProxyServer]]
StartRaw = Callable[[RawHandler], Awaitable[int]]


@dataclass
class Answer:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: bool = False
    reset_code: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class H2Client:
    """An HTTP/2 client with prior knowledge on a raw socket (the `h2` library's frames)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 cut: int = 0) -> None:
        """`cut`: the first bytes of the preface were already sent on their own."""
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        self.cut = cut
        self.eager = False
        self.answers: dict[int, Answer] = {}
        self.terminated: list[h2.events.ConnectionTerminated] = []
        self.unsent: dict[int, tuple[bytes, bool]] = {}
        self.trailers: dict[int, list[tuple[str, str]] | None] = {}
        """Request bodies (and whether trailers follow) the proxy's windows have no room for."""
        self.h2.initiate_connection()
        self._flush()
        self.pump = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, port: int) -> H2Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if self.writer.transport.is_closing():
            return
        if self.cut:
            data, self.cut = data[self.cut :], 0
        self.writer.write(data)

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._read_frames()
        for answer in self.answers.values():
            answer.done.set()

    async def _read_frames(self) -> None:
        while data := await self.reader.read(65536):
            events = self.h2.receive_data(data)
            for event in events:
                answer = self.answers.get(getattr(event, "stream_id", 0) or 0)
                if answer is None:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers or [])
                    answer.status = int(headers.pop(b":status"))
                    answer.headers = headers
                elif isinstance(event, h2.events.DataReceived):
                    answer.body += event.data or b""
                    if self.eager:  # a WINDOW_UPDATE for every DATA frame, as h2load sends
                        self.h2.increment_flow_control_window(event.flow_controlled_length or 1)
                    else:
                        self.h2.acknowledge_received_data(event.flow_controlled_length or 0,
                                                          event.stream_id or 0)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = list(event.headers or [])
                elif isinstance(event, h2.events.StreamEnded):
                    answer.done.set()
                elif isinstance(event, h2.events.StreamReset):
                    answer.reset = True
                    answer.reset_code = int(event.error_code or 0)
                    answer.done.set()
            self.terminated += [e for e in events
                                if isinstance(e, h2.events.ConnectionTerminated)]
            for stream_id, (body, more) in list(self.unsent.items()):
                self._send_body(stream_id, body, more)
            self._flush()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: list[tuple[str, str]] | None = None,
                trailers: list[tuple[str, str]] | None = None) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"),
                  (":authority", "example.test"), *(headers or [])]
        self.answers[stream_id] = Answer()
        self.h2.send_headers(stream_id, fields, end_stream=not body and not trailers)
        self.trailers[stream_id] = trailers
        if body:
            self._send_body(stream_id, body, bool(trailers))
        elif trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        self._flush()
        return stream_id

    def _send_body(self, stream_id: int, body: bytes, more: bool) -> None:
        """As much of a request body as the proxy's windows allow (the rest waits for its
        WINDOW_UPDATEs: the proxy grants them only as the backend takes the body)."""
        self.unsent.pop(stream_id, None)
        while body:
            room = min(self.h2.local_flow_control_window(stream_id),
                       self.h2.max_outbound_frame_size)
            if room <= 0:
                self.unsent[stream_id] = (body, more)
                return
            last = len(body) <= room
            self.h2.send_data(stream_id, body[:room], end_stream=last and not more)
            body = body[room:]
        trailers = self.trailers.get(stream_id)
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)

    async def answer(self, stream_id: int, timeout: float = 5.0) -> Answer:
        answer = self.answers[stream_id]
        await asyncio.wait_for(answer.done.wait(), timeout)
        return answer

    def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id)
        self._flush()

    async def close(self) -> None:
        self.writer.close()
        self.pump.cancel()


def two_providers(aws: FaultBackend, gcp: FaultBackend) -> str:
    return (
        "listen: {host: 127.0.0.1, port: 0, http2: {h2c: true}}\n"
        "upstreams:\n  web:\n    backends:\n"
        f'      - {{name: aws-a, url: "http://127.0.0.1:{aws.port}", provider: aws}}\n'
        f'      - {{name: gcp-a, url: "http://127.0.0.1:{gcp.port}", provider: gcp}}\n'
        "    policy: {strategy: priority, providers: [aws, gcp]}\n"
        "routes:\n  - {host: example.test, path_prefix: /, upstream: web}\n"
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_with_prior_knowledge_and_http1_share_the_port(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp))
    url = f"http://127.0.0.1:{server.port}/hello"
    for flag in ("--http2-prior-knowledge", "--http1.1"):
        result = await asyncio.to_thread(
            subprocess.run,
            ["curl", "-s", "-i", flag, "-H", "Host: example.test", url],
            capture_output=True, timeout=10, check=True,
        )
        head, body = result.stdout.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/2 200" if "http2" in flag else b"HTTP/1.1 200"), head
        assert b"\nvia: 1.1 failover-proxy" in head.lower()
        assert b"\nx-request-id: " in head.lower()
        assert json.loads(body)["provider"] == "aws"


async def test_h2c_can_be_turned_off(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """`h2c: false`: the preface is then read as HTTP/1.1, and refused as malformed."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp).replace("{h2c: true}", "{h2c: false}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_many_streams_on_one_connection_and_failover_under_them(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp))
    client = await H2Client.connect(server.port)
    # The preface may come cut in pieces: the first read alone cannot tell.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"PRI * HT")
    await asyncio.sleep(0.05)
    cut = H2Client(reader, writer, cut=8)
    assert (await cut.answer(cut.request("GET", "/cut"))).status == 200
    await cut.close()
    try:
        ids = [client.request("GET", f"/s{i}") for i in range(40)]
        answers = [await client.answer(i) for i in ids]
        assert {a.status for a in answers} == {200}
        assert {json.loads(a.body)["provider"] for a in answers} == {"aws"}
        assert len({a.headers[b"x-request-id"] for a in answers}) == 40
        await aws.set_mode("refusing")  # connect failures: retried on gcp, unseen
        ids = [client.request("GET", f"/f{i}") for i in range(20)]
        answers = [await client.answer(i) for i in ids]
        assert {(a.status, json.loads(a.body)["provider"]) for a in answers} == {(200, "gcp")}
        posted = await client.answer(client.request("POST", "/post", b"x" * 100_000))
        assert posted.status == 200 and json.loads(posted.body)["provider"] == "gcp"
        assert gcp.received[-1].body == b"x" * 100_000
        anywhere = await client.answer(client.request("GET", "/nowhere"))
        assert anywhere.status == 200  # routed by :authority (example.test), any path
    finally:
        await client.close()


async def test_no_route_and_trailers_and_a_reset_stream(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    got: list[bytes] = []
    release = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            got.append(head)
            body = b""
            if b"transfer-encoding: chunked" in head.lower():
                while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) != 0:
                    body += (await reader.readexactly(size + 2))[:-2]
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    got.append(line)
            if head.startswith(b"GET /app/hang"):
                await release.wait()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n0\r\nGrpc-Status: 0\r\n\r\n" % (len(body) or 2,
                                                                     body or b"ok"))
            await writer.drain()

    port = await raw_backend(backend)
    config = single_upstream_config([port]).replace(
        "{path_prefix: /, upstream: web}", "{path_prefix: /app, upstream: web}").replace(
        "port: 0}", "port: 0, http2: {h2c: true}}", 1)
    server = await proxy(config)
    client = await H2Client.connect(server.port)
    try:
        missing = await client.answer(client.request("GET", "/other"))
        assert missing.status == 404 and b"no route" in missing.body
        with_trailers = await client.answer(client.request(
            "POST", "/app/up", b"abc", headers=[("te", "trailers")],
            trailers=[("checksum", "c1")]))
        assert with_trailers.status == 200 and with_trailers.body == b"abc"
        assert with_trailers.trailers == [(b"grpc-status", b"0")]
        assert b"checksum: c1\r\n" in got  # the request's trailers reached the backend
        posted = next(h for h in got if h.startswith(b"POST"))
        assert b"\r\nte: trailers\r\n" in posted.lower()  # asked for on the proxy's hop
        without = await client.answer(client.request("GET", "/app/plain"))
        assert without.status == 200 and without.trailers == []
        hanging = client.request("GET", "/app/hang")
        upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
        for _ in range(200):
            if upstream.backends[0].in_flight:
                break
            await asyncio.sleep(0.01)
        client.reset(hanging)  # the client gives up: the exchange is abandoned
        for _ in range(200):
            if not upstream.backends[0].in_flight and not upstream.active_requests:
                break
            await asyncio.sleep(0.01)
        assert upstream.backends[0].in_flight == 0 and upstream.active_requests == 0
        after = await client.answer(client.request("GET", "/app/after"))
        assert after.status == 200  # the connection serves on
    finally:
        release.set()
        await client.close()


async def served_beside(port: int) -> float:
    """How long a well-behaved client on its own connection waits for an answer."""
    client = await H2Client.connect(port)
    try:
        started = asyncio.get_running_loop().time()
        answer = await client.answer(client.request("GET", "/beside"))
        assert answer.status == 200
        return asyncio.get_running_loop().time() - started
    finally:
        await client.close()


async def test_a_rapid_reset_flood_is_cut_off(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """CVE-2023-44487: streams opened and reset at once, each costing the proxy a backend
    request and the client nothing. Past 100 such resets making half its streams, the client
    gets GOAWAY ENHANCE_YOUR_CALM and is cut off; the backend saw a bounded number of them."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    aws.mode, aws.delay = "slow", 1.0
    server = await proxy(two_providers(aws, gcp))
    attacker = await H2Client.connect(server.port)
    try:
        for _ in range(10):
            if attacker.terminated or attacker.writer.transport.is_closing():
                break
            for _ in range(100):
                stream_id = attacker.request("GET", "/flood")
                attacker.h2.reset_stream(stream_id)
            attacker._flush()
            await asyncio.sleep(0.02)
        await asyncio.wait_for(attacker.pump, 5)  # it ends when the proxy closes
    finally:
        await attacker.close()
    goaway = attacker.terminated
    assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    print(f"rapid reset: {len(aws.received)} of the streams reached the backend")
    assert len(aws.received) < 400  # far fewer than the 1,000 streams it tried
    aws.mode = "healthy"
    assert await served_beside(server.port) < 1.0
    upstream = server.plane.topology.upstreams["web"]  # type: ignore[union-attr]
    for _ in range(300):
        if all(b.in_flight == 0 for b in upstream.backends) and not upstream.active_requests:
            break
        await asyncio.sleep(0.01)
    assert [b.in_flight for b in upstream.backends] == [0, 0]


async def test_a_ping_flood_from_a_client_that_never_reads_is_cut_off(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """Each PING asks for an answer. A client that sends them by the thousand and reads
    none: the proxy stops reading it when its answers back up, and cuts it off past 1,000
    such frames a second; another client is served meanwhile."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    attacker = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    attacker.initiate_connection()
    writer.write(attacker.data_to_send())
    for _ in range(20):
        for n in range(500):
            attacker.ping(n.to_bytes(8, "big"))
        if writer.transport.is_closing():
            break
        writer.write(attacker.data_to_send())
        await asyncio.sleep(0)
    assert await served_beside(server.port) < 1.0
    for _ in range(300):
        if writer.transport.is_closing() or reader.at_eof():
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(1 << 20), 0.05)
    refused = server.store.counters["connections_refused"]
    assert refused.get(("http2_flood",)) == 1.0
    writer.close()


async def test_h2_over_tls_by_alpn_beside_http1(
    tmp_path: Path, fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """`listen.tls.alpn: [h2, http/1.1]`: a client that asks for h2 gets HTTP/2, one that
    does not gets HTTP/1.1, on the same TLS listener."""
    ca = trustme.CA()
    issued = ca.issue_cert("example.test")
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp).replace(
        "listen: {host: 127.0.0.1, port: 0, http2: {h2c: true}}\n",
        "listen:\n  host: 127.0.0.1\n  port: 0\n  tls:\n"
        f"    certificates: [{{cert_file: {cert}, key_file: {key}}}]\n"
        "    alpn: [h2, http/1.1]\n",
    ))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    url = f"https://example.test:{server.port}/tls"
    transport = httpx.AsyncHTTPTransport(verify=context, http2=True)
    with_h2 = httpx.AsyncClient(transport=transport, trust_env=False)
    only_h1 = httpx.AsyncClient(verify=context, trust_env=False)
    try:
        # The name resolves to 127.0.0.1 by the client's own mapping: SNI and the certificate
        # need the name, loopback is the only address used.
        for client, version in ((with_h2, "HTTP/2"), (only_h1, "HTTP/1.1")):
            responses = await asyncio.gather(*(
                client.get(url.replace("example.test", "127.0.0.1"),
                           headers={"host": "example.test"},
                           extensions={"sni_hostname": "example.test"})
                for _ in range(5)
            ))
            assert {r.http_version for r in responses} == {version}
            assert {r.json()["provider"] for r in responses} == {"aws"}
    finally:
        await with_h2.aclose()
        await only_h1.aclose()


@pytest.mark.parametrize("fields", [
    [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", "example.test"),
     ("X-Upper", "1")],
    [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", "example.test"),
     ("connection", "keep-alive")],
    [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", "example.test"),
     ("te", "gzip")],
    [(":method", "GET"), (":scheme", "http"), (":authority", "example.test")],
    [(":method", "GET"), (":path", "/x"), ("a", "1"), (":scheme", "http")],
    [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":status", "200")],
    [(":method", "GET"), (":path", "x"), (":scheme", "http"), (":authority", "example.test")],
    [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", "example.test"),
     ("x", " padded")],
])
async def test_a_malformed_request_resets_its_stream_only(
    fault_backends: StartFaultBackends, proxy: StartProxy, fields: list[tuple[str, str]]
) -> None:
    """RFC 9113 §8.1.1: a malformed request is a stream error (RST_STREAM PROTOCOL_ERROR);
    the connection, and the other streams on it, carry on."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp))
    client = await H2Client.connect(server.port)
    client.h2.config.validate_outbound_headers = False
    client.h2.config.normalize_outbound_headers = False
    try:
        stream_id = client.h2.get_next_available_stream_id()
        client.answers[stream_id] = Answer()
        client.h2.send_headers(stream_id, fields, end_stream=True)
        client._flush()
        bad = await client.answer(stream_id)
        assert bad.reset and bad.status == 0
        good = await client.answer(client.request("GET", "/fine"))
        assert good.status == 200
    finally:
        await client.close()
    assert not aws.requests_since(0, "/x")
    errors = server.store.counters["http2_stream_errors"]
    assert errors == {("malformed_request",): 1.0}


async def raw_attacker(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has sent the preface and an empty SETTINGS frame, nothing more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    return reader, writer


async def cut_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Everything the proxy sends until it closes the connection (bounded wait)."""
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
    writer.close()
    return received


def goaway_code(received: bytes) -> int | None:
    """The error code of the GOAWAY frame among the frames received, if any."""
    at = 0
    while at + 9 <= len(received):
        frame, length = Frame.parse_frame_header(memoryview(received[at : at + 9]))
        frame.parse_body(memoryview(received[at + 9 : at + 9 + length]))
        if isinstance(frame, GoAwayFrame):
            return int(frame.error_code)
        at += 9 + length
    return None


async def test_a_continuation_flood_is_cut_off(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """A header block that never ends (HEADERS, then CONTINUATION frames without
    END_HEADERS): the proxy stops holding it after 64 frames and ends the connection."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp))
    reader, writer = await raw_attacker(server.port)
    block = Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                              (":authority", "example.test")])
    writer.write(HeadersFrame(1, block).serialize())
    for _ in range(500):
        frame = ContinuationFrame(1, b"\x40\x01a\x01b" * 100)  # literal fields, never ending
        writer.write(frame.serialize())
    assert await served_beside(server.port) < 1.0
    received = await cut_off(reader, writer)
    assert goaway_code(received) is not None
    assert [r.path for r in aws.received] == ["/beside"]  # nothing of the endless block


async def test_an_hpack_bomb_is_cut_off(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """One large field put in the dynamic table, then referred to a thousand times by one
    byte each: a few kilobytes on the wire, megabytes decoded. Past the header list size the
    proxy announced, the connection is ended."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp))
    reader, writer = await raw_attacker(server.port)
    encoder = Encoder()
    first = encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                            (":authority", "example.test"), ("x-bomb", "b" * 4000)])
    index = b"\xbe"  # the dynamic table's first entry (62), indexed
    writer.write(HeadersFrame(1, first, flags=["END_HEADERS", "END_STREAM"]).serialize())
    bomb = encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                           (":authority", "example.test")]) + index * 4000
    writer.write(HeadersFrame(3, bomb[:16000], flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert await served_beside(server.port) < 1.0
    received = await cut_off(reader, writer)
    assert goaway_code(received) is not None
    # At most the first request (whose field is honest, if large), and the one beside.
    assert [r.path for r in aws.received if r.path != "/beside"] in ([], ["/"])


async def test_idle_streams_are_bounded(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """A client that opens as many streams as it may and sends none of their bodies: no
    backend is dialled for them (their bodies are awaited first), each ends by body_timeout
    with 408, and a stream beyond max_concurrent_streams is refused."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp).replace(
        "http2: {h2c: true}", "http2: {h2c: true, max_concurrent_streams: 16}").replace(
        "routes:", "limits: {body_timeout: 500ms}\nroutes:"))
    client = await H2Client.connect(server.port)
    await asyncio.sleep(0.1)  # the proxy's SETTINGS (16 streams at most) have arrived
    try:
        ids = []
        for n in range(16):
            stream_id = client.h2.get_next_available_stream_id()
            client.answers[stream_id] = Answer()
            client.h2.send_headers(stream_id, [
                (":method", "POST"), (":path", f"/idle{n}"), (":scheme", "http"),
                (":authority", "example.test"), ("content-length", "10")])
            ids.append(stream_id)
        client._flush()
        answers = [await client.answer(i, timeout=5) for i in ids]
        assert {a.status for a in answers} == {408}, answers[:2]
        assert not aws.received and not gcp.received
        assert (await client.answer(client.request("GET", "/after"))).status == 200
    finally:
        await client.close()


async def test_a_stream_past_the_limit_is_refused_and_the_connection_serves_on(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """RFC 9113 §5.1.2: a stream beyond SETTINGS_MAX_CONCURRENT_STREAMS is a stream error:
    RST_STREAM REFUSED_STREAM (safe for the client to retry), while the streams within the
    limit are answered and the connection takes new streams once they are done."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    aws.mode, aws.delay = "slow", 0.3
    server = await proxy(two_providers(aws, gcp).replace(
        "http2: {h2c: true}", "http2: {h2c: true, max_concurrent_streams: 4}"))
    client = await H2Client.connect(server.port)
    await asyncio.sleep(0.1)  # the proxy's SETTINGS have arrived
    try:
        assert client.h2.remote_settings.max_concurrent_streams == 4
        # A client that ignores the limit (the h2 library would keep it).
        client.h2.remote_settings.update({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        client.h2.remote_settings.acknowledge()
        ids = [client.request("GET", f"/limit{n}") for n in range(6)]
        answers = [await client.answer(i) for i in ids]
        assert [a.status for a in answers[:4]] == [200] * 4
        assert [(a.reset, a.reset_code) for a in answers[4:]] == [
            (True, h2.errors.ErrorCodes.REFUSED_STREAM)] * 2
        assert not client.terminated
        assert (await client.answer(client.request("GET", "/again"))).status == 200
    finally:
        await client.close()
    assert len(aws.received) == 5  # the refused streams never reached a backend


async def test_the_access_log_names_the_protocol(
    tmp_path: Path, fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    log_file = tmp_path / "access.log"
    server = await proxy(two_providers(aws, gcp).replace(
        "upstreams:", f"access_log: {{path: '{log_file}'}}\nupstreams:", 1))
    client = await H2Client.connect(server.port)
    try:
        answer = await client.answer(client.request("GET", "/logged"))
    finally:
        await client.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /plain HTTP/1.1\r\nHost: example.test\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    for _ in range(100):  # the sweep hands lines to the writer thread
        lines = [json.loads(line) for line in log_file.read_text().splitlines()]
        if len(lines) == 2:
            break
        await asyncio.sleep(0.05)
    by_path = {line["path"]: line for line in lines}
    assert by_path["/logged"]["protocol"] == "h2"
    assert by_path["/logged"]["request_id"] == answer.headers[b"x-request-id"].decode()
    assert "protocol" not in by_path["/plain"]  # HTTP/1.1, the usual, goes unsaid


async def test_a_client_with_a_shut_window_is_not_the_backends_silence(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A client whose window is shut holds its response (and the backend, which is not read
    meanwhile) past the backend's read timeout: that is the client's pace, not a silent
    backend. When it opens its window the whole response comes, and no failure is counted."""
    body = b"z" * 16_000_000  # more than the sockets between the backend and the proxy hold

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    server = await proxy(single_upstream_config(
        [await raw_backend(backend)], "    timeouts: {read: 400ms}\n"
    ).replace("port: 0}", "port: 0, http2: {h2c: true}}", 1))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    client = H2Client.__new__(H2Client)  # a client that acknowledges nothing until told
    client.reader, client.writer, client.cut = reader, writer, 0
    client.h2 = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    client.answers, client.terminated, client.unsent, client.trailers = {}, [], {}, {}
    client.h2.initiate_connection()
    stream_id = client.request("GET", "/big")
    received = 0
    deadline = asyncio.get_running_loop().time() + 1.5
    while asyncio.get_running_loop().time() < deadline:  # read, but open no window
        with contextlib.suppress(TimeoutError):
            data = await asyncio.wait_for(reader.read(65536), 0.1)
            for event in client.h2.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data or b"")
            writer.write(client.h2.data_to_send())
    assert received <= 65_535  # the initial window, no more
    client.h2.increment_flow_control_window(1 << 30)
    client.h2.increment_flow_control_window(1 << 30, stream_id)
    writer.write(client.h2.data_to_send())
    ended = False
    while not ended:
        data = await asyncio.wait_for(reader.read(65536), 5)
        for event in client.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                received += len(event.data or b"")
                client.h2.acknowledge_received_data(event.flow_controlled_length or 0,
                                                    stream_id)
            ended = ended or isinstance(event, h2.events.StreamEnded)
        writer.write(client.h2.data_to_send())
    writer.close()
    assert received == len(body)
    backend_state = server.plane.topology.upstreams["web"].backends[0]  # type: ignore[union-attr]
    assert backend_state.consecutive_failures == 0 and backend_state.usable


async def test_a_busy_client_is_not_taken_for_a_flood(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """A client that keeps 90 streams busy and gives back the window of every DATA frame it
    is sent at once (a WINDOW_UPDATE each, as h2load does) is a client, not a flood: every
    answer comes, nothing is refused. WINDOW_UPDATEs are bounded per DATA frame sent, not
    counted with the frames that ask for work."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    server = await proxy(two_providers(aws, gcp))
    client = await H2Client.connect(server.port)
    client.eager = True
    try:
        for _ in range(12):
            ids = [client.request("GET", f"/busy{n}") for n in range(90)]
            answers = [await client.answer(i) for i in ids]
            assert {a.status for a in answers} == {200}, client.terminated
    finally:
        await client.close()
    assert server.store.counters["connections_refused"] == {}


def test_the_libnghttp2_engine_is_the_one_in_use_where_built() -> None:
    """`make` installs libnghttp2's header, so the C engine is built and chosen; plain Python
    (FAILOVER_PROXY_PURE=1) runs on the `h2` library. Neither falls back silently."""
    if os.environ.get("FAILOVER_PROXY_PURE") == "1":
        assert not engine.NATIVE
    elif sys.platform.startswith("linux") and Path("/usr/include/nghttp2/nghttp2.h").exists():
        assert engine.NATIVE


async def test_a_client_that_never_reads_holds_a_bounded_buffer(
    raw_backend: StartRaw, proxy: StartProxy
) -> None:
    """A client that opens every window as wide as it goes, asks for ten 8 MB responses and
    then reads nothing: the proxy writes until the socket takes no more, then stops reading
    the backends. What it holds for that connection (the transport's buffer and the streams'
    pending data) stays within a few hundred kilobytes, not the 80 MB the backends offer."""
    body = b"q" * 8_000_000

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            writer.write(body)
            await writer.drain()

    server = await proxy(single_upstream_config([await raw_backend(backend)]).replace(
        "port: 0}", "port: 0, http2: {h2c: true}}", 1))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.transport.set_write_buffer_limits(0)
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    client.increment_flow_control_window(2**31 - 1 - 65535)
    for n in range(10):
        client.send_headers(client.get_next_available_stream_id(), [
            (":method", "GET"), (":path", f"/big{n}"), (":scheme", "http"),
            (":authority", "example.test")], end_stream=True)
    writer.write(client.data_to_send())
    reader._transport.pause_reading()  # type: ignore[attr-defined]  # reads nothing more
    connection = None
    held = 0
    for _ in range(30):
        await asyncio.sleep(0.1)
        connection = next((c for c in server.plane.connections  # type: ignore[union-attr]
                           if isinstance(c, Http2Connection)), None)
        if connection is not None and connection.transport is not None:
            held = connection.transport.get_write_buffer_size() + sum(
                len(piece) for stream in connection.streams.values() for piece in stream.pending)
    assert connection is not None and connection.write_paused
    print(f"held for a client that reads nothing: {held} bytes")
    assert held < 1_000_000
    writer.close()

