"""Survivors are not drowned: a backend's declared capacity is a live limit.

Two providers of one backend each, 200 req/s of capacity apiece, 300 req/s offered through the
real `failover-proxy run` process by a paced load (an offered rate, whatever the answers). The
first provider takes its capacity and the second the rest; when the first is killed the second
still gets no more than its capacity, and the excess is shed at once with 503 and Retry-After,
counted and shown in /status.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from failover_proxy.sim.faults import FaultBackend
from failover_proxy.sim.loadgen import Answer, PacedLoad

from .conftest import free_port, parse_metrics, process_config, sample

CAPACITY, OFFERED, SECONDS = 200, 300, 4.0


def provider_of(answer: Answer) -> str:
    return str(json.loads(answer.body)["provider"]) if answer.status == 200 else ""


def rates(answers: list[Answer], seconds: float) -> dict[str, float]:
    counts: dict[str, float] = {}
    for answer in answers:
        key = provider_of(answer) or f"status {answer.status}"
        counts[key] = counts.get(key, 0) + 1 / seconds
    return counts


async def test_capacity_spills_to_the_next_provider_and_sheds_the_rest(run_proxy: Any) -> None:
    backends = [FaultBackend("aws-a", "aws"), FaultBackend("gcp-a", "gcp")]
    for backend in backends:
        await backend.start()
    port, admin = free_port(), free_port()
    text = process_config(
        backends, "strategy: priority, providers: [aws, gcp]", port, admin,
        "    health_check: {path: /healthz, interval: 200ms, unhealthy_interval: 100ms,"
        " timeout: 250ms, jitter: 0%}\n",
        backend_extra=f"capacity: {CAPACITY}")
    proxy = await run_proxy(text, port, admin)
    load = PacedLoad(port, OFFERED, clients=32)
    running = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(1.0)  # the clients' connections open, the buckets settle
        start = time.monotonic()
        await asyncio.sleep(SECONDS)
        both = rates(load.between(start, start + SECONDS), SECONDS)

        for backend in backends[:1]:
            await backend.set_mode("refusing")
        deadline = time.monotonic() + 10
        while (await proxy.status())["upstreams"]["web"]["providers"]["aws"]["state"] != "down":
            assert time.monotonic() < deadline, "aws never left rotation"
            await asyncio.sleep(0.05)
        start = time.monotonic()
        await asyncio.sleep(SECONDS)
        alone_answers = load.between(start, start + SECONDS)
        alone = rates(alone_answers, SECONDS)
        status = await proxy.status()
    finally:
        load.stop()
        await running
        for backend in backends:
            await backend.stop()
    print(f"\nboth providers: {both}\naws killed: {alone}")
    # Both up: aws takes its capacity (within 10 %), gcp the rest, nothing fails.
    assert CAPACITY * 0.9 <= both.get("aws", 0) <= CAPACITY * 1.1, both
    assert abs(both.get("aws", 0) + both.get("gcp", 0) - OFFERED) <= OFFERED * 0.1, both
    assert set(both) == {"aws", "gcp"}, both
    # aws gone: gcp gets its capacity and no more, the excess is shed, nothing else fails.
    assert CAPACITY * 0.9 <= alone.get("gcp", 0) <= CAPACITY * 1.1, alone
    assert set(alone) == {"gcp", "status 503"}, alone
    shed = [a for a in alone_answers if a.status == 503]
    assert abs(len(shed) / SECONDS - (OFFERED - CAPACITY)) <= OFFERED * 0.1, alone
    assert all(a.retry_after == "1" and b"shed" in a.body for a in shed), shed[:3]
    # At once: the proxy's own time for each shed request (its access log), not this busy
    # process's view of it.
    entries = [json.loads(line) for line in proxy.access_log.read_text().splitlines()]
    shed_ms = sorted(e["duration_ms"] for e in entries
                     if e["status"] == 503 and "shed" in e.get("reason", ""))
    assert shed_ms, "no shed request in the access log"
    p95 = shed_ms[int(len(shed_ms) * 0.95)]
    print(f"shed: {len(shed_ms)} requests, p95 {p95:.3f} ms, max {shed_ms[-1]:.3f} ms")
    assert p95 < 5.0, shed_ms[-20:]
    upstream = status["upstreams"]["web"]
    assert upstream["requests_shed"] >= len(shed), upstream
    assert upstream["providers"]["gcp"]["backends"]["gcp-a"]["capacity_rps"] == CAPACITY
    metrics = parse_metrics((await proxy.admin.get("/metrics")).text)
    assert sample(metrics, "failover_proxy_requests_shed_total", upstream="web") >= len(shed)
    assert sample(metrics, "failover_proxy_capacity_spills_total", upstream="web",
                  from_provider="aws", to_provider="gcp") >= SECONDS * (OFFERED - CAPACITY) * 0.9
