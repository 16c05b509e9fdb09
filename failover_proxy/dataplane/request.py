"""A parsed client request and its body, streaming to whichever upstream attempt holds it.

The body is not buffered whole: chunks go straight to the attempt that owns it. Only while no
attempt is attached (connecting, or queued behind a pipelined request) are chunks held, and the
client is paused once that backlog passes a high-water mark. Up to `replay_limit` bytes are also
kept so that a request can be sent again when a reused keep-alive connection proves dead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .headers import field_value

if TYPE_CHECKING:
    # The sink is typed as the one class that takes bodies, not as a Protocol: mypyc then
    # calls write_body per chunk directly instead of through a generic method lookup.
    from .forward import Attempt

# Backlog held for an attempt that is not attached yet, before the client is paused.
PENDING_HIGH_WATER: Final = 256 * 1024
DEFAULT_REPLAY_BYTES: Final = 1024 * 1024
"""Replay buffer until the route is known (then the upstream's retry.replay_max_bytes)."""


class RequestBody:
    """The client's request body as a stream with a bounded replay buffer."""

    __slots__ = (
        "_pause",
        "_paused",
        "_resume",
        "buffer_limit",
        "complete",
        "delivered",
        "failed",
        "on_ready",
        "pending",
        "pending_bytes",
        "received",
        "replay",
        "replay_bytes",
        "replay_limit",
        "sink",
    )

    def __init__(
        self,
        replay_limit: int,
        pause: Callable[[], None],
        resume: Callable[[], None],
        complete: bool = False,
    ) -> None:
        self.replay_limit = replay_limit
        self._pause = pause
        self._resume = resume
        self._paused = False
        self.complete = complete
        self.received = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.replay: list[bytes] | None = []
        self.replay_bytes = 0
        self.sink: Attempt | None = None
        self.delivered = False
        self.failed = False
        self.buffer_limit = 0
        self.on_ready: Callable[[], None] | None = None
        """Set while the body is read whole before a backend is dialled: called once, when it
        is complete, passes buffer_limit, or fails."""

    def buffer_until(self, limit: int, ready: Callable[[], None]) -> None:
        """Hold the body until it is complete or larger than `limit`, then call `ready`."""
        self.buffer_limit = limit
        self.on_ready = ready

    def _ready(self) -> bool:
        ready = self.on_ready
        if ready is None:
            return False
        self.on_ready = None
        ready()
        return True

    @property
    def replayable(self) -> bool:
        """True while every byte received so far can still be sent again."""
        return self.replay is not None

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        replay = self.replay
        if replay is not None:
            self.replay_bytes += len(chunk)
            if self.replay_bytes > self.replay_limit:
                self.replay = None
            else:
                replay.append(chunk)
        sink = self.sink
        if sink is not None:
            self.delivered = True
            sink.write_body(chunk)
            return
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        if self.on_ready is not None:
            # Buffering (bounded by buffer_limit, so no pause): dial once past the limit.
            if self.pending_bytes > self.buffer_limit:
                self._ready()
            return
        if self.pending_bytes > PENDING_HIGH_WATER and not self._paused:
            self._paused = True
            self._pause()

    def finish(self) -> None:
        self.complete = True
        if self._ready():
            return  # the attempt it starts ends the body when it attaches
        if self.sink is not None:
            self.sink.end_body()

    def set_replay_limit(self, limit: int) -> None:
        self.replay_limit = limit
        if self.replay_bytes > limit:
            self.replay = None

    def fail(self) -> None:
        """The client broke the body (bad framing, over the size limit): abandon the request."""
        self.failed = True
        self.pending = []
        self.replay = None
        if self._ready():
            return  # the exchange that was waiting ends, refused
        if self.sink is not None:
            self.sink.abort_body()

    def attach(self, sink: Attempt) -> bool:
        """Give the body to an attempt; False when bytes already sent elsewhere are lost."""
        if self.failed:
            return False
        if self.delivered:
            if self.replay is None:
                return False
            chunks = self.replay
        else:
            chunks = self.pending
        self.sink = sink
        if chunks:
            self.delivered = True
            for chunk in chunks:
                sink.write_body(chunk)
        self.pending = []
        self.pending_bytes = 0
        if self._paused:
            self._paused = False
            self._resume()
        if self.complete:
            sink.end_body()
        return True

    def detach(self) -> None:
        self.sink = None


class Request:
    """One parsed request head plus its body stream; what the forwarder works from."""

    # Defaults live on the class: parsing sets only what a request actually carries.
    method = b""
    target = b""
    path = b"/"
    raw_host: bytes | None = None
    http10 = False
    keep_alive = True
    upgrade: bytes | None = None
    chunked = False
    content_length: int | None = None
    expect_continue = False
    close_connection = False
    connection: bytes | None = None
    """The Connection header's values, joined (names it lists are not forwarded)."""
    proxy_connection = False
    """A legacy Proxy-Connection header came (not forwarded; llhttp heeds it like Connection)."""
    upgrade_offered: bytes | None = None
    """An Upgrade header's value (`upgrade` once the parser agrees it is an upgrade request)."""
    expect: bytes | None = None
    host_fields = 0
    forwarded_for: bytes | None = None
    """X-Forwarded-For values received (the client's address is appended to them)."""
    via: bytes | None = None
    has_request_id = False
    """The client sent its own X-Request-Id (forwarded; the proxy adds none)."""
    field_count = 0
    head_bytes = 0
    """Size of the request target and header fields as received (for the access log)."""
    body: RequestBody

    def __init__(self, request_id: bytes) -> None:
        self.request_id = request_id
        self.fields: list[bytes] = []
        """Header fields forwarded as they came: runs of whole lines cut from the raw head."""
        self.fields_block: bytes | None = None
        """`fields` joined, less what Connection names (made once, for the first attempt)."""

    def header(self, lname: bytes) -> bytes | None:
        """A header's first value by lower-case name (Host included; off the hot path)."""
        if lname == b"host":
            return self.raw_host
        return field_value(self.fields, lname)


class _EmptyBody(RequestBody):
    """The body of a request that has none: shared, stateless, nothing to send or replay."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0, _never, _never, complete=True)

    def feed(self, chunk: bytes) -> None:
        raise AssertionError("a request without a body received body bytes")

    def fail(self) -> None:
        raise AssertionError("a request without a body cannot fail mid-body")

    def attach(self, sink: Attempt) -> bool:
        return True

    def detach(self) -> None:
        pass


def _never() -> None:
    raise AssertionError("an empty body never pauses the client")


EMPTY_BODY: Final[RequestBody] = _EmptyBody()
