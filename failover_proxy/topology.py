"""Runtime objects built from the config: backends, upstreams and their connection pools.

The config models are frozen descriptions; these objects carry what changes while the proxy runs
(pools, counters, balancer position) and what the hot path needs precomputed (encoded host
headers, base paths, TLS contexts).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .balance import SmoothWeightedRoundRobin
from .config import BackendConfig, ProxyConfig, UpstreamConfig
from .dataplane.upstream import UpstreamPool
from .routing import Route, Router


@dataclass(eq=False)
class Backend:
    """One origin: where it is, which provider and region it belongs to, and its pool."""

    name: str
    provider: str
    region: str
    weight: int
    scheme: str
    host: str
    port: int
    base_path: bytes
    host_header: bytes
    pool: UpstreamPool
    in_flight: int = 0

    @property
    def address(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(eq=False)
class Upstream:
    """A named pool of backends spread over providers, with its balancing and timeouts."""

    name: str
    config: UpstreamConfig
    backends: list[Backend]
    balancer: SmoothWeightedRoundRobin[Backend] = field(init=False)

    def __post_init__(self) -> None:
        self.balancer = SmoothWeightedRoundRobin(self.backends, [b.weight for b in self.backends])

    def close(self) -> None:
        for backend in self.backends:
            backend.pool.close()


def tls_context(config: UpstreamConfig) -> ssl.SSLContext:
    """Client TLS context for HTTPS backends: verification on unless the operator turns it off."""
    context = ssl.create_default_context(cafile=config.tls.ca_file)
    if not config.tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def build_backend(backend: BackendConfig, upstream: UpstreamConfig) -> Backend:
    parts = urlsplit(backend.url)
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    default_port = 443 if scheme == "https" else 80
    host_for_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_for_header = f"{host_for_header}:{port}"
    ssl_context = tls_context(upstream) if scheme == "https" else None
    server_name = upstream.tls.server_name or host
    pool = UpstreamPool(
        host=host,
        port=port,
        ssl_context=ssl_context,
        server_hostname=server_name if ssl_context else None,
        connect_timeout=upstream.timeouts.connect,
        max_idle=upstream.pool.max_idle_per_backend,
        idle_timeout=upstream.pool.idle_timeout,
    )
    return Backend(
        name=backend.name,
        provider=backend.provider,
        region=backend.region,
        weight=backend.weight,
        scheme=scheme,
        host=host,
        port=port,
        base_path=parts.path.rstrip("/").encode(),
        host_header=host_for_header.encode("idna" if host_for_header.isascii() else "utf-8"),
        pool=pool,
    )


@dataclass(eq=False)
class Topology:
    """Everything one config generation routes to."""

    upstreams: dict[str, Upstream]
    router: Router[Upstream]

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()


def build_topology(config: ProxyConfig) -> Topology:
    upstreams = {
        name: Upstream(
            name=name,
            config=upstream,
            backends=[build_backend(backend, upstream) for backend in upstream.backends],
        )
        for name, upstream in config.upstreams.items()
    }
    router = Router(
        [Route(r.host, r.path_prefix, upstreams[r.upstream]) for r in config.routes]
    )
    return Topology(upstreams=upstreams, router=router)
