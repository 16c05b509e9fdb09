"""Active health checks: one probe loop per backend, off the request path.

HTTP probes use one shared aiohttp session (the control plane's client), or httpx for the
backends of an upstream that speaks HTTP/2 (`protocol: h2c | h2 | auto`: checked in the
protocol its requests use); TCP probes only connect. Probes start at once, repeat every
`interval` (every `unhealthy_interval` while the backend is down, so it comes back sooner),
with jitter so that many proxies do not probe in lockstep. `unhealthy_threshold` failures in
a row mark a backend unhealthy, `healthy_threshold` passes bring it back.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import random
import socket
import ssl
import time

import aiohttp
import httpx

from ..config.schema import HealthCheckConfig
from .backends import Backend
from .loops import TaskLoops
from .topology import Upstream


class _ProbeTarget:
    """What one probe loop checks; a reload that keeps the backend repoints its upstream."""

    def __init__(self, upstream: Upstream, backend: Backend, config: HealthCheckConfig) -> None:
        self.upstream = upstream
        self.backend = backend
        self.config = config


class HealthChecker:
    """Probes every backend of the upstreams that configure a health check.

    One loop per backend. A config reload hands the checker the new topology: loops of backends
    that carry on unchanged (same backend, same check) keep running, with their pass/fail
    streaks; the others stop, and new backends start being probed at once.
    """

    def __init__(self) -> None:
        self._loops: TaskLoops[tuple[str, str], _ProbeTarget] = TaskLoops()
        self._session: aiohttp.ClientSession | None = None

    def update(self, upstreams: list[Upstream]) -> None:
        """Probe exactly the backends of `upstreams` (the current config generation)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(force_close=True, limit=0)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        wanted: set[tuple[str, str]] = set()
        for upstream in upstreams:
            config = upstream.config.health_check
            if config is None:
                continue
            for backend in upstream.backends:
                if not backend.endpoint:
                    continue  # a hostname DNS has given no address: nothing to probe
                key = (upstream.name, backend.name)
                wanted.add(key)
                running = self._loops.target(key)
                if running is not None and running.backend is backend and running.config == config:
                    running.upstream = upstream
                    continue
                target = _ProbeTarget(upstream, backend, config)
                self._loops.start(key, target, self._probe_forever(target))
        self._loops.keep_only(wanted)

    async def stop(self) -> None:
        await self._loops.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _probe_forever(self, target: _ProbeTarget) -> None:
        backend, config = target.backend, target.config
        loop = asyncio.get_running_loop()
        while True:
            ok, detail = await self.probe(target.upstream, backend, config)
            upstream = target.upstream
            result = "ok" if ok else "fail"
            upstream.store.inc("health_checks", (upstream.name, backend.name, result))
            upstream.health.probe_result(backend, ok, detail, config, loop.time(), time.time())
            interval = config.interval if backend.healthy else config.unhealthy_interval
            await asyncio.sleep(interval * (1 + random.uniform(-config.jitter, config.jitter)))

    async def probe(
        self, upstream: Upstream, backend: Backend, config: HealthCheckConfig
    ) -> tuple[bool, str]:
        """One probe: (passed, what was seen)."""
        try:
            if config.type == "tcp":
                await _connect(backend.host, backend.port, config.timeout)
                return True, "connected"
            async with asyncio.timeout(config.timeout):
                if upstream.config.protocol in ("h2c", "h2", "auto"):
                    status, body = await self._http2_fetch(upstream, backend, config)
                else:
                    status, body = await self._http_fetch(upstream, backend, config)
        except TimeoutError:
            return False, f"no answer within {config.timeout:g}s"
        except (OSError, aiohttp.ClientError, httpx.HTTPError) as exc:
            return False, str(exc) or type(exc).__name__
        if not any(low <= status <= high for low, high in config.expect_status):
            return False, f"status {status}"
        if config.expect_body is not None and config.expect_body.encode() not in body:
            return False, f"status {status}, body lacks {config.expect_body!r}"
        return True, f"status {status}"

    async def _http_fetch(
        self, upstream: Upstream, backend: Backend, config: HealthCheckConfig
    ) -> tuple[int, bytes]:
        """The check's request over HTTP/1.1: its status, and its body when one is expected."""
        assert self._session is not None
        url, headers = _request_of(backend, config)
        ssl_context = upstream.ssl_context if backend.scheme == "https" else None
        async with self._session.request(
            config.method, url, headers=headers, ssl=ssl_context or True, allow_redirects=False,
            server_hostname=backend.dial.server_hostname,  # an address dialled, a name checked
        ) as response:
            body = await response.read() if config.expect_body is not None else b""
            return response.status, body

    async def _http2_fetch(
        self, upstream: Upstream, backend: Backend, config: HealthCheckConfig
    ) -> tuple[int, bytes]:
        """The same over HTTP/2 (prior knowledge for h2c, ALPN over TLS for h2), on a
        connection of its own, as the HTTP/1 probes use."""
        url, headers = _request_of(backend, config)
        https = backend.scheme == "https"
        # A context made once: given none (or False, for h2c), httpx makes one per client,
        # 15 to 40 ms of CPU, five times a second per backend.
        verify = (upstream.ssl_context if https else None) or _default_tls()
        extensions = {"sni_hostname": backend.dial.server_hostname} if https else {}
        auto = upstream.config.protocol == "auto"  # (HTTP/1.1 where ALPN says so)
        async with httpx.AsyncClient(http1=auto, http2=True, verify=verify, trust_env=False,
                                     timeout=None, follow_redirects=False) as client:
            response = await client.request(config.method, url, headers=headers,
                                            extensions=extensions)
        return response.status_code, response.content


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """The system's trust store and TLS defaults, for backends with no `tls` of their own (and
    unused, but wanted by httpx, for h2c)."""
    return ssl.create_default_context()


def _request_of(backend: Backend, config: HealthCheckConfig) -> tuple[str, dict[str, str]]:
    """The URL and header fields of a backend's check, whatever the protocol."""
    url = f"{backend.address}{backend.base_path.decode()}{config.path}"
    return url, {"Host": backend.host_header.decode(), **config.headers}


async def _connect(host: str, port: int, timeout: float) -> None:  # noqa: ASYNC109 (cost)
    """Open a TCP connection and close it. For an address, a bare non-blocking socket watched
    for writability: none of a stream's transport, protocol, reader and writer, built and torn
    down for a connection closed at once, which counts with thousands of backends."""
    family = _family(host)
    if family is None:
        async with asyncio.timeout(timeout):  # a name: resolved first
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        return
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    fd = sock.fileno()
    done: asyncio.Future[int] = loop.create_future()
    timer = None
    try:
        error = sock.connect_ex((host, port))
        if error == errno.EINPROGRESS:
            loop.add_writer(fd, _connected, sock, done)
            # A timer of its own rather than asyncio.timeout: it only has to end one future.
            timer = loop.call_later(timeout, _too_late, done)
            error = await done
        if error:
            raise OSError(error, os.strerror(error))
    finally:
        if timer is not None:
            timer.cancel()
            loop.remove_writer(fd)
        sock.close()


def _connected(sock: socket.socket, done: asyncio.Future[int]) -> None:
    if not done.done():
        done.set_result(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))


def _too_late(done: asyncio.Future[int]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


@functools.lru_cache(maxsize=65536)
def _family(host: str) -> socket.AddressFamily | None:
    """The address family of an IP address, None for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET
