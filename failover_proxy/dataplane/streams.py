"""The seam between the exchange and the protocol codecs: streams, heads and connectors.

The exchange (exchange.py) knows no protocol. It answers a client through a `DownstreamStream`
and sends to a backend on an `UpstreamStream` it acquires from the backend's
`UpstreamConnector`; the stream hands the backend's answer back as events on the attempt that
owns it (`StreamOwner`). A codec (dataplane/http1/) subclasses these: an HTTP/1 connection is
its own one stream at a time, an HTTP/2 connection carries many.

They are native base classes, not `typing.Protocol`s: compiled, a call through one of them is
a vtable call, where a protocol's would be a generic attribute lookup per event. The methods
here only raise: every codec implements all of them.
"""

from __future__ import annotations

import asyncio

from ..model.connector import Connector
from .plane import ClientConnection, DataPlane
from .request import BodySink, Request


class ResponseHead:
    """A backend's response head as the exchange sees it: its status and how long its body
    is. A codec's subclass keeps the fields in its own form (HTTP/1: the raw lines, forwarded
    untouched) and writes them for its client."""

    # Defaults live on the class: a response sets only what it carries.
    status = 0
    length = -1
    """The body's declared length in bytes; -1 when unknown until it ends (chunked, or
    delimited by the end of the connection or stream)."""


class StreamOwner(BodySink):
    """What an upstream stream reports to: the attempt that sent on it (exchange.Attempt).

    Events, in order: `on_head` once (informational heads are not reported), `on_body` per
    piece, then `on_complete` (with trailers or none), or `on_upgrade` after a 101 head; or,
    at any point, `on_lost` / `on_bad_response` (or, before any head, `on_unprocessed`),
    after which nothing more comes. The request
    body reaches the stream through the owner as well (it is the body's sink)."""

    head_only = False
    """The request was HEAD: its response has no body whatever its head says."""

    def on_head(self, status: int, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_body(self, chunk: bytes) -> None:
        raise NotImplementedError

    def on_complete(self, trailers: list[bytes] | None) -> None:
        """The response ended; `trailers`: its trailer fields as `name: value` lines."""
        raise NotImplementedError

    def on_upgrade(self, leftover: bytes) -> None:
        """The backend switched protocols; `leftover`: what it sent after its head."""
        raise NotImplementedError

    def on_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def on_bad_response(self, reason: str) -> None:
        raise NotImplementedError

    def on_unprocessed(self, reason: str) -> None:
        """The backend did not process the request at all (HTTP/2: it refused the stream, or
        went away below it): it may be sent again whatever its method."""
        raise NotImplementedError

    def on_write_paused(self, paused: bool) -> None:
        """The backend takes the request body slowly (or has caught up again)."""
        raise NotImplementedError


class UpstreamStream:
    """One request and its response on a backend connection, from the exchange's side."""

    owner: StreamOwner | None = None
    closed = False
    bytes_received = 0
    """Bytes received since the current owner took the stream (0: the backend is mute)."""

    def send_head(
        self, owner: StreamOwner, request: Request, backend_path: bytes,
        authority: bytes | None, client: DownstreamStream,
    ) -> None:
        """Become `owner`'s and send the request head: to `backend_path` (the backend's base
        path and the request's target), naming `authority` as its host (None: the backend's
        own), with the forwarding fields of `client`'s connection."""
        raise NotImplementedError

    def send_body(self, chunk: bytes) -> None:
        raise NotImplementedError

    def end_body(self, trailers: list[bytes] | None) -> None:
        """The request body is complete (with trailer fields as `name: value` lines, or none)."""
        raise NotImplementedError

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) taking the response: the client takes it slowly."""
        raise NotImplementedError

    def release(self, now: float) -> None:
        """The exchange is done with it after a complete response: keep the connection for the
        next request if it can carry one, else close it."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class UpstreamConnector(Connector):
    """A backend's connector as the exchange uses it: streams ready now, or made."""

    def idle_stream(self, now: float) -> UpstreamStream | None:
        """A stream on a connection already open (the most recently used), or None."""
        raise NotImplementedError

    reported_failure: BaseException | None = None

    async def open_stream(self) -> UpstreamStream:
        """A stream on a new connection; raises TimeoutError after the connect timeout,
        OSError when refused. Requests may share one connect (HTTP/2): each then gets the
        same exception."""
        raise NotImplementedError

    def first_report(self, failure: BaseException) -> bool:
        """Whether `failure` of a connect is reported for the first time. The requests that
        waited on one connect all fail with it, but the backend failed once: counted once,
        a burst of requests onto a backend cannot turn one slow connect into an ejection."""
        if failure is self.reported_failure:
            return False
        self.reported_failure = failure
        return True


class DownstreamStream(ClientConnection):
    """Where the exchange answers one client request (an HTTP/1 connection is its own stream:
    hence the base class).

    A response goes out as `send_head` (which may carry the whole body, held until then so a
    backend failing mid-body can still be retried unseen), then `send_body` pieces and
    `send_end`; or as `send_error`; or it is cut short with `reset`. Every `send_` returns
    the bytes it wrote."""

    protocol = "http1"
    """The client's protocol as the access log names it (`http1`, `h2`)."""
    client_ip = b"unknown"
    scheme = b"http"
    forwarding = b""
    """The forwarding fields of this client's requests, as an upstream codec writes them
    (made once per client connection by that codec, when first needed)."""
    write_paused = False
    """The client is not taking what is written (its buffer is full)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.loop: asyncio.AbstractEventLoop = plane.loop

    def send_continue(self, request: Request) -> None:
        """Tell a client that waits before sending its body (100-continue) to send it."""
        raise NotImplementedError

    def send_head(
        self, request: Request, status: int, head: ResponseHead, decision: str | None,
        body: bytes | None, more: list[bytes] | None, end: bool,
    ) -> int:
        """The response head, with the body held so far (`body`, then `more`); `end`: that
        was all of it. `decision`: the X-Failover-Proxy-Decision value (debug_headers)."""
        raise NotImplementedError

    def send_body(self, chunk: bytes) -> int:
        raise NotImplementedError

    def send_end(self, trailers: list[bytes] | None) -> int:
        """The response body is complete; `trailers` as the backend sent them (None: none)."""
        raise NotImplementedError

    def send_error(
        self, request: Request, status: int, detail: str, retry_after: bool,
        decision: str | None,
    ) -> int:
        """The proxy's own answer (502, 503, 504) with a short plain reason."""
        raise NotImplementedError

    def reset(self) -> None:
        """The response cannot be completed: end it so the client sees it was cut short."""
        raise NotImplementedError

    def start_tunnel(
        self, request: Request, head: ResponseHead, upstream: UpstreamStream, leftover: bytes
    ) -> int:
        """The backend switched protocols (`head`, a 101): from now on bytes flow untouched
        between the client and `upstream`'s connection."""
        raise NotImplementedError

    def set_paused_by_upstream(self, paused: bool) -> None:
        """Stop (or resume) reading the client: the backend takes its body slowly."""
        raise NotImplementedError

    def body_stalled(self) -> None:
        """The client has not sent the rest of its body within `body_timeout`: refuse it."""
        raise NotImplementedError

    def exchange_done(self, exchange: object) -> None:
        """The exchange (exchange.Exchange) ended: answered, failed, or cut short."""
        raise NotImplementedError
