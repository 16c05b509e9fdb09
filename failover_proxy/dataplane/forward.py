"""One request's journey: route, pick a backend, send, stream the answer back, or explain why not.

An `Attempt` is one try on one upstream connection. It owns that connection's events and writes
the response to the client as it arrives (no buffering), so the hot path is a handful of
callbacks. An `Exchange` drives the attempts of one request: it retries once on a fresh
connection when a reused keep-alive connection turns out closed before any response byte (the
keep-alive race), and otherwise answers 502 / 503 / 504 with a short plain reason.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import TYPE_CHECKING, Final

from ..balance import hash_key
from ..metrics import (
    ATTEMPT_BAD_RESPONSE,
    ATTEMPT_CANCELLED,
    ATTEMPT_CLIENT_ERROR,
    ATTEMPT_CONNECT_FAILURE,
    ATTEMPT_HTTP_5XX,
    ATTEMPT_OK,
    ATTEMPT_RESET,
    ATTEMPT_TIMEOUT,
    DURATION_BUCKETS,
)
from ..schema import HashOnConfig
from .headers import (
    ResponseHead,
    build_request_head,
    build_response_head,
    decimal_value,
    error_response,
    field_values,
    forwarded_block,
    forwarded_prefix,
    host_line,
    usual_request_head,
)
from .request import EMPTY_BODY, Request
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from ..topology import Backend, RouteTarget
    from .downstream import DownstreamProtocol

_CRLF: Final = b"\r\n"
perf_counter: Final = time.perf_counter
"""Bound once: mypyc keeps a Final in a C static, where an imported name is looked up in the
module's dict on every call."""
HELD_BODY_BYTES: Final = 64 * 1024
_LAST_CHUNK: Final = b"0\r\n\r\n"
JOINED_BODY_BYTES: Final = 4096
"""A whole held body up to this size is joined to its head and written as one buffer; a larger
one is written beside it (writelines), which spares copying it: a 64 KiB response is copied
from uvloop's read buffer and out of the read's bytes already."""


_DURATION_BOUNDS: Final[list[float]] = list(DURATION_BUCKETS)


def duration_slot(seconds: float) -> int:
    """The histogram slot a request duration is counted in: the first bucket whose bound it does
    not exceed (a compiled loop: `bisect` would box the float and compare objects)."""
    slot = 0
    for bound in _DURATION_BOUNDS:
        if seconds <= bound:
            return slot
        slot += 1
    return slot


class Outcome(enum.Enum):
    OK = "ok"
    UPGRADED = "upgraded"
    STALE = "stale"  # a reused connection was closed before any response byte
    RESET = "reset"
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    BODY_LOST = "body_lost"  # the request body could not be sent again
    CLIENT_ERROR = "client_error"  # the client broke its own request body
    FAILURE_STATUS = "failure_status"  # a 5xx that will be retried elsewhere, not forwarded


_OUTCOME_COUNTER: Final = {
    Outcome.OK: ATTEMPT_OK,
    Outcome.UPGRADED: ATTEMPT_OK,
    Outcome.STALE: ATTEMPT_RESET,
    Outcome.RESET: ATTEMPT_RESET,
    Outcome.TIMEOUT: ATTEMPT_TIMEOUT,
    Outcome.BAD_RESPONSE: ATTEMPT_BAD_RESPONSE,
    Outcome.BODY_LOST: ATTEMPT_CLIENT_ERROR,
    Outcome.CLIENT_ERROR: ATTEMPT_CLIENT_ERROR,
    Outcome.FAILURE_STATUS: ATTEMPT_HTTP_5XX,
}
"""Which attempt counter (metrics.ATTEMPT_OUTCOMES) an outcome bumps."""


class Attempt:
    """Sends one request on one connection and streams the response to the client."""

    # Defaults live on the class: a new attempt sets only what differs (cheaper per request).
    done = False
    response_started = False
    head_sent = False
    held_head: bytes | None = None
    """A response head not written yet, so it can leave in one write with the first body."""
    chunked_out = False
    close_delimited = False
    upstream_chunked = False
    reusable = False
    paused_client = False
    failure_status = False
    """The response carried a failure status (already counted against the backend)."""
    head_swept = False
    holding_body = False
    """The body of a small response (Content-Length up to HELD_BODY_BYTES) is held with its head
    until complete, so that a backend dying mid-body can still be retried unseen."""
    held_chunk: bytes | None = None
    """The first chunk of a held body: a small response's body usually comes in one, and
    holding it needs no list."""
    held_more: list[bytes] | None = None
    """The chunks of a held body after the first."""
    per_try_timer: asyncio.TimerHandle | None = None
    activity = 0
    """Counts events from and to the backend; the sweep turns changes into `last_activity`."""
    seen_activity = -1  # the first sweep after the start stamps the time
    detail = ""
    status = 0
    upgrade_head: ResponseHead | None = None

    def __init__(
        self, exchange: Exchange, conn: UpstreamConnection, reused: bool, backend: Backend
    ) -> None:
        self.exchange = exchange
        self.backend = backend
        self.downstream = downstream = exchange.downstream
        self.send_client = downstream.send
        self.send_client_parts = downstream.send_parts
        self.request = request = exchange.request
        self.conn = conn
        self.reused = reused
        self.read_timeout = exchange.first_byte_timeout
        self.head_only = request.method == b"HEAD"
        self.last_activity = downstream.plane.clock

    def start(self, head: bytes) -> None:
        """Send the request head and hand the body over; an explicit per-try timeout starts
        once the whole request is sent (_arm_per_try)."""
        conn = self.conn
        conn.owner = self
        conn.send(head)
        request = self.request
        if request.expect_continue and request.body.received == 0 and not request.body.complete:
            self.downstream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.expect_continue = False
        if not request.body.attach(self):
            self._finish(Outcome.BODY_LOST, "request body already sent and too large to resend")
            return
        if self.downstream.write_paused:
            conn.pause_reading(True)
        if request.body.complete:
            self._arm_per_try()  # else once the body is sent (end_body)

    def _arm_per_try(self) -> None:
        """Start an explicit per-try timeout, kept exactly with a timer (the sweep is coarse).
        It starts once the whole request is sent: a client slow to send its body is not the
        backend's delay (Envoy starts its timeouts at the end of the request too)."""
        per_try = self.exchange.per_try_timeout
        if (
            per_try is not None
            and self.per_try_timer is None
            and not self.done
            and not self.response_started
        ):
            self.per_try_timer = self.downstream.loop.call_later(per_try, self._per_try_expired)

    def _per_try_expired(self) -> None:
        self.per_try_timer = None
        if not self.done and not self.response_started:
            self.conn.abort()
            self._finish(
                Outcome.TIMEOUT, f"no response within {self.exchange.per_try_timeout:g}s"
            )

    # -- the request body, as its sink ---------------------------------------------------------

    def write_body(self, chunk: bytes) -> None:
        conn = self.conn
        if conn.closed:
            return
        self.activity += 1
        if self.request.chunked:
            conn.send_parts((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            conn.send(chunk)

    def end_body(self) -> None:
        conn = self.conn
        if self.request.chunked and conn.transport is not None and not conn.closed:
            conn.send(_LAST_CHUNK)
        self._arm_per_try()

    def abort_body(self) -> None:
        self.conn.abort()
        self._finish(Outcome.CLIENT_ERROR, "the client's request body was malformed")

    # -- events from the upstream connection ---------------------------------------------------

    def on_head(self, status: int, head: ResponseHead, keep_alive: bool) -> None:
        if self.exchange.hedge is not None:
            self.exchange.claim(self)  # two attempts race: the first head wins
        self.response_started = True
        self.status = status
        self.activity += 1
        self.read_timeout = self.exchange.read_timeout
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        request = self.request
        if status >= 500 and status in self.exchange.upstream.failure_statuses:
            self.failure_status = True
            if self.exchange.on_failure_status(status):
                self.conn.abort()
                self._finish(Outcome.FAILURE_STATUS, f"status {status}")
                return
        downstream = self.downstream
        if status == 101:
            self.upgrade_head = head
            if request.upgrade is None:
                self.conn.abort()
                self._finish(Outcome.BAD_RESPONSE, "backend switched protocols unasked")
            return
        content_length = head.content_length
        self.upstream_chunked = head.chunked
        no_body = self.head_only or status in (204, 304)
        close_delimited = not no_body and not self.upstream_chunked and content_length is None
        self.close_delimited = close_delimited
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
        if (
            content_length is not None
            and not no_body
            # under five digits is always small enough: no conversion for the usual response
            and (len(content_length) < 5 or decimal_value(content_length) <= HELD_BODY_BYTES)
        ):
            self.holding_body = True
        self.head_sent = True  # held until the first body byte, completion or the next sweep
        exchange = self.exchange
        exchange.status = status
        self.held_head = (
            build_response_head(
                status,
                head,
                chunked=self.chunked_out,
                keep_alive=client_keeps,
                client_http10=request.http10,
                request_id=request.request_id,
                proxy_headers=(
                    exchange.decision_header() if downstream.plane.debug_headers else None
                ),
            )
        )

    # The client transport is written directly: while an attempt receives events the client is
    # connected (a client that goes away abandons the attempt first).

    def flush_head(self) -> None:
        """Write a held response head (and any held body): from here on the response streams."""
        head = self.held_head
        if head is not None:
            self.held_head = None
            self.holding_body = False
            self.exchange.bytes_out += len(head)
            if not self._write_held_body(head):
                self.send_client(head)

    def _write_held_body(self, head: bytes) -> bool:
        """Write `head` with the body held after it, if any was held (False when none was):
        a small body joined to it as one buffer, a larger one or several chunks beside it."""
        chunk = self.held_chunk
        if chunk is None:
            return False
        self.held_chunk = None
        self.holding_body = False
        more = self.held_more
        exchange = self.exchange
        exchange.bytes_out += len(chunk)
        if more is None and len(chunk) <= JOINED_BODY_BYTES:
            self.send_client(head + chunk)  # the usual small response: one buffer
        elif more is None:
            self.send_client_parts((head, chunk))  # one sendmsg, the body not copied
        else:
            self.held_more = None
            for piece in more:
                exchange.bytes_out += len(piece)
            self.send_client_parts((head, chunk, *more))
        return True

    def on_body(self, chunk: bytes) -> None:
        self.activity += 1
        if self.holding_body:  # a small response is written whole, so a reset can be retried
            if self.held_chunk is None:
                self.held_chunk = chunk
            elif self.held_more is None:
                self.held_more = [chunk]
            else:
                self.held_more.append(chunk)
            return
        self.exchange.bytes_out += len(chunk)
        head = self.held_head
        if head is not None:
            self.held_head = None
            self.exchange.bytes_out += len(head)
            if self.chunked_out:
                self.send_client_parts((head, b"%x\r\n" % len(chunk), chunk, _CRLF))
            else:
                self.send_client_parts((head, chunk))
        elif self.chunked_out:
            self.send_client_parts((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            self.send_client(chunk)

    def on_complete(self) -> None:
        head = self.held_head
        if head is not None:
            self.held_head = None
            self.exchange.bytes_out += len(head)
            if not self._write_held_body(head):
                self.send_client(head + _LAST_CHUNK if self.chunked_out else head)
        elif self.chunked_out:
            self.send_client(_LAST_CHUNK)
        if not self.request.body.complete:
            self.reusable = False  # the backend answered before reading the whole body
        self._finish(Outcome.OK)

    def on_upgrade(self, leftover: bytes) -> None:
        request = self.request
        upgrade_head = self.upgrade_head
        if request.upgrade is None or upgrade_head is None:
            self.on_bad_response("backend switched protocols unasked")
            return
        self.downstream.write(
            build_response_head(
                101,
                upgrade_head,
                chunked=False,
                keep_alive=True,
                client_http10=False,
                request_id=request.request_id,
                upgrade=upgrade_head.upgrade or request.upgrade,
            )
        )
        self.head_sent = True
        self.conn.owner = None
        self.downstream.start_tunnel(self.conn, leftover)
        self._finish(Outcome.UPGRADED)

    def on_lost(self, exc: Exception | None) -> None:
        if self.close_delimited:
            # No Content-Length and no chunking: the backend's close ends the body.
            self.on_complete()
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
        self.paused_client = paused
        self.downstream.set_paused_by_upstream(paused)

    # -- ending --------------------------------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """Called by the data plane's sweep: end an attempt whose backend has gone silent."""
        if self.done:
            return
        if self.held_head is not None:
            # A head whose body has not started by the second sweep goes out alone (long
            # polls, event streams): 0.2-0.4 s. Until then a backend that fails right after its
            # head can still be retried elsewhere, unseen by the client.
            if self.head_swept:
                self.flush_head()
            else:
                self.head_swept = True
        if self.activity != self.seen_activity or self.downstream.write_paused:
            # (write_paused: the client has not taken what the backend sent, and the backend
            # waits on it; the client's own limit is send_timeout, DataPlane.sweep)
            self.seen_activity = self.activity
            self.last_activity = now
        elif (
            not self.response_started
            and not self.request.body.complete
            and not self.paused_client
        ):
            # The backend is owed the rest of the body and is not the one holding it up
            # (paused_client: it stopped reading): the client's own limit applies. Its refusal
            # fails the body, which ends this attempt (abort_body) with no failure counted.
            if now - self.last_activity >= self.downstream.limits.body_timeout:
                self.downstream.body_stalled()
        elif now - self.last_activity >= self.read_timeout:
            self.conn.abort()
            self._finish(Outcome.TIMEOUT, f"backend sent nothing for {self.read_timeout:g}s")

    def _finish(self, outcome: Outcome, detail: str = "") -> None:
        if self.done:
            return
        self.done = True
        self.detail = detail
        if outcome is Outcome.OK:
            counter = ATTEMPT_HTTP_5XX if self.status >= 500 else ATTEMPT_OK
        else:
            counter = _OUTCOME_COUNTER[outcome]
        counts = self.backend.attempt_counts
        counts[counter] = counts[counter] + 1  # `+=` on an item is a generic call in mypyc
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        body = self.request.body
        if body.sink is not None:
            body.detach()
        conn = self.conn
        if conn.owner is self:
            conn.owner = None
        if self.paused_client:
            self.downstream.set_paused_by_upstream(False)
        self.exchange.attempt_done(self, outcome)

    def abandon(self) -> None:
        """The client went away: drop the backend connection, report nothing."""
        if not self.done:
            self.done = True
            self.backend.attempt_counts[ATTEMPT_CANCELLED] += 1
            if self.per_try_timer is not None:
                self.per_try_timer.cancel()
            self.request.body.detach()
            self.conn.abort()


def request_target(backend: Backend, request: Request) -> bytes:
    if backend.base_path and request.target != b"*":
        return backend.base_path + request.target
    return request.target


_REASONS: Final = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
CLIENT_CLOSED_REQUEST: Final = 499
"""What the metrics and the access log say of a request whose client left before its answer
(nginx's convention)."""


def hash_request(request: Request, client_ip: bytes, hash_on: HashOnConfig) -> int:
    """The key that keeps a client on one backend (the client's IP when the header or cookie
    is missing, so that such clients still spread over the ring)."""
    material: bytes | None = None
    if hash_on.header is not None:
        material = request.header(hash_on.header.lower().encode())
    elif hash_on.cookie is not None:
        prefix = hash_on.cookie.encode() + b"="
        for cookies in field_values(request.fields, b"cookie"):
            for part in cookies.split(b";"):
                part = part.strip()
                if part.startswith(prefix):
                    material = part[len(prefix) :]
                    break
    return hash_key(material if material is not None else client_ip)


IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Exchange:
    """One request's journey through its attempts, driven by callbacks.

    On the common path (an idle pooled connection) no task or future is created: the request is
    written from the client's parser callback and the response from the backend's. Only opening a
    new connection runs as a task. A failed attempt is retried on another backend (another
    provider first) when that is safe, allowed and within the retry budget.
    """

    __slots__ = (
        "attempt",
        "attempts",
        "backend",
        "began",
        "body_progress",
        "body_progress_at",
        "bytes_out",
        "connecting",
        "downstream",
        "ended",
        "finished",
        "first_byte_timeout",
        "head",
        "hedge",
        "hedge_connecting",
        "hedge_timer",
        "per_try_timeout",
        "read_timeout",
        "reason",
        "refusal",
        "request",
        "retried_stale",
        "retrying",
        "route",
        "started",
        "status",
        "tried",
        "upstream",
        "view",
        "waiting_body",
    )

    def __init__(
        self, downstream: DownstreamProtocol, request: Request, route: RouteTarget
    ) -> None:
        self.began = perf_counter()
        self.downstream = downstream
        self.request = request
        self.route = route
        self.upstream = upstream = route.upstream
        self.view = downstream.plane.health_view
        """The health picture the request was routed by (the supervisor's version; 0 in one
        process): set against when a worker adopted a failover, it shows what the request
        could have known."""
        self.status = 0
        self.refusal = 0
        """The status of the proxy's refusal of this request's body (400, 408, 413): when no
        response went out yet, that refusal is the client's answer, and the status recorded."""
        self.bytes_out = 0
        self.ended = 0.0
        self.attempt: Attempt | None = None
        self.hedge: Attempt | None = None
        self.hedge_timer: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.hedge_connecting: asyncio.Task[None] | None = None
        self.retried_stale = False
        self.retrying = False
        self.finished = False
        self.waiting_body = False
        self.attempts = 0
        self.tried: list[Backend] | None = None
        self.read_timeout = upstream.read_timeout
        self.per_try_timeout = upstream.per_try_timeout
        self.first_byte_timeout = upstream.per_try_timeout or upstream.read_timeout
        self.head = b""
        self.reason = ""
        self.started = 0.0
        hash_on = upstream.hash_on
        backend = upstream.pick(
            0 if hash_on is None else hash_request(request, downstream.client_ip, hash_on)
        )
        if backend is None:  # nothing in rotation: a last resort, or why there is none
            backend, self.reason = upstream.choose([], [])
        self.backend = backend
        if backend is not None:
            self._prepare(backend)

    def _prepare(self, backend: Backend) -> None:
        self.backend = backend
        self.head = self._head_for(backend)

    def _head_for(self, backend: Backend) -> bytes:
        request = self.request
        downstream = self.downstream
        fields = request.fields_block
        if fields is None:
            fields = request.fields_block = forwarded_block(request.fields, request.connection)
        original_host = request.raw_host
        if (
            original_host is not None
            and not request.has_request_id
            and request.via is None
            and request.upgrade is None
        ):
            forwarded_for = request.forwarded_for
            return usual_request_head(
                request.method,
                request_target(backend, request),
                host_line(original_host)
                if self.upstream.preserve_host
                else backend.host_line,
                fields,
                downstream.forwarded_prefix
                if forwarded_for is None
                else forwarded_prefix(forwarded_for, downstream.client_ip, downstream.scheme),
                original_host,
                request.request_id,
                request.content_length,
                request.chunked,
            )
        return build_request_head(
            request.method,
            request_target(backend, request),
            fields,
            host=(request.raw_host or backend.host_header)
            if self.upstream.preserve_host
            else backend.host_header,
            client_ip=downstream.client_ip,
            forwarded_for=request.forwarded_for,
            original_host=request.raw_host,
            via=request.via,
            scheme=downstream.scheme,
            request_id=request.request_id,
            has_request_id=request.has_request_id,
            content_length=request.content_length,
            chunked=request.chunked,
            upgrade=request.upgrade,
        )

    def wait_for_body(self, limit: int) -> None:
        """Read the body (up to `limit` bytes) before dialling a backend: a slow client then
        holds no backend connection, and a body read whole can be sent again elsewhere. The
        client's body_timeout is enforced here meanwhile (check_timeout)."""
        self.waiting_body = True
        request = self.request
        body = request.body
        self.body_progress = body.received
        self.body_progress_at = self.downstream.plane.clock
        if request.expect_continue and body.received == 0:
            self.downstream.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # we want the body now
            request.expect_continue = False
        body.buffer_until(limit, self.body_ready)

    def body_ready(self) -> None:
        """The body is read (whole, or past the buffering limit), or the client broke it."""
        self.waiting_body = False
        if self.request.body.failed:
            # Never began: take the places _end gives back, then end with the refusal.
            self.upstream.active_requests += 1
            if self.backend is not None:
                self.backend.in_flight += 1
            self._end_refused()
            return
        self.begin()

    def begin(self) -> None:
        upstream = self.upstream
        upstream.active_requests += 1
        backend = self.backend
        if backend is None:
            self._error(503, self.reason, retry_after=True)
            return
        if backend.in_flight >= upstream.max_requests_per_backend:
            backend, _ = upstream.choose([backend], [])
            if backend is not None and backend.in_flight < upstream.max_requests_per_backend:
                self._prepare(backend)
            else:
                limit = upstream.max_requests_per_backend
                self._overflow(f"{limit} requests in flight per backend")
                return
        if upstream.active_requests > upstream.max_requests:
            self._overflow(f"{upstream.max_requests} requests in flight")
            return
        backend.in_flight += 1
        self._next_connection()

    def _overflow(self, limit: str) -> None:
        """A circuit breaker is open: refuse at once rather than pile up work."""
        self.upstream.store.inc("circuit_breaker_overflows", (self.upstream.name,))
        self.backend = None  # holds no in-flight slot
        self._error(503, f"circuit breaker open: {limit}", retry_after=True)

    def _next_connection(self) -> None:
        if self.request.body.failed:
            self._end_refused()
            return
        backend = self.backend
        assert backend is not None
        self.attempts += 1
        backend.attempts_total += 1
        self.started = self.began if self.attempts == 1 else perf_counter()
        conn = backend.pool.take_idle(self.downstream.plane.clock)
        if conn is not None:
            self._start(conn, reused=True)
        else:
            self.connecting = self.downstream.loop.create_task(self._connect(backend))

    async def _connect(self, backend: Backend) -> None:
        try:
            conn = await backend.pool.connect()
        except TimeoutError:
            self.connecting = None
            backend.attempt_counts[ATTEMPT_CONNECT_FAILURE] += 1
            self._failed("connect-failure", f"connect to backend {backend.name} timed out", 504)
        except OSError as exc:
            self.connecting = None
            backend.attempt_counts[ATTEMPT_CONNECT_FAILURE] += 1
            why = exc.strerror or str(exc) or type(exc).__name__
            self._failed("connect-failure", f"cannot connect to backend {backend.name}: {why}", 502)
        else:
            self.connecting = None
            if self.finished:
                conn.close()
            else:
                self._start(conn, reused=False)

    def _start(self, conn: UpstreamConnection, reused: bool) -> None:
        backend = self.backend
        assert backend is not None
        if self.request.body.failed:  # broken by the client while we connected
            backend.pool.release(conn, self.downstream.plane.clock)
            self._end_refused()
            return
        attempt = Attempt(self, conn, reused, backend)
        self.attempt = attempt
        attempt.start(self.head)
        upstream = self.upstream
        if upstream.hedge_after is not None and self.attempts == 1 and self._hedgeable():
            self.hedge_timer = self.downstream.loop.call_later(
                upstream.hedge_after, self._launch_hedge
            )

    def attempt_done(self, attempt: Attempt, outcome: Outcome) -> None:
        """Called by the attempt when it ends, whichever way."""
        if self.hedge is not None:
            self._racer_failed(attempt, outcome)  # the other attempt of the race carries on
            return
        self.attempt = None
        conn = attempt.conn
        backend = attempt.backend
        if outcome is Outcome.OK:
            if attempt.reusable:
                backend.pool.release(conn, self.downstream.plane.clock)
            else:
                conn.close()
            suspect = backend.consecutive_failures or backend.on_probation
            if suspect and not attempt.failure_status:
                self.upstream.health.request_succeeded(backend)
            self.ended = now = perf_counter()
            self.upstream.record_latency(backend, now - self.started)
            self._end()
            return
        if outcome is Outcome.UPGRADED:
            self._end()
            return
        conn.abort()
        if self.finished:
            return
        request = self.request
        written = attempt.head_sent and attempt.held_head is None
        # The client broke or abandoned its own body: nothing to count against the backend.
        client_error = outcome is Outcome.CLIENT_ERROR
        if written:
            request.close_connection = True  # the response is cut short: the client must see it
            self.downstream.abort()
            if not client_error:
                self.upstream.health.request_failed(backend, self.downstream.plane.clock, "reset")
            self._end()
            return
        if client_error:
            self._end_refused()
            return
        if (
            outcome is Outcome.RESET
            and attempt.reused
            and conn.bytes_received == 0
            and not self.retried_stale
            and request.body.replayable
        ):
            self.retried_stale = True  # the keep-alive race: try once more on a new connection
            self.attempts -= 1
            self._next_connection()
            return
        if outcome is Outcome.FAILURE_STATUS:
            # on_failure_status already counted it and allowed it
            self._retry_elsewhere(str(attempt.status))
            return
        if outcome is Outcome.BODY_LOST:  # not the backend's fault: nothing to count
            self._error(502, f"backend {backend.name}: {attempt.detail}")
            return
        condition = {Outcome.TIMEOUT: "timeout", Outcome.RESET: "reset"}.get(outcome, "reset")
        status = 504 if outcome is Outcome.TIMEOUT else 502
        self._failed(condition, f"backend {backend.name}: {attempt.detail}", status)

    # -- hedging ---------------------------------------------------------------------------------

    def _hedgeable(self) -> bool:
        request = self.request
        return (
            request.body is EMPTY_BODY
            and request.method in IDEMPOTENT_METHODS
            and request.upgrade is None
            and not self.finished
        )

    def _launch_hedge(self) -> None:
        """No response head yet: send the same request to another provider as well."""
        self.hedge_timer = None
        primary = self.attempt
        backend = self.backend
        if self.finished or primary is None or primary.response_started or backend is None:
            return
        other, _ = self.upstream.choose([backend], [backend.tier])
        if other is None or other is backend:
            return
        if not self.retrying and not self._within_budget():
            return  # a hedge is a retry sent early: the same budget bounds both
        self._charge_budget()
        conn = other.pool.take_idle(self.downstream.plane.clock)
        if conn is not None:
            self._start_hedge(other, conn, reused=True)
        else:
            self.hedge_connecting = self.downstream.loop.create_task(self._connect_hedge(other))

    async def _connect_hedge(self, backend: Backend) -> None:
        try:
            conn = await backend.pool.connect()
        except OSError:
            self.hedge_connecting = None
            return  # the primary attempt carries on alone
        self.hedge_connecting = None
        primary = self.attempt
        if self.finished or primary is None or primary.response_started:
            conn.close()
            return
        self._start_hedge(backend, conn, reused=False)

    def _start_hedge(self, backend: Backend, conn: UpstreamConnection, reused: bool) -> None:
        backend.in_flight += 1
        self.upstream.store.inc("hedges", (self.upstream.name,))
        hedge = Attempt(self, conn, reused, backend)
        self.hedge = hedge
        hedge.start(self._head_for(backend))

    def claim(self, winner: Attempt) -> None:
        """The first response head of a race: keep its attempt, cancel the other."""
        hedge, primary = self.hedge, self.attempt
        assert hedge is not None and primary is not None
        self.hedge = None
        loser = primary if winner is hedge else hedge
        loser.backend.in_flight -= 1
        loser.abandon()
        if winner is hedge:
            self.attempt = hedge
            self.backend = hedge.backend
            self.reason = f"hedged to provider {hedge.backend.provider}"

    def _racer_failed(self, attempt: Attempt, outcome: Outcome) -> None:
        """One attempt of a race failed before any head: the other one carries on."""
        hedge = self.hedge
        assert hedge is not None
        self.hedge = None
        attempt.conn.abort()
        attempt.backend.in_flight -= 1
        if outcome is not Outcome.CLIENT_ERROR and outcome is not Outcome.BODY_LOST:
            condition = "timeout" if outcome is Outcome.TIMEOUT else "reset"
            self.upstream.health.request_failed(
                attempt.backend, self.downstream.plane.clock, condition
            )
        if attempt is not hedge:  # the primary failed: the hedge becomes the attempt
            self.attempt = hedge
            self.backend = hedge.backend

    def explain(self) -> str:
        """Why this request went where it did, when that was not the plain first choice."""
        return self.reason or self.upstream.policy.why_not_preferred()

    def on_failure_status(self, status: int) -> bool:
        """A response with a failure status arrived: count it; True when it will be retried."""
        backend = self.backend
        assert backend is not None
        health = self.upstream.health
        now = self.downstream.plane.clock
        health.request_failed(backend, now, f"status {status}")
        confined = health.failure_confined(backend, now)
        return self._may_retry(str(status), nothing_sent=False, exempt=confined)

    def _failed(self, condition: str, detail: str, status: int) -> None:
        """An attempt failed before any response byte reached the client."""
        backend = self.backend
        assert backend is not None
        health = self.upstream.health
        now = self.downstream.plane.clock
        health.request_failed(backend, now, condition)
        nothing_sent = condition == "connect-failure"
        # A connect failure reached nothing: retrying it costs the failed backend nothing. And
        # a failure confined to one backend, region or provider is what retries are for: all
        # its requests fail at once, and the budget must not turn part of them into errors.
        exempt = nothing_sent or health.failure_confined(backend, now)
        if self._may_retry(condition, nothing_sent, exempt):
            self._retry_elsewhere(condition)
        else:
            self._error(status, detail)

    def _may_retry(self, condition: str, nothing_sent: bool, exempt: bool) -> bool:
        """Whether the failed attempt may be retried: allowed, safe to replay, and within the
        retry budget unless `exempt` from it (still bounded by `retry.attempts`)."""
        if self.finished:
            return False
        retry = self.upstream.config.retry
        request = self.request
        if condition not in retry.on or self.attempts >= retry.attempts:
            return False
        safe = (
            nothing_sent
            or request.method in IDEMPOTENT_METHODS
            or (
                retry.retry_with_idempotency_key
                and request.header(b"idempotency-key") is not None
            )
        )
        upstream = self.upstream
        if not safe or request.upgrade is not None:
            return False
        if not request.body.replayable:
            upstream.store.inc("replay_buffer_overflows", (upstream.name,))
            return False
        return exempt or self.retrying or self._within_budget()

    def _within_budget(self) -> bool:
        """Retries in flight (hedges included) below their share of requests in flight."""
        upstream = self.upstream
        retry = upstream.config.retry
        budget = max(
            retry.min_retry_concurrency,
            int(upstream.active_requests * retry.budget_percent / 100),
        )
        if upstream.active_retries >= budget:
            upstream.store.inc("retry_budget_exhausted", (upstream.name,))
            return False
        return True

    def _charge_budget(self) -> None:
        """This exchange now holds a place in the retry budget (until it ends)."""
        if not self.retrying:
            self.retrying = True
            self.upstream.active_retries += 1

    def _retry_elsewhere(self, condition: str) -> None:
        previous = self.backend
        assert previous is not None
        tried = self.tried
        if tried is None:
            tried = self.tried = []  # made only when needed: most requests are never retried
        tried.append(previous)
        upstream = self.upstream
        backend, reason = upstream.choose(tried, [b.tier for b in tried])
        if backend is None:
            self._error(503, reason, retry_after=True)
            return
        if condition != "connect-failure":
            self._charge_budget()
        store = upstream.store
        label = condition.replace("-", "_")  # metric labels spell words with `_` throughout
        store.inc("retries", (upstream.name, label))
        if backend.provider != previous.provider:
            moved = (upstream.name, previous.provider, backend.provider, "retry_" + label)
            store.inc("failovers", moved)
        previous.in_flight -= 1
        backend.in_flight += 1
        self.reason = reason
        self._prepare(backend)
        self._next_connection()

    def _error(self, status: int, detail: str, retry_after: bool = False) -> None:
        request = self.request
        self.connecting = None
        if self.finished:
            return
        if request.body.failed:  # the client broke its body meanwhile: its refusal answers
            self._end_refused()
            return
        close = request.close_connection or not request.body.complete or not request.keep_alive
        if close:
            request.close_connection = True
        self.status = status
        if not self.reason:
            self.reason = detail
        response = error_response(
            status, _REASONS[status], detail, request.request_id, close=close,
            retry_after=1 if retry_after else None,
            proxy_headers=(
                self.decision_header() if self.downstream.plane.debug_headers else None
            ),
            head_only=request.method == b"HEAD",
        )
        self.bytes_out += len(response)
        self.downstream.write(response)
        self._end()

    def _end(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.hedge_timer is not None:
            self.hedge_timer.cancel()
        self._release_counters()
        self._record(self.status)
        self.downstream.exchange_done(self)

    def _end_refused(self) -> None:
        """End with no response sent: the client broke its own body, and the refusal queued
        behind this exchange answers it. Recorded here, once, with that refusal's status."""
        self.status = self.refusal or 400
        self._end()

    def _record(self, status: int) -> None:
        """Count the finished request (status class, duration) and write its access log line."""
        seconds = (self.ended or perf_counter()) - self.began
        backend = self.backend
        counts = self.route.counts.get(backend)
        if counts is None:
            counts = self.route.counts_for(backend)
        # `x[i] = x[i] + n`, not `x[i] += n`: mypyc compiles an item's `+=` to a generic call
        index = status // 100 - 1
        counts[index] = counts[index] + 1
        slots = backend.durations if backend is not None else self.upstream.unanswered_durations
        slot = duration_slot(seconds)
        slots[slot] = slots[slot] + 1.0
        slots[-1] = slots[-1] + seconds
        log = self.downstream.plane.access_log
        if log is not None:
            request = self.request
            log.record(
                request_id=request.request_id,
                client=self.downstream.client_ip,
                method=request.method,
                path=request.target,
                status=status,
                bytes_in=request.head_bytes + request.body.received,
                bytes_out=self.bytes_out,
                duration=seconds,
                route=self.route.label,
                upstream=self.upstream.name,
                provider=backend.provider if backend is not None else "",
                backend=backend.name if backend is not None else "",
                attempts=self.attempts,
                reason=self.explain(),
                health_view=self.view,
            )

    def decision_header(self) -> bytes:
        """X-Failover-Proxy-Decision: where this request went and why (debug_headers: true)."""
        backend = self.backend
        where = (
            f"provider={backend.provider}; backend={backend.name}; " if backend is not None else ""
        )
        reason = self.explain().replace('"', "'")
        text = f'{where}attempts={self.attempts}; reason="{reason}"'
        return b"X-Failover-Proxy-Decision: " + text.encode("latin-1", "replace") + b"\r\n"

    def _release_counters(self) -> None:
        upstream = self.upstream
        upstream.active_requests -= 1
        if self.retrying:
            upstream.active_retries -= 1
        if self.backend is not None:
            self.backend.in_flight -= 1

    def check_timeout(self, now: float) -> None:
        if self.waiting_body:
            received = self.request.body.received
            if received != self.body_progress:
                self.body_progress = received
                self.body_progress_at = now
            elif now - self.body_progress_at >= self.downstream.limits.body_timeout:
                self.downstream.body_stalled()
            return
        attempt = self.attempt
        if attempt is not None:
            attempt.check_timeout(now)
        hedge = self.hedge
        if hedge is not None:
            hedge.check_timeout(now)

    def abandon(self) -> None:
        """The client is gone: stop whatever is in progress and free the backend connection."""
        if self.finished:
            return
        if self.waiting_body:  # it never began: nothing to release, nobody dialled
            self.waiting_body = False
            self.request.body.on_ready = None
            self.finished = True
            self._record(CLIENT_CLOSED_REQUEST)
            return
        self.finished = True
        self._release_counters()
        self._record(CLIENT_CLOSED_REQUEST)
        if self.hedge_timer is not None:
            self.hedge_timer.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.hedge_connecting is not None:
            self.hedge_connecting.cancel()
        attempt = self.attempt
        if attempt is not None:
            self.attempt = None  # each attempt points back here: no cycle left behind
            attempt.abandon()
        hedge = self.hedge
        if hedge is not None:
            self.hedge = None
            hedge.backend.in_flight -= 1
            hedge.abandon()
