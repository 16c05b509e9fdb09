"""One request's journey: route, pick a backend, send, stream the answer back, or explain why not.

An `Attempt` is one try on one upstream connection. It owns that connection's events and writes
the response to the client as it arrives (no buffering), so the hot path is a handful of
callbacks. `forward` drives attempts: it retries once on a fresh connection when a reused
keep-alive connection turns out closed before any response byte (the keep-alive race), and
otherwise answers 502 / 503 / 504 with a short plain reason.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING

from .headers import Header, build_request_head, build_response_head, error_response, first_value
from .request import Request
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from ..topology import Backend, Upstream
    from .downstream import DownstreamProtocol

_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class Outcome(enum.Enum):
    OK = "ok"
    UPGRADED = "upgraded"
    STALE = "stale"  # a reused connection was closed before any response byte
    RESET = "reset"
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    BODY_LOST = "body_lost"  # the request body could not be sent again
    CLIENT_ERROR = "client_error"  # the client broke its own request body


class Attempt:
    """Sends one request on one connection and streams the response to the client."""

    __slots__ = (
        "_timer",
        "backend",
        "chunked_out",
        "conn",
        "detail",
        "done",
        "downstream",
        "head_only",
        "head_sent",
        "last_activity",
        "loop",
        "read_timeout",
        "request",
        "response_started",
        "reusable",
        "upstream_chunked",
    )

    def __init__(
        self,
        downstream: DownstreamProtocol,
        request: Request,
        backend: Backend,
        conn: UpstreamConnection,
        read_timeout: float,
    ) -> None:
        self.downstream = downstream
        self.request = request
        self.backend = backend
        self.conn = conn
        self.read_timeout = read_timeout
        self.loop = downstream.loop
        self.done: asyncio.Future[Outcome] = self.loop.create_future()
        self.head_only = request.method == b"HEAD"
        self.response_started = False
        self.head_sent = False
        self.chunked_out = False
        self.upstream_chunked = False
        self.reusable = False
        self.detail = ""
        self.last_activity = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, head: bytes) -> None:
        """Send the request head, hand the body over, and arm the read timeout."""
        conn = self.conn
        transport = conn.transport
        assert transport is not None
        conn.owner = self
        transport.write(head)
        request = self.request
        if request.expect_continue and request.body.received == 0 and not request.body.complete:
            self.downstream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.expect_continue = False
        if not request.body.attach(self):
            self._finish(Outcome.BODY_LOST, "request body already sent and too large to resend")
            return
        if self.downstream.write_paused:
            conn.pause_reading(True)
        self._timer = self.loop.call_at(self.last_activity + self.read_timeout, self._check_timeout)

    # -- the request body, as a BodySink -------------------------------------------------------

    def write_body(self, chunk: bytes) -> None:
        transport = self.conn.transport
        if transport is None or self.conn.closed:
            return
        self.last_activity = self.loop.time()
        if self.request.chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            transport.write(chunk)

    def end_body(self) -> None:
        transport = self.conn.transport
        if self.request.chunked and transport is not None and not self.conn.closed:
            transport.write(_LAST_CHUNK)

    def abort_body(self) -> None:
        self.conn.abort()
        self._finish(Outcome.CLIENT_ERROR, "the client's request body was malformed")

    # -- events from the upstream connection ---------------------------------------------------

    def on_head(self, status: int, reason: bytes, headers: list[Header], keep_alive: bool) -> None:
        self.response_started = True
        self.last_activity = self.loop.time()
        request = self.request
        downstream = self.downstream
        if status == 101:
            if request.upgrade is None:
                self.conn.abort()
                self._finish(Outcome.BAD_RESPONSE, "backend switched protocols unasked")
            return
        content_length = first_value(headers, b"content-length")
        self.upstream_chunked = first_value(headers, b"transfer-encoding") is not None
        no_body = self.head_only or status in (204, 304)
        close_delimited = not no_body and not self.upstream_chunked and content_length is None
        client_keeps = (
            request.keep_alive
            and request.upgrade is None
            and request.body.complete
            and not downstream.draining
            and not (request.http10 and (close_delimited or self.upstream_chunked))
        )
        if not client_keeps:
            request.close_connection = True
        self.chunked_out = (
            not no_body and (self.upstream_chunked or close_delimited) and not request.http10
        )
        self.reusable = keep_alive and not close_delimited
        downstream.write(
            build_response_head(
                status,
                reason,
                headers,
                content_length=content_length if not self.upstream_chunked else None,
                chunked=self.chunked_out,
                keep_alive=client_keeps,
                client_http10=request.http10,
                request_id=request.request_id,
            )
        )
        self.head_sent = True

    def on_body(self, chunk: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.chunked_out:
            self.downstream.writelines((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            self.downstream.write(chunk)

    def on_complete(self) -> None:
        if self.chunked_out:
            self.downstream.write(_LAST_CHUNK)
        if not self.request.body.complete:
            self.reusable = False  # the backend answered before reading the whole body
        self._finish(Outcome.OK)

    def on_upgrade(self, leftover: bytes) -> None:
        request = self.request
        if request.upgrade is None or not self.response_started:
            self.on_bad_response("backend switched protocols unasked")
            return
        self.downstream.write(
            build_response_head(
                101,
                b"Switching Protocols",
                self.conn._headers,
                content_length=None,
                chunked=False,
                keep_alive=True,
                client_http10=False,
                request_id=request.request_id,
                upgrade=first_value(self.conn._headers, b"upgrade") or request.upgrade,
            )
        )
        self.head_sent = True
        self.conn.owner = None
        self.downstream.start_tunnel(self.conn, leftover)
        self._finish(Outcome.UPGRADED)

    def on_lost(self, exc: Exception | None) -> None:
        if self.head_sent and not self.upstream_chunked and not self.reusable:
            # No Content-Length and no chunking: the backend's close ends the body.
            if self.chunked_out:
                self.downstream.write(_LAST_CHUNK)
            self._finish(Outcome.OK)
            return
        why = f"connection to backend lost ({exc})" if exc else "backend closed the connection"
        if not self.response_started:
            self._finish(Outcome.RESET, why + " before responding")
        else:
            self._finish(Outcome.RESET, why + " in the middle of the response")

    def on_bad_response(self, reason: str) -> None:
        self._finish(Outcome.BAD_RESPONSE, reason)

    def on_write_paused(self, paused: bool) -> None:
        """The backend reads the request body slowly: slow the client down with it."""
        self.downstream.set_paused_by_upstream(paused)

    # -- ending --------------------------------------------------------------------------------

    def _check_timeout(self) -> None:
        if self.done.done():
            return
        deadline = self.last_activity + self.read_timeout
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._check_timeout)
            return
        self.conn.abort()
        self._finish(Outcome.TIMEOUT, f"backend sent nothing for {self.read_timeout:g}s")

    def _finish(self, outcome: Outcome, detail: str = "") -> None:
        if self.done.done():
            return
        self.detail = detail
        if self._timer is not None:
            self._timer.cancel()
        self.request.body.detach()
        if self.conn.owner is self:
            self.conn.owner = None
        self.downstream.set_paused_by_upstream(False)
        self.done.set_result(outcome)

    def abandon(self) -> None:
        """The client went away or the task was cancelled: drop the backend connection."""
        if not self.done.done():
            self.conn.abort()
            self._finish(Outcome.RESET, "client gone")


def _error(downstream: DownstreamProtocol, request: Request, status: int, detail: str) -> None:
    reasons = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
    close = request.close_connection or not request.body.complete or not request.keep_alive
    if close:
        request.close_connection = True
    payload = error_response(status, reasons[status], detail, request.request_id, close=close)
    downstream.write(payload)


def request_target(backend: Backend, request: Request) -> bytes:
    if backend.base_path and request.target != b"*":
        return backend.base_path + request.target
    return request.target


async def forward(downstream: DownstreamProtocol, request: Request, upstream: Upstream) -> None:
    """Forward one request to a backend of `upstream` and stream the answer back."""
    backend = upstream.balancer.pick()
    pool = backend.pool
    config = upstream.config
    host = backend.host_header if config.host_header == "backend" else None
    head = build_request_head(
        request.method,
        request_target(backend, request),
        request.headers,
        host=host or request.raw_host or backend.host_header,
        client_ip=downstream.client_ip,
        scheme=downstream.scheme,
        request_id=request.request_id,
        content_length=request.content_length,
        chunked=request.chunked,
        upgrade=request.upgrade,
    )
    retried_stale = False
    backend.in_flight += 1
    try:
        while True:
            if request.body.failed:
                return  # the rejection queued behind this request answers the client
            conn = pool.take_idle(downstream.loop.time())
            reused = conn is not None
            if conn is None:
                try:
                    conn = await pool.connect()
                except TimeoutError:
                    _error(downstream, request, 504, f"connect to backend {backend.name} timed out")
                    return
                except OSError as exc:
                    why = exc.strerror or str(exc) or type(exc).__name__
                    detail = f"cannot connect to backend {backend.name}: {why}"
                    _error(downstream, request, 502, detail)
                    return
            attempt = Attempt(downstream, request, backend, conn, config.timeouts.read)
            downstream.attempt = attempt
            try:
                attempt.start(head)
                outcome = await attempt.done
            except BaseException:
                attempt.abandon()
                raise
            finally:
                downstream.attempt = None
            if outcome is Outcome.OK:
                if attempt.reusable:
                    pool.release(conn, downstream.loop.time())
                else:
                    conn.close()
                return
            if outcome is Outcome.UPGRADED:
                return
            conn.abort()
            if outcome is Outcome.CLIENT_ERROR and not attempt.head_sent:
                return  # the rejection queued behind this request answers the client
            if attempt.head_sent:
                request.close_connection = True  # the response is cut short: the client must see it
                downstream.abort()
                return
            if (
                outcome is Outcome.RESET
                and reused
                and conn.bytes_received == 0
                and not retried_stale
                and request.body.replayable
            ):
                retried_stale = True  # the keep-alive race: try once more on a new connection
                continue
            status = 504 if outcome is Outcome.TIMEOUT else 502
            _error(downstream, request, status, f"backend {backend.name}: {attempt.detail}")
            return
    finally:
        backend.in_flight -= 1
