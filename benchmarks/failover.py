"""Each fault mode under load, and a region failure: what clients see while a provider or one
of its regions fails, and how soon it is back once mended.

Three simulated providers (failover_proxy.sim.faults, on 127.0.0.1): aws with two regions of two
backends (us-east-1, us-west-2), azure and gcp with two backends each, behind the proxy with the
weighted policy; keep-alive clients on raw sockets (failover_proxy.sim.loadgen) in this process.
For each mode and each client count: warm up, break every aws backend, keep the load on, mend
them, and report

- client errors (any non-200 or transport error),
- time from the fault until aws was out of rotation,
- requests that reached aws after the fault, and when the last one came (none for `refusing`,
  whose refused connections leave no trace at the backend),
- p50, p99 and max latency of requests that started in the second after the fault (the max is
  the request that waited out a per-try timeout before its retry),
- time from the mend until aws had its full share of new requests again (for the region row:
  until the region was up again).

The region row breaks aws/us-east-1 alone (refusing): the region leaves rotation, aws stays in
it through us-west-2, and the region's recovery is timed the same way.

    python benchmarks/failover.py [--clients 16 64 256] [--seconds 3] [--process]

With --process the proxy is the real `failover-proxy run` (a supervisor and one worker, as
deployed): health decisions are the supervisor's, and each passive failure crosses to it over
the worker's message socket; removal and shares come from /status. Without it, ProxyServer runs
in this process and is read directly. Written to failover-process.md/json or failover.md/json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop
from common import RESULTS, free_port

from failover_proxy.config.loading import parse_config
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import MODES, FaultBackend
from failover_proxy.sim.loadgen import KeepAliveLoad

CONFIG = """
listen: {{host: 127.0.0.1, port: {port}}}
access_log: {{enabled: false}}
upstreams:
  web:
    backends:
{backends}
    timeouts: {{connect: 250ms, read: 5s}}
    health_check: {{path: /healthz, interval: 1s, unhealthy_interval: 200ms, timeout: 300ms}}
    outlier: {{consecutive_failures: 3, base_ejection: 5s}}
    policy: {{strategy: weighted, correlated_failures: {{backends: 2, window: 1s}}, hold_down: 2s}}
    retry: {{attempts: 3, per_try_timeout: 500ms}}
routes:
  - {{path_prefix: /, upstream: web}}
"""
LAYOUT = (("aws-e1", "aws", "us-east-1"), ("aws-e2", "aws", "us-east-1"),
          ("aws-w1", "aws", "us-west-2"), ("aws-w2", "aws", "us-west-2"),
          ("azure-a", "azure", "eastus"), ("azure-b", "azure", "eastus"),
          ("gcp-a", "gcp", "us-central1"), ("gcp-b", "gcp", "us-central1"))
RECOVERY_LIMIT = 30.0


class InProcess:
    """ProxyServer in this process: removal seen as it happens, from the topology itself."""

    async def start(self, config: str) -> None:
        self.server = ProxyServer(parse_config(config, "failover-bench"))
        await self.server.start()

    @property
    def _upstream(self) -> Any:
        assert self.server.plane is not None
        return self.server.plane.topology.upstreams["web"]

    async def events(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self._upstream.store.events]

    async def share(self, provider: str) -> float:
        shares: dict[str, float] = self._upstream.provider_shares()
        return shares[provider]

    async def region_state(self, provider: str, region: str) -> str:
        state: str = next(r.state for r in self._upstream.providers[provider].regions
                          if r.region == region)
        return state

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)


class RunProcess:
    """`failover-proxy run` with one worker, observed through its admin API."""

    async def start(self, config: str) -> None:
        self.admin_port = free_port()
        self.directory = tempfile.TemporaryDirectory(prefix="fp-failover-")
        path = Path(self.directory.name) / "proxy.yaml"
        path.write_text(config + f"admin: {{host: 127.0.0.1, port: {self.admin_port}}}\n")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "failover_proxy", "run", "-c", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        self.admin = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.admin_port}",
                                       trust_env=False, timeout=10)
        for _ in range(300):
            try:
                if (await self.admin.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("failover-proxy run did not become ready")

    async def _status(self) -> dict[str, Any]:
        document: dict[str, Any] = (await self.admin.get("/status")).json()
        return document

    async def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = (await self._status())["recent_failovers"]
        return events

    async def share(self, provider: str) -> float:
        return float((await self._status())["upstreams"]["web"]["providers"][provider]
                     ["traffic_share"])

    async def region_state(self, provider: str, region: str) -> str:
        state: str = ((await self._status())["upstreams"]["web"]["providers"][provider]
                      ["regions"][region]["state"])
        return state

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        await self.process.wait()
        await self.admin.aclose()
        self.directory.cleanup()


async def removed_at(proxy: InProcess | RunProcess, domain: str, after: float) -> float | None:
    """Wall-clock time `domain` (a provider or provider/region) left rotation after `after`."""
    for event in await proxy.events():
        if event["provider"] == domain and event["kind"] == "failover" and event["at"] >= after:
            return float(event["at"])
    return None


async def time_to_recovery(proxy: InProcess | RunProcess, full: float,
                           region: bool) -> float | None:
    """Seconds until aws has its full share again (the region row: until aws/us-east-1 is up;
    aws keeps its weight through us-west-2 meanwhile)."""
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_LIMIT:
        if region:
            back = await proxy.region_state("aws", "us-east-1") == "up"
        else:
            back = abs(await proxy.share("aws") - full) < 0.01
        if back:
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.05)
    return None


async def run_mode(mode: str, clients: int, seconds: float, as_process: bool,
                   region: bool = False) -> dict[str, object]:
    backends = [FaultBackend(name, provider, where) for name, provider, where in LAYOUT]
    for backend in backends:
        await backend.start()
    entries = "".join(
        f'      - {{name: {b.name}, url: "http://127.0.0.1:{b.port}", provider: {b.provider}, '
        f"region: {b.region}}}\n" for b in backends
    )
    port = free_port()
    proxy: InProcess | RunProcess = RunProcess() if as_process else InProcess()
    await proxy.start(CONFIG.format(backends=entries, port=port))
    broken = [b for b in backends
              if b.provider == "aws" and (not region or b.region == "us-east-1")]
    domain = "aws/us-east-1" if region else "aws"
    load = KeepAliveLoad(port, clients)
    running = asyncio.create_task(load.run())
    await asyncio.sleep(1.0)
    full = await proxy.share("aws")
    fault_at, fault_wall = time.monotonic(), time.time()
    for backend in broken:
        await backend.set_mode(mode)
    await asyncio.sleep(seconds)
    removed = await removed_at(proxy, domain, fault_wall)
    aws_share_while_broken = await proxy.share("aws")
    mended_at = time.monotonic()
    for backend in broken:
        await backend.set_mode("healthy")
    recovered = await time_to_recovery(proxy, full, region)
    load.stop()
    await running
    await proxy.stop()
    reached = sorted(r.at - fault_at for b in broken for r in b.requests_since(fault_at)
                     if r.at < mended_at)
    for backend in backends:
        await backend.stop()

    after = load.since(fault_at)
    switch = sorted(s.seconds for s in after if s.started < fault_at + 1.0)
    p99 = switch[max(0, int(len(switch) * 0.99) - 1)] if switch else 0.0
    return {
        "mode": f"{mode} (aws/us-east-1 only)" if region else mode,
        "clients": clients,
        "requests": len(after),
        "client_errors": sum(1 for s in after if not s.ok),
        "seconds_to_out_of_rotation": round(removed - fault_wall, 3) if removed else None,
        "aws_share_while_broken": round(aws_share_while_broken, 3),
        "requests_reaching_broken": None if mode == "refusing" else len(reached),
        "ms_to_last_request_on_broken": (
            round(reached[-1] * 1000, 1) if reached and mode != "refusing" else None),
        "median_ms_during_switch": round(statistics.median(switch) * 1000, 1) if switch else 0,
        "p99_ms_during_switch": round(p99 * 1000, 1),
        "max_ms_during_switch": round(switch[-1] * 1000, 1) if switch else 0,
        "seconds_to_recovery_after_mend": recovered,
    }


async def main(clients: list[int], seconds: float, as_process: bool) -> list[dict[str, object]]:
    rows = []
    for count in clients:
        for mode in [m for m in MODES if m != "healthy"]:
            rows.append(await run_mode(mode, count, seconds, as_process))
            print(json.dumps(rows[-1]), flush=True)
        rows.append(await run_mode("refusing", count, seconds, as_process, region=True))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


def render(rows: list[dict[str, object]], as_process: bool) -> str:
    proxy = ("`failover-proxy run` (a supervisor and one worker)" if as_process
             else "ProxyServer in the load generator's process")
    lines = [
        "Keep-alive GET clients; every aws backend broken at once (the last row of each count: "
        "aws/us-east-1 alone); aws has two regions of two backends, azure and gcp two backends; "
        f"weighted policy; the proxy: {proxy}\n",
        "| mode | clients | requests after fault | client errors | s to removal | aws share "
        "while broken | requests reaching the broken before the mend | ms to the last | "
        "p50 / p99 / max ms (1st s) | s to recovery after the mend |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['clients']} | {row['requests']} | {row['client_errors']} | "
            f"{_shown(row['seconds_to_out_of_rotation'])} | {row['aws_share_while_broken']} | "
            f"{_shown(row['requests_reaching_broken'])} | "
            f"{_shown(row['ms_to_last_request_on_broken'])} | "
            f"{row['median_ms_during_switch']} / {row['p99_ms_during_switch']} / "
            f"{row['max_ms_during_switch']} | {_shown(row['seconds_to_recovery_after_mend'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--process", action="store_true",
                        help="the real `failover-proxy run` process (failover-process.md)")
    args = parser.parse_args()
    rows = uvloop.run(main(args.clients, args.seconds, args.process))
    table = render(rows, args.process)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "failover-process" if args.process else "failover"
    (RESULTS / f"{name}.md").write_text(table)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
