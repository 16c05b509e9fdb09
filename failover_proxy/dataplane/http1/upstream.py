"""HTTP/1.1 to backends: connections as upstream streams, and each backend's connector, a
keep-alive pool (plain TCP or TLS with SNI).

An `UpstreamConnection` is one stream at a time: it writes the request head, body and trailers,
parses responses with llhttp (but frames itself a response whose head repeats the last one's
bytes and has a Content-Length) and hands every event to the attempt that currently owns it;
between requests it rests in its backend's `Http1Connector`, newest first, and is closed after
`idle_timeout` so that we, not the backend, end idle connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from ...model.connector import Dial
from ..io.connio import ConnectionIO
from ..io.readpath import NOT_READING, Reading
from ..io.writepath import Send, SendParts, not_connected
from ..request import Request
from ..streams import DownstreamStream, StreamOwner, UpstreamConnector, UpstreamStream
from .headers import (
    MAX_RESPONSE_HEAD,
    Http1Head,
    build_request_head,
    forwarded_block,
    forwarded_prefix,
    host_line,
    last_chunk,
    read_response_head,
    usual_request_head,
)

if TYPE_CHECKING:
    from .tunnel import Tunnel

_CRLF: Final = b"\r\n"

_NO_PARSER: Final = httptools.HttpResponseParser(object())
"""What a connection holds in place of its parser before it connects and once it is lost: a
parser holds its protocol's callbacks, a reference cycle only the cyclic collector frees, and a
collector pass over many connections' worth stalls the event loop."""


class _TrailerReader:
    """Stands between llhttp and a connection whose responses may carry trailers a client
    takes (`TE: trailers`): llhttp reports trailer fields only through `on_header`, which the
    connection itself leaves out (a Python call per field of every response)."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.in_trailers = False

    def on_message_begin(self) -> None:
        self.in_trailers = False
        self.conn.on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_trailers:
            conn = self.conn
            if conn.trailers is None:
                conn.trailers = []
            conn.trailers.append(name + b": " + value)

    def on_headers_complete(self) -> None:
        self.in_trailers = True
        self.conn.on_headers_complete()

    def on_body(self, chunk: bytes) -> None:
        self.conn.on_body(chunk)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


class UpstreamConnection(UpstreamStream):
    """One connection to a backend, one request at a time: writes requests, parses responses
    and forwards their events to its owner.

    An asyncio protocol by duck typing (no asyncio base class), so mypyc compiles it as a
    native class.
    """

    def __init__(self, connector: Http1Connector) -> None:
        self.connector = connector
        self.transport: asyncio.Transport | None = None
        """For what the transport says (is it closing, TLS details); it is ended through `io`."""
        self.io: ConnectionIO | None = None
        """The only way this connection's transport is closed or aborted (connio)."""
        self.parser = _NO_PARSER  # until connected: a refused connect leaves no cycle
        self._feed: Callable[[bytes], None] = _NO_PARSER.feed_data
        self.send: Send = not_connected
        """How every write to the backend goes (writepath.write_path); bound once per connection."""
        self.send_parts: SendParts = not_connected
        self.reading: Reading = NOT_READING
        """How the connection reads and is paused (readpath.read_path); bound once."""
        self.reading_taken_over = False
        """reading.take_over() was called: once, when the pool first kept the connection."""
        self.lost_to: BaseException | None = None
        """The error a failed read ended the connection with (connection_lost then gets None)."""
        self.tunnel: Tunnel | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reading_paused = False
        self.bytes_received = 0
        """Bytes received since the current owner took the connection (0 = the backend is mute)."""
        self._head_buf = b""
        """The bytes the response head being parsed is in, from `_head_at` on."""
        self._head_at = 0
        self._head_open = False
        """A response has begun and its head is not complete: its bytes so far are kept."""
        self._informational = False
        self._head_only_done = False
        self._status = 0
        """The status of the response being received."""
        self._last_head: Http1Head | None = None
        """The last response head parsed here: the next one, when its bytes are the same."""
        self._in_message = False
        """llhttp has begun a response it has not finished (it is not at a message's start)."""
        self._body_left = 0
        """Body bytes still to come of a response read without llhttp (_known_response)."""
        self.chunked_body = False
        """The request body being sent is chunked (its length was not known)."""
        self.reusable = False
        """The response being received leaves the connection open for another request."""
        self.close_delimited = False
        """The response being received has neither length nor chunking: the close ends it."""
        self.chunked_response = False
        self.trailers: list[bytes] | None = None
        """Trailer fields of the response being received (collected by a _TrailerReader)."""
        self.reading_trailers = False
        """The parser reports trailers (a _TrailerReader stands before this connection)."""

    # -- lifecycle -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self._new_parser()
        self.io = io = ConnectionIO(
            transport, self.data_received, self.eof_received, self.read_failed
        )
        self.send = io.send
        self.send_parts = io.send_parts
        self.reading = io.reading
        self.connector.open_connections += 1

    def _new_parser(self) -> None:
        """A parser at a message's start, reporting to this connection (through a
        _TrailerReader once a request asked for trailers here)."""
        if self.reading_trailers:
            self.parser = httptools.HttpResponseParser(_TrailerReader(self))
        else:
            self.parser = httptools.HttpResponseParser(self)
        self._feed = self.parser.feed_data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.io is not None:
            self.io.detach()
        self.parser = _NO_PARSER  # it holds our callbacks: see _NO_PARSER
        self._feed = _NO_PARSER.feed_data
        if exc is None and isinstance(self.lost_to, Exception):
            exc = self.lost_to
        self.connector.forget(self)
        if self.tunnel is not None:
            self.tunnel.close()
        owner = self.owner
        if owner is not None:
            self.owner = None
            if self.close_delimited:
                owner.on_complete(None)  # no length and no chunking: the close ends the body
            else:
                owner.on_lost(exc)

    def eof_received(self) -> bool | None:
        return None  # close our side too; an HTTP/1.1 backend that half-closes is done

    def read_failed(self, exc: BaseException) -> None:
        """A read failed, or a callback raised (readpath): end the connection as the transport
        does on a fatal error."""
        self.lost_to = exc
        if self.io is not None:
            self.io.fail(self, exc)

    def close(self) -> None:
        self.closed = True
        self.owner = None
        if self.io is not None:
            self.io.close()

    def abort(self) -> None:
        self.closed = True
        self.owner = None
        if self.io is not None:
            self.io.abort()

    def release(self, now: float) -> None:
        if self.reusable:
            self.connector.release(self, now)
        else:
            self.close()

    # -- the request ---------------------------------------------------------------------------

    def send_head(
        self, owner: StreamOwner, request: Request, backend_path: bytes,
        authority: bytes | None, client: DownstreamStream,
    ) -> None:
        self.owner = owner
        self.reusable = self.close_delimited = False
        self.chunked_body = request.chunked
        if request.te_trailers and not self.reading_trailers and self.transport is not None:
            # (between requests llhttp is at a message's start: a new parser loses nothing)
            self.reading_trailers = True
            self._new_parser()
        self.trailers = None
        fields = request.fields_block
        if fields is None:
            fields = request.fields_block = forwarded_block(request.fields, request.connection)
        original_host = request.raw_host
        if (
            original_host is not None
            and not request.has_request_id
            and request.via is None
            and request.upgrade is None
            and not request.te_trailers
        ):
            forwarded_for = request.forwarded_for
            if forwarded_for is None:
                prefix = client.forwarding
                if not prefix:
                    prefix = client.forwarding = forwarded_prefix(
                        None, client.client_ip, client.scheme
                    )
            else:
                prefix = forwarded_prefix(forwarded_for, client.client_ip, client.scheme)
            self.send(usual_request_head(
                request.method,
                backend_path,
                self.connector.host_line if authority is None else host_line(authority),
                fields,
                prefix,
                original_host,
                request.request_id,
                request.content_length,
                request.chunked,
            ))
            return
        self.send(build_request_head(
            request.method,
            backend_path,
            fields,
            host=self.connector.dial.authority if authority is None else authority,
            client_ip=client.client_ip,
            forwarded_for=request.forwarded_for,
            original_host=original_host,
            via=request.via,
            scheme=client.scheme,
            request_id=request.request_id,
            has_request_id=request.has_request_id,
            content_length=request.content_length,
            chunked=request.chunked,
            upgrade=request.upgrade,
            te_trailers=request.te_trailers,
        ))

    def send_body(self, chunk: bytes) -> None:
        if self.chunked_body:
            self.send_parts((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            self.send(chunk)

    def end_body(self, trailers: list[bytes] | None) -> None:
        if self.chunked_body and self.transport is not None and not self.closed:
            self.send(last_chunk(trailers))

    def pause_reading(self, paused: bool) -> None:
        if self.transport is None or paused == self.reading_paused or self.closed:
            return
        self.reading_paused = paused
        if paused:
            self.reading.pause()
        else:
            self.reading.resume()

    # -- flow control from the kernel ----------------------------------------------------------

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.backend_write_paused(True)
        elif self.owner is not None:
            self.owner.on_write_paused(True)

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.backend_write_paused(False)
        elif self.owner is not None:
            self.owner.on_write_paused(False)

    # -- bytes in ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_backend(data)
            return
        owner = self.owner
        if owner is None:
            # Bytes nobody asked for on an idle connection: it can no longer be trusted.
            self.abort()
            return
        self.bytes_received += len(data)
        if self._body_left:
            data = self._known_body(owner, data, 0)
            if not data:
                return
        elif not self._in_message:
            last = self._last_head
            if (
                last is not None
                and last.body_size >= 0
                and not owner.head_only
                and data.startswith(last.raw)
            ):
                data = self._known_response(owner, last, data)
                if not data:
                    return
        self._parse(data)

    def _known_response(self, owner: StreamOwner, head: Http1Head, data: bytes) -> bytes:
        """A response whose head has the bytes of the last one parsed here, framed by
        Content-Length and kept alive (`head.body_size`), read without llhttp: its events go to
        the owner as llhttp would send them; what follows its body is returned for llhttp.

        This is exact. llhttp is at a message's start and validated these head bytes from that
        state, which made them end where they do and give this framing; a Content-Length body is
        counted, not parsed; and a kept-alive message ends with llhttp at a message's start
        again. Each read costs a native memory compare instead of llhttp's pass over the head,
        four callbacks from it, and a head read: about a sixth of a small proxied request.
        """
        self._status = status = head.status
        self.reusable = True
        owner.on_head(status, head)
        if self.owner is not owner:
            return b""  # the attempt ended on the head (a failure status): the rest is dropped
        self._body_left = head.body_size
        return self._known_body(owner, data, len(head.raw))

    def _known_body(self, owner: StreamOwner, data: bytes, start: int) -> bytes:
        """The body bytes from `start` in `data` of a response read without llhttp, whose
        `_body_left` bytes are still to come: handed to the owner, which is told when the body is
        complete; what follows the body is returned for llhttp."""
        end = start + self._body_left
        size = len(data)
        if size < end:
            self._body_left = end - size
            if size > start:
                owner.on_body(data[start:] if start else data)
            return b""
        self._body_left = 0
        if end > start:
            owner.on_body(data if start == 0 and end == size else data[start:end])
        if self.owner is owner:
            owner.on_complete(None)
        return data[end:] if end < size else b""  # a slice call even when empty

    def _parse(self, data: bytes) -> None:
        """Feed llhttp, which calls the on_* methods below."""
        if self._head_open:
            self._head_buf += data  # the head began in an earlier read
        else:
            self._head_buf = data
            self._head_at = 0
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as upgrade:
            owner = self.owner
            if owner is not None:
                owner.on_upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            self._bad_response(f"invalid response from backend: {exc.__context__}")
        except httptools.HttpParserError as exc:
            self._bad_response(f"invalid response from backend: {exc}")
        self._head_only_done = False  # later bytes go to the fresh parser
        if not self._head_open:
            self._head_buf = b""
        elif len(self._head_buf) - self._head_at > MAX_RESPONSE_HEAD:
            self._bad_response("invalid response from backend: response head too large")
        elif self._head_at:
            self._head_buf = self._head_buf[self._head_at :]
            self._head_at = 0

    def _bad_response(self, reason: str) -> None:
        owner = self.owner
        self.abort()
        if owner is not None:
            owner.on_bad_response(reason)

    # -- llhttp callbacks ----------------------------------------------------------------------

    # No on_header: the head is read whole from the raw bytes (read_response_head), which
    # saves a Python call per field; trailers are read by a _TrailerReader when a client
    # takes them, else validated by llhttp and dropped.

    def on_message_begin(self) -> None:
        if self.owner is None:
            # The backend sent a response after the one we asked for, in the same read.
            raise ValueError("unsolicited response")
        self._head_open = True
        self._in_message = True

    def on_headers_complete(self) -> None:
        self._head_open = False
        buf = self._head_buf
        start = self._head_at
        last = self._last_head
        # The same bytes as the last head: its only blank line is its end, so the head here ends
        # where it did (startswith: a native memory compare, no split, no parse).
        if last is not None and start == 0 and buf.startswith(last.raw):
            parsed = last
        else:
            parsed = self._last_head = read_response_head(buf, start)
        self._head_at = start + parsed.size  # a final response may follow an informational one
        self._status = status = parsed.status
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue, 103 Early Hints: not forwarded
            return
        owner = self.owner
        if owner is None:
            return
        head_only = owner.head_only
        no_body = head_only or status == 204 or status == 304 or status == 101
        self.close_delimited = close_delimited = (
            not no_body and not parsed.chunked and parsed.content_length is None
        )
        self.reusable = parsed.keeps_alive and not close_delimited
        self.chunked_response = parsed.chunked
        owner.on_head(status, parsed)
        if head_only and status != 101:
            # llhttp cannot be told a response answers HEAD; start a fresh parser for the next
            # response. Until this read is parsed, events come from the old parser: body bytes
            # are a protocol error, its message-complete is ignored.
            self._new_parser()
            self._head_only_done = True
            self._in_message = False
            if self.owner is owner:
                owner.on_complete(None)

    def on_body(self, chunk: bytes) -> None:
        if self._head_only_done:
            self.abort()  # body bytes after a response to HEAD: the backend is broken
            return
        owner = self.owner
        if owner is not None:
            owner.on_body(chunk)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._informational:
            self._informational = False
            return
        if self._head_only_done:
            return  # the old parser finishing the HEAD response it was handed
        owner = self.owner
        if owner is not None and self._status != 101:
            trailers = self.trailers
            self.trailers = None
            self.close_delimited = False
            if self.chunked_response and not self.parser.should_keep_alive():
                self.reusable = False  # `Connection: close` among its trailers: llhttp is done
            owner.on_complete(trailers)


class Http1Connector(UpstreamConnector):
    """A backend's HTTP/1.1 connections: one request per connection at a time, idle
    keep-alive connections reused newest first."""

    def __init__(self, dial: Dial) -> None:
        super().__init__(dial)
        self.host = dial.host
        self.port = dial.port
        self.ssl_context = dial.ssl_context
        self.server_hostname = dial.server_hostname
        self.connect_timeout = dial.connect_timeout
        self.max_idle = dial.max_idle
        self.idle_timeout = dial.idle_timeout
        self.host_line = host_line(dial.authority)
        """The end of the request line and the Host line when the backend's name is sent."""
        self.idle: list[UpstreamConnection] = []

    def idle_stream(self, now: float) -> UpstreamStream | None:
        return self.take_idle(now)

    def active_streams(self) -> int:
        return max(0, self.open_connections - len(self.idle))

    async def open_stream(self) -> UpstreamStream:
        return await self.connect()

    def take_idle(self, now: float) -> UpstreamConnection | None:
        """The most recently used live connection, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since >= self.idle_timeout:
                conn.close()
                continue
            conn.bytes_received = 0
            return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises TimeoutError after connect_timeout, OSError when refused."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, protocol = await loop.create_connection(
                cast("Callable[[], asyncio.Protocol]", lambda: UpstreamConnection(self)),
                self.host,
                self.port,
                ssl=self.ssl_context,
                server_hostname=self.server_hostname,
            )
        return cast(UpstreamConnection, protocol)

    def release(self, conn: UpstreamConnection, now: float) -> None:
        """Keep a connection whose exchange ended cleanly, or close it when the pool is full."""
        conn.owner = None
        if conn.closed or self.closed or len(self.idle) >= self.max_idle:
            conn.close()
            return
        if conn.reading_paused:
            conn.pause_reading(False)  # an idle connection must see the backend's close
        if not conn.reading_taken_over:  # kept alive: read in batches from now on (readpath)
            conn.reading_taken_over = True
            conn.reading.take_over()
        conn.idle_since = now
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.open_connections -= 1
        if conn in self.idle:
            self.idle.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than idle_timeout (oldest are at the front)."""
        idle = self.idle
        while idle and now - idle[0].idle_since >= self.idle_timeout:
            idle.pop(0).close()

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().close()
