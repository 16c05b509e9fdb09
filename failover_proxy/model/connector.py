"""What a backend is dialled with: where and how (`Dial`), and the connector that holds its
connections.

The model owns a backend's connector (it is built with the backend, kept across a reload when
nothing about its connections changed, swept and closed with it), but knows no protocol: the
data plane's codecs subclass `Connector` (dataplane/streams.py `UpstreamConnector`, which hands
out upstream streams), and whoever builds a topology for a data plane passes the factory that
makes them. A topology no data plane sends through (the supervisor's, a unit test's) gets
`Connector` itself, which holds no connections.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable


class Dial:
    """Where and how one backend endpoint is reached."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        authority: bytes,
        connect_timeout: float,
        max_idle: int,
        idle_timeout: float,
        stream_window: int = 65535,
        connection_window: int = 65535,
        ping_interval: float = 0.0,
        ping_timeout: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        """The name TLS asks for and checks, whatever address is dialled."""
        self.authority = authority
        """What a request names as its host when the backend's own name is sent (Host or
        :authority): the URL's host, or an SRV target, with a port other than the default."""
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.stream_window = stream_window
        """HTTP/2: how much of a response one stream may send before the proxy passes it on."""
        self.connection_window = connection_window
        self.ping_interval = ping_interval
        """HTTP/2: PING a connection silent this long (0: never)."""
        self.ping_timeout = ping_timeout


class Connector:
    """Holds the connections to one backend endpoint (a codec's subclass makes them)."""

    def __init__(self, dial: Dial) -> None:
        self.dial = dial
        self.open_connections = 0
        """Connections open to the backend now (a supervisor's connectors hold the sum its
        workers report)."""
        self.reported_streams = 0
        """Requests in progress on its connections, as the workers report them (supervisor)."""
        self.closed = False

    def active_streams(self) -> int:
        """Requests in progress on the backend's connections now (HTTP/1: busy connections;
        HTTP/2: open streams)."""
        return self.reported_streams

    def sweep(self, now: float) -> None:
        """Close what has been idle too long (the data plane's sweep)."""

    def close(self) -> None:
        """Close idle connections now and busy ones when their request ends; none are made
        after this."""
        self.closed = True


ConnectorFactory = Callable[[str, Dial], Connector]
"""Makes the connector of a backend from its upstream's `protocol` and its `Dial`."""


def unconnected(protocol: str, dial: Dial) -> Connector:
    """The factory of a topology no data plane sends through: connectors that hold nothing."""
    return Connector(dial)
