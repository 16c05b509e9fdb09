"""The HTTP/2 frame engine a connection drives, sans-IO: bytes read go in, one list of events
comes out, and what there is to send is gathered and written once per read.

Two engines behind one interface (`FrameSession`): `_session.c` over the system's libnghttp2,
built where its header is installed (`make` installs Debian's libnghttp2-dev), and
`PureSession` over the pure-Python `h2` library, for FAILOVER_PROXY_PURE=1 and where the C one
is not built. `new_session` picks the C one when it is there. Events are plain tuples
`(kind, stream_id, payload, number)`, their kinds below (`_session.c` says what each carries).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Final, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

HEADERS: Final = 1
DATA: Final = 2
END: Final = 3
RESET: Final = 4
CLOSED: Final = 5
WINDOW: Final = 6
GOAWAY: Final = 7
PONG: Final = 8
INVALID: Final = 9

NO_ERROR: Final = 0
PROTOCOL_ERROR: Final = 1
INTERNAL_ERROR: Final = 2
REFUSED_STREAM: Final = 7
CANCEL: Final = 8
ENHANCE_YOUR_CALM: Final = 11

MAX_CONCURRENT_STREAMS: Final = 3
INITIAL_WINDOW_SIZE: Final = 4
MAX_FRAME_SIZE: Final = 5
MAX_HEADER_LIST_SIZE: Final = 6
ENABLE_PUSH: Final = 2

NO_LIMIT: Final = 0x7FFFFFFF
NO_LIMIT_ENTRY: Final = MAX_CONCURRENT_STREAMS.to_bytes(2, "big") + NO_LIMIT.to_bytes(4, "big")

Event = tuple[int, int, object, int]
Fields = list[tuple[bytes, bytes]]


class FrameSession(Protocol):
    """One connection's HTTP/2 frames (see the module docstring)."""

    control_frames: int
    window_updates: int

    @property
    def data_frames_sent(self) -> int: ...
    @property
    def want_read(self) -> bool: ...
    @property
    def last_stream_id(self) -> int: ...
    @property
    def remote_max_streams(self) -> int: ...
    @property
    def next_stream_id(self) -> int: ...
    def receive(self, data: bytes, /) -> list[Event]: ...
    def events(self) -> list[Event]: ...
    def send_headers(self, stream_id: int, fields: Fields, end: bool, /) -> None: ...
    def submit_request(self, fields: Fields, end: bool, /) -> int: ...
    def send_data(self, stream_id: int, data: bytes, /) -> int: ...
    def send_response(self, stream_id: int, fields: Fields, data: bytes, end: bool, /
                      ) -> int: ...
    def end_stream(self, stream_id: int, trailers: Fields | None = None, /) -> None: ...
    def reset(self, stream_id: int, code: int, /) -> None: ...
    def consume(self, stream_id: int, size: int, /) -> None: ...
    def goaway(self, code: int, debug: bytes = b"", last_stream_id: int = -1, /) -> None: ...
    def ping(self) -> None: ...
    def data_to_send(self) -> bytes: ...
    def window(self, stream_id: int, /) -> int: ...


class NotAgreed(ConnectionRefusedError):
    """A backend that did not pick h2 by ALPN (RFC 9113 §3.2). (Defined here, where nothing
    is compiled: mypyc cannot subclass a built-in exception.)"""


class PureProtocolError(Exception):
    """The peer broke HTTP/2 (args: why, and whether it was a flood); the GOAWAY saying so is
    gathered to send."""


try:
    if os.environ.get("FAILOVER_PROXY_PURE") == "1":
        raise ImportError("FAILOVER_PROXY_PURE=1")
    from . import _session
except ImportError:
    _session = None  # type: ignore[assignment]

NATIVE: Final = _session is not None
"""The libnghttp2 engine is built and in use."""
ProtocolError: Final[type[Exception]] = (
    _session.ProtocolError if _session is not None else PureProtocolError
)


GoAwayHandler = Callable[[GoAwayFrame], tuple[list[object], list[object]]]


def _graceful_goaway(closing: GoAwayHandler) -> GoAwayHandler:
    """`h2`'s handling of a received GOAWAY, except for a graceful one (NO_ERROR): that is
    reported, and the connection carries on for the streams below its last id."""
    def received(frame: GoAwayFrame) -> tuple[list[object], list[object]]:
        if frame.error_code != NO_ERROR:
            return closing(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]
    return received


class PureSession:
    """The `h2` library behind the engine interface: its events translated to the tuples the
    C engine gives, its frames sent only as far as the windows allow. A frame for a stream
    that is closed (or whose our side has ended) is dropped silently, as libnghttp2 drops it:
    the peer may close a stream at any moment."""

    def __init__(self, server: bool, settings: list[tuple[int, int]],
                 connection_window: int = 65535, max_header_list: int = 65536) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            # Fields are checked by the connection (a malformed request is a stream error,
            # RST_STREAM, not the end of the connection: RFC 9113 §8.1.1).
            client_side=not server, header_encoding=None, validate_inbound_headers=False,
        ))
        wanted = dict(settings)
        wanted.setdefault(MAX_HEADER_LIST_SIZE, max_header_list)
        self.max_streams = wanted.get(MAX_CONCURRENT_STREAMS, 0) if server else 0
        """The limit the client is told and held to here; 0: none."""
        if self.max_streams:
            # As in _session.c: `h2` makes a stream past an acknowledged limit a connection
            # error, RFC 9113 §5.1.2 a stream error. It is told of no limit, the client of ours.
            wanted[MAX_CONCURRENT_STREAMS] = NO_LIMIT
        connection = self.h2
        connection.local_settings = h2.settings.Settings(client=not server, initial_values={
            h2.settings.SettingCodes(code): value for code, value in wanted.items()})
        connection.decoder.max_header_list_size = wanted[MAX_HEADER_LIST_SIZE]
        connection.max_inbound_frame_size = connection.local_settings.max_frame_size
        connection.initiate_connection()
        # A graceful GOAWAY (NO_ERROR) lets the streams below its last id finish, as
        # libnghttp2 lets them: `h2` would take the connection for closed at once, fail every
        # frame after it and drop what it had to send.
        dispatch = connection._frame_dispatch_table
        dispatch[GoAwayFrame] = _graceful_goaway(dispatch[GoAwayFrame])
        self.preamble = self.h2.data_to_send()
        if self.max_streams:
            at = self.preamble.find(NO_LIMIT_ENTRY)
            self.preamble = (self.preamble[:at] + MAX_CONCURRENT_STREAMS.to_bytes(2, "big")
                             + self.max_streams.to_bytes(4, "big")
                             + self.preamble[at + len(NO_LIMIT_ENTRY):])
        if connection_window > 65535:
            self.h2.increment_flow_control_window(connection_window - 65535)
        self.control_frames = 0
        self.window_updates = 0
        self.data_frames_sent = 0
        self.settings_received = False
        self.goaway_last = -1
        """The last stream a graceful GOAWAY of ours said we would answer (-1: none sent)."""
        self.unsent = b""

    @property
    def want_read(self) -> bool:
        return self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED

    @property
    def last_stream_id(self) -> int:
        return int(self.h2.highest_inbound_stream_id)

    @property
    def remote_max_streams(self) -> int:
        limit = int(self.h2.remote_settings.max_concurrent_streams)
        # (before the peer's SETTINGS, 100 as libnghttp2 assumes: RFC 9113 §6.5.2's least)
        return limit if self.settings_received else min(limit, 100)

    @property
    def next_stream_id(self) -> int:
        try:
            return int(self.h2.get_next_available_stream_id())
        except h2.exceptions.NoAvailableStreamIDError:
            return 1 << 31

    def receive(self, data: bytes) -> list[Event]:
        try:
            received = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            flood = isinstance(exc, h2.exceptions.DenialOfServiceError)
            if self.want_read:  # (a bad preface: h2 raised before it could say so)
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.close_connection(error_code=int(exc.error_code))
            raise PureProtocolError(str(exc) or type(exc).__name__, flood) from None
        events: list[Event] = []
        refused: set[int] = set()
        # Streams open before each request (those this batch opens counted as they come).
        opened = self.h2.open_inbound_streams - sum(
            isinstance(event, h2.events.RequestReceived) for event in received)
        for event in received:
            if isinstance(event, h2.events.DataReceived):
                if not event.data and event.stream_ended is None:
                    self.control_frames += 1
                events.append((DATA, event.stream_id or 0, event.data or b"",
                               event.flow_controlled_length or 0))
            elif isinstance(event, h2.events.RequestReceived) and self.max_streams and (
                    opened := opened + 1) > self.max_streams:
                opened -= 1
                self.control_frames += 1  # refused, as _session.c refuses it
                self.h2.reset_stream(event.stream_id, REFUSED_STREAM)
                refused.add(event.stream_id)
            elif (isinstance(event, h2.events.RequestReceived)
                  and 0 <= self.goaway_last < (event.stream_id or 0)):
                self.h2.reset_stream(event.stream_id, REFUSED_STREAM)  # (after our GOAWAY)
                refused.add(event.stream_id)
            elif getattr(event, "stream_id", None) in refused:
                continue
            elif isinstance(event, (h2.events.RequestReceived, h2.events.ResponseReceived,
                                    h2.events.InformationalResponseReceived,
                                    h2.events.TrailersReceived)):
                fields = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
                ended = getattr(event, "stream_ended", None) is not None
                events.append((HEADERS, event.stream_id or 0, fields, int(ended)))
            elif isinstance(event, h2.events.StreamEnded):
                events.append((END, event.stream_id or 0, None, 0))
            elif isinstance(event, h2.events.WindowUpdated):
                self.window_updates += 1
                events.append((WINDOW, event.stream_id or 0, None, 0))
            elif isinstance(event, h2.events.StreamReset):
                kind = RESET if event.remote_reset else CLOSED
                events.append((kind, event.stream_id or 0, None, int(event.error_code or 0)))
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.control_frames += 1
                self.settings_received = True
                events.append((WINDOW, 0, None, 0))
            elif isinstance(event, h2.events.PingAckReceived):
                events.append((PONG, 0, None, 0))
            elif isinstance(event, h2.events.ConnectionTerminated):
                events.append((GOAWAY, event.last_stream_id or 0, event.additional_data or b"",
                               int(event.error_code or 0)))
            elif isinstance(event, (h2.events.PingReceived, h2.events.SettingsAcknowledged,
                                    h2.events.PriorityUpdated, h2.events.UnknownFrameReceived)):
                self.control_frames += 1
        return events

    def events(self) -> list[Event]:
        return []

    def send_headers(self, stream_id: int, fields: Fields, end: bool) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.send_headers(stream_id, fields, end_stream=end)

    def submit_request(self, fields: Fields, end: bool) -> int:
        try:
            stream_id = int(self.h2.get_next_available_stream_id())
        except h2.exceptions.NoAvailableStreamIDError as exc:
            raise PureProtocolError("no stream id left", False) from exc
        self.h2.send_headers(stream_id, fields, end_stream=end)
        return stream_id

    def send_data(self, stream_id: int, data: bytes) -> int:
        connection = self.h2
        taken = 0
        try:
            while taken < len(data):
                room = min(connection.local_flow_control_window(stream_id),
                           connection.max_outbound_frame_size, len(data) - taken)
                if room <= 0:
                    break
                connection.send_data(stream_id, data[taken : taken + room])
                self.data_frames_sent += 1
                taken += room
        except h2.exceptions.ProtocolError:
            return len(data)  # (a stream closed, or ended on our side: as the C engine, a no-op)
        return taken

    def send_response(self, stream_id: int, fields: Fields, data: bytes, end: bool) -> int:
        self.send_headers(stream_id, fields, end and not data)
        taken = self.send_data(stream_id, data) if data else 0
        if end and data and taken == len(data):
            self.end_stream(stream_id)
        return taken

    def end_stream(self, stream_id: int, trailers: Fields | None = None) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            if trailers:
                self.h2.send_headers(stream_id, trailers, end_stream=True)
            else:
                self.h2.end_stream(stream_id)

    def reset(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)

    def consume(self, stream_id: int, size: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.acknowledge_received_data(size, stream_id)

    def goaway(self, code: int, debug: bytes = b"", last_stream_id: int = -1) -> None:
        last = self.h2.highest_inbound_stream_id if last_stream_id < 0 else last_stream_id
        if code != NO_ERROR:
            self.h2.close_connection(error_code=code, additional_data=debug or None,
                                     last_stream_id=last)
            return
        # A graceful GOAWAY: `h2` would end the whole connection with it, so the frame is
        # made here; the streams up to `last` carry on, later ones are refused.
        self.goaway_last = last
        self.unsent += GoAwayFrame(0, last_stream_id=last, error_code=code,
                                   additional_data=debug).serialize()

    def ping(self) -> None:
        self.h2.ping(b"\0" * 8)

    def data_to_send(self) -> bytes:
        preamble, self.preamble = self.preamble, b""
        unsent, self.unsent = self.unsent, b""
        return preamble + bytes(self.h2.data_to_send()) + unsent

    def window(self, stream_id: int) -> int:
        if stream_id:
            return max(0, int(self.h2.local_flow_control_window(stream_id)))
        return max(0, int(self.h2.outbound_flow_control_window))


def new_session(server: bool, settings: list[tuple[int, int]], connection_window: int,
                max_header_list: int) -> FrameSession:
    """An engine for one connection: libnghttp2's where built, else `h2`'s."""
    if _session is not None:
        return _session.Session(server, settings, connection_window, max_header_list)
    return PureSession(server, settings, connection_window, max_header_list)
