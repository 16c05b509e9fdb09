"""A client request as the exchange sees it (protocol-neutral), and its body, streaming to
whichever upstream attempt holds it.

A `Request` names what every protocol has (method, authority, target, path, request id, body,
upgrade) and keeps its header fields in one form: runs of `name: value` lines, CRLF-ended, as
an HTTP/1 client sent them. For HTTP/1 to HTTP/1 that is a passthrough that costs nothing: the
runs are forwarded as they came. Another codec writes its fields in that form, or reads them
from it (`header`, `header_values`), and the attributes marked HTTP/1 are that codec's own.

The body is not buffered whole: chunks go straight to the attempt that owns it. Only while no
attempt is attached (connecting, or queued behind a pipelined request) are chunks held, and the
client is paused once that backlog passes a high-water mark. Up to `replay_limit` bytes are also
kept so that a request can be sent again when a reused keep-alive connection proves dead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

# Backlog held for an attempt that is not attached yet, before the client is paused.
PENDING_HIGH_WATER: Final = 256 * 1024
DEFAULT_REPLAY_BYTES: Final = 1024 * 1024
"""Replay buffer until the route is known (then the upstream's retry.replay_max_bytes)."""


class BodySink:
    """Where a request body goes: the attempt sending it (a native base class, not a Protocol:
    compiled, write_body per chunk is then a vtable call, not a generic method lookup)."""

    def write_body(self, chunk: bytes) -> None:
        raise NotImplementedError

    def end_body(self) -> None:
        raise NotImplementedError

    def abort_body(self) -> None:
        """The client broke the body: the attempt ends."""
        raise NotImplementedError


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
        self.sink: BodySink | None = None
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

    def attach(self, sink: BodySink) -> bool:
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


_SPACE: Final = ord(" ")
_TAB: Final = ord("\t")


def field_value_at(line: bytes, colon: int) -> bytes:
    """A field line's value without the optional whitespace around it."""
    start = colon + 1
    stop = len(line)
    while start < stop and (line[start] == _SPACE or line[start] == _TAB):
        start += 1
    while stop > start and (line[stop - 1] == _SPACE or line[stop - 1] == _TAB):
        stop -= 1
    return line[start:stop]


def field_values(runs: list[bytes], lname: bytes) -> list[bytes]:
    """Every value of a field, in order, by lower-case name (`runs`: field lines as they came,
    one or several per item; off the hot path)."""
    values = []
    for run in runs:
        for line in run.split(b"\r\n"):
            colon = line.find(b":")
            if colon > 0 and line[:colon].lower() == lname:
                values.append(field_value_at(line, colon))
    return values


class Request:
    """One parsed request head plus its body stream; what the exchange works from."""

    # Defaults live on the class: parsing sets only what a request actually carries.
    method = b""
    target = b""
    """The request target as the backend is sent it (origin form, or `*`)."""
    path = b"/"
    """The target's path, which routes match."""
    raw_host: bytes | None = None
    """The authority the client named (Host, or an absolute target's)."""
    keep_alive = True
    """The client's connection may carry another request after this one."""
    upgrade: bytes | None = None
    """The protocol the client asks to switch to (an upgrade request)."""
    chunked = False
    """The body's length is not known in advance (HTTP/1: chunked)."""
    content_length: int | None = None
    expect_continue = False
    """The client waits for a 100 Continue before sending its body."""
    close_connection = False
    """The client's connection ends after this response."""
    te_trailers = False
    """The client accepts trailer fields in the response (`TE: trailers`)."""
    trailers: list[bytes] | None = None
    """The body's trailer fields as `name: value` lines, once the body is complete."""
    # HTTP/1 only: how the head was written, what the codec reads and rewrites.
    http10 = False
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
        """Header fields forwarded as they came: runs of whole `name: value` lines."""
        self.fields_block: bytes | None = None
        """HTTP/1: `fields` joined, less what Connection names (made once, for the first
        attempt)."""

    def header(self, lname: bytes) -> bytes | None:
        """A header's first value by lower-case name (Host included; off the hot path)."""
        if lname == b"host":
            return self.raw_host
        values = field_values(self.fields, lname)
        return values[0] if values else None

    def header_values(self, lname: bytes) -> list[bytes]:
        """Every value of a forwarded header, in order, by lower-case name (off the hot path)."""
        return field_values(self.fields, lname)


class _EmptyBody(RequestBody):
    """The body of a request that has none: shared, stateless, nothing to send or replay."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0, _never, _never, complete=True)

    def feed(self, chunk: bytes) -> None:
        raise AssertionError("a request without a body received body bytes")

    def fail(self) -> None:
        raise AssertionError("a request without a body cannot fail mid-body")

    def attach(self, sink: BodySink) -> bool:
        return True

    def detach(self) -> None:
        pass


def _never() -> None:
    raise AssertionError("an empty body never pauses the client")


EMPTY_BODY: Final[RequestBody] = _EmptyBody()
