"""The protocol codecs of the data plane, by name: what serves clients, and what an upstream's
`protocol` setting connects to its backends with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from ..model.connector import Connector, Dial
from .http1.downstream import protocol_factory
from .http1.upstream import Http1Connector
from .http2.upstream import AutoConnector, Http2Connector
from .plane import DataPlane

CONNECTORS: Final[dict[str, Callable[[Dial], Connector]]] = {
    "http1": Http1Connector, "h2c": Http2Connector, "h2": Http2Connector,
    "auto": AutoConnector,
}
"""An upstream's `protocol` → the connector class of its backends."""


def connector_for(protocol: str, dial: Dial) -> Connector:
    """The connector of a backend (topology.build_topology's `connectors`)."""
    return CONNECTORS[protocol](dial)


def client_protocol(plane: DataPlane) -> Callable[[], asyncio.Protocol]:
    """What a listener makes for each accepted client connection (HTTP/1.1 for now)."""
    return protocol_factory(plane)
