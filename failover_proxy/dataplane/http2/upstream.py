"""HTTP/2 to backends (`upstreams.NAME.protocol: h2c | h2`): one multiplexed connection per
backend endpoint, another only when the backend's SETTINGS_MAX_CONCURRENT_STREAMS is reached.

Each request is a stream (`Http2UpstreamStream`, an `UpstreamStream` the exchange sends on
as it sends on an HTTP/1 connection). Its head is the one the HTTP/1 codec would write (the
same forwarding rules: X-Forwarded-*, Via, X-Request-Id), turned into HTTP/2 fields; the
backend's response head becomes the same `Http1Head` an HTTP/1 backend's would, so every
client codec forwards it unchanged.

What HTTP/2 adds to failover:
- a stream the backend refused (RST_STREAM REFUSED_STREAM), or one above the last stream a
  GOAWAY says it processed, never reached the application: the exchange may send it again
  whatever its method (`StreamOwner.on_unprocessed`);
- a lost connection fails every stream on it, each an attempt failure like an HTTP/1
  connection's (retried under the same rules); a failed connect fails every request that
  waited on it, but counts once against the backend (`UpstreamConnector.first_report`);
- a connection silent for `ping_interval` is sent a PING; one that does not answer within
  `ping_timeout` is taken for dead and dropped.

Flow control is honest both ways: a response's data is given back to the backend's window
only as the client takes it (pause_reading), and a request body is sent only as far as the
backend's windows allow (the client is paused meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final, cast

from ...model.connector import Dial
from ..http1.headers import build_request_head, forwarded_block
from ..http1.upstream import Http1Connector
from ..io.connio import ConnectionIO
from ..request import EMPTY_BODY, Request
from ..streams import DownstreamStream, StreamOwner, UpstreamConnector, UpstreamStream
from . import engine
from .engine import (
    CANCEL,
    CLOSED,
    DATA,
    END,
    GOAWAY,
    HEADERS,
    INVALID,
    REFUSED_STREAM,
    RESET,
    WINDOW,
    FrameSession,
    NotAgreed,
    new_session,
)
from .fields import Fields, fields_of_lines, response_head, trailer_fields, trailer_lines

_REQUEST_SKIPPED: Final = frozenset({b"host"})
"""Request fields an HTTP/2 request carries as a pseudo-header field instead (:authority)."""
MAX_RESPONSE_HEADER_LIST: Final = 256 * 1024
"""The largest response header block a backend may send (SETTINGS_MAX_HEADER_LIST_SIZE)."""
STREAM_ID_MARGIN: Final = 1 << 20
"""A connection takes no new stream this close to the end of the stream ids (2^31): the next
one opens on a new connection while this one finishes."""
_ERROR_NAMES: Final = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR",
                       3: "FLOW_CONTROL_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL",
                       11: "ENHANCE_YOUR_CALM"}


def error_name(code: int) -> str:
    return _ERROR_NAMES.get(code, f"error {code}")


class Http2UpstreamStream(UpstreamStream):
    """One request to a backend and its response, on a multiplexed connection."""

    def __init__(self, connection: Http2UpstreamConnection) -> None:
        self.connection = connection
        self.stream_id = 0
        self.head_received = False
        self.finished = False
        """The response ended, or the stream was reset or lost: no more events."""
        self.trailers: list[bytes] | None = None
        self.pending: list[bytes] = []
        """Request body the backend's windows have no room for yet."""
        self.pending_end = False
        """The request body is complete (its end may still wait behind `pending`)."""
        self.end_sent = False
        self.pending_trailers: Fields | None = None
        self.body_paused = False
        """The client was paused because the backend takes the body slowly."""
        self.reading_paused = False
        self.unconsumed = 0
        """Response bytes received while the client was paused: given back once it reads."""

    # -- the request ---------------------------------------------------------------------------

    def send_head(
        self, owner: StreamOwner, request: Request, backend_path: bytes,
        authority: bytes | None, client: DownstreamStream,
    ) -> None:
        self.owner = owner
        connection = self.connection
        host = connection.connector.dial.authority if authority is None else authority
        fields_block = request.fields_block
        if fields_block is None:
            fields_block = request.fields_block = forwarded_block(request.fields,
                                                                 request.connection)
        head = build_request_head(
            request.method, backend_path, fields_block,
            host=host,
            client_ip=client.client_ip,
            forwarded_for=request.forwarded_for,
            original_host=request.raw_host,
            via=request.via,
            scheme=client.scheme,
            request_id=request.request_id,
            has_request_id=request.has_request_id,
            content_length=request.content_length,
            chunked=False,
            upgrade=None,
            te_trailers=request.te_trailers,
        )
        fields: Fields = [
            (b":method", request.method),
            (b":scheme", connection.scheme),
            (b":authority", host),
            (b":path", backend_path),
        ]
        fields += fields_of_lines(head[head.find(b"\r\n") + 2 :], _REQUEST_SKIPPED)
        body = request.body
        end = body is EMPTY_BODY or (body.complete and body.received == 0)
        self.pending_end = self.end_sent = end
        self.stream_id = connection.open_stream(self, fields, end)

    def send_body(self, chunk: bytes) -> None:
        if self.finished or not self.stream_id:
            return
        if self.pending:
            self.pending.append(chunk)
            return
        left = self.connection.send_data(self.stream_id, chunk)
        if left:
            self.pending.append(left)
            self._pause_client(True)

    def end_body(self, trailers: list[bytes] | None) -> None:
        if self.finished or not self.stream_id or self.pending_end:
            return
        self.pending_end = True
        self.pending_trailers = trailer_fields(trailers) if trailers else None
        if not self.pending:
            self._send_end()

    def _send_end(self) -> None:
        self.end_sent = True
        self.connection.end_stream(self.stream_id, self.pending_trailers)

    def wants_window(self) -> bool:
        """Request body (or its end) waits for the backend's windows."""
        return bool(self.pending) or (self.pending_end and not self.end_sent)

    def flush(self) -> None:
        """The backend opened a window: send what waited for it."""
        connection = self.connection
        while self.pending and not self.finished:
            left = connection.send_data(self.stream_id, self.pending[0])
            if left:
                self.pending[0] = left
                return
            self.pending.pop(0)
        if self.body_paused:
            self._pause_client(False)
        if self.pending_end and not self.end_sent and not self.finished:
            self._send_end()

    def _pause_client(self, paused: bool) -> None:
        self.body_paused = paused
        owner = self.owner
        if owner is not None:
            owner.on_write_paused(paused)

    # -- the response --------------------------------------------------------------------------

    def pause_reading(self, paused: bool) -> None:
        self.reading_paused = paused
        if not paused and self.unconsumed and not self.finished:
            self.connection.consume(self.stream_id, self.unconsumed)
            self.unconsumed = 0

    def on_fields(self, fields: Fields, ended: bool) -> None:
        owner = self.owner
        if owner is None or self.finished:
            return
        if self.head_received:
            if any(name[:1] == b":" for name, _ in fields):
                self._bad("pseudo-header fields in the response's trailers")
                return
            self.trailers = trailer_lines(fields)
            return
        try:
            head = response_head(fields)
        except ValueError as exc:
            self._bad(str(exc))
            return
        status = head.status
        if 100 <= status < 200:
            return  # interim: the final head follows (101 has no place in HTTP/2)
        self.head_received = True
        self.bytes_received += 1
        if owner.head_only or status == 204 or status == 304:
            head.length = 0
        owner.on_head(status, head)

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        owner = self.owner
        if self.finished or owner is None:
            self.connection.consume(self.stream_id, flow_controlled)
            return
        if not self.head_received:
            self._bad("DATA before the response head")
            return
        self.bytes_received += len(data)
        if self.reading_paused:
            self.unconsumed += flow_controlled
        else:
            self.connection.consume(self.stream_id, flow_controlled)
        if data:
            owner.on_body(data)

    def on_end(self) -> None:
        owner = self.owner
        if self.finished or owner is None:
            return
        if not self.head_received:
            self._bad("the stream ended without a response head")
            return
        self.finished = True
        self.connection.forget_stream(self)
        owner.on_complete(self.trailers)

    def on_reset(self, code: int) -> None:
        owner = self.owner
        if self.finished:
            return
        self.finished = True
        self.connection.forget_stream(self)
        if owner is None:
            return
        if code == REFUSED_STREAM and not self.head_received:
            owner.on_unprocessed("the backend refused the stream (REFUSED_STREAM)")
        else:
            owner.on_lost(ConnectionResetError(f"stream reset by the backend ({error_name(code)})"))

    def on_unprocessed(self, why: str) -> None:
        """The backend will not process this stream (a GOAWAY below it)."""
        if self.finished:
            return
        self.finished = True
        self.connection.forget_stream(self)
        owner = self.owner
        if owner is not None:
            owner.on_unprocessed(why)

    def on_lost(self, exc: Exception | None) -> None:
        if self.finished:
            return
        self.finished = True
        owner = self.owner
        if owner is not None:
            owner.on_lost(exc)

    def _bad(self, why: str) -> None:
        """A malformed response: the stream is reset and the attempt failed."""
        owner = self.owner
        self.abort()
        if owner is not None:
            owner.on_bad_response(f"{why} (HTTP/2)")

    # -- the exchange is done with it ----------------------------------------------------------

    def release(self, now: float) -> None:
        self.owner = None
        self.closed = True
        if not self.finished:
            self.abort()

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        """Cancel the stream (RST_STREAM CANCEL); the connection serves its other streams."""
        self.owner = None
        self.closed = True
        if not self.finished:
            self.finished = True
            self.pending.clear()
            self.connection.cancel(self)


class Http2UpstreamConnection:
    """One HTTP/2 connection to a backend and its streams (an asyncio protocol by duck
    typing, like the HTTP/1 upstream connection)."""

    def __init__(self, connector: Http2Connector) -> None:
        self.connector = connector
        dial = connector.dial
        self.scheme = b"https" if dial.ssl_context is not None else b"http"
        self.session: FrameSession = new_session(False, [
            (engine.ENABLE_PUSH, 0),
            (engine.INITIAL_WINDOW_SIZE, dial.stream_window),
            (engine.MAX_HEADER_LIST_SIZE, MAX_RESPONSE_HEADER_LIST),
        ], dial.connection_window, MAX_RESPONSE_HEADER_LIST)
        self.streams: dict[int, Http2UpstreamStream] = {}
        self.io: ConnectionIO | None = None
        self.closed = False
        self.draining = False
        """No new streams: a GOAWAY came or went, or the stream ids are nearly used up."""
        self.idle_since = 0.0
        self.heard_at = 0.0
        self.ping_sent_at = 0.0
        self.lost_to: Exception | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.connector.open_connections += 1
        self.connector.live.add(self)
        self.io = io = ConnectionIO(transport, self.data_received, self.eof_received,
                                    self.read_failed)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            # (h2 over TLS needs the backend to agree to it, RFC 9113 §3.2)
            self.lost_to = NotAgreed("the backend did not agree to HTTP/2 (ALPN)")
            self.closed = True
            io.abort()
            return
        self._write()  # the preface and our SETTINGS

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.io is not None:
            self.io.detach()
        self.connector.forget(self)
        lost = self.lost_to or exc or ConnectionResetError("the backend closed the connection")
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.on_lost(lost)

    def eof_received(self) -> bool | None:
        return None

    def read_failed(self, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            self.lost_to = exc
        if self.io is not None:
            self.io.fail(self, exc)

    def pause_writing(self) -> None:
        """(Nothing to hold back: what is written is bounded by the backend's windows.)"""

    def resume_writing(self) -> None:
        pass

    # -- frames in -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.heard_at = self.connector.now
        self.ping_sent_at = 0.0  # anything read answers a PING (its PONG among it)
        try:
            events = self.session.receive(data)
        except engine.ProtocolError as exc:
            self.lost_to = ConnectionAbortedError(f"the backend broke HTTP/2: {exc.args[0]}")
            self._write()
            self.abort()
            return
        streams = self.streams
        for kind, stream_id, payload, number in events:
            if kind == DATA:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.on_data(cast(bytes, payload), number)
                elif number:
                    self.session.consume(stream_id, number)
            elif kind == HEADERS:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.on_fields(cast(Fields, payload), number != 0)
            elif kind == END:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.on_end()
            elif kind == WINDOW:
                if stream_id == 0:
                    for stream in list(streams.values()):
                        if stream.wants_window():
                            stream.flush()
                else:
                    stream = streams.get(stream_id)
                    if stream is not None and stream.wants_window():
                        stream.flush()
            elif kind in (RESET, CLOSED):
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.on_reset(number)
            elif kind == INVALID:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream._bad("a malformed response")
            elif kind == GOAWAY:
                self._goaway(stream_id, number)
        if not self.session.want_read and not self.closed:
            self.close()
        self._write()

    def _goaway(self, last_stream_id: int, code: int) -> None:
        """The backend takes no new stream; those above `last_stream_id` it never processed."""
        self.draining = True
        self.connector.retire(self)
        for stream in [s for sid, s in self.streams.items() if sid > last_stream_id]:
            stream.on_unprocessed(f"the backend is going away ({error_name(code)})")
        if not self.streams:
            self.close()

    # -- frames out ----------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether a new stream may open on this connection now (before the backend's SETTINGS
        arrive, the engine holds it to 100 streams, RFC 9113 §6.5.2's recommended least)."""
        if self.closed or self.draining:
            return False
        session = self.session
        if session.next_stream_id >= (1 << 31) - STREAM_ID_MARGIN:
            self.draining = True
            self.connector.retire(self)
            return False
        return len(self.streams) < session.remote_max_streams

    def open_stream(self, stream: Http2UpstreamStream, fields: Fields, end: bool) -> int:
        stream_id = self.session.submit_request(fields, end)
        self.streams[stream_id] = stream
        self._write()
        return stream_id

    def send_data(self, stream_id: int, data: bytes) -> bytes:
        taken = self.session.send_data(stream_id, data)
        self._write()
        return data[taken:] if taken < len(data) else b""

    def end_stream(self, stream_id: int, trailers: Fields | None) -> None:
        self.session.end_stream(stream_id, trailers)
        self._write()

    def consume(self, stream_id: int, size: int) -> None:
        if size and not self.closed:
            self.session.consume(stream_id, size)
            self._write()

    def cancel(self, stream: Http2UpstreamStream) -> None:
        self.forget_stream(stream)
        if not self.closed and stream.stream_id:
            self.session.reset(stream.stream_id, CANCEL)
            self._write()

    def forget_stream(self, stream: Http2UpstreamStream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            if not self.streams:
                self.idle_since = self.connector.now
                if self.draining:
                    self.close()

    def _write(self) -> None:
        if self.closed or self.io is None:
            return
        data = self.session.data_to_send()
        if data:
            self.io.send(data)

    # -- upkeep --------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        dial = self.connector.dial
        if self.ping_sent_at:
            if now - self.ping_sent_at >= dial.ping_timeout:
                self.lost_to = TimeoutError(f"no answer to a PING in {dial.ping_timeout:g}s")
                self.abort()
            return
        if not self.streams and now - self.idle_since >= dial.idle_timeout:
            self.close()
        elif dial.ping_interval and now - self.heard_at >= dial.ping_interval:
            self.ping_sent_at = now
            self.session.ping()
            self._write()

    def close(self) -> None:
        """End the connection (GOAWAY first, when it is still ours to say)."""
        if self.closed:
            return
        self.draining = True
        if self.io is not None:
            with contextlib.suppress(Exception):
                self.session.goaway(engine.NO_ERROR)
                self._write()
            self.closed = True
            self.io.close()
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        if self.io is not None:
            self.io.abort()


class Http2Connector(UpstreamConnector):
    """A backend's HTTP/2 connections: streams on the newest one with room, a new connection
    only when none has (one connect at a time, shared by the requests that wait for it)."""

    def __init__(self, dial: Dial) -> None:
        super().__init__(dial)
        self.connections: list[Http2UpstreamConnection] = []
        """The connections new streams may open on (newest last)."""
        self.live: set[Http2UpstreamConnection] = set()
        """Every open connection, those retired (GOAWAY, draining) included."""
        self.connecting: asyncio.Task[Http2UpstreamConnection] | None = None
        self.now = 0.0
        """The data plane's clock as of its last sweep (or the last connect)."""

    def active_streams(self) -> int:
        return sum(len(connection.streams) for connection in self.live)

    def idle_stream(self, now: float) -> UpstreamStream | None:
        for connection in reversed(self.connections):
            if connection.has_room():
                return Http2UpstreamStream(connection)
        return None

    async def open_stream(self) -> UpstreamStream:
        while True:
            if self.closed:
                raise ConnectionRefusedError("the backend's connections are closed")
            stream = self.idle_stream(0.0)
            if stream is not None:
                return stream
            task = self.connecting
            if task is None:
                task = self.connecting = asyncio.get_running_loop().create_task(self._connect())
                task.add_done_callback(self._connect_done)
            await asyncio.shield(task)

    def _connect_done(self, task: asyncio.Task[Http2UpstreamConnection]) -> None:
        if self.connecting is task:
            self.connecting = None
        if not task.cancelled():
            task.exception()  # (retrieved here: every waiter sees it through its shield)

    async def _connect(self) -> Http2UpstreamConnection:
        """A new connection, open for streams at once. The backend's SETTINGS are not waited
        for (RFC 9113 §3.4: a client may send right after its preface), so the connect timeout
        bounds what it bounds for HTTP/1, TCP and TLS, and a backend slow to send its SETTINGS
        is judged by its streams' timeouts, as a backend slow to answer HTTP/1 is."""
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        dial = self.dial
        async with asyncio.timeout(dial.connect_timeout):
            _, protocol = await loop.create_connection(
                cast("Callable[[], asyncio.Protocol]", lambda: Http2UpstreamConnection(self)),
                dial.host, dial.port, ssl=dial.ssl_context, server_hostname=dial.server_hostname,
            )
        connection = cast(Http2UpstreamConnection, protocol)
        if connection.closed:  # (it refused the backend's ALPN choice as it was made)
            raise connection.lost_to or ConnectionResetError("the backend closed the connection")
        connection.idle_since = connection.heard_at = self.now = loop.time()
        if self.closed:
            connection.close()
            raise ConnectionRefusedError("the backend's connections are closed")
        self.connections.append(connection)
        return connection

    def retire(self, connection: Http2UpstreamConnection) -> None:
        """No new streams on it (it closes once its streams are done)."""
        if connection in self.connections:
            self.connections.remove(connection)

    def forget(self, connection: Http2UpstreamConnection) -> None:
        self.open_connections -= 1
        self.live.discard(connection)
        self.retire(connection)

    def sweep(self, now: float) -> None:
        self.now = now
        for connection in list(self.live):  # retired ones too: their streams may still hang
            connection.sweep(now)

    def close(self) -> None:
        self.closed = True
        for connection in list(self.connections):
            if not connection.streams:
                connection.close()
            else:
                connection.draining = True
        self.connections.clear()


class AutoConnector(UpstreamConnector):
    """`protocol: auto`: HTTP/2 where the backend agrees to it by ALPN, HTTP/1.1 where it
    does not (or without TLS, where there is no ALPN to ask). Learned from the first
    connection and kept for the connector's life (a reload that changes the backend makes a
    new one)."""

    def __init__(self, dial: Dial) -> None:
        super().__init__(dial)
        self.http1 = Http1Connector(dial)
        self.http2 = Http2Connector(dial)
        self.chosen: UpstreamConnector | None = self.http1 if dial.ssl_context is None else None

    def idle_stream(self, now: float) -> UpstreamStream | None:
        chosen = self.chosen
        return chosen.idle_stream(now) if chosen is not None else None

    async def open_stream(self) -> UpstreamStream:
        chosen = self.chosen
        if chosen is not None:
            return await chosen.open_stream()
        # (nothing is awaited in the `except`: compiled, a coroutine suspended there would
        # leave its exception as the context of every exception raised meanwhile)
        try:
            stream: UpstreamStream | None = await self.http2.open_stream()
        except NotAgreed:
            stream = None
        if stream is None:
            self.chosen = self.http1
            return await self.http1.open_stream()
        self.chosen = self.http2
        return stream

    def active_streams(self) -> int:
        return self.http1.active_streams() + self.http2.active_streams()

    def sweep(self, now: float) -> None:
        self.http1.sweep(now)
        self.http2.sweep(now)
        self.open_connections = self.http1.open_connections + self.http2.open_connections

    def close(self) -> None:
        self.closed = True
        self.http1.close()
        self.http2.close()
