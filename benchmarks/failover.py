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

    python benchmarks/failover.py [--clients 8] [--seconds 3] [--process]

With --process the proxy is the real `failover-proxy run` (a supervisor and one worker, as
deployed): health decisions are the supervisor's, and each passive failure crosses to it over
the worker's message socket. The removal time then comes from /status's recent failovers (the
supervisor's decision; the worker learns it one message later), and the proxy's own attempt
count is not read: /metrics sums counts a worker reports as attempts end, too coarse for
milliseconds. Written to failover-process.md/json.

Both ways, the aws backends say what reached them after the fault: how many requests, and when
the last one came (when the proxy really stopped sending; none for `refusing`, whose refused
connections leave no trace at the backend).
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

import aiohttp
import uvloop
from common import free_port

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


class InProcess:
    """ProxyServer in this process: removal seen as it happens, from the topology itself."""

    async def start(self, config: str) -> int:
        self.server = server = ProxyServer(parse_config(config, "failover-bench"))
        await server.start()
        assert server.plane is not None
        upstream = server.plane.topology.upstreams["web"]
        self.aws = aws = upstream.providers["aws"]
        self.removed: list[tuple[float, int]] = []

        def watch(changed: Upstream) -> None:
            if aws.state == "down" and not self.removed:
                self.removed.append((time.time(), self._attempts()))

        upstream.listeners.append(watch)
        return server.port

    def _attempts(self) -> int:
        return sum(b.attempts_total for b in self.aws.backends)

    async def attempts_on_aws(self) -> int | None:
        return self._attempts()

    async def removal(self) -> tuple[float, int | None] | None:
        """(wall-clock time aws left rotation, attempts on aws by then)."""
        return self.removed[0] if self.removed else None

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)


class RunProcess:
    """`failover-proxy run` with one worker, observed through its admin API."""

    async def start(self, config: str) -> int:
        port, self.admin = free_port(), free_port()
        self.directory = tempfile.TemporaryDirectory(prefix="fp-failover-")
        path = Path(self.directory.name) / "proxy.yaml"
        path.write_text(config.replace("port: 0}", f"port: {port}}}") +
                        f"admin: {{host: 127.0.0.1, port: {self.admin}}}\n")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "failover_proxy", "run", "-c", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        self.session = aiohttp.ClientSession()
        for _ in range(300):
            try:
                async with self.session.get(self._url("/readyz")) as response:
                    if response.status == 200:
                        return port
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("failover-proxy run did not become ready")

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"

    async def attempts_on_aws(self) -> int | None:
        return None  # see the module's docstring

    async def removal(self) -> tuple[float, int | None] | None:
        async with self.session.get(self._url("/status")) as response:
            status: dict[str, Any] = await response.json()
        for event in status["recent_failovers"]:
            if event["provider"] == "aws" and event["kind"] == "failover":
                return event["at"], None
        return None

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        await self.process.wait()
        await self.session.close()
        self.directory.cleanup()


async def run_mode(mode: str, clients: int, seconds: float,
                   as_process: bool) -> dict[str, object]:
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
    config = CONFIG.format(backends=entries)
    proxy: InProcess | RunProcess = RunProcess() if as_process else InProcess()
    port = await proxy.start(config)
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, float, bool]] = []  # (start, latency, ok)
    stop = False

    async def client(session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{port}/work"
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
        attempts_at_fault = await proxy.attempts_on_aws()
        fault_at, fault_wall, fault_clock = loop.time(), time.time(), time.monotonic()
        for backend in backends:
            if backend.provider == "aws":
                await backend.set_mode(mode)
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
    removed = await proxy.removal()
    await proxy.stop()
    reached = sorted(r.at - fault_clock for b in backends if b.provider == "aws"
                     for r in b.requests_since(fault_clock))
    for backend in backends:
        await backend.stop()

    after = [s for s in samples if s[0] >= fault_at]
    switch = sorted(latency for start, latency, _ in after if start < fault_at + 1.0)
    p99 = switch[int(len(switch) * 0.99) - 1] if switch else 0.0
    row: dict[str, object] = {
        "mode": mode,
        "requests": len(after),
        "client_errors": sum(1 for *_, ok in after if not ok),
        "attempts_on_failed_provider": (
            removed[1] - attempts_at_fault
            if removed and removed[1] is not None and attempts_at_fault is not None else None),
        "requests_reaching_failed_provider": None if mode == "refusing" else len(reached),
        "ms_to_last_request_on_failed_provider": (
            round(reached[-1] * 1000, 1) if reached and mode != "refusing" else None),
        "seconds_to_out_of_rotation": round(removed[0] - fault_wall, 3) if removed else None,
        "p99_ms_during_switch": round(p99 * 1000, 1),
        "median_ms_during_switch": round(statistics.median(switch) * 1000, 1) if switch else 0,
        "max_ms_during_switch": round(switch[-1] * 1000, 1) if switch else 0,
    }
    return row


async def main(clients: int, seconds: float, as_process: bool) -> list[dict[str, object]]:
    modes = [m for m in MODES if m != "healthy"]
    return [await run_mode(mode, clients, seconds, as_process) for mode in modes]


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


def render(rows: list[dict[str, object]], clients: int, as_process: bool) -> str:
    proxy = ("`failover-proxy run` (a supervisor and one worker)" if as_process
             else "ProxyServer in the load generator's process")
    lines = [
        f"{clients} concurrent GET clients; every aws backend broken at once; "
        f"3 providers x 2 backends; the proxy: {proxy}\n",
        "| mode | requests after fault | client errors | attempts on aws before removal | "
        "s to removal | requests reaching aws | ms to the last | p99 ms (1st s) | "
        "max ms (1st s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['requests']} | {row['client_errors']} | "
            f"{_shown(row['attempts_on_failed_provider'])} | {row['seconds_to_out_of_rotation']} | "
            f"{_shown(row['requests_reaching_failed_provider'])} | "
            f"{_shown(row['ms_to_last_request_on_failed_provider'])} | "
            f"{row['p99_ms_during_switch']} | {row['max_ms_during_switch']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--process", action="store_true",
                        help="the real `failover-proxy run` process (failover-process.md)")
    args = parser.parse_args()
    rows = uvloop.run(main(args.clients, args.seconds, args.process))
    table = render(rows, args.clients, args.process)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "failover-process" if args.process else "failover"
    (RESULTS / f"{name}.md").write_text(table)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
