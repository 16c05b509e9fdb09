"""Every fault mode under heavy keep-alive load, through the real `failover-proxy run` process.

Three providers of two backends each (fault-injecting servers in this process), a supervisor and
its worker in their own processes, and 16, 64 or 256 keep-alive clients on raw sockets. For each
fault mode in turn, under the `priority` (aws first) and `weighted` policies: aws breaks while
the clients keep sending; no client may see an error; aws must be out of rotation within the
mode's bound and stop receiving traffic; then aws is mended and must be back at its full share
within the recovery bound before the next mode starts.

"Stop receiving traffic" is judged by what happened, not by the clock: the worker logs the
version of the supervisor's health picture with which aws left (and re-entered) rotation in it,
its access log names the picture each request was routed by, and aws's backends record the
request ids they received. No request routed by a picture with aws out may reach aws. (Requests
routed just before still arrive after the decision, as late as a busy machine delays them.)
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from failover_proxy.sim.faults import FaultBackend
from failover_proxy.sim.loadgen import Http2Load, KeepAliveLoad

from .conftest import RunningProxy, free_port, process_config

MODES = ("refusing", "blackhole", "slow", "5xx", "reset_after_headers", "reset_mid_body",
         "flapping")
REMOVAL_BOUND = {  # seconds from the fault until aws is out of rotation
    "refusing": 0.5, "5xx": 0.5, "reset_after_headers": 0.5, "reset_mid_body": 0.5,
    "flapping": 0.5,
    "blackhole": 1.2, "slow": 1.2,  # the first failures wait out the 400 ms per-try timeout
}
FAULT_SECONDS = 1.0
INTERVAL, HEALTHY_THRESHOLD, HOLD_DOWN, SLOW_START = 0.2, 2, 0.5, 0.0
MAX_HOLD = 2.0
"""outlier.max_ejection: a provider that fails again soon after it came back is held down
twice as long each time (flap damping), up to this; modes follow each other within seconds."""
RECOVERY_BOUND = HEALTHY_THRESHOLD * INTERVAL + MAX_HOLD + SLOW_START + 1.0


MATRIX_SETTINGS = f"""
    timeouts: {{connect: 250ms, read: 5s}}
    health_check: {{path: /healthz, interval: {INTERVAL}s, unhealthy_interval: 100ms,
                   timeout: 250ms, healthy_threshold: {HEALTHY_THRESHOLD},
                   unhealthy_threshold: 2, jitter: 0%}}
    outlier: {{consecutive_failures: 3, base_ejection: 1s, max_ejection: {MAX_HOLD}s}}
    retry: {{attempts: 3, per_try_timeout: 400ms}}
"""
MATRIX_POLICY = (f"correlated_failures: {{backends: 2, window: 1s}}, hold_down: {HOLD_DOWN}s, "
                 f"slow_start: {SLOW_START}s")


MOVED = re.compile(r"worker (\d+): health view (\d+) (?:in service|unchanged)[^:]*: (.*)$",
                   re.MULTILINE)
AWS_MOVE = re.compile(r"web provider aws: (\w+) -> (\w+)")


def aws_out_views(log: str) -> list[tuple[int, int]]:
    """The ranges of health-picture versions [first, end) by which the worker routed with aws
    out of rotation, from its own lines saying when aws left (a snapshot, version V: every
    request routed by V or later knew) and came back (a snapshot, or its own clock ending a
    hold-down while V was in service: requests routed by V may have known, so V ends the
    range). One worker: the versions are the supervisor's, the moments its own."""
    moves = [(int(version), after) for pid, version, changes in MOVED.findall(log)
             for _, after in AWS_MOVE.findall(changes)]
    assert len({pid for pid, _, _ in MOVED.findall(log)}) <= 1, "one worker expected"
    ranges: list[tuple[int, int]] = []
    out_since: int | None = None
    for version, after in moves:
        if after == "down" and out_since is None:
            out_since = version
        elif after != "down" and out_since is not None:
            ranges.append((out_since, version))
            out_since = None
    if out_since is not None:
        ranges.append((out_since, 1 << 62))
    return ranges


def routed_by(access_log: Path) -> dict[str, int]:
    """Request id -> the health picture its backend was chosen by (the worker's access log)."""
    views = {}
    for line in access_log.read_text().splitlines():
        entry = json.loads(line)
        views[entry["request_id"]] = entry.get("health_view", 0)
    return views


async def wait_for_full_share(proxy: RunningProxy, full: float, limit: float) -> float:
    """Seconds until aws has its full share of new requests again (at most `limit`)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if abs(await proxy.aws_share() - full) < 0.01:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"aws not back at share {full} within {limit:g}s: "
                         f"{json.dumps((await proxy.status())['upstreams']['web'])[:2000]}")


@pytest.mark.parametrize("clients", [16, 64, 256])
@pytest.mark.parametrize("strategy", ["priority", "weighted"])
async def test_every_fault_mode_is_invisible_to_clients(
    run_proxy: Any, strategy: str, clients: int
) -> None:
    await fault_matrix(run_proxy, strategy, clients, http2=False)


@pytest.mark.parametrize("streams", [16, 256])
async def test_every_fault_mode_is_invisible_over_http2(run_proxy: Any, streams: int) -> None:
    """The same matrix with HTTP/2 on both sides: clients' streams (h2c, on 1 or 4
    connections) and the backends (`protocol: h2c`, one multiplexed connection each): a
    provider's failure is just as invisible."""
    await fault_matrix(run_proxy, "priority", streams, http2=True)


async def fault_matrix(run_proxy: Any, strategy: str, clients: int, http2: bool) -> None:
    backends = [FaultBackend(f"{p}-{s}", p) for p in ("aws", "azure", "gcp") for s in "ab"]
    for backend in backends:
        await backend.start()
    aws = [b for b in backends if b.provider == "aws"]
    policy = ("strategy: priority, providers: [aws, azure, gcp]" if strategy == "priority"
              else "strategy: weighted") + ", " + MATRIX_POLICY
    full = 1.0 if strategy == "priority" else 1 / 3
    port, admin = free_port(), free_port()
    text = process_config(backends, policy, port, admin, MATRIX_SETTINGS)
    load: KeepAliveLoad | Http2Load = KeepAliveLoad(port, clients)
    if http2:
        text = text.replace(f"port: {port}}}", f"port: {port}, http2: {{h2c: true}}}}").replace(
            "    policy:", "    protocol: h2c\n    policy:")
        load = Http2Load(port, clients, connections=max(1, clients // 64))
    proxy = await run_proxy(text, port, admin)
    running = asyncio.create_task(load.run())
    report: list[str] = []
    reached: list[tuple[str, str]] = []
    """(mode, request id) of every request aws received while broken and being taken out."""
    try:
        await asyncio.sleep(0.5)
        for mode in MODES:
            await wait_for_full_share(proxy, full, RECOVERY_BOUND)
            fault_wall, fault_at = time.time(), time.monotonic()
            for backend in aws:
                await backend.set_mode(mode)
            # The fault lasts at least as long as its removal may take: asked any sooner,
            # a removal within the bound would be taken for none at all.
            await asyncio.sleep(max(FAULT_SECONDS, REMOVAL_BOUND[mode]))
            removed = await proxy.removed_at(fault_wall)
            assert removed is not None, f"{mode}: aws never left rotation"
            took = removed - fault_wall
            reached += [(mode, r.request_id) for b in aws for r in b.requests_since(fault_at)]
            for backend in aws:
                await backend.set_mode("healthy")
            recovered = await wait_for_full_share(proxy, full, RECOVERY_BOUND)
            errors = [e for e in load.since(fault_at) if not e.ok]
            report.append(f"{mode}: out in {took:.3f}s, back at full share {recovered:.2f}s "
                          f"after the mend, {len(errors)} errors")
            assert took <= REMOVAL_BOUND[mode], report[-1]
    finally:
        load.stop()
        await running
        for backend in backends:
            await backend.stop()
    await asyncio.sleep(0.5)  # the worker's access log goes out every sweep
    log = proxy.log.read_text()
    assert "INFO httpx" not in log, "each HTTP/2 health check logged by httpx"
    out = aws_out_views(log)
    views = routed_by(proxy.access_log)
    assert len(out) >= len(MODES), f"aws left rotation {len(out)} times: {out}"
    late = [(mode, request_id, views.get(request_id)) for mode, request_id in reached
            if any(first <= views.get(request_id, 0) < end for first, end in out)]
    unknown = [request_id for _, request_id in reached if request_id not in views]
    print(f"\n{strategy}, {clients} {'HTTP/2 streams' if http2 else 'clients'}:\n  " + "\n  ".join(report)
          + f"\n  aws out of rotation in health views {out}; {len(reached)} requests reached "
          f"it while broken, {len(late)} of them routed by a view with it out")
    assert not late, late[:10]
    assert not unknown, f"{len(unknown)} requests aws received are not in the access log"
    errors = load.errors
    assert not errors, (
        f"{len(errors)} client errors of {len(load.samples)}: "
        f"{[(round(e.started - load.samples[0].started, 3), e.detail) for e in errors[:10]]}\n"
        + "\n".join(report) + "\n" + proxy.log.read_text()[-5000:]
        + "\nrequests that failed:\n" + proxy.failed_requests()
    )
    assert load.ok > 300


async def test_a_provider_that_returns_is_back_at_full_share_within_the_bound(
    run_proxy: Any,
) -> None:
    """The stale-ejection case: aws refuses for 3 s under load (its backends are ejected by
    passive detection for the default 30 s), then returns. A passing active check ends the
    ejection, so aws is back at its full share within healthy_threshold x interval + hold_down
    + slow_start + 1 s of its return, not 30 s later. The process log says so at WARNING."""
    backends = [FaultBackend(f"{p}-{s}", p) for p in ("aws", "gcp") for s in "ab"]
    for backend in backends:
        await backend.start()
    interval, healthy_threshold, hold_down, slow_start = 0.5, 2, 2.0, 2.0
    bound = healthy_threshold * interval + hold_down + slow_start + 1.0
    port, admin = free_port(), free_port()
    text = process_config(
        backends,
        f"strategy: priority, providers: [aws, gcp], hold_down: {hold_down}s, "
        f"slow_start: {slow_start}s",
        port, admin,
        f"    health_check: {{interval: {interval}s, unhealthy_interval: {interval}s, "
        f"healthy_threshold: {healthy_threshold}}}\n",
    )
    proxy = await run_proxy(text, port, admin)
    load = KeepAliveLoad(port, 16)
    running = asyncio.create_task(load.run())
    aws = [b for b in backends if b.provider == "aws"]
    try:
        await asyncio.sleep(0.5)
        for backend in aws:
            await backend.set_mode("refusing")
        await asyncio.sleep(3.0)
        status = await proxy.status()
        ejected = [b for b in status["upstreams"]["web"]["providers"]["aws"]["backends"].values()
                   if b["state"] == "ejected" or b["ejected_until_in_s"]]
        for backend in aws:
            await backend.set_mode("healthy")
        back = await wait_for_full_share(proxy, 1.0, bound)
    finally:
        load.stop()
        await running
        for backend in backends:
            await backend.stop()
    print(f"\naws back at its full share {back:.2f}s after its return (bound {bound:g}s); "
          f"{len(ejected)} of its backends had been ejected")
    assert not load.errors, [e.detail for e in load.errors[:5]]
    log = proxy.log.read_text()
    # aws may pass through degraded on its way out (one backend ejected a moment earlier).
    assert re.search(r"WARNING failover_proxy.health: web provider aws: \w+ -> down", log), log
    assert "WARNING failover_proxy.health: web provider aws: down -> " in log, log[-3000:]
