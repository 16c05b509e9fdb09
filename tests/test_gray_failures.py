"""Gray failures and light traffic: what a health endpoint does not show, and a correlated
failure seen through few requests.

- A backend whose /healthz answers 200 while its real requests get 503s is ejected by passive
  detection and stays out for its ejection time, however many probes pass meanwhile (a probe
  vouches only for what it tests: connecting and being answered in time). The case where a
  probe does end an ejection (a refusing provider that comes back) is
  test_failover_process.py's test_a_provider_that_returns_is_back_at_full_share_within_the_bound.
- Two backends of a provider that start refusing under a trickle of requests take the provider
  out within about one request per backend, through the real supervisor and its workers (each
  failure a worker reports comes back to it as a new health picture; that must not send the
  next request to the same backend again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import FaultBackend
from failover_proxy.sim.loadgen import KeepAliveLoad, PacedLoad

from .conftest import backend_lines, free_port, parse_metrics, process_config, sample

StartProxy = Callable[[str], Awaitable[ProxyServer]]


async def wait_until(condition: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {limit:g}s"
        await asyncio.sleep(0.01)


async def test_a_gray_failure_stays_ejected_while_its_probes_pass(proxy: StartProxy) -> None:
    backends = [FaultBackend(f"{p}-{s}", p) for p in ("aws", "gcp") for s in "ab"]
    gray = backends[0]
    gray.mode, gray.health_mode = "5xx", "healthy"  # real requests fail, /healthz is fine
    for backend in backends:
        await backend.start()
    server = await proxy(f"""
listen: {{host: 127.0.0.1, port: 0}}
upstreams:
  web:
    backends:
{backend_lines(backends)}
    health_check: {{path: /healthz, interval: 100ms, timeout: 250ms, jitter: 0%}}
    outlier: {{consecutive_failures: 3, base_ejection: 30s}}
    retry: {{attempts: 3}}
routes:
  - {{path_prefix: /, upstream: web}}
""")
    upstream = server.topology.upstreams["web"]
    ejected = next(b for b in upstream.backends if b.name == gray.name)
    load = KeepAliveLoad(server.port, 16)
    running = asyncio.create_task(load.run())
    try:
        await wait_until(lambda: ejected.state == "ejected", 5.0, "aws-a ejected")
        # From here no new request may reach it: only those already sent to it (in flight
        # at the moment of the ejection) may still arrive.
        in_flight, received = ejected.in_flight, len(gray.received)
        probes = len(gray.probed)
        states = set()
        while len(gray.probed) < probes + 5:  # five passing probes, each a chance to let it in
            states.add(ejected.state)
            await asyncio.sleep(0.01)
        states.add(ejected.state)
        reached = len(gray.received) - received
    finally:
        load.stop()
        await running
        for backend in backends:
            await backend.stop()
    assert states == {"ejected"}, states
    assert "probes cannot vouch" in ejected.reason, ejected.reason
    assert reached <= in_flight, f"{reached} requests reached it after its ejection"
    assert not load.errors, [e.detail for e in load.errors[:5]]  # its 503s were retried
    assert load.ok > 100


async def test_a_correlated_failure_under_light_traffic_takes_the_provider_out(
    run_proxy: Any,
) -> None:
    backends = [FaultBackend(f"{p}-{s}", p, region="r1") for p in ("aws", "gcp") for s in "ab"]
    for backend in backends:
        await backend.start()
    workers = 2
    port, admin = free_port(), free_port()
    proxy = await run_proxy(process_config(
        backends, "strategy: priority, providers: [aws, gcp], "
        "correlated_failures: {backends: 2, window: 2s}", port, admin,
        "    health_check: {path: /healthz, interval: 30s, jitter: 0%}\n"
        "    outlier: {consecutive_failures: 50}\n"
        "    retry: {attempts: 3}\n", top=f"workers: {workers}"), port, admin)
    load = PacedLoad(port, 20, clients=2)  # a request every 100 ms from each of two clients
    running = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(1.0)
        fault_wall = time.time()
        for backend in backends[:2]:
            await backend.set_mode("refusing")
        deadline = time.monotonic() + 10
        while (removed := await proxy.removed_at(fault_wall)) is None:
            assert time.monotonic() < deadline, "aws never left rotation"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        metrics = parse_metrics((await proxy.admin.get("/metrics")).text)
    finally:
        load.stop()
        await running
        for backend in backends:
            await backend.stop()
    tried = {b.name: sample(metrics, "failover_proxy_upstream_attempts_total", upstream="web",
                            provider="aws", backend=b.name, endpoint=f"127.0.0.1:{b.port}",
                            outcome="connect_failure")
             for b in backends[:2]}
    took = removed - fault_wall
    print(f"\naws out {took:.3f}s after the fault; refused attempts: {tried}")
    # Each worker tries each aws backend once before the provider is out (two failures of
    # distinct backends within the window): not one backend fifty times.
    assert all(count >= 1 for count in tried.values()), tried
    assert sum(tried.values()) <= 2 * workers + 2, tried
    assert took < 1.5, f"aws out only {took:.3f}s after the fault"
    assert all(a.status == 200 for a in load.answers), [a for a in load.answers
                                                         if a.status != 200][:5]
