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
import contextlib
import socket
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
    or no socket): only then may the socket be written and read directly."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    encrypted = (
        transport.get_extra_info("sslcontext") is not None
        or transport.get_extra_info("ssl_object") is not None
    )
    return -1 if encrypted else sock.fileno()


def write_path(transport: asyncio.Transport) -> tuple[Send, SendParts]:
    """The write and writelines to use for a new connection's transport. Also turns Nagle's
    algorithm off: a response head written before its body must not wait for an ACK."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = plain_socket_fd(transport)
    if DirectWriter is None or fd < 0:
        return transport.write, transport.writelines
    writer = DirectWriter(fd, transport)
    return writer, writer.writelines
