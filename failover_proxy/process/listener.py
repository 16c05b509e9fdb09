"""The client listener of one process, and the gate `limits.max_connections` closes.

At the limit, this process stops accepting: the kernel keeps queueing new connections in the
listening socket's backlog (and other workers, sharing the socket, go on accepting them), and
this process starts accepting again as soon as it holds fewer. Nothing is accepted only to be
closed, and the admin listener, a separate socket, stays reachable. An asyncio server cannot
pause, so the listening sockets are kept open here and a server is made over a duplicate of
them whenever accepting resumes (closing a server closes only its duplicate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger("failover_proxy")


class ClientListener:
    """Listening sockets kept open for the life of the process, served while accepting."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 factory: Callable[[], asyncio.Protocol], backlog: int,
                 tls: ssl.SSLContext | None = None, handshake_timeout: float | None = None
                 ) -> None:
        self._loop = loop
        self._factory = factory
        self._backlog = backlog
        self._tls = tls
        self._handshake_timeout = handshake_timeout if tls is not None else None
        self._kept: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        self._wanted = False
        """Whether this process should accept now (it may still be reopening)."""
        self._closed = False
        self.pauses = 0
        """Times the limit stopped accepting (for logs and tests)."""

    async def open(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or on a socket handed over (a worker's share of the
        supervisor's), which is then kept by this listener."""
        self._wanted = True
        if sock is None:
            server = await self._loop.create_server(
                self._factory, host, port, backlog=self._backlog, reuse_address=True,
                ssl=self._tls, ssl_handshake_timeout=self._handshake_timeout)
            self._kept = [_duplicate(s.fileno()) for s in server.sockets]
            self._servers = [server]
        else:
            self._kept = [sock]
            await self._serve()

    @property
    def sockets(self) -> list[socket.socket]:
        return self._kept

    @property
    def accepting(self) -> bool:
        return self._wanted

    def pause(self) -> None:
        """Stop accepting (connections already accepted are not touched)."""
        if not self._wanted:
            return
        self._wanted = False
        self.pauses += 1
        for server in self._servers:
            server.close()
        self._servers = []

    def resume(self) -> None:
        """Accept again (at the next turn of the loop)."""
        if self._wanted or self._closed:
            return
        self._wanted = True
        self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        servers = []
        for kept in self._kept:
            servers.append(await self._loop.create_server(
                self._factory, sock=_duplicate(kept.fileno()), backlog=self._backlog,
                ssl=self._tls, ssl_handshake_timeout=self._handshake_timeout))
        if not self._wanted or self._closed:  # paused (or closed) again meanwhile
            for server in servers:
                server.close()
            return
        self._servers = servers

    def close(self) -> None:
        """Stop accepting for good and let go of the listening sockets."""
        self._closed = True
        self.pause()
        for kept in self._kept:
            kept.close()


def _duplicate(fd: int) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))
