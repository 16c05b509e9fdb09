"""One request's journey, whatever the protocols: route, pick a backend, send, pass the answer
back, or explain why not.

An `Exchange` drives the attempts of one request through the streams of dataplane/streams.py:
it answers on the client's `DownstreamStream` and sends each `Attempt` on an `UpstreamStream`
from the chosen backend's connector. It decides what happens when an attempt fails: retried
once on a fresh connection when a reused one turns out closed before any response byte (the
keep-alive race), retried on another backend (another provider first) when that is safe,
allowed and within the retry budget, raced by a hedge, or answered 502 / 503 / 504 with a short
plain reason. No protocol's bytes are written here: the codecs frame heads, bodies and trailers.

An attempt holds its backend's in-flight place from its start to its end, and gives it back
exactly once (`Attempt.__init__` and `Attempt._end_try`); an exchange holds its upstream's
(`begin` and `_release_counters`): these are the only places those counts change.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import TYPE_CHECKING, Final, cast

from ..config.schema import IDEMPOTENT_METHODS, HashOnConfig
from ..model.balance import hash_key
from ..model.counters import (
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
from .request import EMPTY_BODY, Request
from .retries import Verdict, retry_verdict, within_budget
from .streams import (
    DownstreamStream,
    ResponseHead,
    StreamOwner,
    UpstreamConnector,
    UpstreamStream,
)

if TYPE_CHECKING:
    from ..model.backends import Backend
    from ..model.topology import RouteTarget

perf_counter: Final = time.perf_counter
"""Bound once: mypyc keeps a Final in a C static, where an imported name is looked up in the
module's dict on every call."""
_IDEMPOTENT: Final = IDEMPOTENT_METHODS
"""Bound here: a compiled module keeps its own Final in a C static."""
HELD_BODY_BYTES: Final = 64 * 1024
"""A response body of a declared length up to this is held with its head until complete."""

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
    CONNECT_FAILURE = "connect_failure"  # refused, unreachable: the request went nowhere
    CONNECT_TIMEOUT = "connect_timeout"
    RESET = "reset"  # (on a reused connection before any response byte: the keep-alive race)
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    BODY_LOST = "body_lost"  # the request body could not be sent again
    CLIENT_ERROR = "client_error"  # the client broke its own request body
    FAILURE_STATUS = "failure_status"  # a 5xx that will be retried elsewhere, not forwarded
    UNPROCESSED = "unprocessed"  # HTTP/2: the backend refused the stream or went away below it


_OUTCOME_COUNTER: Final = {
    Outcome.OK: ATTEMPT_OK,
    Outcome.UPGRADED: ATTEMPT_OK,
    Outcome.CONNECT_FAILURE: ATTEMPT_CONNECT_FAILURE,
    Outcome.CONNECT_TIMEOUT: ATTEMPT_CONNECT_FAILURE,
    Outcome.RESET: ATTEMPT_RESET,
    Outcome.TIMEOUT: ATTEMPT_TIMEOUT,
    Outcome.BAD_RESPONSE: ATTEMPT_BAD_RESPONSE,
    Outcome.BODY_LOST: ATTEMPT_CLIENT_ERROR,
    Outcome.CLIENT_ERROR: ATTEMPT_CLIENT_ERROR,
    Outcome.FAILURE_STATUS: ATTEMPT_HTTP_5XX,
    Outcome.UNPROCESSED: ATTEMPT_RESET,
}
"""Which attempt counter (counters.ATTEMPT_OUTCOMES) an outcome bumps."""

_CONDITION: Final = {
    Outcome.CONNECT_FAILURE: "connect-failure",
    Outcome.CONNECT_TIMEOUT: "connect-failure",
    Outcome.TIMEOUT: "timeout",
}
"""The retry and health condition (schema.RETRY_CONDITIONS) of a failed attempt: `reset` for
every outcome not listed."""


class Attempt(StreamOwner):
    """One try of a request on one backend: it connects (or takes an idle stream), sends the
    request, and passes the response to the client as it arrives.

    The backend's in-flight count holds the attempt from its creation (connecting included)
    to its end, which comes exactly once: `_finish` or `abandon`, both through `_end_try`."""

    # Defaults live on the class: a new attempt sets only what differs (cheaper per request).
    done = False
    response_started = False
    head_written = False
    """The client has been sent the response head: a failure now cuts the response short."""
    held_head: ResponseHead | None = None
    """A response head not written yet, so it can leave in one write with the first body."""
    paused_client = False
    failure_status = False
    """The response carried a failure status (already counted against the backend)."""
    head_swept = False
    holding_body = False
    """The body of a small response (a declared length up to HELD_BODY_BYTES) is held with its
    head until complete, so that a backend dying mid-body can still be retried unseen."""
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
    stream: UpstreamStream | None = None
    """The stream the request is sent on (None while connecting)."""
    connecting: asyncio.Task[None] | None = None
    reused = False
    shared_failure = False
    """Its connect failed, a connect shared with other requests and counted against the
    backend by one of them (UpstreamConnector.first_report)."""

    def __init__(self, exchange: Exchange, backend: Backend) -> None:
        self.exchange = exchange
        self.backend = backend
        backend.in_flight += 1  # given back in _end_try, once
        self.downstream = downstream = exchange.downstream
        self.request = request = exchange.request
        self.read_timeout = exchange.first_byte_timeout
        self.head_only = request.method == b"HEAD"
        self.last_activity = downstream.plane.clock

    def connect(self) -> None:
        """Start on the most recently used idle stream of the backend, or open one."""
        connector = cast(UpstreamConnector, self.backend.connector)
        stream = connector.idle_stream(self.downstream.plane.clock)
        if stream is not None:
            self.reused = True
            self.start(stream)
        else:
            self.connecting = self.downstream.loop.create_task(self._open(connector))

    async def _open(self, connector: UpstreamConnector) -> None:
        try:
            stream = await connector.open_stream()
        except TimeoutError as exc:
            self.connecting = None
            self.shared_failure = not connector.first_report(exc)
            self._finish(
                Outcome.CONNECT_TIMEOUT, f"connect to backend {self.backend.name} timed out"
            )
        except OSError as exc:
            self.connecting = None
            self.shared_failure = not connector.first_report(exc)
            why = exc.strerror or str(exc) or type(exc).__name__
            self._finish(
                Outcome.CONNECT_FAILURE, f"cannot connect to backend {self.backend.name}: {why}"
            )
        else:
            self.connecting = None
            if self.done:
                stream.close()
            else:
                self.start(stream)

    def start(self, stream: UpstreamStream) -> None:
        """Send the request head and hand the body over; an explicit per-try timeout starts
        once the whole request is sent (_arm_per_try)."""
        self.stream = stream
        request = self.request
        if request.body.failed:  # broken by the client while we connected
            self._finish(Outcome.CLIENT_ERROR, "the client's request body was malformed")
            return
        exchange = self.exchange
        downstream = self.downstream
        self.last_activity = downstream.plane.clock
        stream.send_head(
            self, request, request_target(self.backend, request),
            request.raw_host if exchange.upstream.preserve_host else None, downstream,
        )
        if request.expect_continue and request.body.received == 0 and not request.body.complete:
            downstream.send_continue(request)
            request.expect_continue = False
        if not request.body.attach(self):
            self._finish(Outcome.BODY_LOST, "request body already sent and too large to resend")
            return
        if downstream.write_paused:
            stream.pause_reading(True)
        if request.body.complete:
            self._arm_per_try()  # else once the body is sent (end_body)
        exchange.attempt_started(self)

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
            self._finish(
                Outcome.TIMEOUT, f"no response within {self.exchange.per_try_timeout:g}s"
            )

    # -- the request body, as its sink ---------------------------------------------------------

    def write_body(self, chunk: bytes) -> None:
        stream = self.stream
        if stream is None or stream.closed:
            return
        self.activity += 1
        stream.send_body(chunk)

    def end_body(self) -> None:
        stream = self.stream
        if stream is not None and not stream.closed:
            stream.end_body(self.request.trailers)
        self._arm_per_try()

    def abort_body(self) -> None:
        self._finish(Outcome.CLIENT_ERROR, "the client's request body was malformed")

    # -- events from the upstream stream -------------------------------------------------------

    def on_head(self, status: int, head: ResponseHead) -> None:
        exchange = self.exchange
        if exchange.hedge is not None:
            exchange.claim(self)  # two attempts race: the first head wins
        self.response_started = True
        self.status = status
        self.activity += 1
        self.read_timeout = exchange.read_timeout
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        if status >= 500 and status in exchange.upstream.failure_statuses:
            self.failure_status = True
            if exchange.on_failure_status(status):
                self._finish(Outcome.FAILURE_STATUS, f"status {status}")
                return
        if status == 101:
            self.upgrade_head = head
            if self.request.upgrade is None:
                self._finish(Outcome.BAD_RESPONSE, "backend switched protocols unasked")
            return
        length = head.length
        if (
            0 <= length <= HELD_BODY_BYTES
            and not self.head_only
            and status != 204
            and status != 304
        ):
            self.holding_body = True
        exchange.status = status
        self.held_head = head  # held until the first body byte, completion or the next sweep

    def _send_head(self, body: bytes | None, more: list[bytes] | None, end: bool) -> None:
        """Write the held head, with the body held so far (`body`, `more`); `end`: all of it."""
        head = self.held_head
        assert head is not None
        self.held_head = None
        self.holding_body = False
        self.head_written = True
        exchange = self.exchange
        downstream = self.downstream
        exchange.bytes_out += downstream.send_head(
            self.request, self.status, head,
            exchange.decision() if downstream.plane.debug_headers else None,
            body, more, end,
        )

    def flush_head(self) -> None:
        """Write a held response head (and any held body): from here on the response streams."""
        if self.held_head is not None:
            more = self.held_more
            self.held_more = None
            chunk = self.held_chunk
            self.held_chunk = None
            self._send_head(chunk, more, False)

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
        if self.held_head is not None:
            self._send_head(chunk, None, False)
        else:
            self.exchange.bytes_out += self.downstream.send_body(chunk)

    def on_complete(self, trailers: list[bytes] | None) -> None:
        if self.held_head is not None:
            chunk = self.held_chunk
            self.held_chunk = None
            more = self.held_more
            self.held_more = None
            self._send_head(chunk, more, trailers is None)
            if trailers is not None:
                self.exchange.bytes_out += self.downstream.send_end(trailers)
        else:
            self.exchange.bytes_out += self.downstream.send_end(trailers)
        self._finish(Outcome.OK)

    def on_upgrade(self, leftover: bytes) -> None:
        request = self.request
        upgrade_head = self.upgrade_head
        stream = self.stream
        if request.upgrade is None or upgrade_head is None or stream is None:
            self.on_bad_response("backend switched protocols unasked")
            return
        self.head_written = True
        self.exchange.bytes_out += self.downstream.start_tunnel(
            request, upgrade_head, stream, leftover
        )
        self._finish(Outcome.UPGRADED)

    def on_lost(self, exc: Exception | None) -> None:
        why = f"connection to backend lost ({exc})" if exc else "backend closed the connection"
        if not self.response_started:
            self._finish(Outcome.RESET, why + " before responding")
        else:
            self._finish(Outcome.RESET, why + " in the middle of the response")

    def on_bad_response(self, reason: str) -> None:
        self._finish(Outcome.BAD_RESPONSE, reason)

    def on_unprocessed(self, reason: str) -> None:
        self._finish(Outcome.UNPROCESSED, reason)

    def on_write_paused(self, paused: bool) -> None:
        """The backend reads the request body slowly: slow the client down with it."""
        self.paused_client = paused
        self.downstream.set_paused_by_upstream(paused)

    # -- ending --------------------------------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """Called by the data plane's sweep: end an attempt whose backend has gone silent."""
        if self.done or self.stream is None:  # (connecting: the connect timeout applies)
            return
        if self.held_head is not None and self.held_chunk is None:
            # A head whose body has not started by the second sweep goes out alone (long
            # polls, event streams): 0.2-0.4 s. Until then a backend that fails right after its
            # head can still be retried elsewhere, unseen by the client. (A small body that
            # has started is held until complete, however slowly the rest comes: the read
            # timeouts bound it, and a backend dying mid-body stays unseen.)
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
            if now - self.last_activity >= self.downstream.plane.limits.body_timeout:
                self.downstream.body_stalled()
        elif now - self.last_activity >= self.read_timeout:
            self._finish(Outcome.TIMEOUT, f"backend sent nothing for {self.read_timeout:g}s")

    def _finish(self, outcome: Outcome, detail: str = "") -> None:
        """The attempt ended by itself: count it, leave the stream as the outcome allows (kept
        for the next request, handed to a tunnel, or aborted), and tell the exchange."""
        if self.done:
            return
        self.detail = detail
        if outcome is Outcome.OK:
            counter = ATTEMPT_HTTP_5XX if self.status >= 500 else ATTEMPT_OK
        else:
            counter = _OUTCOME_COUNTER[outcome]
        self._end_try(counter)
        stream = self.stream
        if stream is not None:
            if outcome is Outcome.OK and self.request.body.complete:
                stream.release(self.downstream.plane.clock)
            elif outcome is not Outcome.UPGRADED:
                # (OK with the body not all sent: the backend answered before reading it)
                stream.abort()
        if self.paused_client:
            self.downstream.set_paused_by_upstream(False)
        self.exchange.attempt_done(self, outcome)

    def abandon(self) -> None:
        """The exchange no longer wants it (the client went away, or the race was lost): drop
        the backend connection, report nothing."""
        if self.done:
            return
        self._end_try(ATTEMPT_CANCELLED)
        if self.connecting is not None:
            self.connecting.cancel()
        if self.stream is not None:
            self.stream.abort()

    def _end_try(self, counter: int) -> None:
        """The one end of an attempt: counted once, its in-flight place given back."""
        self.done = True
        self.backend.in_flight -= 1
        counts = self.backend.attempt_counts
        counts[counter] = counts[counter] + 1  # `+=` on an item is a generic call in mypyc
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        body = self.request.body
        if body.sink is self:
            body.detach()
        stream = self.stream
        if stream is not None and stream.owner is self:
            stream.owner = None


def request_target(backend: Backend, request: Request) -> bytes:
    """The target the backend is sent: the request's under the backend's base path."""
    if backend.base_path and request.target != b"*":
        return backend.base_path + request.target
    return request.target


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
        for cookies in request.header_values(b"cookie"):
            for part in cookies.split(b";"):
                part = part.strip()
                if part.startswith(prefix):
                    material = part[len(prefix) :]
                    break
    return hash_key(material if material is not None else client_ip)


class Exchange:
    """One request's journey through its attempts, driven by callbacks.

    On the common path (an idle pooled connection) no task or future is created: the request is
    sent from the client's parser callback and the response from the backend's. Only opening a
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
        "counted",
        "downstream",
        "ended",
        "finished",
        "first_byte_timeout",
        "hedge",
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
        self, downstream: DownstreamStream, request: Request, route: RouteTarget
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
        self.retried_stale = False
        self.retrying = False
        """This exchange holds a place among the upstream's retries in flight."""
        self.counted = False
        """This exchange holds a place among the upstream's requests in flight."""
        self.finished = False
        self.waiting_body = False
        self.attempts = 0
        self.tried: list[Backend] | None = None
        self.read_timeout = upstream.read_timeout
        self.per_try_timeout = upstream.per_try_timeout
        self.first_byte_timeout = upstream.per_try_timeout or upstream.read_timeout
        self.reason = ""
        self.started = 0.0
        hash_on = upstream.hash_on
        backend = upstream.pick(
            0 if hash_on is None else hash_request(request, downstream.client_ip, hash_on)
        )
        if backend is None:  # nothing in rotation: a last resort, or why there is none
            backend, self.reason = upstream.choose([], [])
        self.backend = backend

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
            self.downstream.send_continue(request)  # we want the body now
            request.expect_continue = False
        body.buffer_until(limit, self.body_ready)

    def body_ready(self) -> None:
        """The body is read (whole, or past the buffering limit), or the client broke it."""
        self.waiting_body = False
        if self.request.body.failed:
            self._end_refused()  # never began: nothing held, nothing to give back
            return
        self.begin()

    def begin(self) -> None:
        upstream = self.upstream
        upstream.active_requests += 1
        self.counted = True  # given back in _release_counters
        backend = self.backend
        if backend is None:
            self._error(503, self.reason, retry_after=True)
            return
        if backend.in_flight >= upstream.max_requests_per_backend:
            backend, _ = upstream.choose([backend], [])
            if backend is not None and backend.in_flight < upstream.max_requests_per_backend:
                self.backend = backend
            else:
                limit = upstream.max_requests_per_backend
                self._overflow(f"{limit} requests in flight per backend")
                return
        if upstream.active_requests > upstream.max_requests:
            self._overflow(f"{upstream.max_requests} requests in flight")
            return
        self._next_attempt()

    def _overflow(self, limit: str) -> None:
        """A circuit breaker is open: refuse at once rather than pile up work."""
        self.upstream.store.inc("circuit_breaker_overflows", (self.upstream.name,))
        self.backend = None  # answered by the proxy, not by a backend
        self._error(503, f"circuit breaker open: {limit}", retry_after=True)

    def _next_attempt(self) -> None:
        if self.request.body.failed:
            self._end_refused()
            return
        backend = self.backend
        assert backend is not None
        self.attempts += 1
        backend.attempts_total += 1
        self.started = self.began if self.attempts == 1 else perf_counter()
        attempt = self.attempt = Attempt(self, backend)
        attempt.connect()

    def attempt_started(self, attempt: Attempt) -> None:
        """An attempt sent its request: the first one may be raced by a hedge."""
        upstream = self.upstream
        if (
            upstream.hedge_after is not None
            and attempt is self.attempt
            and self.attempts == 1
            and self.hedge_timer is None
            and self._hedgeable()
        ):
            self.hedge_timer = self.downstream.loop.call_later(
                upstream.hedge_after, self._launch_hedge
            )

    def attempt_done(self, attempt: Attempt, outcome: Outcome) -> None:
        """Called by the attempt when it ends by itself, whichever way."""
        if self.hedge is not None:
            self._racer_failed(attempt, outcome)  # the other attempt of the race carries on
            return
        self.attempt = None
        backend = attempt.backend
        if outcome is Outcome.OK:
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
        if self.finished:
            return
        request = self.request
        # The client broke or abandoned its own body: nothing to count against the backend.
        client_error = outcome is Outcome.CLIENT_ERROR
        if attempt.head_written:
            request.close_connection = True  # the response is cut short: the client must see it
            self.downstream.reset()
            if not client_error:
                self.upstream.health.request_failed(backend, self.downstream.plane.clock, "reset")
            self._end()
            return
        if client_error:
            self._end_refused()
            return
        stream = attempt.stream
        if (
            outcome is Outcome.RESET
            and attempt.reused
            and stream is not None
            and stream.bytes_received == 0
            and not self.retried_stale
            and request.body.replayable
        ):
            self.retried_stale = True  # the keep-alive race: try once more on a new connection
            self.attempts -= 1
            self._next_attempt()
            return
        if outcome is Outcome.UNPROCESSED:
            # The backend never processed it (RFC 9113 §8.7): not its failure, and safe to
            # send again whatever the method, as a connect failure is.
            if self._may_retry("connect-failure", nothing_sent=True, exempt=True):
                self._retry_elsewhere("unprocessed")
            else:
                self._error(503, f"backend {backend.name}: {attempt.detail}", retry_after=True)
            return
        if outcome is Outcome.FAILURE_STATUS:
            # on_failure_status already counted it and allowed it
            self._retry_elsewhere(str(attempt.status))
            return
        if outcome is Outcome.BODY_LOST:  # not the backend's fault: nothing to count
            self._error(502, f"backend {backend.name}: {attempt.detail}")
            return
        status = 502
        if outcome is Outcome.TIMEOUT or outcome is Outcome.CONNECT_TIMEOUT:
            status = 504
        detail = attempt.detail
        if outcome is not Outcome.CONNECT_FAILURE and outcome is not Outcome.CONNECT_TIMEOUT:
            detail = f"backend {backend.name}: {detail}"
        self._failed(_CONDITION.get(outcome, "reset"), detail, status,
                     counted=not attempt.shared_failure)

    # -- hedging ---------------------------------------------------------------------------------

    def _hedgeable(self) -> bool:
        request = self.request
        return (
            request.body is EMPTY_BODY
            and request.method in _IDEMPOTENT
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
        self.upstream.store.inc("hedges", (self.upstream.name,))
        hedge = self.hedge = Attempt(self, other)
        hedge.connect()

    def claim(self, winner: Attempt) -> None:
        """The first response head of a race: keep its attempt, cancel the other."""
        hedge, primary = self.hedge, self.attempt
        assert hedge is not None and primary is not None
        self.hedge = None
        loser = primary if winner is hedge else hedge
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
        counted = not attempt.shared_failure
        if counted and outcome is not Outcome.CLIENT_ERROR and outcome is not Outcome.BODY_LOST:
            self.upstream.health.request_failed(
                attempt.backend, self.downstream.plane.clock, _CONDITION.get(outcome, "reset")
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

    def _failed(self, condition: str, detail: str, status: int, counted: bool = True) -> None:
        """An attempt failed before any response byte reached the client (counted against
        the backend, unless another attempt already counted the same failure)."""
        backend = self.backend
        assert backend is not None
        health = self.upstream.health
        now = self.downstream.plane.clock
        if counted:
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
        """Whether the failed attempt may be retried (retries.retry_verdict), counting why
        not when that is worth an operator's eye."""
        if self.finished:
            return False
        upstream = self.upstream
        request = self.request
        retry = upstream.config.retry
        verdict = retry_verdict(
            retry,
            condition=condition,
            attempts=self.attempts,
            method=request.method,
            has_idempotency_key=retry.retry_with_idempotency_key
            and request.header(b"idempotency-key") is not None,
            upgrade=request.upgrade is not None,
            replayable=request.body.replayable,
            nothing_sent=nothing_sent,
            exempt=exempt,
            retrying=self.retrying,
            active_requests=upstream.active_requests,
            active_retries=upstream.active_retries,
        )
        if verdict is Verdict.BODY_GONE:
            upstream.store.inc("replay_buffer_overflows", (upstream.name,))
        elif verdict is Verdict.OVER_BUDGET:
            upstream.store.inc("retry_budget_exhausted", (upstream.name,))
        return verdict is Verdict.RETRY

    def _within_budget(self) -> bool:
        """Room for one more retry in flight (a hedge asks before it is sent)."""
        upstream = self.upstream
        if within_budget(upstream.config.retry, upstream.active_requests, upstream.active_retries):
            return True
        upstream.store.inc("retry_budget_exhausted", (upstream.name,))
        return False

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
        if backend is None and condition == "unprocessed" and previous.usable:
            # (a backend going away gracefully, and no other: it takes the request on a new
            # connection, as it takes the next one)
            backend, reason = previous, f"{previous.name} again: it did not process it"
        if backend is None:
            self._error(503, reason, retry_after=True)
            return
        if condition != "connect-failure" and condition != "unprocessed":
            self._charge_budget()
        store = upstream.store
        label = condition.replace("-", "_")  # metric labels spell words with `_` throughout
        store.inc("retries", (upstream.name, label))
        if backend.provider != previous.provider:
            moved = (upstream.name, previous.provider, backend.provider, "retry_" + label)
            store.inc("failovers", moved)
        self.reason = reason
        self.backend = backend
        self._next_attempt()

    def _error(self, status: int, detail: str, retry_after: bool = False) -> None:
        request = self.request
        if self.finished:
            return
        if request.body.failed:  # the client broke its body meanwhile: its refusal answers
            self._end_refused()
            return
        self.status = status
        if not self.reason:
            self.reason = detail
        downstream = self.downstream
        self.bytes_out += downstream.send_error(
            request, status, detail, retry_after,
            self.decision() if downstream.plane.debug_headers else None,
        )
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
                protocol=self.downstream.protocol,
            )

    def decision(self) -> str:
        """Where this request went and why: the X-Failover-Proxy-Decision field's value
        (debug_headers: true)."""
        backend = self.backend
        where = (
            f"provider={backend.provider}; backend={backend.name}; " if backend is not None else ""
        )
        reason = self.explain().replace('"', "'")
        return f'{where}attempts={self.attempts}; reason="{reason}"'

    def _release_counters(self) -> None:
        """Give back the upstream's places this exchange holds (backends' places are the
        attempts' own)."""
        upstream = self.upstream
        if self.counted:
            self.counted = False
            upstream.active_requests -= 1
        if self.retrying:
            self.retrying = False
            upstream.active_retries -= 1

    def check_timeout(self, now: float) -> None:
        if self.waiting_body:
            received = self.request.body.received
            if received != self.body_progress:
                self.body_progress = received
                self.body_progress_at = now
            elif now - self.body_progress_at >= self.downstream.plane.limits.body_timeout:
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
        if self.waiting_body:  # it never began: nobody dialled
            self.waiting_body = False
            self.request.body.on_ready = None
        self.finished = True
        self._release_counters()
        self._record(CLIENT_CLOSED_REQUEST)
        if self.hedge_timer is not None:
            self.hedge_timer.cancel()
        attempt = self.attempt
        if attempt is not None:
            self.attempt = None  # each attempt points back here: no cycle left behind
            attempt.abandon()
        hedge = self.hedge
        if hedge is not None:
            self.hedge = None
            hedge.abandon()
