"""Byte tunnels for upgraded connections (WebSocket and other `101 Switching Protocols`).

After the backend agrees to switch protocols, HTTP is over on both connections: bytes pass
through untouched in both directions, each side's full write buffer pauses the other side's
reads, and when either side closes, the other is closed after its pending bytes are flushed.
"""

from __future__ import annotations

import asyncio

from .readpath import Reading, detach_io
from .writepath import Send


class Tunnel:
    """Joins a client transport and a backend transport until either closes. Bytes are written
    with each connection's own send (writepath.write_path), as everything else it wrote was,
    and reading is paused through each connection's own reading (readpath.read_path)."""

    __slots__ = (
        "active",
        "backend",
        "backend_reading",
        "client",
        "client_reading",
        "closed",
        "idle_since",
        "to_backend",
        "to_client",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        to_client: Send,
        to_backend: Send,
        client_reading: Reading,
        backend_reading: Reading,
    ) -> None:
        self.client = client
        self.backend = backend
        self.to_client = to_client
        self.to_backend = to_backend
        self.client_reading = client_reading
        self.backend_reading = backend_reading
        self.closed = False
        self.active = True
        """Bytes passed since the last sweep (a flag: cheaper than a clock per chunk)."""
        self.idle_since = 0.0

    def from_client(self, data: bytes) -> None:
        if not self.closed:
            self.active = True
            self.to_backend(data)

    def from_backend(self, data: bytes) -> None:
        if not self.closed:
            self.active = True
            self.to_client(data)

    def check_idle(self, now: float, limit: float) -> None:
        """The sweep: close a tunnel no byte has crossed for `limit` seconds (0: no limit)."""
        if self.active:
            self.active = False
            self.idle_since = now
        elif limit and now - self.idle_since >= limit:
            self.close()

    def client_write_paused(self, paused: bool) -> None:
        """The client reads slowly: stop reading from the backend until it catches up."""
        _set_reading(self.backend, self.backend_reading, not paused)

    def backend_write_paused(self, paused: bool) -> None:
        _set_reading(self.client, self.client_reading, not paused)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        detach_io(self.client_reading, self.to_client)
        detach_io(self.backend_reading, self.to_backend)
        self.client.close()
        self.backend.close()


def _set_reading(transport: asyncio.Transport, reading: Reading, on: bool) -> None:
    if transport.is_closing():
        return
    if on and not reading.is_reading():
        reading.resume()
    elif not on and reading.is_reading():
        reading.pause()
