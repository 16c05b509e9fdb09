"""`failover-proxy drill`: rehearse a provider's (or a region's) outage against a running proxy.

It sends probe traffic through the proxy at a steady rate, forces the provider down through the
admin API, watches the traffic move away (the proxy's /status and the probes' answers), holds
the outage for `--duration`, restores the provider, and watches it take its share back. The
report: time to move, probe errors, latency during the switch, time to fail back. Exit 1 when
any probe failed. Ctrl-C (or SIGTERM) restores the provider before it exits: a drill never
leaves a provider down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

WATCH_INTERVAL = 0.05
FAILBACK_LIMIT = 120.0
"""Longest wait for the provider's return to its share after the restore (hold-down, probes
and slow start all come first)."""


@dataclass
class Probe:
    sent_at: float
    seconds: float
    status: int
    """0 when no response came (connection refused, reset, timeout)."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400


@dataclass
class Report:
    upstream: str
    target: str
    """`provider aws` or `region aws/us-east-1`."""
    share_before: float
    time_to_move_s: float | None
    """From the force-down to the target taking no new traffic (None: it never moved)."""
    time_to_fail_back_s: float | None
    """From the restore to the target back at its share (None: not within the limit)."""
    probes: int
    errors: int
    p50_ms: float
    p99_ms: float
    switch_p50_ms: float
    switch_p99_ms: float
    """Latency of the probes sent in the first second after the force-down."""
    error_samples: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.time_to_move_s is not None and not self.interrupted

    def text(self) -> str:
        def seconds(value: float | None) -> str:
            return f"{value:.3f}s" if value is not None else "never"

        lines = [
            f"drill of {self.target} in upstream {self.upstream}: "
            f"{'PASSED' if self.passed else 'FAILED'}"
            + (" (interrupted, restored)" if self.interrupted else ""),
            f"  share before        {self.share_before:.1%}",
            f"  time to move        {seconds(self.time_to_move_s)}",
            f"  time to fail back   {seconds(self.time_to_fail_back_s)}",
            f"  probes              {self.probes}, {self.errors} failed",
            f"  latency p50 / p99   {self.p50_ms:.1f} / {self.p99_ms:.1f} ms "
            f"(during the switch: {self.switch_p50_ms:.1f} / {self.switch_p99_ms:.1f} ms)",
        ]
        lines += [f"  error: {sample}" for sample in self.error_samples]
        return "\n".join(lines)


class Drill:
    def __init__(self, admin: str, token: str | None, upstream: str, provider: str,
                 region: str | None, probe_url: str, rate: float) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.admin = httpx.AsyncClient(base_url=admin.rstrip("/"), headers=headers,
                                       trust_env=False, timeout=10)
        self.probe_client = httpx.AsyncClient(trust_env=False, timeout=10)
        self.upstream = upstream
        self.provider = provider
        self.region = region
        self.probe_url = probe_url
        self.rate = rate
        self.probes: list[Probe] = []
        lever = f"/providers/{upstream}/{provider}"
        self.lever = lever + (f"/regions/{region}" if region else "")
        self.target = f"region {provider}/{region}" if region else f"provider {provider}"

    async def share(self) -> tuple[str, float]:
        """The target's state and traffic share now, from /status."""
        response = await self.admin.get("/status")
        response.raise_for_status()
        upstreams = response.json()["upstreams"]
        if self.upstream not in upstreams:
            raise SystemExit(f"drill: no upstream {self.upstream!r} (known: "
                             f"{', '.join(upstreams)})")
        providers = upstreams[self.upstream]["providers"]
        if self.provider not in providers:
            raise SystemExit(f"drill: upstream {self.upstream} has no provider "
                             f"{self.provider!r} (known: {', '.join(providers)})")
        found: dict[str, Any] = providers[self.provider]
        if self.region is not None:
            regions = found["regions"]
            if self.region not in regions:
                raise SystemExit(f"drill: provider {self.provider} has no region "
                                 f"{self.region!r} (known: {', '.join(regions)})")
            found = regions[self.region]
        return str(found["state"]), float(found["traffic_share"])

    async def lever_pull(self, action: str) -> None:
        response = await self.admin.post(f"{self.lever}/{action}")
        if response.status_code != 200:
            raise SystemExit(f"drill: {action} refused: {response.status_code} {response.text}")

    async def probe_forever(self) -> None:
        """Probes at `rate` per second, each on its own (a slow answer does not delay the
        next one: the rate is what users keep sending)."""
        interval = 1.0 / self.rate
        pending: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        try:
            while True:
                task = asyncio.create_task(self.probe_once())
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            if pending:
                await asyncio.wait(pending, timeout=10)

    async def probe_once(self) -> None:
        started = time.monotonic()
        try:
            response = await self.probe_client.get(self.probe_url)
            self.probes.append(Probe(started, time.monotonic() - started, response.status_code,
                                     "" if response.status_code < 400 else response.text[:200]))
        except httpx.HTTPError as exc:
            self.probes.append(Probe(started, time.monotonic() - started, 0,
                                     f"{type(exc).__name__}: {exc}"))

    async def wait_for(self, moved: bool, limit: float) -> float | None:
        """Seconds until the target takes no traffic (moved) or its share again (not moved)."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            state, share = await self.share()
            if moved and state == "down" and share == 0.0:
                return time.monotonic() - started
            if not moved and state != "down" and share >= self.share_before - 0.005:
                return time.monotonic() - started
            await asyncio.sleep(WATCH_INTERVAL)
        return None

    async def run(self, duration: float, warmup: float = 1.0) -> Report:
        state, self.share_before = await self.share()
        if state == "down":
            raise SystemExit(f"drill: {self.target} is down already: nothing to rehearse")
        probing = asyncio.create_task(self.probe_forever())
        interrupted = False
        forced = False
        moved: float | None = None
        back: float | None = None
        forced_at = 0.0
        try:
            await asyncio.sleep(warmup)
            forced_at = time.monotonic()
            await self.lever_pull("force-down")
            forced = True
            moved = await self.wait_for(True, max(duration, 5.0))
            await asyncio.sleep(max(0.0, duration - (time.monotonic() - forced_at)))
            await self.lever_pull("restore")
            forced = False
            back = await self.wait_for(False, FAILBACK_LIMIT)
        except asyncio.CancelledError:
            interrupted = True
        finally:
            if forced:  # interrupted or failed midway: never leave the provider down
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.lever_pull("restore"))
            probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probing
            await self.admin.aclose()
            await self.probe_client.aclose()
        return self.report(moved, back, forced_at, interrupted)

    def report(self, moved: float | None, back: float | None, forced_at: float,
               interrupted: bool) -> Report:
        probes = self.probes
        latencies = sorted(p.seconds * 1000 for p in probes) or [0.0]
        switching = sorted(p.seconds * 1000 for p in probes
                           if forced_at <= p.sent_at < forced_at + 1.0) or [0.0]
        failed = [p for p in probes if not p.ok]
        return Report(
            upstream=self.upstream, target=self.target, share_before=self.share_before,
            time_to_move_s=moved, time_to_fail_back_s=back, probes=len(probes),
            errors=len(failed), p50_ms=statistics.median(latencies),
            p99_ms=_quantile(latencies, 0.99), switch_p50_ms=statistics.median(switching),
            switch_p99_ms=_quantile(switching, 0.99),
            error_samples=[f"{p.status or 'no response'} {p.detail}".strip()
                           for p in failed[:5]],
            interrupted=interrupted,
        )


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_drill(args: Any) -> Report:
    drill = Drill(args.admin, args.token, args.upstream, args.provider, args.region,
                  args.probe_url, args.rate)
    task = asyncio.create_task(drill.run(args.duration))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    return await task


def as_json(report: Report) -> str:
    return json.dumps(asdict(report) | {"passed": report.passed}, indent=1)
