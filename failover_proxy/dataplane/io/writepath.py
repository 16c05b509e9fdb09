"""How a data-plane connection writes: straight to its socket while the transport holds nothing
unsent (DirectWriter, from _direct.c), otherwise through the transport.

A proxied request makes two writes (the request to the backend, the response to the client),
and uvloop's transport.write spends about 900 CPU instructions around each write(2): nearly a
tenth of a small request. The DirectWriter makes the same system call for a fraction of that and
hands whatever the socket does not take at once to the transport, whose buffering, flow control
and error handling then apply as before. It cannot see what other code writes to the transport,
so every write of a connection must go through the pair `write_path` returns.

TLS connections, and builds without the C extension (FAILOVER_PROXY_PURE=1), write through
the transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

try:
    from ._direct import DirectWriter
except ImportError:  # a plain-Python build
    DirectWriter = None  # type: ignore[assignment, misc]

Send = Callable[[bytes], None]
SendParts = Callable[[Iterable[bytes]], None]


def not_connected(_: object) -> None:
    """A connection's send before its transport exists."""
    raise ConnectionError("not connected")


def plain_socket_fd(transport: asyncio.Transport) -> int:
    """The descriptor of a transport's socket when the transport is plain TCP, else -1 (TLS,
    whose transports carry an `sslcontext` in uvloop and asyncio alike, or no socket): only then
    may the socket be written and read directly. Asked once per connection (each lookup costs
    about half a microsecond), for write_path and readpath.read_path both.

    Nagle's algorithm is already off: uvloop's and asyncio's TCP transports set TCP_NODELAY
    themselves (tests/test_direct_writes.py checks it), so a response head written before its
    body never waits for an ACK."""
    if transport.get_extra_info("sslcontext") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    return -1 if sock is None else int(sock.fileno())


def stop_direct_writes(send: Send) -> None:
    """From now on the connection writes through its transport only (connio.ConnectionIO calls
    it before the transport is closed or aborted, and in connection_lost: uvloop may close the
    socket once that returns, and its number may then be another connection's)."""
    if DirectWriter is not None and isinstance(send, DirectWriter):
        send.detach()


def write_path(transport: asyncio.Transport, fd: int | None = None) -> tuple[Send, SendParts]:
    """The write and writelines to use for a new connection's transport; `fd` is its
    plain_socket_fd when the caller has it already."""
    if fd is None:
        fd = plain_socket_fd(transport)
    if DirectWriter is None or fd < 0:
        return transport.write, transport.writelines
    writer = DirectWriter(fd, transport)
    return writer, writer.writelines
