"""What many backends cost: CPU per health probe, check and reload time, memory, and whether a
reload slows requests, at 60, 600 and 6,000 backends.

Each size is N/6 upstreams of six backends (three providers, two regions each), every upstream
with TCP health checks every second and its own route (by host). The first upstream's backends
are six simulated servers on 127.0.0.1 (failover_proxy.sim.faults) that the clients' requests go
to; the others' are six listening ports of a process of their own (a TCP probe only connects).
The proxy is the real `failover-proxy run` with one worker.

- check: wall time of `failover-proxy check` on the config (validation, offline);
- CPU per probe: the supervisor's CPU time over a window divided by the probes it made then
  (its health_checks counter), with nothing else to do;
- RSS of the supervisor and of the worker once settled;
- reload: wall time of POST /reload (the supervisor validates and rebuilds, the worker is
  sent the new config) with one backend weight changed; how long the worker took to put it in
  service (its event loop held for that long, from its log); and the worst latency of 8
  keep-alive clients in the 2.5 s around it against their worst in 2.5 s before it (on two
  cores the supervisor's validation competes with them for CPU, at a lower priority).

    python benchmarks/scale.py [--sizes 60 600 6000] [--seconds 10]

Writes results/scale.md and scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvloop
from common import RESULTS, cpu_seconds, free_port, process_tree, rss_mib

from failover_proxy.sim.faults import FaultBackend
from failover_proxy.sim.loadgen import KeepAliveLoad

PROVIDERS = (("aws", "us-east-1"), ("aws", "us-west-2"), ("azure", "eastus"),
             ("azure", "westus"), ("gcp", "us-central1"), ("gcp", "europe-west1"))


ACCEPTOR = """
import asyncio, uvloop
async def main():
    servers = [await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, backlog=4096)
               for _ in range(6)]
    print(" ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""
"""Where the probes of every upstream but the first connect: a process of its own, so that
accepting thousands of probe connections a second does not slow the clients measured here."""


def scale_config(size: int, ports: list[int], port: int, admin: int, weight: int = 1,
                 probed: list[int] | None = None) -> str:
    """`size` backends in upstreams of 6: u0's on `ports`, the others' on `probed`."""
    lines = [
        f"listen: {{host: 127.0.0.1, port: {port}}}",
        f"admin: {{host: 127.0.0.1, port: {admin}}}",
        "access_log: {enabled: false}",
        "upstreams:",
    ]
    routes = ["routes:"]
    for index in range(size // 6):
        lines += [f"  u{index}:", "    backends:"]
        for slot, (provider, region) in enumerate(PROVIDERS):
            first = index == 0 and slot == 0
            lines.append(
                f"      - {{name: b{slot}, "
                f"url: \"http://127.0.0.1:{(ports if index == 0 else probed or ports)[slot]}\", "
                f"provider: {provider}, region: {region}, weight: {weight if first else 1}}}"
            )
        lines.append("    health_check: {type: tcp, interval: 1s, timeout: 500ms}")
        routes.append(f"  - {{host: u{index}.example, upstream: u{index}}}")
    return "\n".join(lines + routes) + "\n"


async def metric_sum(admin: httpx.AsyncClient, name: str) -> float:
    text = (await admin.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


async def measure(size: int, seconds: float) -> dict[str, object]:
    backends = [FaultBackend(f"b{slot}", provider, region)
                for slot, (provider, region) in enumerate(PROVIDERS)]
    for backend in backends:
        await backend.start()
    ports = [b.port for b in backends]
    acceptor = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ACCEPTOR, stdout=asyncio.subprocess.PIPE)
    assert acceptor.stdout is not None
    probed = [int(p) for p in (await acceptor.stdout.readline()).split()]
    port, admin_port = free_port(), free_port()
    directory = tempfile.TemporaryDirectory(prefix="fp-scale-")
    path = Path(directory.name) / "proxy.yaml"
    path.write_text(scale_config(size, ports, port, admin_port, probed=probed))
    started = time.perf_counter()
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failover_proxy", "check", "-c", str(path),
        stdout=asyncio.subprocess.DEVNULL)
    await check.wait()
    check_seconds = time.perf_counter() - started
    log = Path(directory.name) / "proxy.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "failover_proxy", "run", "-c", str(path),
            stdout=out, stderr=asyncio.subprocess.STDOUT)
    admin = httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}", trust_env=False,
                              timeout=60)
    try:
        for _ in range(600):
            try:
                if (await admin.get("/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        await asyncio.sleep(3.0)  # every probe loop running, start-up work done
        supervisor, worker = process_tree(process.pid)[:2]
        probes_before = await metric_sum(admin, "failover_proxy_health_checks_total")
        cpu_before = cpu_seconds(supervisor)
        await asyncio.sleep(seconds)
        cpu = cpu_seconds(supervisor) - cpu_before
        probes = await metric_sum(admin, "failover_proxy_health_checks_total") - probes_before
        rss_supervisor, rss_worker = rss_mib(supervisor), rss_mib(worker)

        # Made before the clients start: building 1,000 upstreams' text would hold this
        # process's loop (the clients' and backends') and pass for a slow reload.
        changed = scale_config(size, ports, port, admin_port, weight=2, probed=probed)
        # This process's own collector, walking the clients' growing list of samples, would
        # stall every client at once by 20-30 ms (seen with no reload at all).
        gc.collect()
        gc.freeze()
        gc.disable()
        load = KeepAliveLoad(port, 8, path="/", authority="u0.example")
        running = asyncio.create_task(load.run())
        await asyncio.sleep(3.5)
        path.write_text(changed)
        reload_at = time.monotonic()
        answer = await admin.post("/reload")
        reload_seconds = time.monotonic() - reload_at
        assert answer.json()["ok"], answer.text
        await asyncio.sleep(2.0)
        load.stop()
        await running
        gc.enable()
        # Two windows of the same length (a longer one would have a slower worst by chance).
        before = [s.seconds for s in load.samples
                  if reload_at - 3.0 <= s.started < reload_at - 0.5]
        around = [s.seconds for s in load.samples
                  if reload_at - 0.5 <= s.started < reload_at + 2.0]
        applied = re.findall(r"config generation 2 in service \(([\d.]+) ms\)", log.read_text())
    finally:
        await admin.aclose()
        process.send_signal(2)
        await process.wait()
        for backend in backends:
            await backend.stop()
        acceptor.kill()
        await acceptor.wait()
        directory.cleanup()
    return {
        "backends": size,
        "upstreams": size // 6,
        "check_s": round(check_seconds, 3),
        "probes_per_s": round(probes / seconds, 1),
        "cpu_us_per_probe": round(cpu / probes * 1e6, 1) if probes else None,
        "supervisor_cpu_percent": round(100 * cpu / seconds, 1),
        "supervisor_rss_mib": round(rss_supervisor, 1),
        "worker_rss_mib": round(rss_worker, 1),
        "reload_s": round(reload_seconds, 3),
        "worker_apply_ms": float(applied[0]) if applied else None,
        "max_ms_before_reload": round(max(before) * 1000, 1) if before else None,
        "max_ms_around_reload": round(max(around) * 1000, 1) if around else None,
        "client_errors": len(load.errors),
    }


def render(rows: list[dict[str, object]]) -> str:
    lines = [
        "TCP health checks every second on every backend; upstreams of 6 backends (3 providers "
        "x 2 regions), one route each; `failover-proxy run` with one worker.\n",
        "| backends | check s | probes/s | CPU µs/probe | supervisor CPU % | supervisor RSS MiB "
        "| worker RSS MiB | reload s | worker apply ms | max ms before reload | max ms around "
        "reload | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['backends']} | {row['check_s']} | {row['probes_per_s']} | "
            f"{row['cpu_us_per_probe']} | {row['supervisor_cpu_percent']} | "
            f"{row['supervisor_rss_mib']} | {row['worker_rss_mib']} | {row['reload_s']} | "
            f"{row['worker_apply_ms']} | "
            f"{row['max_ms_before_reload']} | {row['max_ms_around_reload']} | "
            f"{row['client_errors']} |"
        )
    return "\n".join(lines) + "\n"


async def main(sizes: list[int], seconds: float) -> list[dict[str, object]]:
    rows = []
    for size in sizes:
        row = await measure(size, seconds)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60, 600, 6000])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    rows = uvloop.run(main(args.sizes, args.seconds))
    table = render(rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.md").write_text(table)
    (RESULTS / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
