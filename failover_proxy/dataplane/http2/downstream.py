"""HTTP/2 from clients (h2c with prior knowledge, on the same port as HTTP/1.1): a connection
of many streams, each one a `DownstreamStream` the exchange answers through.

The frames are the engine's to parse and write (engine.py: libnghttp2 where built, else the
`h2` library; sans-IO: bytes in, one list of events out, bytes to send gathered and written
once per read). Each request becomes a neutral `Request` (its fields
as `name: value` lines, the pseudo-header fields as method, authority and target; cookie
crumbs joined, connection-specific fields dropped, `te: trailers` noted) and goes through the
same exchange as an HTTP/1 request: routes, retries, failover, limits, recording.

Flow control is honest both ways: a request body's data is acknowledged (WINDOW_UPDATE) only as
the exchange takes it, so a backend that reads slowly holds that stream's client back, not the
proxy's memory; a response is sent only as far as the client's windows allow, and the backend
is not read further meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

from ..exchange import Exchange
from ..http1.headers import (
    VIA_TOKEN,
    Http1Head,
    forwarded_block,
    new_request_id,
    usable_request_id,
)
from ..io.connio import ConnectionIO
from ..plane import ClientConnection, DataPlane
from ..request import DEFAULT_REPLAY_BYTES, EMPTY_BODY, Request, RequestBody
from ..streams import DownstreamStream, ResponseHead, UpstreamStream
from . import engine
from .engine import (
    CLOSED,
    DATA,
    END,
    GOAWAY,
    HEADERS,
    INTERNAL_ERROR,
    INVALID,
    NATIVE,
    NO_ERROR,
    PROTOCOL_ERROR,
    RESET,
    WINDOW,
    Event,
    FrameSession,
    new_session,
)
from .fields import CONNECTION_SPECIFIC, fields_of_lines, trailer_fields, trailer_lines

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4)."""

_TAKEN: Final = frozenset(
    {b"host", b"content-length", b"te", b"x-forwarded-for", b"x-forwarded-proto",
     b"x-forwarded-host", b"via"}
) | CONNECTION_SPECIFIC
"""Request fields the proxy reads and writes itself (as the HTTP/1 codec does)."""
_ERROR_REASONS: Final = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
PREMATURE_RESETS: Final = 100
"""Streams a client may reset before their answer (a rapid reset, CVE-2023-44487, costs the
backends a request each and the client nothing) before the ratio below is applied."""
PREMATURE_SHARE: Final = 0.5
"""Past PREMATURE_RESETS, a client that reset at least this share of its streams early is
cut off (GOAWAY ENHANCE_YOUR_CALM), as Envoy does."""
CONTROL_FRAMES_PER_SECOND: Final = 1000
"""Frames that ask the proxy for work and carry no request (PING and SETTINGS, which it must
answer; PRIORITY, unknown frames, empty DATA) a client may send in a second before it is cut
off. Resets are bounded by PREMATURE_RESETS, window updates by WINDOW_UPDATES_PER_DATA."""
WINDOW_UPDATES_PER_DATA: Final = 10
"""WINDOW_UPDATE frames a client may send per DATA frame the proxy sent it (beyond a first
WINDOW_UPDATE_ALLOWANCE), as Envoy bounds them: a busy client sends one or two per DATA frame
it receives, a flood sends them for nothing."""
WINDOW_UPDATE_ALLOWANCE: Final = 1000


_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
_NAME_BYTES: Final = bytes(range(0x21, 0x7F)).translate(
    None, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ():,;<=>?@[\\]{}\"/"
)
"""What a field name may hold in HTTP/2: a token, in lower case (RFC 9113 §8.2.1)."""


def malformed_request(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's fields make it malformed (RFC 9113 §8.2, §8.3.1), or None: a stream
    error for that request alone."""
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if not name:
            return "an empty field name"
        if name.startswith(b":"):
            if regular:
                return "a pseudo-header field after a regular one"
            if name not in _REQUEST_PSEUDO or name in seen:
                return f"pseudo-header field {name.decode('latin-1')!r} unknown or repeated"
            seen.add(name)
            continue
        regular = True
        if name.translate(None, _NAME_BYTES):
            return "a field name with upper case or a character a token cannot hold"
        if name in CONNECTION_SPECIFIC or (name == b"te" and value.strip() != b"trailers"):
            return f"connection-specific field {name.decode()!r}"
        if b"\r" in value or b"\n" in value or b"\0" in value or value != value.strip(b" \t"):
            return f"field {name.decode()!r}: a value with CR, LF, NUL or outer whitespace"
    method = next((v for n, v in headers if n == b":method"), None)
    if method == b"CONNECT":
        return "CONNECT is not supported"
    if method is None or b":scheme" not in seen or b":path" not in seen:
        return "a request without :method, :scheme or :path"
    path = next(v for n, v in headers if n == b":path")
    if not path or (path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS")):
        return "an empty :path, or one in no form a request may take"
    return None


def is_preface(data: bytes) -> bool:
    """Whether a client's first bytes are (the start of) the HTTP/2 connection preface."""
    return PREFACE.startswith(data[: len(PREFACE)]) and len(data) >= 3


def response_fields(head: Http1Head, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """An HTTP/1 response head's fields as HTTP/2 fields: names in lower case, the fields its
    Connection names and connection-specific ones left out, the length kept when one framed
    it, and the proxy's Via and request id added as the HTTP/1 codec adds them."""
    kept = head.h2_fields
    if kept is None:  # built once per head: a connection hands the same one out again
        kept = fields_of_lines(forwarded_block(head.lines, head.connection))
        if head.content_length is not None and not head.chunked:
            kept.append((b"content-length", head.content_length))
        head.h2_fields = kept
    fields = kept.copy()
    if not head.has_request_id:
        fields.append((b"x-request-id", request_id))
    via = head.via
    fields.append((b"via", VIA_TOKEN if via is None else via + b", " + VIA_TOKEN))
    return fields


class Http2Stream(DownstreamStream):
    """One request and its response on an HTTP/2 client connection."""

    def __init__(self, connection: Http2Connection, stream_id: int, request: Request) -> None:
        super().__init__(connection.plane)
        self.connection = connection
        self.stream_id = stream_id
        self.request = request
        self.protocol = "h2"
        self.client_ip = connection.client_ip
        self.scheme = connection.scheme
        self.forwarding = connection.forwarding
        self.exchange: Exchange | None = None
        self.pending: list[bytes] = []
        """Response data the client's flow-control windows have no room for yet."""
        self.pending_end = False
        self.pending_trailers: list[tuple[bytes, bytes]] | None = None
        self.ended = False
        """Our side of the stream is closed (END_STREAM sent, or reset)."""
        self.unacknowledged = 0
        """Request body bytes received and not yet given back to the client's window."""
        self.body_paused = False
        self.upstream_paused = False
        self.pending_since = 0.0
        """When the sweep first saw response data waiting for the client's window."""

    # -- the request body's flow control ---------------------------------------------------------

    def body_data(self, data: bytes, flow_controlled: int) -> None:
        body = self.request.body
        if body is EMPTY_BODY or body.complete:
            self.connection.reset(self.stream_id, PROTOCOL_ERROR)
            return
        limit = self.plane.limits.max_body_bytes
        if limit is not None and body.received + len(data) > limit:
            self._refuse(413, "Content Too Large", f"request body over {limit} bytes")
            return
        self.unacknowledged += flow_controlled
        body.feed(data)
        if not self.body_paused:
            self._acknowledge()

    def _acknowledge(self) -> None:
        if self.unacknowledged and not self.ended:
            self.connection.acknowledge(self.unacknowledged, self.stream_id)
        self.unacknowledged = 0

    def pause_body(self) -> None:
        self.body_paused = True

    def resume_body(self) -> None:
        self.body_paused = False
        self._acknowledge()

    # -- the response, as the exchange's downstream stream ------------------------------------

    def send_continue(self, request: Request) -> None:
        self.connection.send_headers(self.stream_id, [(b":status", b"100")], False)

    def send_head(
        self, request: Request, status: int, head: ResponseHead, decision: str | None,
        body: bytes | None, more: list[bytes] | None, end: bool,
    ) -> int:
        fields = [(b":status", b"%d" % status)]
        fields += response_fields(cast(Http1Head, head), request.request_id)
        if decision is not None:
            fields.append((b"x-failover-proxy-decision", decision.encode("latin-1", "replace")))
        no_body = request.method == b"HEAD" or status in (204, 304)
        size = sum(len(n) + len(v) + 4 for n, v in fields)
        connection = self.connection
        if no_body or (end and not body and not more):
            connection.send_headers(self.stream_id, fields, True)
            self.ended = True
            return size
        if more is None and body is not None:  # the usual response: one call, one write
            size += len(body)
            taken = connection.send_response(self.stream_id, fields, body, end)
            if taken < len(body):
                self.pending.append(body[taken:])
                self._pause_upstream(True)
                self.pending_end = end
            elif end:
                self._finish()
            return size
        connection.hold()  # the head, what came with it, and the end: one write
        try:
            connection.send_headers(self.stream_id, fields, False)
            for piece in (body, *(more or ())):
                if piece:
                    size += self._send_data(piece)
            if end:
                self.send_end(None)
        finally:
            connection.release()
        return size

    def send_body(self, chunk: bytes) -> int:
        return self._send_data(chunk)

    def _send_data(self, chunk: bytes) -> int:
        if self.ended:
            return 0
        if self.pending:
            self.pending.append(chunk)
        else:
            left = self.connection.send_data(self.stream_id, chunk)
            if left:
                self.pending.append(left)
        if self.pending and not self.upstream_paused:
            self._pause_upstream(True)
        return len(chunk)

    def send_end(self, trailers: list[bytes] | None) -> int:
        if self.ended:
            return 0
        if trailers is not None and self.request.te_trailers:
            self.pending_trailers = trailer_fields(trailers)
        self.pending_end = True
        self.flush()
        return 0

    def flush(self) -> None:
        """Send what the windows now allow; end the stream once all of it is gone."""
        connection = self.connection
        while self.pending and not self.ended:
            left = connection.send_data(self.stream_id, self.pending[0])
            if left:
                self.pending[0] = left
                return
            self.pending.pop(0)
        if self.upstream_paused and not self.pending:
            self._pause_upstream(False)
        if self.pending_end and not self.ended:
            connection.end_stream(self.stream_id, self.pending_trailers)
            self._finish()

    def _finish(self) -> None:
        """Our side of the stream has ended (END_STREAM sent)."""
        self.ended = True
        connection = self.connection
        body = self.request.body
        if body is not EMPTY_BODY and not body.complete:
            # Answered before the whole request came (RFC 9113 §8.1): the client need not
            # send the rest, and the stream stops counting against its limit.
            connection.reset(self.stream_id, NO_ERROR)
        connection.stream_done(self)

    def _pause_upstream(self, paused: bool) -> None:
        """Stop (or resume) reading the backend: the client's window or its connection has
        no room. Meanwhile the stream counts as not written to (`write_paused`), so a backend
        that waits on the client is not taken for a silent one (its read timeout)."""
        self.upstream_paused = paused
        self.write_paused = paused or self.connection.write_paused
        exchange = self.exchange
        attempt = exchange.attempt if exchange is not None else None
        if attempt is not None and attempt.stream is not None:
            attempt.stream.pause_reading(paused)

    def send_error(
        self, request: Request, status: int, detail: str, retry_after: bool,
        decision: str | None,
    ) -> int:
        return self._answer(status, _ERROR_REASONS.get(status, "Error"), detail,
                            retry_after, decision)

    def _answer(self, status: int, reason: str, detail: str, retry_after: bool = False,
                decision: str | None = None) -> int:
        request = self.request
        text = f"{status} {reason}: {detail} (request id {request.request_id.decode()})\n"
        body = text.encode()
        fields = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request.request_id),
        ]
        if retry_after:
            fields.append((b"retry-after", b"1"))
        if decision is not None:
            fields.append((b"x-failover-proxy-decision", decision.encode("latin-1", "replace")))
        connection = self.connection
        if request.method == b"HEAD":
            connection.send_headers(self.stream_id, fields, True)
            self.ended = True
            return len(body)
        connection.hold()
        try:
            connection.send_headers(self.stream_id, fields, False)
            self.pending_end = True
            self._send_data(body)
            self.flush()
        finally:
            connection.release()
        return len(body)

    def abandon(self) -> bool:
        """The client is gone from this stream: it ends, and so does its exchange; True when
        one was in progress."""
        self.ended = True
        exchange = self.exchange
        if exchange is None:
            return False
        self.exchange = None
        exchange.abandon()
        return True

    def trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The request's trailers (a header block after its data): passed on with its body."""
        if any(name.startswith(b":") for name, _ in fields):
            self.plane.store.inc("http2_stream_errors", ("malformed_request",))
            self._refuse_malformed()
        else:
            self.request.trailers = trailer_lines(fields)

    def _refuse_malformed(self, reset: bool = True) -> None:
        """The client broke HTTP/2's rules on this stream: reset it (PROTOCOL_ERROR), unless
        the engine has (`reset` False)."""
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.abandon()
        body = self.request.body
        if body is not EMPTY_BODY and not body.complete and not body.failed:
            body.fail()
        if not self.ended:
            self.ended = True
            if reset:
                self.connection.reset(self.stream_id, PROTOCOL_ERROR)
        self.connection.stream_done(self)

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        """The client broke its own request (too large, timed out): answer it if nothing was
        answered yet, and reset the stream; the exchange records the refusal."""
        exchange = self.exchange
        if exchange is not None and exchange.status == 0:
            exchange.refusal = status
        if not self.ended and (exchange is None or exchange.status == 0):
            self._answer(status, reason, detail)
        body = self.request.body
        if body is not EMPTY_BODY and not body.complete and not body.failed:
            body.fail()
        if not self.ended:
            self.reset()

    def reset(self) -> None:
        if not self.ended:
            self.ended = True
            self.connection.reset(self.stream_id, INTERNAL_ERROR)
        self.connection.stream_done(self)

    def start_tunnel(
        self, request: Request, head: ResponseHead, upstream: UpstreamStream, leftover: bytes
    ) -> int:
        # An HTTP/2 request carries no Upgrade (RFC 9113 §8.2.2): an exchange never asks this.
        upstream.abort()
        self.reset()
        return 0

    def set_paused_by_upstream(self, paused: bool) -> None:
        if paused:
            self.pause_body()
        else:
            self.resume_body()

    def body_stalled(self) -> None:
        self._refuse(408, "Request Timeout", "request body not received in time")

    def exchange_done(self, exchange: object) -> None:
        if self.exchange is exchange:
            self.exchange = None
        if self.ended and not self.pending:
            self.connection.stream_done(self)

    # -- as the data plane keeps it (through its connection) -------------------------------------

    def is_busy(self) -> bool:
        return self.exchange is not None

    def close_if_idle(self) -> None:
        pass

    def sweep(self, now: float) -> None:
        if self.exchange is not None:
            self.exchange.check_timeout(now)
        if self.pending:
            # A client that opens no window for this stream (a zero-window slow read) holds
            # one piece of its response and the backend, for send_timeout at most.
            if self.pending_since == 0.0:
                self.pending_since = now
            elif now - self.pending_since >= self.plane.limits.send_timeout:
                self.pending.clear()
                exchange = self.exchange
                if exchange is not None:
                    self.exchange = None
                    exchange.abandon()
                self.reset()
        else:
            self.pending_since = 0.0

    def abort(self) -> None:
        self.connection.abort()


class Http2Connection(ClientConnection):
    """One HTTP/2 client connection: its frames, its streams, and their exchanges."""

    def __init__(self, plane: DataPlane, client_ip: bytes = b"unknown") -> None:
        self.plane = plane
        self.loop = plane.loop
        self.limits = plane.limits
        self.settings = settings = plane.http2
        self.scheme = plane.scheme
        self.client_ip = client_ip
        self.forwarding = b""
        self.transport: asyncio.Transport | None = None
        self.io: ConnectionIO | None = None
        self.session: FrameSession = new_session(True, [
            (engine.MAX_CONCURRENT_STREAMS, settings.max_concurrent_streams),
            (engine.MAX_HEADER_LIST_SIZE, settings.max_header_list),
            (engine.INITIAL_WINDOW_SIZE, settings.initial_window),
            (engine.MAX_FRAME_SIZE, settings.max_frame_size),
        ], settings.connection_window, settings.max_header_list)
        self.streams: dict[int, Http2Stream] = {}
        self.closed = False
        self.write_paused = False
        self.counted_ip = False
        self.idle_since = plane.clock
        """When the last stream ended (or the connection began): for idle_timeout."""
        self.heard_at = plane.clock
        """When the client last sent anything: for ping_interval."""
        self.ping_sent_at = 0.0
        """When an unanswered PING went out; 0 when none is outstanding."""
        self.goaway_sent = False
        self.goaway_received = False
        self.holding = 0
        """Writes wait while above 0 (a batch of frames is being made): one write for it."""
        self.last_request_id = 0
        self.streams_opened = 0
        self.premature_resets = 0
        """Streams the client reset while their exchange was in progress."""
        self.control_base = 0
        """The engine's count of control frames when this second began."""
        self.control_window_start = 0.0
        self.flood_counted = False
        self.write_stalled_since = 0.0
        self.lingering_until = 0.0
        """While closing after a GOAWAY (_linger), the latest time to close at; else 0."""

    # -- connection lifecycle ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.io = ConnectionIO(transport, self.data_received, self.eof_received, self.read_failed)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        self.plane.connections.add(self)
        self._write()  # our SETTINGS (and the connection's window)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.io is not None:
            self.io.detach()
        self.plane.connection_ended(self, self.client_ip if self.counted_ip else None)
        self.counted_ip = False
        self._abandon_streams()

    def _abandon_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.abandon()
        self.streams.clear()

    def eof_received(self) -> bool | None:
        return None  # an HTTP/2 client that ends its side is done (it cannot read answers)

    def _linger(self) -> None:
        """After a GOAWAY that ends the connection: end our side and drop what the client
        still sends, until it ends its side or `lingering_timeout` passes. Closing with
        unread bytes would reset the connection, and the reset would take the GOAWAY (why it
        was cut off) with it."""
        if self.closed or self.io is None:
            return
        self._abandon_streams()
        self._write(now=True)  # the GOAWAY, before our side ends
        self.lingering_until = self.plane.clock + self.limits.lingering_timeout
        transport = self.transport
        if self.limits.lingering_timeout <= 0 or transport is None or not transport.can_write_eof():
            self.close()
            return
        self.io.write_eof()
        if self.write_paused:
            self.io.reading.resume()

    def read_failed(self, exc: BaseException) -> None:
        if self.io is not None:
            self.io.fail(self, exc)

    def pause_writing(self) -> None:
        """The client takes nothing more for now: read nothing more from it either (each
        frame may ask for an answer: a PING or SETTINGS flood is bounded by this), and read
        no backend further for its streams."""
        self.write_paused = True
        self.write_stalled_since = self.plane.clock
        if self.io is not None:
            self.io.reading.pause()
        for stream in self.streams.values():
            stream._pause_upstream(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.io is not None and not self.closed:
            self.io.reading.resume()
        for stream in list(self.streams.values()):
            if not stream.pending:
                stream._pause_upstream(False)

    def _calm_down(self, why: str) -> None:
        """A client that floods the proxy with work it does not pay for: told why (GOAWAY
        ENHANCE_YOUR_CALM) and cut off; its streams are abandoned."""
        self._count_flood()
        if not self.closed:
            self.session.goaway(engine.ENHANCE_YOUR_CALM, why.encode())
            self._write()
            self._linger()

    def _count_flood(self) -> None:
        if not self.flood_counted:
            self.flood_counted = True
            self.plane.store.inc("connections_refused", ("http2_flood",))

    # -- frames in -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed or self.lingering_until:
            return  # (lingering: read and dropped, so that the GOAWAY is not lost to a reset)
        session = self.session
        now = self.plane.clock
        self.heard_at = now
        self.ping_sent_at = 0.0
        try:
            events = session.receive(data)
        except engine.ProtocolError as exc:  # the engine has queued the GOAWAY saying why
            if len(exc.args) > 1 and exc.args[1]:
                self._count_flood()
            self._write()
            self._linger()
            return
        if now - self.control_window_start >= 1.0:
            self.control_window_start = now
            self.control_base = session.control_frames
        if session.control_frames - self.control_base > CONTROL_FRAMES_PER_SECOND:
            self._calm_down("too many control frames")
            return
        if session.window_updates > (WINDOW_UPDATE_ALLOWANCE
                                     + WINDOW_UPDATES_PER_DATA * session.data_frames_sent):
            self._calm_down("too many window updates")
            return
        self.holding += 1
        try:
            self._handle(events)
        finally:
            self.holding -= 1
        if self.closed:
            return
        self._write()
        if not session.want_read:
            self._linger()  # the engine ended the session (a connection error) or the client did

    def _handle(self, events: list[Event]) -> None:
        streams = self.streams
        for kind, stream_id, payload, number in events:
            if kind == HEADERS:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.trailers(cast("list[tuple[bytes, bytes]]", payload))
                elif stream_id > self.last_request_id:
                    self.last_request_id = stream_id
                    self._request(stream_id, cast("list[tuple[bytes, bytes]]", payload),
                                  number != 0)
            elif kind == DATA:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.body_data(cast(bytes, payload), number)
                elif number:
                    self.session.consume(stream_id, number)  # the connection's window
            elif kind == END:
                stream = streams.get(stream_id)
                if stream is not None:
                    body = stream.request.body
                    if body is not EMPTY_BODY and not body.complete and not body.failed:
                        body.finish()
            elif kind == WINDOW:
                targets = (list(streams.values()) if stream_id == 0
                           else [s for s in (streams.get(stream_id),) if s])
                for stream in targets:
                    if stream.pending or stream.pending_end:
                        stream.flush()
            elif kind == RESET:
                stream = streams.pop(stream_id, None)
                if stream is not None and stream.abandon():
                    self.premature_resets += 1
                    if (self.premature_resets >= PREMATURE_RESETS
                            and self.premature_resets >= PREMATURE_SHARE * self.streams_opened):
                        self._calm_down("too many streams reset before their answer")
                        return
            elif kind == CLOSED:
                stream = streams.get(stream_id)
                if stream is not None and not stream.ended:
                    del streams[stream_id]  # reset by the engine: the client is gone from it
                    stream.abandon()
            elif kind == INVALID:
                self.plane.store.inc("http2_stream_errors", ("malformed_request",))
                stream = streams.get(stream_id)
                if stream is not None:
                    stream._refuse_malformed(reset=False)
            elif kind == GOAWAY:
                if number != NO_ERROR or not streams:
                    self.close()
                    return
                self.goaway_received = True  # no new streams; those open are answered
            if self.closed:
                return

    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        # libnghttp2 has checked the fields already (RFC 9113 §8.2, §8.3: it resets a
        # malformed request's stream itself, an INVALID event): only what it lets through and
        # the proxy does not serve is left, CONNECT. The `h2` library checks nothing here.
        request = None if not NATIVE and malformed_request(headers) else self._read_request(
            headers)
        if request is None or request.method == b"CONNECT":
            self.plane.store.inc("http2_stream_errors", ("malformed_request",))
            self.reset(stream_id, PROTOCOL_ERROR)
            return
        stream = Http2Stream(self, stream_id, request)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        if ended:
            request.body = EMPTY_BODY
        else:
            request.body = RequestBody(DEFAULT_REPLAY_BYTES, stream.pause_body, stream.resume_body)
            if request.content_length is None:
                request.chunked = True  # its length is unknown: an HTTP/1 backend gets chunks
        limits = self.limits
        if request.head_bytes > limits.max_header_bytes + limits.max_url_bytes:
            stream._answer(431, "Request Header Fields Too Large", "request head too large")
            self.plane.record_own_answer(request, request.request_id, self.client_ip, 431, 0)
            return
        route = self.plane.topology.router.match_request(request.raw_host, request.path)
        if route is None:
            stream._answer(404, "Not Found", "no route for this host and path")
            self.plane.record_own_answer(request, request.request_id, self.client_ip, 404, 0)
            return
        upstream = route.target.upstream
        exchange = Exchange(stream, request, route.target)
        stream.exchange = exchange
        body = request.body
        if body is EMPTY_BODY:
            exchange.begin()
            return
        if body.replay_limit != upstream.replay_max_bytes:
            body.set_replay_limit(upstream.replay_max_bytes)
        limit = upstream.buffer_body_bytes
        if limit and (request.content_length is None or request.content_length <= limit):
            exchange.wait_for_body(limit)
        else:
            exchange.begin()

    def _read_request(self, headers: list[tuple[bytes, bytes]]) -> Request:
        request = Request(new_request_id())
        lines: list[bytes] = []
        cookies: list[bytes] = []
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name.startswith(b":"):
                if name == b":method":
                    request.method = value
                elif name == b":path":
                    request.target = value
                elif name == b":authority":
                    request.raw_host = value
                continue
            if name == b"cookie":
                cookies.append(value)
            elif name == b"x-request-id":
                if not request.has_request_id and usable_request_id(value):
                    request.request_id = value
                request.has_request_id = True
                lines.append(name + b": " + value + b"\r\n")
            elif name not in _TAKEN:
                lines.append(name + b": " + value + b"\r\n")
            elif name == b"host" and request.raw_host is None:
                request.raw_host = value
            elif name == b"content-length":
                request.content_length = int(value)
            elif name == b"te":
                request.te_trailers = value.strip().lower() == b"trailers"
            elif name == b"x-forwarded-for":
                request.forwarded_for = (value if request.forwarded_for is None
                                         else request.forwarded_for + b", " + value)
            elif name == b"via":
                request.via = value if request.via is None else request.via + b", " + value
        if cookies:  # crumbs joined for HTTP/1 (RFC 9113 §8.2.3)
            lines.append(b"cookie: " + b"; ".join(cookies) + b"\r\n")
        if lines:
            request.fields.append(b"".join(lines))
        target = request.target
        request.path = target[: target.find(b"?")] if b"?" in target else target
        if target == b"*":
            request.path = b"/"
        request.head_bytes = size
        request.host_fields = 1
        return request

    # -- frames out ------------------------------------------------------------------------------

    def send_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        if not self.closed:
            self.session.send_headers(stream_id, fields, end)
            self._write()

    def send_data(self, stream_id: int, data: bytes) -> bytes:
        """Send as much of `data` as the windows allow now; the rest is returned."""
        if self.closed:
            return b""
        taken = self.session.send_data(stream_id, data)
        self._write()
        return data[taken:] if taken < len(data) else b""

    def send_response(self, stream_id: int, fields: list[tuple[bytes, bytes]], data: bytes,
                      end: bool) -> int:
        """A response's head and as much of `data` as the windows take now (how much): its
        end too when all of it was taken and `end`."""
        if self.closed:
            return len(data)
        taken = self.session.send_response(stream_id, fields, data, end)
        self._write()
        return taken

    def end_stream(self, stream_id: int, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if not self.closed:
            self.session.end_stream(stream_id, trailers or None)
            self._write()

    def reset(self, stream_id: int, code: int) -> None:
        if not self.closed:
            self.session.reset(stream_id, code)
            self._write()

    def acknowledge(self, size: int, stream_id: int) -> None:
        if not self.closed:
            self.session.consume(stream_id, size)
            self._write()

    def hold(self) -> None:
        """Gather the frames made until `release` into one write."""
        self.holding += 1

    def release(self) -> None:
        self.holding -= 1
        self._write()

    def stream_done(self, stream: Http2Stream) -> None:
        if stream.exchange is None and self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            self.idle_since = self.plane.clock
            if (self.goaway_sent or self.goaway_received) and not self.streams:
                self.close()

    def _write(self, now: bool = False) -> None:
        """Write what the engine gathered (unless holding for a batch, or `now`)."""
        if (self.holding and not now) or self.closed or self.io is None or self.lingering_until:
            return
        data = self.session.data_to_send()
        if data:
            self.io.send(data)

    # -- as the data plane keeps it ------------------------------------------------------------

    def is_busy(self) -> bool:
        return bool(self.streams)

    def close_if_idle(self) -> None:
        """Draining: no new streams (GOAWAY); closed once those in progress are done."""
        if not self.goaway_sent and not self.closed:
            self.goaway_sent = True
            self.session.goaway(NO_ERROR)
            self._write()
        if not self.streams:
            self.close()

    def sweep(self, now: float) -> None:
        if self.lingering_until:
            if now >= self.lingering_until:
                self.abort()
            return
        if self.write_paused and now - self.write_stalled_since >= self.limits.send_timeout:
            self.abort()  # the client has taken nothing for send_timeout: gone (499s)
            return
        if self.plane.draining and not self.goaway_sent:
            # Draining: GOAWAY, so the client takes its next requests elsewhere (an HTTP/1
            # response says `Connection: close`); the streams in progress finish.
            self.close_if_idle()
            if self.closed:
                return
        settings = self.settings
        if self.ping_sent_at:
            if now - self.ping_sent_at >= settings.ping_timeout:
                self.abort()  # no answer to a PING: the client is gone without a word
                return
        elif (settings.ping_interval and self.streams
              and now - self.heard_at >= settings.ping_interval):
            self.ping_sent_at = now
            self.session.ping()
            self._write()
        for stream in list(self.streams.values()):
            stream.sweep(now)
        if not self.streams and now - self.idle_since >= settings.idle_timeout:
            self.close_if_idle()

    def close(self) -> None:
        if self.io is not None and not self.closed:
            self.closed = True
            self.io.close()

    def abort(self) -> None:
        if self.io is not None:
            self.closed = True
            self.io.abort()
