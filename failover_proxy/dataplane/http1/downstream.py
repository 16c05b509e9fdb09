"""The client-facing HTTP/1.1 protocol: parse with llhttp, enforce limits, answer in order.

Each read is cut at message boundaries and fed to llhttp piece by piece: a head up to its blank
line, a Content-Length body by its length, a chunked body where `ChunkedBodyEnd` finds its end.
So the connection knows where each head lies in the bytes, reads its fields from them whole
(no Python call per field) and forwards them as the runs of lines they came in, while llhttp
still validates every byte; a head or body end llhttp does not see exactly where the cut put it
is refused as malformed.

Requests on one connection are served one after another (pipelined requests queue up, each
response goes out in request order). Reading from the client is paused whenever the proxy cannot
take more: a body backlog waiting for a backend, a backend reading the body slowly, or too many
pipelined requests. A malformed or oversized request gets its 4xx after the responses ahead of
it, and the connection is closed: nothing after a framing error is ever forwarded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

import httptools

from ..exchange import Exchange
from ..http2.downstream import PREFACE, Http2Connection
from ..io.connio import ConnectionIO
from ..io.readpath import NOT_READING, Reading
from ..io.writepath import Send, SendParts, not_connected
from ..plane import ClientLimits, DataPlane
from ..request import DEFAULT_REPLAY_BYTES, EMPTY_BODY, Request, RequestBody
from ..streams import DownstreamStream, ResponseHead, UpstreamStream
from .chunked import ChunkedBodyEnd
from .headers import (
    BAD_HOST,
    CONNECTION,
    CONTENT_LENGTH,
    EXPECT,
    HOST,
    LAST_CHUNK,
    NOTED,
    PROXY_CONNECTION,
    REQUEST_TAKEN,
    TE,
    TRANSFER_ENCODING,
    UNDERSCORED_TAKEN,
    UPGRADE,
    VIA,
    X_FORWARDED_FOR,
    X_REQUEST_ID,
    Http1Head,
    build_response_head,
    decimal_value,
    error_response,
    head_end,
    join_values,
    last_chunk,
    new_request_id,
    usable_request_id,
    walk_fields,
)
from .tunnel import Tunnel
from .upstream import UpstreamConnection

# Reasons to stop reading from the client; reading resumes when none is left.
_PAUSE_BODY_BACKLOG: Final = 1
_PAUSE_UPSTREAM_SLOW: Final = 2
_PAUSE_PIPELINE_FULL: Final = 4
_PAUSE_UPGRADING: Final = 8
_PAUSE_STOPPED: Final = 16

_MAX_PIPELINED: Final = 16
_CRLF: Final = b"\r\n"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_ERROR_REASONS: Final = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
JOINED_BODY_BYTES: Final = 4096
"""A whole held body up to this size is joined to its head and written as one buffer; a larger
one is written beside it (writelines), which spares copying it: a 64 KiB response is copied
from uvloop's read buffer and out of the read's bytes already."""
_NO_PARSER: Final = httptools.HttpRequestParser(object())
"""What a lost connection holds in place of its parser (as upstream._NO_PARSER)."""
_P: Final = ord("P")
_HTTPS: Final = b"https"
_SLASH: Final = ord("/")
_QUERY_MARK: Final = ord("?")
_CR: Final = ord("\r")
_H: Final = ord("H")
_LF: Final = ord("\n")

# What the next bytes from the client are.
_HEAD: Final = 0
"""A request head, or the CR/LF llhttp allows before one."""
_BODY_LENGTH: Final = 1
_BODY_CHUNKED: Final = 2

def usual_method(request_line: bytes) -> bytes | None:
    """The method of a request line llhttp has accepted, when it is one of the usual ones (a
    shared constant, told by `startswith`, which mypyc compiles to a memcmp); None otherwise."""
    if request_line.startswith(b"GET "):
        return b"GET"
    if request_line.startswith(b"POST "):
        return b"POST"
    if request_line.startswith(b"HEAD "):
        return b"HEAD"
    if request_line.startswith(b"PUT "):
        return b"PUT"
    if request_line.startswith(b"DELETE "):
        return b"DELETE"
    return None


def target_in_line(line: bytes, method: bytes) -> bytes:
    """The request target of a request line llhttp has accepted with this method:
    `method SP target SP HTTP/d.d`, where llhttp allows more than one SP on either side of the
    target, which holds none itself."""
    target = line[len(method) + 1 : len(line) - 9]
    if target.startswith(b" ") or target.endswith(b" "):
        target = target.strip(b" ")
    return target


def _read_special_field(request: Request, kind: int, value: bytes) -> None:
    """A request header the proxy reads or rewrites instead of forwarding as it came."""
    if kind == HOST:
        request.host_fields += 1
        if request.raw_host is None:
            request.raw_host = value
    elif kind == CONTENT_LENGTH:
        request.content_length = decimal_value(value)
    elif kind == BAD_HOST:  # (the walk checked its bytes) RFC 9112 §3.2, whatever the target
        raise RejectRequest(400, "Bad Request", "invalid Host header")
    elif kind == TRANSFER_ENCODING:
        if value.strip().lower() != b"chunked":
            raise RejectRequest(
                501, "Not Implemented", "only Transfer-Encoding: chunked is supported"
            )
        request.chunked = True
    elif kind == CONNECTION:
        request.connection = join_values(request.connection, value)
    elif kind == EXPECT:
        request.expect = join_values(request.expect, value)
    elif kind == UPGRADE:
        request.upgrade_offered = value
    elif kind == X_FORWARDED_FOR:
        request.forwarded_for = join_values(request.forwarded_for, value)
    elif kind == VIA:
        request.via = join_values(request.via, value)
    elif kind == PROXY_CONNECTION:
        request.proxy_connection = True
    elif kind == TE and b"trailers" in value.lower():
        # Hop-by-hop: this client takes trailers; the proxy asks for them on its own hop.
        request.te_trailers = True
    # DROPPED: hop-by-hop, or X-Forwarded-Proto / -Host, which the proxy sets itself


def read_request_fields(
    request: Request, found: list[int | bytes], line_size: int, size: int, limits: ClientLimits
) -> None:
    """Read the fields of a request head llhttp has accepted, as `walk_fields` found them:
    `line_size` is the request line's, CRLF included, `size` the head's. The fields the proxy
    does not rewrite are in the runs of lines they came in already (`request.fields`)."""
    for index in range(3, len(found), 2):
        kind = cast(int, found[index])
        value = cast(bytes, found[index + 1])
        if kind == X_REQUEST_ID:
            if not request.has_request_id and usable_request_id(value):
                request.request_id = value  # the first one names the request, when usable
            request.has_request_id = True  # forwarded as it came; the proxy adds none
        else:
            _read_special_field(request, kind, value)
    count = cast(int, found[1])
    if count > limits.max_headers:
        raise RejectRequest(431, "Request Header Fields Too Large", "too many header fields")
    if size - line_size - 2 > limits.max_header_bytes:
        raise RejectRequest(431, "Request Header Fields Too Large", "request head too large")
    request.field_count = count


class RejectRequest(Exception):
    """A request the proxy refuses before forwarding (too large, bad framing…)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class _Rejection:
    """A queued refusal, so it is written after the responses to earlier pipelined requests."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class DownstreamProtocol(DownstreamStream):
    """One client connection, and the one stream the exchange of its current request answers
    through (an asyncio protocol by duck typing, so mypyc compiles it natively)."""

    def __init__(self, plane: DataPlane) -> None:
        super().__init__(plane)
        self.limits = limits = plane.limits
        self.request_taken = REQUEST_TAKEN | (
            0 if limits.underscores_in_headers else UNDERSCORED_TAKEN
        )
        """The request fields the walk takes out of what is forwarded."""
        self.scheme = plane.scheme
        self.transport: asyncio.Transport | None = None
        """For what the transport says (is it closing, the peer); it is ended through `io`."""
        self.io: ConnectionIO | None = None
        """The only way this connection's transport is closed or aborted (connio)."""
        self.parser = httptools.HttpRequestParser(self)
        self._feed: Callable[[bytes | memoryview], None] = self.parser.feed_data
        self.send: Send = not_connected
        """How every write to the client goes (writepath.write_path); bound once per connection."""
        self.send_parts: SendParts = not_connected
        self.reading: Reading = NOT_READING
        """How the connection reads and is paused (readpath.read_path); bound once."""
        self.reading_taken_over = False
        """reading.take_over() was called: once, when the connection was first kept alive."""
        self.chunked_out = False
        """The response being written is chunked (its length was not known)."""
        self.trailers_out = False
        """…and its trailers are passed on (the client sent `TE: trailers`)."""
        self.queue: deque[Request | _Rejection] = deque()
        self.exchange: Exchange | None = None
        self._serving = False
        self.tunnel: Tunnel | None = None
        self.write_paused = False
        self.closed = False
        self.stopped_parsing = False
        self.deadline = 0.0
        """When the client must have done something by (0: no limit now); see DataPlane.sweep."""
        self.deadline_status = 0
        """408 when a request head is overdue, 0 when an idle keep-alive connection expires."""
        self._pause_reasons = 0
        self.counted_ip = False
        """Counted in DataPlane.connections_per_ip (limits.max_connections_per_ip)."""
        self.requests_begun = 0
        """Requests read on this connection (limits.max_requests_per_connection)."""
        self._current: Request | None = None
        self._in_head = False
        """A request has begun and its head is not complete."""
        self._mode = _HEAD
        self._body_left = 0
        """Bytes of a Content-Length body still to come (_BODY_LENGTH)."""
        self._chunks: ChunkedBodyEnd | None = None
        """Where the chunked body being received ends (_BODY_CHUNKED)."""
        self._head_start = b""
        """The bytes of a head that began in an earlier read."""
        self._head: bytes | None = None
        """The bytes holding the head being fed to llhttp, once its end is found: the read
        itself, or the reads it came in joined."""
        self._head_at = 0
        """Where in `_head` the head begins (its request line)."""
        self._found: list[int | bytes] | None = None
        """What walk_fields found in the head (`request.fields` holds its runs)."""
        self._piece_at = 0
        self._upgrade_buffer: list[bytes] = []
        self._client_eof = False
        self._preface_held = b""
        """The start of what may be an HTTP/2 connection preface (a first read cut short)."""
        self.lingering_until = 0.0
        """While closing with a lingering close, the latest time to close at; else 0."""
        self.write_stalled_until = 0.0
        """While the transport's buffer for the client is full (pause_writing), when the client
        must have taken enough of it to resume by; else 0 (see DataPlane.sweep)."""

    @property
    def draining(self) -> bool:
        return self.plane.draining

    # -- connection lifecycle ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.io = io = ConnectionIO(
            transport, self.data_received, self.eof_received, self.read_failed
        )
        self.send = io.send
        self.send_parts = io.send_parts
        self.reading = io.reading
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        plane = self.plane
        plane.connections.add(self)
        if self.limits.max_connections and len(plane.connections) >= self.limits.max_connections:
            plane.stop_accepting()
        if self.limits.max_per_ip and not self._count_client():
            return
        if self.scheme == _HTTPS:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self._become_http2(b"")
                return
        self._set_deadline(self.limits.header_timeout, 408)

    def _count_client(self) -> bool:
        """One more connection of this client's address; False (answered 429 and closing)
        when it already holds its limit."""
        plane = self.plane
        held = plane.connections_per_ip.get(self.client_ip, 0)
        if held >= self.limits.max_per_ip:
            plane.store.inc("connections_refused", ("per_ip_limit",))
            self.stopped_parsing = True
            self.write(error_response(429, "Too Many Requests",
                                     "too many connections from this address", b"-",
                                     close=True, head_only=False))
            self.close()
            return False
        plane.connections_per_ip[self.client_ip] = held + 1
        self.counted_ip = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.io is not None:
            self.io.detach()
        # Let go of what holds our callbacks (reference cycles, see upstream._NO_PARSER): the
        # parser, and the last request, whose body can pause and resume our reading.
        self.parser = _NO_PARSER
        self._feed = _NO_PARSER.feed_data
        self._current = None
        self.plane.connection_ended(self, self.client_ip if self.counted_ip else None)
        self.counted_ip = False
        if self.tunnel is not None:
            self.tunnel.close()
        if self.exchange is not None:
            self.exchange.abandon()
            self.exchange = None
        self.queue.clear()

    def eof_received(self) -> bool | None:
        # A client that half-closes after its request still gets the answer; keep our side open
        # while a request is in progress, otherwise close.
        if self.tunnel is not None or self.lingering_until:
            return None  # a lingering close ends here: the client has stopped sending
        self._client_eof = True
        current = self._current
        if (
            current is not None
            and not self._in_head
            and not current.body.complete
            and not self.stopped_parsing
        ):
            # The body can never be completed: end the request now, as the client's fault,
            # rather than leave the backend waiting for it until its read timeout.
            self._reject(
                400, "Bad Request", "the client ended its side before the request body was complete"
            )
            return True
        return True if (self.exchange is not None or self.queue) else None

    def read_failed(self, exc: BaseException) -> None:
        """A read failed, or a callback raised (readpath): end the connection as the transport
        does on a fatal error."""
        self.stopped_parsing = True
        if self.io is not None:
            self.io.fail(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_stalled_until = self.plane.clock + self.limits.send_timeout
        if self.tunnel is not None:
            self.tunnel.client_write_paused(True)
        elif self.exchange is not None:
            attempt = self.exchange.attempt
            if attempt is not None and attempt.stream is not None:
                attempt.stream.pause_reading(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_stalled_until = 0.0
        if self.tunnel is not None:
            self.tunnel.client_write_paused(False)
        elif self.exchange is not None:
            attempt = self.exchange.attempt
            if attempt is not None and attempt.stream is not None:
                attempt.stream.pause_reading(False)

    # -- writing -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed and not self.lingering_until:
            self.send(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        if self.transport is not None and not self.closed and not self.lingering_until:
            self.send_parts(parts)

    def abort(self) -> None:
        self.stopped_parsing = True
        if self.io is not None:
            self.io.abort()

    def close(self) -> None:
        """End the connection after what has been written, as the proxy's own decision.

        Whatever else the client sent is not parsed: a request after an answer that closes the
        connection (a refusal, or Connection: close) must never reach a backend. But it is
        read: closing a socket with unread bytes makes the kernel send a reset, and a client
        still sending a body the proxy refused would then lose the answer before reading it.
        So, like nginx's lingering close, the proxy ends its side (the client reads the answer,
        then the end), drops what still arrives, and closes once the client ends its side too,
        is quiet for `lingering_timeout`, or has gone on for `lingering_time`."""
        self.stopped_parsing = True
        transport = self.transport
        io = self.io
        if (transport is None or io is None or self.closed or self.lingering_until
                or transport.is_closing()):
            return  # closed, aborted, or lingering already
        limits = self.limits
        if self._client_eof or limits.lingering_timeout <= 0 or not transport.can_write_eof():
            self._close_io(io)
            return
        self.lingering_until = self.plane.clock + limits.lingering_time
        self._linger_on()
        io.write_eof()
        if self._pause_reasons:
            self._pause_reasons = 0
            self.reading.resume()

    def _linger_on(self) -> None:
        """A lingering close waits `lingering_timeout` more for the client, to `lingering_until`
        at the latest (on_deadline then closes)."""
        self.deadline = min(self.plane.clock + self.limits.lingering_timeout, self.lingering_until)

    def close_now(self) -> None:
        """End the connection without a lingering close: the client is idle or overdue."""
        self.stopped_parsing = True
        if self.io is not None:
            self._close_io(self.io)

    def _close_io(self, io: ConnectionIO) -> None:
        """Close once what is written has gone out, and no later than `send_timeout` from now:
        a client that takes nothing would hold the socket for ever (on_deadline aborts it)."""
        io.close()
        self._set_deadline(self.limits.send_timeout, 0)

    def on_write_stalled(self) -> None:
        """Called by the sweeper: the client has left its full buffer untaken `send_timeout`
        long. Dropped as a client that went away (499); the backend is not blamed."""
        self.write_stalled_until = 0.0
        self.abort()

    # -- reading, with reasons to pause --------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._pause_reasons and not self.closed:
            self.reading.pause()
        self._pause_reasons |= reason

    def _resume(self, reason: int) -> None:
        if not self._pause_reasons & reason:
            return
        self._pause_reasons &= ~reason
        if not self._pause_reasons and not self.closed:
            self.reading.resume()

    def set_paused_by_upstream(self, paused: bool) -> None:
        if paused:
            self._pause(_PAUSE_UPSTREAM_SLOW)
        else:
            self._resume(_PAUSE_UPSTREAM_SLOW)

    def _pause_for_body(self) -> None:
        self._pause(_PAUSE_BODY_BACKLOG)

    def _resume_for_body(self) -> None:
        self._resume(_PAUSE_BODY_BACKLOG)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.requests_begun == 0 and self._current is None and data and self.plane.h2c and (
            data[0] == _P or self._preface_held
        ):
            data = self._http2_preface(data)
            if not data:
                return
        if self.stopped_parsing:
            if self.lingering_until:  # dropped; the client is still sending, so wait on
                self._linger_on()
            elif self._pause_reasons & _PAUSE_UPGRADING:
                self._upgrade_buffer.append(data)
            return
        try:
            self._parse(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The request asked to switch protocols: what follows is not HTTP unless the backend
            # refuses, so hold it until the backend answers.
            self.stopped_parsing = True
            leftover = data[self._piece_at + upgrade.args[0] :]
            if leftover:
                self._upgrade_buffer.append(leftover)
            self._pause(_PAUSE_UPGRADING)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RejectRequest):
                self._reject(cause.status, cause.reason, cause.detail)
            else:
                self._reject(400, "Bad Request", "request could not be handled")
        except httptools.HttpParserError as exc:
            self._reject(400, "Bad Request", f"malformed request: {exc}")
        except RejectRequest as exc:
            self._reject(exc.status, exc.reason, exc.detail)

    def _http2_preface(self, data: bytes) -> bytes:
        """A client's first bytes: the HTTP/2 connection preface hands the connection over to
        the HTTP/2 codec (h2c with prior knowledge, on this same port); b"" when they are
        taken (or held: the start of a preface, until the rest comes), else the bytes to read
        as HTTP/1."""
        held = self._preface_held + data if self._preface_held else data
        self._preface_held = b""
        if len(held) < len(PREFACE) and PREFACE.startswith(held):
            self._preface_held = held
            return b""
        if not held.startswith(PREFACE):
            return held
        self._become_http2(held)
        return b""

    def _become_http2(self, data: bytes) -> None:
        """Hand the connection over to the HTTP/2 codec (the preface read, or `h2` chosen by
        ALPN), with `data` read so far; this protocol object is done with it."""
        transport, io = self.transport, self.io
        if transport is None or io is None or self.closed:
            return
        self.stopped_parsing = self.closed = True  # this protocol object is done with it
        plane = self.plane
        plane.connections.discard(self)
        io.detach()
        self.parser = _NO_PARSER
        self._feed = _NO_PARSER.feed_data
        successor = Http2Connection(plane, self.client_ip)
        successor.counted_ip, self.counted_ip = self.counted_ip, False
        transport.set_protocol(cast(asyncio.BaseProtocol, successor))
        successor.connection_made(transport)
        if data:
            successor.data_received(data)

    def _parse(self, data: bytes) -> None:
        """Feed one read to llhttp in pieces cut at message boundaries (see the module doc)."""
        size = len(data)
        pos = 0
        while pos < size and not self.stopped_parsing:  # stopped: closed by an answer
            mode = self._mode
            if mode == _BODY_LENGTH:
                end = pos + min(self._body_left, size - pos)
                self._body_left -= end - pos
                if not self._body_left:
                    self._mode = _HEAD
                self._feed_piece(data, pos, end)
            elif mode == _BODY_CHUNKED:
                chunks = self._chunks
                assert chunks is not None
                end = chunks.scan(data, pos)
                if end < 0:
                    self._feed_piece(data, pos, size)  # the body goes on (or llhttp refuses it)
                    return
                request = self._current
                if chunks.trailers and request is not None:
                    if chunks.trailer_bytes > self.limits.max_header_bytes:
                        raise RejectRequest(
                            431, "Request Header Fields Too Large", "request trailers too large"
                        )
                    request.trailers = chunks.trailers  # before llhttp ends the body with them
                self._feed_piece(data, pos, end)
                if request is None or not request.body.complete:
                    raise RejectRequest(400, "Bad Request", "malformed chunked body")
                self._mode = _HEAD
                self._chunks = None
            else:
                end = self._head_piece(data, pos)
                if end < 0:
                    return
            pos = end

    def _head_piece(self, data: bytes, pos: int) -> int:
        """Feed llhttp the next request head, or as much of it as this read holds: the offset
        just past it (-1 when the read ends first)."""
        size = len(data)
        if not self._in_head:
            while pos < size and (data[pos] == _CR or data[pos] == _LF):
                pos += 1  # llhttp skips empty lines before a request line; so do we
            if pos == size:
                return -1
            request = self._begin_request()
            if data[pos] == _H and data[pos : pos + 5] == b"HEAD ":  # (a native index first)
                request.method = b"HEAD"  # so a refusal before the head is read has no body
            stop = self._walk_head(request, data, pos)
            if stop < 0:
                self._head_start = data[pos:] if pos else data
        else:  # the head began in an earlier read
            held = self._head_start
            joined = held + data
            if len(held) < 5 and joined.startswith(b"HEAD ") and self._current is not None:
                self._current.method = b"HEAD"  # the first read was too short to tell
            # Only the new bytes are searched: a client sending its head a byte at a time costs
            # no more than one sending it whole.
            end = head_end(joined, max(len(held) - 3, 0))
            stop = end - len(held) if end >= 0 else -1
            if stop < 0:
                self._head_start = joined
            elif self._current is not None:
                self._walk_head(self._current, joined, 0)
        if stop < 0:
            self._feed_piece(data, pos, size)
            if self._in_head and len(self._head_start) > self._head_limit():
                self._refuse_large_head(self._head_start, 0)
            return -1
        self._head_start = b""
        self._feed_piece(data, pos, stop)
        if self._head is not None:  # llhttp did not end the head where the blank line is
            raise RejectRequest(400, "Bad Request", "malformed request head")
        return stop

    def _walk_head(self, request: Request, data: bytes, start: int) -> int:
        """Walk the head that begins at `start` in `data` (walk_fields): where it ends, -1 when
        `data` ends first. Walked before llhttp has read it: nothing found is used unless
        llhttp accepts the head. More bytes than any head may hold are searched for the head's
        end first, so a walk never covers more than a head's limit, and a head past the limit
        is refused unread."""
        limit = self._head_limit()
        if len(data) - start > limit:
            end = head_end(data, start)
            if end < 0:
                return -1
            if end - start > limit:
                self._refuse_large_head(data, start)
        found = walk_fields(data, start, self.request_taken, NOTED, request.fields)
        end = cast(int, found[0])
        if end < 0:
            request.fields.clear()  # walked again once the head is complete
            return -1
        self._head = data
        self._head_at = start
        self._found = found
        return end

    def _refuse_large_head(self, data: bytes, start: int) -> None:
        """A head past both limits together, refused without reading it: 414 when its request
        line alone is too long, 431 otherwise."""
        line_end = data.find(b"\r\n", start)
        if line_end < 0 or line_end - start > self.limits.max_url_bytes + 16:
            raise RejectRequest(414, "URI Too Long", "request target too long")
        raise RejectRequest(431, "Request Header Fields Too Large", "request head too large")

    def _head_limit(self) -> int:
        limits = self.limits
        return limits.max_url_bytes + limits.max_header_bytes + 64

    def _feed_piece(self, data: bytes, start: int, end: int) -> None:
        self._piece_at = start
        if start == 0 and end == len(data):
            self._feed(data)
        elif start < end:
            self._feed(memoryview(data)[start:end])  # llhttp reads the buffer in place

    def _begin_request(self) -> Request:
        request = self._current = Request(new_request_id())
        self._in_head = True
        if self.exchange is None and not self.queue:
            self.deadline = self.plane.clock + self.limits.header_timeout
            self.deadline_status = 408
        return request

    def _reject(self, status: int, reason: str, detail: str) -> None:
        self.stopped_parsing = True
        self._pause(_PAUSE_STOPPED)
        current = self._current
        request_id = current.request_id if current is not None else new_request_id()
        payload = error_response(
            status, reason, detail, request_id, close=True,
            head_only=current is not None and current.method == b"HEAD",
        )
        exchange = self.exchange
        if exchange is not None and exchange.request is current:
            exchange.refusal = status  # it records the request, once, with this status
        else:
            self.plane.record_own_answer(current, request_id, self.client_ip, status, len(payload))
        # Queued first: failing the body below may end the exchange at once, which then serves
        # what is queued.
        self.queue.append(_Rejection(payload))
        if current is not None and not self._in_head and not current.body.complete:
            # Broken in the middle of its body: whatever part went to a backend is abandoned.
            current.body.fail()
        self._ensure_serving()

    # -- llhttp callbacks ----------------------------------------------------------------------

    # No on_message_begin (the cut sees a request begin), no on_url and no on_header: the
    # request line and the fields are read whole from the head's bytes (_read_request_line,
    # read_request_fields), which saves a Python call each; trailers are validated by llhttp
    # and read from the bytes by ChunkedBodyEnd.

    def on_headers_complete(self) -> None:
        request = self._current
        head = self._head
        found = self._found  # set with `_head`, from a walk that found the head's end
        if request is None or head is None or found is None or not self._in_head:
            raise RejectRequest(400, "Bad Request", "malformed request head")
        self._head = self._found = None
        start = self._head_at
        line_end = cast(int, found[2])
        end = cast(int, found[0])
        line = head[start:line_end]
        method = usual_method(line)
        request.method = method if method is not None else self.parser.get_method()
        read_request_fields(request, found, line_end - start + 2, end - start, self.limits)
        head_bytes = end - start
        target = self._read_request_line(request, line)
        self.requests_begun += 1
        if self.requests_begun == self.limits.max_requests:
            request.keep_alive = False  # its response says Connection: close
        self._read_framing(request, target)
        self._in_head = False
        if request.chunked:
            self._mode = _BODY_CHUNKED
            self._chunks = ChunkedBodyEnd()
        elif request.content_length:
            self._mode = _BODY_LENGTH
            self._body_left = request.content_length
        if request.chunked or request.content_length:
            request.body = RequestBody(
                DEFAULT_REPLAY_BYTES, self._pause_for_body, self._resume_for_body
            )
        else:
            request.body = EMPTY_BODY
        request.head_bytes = head_bytes  # only now: a rejected head has no body
        self.deadline = 0.0
        if self.exchange is None and not self.queue and not self._serving:
            self._start_exchange(request)  # the common case: nothing ahead of it
            return
        self.queue.append(request)
        if len(self.queue) >= _MAX_PIPELINED:
            self._pause(_PAUSE_PIPELINE_FULL)
        self._ensure_serving()

    def _read_request_line(self, request: Request, line: bytes) -> bytes:
        """Version and keep-alive from a request line llhttp has accepted, and its target
        (the method is read first, so that any refusal knows a HEAD request). Read from the line
        itself: the parser's getters are generic method calls, and its URL callback one more
        call and a bytes object per request."""
        parser = self.parser
        method = request.method
        if not line.endswith(b" HTTP/1.1"):
            version = parser.get_http_version()
            if version != "1.0":  # llhttp takes HTTP/0.9 and HTTP/2.0 request lines as well
                raise RejectRequest(
                    505, "HTTP Version Not Supported", f"HTTP/{version} is not supported"
                )
            request.http10 = True
        # Without a Connection or Proxy-Connection field, llhttp keeps HTTP/1.1 alive.
        if request.connection is not None or request.proxy_connection or request.http10:
            request.keep_alive = parser.should_keep_alive()
        target = target_in_line(line, method)
        if len(target) > self.limits.max_url_bytes:
            raise RejectRequest(414, "URI Too Long", "request target too long")
        return target

    def _read_framing(self, request: Request, target: bytes) -> None:
        """Checks a proxy must make before trusting a request head (RFC 9112 §3.2, §6)."""
        if request.chunked and request.http10:
            # RFC 9112 §6.1: framing an HTTP/1.0 peer cannot have meant is faulty framing.
            raise RejectRequest(400, "Bad Request", "Transfer-Encoding in an HTTP/1.0 request")
        if request.expect is not None:
            if request.expect.strip().lower() != b"100-continue":
                raise RejectRequest(417, "Expectation Failed", "unsupported expectation")
            request.expect_continue = not request.http10
        if request.upgrade_offered is not None and self.parser.should_upgrade():
            if request.chunked or request.content_length:
                # llhttp (so Node.js, and our own parser) takes such a body for bytes of the
                # new protocol, other servers for the request's body: the two would frame the
                # connection differently. A WebSocket handshake has none.
                raise RejectRequest(400, "Bad Request", "a body on a request to upgrade")
            request.upgrade = request.upgrade_offered
        if request.method == b"CONNECT":
            raise RejectRequest(405, "Method Not Allowed", "CONNECT is not supported")
        if request.host_fields > 1:
            raise RejectRequest(400, "Bad Request", "more than one Host header")
        path: bytes | None = None
        if not target or target[0] != _SLASH:  # not the usual origin form
            if target == b"*":  # asterisk form (RFC 9112 §3.2.4): about the server as a whole
                if request.method != b"OPTIONS":
                    raise RejectRequest(400, "Bad Request", "only OPTIONS may have the target *")
                path = b"/"  # routed as the host's root; the backend gets `*` as it came
            elif target.startswith((b"http://", b"https://")):
                # Any: the stub types port, path and query as never None, which mypyc checks
                try:
                    url: Any = httptools.parse_url(target)
                except httptools.HttpParserInvalidURLError:  # an empty port, or one over 65535
                    raise RejectRequest(400, "Bad Request", "invalid request target") from None
                port: int | None = url.port
                url_path: bytes | None = url.path
                query: bytes | None = url.query
                request.raw_host = url.host + (b":%d" % port if port else b"")
                if not url_path and not query and request.method == b"OPTIONS":
                    # `OPTIONS http://host` asks about the origin as a whole: its last proxy
                    # sends it on as `OPTIONS *` (RFC 9112 §3.2.4).
                    target = b"*"
                    path = b"/"  # routed as the asterisk form is
                else:
                    target = (url_path or b"/") + (b"?" + query if query else b"")
            else:
                raise RejectRequest(400, "Bad Request", "invalid request target")
        if not request.host_fields and not request.http10:
            # Even with an absolute-form target (RFC 9112 §3.2: an HTTP/1.1 request without a
            # Host field is answered 400).
            raise RejectRequest(400, "Bad Request", "missing Host header")
        limit = self.limits.max_body_bytes
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise RejectRequest(413, "Content Too Large", f"request body over {limit} bytes")
        request.target = target
        # An int operand: `b"?" in target` first tries the operand as an int, and that failure
        # formats a TypeError message on every request; `find` is a generic method call.
        if path is None:
            path = target[: target.find(b"?")] if _QUERY_MARK in target else target
        request.path = path

    def on_body(self, chunk: bytes) -> None:
        request = self._current
        assert request is not None
        limit = self.limits.max_body_bytes
        if limit is not None and request.body.received + len(chunk) > limit:
            raise RejectRequest(413, "Content Too Large", f"request body over {limit} bytes")
        request.body.feed(chunk)

    def on_message_complete(self) -> None:
        request = self._current
        if request is not None and not request.body.complete:
            request.body.finish()

    # -- serving the queue in order ------------------------------------------------------------

    def _ensure_serving(self) -> None:
        if self.exchange is None:
            self._serve_next()

    def _serve_next(self) -> None:
        """Start the next queued request, unless one is in progress (responses go in order)."""
        if self._serving:
            return  # called back from inside the loop below: the loop carries on
        self._serving = True
        try:
            queue = self.queue
            while queue and self.exchange is None and not self.closed:
                item = queue.popleft()
                if isinstance(item, _Rejection):
                    self.write(item.payload)
                    self.close()
                    return
                if len(queue) < _MAX_PIPELINED:
                    self._resume(_PAUSE_PIPELINE_FULL)
                self._start_exchange(item)
                if item.close_connection and self.exchange is None:
                    return
        finally:
            self._serving = False
        if self.exchange is None and not self.closed and self.tunnel is None:
            if self._client_eof:
                self.close()
            else:
                self._set_deadline(self.limits.keepalive_timeout, 0)

    def _start_exchange(self, request: Request) -> None:
        route = self.plane.topology.router.match_request(request.raw_host, request.path)
        if route is None:
            self._answer_no_route(request)
            if request.close_connection:
                self.close()
            return
        target = route.target
        upstream = target.upstream
        body = request.body
        exchange = Exchange(self, request, target)
        self.exchange = exchange
        if body is EMPTY_BODY:
            exchange.begin()
            return
        if body.replay_limit != upstream.replay_max_bytes:
            body.set_replay_limit(upstream.replay_max_bytes)
        limit = upstream.buffer_body_bytes
        if (limit and not body.complete and request.upgrade is None
                and (request.chunked or (request.content_length or 0) <= limit)):
            exchange.wait_for_body(limit)
        else:
            exchange.begin()

    def _answer_no_route(self, request: Request) -> None:
        if not request.keep_alive or not request.body.complete or request.upgrade is not None:
            # after an upgrade offer the bytes that follow are not HTTP: nobody reads them
            request.close_connection = True
        response = error_response(
            404, "Not Found", "no route for this host and path", request.request_id,
            close=request.close_connection, head_only=request.method == b"HEAD",
        )
        self.plane.record_own_answer(
            request, request.request_id, self.client_ip, 404, len(response)
        )
        self.write(response)

    def exchange_done(self, exchange: object) -> None:
        """Called by an exchange when its response is complete (or failed)."""
        current = self.exchange
        if current is None or current is not exchange:
            return
        self.exchange = None
        request = current.request
        if self.tunnel is not None:
            return
        if request.upgrade is not None:
            request.close_connection = True  # the backend refused the upgrade
        if request.close_connection:
            self.close()
            return
        if not self.reading_taken_over:  # kept alive: read in batches from now on (readpath)
            self.reading_taken_over = True
            self.reading.take_over()
        if self.queue or self._serving or self._client_eof:
            self._serve_next()
        else:  # the common case: idle until the next request
            self.deadline = self.plane.clock + self.limits.keepalive_timeout
            self.deadline_status = 0

    def _tunnel(self, conn: UpstreamConnection, leftover: bytes) -> None:
        """The backend switched protocols: from now on bytes flow untouched both ways."""
        assert self.io is not None and conn.io is not None
        tunnel = Tunnel(self.io, conn.io)
        self.tunnel = tunnel
        conn.tunnel = tunnel
        if leftover:
            tunnel.from_backend(leftover)
        for chunk in self._upgrade_buffer:
            tunnel.from_client(chunk)
        self._upgrade_buffer = []
        conn.pause_reading(False)
        self._pause_reasons = 0
        self.reading.resume()
        if self.write_paused:
            tunnel.client_write_paused(True)

    # -- the response, as the exchange's downstream stream --------------------------------------

    # The client transport is written directly (`send`): while an exchange answers, the client
    # is connected (a client that goes away abandons the exchange first).

    def send_continue(self, request: Request) -> None:
        self.write(_CONTINUE)

    def send_head(
        self, request: Request, status: int, head: ResponseHead, decision: str | None,
        body: bytes | None, more: list[bytes] | None, end: bool,
    ) -> int:
        no_body = status == 204 or status == 304 or request.method == b"HEAD"
        unknown_length = head.length < 0 and not no_body
        http10 = request.http10
        client_keeps = (
            request.keep_alive
            and request.upgrade is None
            and request.body.complete
            and not self.plane.draining
            and not (http10 and unknown_length)
        )
        if not client_keeps:
            request.close_connection = True
        chunked = unknown_length and not http10
        self.chunked_out = chunked
        self.trailers_out = chunked and request.te_trailers
        data = build_response_head(
            status,
            cast(Http1Head, head),
            chunked=chunked,
            keep_alive=client_keeps,
            client_http10=http10,
            request_id=request.request_id,
            proxy_headers=_decision_line(decision) if decision is not None else None,
        )
        size = len(data)
        if body is None:
            if end and chunked:
                self.chunked_out = False
                self.send(data + LAST_CHUNK)
            else:
                self.send(data)
            return size
        size += len(body)
        if chunked:
            parts = [data, b"%x\r\n" % len(body), body, _CRLF]
            for piece in more or ():
                size += len(piece)
                parts += (b"%x\r\n" % len(piece), piece, _CRLF)
            if end:
                self.chunked_out = False
                parts.append(LAST_CHUNK)
            self.send_parts(tuple(parts))
        elif more is None and len(body) <= JOINED_BODY_BYTES:
            self.send(data + body)  # the usual small response: one buffer
        elif more is None:
            self.send_parts((data, body))  # one sendmsg, the body not copied
        else:
            for piece in more:
                size += len(piece)
            self.send_parts((data, body, *more))
        return size

    def send_body(self, chunk: bytes) -> int:
        if self.chunked_out:
            self.send_parts((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            self.send(chunk)
        return len(chunk)

    def send_end(self, trailers: list[bytes] | None) -> int:
        if not self.chunked_out:
            return 0  # the length framed it, or the close will
        self.chunked_out = False
        self.send(last_chunk(trailers) if self.trailers_out else LAST_CHUNK)
        return 0

    def send_error(
        self, request: Request, status: int, detail: str, retry_after: bool,
        decision: str | None,
    ) -> int:
        close = request.close_connection or not request.body.complete or not request.keep_alive
        if close:
            request.close_connection = True
        response = error_response(
            status, _ERROR_REASONS[status], detail, request.request_id, close=close,
            retry_after=1 if retry_after else None,
            proxy_headers=_decision_line(decision) if decision is not None else None,
            head_only=request.method == b"HEAD",
        )
        self.write(response)
        return len(response)

    def reset(self) -> None:
        self.abort()

    def start_tunnel(
        self, request: Request, head: ResponseHead, upstream: UpstreamStream, leftover: bytes
    ) -> int:
        upgrade_head = cast(Http1Head, head)
        data = build_response_head(
            101,
            upgrade_head,
            chunked=False,
            keep_alive=True,
            client_http10=False,
            request_id=request.request_id,
            upgrade=upgrade_head.upgrade or request.upgrade,
        )
        self.write(data)
        conn = cast(UpstreamConnection, upstream)
        conn.owner = None
        self._tunnel(conn, leftover)
        return len(data)

    # -- as the data plane keeps it -------------------------------------------------------------

    def is_busy(self) -> bool:
        return self.exchange is not None or self.tunnel is not None

    def close_if_idle(self) -> None:
        if self.exchange is None and self.tunnel is None:
            self.close_now()

    def sweep(self, now: float) -> None:
        stalled = self.write_stalled_until
        if stalled and now >= stalled:
            self.on_write_stalled()
        elif self.deadline and now >= self.deadline:
            self.on_deadline()
        elif self.exchange is not None:
            self.exchange.check_timeout(now)
        elif self.tunnel is not None:
            self.tunnel.check_idle(now, self.limits.tunnel_idle_timeout)

    # -- timeouts ------------------------------------------------------------------------------

    def _set_deadline(self, seconds: float, status: int) -> None:
        self.deadline = self.plane.clock + seconds
        self.deadline_status = status

    def body_stalled(self) -> None:
        """The backend has waited `body_timeout` for the rest of the request body: the client
        stalled, not the backend (called by the attempt, which then counts no failure)."""
        self._reject(408, "Request Timeout", "request body not received in time")

    def on_deadline(self) -> None:
        """Called by the sweeper when the client took too long (or idled too long, or a
        lingering close has waited long enough)."""
        self.deadline = 0.0
        transport, io = self.transport, self.io
        if transport is not None and io is not None and transport.is_closing():
            io.abort()  # closed, and the client took nothing more in send_timeout
            return
        if self.lingering_until:
            self.close_now()
            return
        if self.exchange is not None or self.tunnel is not None:
            return
        current = self._current
        if self.deadline_status == 408 and current is not None and self._in_head:
            self.write(
                error_response(
                    408, "Request Timeout", "request head not received in time",
                    current.request_id, close=True, head_only=current.method == b"HEAD",
                )
            )
        self.close_now()


def _decision_line(decision: str) -> bytes:
    """The X-Failover-Proxy-Decision field line (debug_headers: true)."""
    return b"X-Failover-Proxy-Decision: " + decision.encode("latin-1", "replace") + _CRLF


def protocol_factory(plane: DataPlane) -> Callable[[], asyncio.Protocol]:
    """What a listener calls per accepted connection: an HTTP/1.1 client connection."""
    return lambda: cast(asyncio.Protocol, DownstreamProtocol(plane))
