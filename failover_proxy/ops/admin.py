"""The admin listener (aiohttp): status, metrics, probes for load balancers, and the operator's
levers (drain a backend, force a provider down for a drill, reload the config).

Reads are open to whoever reaches the listener; every mutation needs `Authorization: Bearer
<token>` when a token is configured (compared in constant time), and is logged with who asked.
The config refuses an admin listener off loopback without a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from ..config.schema import IDEMPOTENT_METHODS
from ..model.counters import MetricStore
from .history import TrafficHistory
from .metrics import ProcessGauges, exposition

if TYPE_CHECKING:
    from ..config.reload import ReloadResult
    from ..config.schema import ProxyConfig
    from ..model.backends import Backend, Provider, Region
    from ..model.topology import Topology, Upstream

log = logging.getLogger("failover_proxy.admin")

_STATIC = resources.files("failover_proxy") / "static"
_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


class AdminTarget(Protocol):
    """What the admin API reads and steers: one proxy process, or the supervisor of workers
    (whose topology is the one health picture all workers act on)."""

    config: ProxyConfig
    store: MetricStore
    draining: bool

    @property
    def topology(self) -> Topology: ...

    def readiness(self) -> tuple[bool, str]: ...

    async def reload(self, source: str = "request") -> ReloadResult: ...

    async def live_stats(self) -> tuple[MetricStore, ProcessGauges]:
        """Every count so far and the live gauges (also brought up to date on the topology's
        backends: in-flight requests, latency)."""
        ...

    def worker_status(self) -> list[dict[str, int]]:
        """The processes serving traffic as of the last live_stats: pid, connections, requests."""
        ...


class AdminServer:
    """The admin API of a proxy."""

    def __init__(self, proxy: AdminTarget) -> None:
        self.proxy = proxy
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        admin = proxy.config.admin
        self.history = TrafficHistory(admin.history_interval if admin is not None else 10.0)
        self._sampler: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application(middlewares=[self._authorize])
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        app.router.add_get("/status/history", self._history)
        app.router.add_get("/debug/route", self._debug_route)
        app.router.add_post("/backends/{upstream}/{backend}/{action:drain|undrain}", self._drain)
        app.router.add_post(
            "/providers/{upstream}/{provider}/regions/{region}/{action:force-down|restore}",
            self._force,
        )
        app.router.add_post(
            "/providers/{upstream}/{provider}/{action:force-down|restore}", self._force
        )
        app.router.add_post("/reload", self._reload)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await self._site.start()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_history())
        log.info("admin listening on %s:%d", host, self.port)

    @property
    def port(self) -> int:
        assert self._runner is not None
        port: int = self._runner.addresses[0][1]
        return port

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- access ----------------------------------------------------------------------------------

    @web.middleware
    async def _authorize(
        self, request: web.Request, handler: Any
    ) -> web.StreamResponse:
        if request.method == "POST":
            admin = self.proxy.config.admin
            token = admin.token if admin is not None else ""
            if token:
                given = request.headers.get("Authorization", "")
                expected = f"Bearer {token}"
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    log.warning("refused %s %s from %s: bad or missing token",
                                request.method, request.path, request.remote)
                    return web.json_response(
                        {"error": "this needs Authorization: Bearer <admin token>"},
                        status=401, headers={"WWW-Authenticate": "Bearer"},
                    )
            log.warning("admin: %s %s from %s", request.method, request.path, request.remote)
        response: web.StreamResponse = await handler(request)
        return response

    # -- reads -----------------------------------------------------------------------------------

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="alive\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, reason = self.proxy.readiness()
        return web.Response(text=reason + "\n", status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        store, gauges = await self.proxy.live_stats()
        body = exposition(store, self.proxy.topology, gauges)
        return web.Response(body=body, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _status(self, _: web.Request) -> web.Response:
        store, _gauges = await self.proxy.live_stats()
        return web.json_response(status_document(self.proxy, store))

    async def _history(self, _: web.Request) -> web.Response:
        return web.json_response(self.history.as_dict(list(self.proxy.topology.upstreams)))

    async def _sample_history(self) -> None:
        """A point of the status page's charts every interval (the counts of every worker)."""
        while True:
            try:
                store, _ = await self.proxy.live_stats()
                self.history.sample(store, time.time())
            except Exception:  # a sample missed is a gap in a chart, never a stopped admin
                log.exception("status history: sample failed")
            await asyncio.sleep(self.history.interval)

    async def _debug_route(self, request: web.Request) -> web.Response:
        """What the policy would do now for a request. It only looks: no balancer moves on,
        so asking changes nothing about where real requests go."""
        host = request.query.get("host", "")
        path = request.query.get("path", "/")
        method = request.query.get("method", "GET").upper()
        route = self.proxy.topology.router.match_request(host.encode(), path.encode())
        if route is None:
            return web.json_response(
                {"host": host, "path": path, "method": method, "route": None,
                 "decision": "404: no route for this host and path"}, status=404,
            )
        upstream = route.target.upstream
        backend, reason = upstream.choose([], [], peek=True)
        answer: dict[str, Any] = {
            "host": host, "path": path, "method": method, "route": route.target.label,
            "upstream": upstream.name, "panic": upstream.panic,
            "traffic_shares": upstream.policy.shares(),
            "regions": {
                name: {r.region: r.state for r in provider.regions}
                for name, provider in upstream.providers.items()
            },
        }
        if backend is None:
            answer |= {"decision": "503: nothing usable", "reason": reason}
            return web.json_response(answer)
        fallback, fallback_reason = upstream.choose([backend], [backend.tier], peek=True)
        retry = upstream.config.retry
        answer |= {
            "decision": "forward",
            "provider": backend.provider,
            "region": backend.region,
            "backend": backend.name,
            "reason": reason or upstream.policy.why_not_preferred() or "first choice of the policy",
            "retry": {
                "attempts": retry.attempts,
                "on": retry.on if method.encode() in IDEMPOTENT_METHODS else ["connect-failure"],
                "next": None if fallback is None or fallback is backend else {
                    "provider": fallback.provider, "region": fallback.region,
                    "backend": fallback.name,
                    "reason": fallback_reason,
                },
            },
        }
        return web.json_response(answer)

    async def _page(self, _: web.Request) -> web.Response:
        return web.Response(
            body=(_STATIC / "index.html").read_bytes(), content_type="text/html", charset="utf-8"
        )

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        suffix = name[name.rfind("."):] if "." in name else ""
        item = _STATIC / name
        if "/" in name or suffix not in _STATIC_TYPES or not item.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=item.read_bytes(), content_type=_STATIC_TYPES[suffix])

    # -- levers ----------------------------------------------------------------------------------

    async def _drain(self, request: web.Request) -> web.Response:
        upstream = self._upstream(request)
        name = request.match_info["backend"]
        # A configured backend's name drains all its endpoints; `name@address:port` one.
        chosen = [b for b in upstream.backends if b.name == name or b.origin == name]
        if not chosen:
            raise _not_found(f"upstream {upstream.name} has no backend {name!r}",
                             [b.name for b in upstream.backends])
        draining = request.match_info["action"] == "drain"
        for backend in chosen:
            upstream.health.drain(backend, draining, asyncio.get_running_loop().time())
        if len(chosen) == 1:
            return web.json_response(backend_status(chosen[0], upstream))
        return web.json_response({b.name: backend_status(b, upstream) for b in chosen})

    async def _force(self, request: web.Request) -> web.Response:
        upstream = self._upstream(request)
        name = request.match_info["provider"]
        provider = upstream.providers.get(name)
        if provider is None:
            raise _not_found(f"upstream {upstream.name} has no provider {name!r}",
                             list(upstream.providers))
        down = request.match_info["action"] == "force-down"
        region_name = request.match_info.get("region")
        if region_name is not None:
            region = next((r for r in provider.regions if r.region == region_name), None)
            if region is None:
                raise _not_found(f"provider {name} of upstream {upstream.name} has no region "
                                 f"{region_name!r}", [r.region for r in provider.regions])
            upstream.health.force(region, down, asyncio.get_running_loop().time())
            return web.json_response(region_status(region, upstream.backend_shares())
                                     | {"name": region.name})
        upstream.health.force(provider, down, asyncio.get_running_loop().time())
        return web.json_response(
            provider_status(provider, upstream, upstream.provider_shares(),
                            upstream.backend_shares()) | {"name": name}
        )

    async def _reload(self, _: web.Request) -> web.Response:
        result = await self.proxy.reload("admin API")
        body = {"ok": result.ok, "generation": result.generation, "errors": result.errors,
                "warnings": result.warnings}
        return web.json_response(body, status=200 if result.ok else 400)

    def _upstream(self, request: web.Request) -> Upstream:
        name = request.match_info["upstream"]
        upstream = self.proxy.topology.upstreams.get(name)
        if upstream is None:
            raise _not_found(f"no upstream {name!r}", list(self.proxy.topology.upstreams))
        return upstream


def _not_found(message: str, known: list[str]) -> web.HTTPNotFound:
    return web.HTTPNotFound(
        text=web.json_response({"error": message, "known": known}).text,
        content_type="application/json",
    )


# -- the status document ---------------------------------------------------------------------------


def status_document(proxy: AdminTarget, store: MetricStore) -> dict[str, Any]:
    """Every upstream -> providers -> backends, with state, reason, shares and latency
    (`store`: the counts of every process)."""
    ready, reason = proxy.readiness()
    upstreams = {}
    for upstream in proxy.topology.upstreams.values():
        shares = upstream.provider_shares()
        backend_shares = upstream.backend_shares()
        order = list(dict.fromkeys(t.provider for t in upstream.tiers))
        upstreams[upstream.name] = {
            "strategy": upstream.config.policy.strategy,
            "order": [t.name for t in upstream.tiers],
            "local_region": upstream.config.policy.local_region,
            "panic": upstream.panic,
            "active_requests": upstream.active_requests,
            "requests_shed": int(store.counters["requests_shed"].get((upstream.name,), 0)),
            "providers": {
                name: provider_status(upstream.providers[name], upstream, shares, backend_shares)
                for name in order
            },
            "dns": {origin: dns_status(upstream, origin) for origin in upstream.discovered},
        }
    admin = proxy.config.admin
    return {
        "generation": proxy.store.config_generation,
        "token_required": bool(admin is not None and admin.token),
        "ready": ready,
        "ready_reason": reason,
        "draining": proxy.draining,
        "upstreams": upstreams,
        "workers": proxy.worker_status(),
        "recent_failovers": [event.as_dict() for event in reversed(proxy.store.events)],
    }


def provider_status(
    provider: Provider, upstream: Upstream, shares: dict[str, float],
    backend_shares: dict[str, float],
) -> dict[str, Any]:
    return {
        "state": provider.state,
        "reason": provider.reason,
        "forced_down": provider.forced_down,
        "traffic_share": round(shares.get(provider.name, 0.0), 4),
        "weight": provider.weight,
        "regions": {
            region.region: region_status(region, backend_shares) for region in provider.regions
        },
        "backends": {
            backend.name: backend_status(backend, upstream)
            | {"traffic_share": round(backend_shares.get(backend.name, 0.0), 4)}
            for backend in provider.backends
        },
    }


def region_status(region: Region, backend_shares: dict[str, float]) -> dict[str, Any]:
    return {
        "state": region.state,
        "usable": region.usable,
        "reason": region.reason,
        "forced_down": region.forced_down,
        "traffic_share": round(sum(backend_shares.get(b.name, 0.0) for b in region.backends), 4),
        "backends": [b.name for b in region.backends],
    }


def dns_status(upstream: Upstream, origin: str) -> dict[str, Any]:
    """What DNS last said of a backend's hostname, and the endpoints it has from it."""
    status = upstream.dns_status.get(origin)
    addresses = upstream.discovered.get(origin)
    return {
        "url": upstream.backend_configs[origin].url,
        "discovery": upstream.backend_configs[origin].discovery,
        "endpoints": [a.label for a in addresses] if addresses else [],
        "result": status.result if status else "pending",
        "detail": status.detail if status else "",
        "ttl_s": status.ttl if status else None,
        "failures_in_a_row": status.failures if status else 0,
        "answered_at": status.at if status else None,
    }


def backend_status(backend: Backend, upstream: Upstream) -> dict[str, Any]:
    return {
        "backend": backend.origin,
        "endpoint": backend.endpoint or None,
        "state": backend.state,
        "usable": backend.usable,
        "reason": backend.reason,
        "url": f"{backend.address}{backend.base_path.decode()}",
        "region": backend.region,
        "weight": backend.weight,
        "capacity_rps": upstream.backend_configs[backend.origin].capacity,
        "in_flight": backend.in_flight,
        "connections": backend.connector.open_connections,
        "streams": backend.connector.active_streams(),
        "ewma_latency_ms": round(backend.ewma_latency * 1000, 3),
        "last_check": {"result": backend.last_check, "at": backend.last_check_at or None}
        if upstream.config.health_check is not None
        else None,
        "ejected_until_in_s": round(max(0.0, backend.ejected_until - _loop_time()), 3)
        if backend.ejected_until
        else None,
    }


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
