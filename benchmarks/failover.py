"""Each fault mode under load: what clients see while a whole provider fails.

Three simulated providers with two backends each (failover_proxy.faults, on 127.0.0.1) behind
the real proxy, in one uvloop process with the load generator (the proxy's own counters tell
when it stopped trying the failed provider). For each mode: warm up, break every `aws` backend,
keep the load on, and report

- client errors (any non-200 or transport error),
- attempts the proxy made on aws between the fault and taking aws out of rotation,
- time from the fault until aws was out of rotation,
- p99 and max latency of requests that started in the second after the fault (the max is the
  request that waited out a per-try timeout before its retry).

    python benchmarks/failover.py [--clients 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

import aiohttp
import uvloop

from failover_proxy.config import parse_config
from failover_proxy.faults import MODES, FaultBackend
from failover_proxy.server import ProxyServer
from failover_proxy.topology import Upstream

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = """
listen: {{host: 127.0.0.1, port: 0}}
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


async def run_mode(mode: str, clients: int, seconds: float) -> dict[str, object]:
    backends = [
        FaultBackend(f"{provider}-{suffix}", provider)
        for provider in ("aws", "azure", "gcp")
        for suffix in ("a", "b")
    ]
    for backend in backends:
        await backend.start()
    entries = "".join(
        f'      - {{name: {b.name}, url: "http://127.0.0.1:{b.port}", provider: {b.provider}}}\n'
        for b in backends
    )
    server = ProxyServer(parse_config(CONFIG.format(backends=entries), "failover-bench"))
    await server.start()
    assert server.plane is not None
    upstream = server.plane.topology.upstreams["web"]
    aws = upstream.providers["aws"]
    loop = asyncio.get_running_loop()
    removed: list[tuple[float, int]] = []

    def watch(changed: Upstream) -> None:
        if aws.state == "down" and not removed:
            removed.append((loop.time(), sum(b.attempts_total for b in aws.backends)))

    upstream.listeners.append(watch)
    samples: list[tuple[float, float, bool]] = []  # (start, latency, ok)
    stop = False

    async def client(session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{server.port}/work"
        while not stop:
            started = loop.time()
            try:
                async with session.get(url) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            samples.append((started, loop.time() - started, ok))

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await asyncio.sleep(1.0)
        fault_at = loop.time()
        attempts_at_fault = sum(b.attempts_total for b in aws.backends)
        for backend in backends:
            if backend.provider == "aws":
                await backend.set_mode(mode)
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
    await server.stop(grace=1.0)
    for backend in backends:
        await backend.stop()

    after = [s for s in samples if s[0] >= fault_at]
    switch = sorted(latency for start, latency, _ in after if start < fault_at + 1.0)
    p99 = switch[int(len(switch) * 0.99) - 1] if switch else 0.0
    row: dict[str, object] = {
        "mode": mode,
        "requests": len(after),
        "client_errors": sum(1 for *_, ok in after if not ok),
        "attempts_on_failed_provider": (removed[0][1] - attempts_at_fault) if removed else None,
        "seconds_to_out_of_rotation": round(removed[0][0] - fault_at, 3) if removed else None,
        "p99_ms_during_switch": round(p99 * 1000, 1),
        "median_ms_during_switch": round(statistics.median(switch) * 1000, 1) if switch else 0,
        "max_ms_during_switch": round(switch[-1] * 1000, 1) if switch else 0,
    }
    return row


async def main(clients: int, seconds: float) -> list[dict[str, object]]:
    modes = [m for m in MODES if m != "healthy"]
    return [await run_mode(mode, clients, seconds) for mode in modes]


def render(rows: list[dict[str, object]], clients: int) -> str:
    lines = [
        f"{clients} concurrent GET clients; every aws backend broken at once; "
        "3 providers x 2 backends\n",
        "| mode | requests after fault | client errors | attempts on aws before removal | "
        "s to removal | p99 ms (1st s) | max ms (1st s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['requests']} | {row['client_errors']} | "
            f"{row['attempts_on_failed_provider']} | {row['seconds_to_out_of_rotation']} | "
            f"{row['p99_ms_during_switch']} | {row['max_ms_during_switch']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    rows = uvloop.run(main(args.clients, args.seconds))
    table = render(rows, args.clients)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "failover.md").write_text(table)
    (RESULTS / "failover.json").write_text(json.dumps(rows, indent=2) + "\n")
