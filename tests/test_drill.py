"""`failover-proxy drill` against the real `failover-proxy run`: a provider forced down while
probes flow, its traffic moved without an error, then restored; and a drill interrupted midway
leaves no provider down."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any

from failover_proxy.sim.faults import FaultBackend

from .conftest import ROOT, backend_lines, free_port


async def start_fleet(run_proxy: Any) -> tuple[Any, list[FaultBackend], int, int]:
    backends = [FaultBackend(f"{p}-{s}", p) for p in ("aws", "azure", "gcp") for s in "ab"]
    for backend in backends:
        await backend.start()
    port, admin = free_port(), free_port()
    text = f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}, token: drill-token}}
access_log: {{enabled: false}}
upstreams:
  web:
    backends:
{backend_lines(backends)}
    health_check: {{path: /healthz, interval: 200ms, jitter: 0%}}
    policy: {{strategy: weighted, hold_down: 500ms}}
routes:
  - {{path_prefix: /, upstream: web}}
"""
    return await run_proxy(text, port, admin), backends, port, admin


async def drill(port: int, admin: int, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failover_proxy", "drill", "--admin", f"http://127.0.0.1:{admin}",
        "--token", "drill-token", "--upstream", "web", "--provider", "aws",
        "--probe-url", f"http://127.0.0.1:{port}/", "--rate", "40", *extra,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_a_drill_moves_traffic_without_an_error_and_reports(run_proxy: Any) -> None:
    proxy, backends, port, admin = await start_fleet(run_proxy)
    try:
        process = await drill(port, admin, "--duration", "2s", "--format", "json")
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        for backend in backends:
            await backend.stop()
    assert process.returncode == 0, (out, err)
    report = json.loads(out)
    print(f"\ndrill report: {report}")
    assert report["passed"] and report["errors"] == 0 and report["probes"] >= 80
    assert report["share_before"] > 0.3
    assert report["time_to_move_s"] < 1.0
    assert report["time_to_fail_back_s"] is not None
    assert sum(len(b.received) for b in backends if b.provider == "aws") > 0
    status = await proxy.status()  # the drill ended with aws restored
    assert status["upstreams"]["web"]["providers"]["aws"]["forced_down"] is False


async def test_an_interrupted_drill_restores_the_provider(run_proxy: Any) -> None:
    proxy, backends, port, admin = await start_fleet(run_proxy)
    try:
        process = await drill(port, admin, "--duration", "60s")
        deadline = time.monotonic() + 20
        while True:
            aws = (await proxy.status())["upstreams"]["web"]["providers"]["aws"]
            if aws["forced_down"]:
                break
            assert time.monotonic() < deadline, "the drill never forced aws down"
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        aws = (await proxy.status())["upstreams"]["web"]["providers"]["aws"]
    finally:
        for backend in backends:
            await backend.stop()
    assert process.returncode == 1, (out, err)  # an interrupted drill did not pass
    assert b"interrupted, restored" in out
    assert aws["forced_down"] is False
