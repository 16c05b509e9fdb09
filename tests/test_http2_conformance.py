"""HTTP/2 conformance from clients' side, by RFC 9113 and RFC 7541 section, modelled on the
public h2spec case list: raw frames (built here byte by byte where they must be invalid, with
`hpack` for header blocks) against the real proxy, and what it must answer: a connection error
(GOAWAY with the code), a stream error (RST_STREAM with the code), or nothing at all (the
frame ignored: the connection still answers a PING and serves a request).

Where RFC 9113 lets a stream error be treated as a connection error, both are accepted, as
h2spec accepts them. The suite runs with both engines (libnghttp2, and `h2` under
FAILOVER_PROXY_PURE=1).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from hpack import Encoder

from failover_proxy.dataplane.http2 import engine
from failover_proxy.process.server import ProxyServer

from .conftest import StartFaultBackends
from .test_http2 import two_providers

StartProxy = Callable[[str], Awaitable[ProxyServer]]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 5, 6, 7, 9


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame as bytes, whatever its fields (RFC 9113 §4.1): invalid ones included."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream_id) + payload


def request_block(path: str = "/", method: str = "GET",
                  extra: list[tuple[str, str]] | None = None) -> bytes:
    return Encoder().encode([(":method", method), (":scheme", "http"), (":path", path),
                             (":authority", "example.test"), *(extra or [])])


def headers(stream_id: int, block: bytes | None = None, flags: int = END_HEADERS | END_STREAM
            ) -> bytes:
    return frame(HEADERS, flags, stream_id, request_block() if block is None else block)


def settings(*pairs: tuple[int, int], flags: int = 0, stream_id: int = 0) -> bytes:
    return frame(SETTINGS, flags, stream_id, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def priority(stream_id: int, depends_on: int, weight: int = 15) -> bytes:
    return frame(PRIORITY, 0, stream_id, struct.pack(">IB", depends_on, weight))


@dataclass
class Seen:
    kind: str
    """goaway, rst, closed, alive (our PING answered), response (a HEADERS on the stream)."""
    code: int = 0


class Peer:
    """A client on a raw socket: the preface and settings exchanged, then whatever a case
    sends, and the first telling frame the proxy answers with."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> Peer:
        peer = cls(*await asyncio.open_connection("127.0.0.1", port))
        peer.send(PREFACE + settings())
        while True:  # the proxy's SETTINGS (acknowledged), and its ACK of ours
            kind, flags, _, _ = await peer.read_frame()
            if kind == SETTINGS and not flags & ACK:
                peer.send(settings(flags=ACK))
                break
        return peer

    def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))

    async def read_frame(self) -> tuple[int, int, int, bytes]:
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3]):
            chunk = await asyncio.wait_for(self.reader.read(65536), 5)
            if not chunk:
                raise ConnectionResetError("closed")
            self.buffer += chunk
        length = int.from_bytes(self.buffer[:3])
        kind, flags = self.buffer[3], self.buffer[4]
        stream_id = int.from_bytes(self.buffer[5:9]) & 0x7FFFFFFF
        payload = self.buffer[9 : 9 + length]
        self.buffer = self.buffer[9 + length :]
        return kind, flags, stream_id, payload

    async def outcome(self, stream_id: int = 0, ping: bool = True) -> Seen:
        """What the proxy did: the first GOAWAY, RST_STREAM or HEADERS on `stream_id`, the
        connection closed, or (a PING sent after the case) the PING answered and nothing
        else telling within a moment (a PING's answer may overtake a reset)."""
        if ping:
            self.send(frame(PING, 0, 0, b"stillok?"))
        alive_until = 0.0
        loop = asyncio.get_running_loop()
        try:
            while True:
                if alive_until:
                    left = alive_until - loop.time()
                    if left <= 0:
                        return Seen("alive")
                    try:
                        kind, flags, on, payload = await asyncio.wait_for(self.read_frame(), left)
                    except TimeoutError:
                        return Seen("alive")
                else:
                    kind, flags, on, payload = await self.read_frame()
                if kind == GOAWAY:
                    return Seen("goaway", int.from_bytes(payload[4:8]))
                if kind == RST_STREAM and on == stream_id and stream_id:
                    return Seen("rst", int.from_bytes(payload[:4]))
                if kind == HEADERS and on == stream_id and stream_id:
                    return Seen("response")
                if kind == PING and flags & ACK and payload == b"stillok?":
                    alive_until = loop.time() + 0.1
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            return Seen("closed")

    def close(self) -> None:
        self.writer.close()


def connection_error(*codes: int) -> set[tuple[str, int]]:
    return {("goaway", code) for code in codes}


def stream_error(*codes: int) -> set[tuple[str, int]]:
    """RFC 9113 §5.4.1: an endpoint may always treat a stream error as a connection error."""
    return {("rst", code) for code in codes} | connection_error(*codes)


IGNORED = {("alive", 0)}
ANSWERED = {("response", 0)}
H2_LIBRARY = set() if engine.NATIVE else connection_error(PROTOCOL_ERROR)
"""What the `h2` library (the pure fallback) answers where libnghttp2 names the error more
precisely (a broken header block, a malformed frame): a connection error all the same."""


@dataclass
class Case:
    section: str
    name: str
    send: bytes
    expect: set[tuple[str, int]]
    stream_id: int = 0
    """The stream whose RST_STREAM (or response) counts."""


CASES = [
    # -- RFC 9113 §4: frames ---------------------------------------------------------------------
    Case("4.1", "a frame of an unknown type is ignored", frame(0x20, 0, 0, b"xyz"), IGNORED),
    Case("4.1", "undefined flags are ignored", frame(PING, 0x16, 0, b"12345678"), IGNORED),
    Case("4.1", "the reserved bit of the stream id is ignored",
         frame(HEADERS, END_HEADERS | END_STREAM, 1 | 0x80000000, request_block()), ANSWERED, 1),
    Case("4.2", "DATA larger than SETTINGS_MAX_FRAME_SIZE",
         headers(1, flags=END_HEADERS) + frame(DATA, 0, 1, b"x" * 16385),
         stream_error(FRAME_SIZE_ERROR), 1),
    Case("4.2", "a HEADERS frame larger than SETTINGS_MAX_FRAME_SIZE",
         frame(HEADERS, END_HEADERS, 1, request_block() + b"\x00" * 16385),
         connection_error(FRAME_SIZE_ERROR, PROTOCOL_ERROR, COMPRESSION_ERROR)),
    Case("4.3", "a header block that cannot be decoded",
         frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xff\xff\xff\xff"),
         connection_error(COMPRESSION_ERROR) | H2_LIBRARY),
    Case("4.3", "a PRIORITY between HEADERS and CONTINUATION",
         frame(HEADERS, END_STREAM, 1, request_block()[:3]) + priority(1, 0)
         + frame(CONTINUATION, END_HEADERS, 1, request_block()[3:]),
         connection_error(PROTOCOL_ERROR)),
    # -- §5.1: stream states ---------------------------------------------------------------------
    Case("5.1", "DATA on an idle stream", frame(DATA, 0, 1, b"x"),
         connection_error(PROTOCOL_ERROR)),
    Case("5.1", "RST_STREAM on an idle stream", frame(RST_STREAM, 0, 1, b"\0\0\0\x08"),
         connection_error(PROTOCOL_ERROR)),
    Case("5.1", "WINDOW_UPDATE on an idle stream", window_update(1, 100),
         connection_error(PROTOCOL_ERROR)),
    Case("5.1", "CONTINUATION on an idle stream", frame(CONTINUATION, END_HEADERS, 1,
                                                        request_block()),
         connection_error(PROTOCOL_ERROR)),
    Case("5.1", "DATA on a half-closed (remote) stream",
         headers(1) + frame(DATA, 0, 1, b"x"), stream_error(STREAM_CLOSED), 1),
    Case("5.1", "HEADERS on a half-closed (remote) stream",
         headers(1) + headers(1), stream_error(STREAM_CLOSED), 1),
    Case("5.1", "DATA on a stream the client reset",
         headers(1, flags=END_HEADERS) + frame(RST_STREAM, 0, 1, b"\0\0\0\x08")
         + frame(DATA, 0, 1, b"x"), stream_error(STREAM_CLOSED) | IGNORED, 1),
    Case("5.1.1", "an even stream id from a client", headers(2),
         connection_error(PROTOCOL_ERROR)),
    Case("5.1.1", "a stream id lower than one already used", headers(5) + headers(3),
         connection_error(PROTOCOL_ERROR)),
    # Stream-id exhaustion: a client that jumps to the last id is served, and can open no
    # stream after it (it must open a new connection).
    Case("5.1.1", "the last stream id is answered", headers(2**31 - 1), ANSWERED, 2**31 - 1),
    Case("5.1.1", "no stream after the last stream id", headers(2**31 - 1) + headers(3),
         connection_error(PROTOCOL_ERROR)),
    # -- §5.3, §5.5: priority, extensions ----------------------------------------------------------
    Case("5.3.1", "a PRIORITY making a stream depend on itself", priority(1, 1),
         stream_error(PROTOCOL_ERROR) | IGNORED, 1),
    Case("5.5", "an unknown frame inside a header block",
         frame(HEADERS, END_STREAM, 1, request_block()[:3]) + frame(0x20, 0, 0, b"x")
         + frame(CONTINUATION, END_HEADERS, 1, request_block()[3:]),
         connection_error(PROTOCOL_ERROR)),
    # -- §6.1 DATA -------------------------------------------------------------------------------
    Case("6.1", "DATA on stream 0", frame(DATA, 0, 0, b"x"), connection_error(PROTOCOL_ERROR)),
    Case("6.1", "DATA with a pad length past its payload",
         headers(1, flags=END_HEADERS) + frame(DATA, PADDED, 1, b"\x0aab"),
         connection_error(PROTOCOL_ERROR)),
    Case("6.1", "padded DATA is accepted and its padding counted",
         frame(HEADERS, END_HEADERS, 1, request_block(method="POST"))
         + frame(DATA, PADDED | END_STREAM, 1, b"\x03abc\0\0\0"), ANSWERED, 1),
    # -- §6.2 HEADERS ----------------------------------------------------------------------------
    Case("6.2", "HEADERS without END_HEADERS followed by another frame",
         frame(HEADERS, END_STREAM, 1, request_block()) + frame(DATA, 0, 1, b"x"),
         connection_error(PROTOCOL_ERROR)),
    Case("6.2", "HEADERS on stream 0", headers(0), connection_error(PROTOCOL_ERROR)),
    Case("6.2", "HEADERS with a pad length past its payload",
         frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 1, b"\xff" + request_block()),
         connection_error(PROTOCOL_ERROR)),
    # -- §6.3 PRIORITY ---------------------------------------------------------------------------
    Case("6.3", "PRIORITY on stream 0", priority(0, 1), connection_error(PROTOCOL_ERROR)),
    Case("6.3", "PRIORITY of the wrong length", frame(PRIORITY, 0, 1, b"\0\0\0\0"),
         stream_error(FRAME_SIZE_ERROR), 1),
    # -- §6.4 RST_STREAM -------------------------------------------------------------------------
    Case("6.4", "RST_STREAM on stream 0", frame(RST_STREAM, 0, 0, b"\0\0\0\x08"),
         connection_error(PROTOCOL_ERROR)),
    Case("6.4", "RST_STREAM of the wrong length",
         headers(1, flags=END_HEADERS) + frame(RST_STREAM, 0, 1, b"\0\0\0"),
         connection_error(FRAME_SIZE_ERROR)),
    # -- §6.5 SETTINGS ---------------------------------------------------------------------------
    Case("6.5", "a SETTINGS ACK with a payload", frame(SETTINGS, ACK, 0, b"\0\x01\0\0\0\0"),
         connection_error(FRAME_SIZE_ERROR) | H2_LIBRARY),
    Case("6.5", "SETTINGS on a stream", settings(stream_id=1), connection_error(PROTOCOL_ERROR)),
    Case("6.5", "SETTINGS of a length not a multiple of 6", frame(SETTINGS, 0, 0, b"\0\x01\0"),
         connection_error(FRAME_SIZE_ERROR)),
    Case("6.5.2", "SETTINGS_ENABLE_PUSH other than 0 or 1", settings((2, 2)),
         connection_error(PROTOCOL_ERROR)),
    Case("6.5.2", "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1", settings((4, 2**31)),
         connection_error(FLOW_CONTROL_ERROR)),
    Case("6.5.2", "SETTINGS_MAX_FRAME_SIZE below 16384", settings((5, 16383)),
         connection_error(PROTOCOL_ERROR)),
    Case("6.5.2", "SETTINGS_MAX_FRAME_SIZE above 2^24-1", settings((5, 2**24)),
         connection_error(PROTOCOL_ERROR)),
    Case("6.5.2", "an unknown setting is ignored", settings((0xFF, 1)), IGNORED),
    # -- §6.7 PING -------------------------------------------------------------------------------
    Case("6.7", "a PING ACK is not answered", frame(PING, ACK, 0, b"xxxxxxxx"), IGNORED),
    Case("6.7", "PING on a stream", frame(PING, 0, 1, b"12345678"),
         connection_error(PROTOCOL_ERROR)),
    Case("6.7", "PING of the wrong length", frame(PING, 0, 0, b"1234567"),
         connection_error(FRAME_SIZE_ERROR)),
    # -- §6.8 GOAWAY -----------------------------------------------------------------------------
    Case("6.8", "GOAWAY on a stream", frame(GOAWAY, 0, 1, b"\0\0\0\0\0\0\0\0"),
         connection_error(PROTOCOL_ERROR)),
    # -- §6.9 WINDOW_UPDATE ----------------------------------------------------------------------
    Case("6.9", "a WINDOW_UPDATE of 0 for the connection", window_update(0, 0),
         connection_error(PROTOCOL_ERROR)),
    Case("6.9", "a WINDOW_UPDATE of 0 for a stream",
         headers(1, flags=END_HEADERS) + window_update(1, 0), stream_error(PROTOCOL_ERROR), 1),
    Case("6.9", "WINDOW_UPDATE of the wrong length", frame(WINDOW_UPDATE, 0, 0, b"\0\0\x01"),
         connection_error(FRAME_SIZE_ERROR)),
    Case("6.9.1", "a connection window past 2^31-1", window_update(0, 2**31 - 1),
         connection_error(FLOW_CONTROL_ERROR)),
    Case("6.9.1", "a stream window past 2^31-1",
         headers(1, flags=END_HEADERS) + window_update(1, 2**31 - 1),
         stream_error(FLOW_CONTROL_ERROR), 1),
    Case("6.9.2", "SETTINGS_INITIAL_WINDOW_SIZE making a window overflow",
         headers(1, flags=END_HEADERS) + window_update(1, 2**31 - 1 - 65535)
         + settings((4, 65536)), stream_error(FLOW_CONTROL_ERROR), 1),
    # -- §6.10 CONTINUATION ----------------------------------------------------------------------
    Case("6.10", "a header block in several CONTINUATION frames",
         frame(HEADERS, END_STREAM, 1, request_block()[:2])
         + frame(CONTINUATION, 0, 1, request_block()[2:4])
         + frame(CONTINUATION, END_HEADERS, 1, request_block()[4:]), ANSWERED, 1),
    Case("6.10", "CONTINUATION after END_HEADERS",
         headers(1) + frame(CONTINUATION, END_HEADERS, 1, request_block()),
         connection_error(PROTOCOL_ERROR)),
    Case("6.10", "CONTINUATION on another stream",
         frame(HEADERS, END_STREAM, 1, request_block()[:3])
         + frame(CONTINUATION, END_HEADERS, 3, request_block()[3:]),
         connection_error(PROTOCOL_ERROR)),
    # -- §7 error codes --------------------------------------------------------------------------
    Case("7", "an unknown error code in GOAWAY ends the connection quietly",
         # (`h2` takes the PING sent after it for a protocol error: the connection ends.)
         frame(GOAWAY, 0, 0, b"\0\0\0\0\0\0\x12\x34"),
         {("closed", 0), ("goaway", NO_ERROR), ("alive", 0)} | H2_LIBRARY),
    Case("7", "an unknown error code in RST_STREAM",
         headers(1, flags=END_HEADERS) + frame(RST_STREAM, 0, 1, b"\0\0\x12\x34"), IGNORED),
    # -- §8.1, §8.2, §8.3: messages and fields ---------------------------------------------------
    Case("8.1", "a second HEADERS without END_STREAM (not trailers)",
         headers(1, flags=END_HEADERS) + headers(1, flags=END_HEADERS),
         stream_error(PROTOCOL_ERROR), 1),
    Case("8.1.1", "a content-length the DATA do not match",
         frame(HEADERS, END_HEADERS, 1, request_block(method="POST",
                                                      extra=[("content-length", "1")]))
         + frame(DATA, END_STREAM, 1, b"abc"), stream_error(PROTOCOL_ERROR), 1),
    Case("8.2.1", "an upper-case field name",
         headers(1, request_block(extra=[("X-Upper", "1")])), stream_error(PROTOCOL_ERROR), 1),
    Case("8.2.2", "a connection-specific field",
         headers(1, request_block(extra=[("connection", "keep-alive")])),
         stream_error(PROTOCOL_ERROR), 1),
    Case("8.2.2", "te other than trailers", headers(1, request_block(extra=[("te", "gzip")])),
         stream_error(PROTOCOL_ERROR), 1),
    Case("8.3", "an unknown pseudo-header field",
         headers(1, request_block(extra=[(":foo", "1")])), stream_error(PROTOCOL_ERROR), 1),
    Case("8.3", "a response pseudo-header field in a request",
         headers(1, request_block(extra=[(":status", "200")])), stream_error(PROTOCOL_ERROR), 1),
    Case("8.3", "a pseudo-header field after a regular one",
         headers(1, Encoder().encode([(":method", "GET"), (":scheme", "http"), ("a", "1"),
                                      (":path", "/"), (":authority", "example.test")])),
         stream_error(PROTOCOL_ERROR), 1),
    Case("8.3", "a repeated pseudo-header field",
         headers(1, request_block(extra=[(":path", "/again")])), stream_error(PROTOCOL_ERROR), 1),
    Case("8.3.1", "no :method", headers(1, Encoder().encode([(":scheme", "http"), (":path", "/"),
                                                             (":authority", "example.test")])),
         stream_error(PROTOCOL_ERROR), 1),
    Case("8.3.1", "an empty :path", headers(1, Encoder().encode([
        (":method", "GET"), (":scheme", "http"), (":path", ""), (":authority", "example.test")])),
         stream_error(PROTOCOL_ERROR), 1),
    Case("8.3.1", "pseudo-header fields in trailers",
         frame(HEADERS, END_HEADERS, 1, request_block(method="POST"))
         + frame(DATA, 0, 1, b"x")
         + frame(HEADERS, END_HEADERS | END_STREAM, 1, Encoder().encode([(":path", "/")])),
         stream_error(PROTOCOL_ERROR), 1),
    Case("8.5", "CONNECT (not served: a stream error)",
         headers(1, Encoder().encode([(":method", "CONNECT"), (":authority", "example.test:443")])),
         stream_error(PROTOCOL_ERROR), 1),
    Case("8.4", "PUSH_PROMISE from a client", frame(PUSH_PROMISE, END_HEADERS, 1,
                                                    b"\0\0\0\x02" + request_block()),
         connection_error(PROTOCOL_ERROR)),
    # -- RFC 7541: HPACK -------------------------------------------------------------------------
    Case("hpack 2.3.3", "an index past the tables", headers(1, b"\xff\x7f"),
         connection_error(COMPRESSION_ERROR) | H2_LIBRARY),
    Case("hpack 4.2", "a dynamic table size update past SETTINGS_HEADER_TABLE_SIZE",
         headers(1, b"\x3f\xe1\x7f" + request_block()), connection_error(COMPRESSION_ERROR) | H2_LIBRARY),
    Case("hpack 5.2", "a Huffman string padded with more than 7 bits",
         headers(1, request_block() + b"\x40\x82\xff\xff\x81\x61"),
         connection_error(COMPRESSION_ERROR) | H2_LIBRARY),
    Case("hpack 6.1", "index 0", headers(1, b"\x80"), connection_error(COMPRESSION_ERROR) | H2_LIBRARY),
    Case("hpack 6.3", "a dynamic table size update after a field",
         headers(1, request_block() + b"\x20"), connection_error(COMPRESSION_ERROR) | H2_LIBRARY),
    # -- generic: what must work -----------------------------------------------------------------
    Case("generic", "a GET", headers(1), ANSWERED, 1),
    Case("generic", "a POST with DATA",
         frame(HEADERS, END_HEADERS, 1, request_block(method="POST"))
         + frame(DATA, END_STREAM, 1, b"hello"), ANSWERED, 1),
    Case("generic", "a request with trailers",
         frame(HEADERS, END_HEADERS, 1, request_block(method="POST"))
         + frame(DATA, 0, 1, b"hello")
         + frame(HEADERS, END_HEADERS | END_STREAM, 1, Encoder().encode([("x-sum", "1")])),
         ANSWERED, 1),
    Case("generic", "a PRIORITY frame on an idle stream", priority(7, 0), IGNORED),
    Case("generic", "a stream with PRIORITY in its HEADERS",
         frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, 1,
               b"\0\0\0\0\x10" + request_block()), ANSWERED, 1),
]


@pytest.fixture
async def h2_proxy(fault_backends: StartFaultBackends, proxy: StartProxy) -> ProxyServer:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    return await proxy(two_providers(aws, gcp))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.section} {c.name}" for c in CASES])
async def test_conformance(h2_proxy: ProxyServer, case: Case) -> None:
    peer = await Peer.connect(h2_proxy.port)
    try:
        peer.send(case.send)
        seen = await peer.outcome(case.stream_id, ping=case.expect != ANSWERED)
    finally:
        peer.close()
    assert (seen.kind, seen.code) in case.expect, f"RFC 9113 {case.section}: {case.name}: {seen}"
    # Whatever one client did, another is served.
    other = await Peer.connect(h2_proxy.port)
    try:
        other.send(headers(1))
        assert (await other.outcome(1, ping=False)).kind == "response"
    finally:
        other.close()


async def test_the_trailers_of_a_stream_the_proxy_reset_are_no_error(
    h2_proxy: ProxyServer,
) -> None:
    """A request answered before its body ended (here: no route) has its stream reset
    (NO_ERROR) while the client may still be sending; its last DATA and trailers, arriving
    after the reset, are dropped, not taken for a reused stream id (RFC 9113 §5.1.1)."""
    peer = await Peer.connect(h2_proxy.port)
    try:
        block = Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/"),
                                  (":authority", "nowhere.test")])
        peer.send(frame(HEADERS, END_HEADERS, 1, block))
        assert (await peer.outcome(1, ping=False)).kind == "response"  # the 404
        while True:  # its body, then the reset that ends the stream
            kind, _, on, payload = await peer.read_frame()
            if kind == RST_STREAM and on == 1:
                assert int.from_bytes(payload[:4]) == NO_ERROR
                break
        peer.send(frame(DATA, 0, 1, b"late"),
                  frame(HEADERS, END_HEADERS | END_STREAM, 1, Encoder().encode([("x-sum", "1")])),
                  headers(3))
        assert (await peer.outcome(3, ping=False)).kind == "response"
    finally:
        peer.close()


async def test_the_invalid_preface_of_a_client_that_chose_h2_by_alpn_is_refused() -> None:
    """RFC 9113 §3.4 (h2spec 3.5): a connection that must open with the preface and does not
    is a connection error. On a plain port the bytes are HTTP/1.1 until proven otherwise (the
    same port serves both), so this holds where h2 was agreed: see test_http2's ALPN test for
    the listener, here the engine itself."""
    session = engine.new_session(True, [], 65535, 65536)
    session.data_to_send()
    with contextlib.suppress(Exception):
        session.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    tail = session.data_to_send()
    assert not session.want_read or tail[3:4] == bytes([GOAWAY])


async def test_draining_sends_goaway_and_lets_streams_finish(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """While a proxy drains, an HTTP/2 client is told GOAWAY (NO_ERROR, naming the last
    stream it will answer: RFC 9113 §6.8) so that it takes new requests elsewhere, as an
    HTTP/1.1 client is told `Connection: close`; the stream in progress is answered whole,
    then the connection closes."""
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    aws.mode, aws.delay = "slow", 0.8
    server = await proxy(two_providers(aws, gcp))
    peer = await Peer.connect(server.port)
    draining: asyncio.Task[None] | None = None
    try:
        peer.send(headers(1))
        await asyncio.sleep(0.2)
        draining = asyncio.get_running_loop().create_task(server.drain(delay=3.0, grace=5.0))
        seen: list[tuple[int, int, int, bytes]] = []
        with contextlib.suppress(ConnectionError, TimeoutError):
            while True:
                seen.append(await peer.read_frame())
    finally:
        peer.close()
        if draining is not None:
            draining.cancel()
    kinds = [(kind, on) for kind, _, on, _ in seen if kind in (GOAWAY, HEADERS, DATA)]
    goaway = next(payload for kind, _, _, payload in seen if kind == GOAWAY)
    assert kinds[0] == (GOAWAY, 0), kinds  # told at once, before the answer
    assert int.from_bytes(goaway[:4]) == 1 and int.from_bytes(goaway[4:8]) == NO_ERROR
    assert (HEADERS, 1) in kinds and kinds[-1] == (DATA, 1)
    last_flags = [flags for kind, flags, on, _ in seen if kind == DATA and on == 1][-1]
    assert last_flags & END_STREAM  # answered whole, then the connection closed


@pytest.mark.parametrize("flood", ["settings", "window_update", "priority", "empty_data"])
async def test_a_flood_of_frames_that_ask_for_work_is_cut_off(
    h2_proxy: ProxyServer, flood: str
) -> None:
    """Frames that cost the proxy work and carry no request, by the thousand: SETTINGS (each
    wants an ACK), WINDOW_UPDATE with nothing sent to open a window for, PRIORITY, empty
    DATA. The connection ends with GOAWAY ENHANCE_YOUR_CALM (counted as http2_flood), and a
    client beside it is served meanwhile."""
    one = {
        "settings": settings((4, 65535)),
        "window_update": window_update(0, 1),
        "priority": priority(3, 0),
        "empty_data": frame(DATA, 0, 1, b""),
    }[flood]
    peer = await Peer.connect(h2_proxy.port)
    beside = await Peer.connect(h2_proxy.port)
    try:
        if flood == "empty_data":
            peer.send(frame(HEADERS, END_HEADERS, 1, request_block(method="POST")))
        for _ in range(5):
            peer.send(one * 500)
            await asyncio.sleep(0)
        beside.send(headers(1))
        assert (await beside.outcome(1, ping=False)).kind == "response"
        seen = await peer.outcome()
    finally:
        peer.close()
        beside.close()
    assert (seen.kind, seen.code) in {("goaway", 11), ("closed", 0)}, seen
    assert h2_proxy.store.counters["connections_refused"] == {("http2_flood",): 1.0}
