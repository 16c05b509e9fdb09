"""The one owner of a data-plane connection's I/O: its reads, its writes, and how it ends.

A connection reads in batches from an epoll set (readpath) and writes straight to its socket
(writepath) while the transport holds nothing unsent. Neither asks the transport, on every
read and write, whether it is closing (a Python call each): they must be detached before the
transport is closed or aborted, and when the connection is lost, after which uvloop closes
the socket and its number may become another connection's. One missed detach would read from
or write to a stranger's socket.

So only this object ends a connection, and it always detaches first: protocols and tunnels
call `close`, `abort` or `fail` here and never the transport's own (tests/test_direct_writes.py
checks that no other data-plane module does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .readpath import Reading, read_path
from .writepath import Send, SendParts, plain_socket_fd, stop_direct_writes, write_path


class ConnectionIO:
    """A connection's reading, its send pair, and the only way to end its transport."""

    __slots__ = ("reading", "send", "send_parts", "transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        data_received: Callable[[bytes], None],
        eof_received: Callable[[], bool | None],
        failed: Callable[[BaseException], None],
    ) -> None:
        """Made in the protocol's connection_made (the transport's socket is asked for once)."""
        self.transport = transport
        fd = plain_socket_fd(transport)
        self.send: Send
        self.send_parts: SendParts
        self.send, self.send_parts = write_path(transport, fd)
        self.reading: Reading = read_path(transport, data_received, eof_received, failed, fd)

    def detach(self) -> None:
        """Stop reading and writing directly, for good (then the transport does both, and its
        own rules for a closing connection apply). Idempotent; called by everything below and
        by the protocol's connection_lost."""
        self.reading.detach()
        stop_direct_writes(self.send)

    def close(self) -> None:
        """Close after what is written has gone out."""
        self.detach()
        self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is unsent."""
        self.detach()
        self.transport.abort()

    def write_eof(self) -> None:
        """End our side (a lingering close): what follows is written by the transport."""
        stop_direct_writes(self.send)
        self.transport.write_eof()

    def fail(self, protocol: object, exc: BaseException) -> None:
        """End a connection whose read failed or whose callback raised, as uvloop does: a read
        error (a reset) quietly, an exception from our own code logged, then aborted (its
        connection_lost follows, with None: the protocol keeps the error itself)."""
        if not isinstance(exc, OSError):
            asyncio.get_running_loop().call_exception_handler({
                "message": "Fatal error: protocol.data_received() call failed.",
                "exception": exc,
                "transport": self.transport,
                "protocol": protocol,
            })
        self.abort()
