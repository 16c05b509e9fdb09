"""Operating the proxy: Prometheus metrics, the admin API and its levers, the access log.

Everything goes through real sockets: fault-injecting backends on loopback, the real proxy with
its real admin listener, httpx as the client and as the scraper.
"""

from __future__ import annotations

import asyncio
import json
import platform
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from failover_proxy import __version__
from failover_proxy.config.loading import ConfigError, parse_config
from failover_proxy.ops.accesslog import whole_line_pieces

from .conftest import FileProxy, StartFaultBackends, backend_lines, parse_metrics, sample

StartFileProxy = Callable[[str], Awaitable[FileProxy]]
StartApp = Callable[[web.Application], Awaitable[int]]
TOKEN = "s3cret-token"


async def scrape(proxy: FileProxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"{proxy.admin}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


async def test_metrics_count_requests_attempts_retries_failovers_and_health(
    file_proxy: StartFileProxy,
    fault_backends: StartFaultBackends,
    aiohttp_backend: StartApp,
) -> None:
    aws, gcp = await fault_backends("aws-a", "gcp-a")

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=500, text="bug")

    app = web.Application()
    app.router.add_get("/{tail:.*}", broken)
    solo_port = await aiohttp_backend(app)
    proxy = await file_proxy(
        "listen: {port: 0}\nadmin: {port: 0}\naccess_log: {enabled: false}\n"
        "upstreams:\n  web:\n    backends:\n" + backend_lines([aws, gcp]) +
        "    policy: {strategy: priority, providers: [aws, gcp]}\n"
        "    health_check: {path: /healthz, interval: 100ms, jitter: 0%}\n"
        "  solo:\n    backends:\n"
        f'      - {{name: solo-a, url: "http://127.0.0.1:{solo_port}", provider: onprem}}\n'
        "routes:\n"
        "  - {host: app.test, upstream: web}\n"
        "  - {name: solo, host: solo.test, upstream: solo}\n"
    )
    await aws.set_mode("refusing")  # refused before health checks notice: retried on gcp
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", trust_env=False) as http:
        answers = [await http.get("/x", headers={"Host": "app.test"}) for _ in range(5)]
        unrouted = await http.get("/x", headers={"Host": "elsewhere.test"})
        failed = await http.get("/x", headers={"Host": "solo.test"})
    assert [a.json()["provider"] for a in answers] == ["gcp"] * 5
    assert unrouted.status_code == 404 and failed.status_code == 500
    await asyncio.sleep(0.35)  # a few health-check rounds
    m = await scrape(proxy)

    requests = "failover_proxy_requests_total"
    assert sample(m, requests, route="app.test/", upstream="web", provider="gcp",
                  backend="gcp-a", code_class="2xx") == 5
    assert sample(m, requests, route="", upstream="", provider="", backend="",
                  code_class="4xx") == 1
    assert sample(m, requests, route="solo", upstream="solo", provider="onprem",
                  backend="solo-a", code_class="5xx") == 1
    attempts = "failover_proxy_upstream_attempts_total"
    at_aws, at_gcp = f"127.0.0.1:{aws.port}", f"127.0.0.1:{gcp.port}"
    assert sample(m, attempts, upstream="web", provider="aws", backend="aws-a",
                  endpoint=at_aws, outcome="connect_failure") == 1
    assert sample(m, attempts, upstream="web", provider="gcp", backend="gcp-a",
                  endpoint=at_gcp, outcome="ok") == 5
    assert sample(m, attempts, upstream="solo", provider="onprem", backend="solo-a",
                  endpoint=f"127.0.0.1:{solo_port}", outcome="http_5xx") == 1
    assert sample(m, "failover_proxy_retries_total", upstream="web", reason="connect_failure") == 1
    failovers = "failover_proxy_failovers_total"
    # The one refused connection moved that request to gcp, and took aws out at once (its only
    # backend failed: a provider-wide failure).
    assert sample(m, failovers, upstream="web", from_provider="aws", to_provider="gcp",
                  reason="retry_connect_failure") == 1
    assert sample(m, failovers, upstream="web", from_provider="aws", to_provider="gcp",
                  reason="correlated_failure") == 1
    assert sample(m, "failover_proxy_provider_up", upstream="web", provider="aws") == 0
    assert sample(m, "failover_proxy_provider_up", upstream="web", provider="gcp") == 1
    share = "failover_proxy_provider_traffic_share"
    assert sample(m, share, upstream="web", provider="gcp") == 1.0
    assert sample(m, share, upstream="web", provider="aws") == 0.0
    state = "failover_proxy_backend_state"
    assert sample(m, state, upstream="web", provider="aws", backend="aws-a", endpoint=at_aws,
                  state="unhealthy") == 1
    assert sample(m, state, upstream="web", provider="aws", backend="aws-a", endpoint=at_aws,
                  state="healthy") == 0
    assert sample(m, "failover_proxy_backend_up", upstream="web", provider="aws",
                  backend="aws-a", endpoint=at_aws) == 0
    assert sample(m, "failover_proxy_backend_up", upstream="web", provider="gcp",
                  backend="gcp-a", endpoint=at_gcp) == 1
    checks = "failover_proxy_health_checks_total"
    assert sample(m, checks, upstream="web", backend="aws-a", result="fail") >= 2
    assert sample(m, checks, upstream="web", backend="gcp-a", result="ok") >= 2
    assert sample(m, "failover_proxy_request_duration_seconds_count", upstream="web",
                  provider="gcp") == 5
    assert sample(m, "failover_proxy_request_duration_seconds_bucket", upstream="web",
                  provider="gcp", le="+Inf") == 5
    assert 0 < sample(m, "failover_proxy_request_duration_seconds_sum", upstream="web",
                      provider="gcp") < 5
    assert sample(m, "failover_proxy_active_requests") == 0
    assert sample(m, "failover_proxy_config_generation") == 1
    assert sample(m, "failover_proxy_build_info", version=__version__,
                  python=platform.python_version()) == 1
    assert ("failover_proxy_downstream_connections", frozenset()) in m


async def test_metrics_see_requests_in_progress(
    file_proxy: StartFileProxy, fault_backends: StartFaultBackends
) -> None:
    (slow,) = await fault_backends("aws-a")
    slow.mode, slow.delay = "slow", 0.6
    proxy = await file_proxy(
        "listen: {port: 0}\nadmin: {port: 0}\naccess_log: {enabled: false}\n"
        "upstreams:\n  web:\n    backends:\n" + backend_lines([slow]) +
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        pending = [asyncio.create_task(http.get(f"http://127.0.0.1:{proxy.port}/")) for _ in range(3)]
        await asyncio.sleep(0.3)
        m = await scrape(proxy)
        await asyncio.gather(*pending)
    assert sample(m, "failover_proxy_active_requests") == 3
    assert sample(m, "failover_proxy_downstream_connections") == 3
    assert sample(m, "failover_proxy_backend_requests_in_flight", upstream="web",
                  provider="aws", backend="aws-a", endpoint=f"127.0.0.1:{slow.port}") == 3


async def test_admin_levers_need_the_token_and_move_traffic(
    file_proxy: StartFileProxy, fault_backends: StartFaultBackends
) -> None:
    backends = await fault_backends("aws-a", "aws-b", "azure-a", "gcp-a")
    proxy = await file_proxy(
        f"listen: {{port: 0}}\nadmin: {{port: 0, token: {TOKEN}}}\naccess_log: {{enabled: false}}\n"
        "upstreams:\n  web:\n    backends:\n" + backend_lines(backends) +
        "    policy: {strategy: weighted, provider_weights: {aws: 1, azure: 1, gcp: 1}}\n"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", trust_env=False) as http:

        async def providers_seen(count: int = 30) -> set[str]:
            return {(await http.get("/")).json()["provider"] for _ in range(count)}

        assert (await admin.get("/healthz")).status_code == 200
        ready = await admin.get("/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        # Mutations without the token, or with a wrong one, change nothing.
        refused = await admin.post("/providers/web/aws/force-down")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        wrong = await admin.post("/providers/web/aws/force-down",
                                 headers={"Authorization": "Bearer s3cret-tokem"})
        assert wrong.status_code == 401
        assert await providers_seen() == {"aws", "azure", "gcp"}

        drill = await admin.post("/providers/web/aws/force-down", headers=auth)
        assert drill.status_code == 200 and drill.json()["state"] == "down"
        assert await providers_seen() == {"azure", "gcp"}
        status = (await admin.get("/status")).json()
        aws = status["upstreams"]["web"]["providers"]["aws"]
        assert aws["state"] == "down" and aws["traffic_share"] == 0
        assert "forced down by an operator" in aws["reason"]
        event = status["recent_failovers"][0]
        assert (event["provider"], event["kind"], sorted(event["to"])) == (
            "aws", "failover", ["azure", "gcp"])
        restored = await admin.post("/providers/web/aws/restore", headers=auth)
        assert restored.json()["state"] == "up"
        assert "aws" in await providers_seen()

        drained = await admin.post("/backends/web/azure-a/drain", headers=auth)
        assert drained.json()["state"] == "draining"
        assert "azure" not in await providers_seen()
        m = await scrape(proxy)
        assert sample(m, "failover_proxy_backend_state", upstream="web", provider="azure",
                      backend="azure-a", endpoint=f"127.0.0.1:{backends[2].port}",
                      state="draining") == 1
        # Nothing left anywhere: not ready, with the reason.
        for name in ("aws-a", "aws-b", "gcp-a"):
            await admin.post(f"/backends/web/{name}/drain", headers=auth)
        not_ready = await admin.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.text == "upstream web has no usable backend\n"
        for name in ("aws-a", "aws-b", "azure-a", "gcp-a"):
            await admin.post(f"/backends/web/{name}/undrain", headers=auth)
        assert (await admin.get("/readyz")).status_code == 200
        assert await providers_seen() == {"aws", "azure", "gcp"}

        unknown = await admin.post("/backends/web/nope/drain", headers=auth)
        assert unknown.status_code == 404
        assert unknown.json()["known"] == ["aws-a", "aws-b", "azure-a", "gcp-a"]
        assert (await admin.post("/providers/nope/aws/force-down", headers=auth)).status_code == 404


async def test_status_document_and_route_debugging(
    file_proxy: StartFileProxy, fault_backends: StartFaultBackends
) -> None:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    proxy = await file_proxy(
        "listen: {port: 0}\nadmin: {port: 0}\naccess_log: {enabled: false}\n"
        "upstreams:\n  web:\n    backends:\n" + backend_lines([aws, gcp]) +
        "    policy: {strategy: priority, providers: [aws, gcp]}\n"
        "    health_check: {path: /healthz, interval: 100ms, jitter: 0%}\n"
        "routes:\n  - {host: app.test, path_prefix: /api, upstream: web}\n"
    )
    async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
        await asyncio.sleep(0.15)
        status = (await admin.get("/status")).json()
        assert status["ready"] is True and status["generation"] == 1
        web_status = status["upstreams"]["web"]
        assert list(web_status["providers"]) == ["aws", "gcp"]
        backend = web_status["providers"]["aws"]["backends"]["aws-a"]
        assert backend["state"] == "healthy" and backend["traffic_share"] == 1.0
        assert backend["url"] == f"http://127.0.0.1:{aws.port}"
        assert backend["last_check"]["result"] == "ok: status 200"
        assert backend["last_check"]["at"] > 1.7e9  # a wall-clock time
        assert {"in_flight", "ewma_latency_ms", "weight", "reason"} <= set(backend)

        route = (await admin.get("/debug/route", params={"host": "app.test", "path": "/api/x"})).json()
        assert (route["route"], route["provider"], route["backend"]) == ("app.test/api", "aws", "aws-a")
        assert route["retry"]["next"]["provider"] == "gcp"
        post = (await admin.get("/debug/route",
                                params={"host": "app.test", "path": "/api", "method": "post"})).json()
        assert post["retry"]["on"] == ["connect-failure"]  # a POST is only retried unsent

        await aws.set_mode("5xx")
        await asyncio.sleep(0.5)  # two failed probes: aws is down, priority moves to gcp
        route = (await admin.get("/debug/route", params={"host": "app.test", "path": "/api"})).json()
        assert route["provider"] == "gcp"
        assert route["reason"] == "provider aws down: 0 of 1 backends usable"
        missing = await admin.get("/debug/route", params={"host": "other.test", "path": "/"})
        assert missing.status_code == 404 and missing.json()["route"] is None


async def test_access_log_lines_and_decision_header(
    file_proxy: StartFileProxy,
    fault_backends: StartFaultBackends,
    tmp_path: Path,
) -> None:
    aws, gcp = await fault_backends("aws-a", "gcp-a")
    log_file = tmp_path / "access.log"
    proxy = await file_proxy(
        f"listen: {{port: 0}}\naccess_log: {{path: '{log_file}'}}\ndebug_headers: true\n"
        "upstreams:\n  web:\n    backends:\n" + backend_lines([aws, gcp]) +
        "    policy: {strategy: priority, providers: [aws, gcp]}\n"
        "routes:\n  - {path_prefix: /app, upstream: web}\n"
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", trust_env=False) as http:
        first = await http.post("/app/one?q=1", content=b"12345")
        await aws.set_mode("refusing")
        moved = await http.get("/app/two")
        missing = await http.get("/nowhere")
    assert missing.status_code == 404
    assert first.headers["x-failover-proxy-decision"] == (
        'provider=aws; backend=aws-a; attempts=1; reason=""')
    assert moved.json()["provider"] == "gcp"
    assert moved.headers["x-failover-proxy-decision"] == (
        'provider=gcp; backend=gcp-a; attempts=2; reason="retry on provider gcp after aws"')
    await asyncio.sleep(0.5)  # the sweep hands lines to the writer thread
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["path"] for line in lines] == ["/app/one?q=1", "/app/two", "/nowhere"]
    one, two, nowhere = lines
    assert one["method"] == "POST" and one["status"] == 200 and one["attempts"] == 1
    assert one["bytes_in"] >= 5 + len("/app/one?q=1") and one["bytes_out"] == len(
        first.content) + sum(len(k) + len(v) + 4 for k, v in first.headers.raw) + len(
        b"HTTP/1.1 200 OK\r\n\r\n")
    assert (one["route"], one["upstream"], one["provider"], one["backend"]) == (
        "*/app", "web", "aws", "aws-a")
    assert one["request_id"] == first.headers["x-request-id"]
    assert one["client"] == "127.0.0.1" and one["time"].endswith("Z")
    assert 0 < one["duration_ms"] < 1000
    assert "reason" not in one  # the first choice needs no explaining
    assert (two["provider"], two["attempts"], two["reason"]) == (
        "gcp", 2, "retry on provider gcp after aws")
    assert (nowhere["status"], nowhere["route"], nowhere["upstream"]) == (404, "", "")


async def test_access_log_can_be_turned_off(
    file_proxy: StartFileProxy,
    fault_backends: StartFaultBackends,
    tmp_path: Path,
) -> None:
    (aws,) = await fault_backends("aws-a")
    log_file = tmp_path / "off.log"
    proxy = await file_proxy(
        f"listen: {{port: 0}}\naccess_log: {{enabled: false, path: '{log_file}'}}\n"
        "upstreams:\n  web:\n    backends:\n" + backend_lines([aws]) +
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{proxy.port}/")
    assert response.status_code == 200 and "x-failover-proxy-decision" not in response.headers
    await asyncio.sleep(0.3)
    assert not log_file.exists()


def test_admin_off_loopback_needs_a_token() -> None:
    text = (
        "listen: {port: 8080}\n"
        "admin: {host: 0.0.0.0, port: 9901}\n"
        "upstreams:\n  web:\n    backends:\n"
        "      - {name: a, url: 'http://127.0.0.1:9', provider: aws}\n"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "edge.yaml")
    (issue,) = caught.value.issues
    assert (issue.file, issue.line, issue.field) == ("edge.yaml", 2, "admin.token")
    assert "needs a token" in issue.message
    assert parse_config(text.replace("9901}", "9901, token: t0k3n}")).admin is not None
    assert parse_config(text.replace("0.0.0.0", "127.0.0.2")).admin is not None
    assert parse_config(text.replace("0.0.0.0", "'::1'")).admin is not None


def test_access_log_writes_whole_lines_a_pipe_keeps_together() -> None:
    """Workers share standard output: each write is whole lines of at most PIPE_BUF bytes."""
    batch = b"".join(b'{"n":%05d,"path":"/%s"}\n' % (i, b"x" * 300) for i in range(100))
    pieces = whole_line_pieces(batch)
    assert b"".join(pieces) == batch and len(pieces) > 1
    assert all(len(p) <= 4096 and p.endswith(b"\n") for p in pieces)
    long_line = b"y" * 5000 + b"\n"
    assert whole_line_pieces(long_line + b"z\n") == [long_line, b"z\n"]


async def test_debug_route_only_looks(
    file_proxy: StartFileProxy, fault_backends: StartFaultBackends
) -> None:
    """Asking where a request would go moves no balancer: the answer stays the same however
    often it is asked, and the next real request goes where it said."""
    first, second = await fault_backends("aws-a", "aws-b")
    proxy = await file_proxy(
        "listen: {port: 0}\nadmin: {port: 0}\naccess_log: {enabled: false}\n"
        "upstreams:\n  web:\n    backends:\n" + backend_lines([first, second]) +
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
        answers = {(await admin.get("/debug/route")).json()["backend"] for _ in range(5)}
        assert len(answers) == 1
        async with httpx.AsyncClient(trust_env=False) as http:
            served = (await http.get(f"http://127.0.0.1:{proxy.port}/")).json()["backend"]
        assert served == answers.pop()
        after = (await admin.get("/debug/route")).json()
        assert after["backend"] != served  # the round robin moved on for the real request
        assert after["regions"] == {"aws": {"": "up"}}  # backends that name no region
