"""Soak: the real proxy under mixed load for minutes, a provider broken every few seconds and
the config reloaded every 30 s; memory, descriptors and client-visible errors over time.

The proxy runs as `failover-proxy run` with two workers in front of two upstreams: `api`
(three simulated providers from failover_proxy/sim/faults.py, each broken in turn: refusing, 5xx,
resets mid-body, slow, blackholed) and `bulk` (three aiohttp servers, one per provider, for
uploads, 1 MiB downloads and WebSocket echo; one of them is stopped now and then). The load,
all on loopback from this process: keep-alive GETs, a new connection per request, pipelined
requests, PUT uploads of 256 KiB, downloads, WebSocket echo, and clients that leave before
their answer.

Every 5 s it prints the RSS of each process (supervisor, workers) and their open descriptors.
Verdict: after the warm-up (the first third of the run), RSS grows by less than 5 %, the
descriptors stay within a few of where they were, and idempotent requests see no error.

    python benchmarks/soak.py [--minutes 10] [--check]

`--check` exits 1 when a verdict fails (CI runs `--minutes 1 --check`). Writes
benchmarks/results/soak.md and soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
from failover_proxy.sim.faults import FaultBackend  # noqa: E402 (after the path is set)

PROVIDERS = ("aws", "azure", "gcp")
FAULTS = ("refusing", "5xx", "reset_mid_body", "slow", "blackhole")
LARGE = os.urandom(1024 * 1024)
UPLOAD = os.urandom(256 * 1024)


@dataclass
class Tally:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Client-visible failures of idempotent requests, by kind."""
    details: dict[str, list[str]] = field(default_factory=dict)
    """The first few answers of each kind (the proxy's own answers name their reason)."""
    websocket_drops: int = 0
    """WebSocket sessions cut (their backend was stopped): reconnected, not an error."""
    left: int = 0

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        seen = self.details.setdefault(kind, [])
        if detail and len(seen) < 5:
            seen.append(f"{time.strftime('%H:%M:%S')} {detail.strip()[:200]}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BulkBackend:
    """An aiohttp server: PUT /bulk/upload (checks the body), GET /bulk/large, GET /bulk/ws
    (echo)."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def upload(request: web.Request) -> web.Response:
            body = await request.read()
            return web.Response(text="ok" if body == UPLOAD else "corrupt",
                                status=200 if body == UPLOAD else 500)

        async def large(_: web.Request) -> web.Response:
            return web.Response(body=LARGE)

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def echo(request: web.Request) -> web.WebSocketResponse:
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            async for message in socket:
                await socket.send_str(message.data)
            return socket

        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_put("/bulk/upload", upload)
        app.router.add_get("/bulk/large", large)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/bulk/ws", echo)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def config_text(api: list[FaultBackend], bulk: list[BulkBackend], port: int, admin: int,
                generation: int) -> str:
    api_lines = "".join(f'      - {{name: {b.name}, url: "http://127.0.0.1:{b.port}", '
                        f"provider: {b.provider}}}\n" for b in api)
    bulk_lines = "".join(f'      - {{name: bulk-{b.provider}, url: "http://127.0.0.1:{b.port}", '
                         f"provider: {b.provider}}}\n" for b in bulk)
    common = ("    health_check: {path: /healthz, interval: 500ms, timeout: 300ms}\n"
              "    retry: {attempts: 3, per_try_timeout: 400ms}\n"
              "    timeouts: {connect: 300ms, read: 5s}\n")
    return (f"# soak generation {generation}\n"
            f"listen: {{host: 127.0.0.1, port: {port}}}\n"
            f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
            "workers: 2\naccess_log: {enabled: false}\n"
            "upstreams:\n  api:\n    backends:\n" + api_lines + common +
            "  bulk:\n    backends:\n" + bulk_lines + common +
            "routes:\n  - {path_prefix: /bulk/, upstream: bulk}\n"
            "  - {path_prefix: /, upstream: api}\n")


def start_proxy(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "failover_proxy", "run", "-c",
                                 str(config)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out)


def process_stats(pid: int) -> list[tuple[int, float, int]]:
    """(pid, RSS MiB, open descriptors) of the supervisor and each worker."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    stats = []
    for each in pids:
        with contextlib.suppress(OSError):
            rss = next(int(line.split()[1]) for line in
                       Path(f"/proc/{each}/status").read_text().splitlines()
                       if line.startswith("VmRSS:")) / 1024
            stats.append((each, rss, len(os.listdir(f"/proc/{each}/fd"))))
    return stats


async def keep_alive_client(base: str, tally: Tally, until: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            try:
                async with session.get(f"{base}/item") as response:
                    body = await response.read()
                    tally.ok += 1 if response.status == 200 else 0
                    if response.status != 200:
                        tally.error(f"keep-alive {response.status}", body.decode(errors="replace"))
            except aiohttp.ClientError as error:
                tally.error(f"keep-alive {type(error).__name__}")


async def new_connection_client(base: str, tally: Tally, until: float) -> None:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.monotonic() < until:
            try:
                async with session.get(f"{base}/fresh") as response:
                    body = await response.read()
                    if response.status == 200:
                        tally.ok += 1
                    else:
                        tally.error(f"new-connection {response.status}",
                                    body.decode(errors="replace"))
            except aiohttp.ClientError as error:
                tally.error(f"new-connection {type(error).__name__}")


async def pipelining_client(port: int, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"".join(b"GET /pipe/%d HTTP/1.1\r\nHost: soak\r\n\r\n" % n
                                  for n in range(4)))
            for _ in range(4):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 200 "):
                    tally.ok += 1
                else:
                    tally.error(f"pipelined {head[9:12].decode()}")
            writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            tally.error(f"pipelined {type(error).__name__}")


async def leaving_client(port: int, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /bulk/large HTTP/1.1\r\nHost: soak\r\n\r\n")
            await asyncio.sleep(0.01)
            writer.transport.abort()  # gone before (most of) the answer
            tally.left += 1
        await asyncio.sleep(0.05)


async def bulk_client(base: str, tally: Tally, until: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            try:
                async with session.put(f"{base}/bulk/upload", data=UPLOAD) as response:
                    answer = await response.read()
                    if response.status != 200:
                        tally.error(f"upload {response.status}", answer.decode(errors="replace"))
                    else:
                        tally.ok += 1
                async with session.get(f"{base}/bulk/large") as response:
                    body = await response.read()
                    if response.status != 200 or body != LARGE:
                        tally.error(f"download {response.status}",
                                    body[:200].decode(errors="replace"))
                    else:
                        tally.ok += 1
            except aiohttp.ClientError as error:
                tally.error(f"bulk {type(error).__name__}")


async def websocket_client(base: str, tally: Tally, until: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            try:
                async with session.ws_connect(f"{base}/bulk/ws") as socket:
                    while time.monotonic() < until:
                        await socket.send_str("ping")
                        message = await asyncio.wait_for(socket.receive(), 10)
                        if message.type != aiohttp.WSMsgType.TEXT:
                            tally.websocket_drops += 1
                            break
                        tally.ok += 1
                        await asyncio.sleep(0.05)
            except (aiohttp.ClientError, TimeoutError):
                tally.websocket_drops += 1
                await asyncio.sleep(0.2)


async def break_providers(api: list[FaultBackend], bulk: list[BulkBackend], until: float,
                          log: list[str]) -> None:
    rng = random.Random(29)
    while time.monotonic() < until - 4:
        await asyncio.sleep(rng.uniform(2, 4))
        victim = rng.randrange(len(api))
        fault = rng.choice(FAULTS)
        await api[victim].set_mode(fault)
        stop_bulk = rng.random() < 0.3
        if stop_bulk:
            await bulk[victim].stop()
        log.append(f"{time.strftime('%H:%M:%S')} {api[victim].provider}: {fault}"
                   + (" (bulk stopped)" if stop_bulk else ""))
        await asyncio.sleep(rng.uniform(1.5, 3))
        await api[victim].set_mode("healthy")
        if stop_bulk:
            await bulk[victim].start()


async def watch_stalls(until: float, worst: list[float]) -> None:
    """The longest this process's own event loop was late since the last sample: the
    simulated providers live in it beside the clients, so a stall here silences every
    provider at once, and the proxy's 503s and 504s are then the right answer."""
    while time.monotonic() < until:
        before = time.monotonic()
        await asyncio.sleep(0.05)
        worst[0] = max(worst[0], time.monotonic() - before - 0.05)


async def soak(minutes: float) -> dict[str, object]:
    api = [FaultBackend(f"{p}-a", p) for p in PROVIDERS]
    for backend in api:
        backend.delay = 0.8  # "slow" outlasts the 400 ms per-try timeout: retried elsewhere
        await backend.start()
    bulk = [BulkBackend(p) for p in PROVIDERS]
    for backend in bulk:
        await backend.start()
    port, admin = free_port(), free_port()
    folder = Path(tempfile.mkdtemp())
    path = folder / "soak.yaml"
    path.write_text(config_text(api, bulk, port, admin, 1))
    process = start_proxy(path, folder / "proxy.log")
    base = f"http://127.0.0.1:{port}"
    for _ in range(150):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    tally, faults, stall = Tally(), [], [0.0]
    started = time.monotonic()
    until = started + minutes * 60
    clients = [
        *(keep_alive_client(base, tally, until) for _ in range(6)),
        *(new_connection_client(base, tally, until) for _ in range(2)),
        pipelining_client(port, tally, until),
        leaving_client(port, tally, until),
        *(bulk_client(base, tally, until) for _ in range(2)),
        *(websocket_client(base, tally, until) for _ in range(2)),
        break_providers(api, bulk, until, faults),
        watch_stalls(until, stall),
    ]
    tasks = [asyncio.create_task(client) for client in clients]
    samples: list[dict[str, object]] = []
    generation = 1
    next_reload = started + 30
    try:
        while time.monotonic() < until:
            await asyncio.sleep(min(5.0, max(0.0, until - time.monotonic())))
            now = time.monotonic()
            if now >= next_reload:
                generation += 1
                path.write_text(config_text(api, bulk, port, admin, generation))
                process.send_signal(signal.SIGHUP)
                next_reload += 30
            stats = process_stats(process.pid)
            samples.append({"t": round(now - started, 1), "processes": stats,
                            "rss_mib": round(sum(s[1] for s in stats), 1),
                            "fds": sum(s[2] for s in stats), "ok": tally.ok,
                            "errors": sum(tally.errors.values()),
                            "stall_ms": round(stall[0] * 1000)})
            print(f"  {now - started:6.1f}s  RSS {' + '.join(f'{s[1]:.1f}' for s in stats)}"
                  f" MiB  fds {' + '.join(str(s[2]) for s in stats)}  ok {tally.ok}"
                  f"  errors {sum(tally.errors.values())}  ws drops {tally.websocket_drops}"
                  f"  generator stall {stall[0] * 1000:.0f} ms", flush=True)
            stall[0] = 0.0
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
        for backend in api:
            await backend.stop()
        for backend in bulk:
            await backend.stop()
    return verdict(samples, tally, faults, minutes, generation)


def verdict(samples: list[dict[str, object]], tally: Tally, faults: list[str], minutes: float,
            generation: int) -> dict[str, object]:
    warm = samples[len(samples) // 3]
    last = samples[-1]
    rss_growth = float(last["rss_mib"]) / float(warm["rss_mib"]) - 1  # type: ignore[arg-type]
    # Descriptors swing by a dozen with the connections in flight at the moment of a sample:
    # compare the medians of a window after the warm-up and of the last one, not two samples.
    window = max(1, len(samples) // 6)
    warm_fds = statistics.median(int(s["fds"]) for s in samples[len(samples) // 3:][:window])  # type: ignore[call-overload]
    last_fds = statistics.median(int(s["fds"]) for s in samples[-window:])  # type: ignore[call-overload]
    fd_change = round(last_fds - warm_fds)
    checks = {
        "rss": rss_growth < 0.05,
        "descriptors": abs(fd_change) <= 8,
        "errors": not tally.errors,
    }
    return {"minutes": minutes, "samples": samples, "ok": tally.ok, "errors": tally.errors,
            "error_details": tally.details,
            "websocket_drops": tally.websocket_drops, "clients_left": tally.left,
            "faults": faults, "reloads": generation - 1, "rss_growth": rss_growth,
            "fd_change": fd_change, "checks": checks}


def write(result: dict[str, object]) -> None:
    samples = result["samples"]
    assert isinstance(samples, list)
    checks = result["checks"]
    assert isinstance(checks, dict)
    lines = [
        "# Soak (benchmarks/soak.py)", "",
        f"{result['minutes']:g} minutes of mixed load on `failover-proxy run` with two workers "
        f"(keep-alive, new connections, pipelining, 256 KiB uploads, 1 MiB downloads, "
        f"WebSocket echo, clients that leave); a provider broken every 2-4 s "
        f"({len(result['faults'])} faults: {', '.join(FAULTS)}; bulk backends stopped too), "  # type: ignore[arg-type]
        f"{result['reloads']} reloads (SIGHUP every 30 s).", "",
        f"- requests answered: {result['ok']:,}; errors seen by clients of idempotent "
        f"requests: {sum(result['errors'].values()) or 0} {result['errors'] or ''}"  # type: ignore[union-attr]
        f"({'pass' if checks['errors'] else 'FAIL'})",
        f"- RSS after warm-up (t={samples[len(samples) // 3]['t']} s) to the end: "
        f"{result['rss_growth']:+.1%} ({'pass' if checks['rss'] else 'FAIL'}: < 5 %)",
        f"- open descriptors after warm-up to the end (medians of a window each): "
        f"{result['fd_change']:+d} "
        f"({'pass' if checks['descriptors'] else 'FAIL'}: flat)",
        f"- WebSocket sessions cut by a stopped backend (and reopened): "
        f"{result['websocket_drops']}; clients that left early: {result['clients_left']:,}", "",
        "The last column is the longest the load generator's own event loop stalled in each "
        "interval: the simulated providers share it, so a stall of more than the 300 ms probe "
        "timeout silences all of them at once.", "",
        "| t (s) | RSS per process (MiB) | total | descriptors | answered | errors "
        "| generator stall (ms) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for sample in samples:
        processes = sample["processes"]
        lines.append(f"| {sample['t']} | {' + '.join(f'{p[1]:.1f}' for p in processes)} | "
                     f"{sample['rss_mib']} | {sample['fds']} | {sample['ok']:,} | "
                     f"{sample['errors']} | {sample['stall_ms']} |")
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("\n".join(lines[:9]))
    for kind, details in result.get("error_details", {}).items():  # type: ignore[union-attr]
        print(f"  {kind}:", *details, sep="\n    ")
    print("  faults:", *result["faults"], sep="\n    ")  # type: ignore[misc]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(soak(args.minutes))
    write(result)
    checks = result["checks"]
    assert isinstance(checks, dict)
    return 0 if not args.check or all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
