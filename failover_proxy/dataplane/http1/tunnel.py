"""Byte tunnels for upgraded connections (WebSocket and other `101 Switching Protocols`).

After the backend agrees to switch protocols, HTTP is over on both connections: bytes pass
through untouched in both directions, each side's full write buffer pauses the other side's
reads, and when either side closes, the other is closed after its pending bytes are flushed.
"""

from __future__ import annotations

from ..io.connio import ConnectionIO
from ..io.writepath import Send


class Tunnel:
    """Joins a client connection and a backend connection until either closes. Bytes are
    written with each connection's own send, as everything else it wrote was, reading is paused
    through each connection's own reading, and each is ended through its own ConnectionIO."""

    __slots__ = (
        "active",
        "backend",
        "client",
        "closed",
        "idle_since",
        "to_backend",
        "to_client",
    )

    def __init__(self, client: ConnectionIO, backend: ConnectionIO) -> None:
        self.client = client
        self.backend = backend
        self.to_client: Send = client.send
        self.to_backend: Send = backend.send
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
        _set_reading(self.backend, not paused)

    def backend_write_paused(self, paused: bool) -> None:
        _set_reading(self.client, not paused)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self.backend.close()


def _set_reading(io: ConnectionIO, on: bool) -> None:
    if io.transport.is_closing():
        return
    reading = io.reading
    if on and not reading.is_reading():
        reading.resume()
    elif not on and reading.is_reading():
        reading.pause()
