"""How a data-plane connection reads: in batches from one epoll set per event loop (Reader and
ReadLoop, from _reads.c), or through the transport.

uvloop hands each read to Python through two libuv callbacks, each taking the GIL back and
dropping it again: about 1,700 CPU instructions per read, and a small proxied request reads
twice. A ReadLoop is registered with the event loop once (add_reader on its epoll descriptor)
and, whenever any of its sockets is ready, reads all of them under one GIL acquisition, calling
each connection's data_received as uvloop would.

A connection's reading is an object with take_over, pause, resume, is_reading and detach:
protocols pause and resume through it (never through the transport, which no longer reads once
a Reader took over). Taking over costs two epoll_ctl calls per connection, so a protocol takes
over only once a connection is kept alive for more requests. TLS connections, and builds
without the C extension (FAILOVER_PROXY_PURE=1), read through the transport (TransportReading).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Protocol

from .writepath import plain_socket_fd

try:
    from ._reads import Reader, ReadLoop
except ImportError:  # a plain-Python build
    Reader = ReadLoop = None  # type: ignore[assignment, misc]


class Reading(Protocol):
    """One connection's reading, as its protocol steers it."""

    def take_over(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def is_reading(self) -> bool: ...
    def detach(self) -> None:
        """Stop reading for good: called by the connection's ConnectionIO before it closes or
        aborts the transport, and in connection_lost (see connio.py and _reads.c)."""


class TransportReading:
    """Reading done by the transport itself."""

    __slots__ = ("transport",)

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def take_over(self) -> None:
        """Nothing to take over: the transport reads."""

    def pause(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def detach(self) -> None:
        """Nothing to release."""


class NotReading:
    """A connection's reading before its transport exists."""

    __slots__ = ()

    def take_over(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def is_reading(self) -> bool:
        return False

    def detach(self) -> None:
        pass


NOT_READING = NotReading()

_read_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReadLoop] = (
    weakref.WeakKeyDictionary()
)


def read_loop(loop: asyncio.AbstractEventLoop) -> ReadLoop:
    """The event loop's ReadLoop, registered with it on first use (it lives as long as the
    loop: the registration holds it, and closing the loop's selector drops it)."""
    reads = _read_loops.get(loop)
    if reads is None:
        reads = ReadLoop()
        loop.add_reader(reads.fileno(), reads.ready)
        _read_loops[loop] = reads
    return reads


def read_path(
    transport: asyncio.Transport,
    data_received: Callable[[bytes], None],
    eof_received: Callable[[], bool | None],
    failed: Callable[[BaseException], None],
    fd: int | None = None,
) -> Reading:
    """The reading of a connection whose protocol's connection_made was just called.

    The transport reads until the protocol calls take_over(), which it does once the connection
    is kept alive after an exchange (never inside connection_made: uvloop starts the transport
    reading after that returns). A connection that serves one request and closes costs no
    epoll registration, and its one read goes the way it always did.

    Once a Reader took over, the end of the stream calls the protocol's `eof_received` (the
    transport is then closed unless it returned true, as uvloop does), and a failed read or an
    exception from a callback calls `failed` with the exception (see ConnectionIO.fail). `fd` is
    the transport's writepath.plain_socket_fd when the caller has it already."""
    if fd is None:
        fd = plain_socket_fd(transport)
    if Reader is None or fd < 0:
        return TransportReading(transport)
    loop = asyncio.get_running_loop()
    return Reader(read_loop(loop), fd, transport, data_received, eof_received, failed)
