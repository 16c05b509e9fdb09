"""failover-proxy against nginx and HAProxy on this machine, in one run, before one backend.

The backend is nginx (one worker, pinned to the last core) serving a 100-byte body at /small
and a 64 KiB file at /64k. In front of it, each on its own port and all started at once:
nginx as a reverse proxy (upstream keepalive pool), HAProxy (http-reuse always, health
checks) and failover-proxy (health checks, retries, metrics and the admin listener on), each
with one worker (pinned to core 0, wrk on the other core) and with one worker per core
(unpinned, wrk too).
A featureless Python proxy on the same stack (floor_proxy.py, one worker) runs alongside as a
floor for what Python can reach here. Access logs are off for all, and nginx and HAProxy add
the header fields failover-proxy always adds (HEADER_FIELDS). Runs alternate target by
target, round after round, the order flipping each round, so drift hits all alike; each figure
is the median over rounds, and ratios are to nginx at the same worker count: the median of each
round's ratio (paired in time, since the machine's speed drifts between runs; nginx runs right
beside the proxies compared with it). compare.md opens with issue 6's targets, each ratio with
its 95% interval over the rounds (verdict.py).
Then: latency added at a fixed 5k req/s (hey) against the direct path, memory with 10,000 idle
keep-alive client connections, and memory while a 1 GiB body streams through.

    python benchmarks/compare.py [--duration 1] [--rounds 24] [--quick] [--bodies small]

`--bodies small` (or `64k`) measures throughput for that body alone, with no fixed-rate, idle
or streaming runs, and writes compare-small.md/json beside the full run's compare.md: for a
cell too close to call, more rounds in the same time narrow its interval.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    ROOT,
    LoadResult,
    cpu_seconds,
    ensure_tools,
    free_port,
    process_tree,
    raise_open_file_limit,
    rss_mib,
    run_hey,
    run_wrk,
    start_nginx,
    wait_port,
)
from verdict import judge, ratio_interval

SMALL_BODY = "x" * 100
BODIES = ("small", "64k")
CORES = os.cpu_count() or 1
PROXIES = ("nginx", "haproxy", "failover-proxy")
ADDED_UPSTREAM = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-Id", "Via")
ADDED_DOWNSTREAM = ("X-Request-Id", "Via")
HEADER_FIELDS = (f"{', '.join(ADDED_UPSTREAM)} to the backend (X-Request-Id when absent); "
                 f"{', '.join(ADDED_DOWNSTREAM)} to the client")
"""What failover-proxy always adds, so nginx and HAProxy are configured to add them too: the
backend parses them and wrk reads them, on the same cores as the proxy."""


@dataclass
class Target:
    name: str
    workers: str
    """1, or all (one per core)."""
    port: int
    process: subprocess.Popen[bytes]

    @property
    def pinned(self) -> bool:
        return self.workers == "1"

    def rss(self) -> list[float]:
        """RSS of each process (for nginx and failover-proxy: the master or supervisor first,
        then its workers)."""
        return [rss_mib(pid) for pid in process_tree(self.process.pid)]

    def rss_by_role(self) -> tuple[float, float | None]:
        """(the largest RSS of a process serving traffic, the RSS of its master or supervisor),
        or (the one process's RSS, None) when a single process does everything."""
        sizes = self.rss()
        if len(sizes) == 1:
            return sizes[0], None
        return max(sizes[1:]), sizes[0]


@dataclass
class Row:
    target: str
    workers: str
    body: str
    connections: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    worker_rss_mib: float
    main_rss_mib: float | None
    """The master's or supervisor's RSS; None for a single process."""
    rps_vs_nginx: float = 0.0
    """The median of the per-round ratios (`rps_ratio_rounds`)."""
    p99_vs_nginx: float = 0.0
    """The median of the per-round p99 ratios."""
    rps_ratio_rounds: list[float] = field(default_factory=list)
    """req/s against nginx's in the same round: the targets of a round run within about a
    minute of each other, while the machine's speed drifts by up to a third between rounds."""
    rounds: list[float] = field(default_factory=list)
    p99_rounds: list[float] = field(default_factory=list)
    p99_ratio_rounds: list[float] = field(default_factory=list)
    tcp_timeouts: list[int] = field(default_factory=list)
    """Retransmission timeouts on the machine in each round (each one stalls >= 200 ms)."""
    cpu_us_per_request: float = 0.0
    """CPU time (user + system) the target's processes were charged per request: the median."""
    cpu_rounds: list[float] = field(default_factory=list)
    cpu_vs_nginx: float = 0.0
    """The median of the per-round CPU-per-request ratios."""


def haproxy_conf(port: int, backend_port: int, threads: int) -> str:
    return f"""
global
    nbthread {threads}
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend bench
    bind 127.0.0.1:{port}
    # the header fields failover-proxy adds (HEADER_FIELDS)
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    unique-id-format %{{+X}}o%ci-%cp-%Ts-%rt-%pid
    http-request set-header X-Request-Id %[unique-id] unless {{ req.hdr(x-request-id) -m found }}
    http-request set-var(txn.request_id) req.hdr(x-request-id)
    http-request add-header Via "1.1 haproxy"
    http-response set-header X-Request-Id %[var(txn.request_id)]
    http-response add-header Via "1.1 haproxy"
    default_backend origin
backend origin
    option httpchk GET /small
    server origin 127.0.0.1:{backend_port} maxconn 9000 check inter 1s
"""


def failover_config(port: int, backend_port: int, workers: str) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: {port}, backlog: 4096}}
admin: {{host: 127.0.0.1, port: {free_port()}}}
workers: {1 if workers == "1" else "auto"}
access_log: {{enabled: false}}
upstreams:
  bench:
    backends:
      - {{name: origin, url: "http://127.0.0.1:{backend_port}", provider: local}}
    pool: {{max_idle_per_backend: 256}}   # as nginx's keepalive 256
    health_check: {{path: /small, interval: 1s}}
    retry: {{attempts: 2}}
routes:
  - {{path_prefix: /, upstream: bench}}
"""


def backend_block(port: int, www: Path) -> str:
    """The backend nginx's server: a fixed small body at /small, the added header fields it
    received at /headers (check_same_fields), files from `www` elsewhere."""
    echo = "|".join(f"$http_{name.lower().replace('-', '_')}" for name in ADDED_UPSTREAM)
    return f"""
    server {{ listen 127.0.0.1:{port} backlog=4096;
             location = /small {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}
             location = /headers {{ default_type text/plain; return 200 "{echo}"; }}
             location / {{ root {www}; }} }}"""


def nginx_proxy_block(port: int, backend_port: int) -> str:
    """nginx as the reverse proxy compared: a keep-alive upstream pool, HTTP/1.1 to it, and the
    header fields failover-proxy adds (HEADER_FIELDS). Its request id is a counter, as ours is
    (process, connection, request on it): nginx's own $request_id draws 16 random bytes per
    request, which cost it about 8% of its req/s here."""
    return f"""
    upstream origin {{ server 127.0.0.1:{backend_port}; keepalive 256; }}
    map $http_x_request_id $bench_request_id {{
        "" $pid-$connection-$connection_requests; default $http_x_request_id; }}
    server {{ listen 127.0.0.1:{port} backlog=4096;
             location / {{ proxy_pass http://origin; proxy_http_version 1.1;
                          proxy_set_header Connection "";
                          proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                          proxy_set_header X-Forwarded-Proto $scheme;
                          proxy_set_header X-Forwarded-Host $http_host;
                          proxy_set_header X-Request-Id $bench_request_id;
                          proxy_set_header Via "1.1 nginx";
                          add_header X-Request-Id $bench_request_id;
                          add_header Via "1.1 nginx"; }} }}"""


def start_targets(tmp: Path, backend_port: int) -> list[Target]:
    targets = []
    for workers in ("1", "all"):
        core = 0 if workers == "1" else None
        count = "1" if workers == "1" else "auto"
        port = free_port()
        targets.append(Target("nginx", workers, port, start_nginx(
            f"nginx-{workers}", count, nginx_proxy_block(port, backend_port), tmp, core)))
        port = free_port()
        conf = tmp / f"haproxy-{workers}.cfg"
        conf.write_text(haproxy_conf(port, backend_port, 1 if workers == "1" else CORES))
        argv = ["haproxy", "-db", "-f", str(conf)]
        targets.append(Target("haproxy", workers, port, subprocess.Popen(
            ["taskset", "-c", "0", *argv] if core == 0 else argv,
            stdout=subprocess.DEVNULL, stderr=_log(tmp, f"haproxy-{workers}"))))
        port = free_port()
        conf = tmp / f"failover-proxy-{workers}.yaml"
        conf.write_text(failover_config(port, backend_port, workers))
        argv = [sys.executable, "-m", "failover_proxy", "run", "-c", str(conf)]
        targets.append(Target("failover-proxy", workers, port, subprocess.Popen(
            ["taskset", "-c", "0", *argv] if core == 0 else argv, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=_log(tmp, f"failover-proxy-{workers}"))))
    for target in targets:
        try:
            wait_port(target.port)
        except RuntimeError:
            log = tmp / f"{target.name}-{target.workers}.log"
            output = log.read_text() if log.exists() else "(see its error.log)"
            raise RuntimeError(f"{target.name} (workers={target.workers}) did not start:\n"
                               f"{output}") from None
    time.sleep(1.0)
    return targets


def check_same_fields(targets: list[Target]) -> None:
    """Fail the run unless every proxy compared adds the header fields failover-proxy adds: the
    backend echoes those it received, and the response must carry the others."""
    for target in targets:
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=5)
        try:
            conn.request("GET", "/headers", headers={"Host": "bench"})
            response = conn.getresponse()
            received = response.read().decode().split("|")
        finally:
            conn.close()
        echoed = dict(zip(ADDED_UPSTREAM, received, strict=False))
        missing = [f"{name} (to the backend)" for name in ADDED_UPSTREAM if not echoed.get(name)]
        missing += [f"{name} (to the client)" for name in ADDED_DOWNSTREAM
                    if response.getheader(name) is None]
        if response.status != 200 or missing:
            raise RuntimeError(f"{target.name} (workers={target.workers}) is not configured "
                               f"like the others: status {response.status}, missing {missing}")


def start_floor(tmp: Path, backend_port: int) -> Target:
    """benchmarks/floor_proxy.py, one process pinned like the other workers=1 targets: what a
    Python proxy on uvloop and llhttp costs with no features at all (throughput rows only)."""
    port = free_port()
    process = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, str(Path(__file__).with_name("floor_proxy.py")),
         str(port), str(backend_port)],
        stdout=subprocess.DEVNULL, stderr=_log(tmp, "python-floor-1"))
    wait_port(port)
    return Target("python-floor", "1", port, process)


def _log(tmp: Path, name: str) -> int:
    return os.open(tmp / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def measure(targets: list[Target], direct: Target, duration: float, rounds: int,
            connection_counts: list[int], bodies: list[str]) -> list[Row]:
    """Every target x body x connection count, alternating; medians over rounds."""
    samples: dict[tuple[str, str, str, int],
                  list[tuple[LoadResult, tuple[float, float | None], float]]]
    samples = {}
    everyone = [direct, *targets]
    for target in everyone:  # warm up pools and caches
        run_wrk(f"http://127.0.0.1:{target.port}/small", 1, 64,
                core=1 if target.pinned else None)
    for round_number in range(rounds):
        order = round_order(everyone, round_number)
        for body in bodies:
            for connections in connection_counts:
                for target in order:
                    pinned = target.pinned
                    cpu_before = cpu_seconds(target.process.pid)
                    result = run_wrk(f"http://127.0.0.1:{target.port}/{body}", duration,
                                     connections, threads=1 if pinned else 2,
                                     core=1 if pinned else None)
                    cpu = (cpu_seconds(target.process.pid) - cpu_before) / max(1, result.requests)
                    key = (target.name, target.workers, body, connections)
                    samples.setdefault(key, []).append((result, target.rss_by_role(), cpu * 1e6))
                    print(f"  round {round_number + 1} {target.name:15} workers={target.workers:3}"
                          f" {body:5} c={connections:<4} {result.requests_per_second:9.0f} req/s"
                          f"  p50 {result.p50_ms:6.2f}  p99 {result.p99_ms:6.2f} ms"
                          f"  CPU {cpu * 1e6:5.1f} us/req"
                          f"  errors {result.errors}  TCP timeouts {result.tcp_timeouts}"
                          f" retransmits {result.retransmits}", flush=True)
    rows = []
    for (name, workers, body, connections), results in samples.items():
        loads = [load for load, _, _ in results]
        cpus = [cpu for _, _, cpu in results]
        rows.append(Row(
            name, workers, body, connections,
            statistics.median(r.requests_per_second for r in loads),
            statistics.median(r.p50_ms for r in loads),
            statistics.median(r.p99_ms for r in loads),
            sum(r.errors for r in loads),
            max(worker for _, (worker, _), _ in results),
            max((main for _, (_, main), _ in results if main is not None), default=None),
            rounds=[r.requests_per_second for r in loads],
            p99_rounds=[r.p99_ms for r in loads],
            tcp_timeouts=[r.tcp_timeouts for r in loads],
            cpu_us_per_request=statistics.median(cpus),
            cpu_rounds=cpus,
        ))
    by_key = {(r.target, r.workers, r.body, r.connections): r for r in rows}
    for row in rows:
        nginx = by_key.get(("nginx", row.workers, row.body, row.connections))
        if nginx is not None and row.target != "backend":
            row.rps_ratio_rounds = per_round_ratios(row.rounds, nginx.rounds)
            row.rps_vs_nginx = statistics.median(row.rps_ratio_rounds)
            row.p99_ratio_rounds = per_round_ratios(row.p99_rounds, nginx.p99_rounds)
            row.p99_vs_nginx = statistics.median(row.p99_ratio_rounds)
            cpu_ratios = per_round_ratios(row.cpu_rounds, nginx.cpu_rounds)
            row.cpu_vs_nginx = statistics.median(cpu_ratios) if cpu_ratios else 0.0
    return rows


# Within a worker count, nginx runs between HAProxy and failover-proxy: each ratio to nginx then
# pairs runs made back to back. The machine's speed drifts from one run to the next, so the
# further apart two runs are, the more a round's ratio can swing: two targets alone back to back
# (ab.py) gave a log-ratio spread of 0.057. With the eight targets in one sequence (nginx and
# failover-proxy two runs apart, pinned and unpinned runs mixed) failover-proxy's small cells
# spread by 0.08-0.13; in the first run in this order, by 0.085-0.13: less in some cells, and
# never the 0.057 of two targets alone, as the machine also moves within a second or two.
_SEQUENCE = ("backend", "python-floor", "haproxy", "nginx", "failover-proxy")


def round_order(everyone: list[Target], round_number: int) -> list[Target]:
    """The order of one round's runs: grouped by worker count, each group in _SEQUENCE's order,
    groups and order both flipping each round, so no target always runs first or last."""
    groups = [sorted((t for t in everyone if t.workers == workers),
                     key=lambda t: _SEQUENCE.index(t.name))
              for workers in ("1", "all")]
    if round_number % 2:
        groups = [group[::-1] for group in groups[::-1]]
    return [target for group in groups for target in group]


def per_round_ratios(ours: list[float], nginx: list[float]) -> list[float]:
    """Each round's figure over nginx's in the same round (paired in time, as the machine's
    speed drifts between rounds); a round where nginx's figure is 0 gives none."""
    return [mine / theirs for mine, theirs in zip(ours, nginx, strict=True) if theirs > 0]


def fixed_rate_latency(targets: list[Target], direct: Target, rate: int, seconds: float,
                       rounds: int) -> list[dict[str, Any]]:
    """p50/p99 at a moderate fixed rate, and what each proxy adds to the direct path: medians
    of alternating rounds (hey shares a core with the backend, and one run's p99 swings by 2x)."""
    everyone = [direct, *[t for t in targets if t.workers == "1"]]
    runs: dict[str, list[LoadResult]] = {t.name: [] for t in everyone}
    for _ in range(rounds):
        for target in everyone:
            runs[target.name].append(run_hey(f"http://127.0.0.1:{target.port}/small", seconds,
                                             rate))
    out: list[dict[str, Any]] = []
    base_p50 = statistics.median(r.p50_ms for r in runs[direct.name])
    base_p99 = statistics.median(r.p99_ms for r in runs[direct.name])
    for target in everyone:
        results = runs[target.name]
        p50 = statistics.median(r.p50_ms for r in results)
        p99 = statistics.median(r.p99_ms for r in results)
        out.append({
            "target": target.name,
            "rps": statistics.median(r.requests_per_second for r in results),
            "p50_ms": p50, "p99_ms": p99, "added_p50_ms": p50 - base_p50,
            "added_p99_ms": p99 - base_p99, "errors": sum(r.errors for r in results),
            "p99_rounds_ms": [r.p99_ms for r in results],
        })
    return out


def startup_memory(targets: list[Target]) -> list[dict[str, Any]]:
    """RSS per worker and of the master or supervisor right after start, before any traffic."""
    out: list[dict[str, Any]] = []
    for target in targets:
        worker, main = target.rss_by_role()
        out.append({"target": target.name, "workers": target.workers,
                    "worker_rss_mib": worker, "master_rss_mib": main})
    return out


async def _hold_idle_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` keep-alive connections, each after one answered request, left open."""
    writers: list[asyncio.StreamWriter] = []
    request = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writers.append(writer)

    for start in range(0, count, 500):
        await asyncio.gather(*(one() for _ in range(min(500, count - start))))
    return writers


def idle_connection_memory(targets: list[Target], count: int) -> list[dict[str, float | str]]:
    out: list[dict[str, float | str]] = []
    # HAProxy is left out: at 2 descriptors a connection it would need more than the 20k
    # descriptors a process may have here.
    for target in [t for t in targets if t.workers == "1" and t.name != "haproxy"]:
        before = sum(target.rss())

        async def hold(target: Target = target) -> float:
            writers = await _hold_idle_connections(target.port, count)
            await asyncio.sleep(1.0)
            held = sum(target.rss())
            for writer in writers:
                writer.close()
            await asyncio.sleep(0.5)
            return held

        held = asyncio.run(hold())
        out.append({"target": target.name, "connections": count, "rss_before_mib": before,
                    "rss_with_idle_mib": held, "extra_mib": held - before})
        print(f"  {target.name:15} {count} idle connections: {before:.1f} -> {held:.1f} MiB",
              flush=True)
    return out


def streaming_memory(target: Target, path: str, size: int) -> dict[str, float | str]:
    """Download a large body through the proxy, sampling its RSS as it flows."""
    peak = before = sum(target.rss())
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(target.rss()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{http_code}",
         f"http://127.0.0.1:{target.port}{path}"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    took = time.monotonic() - started
    done.set()
    sampler.join()
    received, status = int(out[0]), int(out[1])
    assert status == 200 and received == size, out
    return {"target": target.name, "bytes": received, "seconds": took,
            "rss_before_mib": before, "rss_peak_mib": peak, "extra_mib": peak - before}


MB_PER_MIB = 1.048576
"""The memory targets are in MB (10^6 bytes); RSS is measured in MiB."""


def _ratio_cell(ratios: list[float]) -> str:
    interval = ratio_interval(ratios)
    if interval is not None:
        return str(interval)
    return f"{ratios[0]:.2f}x (one round)" if ratios else "-"


def _ratio_verdict(ratios: list[float], goal: float, *, at_least: bool) -> str:
    interval = ratio_interval(ratios)
    if interval is not None:
        return judge(interval, goal, at_least=at_least)
    if not ratios:
        return "-"
    met = ratios[0] >= goal if at_least else ratios[0] <= goal
    return ("met" if met else "missed") + " (one round: no interval)"


def _ratios(row: Row | None, figure: str) -> list[float]:
    """A row's per-round ratios to nginx: of req/s ("rps") or of p99 ("p99")."""
    if row is None:
        return []
    return row.rps_ratio_rounds if figure == "rps" else row.p99_ratio_rounds


def targets_section(rows: list[Row], startup: list[dict[str, Any]],
                    idle: list[dict[str, float | str]],
                    title: str = "The targets in this run") -> list[str]:
    """Issue 6's targets against this run: each ratio to nginx with its 95% interval over the
    rounds (verdict.py), HAProxy's in the same cells beside it for scale."""
    by_key = {(r.target, r.workers, r.body, r.connections): r for r in rows}
    lines = [
        f"## {title}", "",
        "Each ratio to nginx is the geometric mean of the rounds' ratios with its 95% interval "
        "(Student's t over the rounds' log ratios; benchmarks/verdict.py). A target is met "
        "when the whole interval is on its good side, missed when the whole of it is on the "
        "other; otherwise this run cannot tell, and the verdict says on which side the centre "
        "lies. HAProxy's figures for the same cells show how close to nginx a fast proxy "
        "comes on this machine.", "",
        "| target | cell | failover-proxy | HAProxy | verdict |", "|---|---|---|---|---|",
    ]
    checks = [("req/s >= 1.0x nginx", "small", 1.0, True, "rps"),
              ("req/s >= 0.9x nginx", "64k", 0.9, True, "rps"),
              ("p99 <= 1.5x nginx", "small", 1.5, False, "p99"),
              ("p99 <= 1.5x nginx", "64k", 1.5, False, "p99")]
    for label, body, goal, at_least, figure in checks:
        for workers in ("1", "all"):
            for connections in sorted({r.connections for r in rows}):
                if figure == "p99" and connections != 64:
                    continue
                ours = by_key.get(("failover-proxy", workers, body, connections))
                if ours is None:
                    continue
                haproxy = by_key.get(("haproxy", workers, body, connections))
                lines.append(
                    f"| {label} | workers={workers}, {body}, {connections} conns "
                    f"| {_ratio_cell(_ratios(ours, figure))} "
                    f"| {_ratio_cell(_ratios(haproxy, figure))} "
                    f"| {_ratio_verdict(_ratios(ours, figure), goal, at_least=at_least)} |")
    for entry in startup:
        if entry["target"] != "failover-proxy":
            continue
        mb = entry["worker_rss_mib"] * MB_PER_MIB
        where = f"workers={entry['workers']}: the largest worker"
        if entry["master_rss_mib"] is not None:
            where += f" (its supervisor: {entry['master_rss_mib']:.1f} MiB)"
        verdict = "met" if mb <= 30 else "missed"
        lines.append(f"| idle RSS <= 30 MB per worker | {where} "
                     f"| {mb:.1f} MB ({entry['worker_rss_mib']:.1f} MiB) | | {verdict} |")
    for entry in idle:
        if entry["target"] != "failover-proxy":
            continue
        mb = float(entry["extra_mib"]) * MB_PER_MIB
        lines.append(f"| {entry['connections']} idle connections <= 100 MB extra | workers=1 "
                     f"| +{mb:.1f} MB (+{float(entry['extra_mib']):.1f} MiB) | "
                     f"| {'met' if mb <= 100 else 'missed'} |")
    return [*lines, ""]


def markdown(rows: list[Row], latency: list[dict[str, Any]], startup: list[dict[str, Any]],
             idle: list[dict[str, float | str]], stream: dict[str, float | str],
             args: argparse.Namespace) -> str:
    lines = [
        *targets_section(rows, startup, idle),
        "## Throughput and latency", "",
        f"wrk, {args.duration:g} s per run, median of {args.rounds} alternating rounds (ratios to "
        "nginx: the median of each round's ratio, as the machine's speed drifts between runs; "
        "within a worker count nginx runs right beside HAProxy and failover-proxy); backend: "
        f"nginx (1 worker) serving 100 B (/small) and 64 KiB (/64k); {CORES} cores. "
        "workers=1: the proxy pinned to core 0, backend and wrk (1 thread) on core 1; "
        f"workers=all: {CORES} workers/threads each, unpinned, wrk with 2 threads. "
        "Every proxy keeps connections to the backend alive and adds the same header fields "
        f"({HEADER_FIELDS}); access logs off for all; "
        "failover-proxy with health checks, retries, metrics and its admin listener on.",
        "",
        "python-floor (workers=1 only): benchmarks/floor_proxy.py, the least a Python proxy on "
        "uvloop and llhttp (httptools) does: parse each request and rebuild its head, forward "
        "each response as it came, with none of failover-proxy's features. It shows how far "
        "Python itself is from nginx on this machine in the same run.",
        "",
        "RSS after the run: per worker (the largest), and of the master or supervisor where "
        "there is one (nginx and failover-proxy, for one worker too); HAProxy is a single "
        "process that serves traffic and runs everything else itself.",
        "",
        "CPU us/req: the user and system CPU time charged to the target's processes during "
        "the run (/proc/PID/stat), per request: what each request costs the machine, steadier "
        "than req/s where the load generator and the backend share the cores. The kernel's "
        "loopback work for a packet is charged to whichever process runs when it is done, so a "
        "share of it belongs to wrk or the backend; that share is alike for every proxy.",
        "",
        "TCP timeouts: the kernel's retransmission timeouts on the machine during each round "
        "(TcpExt TCPTimeouts). Linux waits at least 200 ms before retransmitting, so a round with "
        "timeouts has a p99 near or above 200 ms whatever the proxy does.",
        "",
        "| target | workers | body | conns | req/s | p50 ms | p99 ms | errors | worker RSS MiB "
        "| master RSS MiB | req/s vs nginx | per round | p99 vs nginx | p99 per round "
        "| CPU us/req | CPU vs nginx | TCP timeouts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"backend": 0, "nginx": 1, "haproxy": 2, "python-floor": 3, "failover-proxy": 4}
    for row in sorted(rows, key=lambda r: (r.body, r.connections, r.workers, order[r.target])):
        ratio = f"{row.rps_vs_nginx:.2f}x" if row.rps_vs_nginx else ""
        p99 = f"{row.p99_vs_nginx:.2f}x" if row.p99_vs_nginx else ""
        main = f"{row.main_rss_mib:.1f}" if row.main_rss_mib is not None else "-"
        cpu_ratio = f"{row.cpu_vs_nginx:.2f}x" if row.cpu_vs_nginx else ""
        lines.append(
            f"| {row.target} | {row.workers} | {row.body} | {row.connections} | "
            f"{row.requests_per_second:.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} | {row.errors} "
            f"| {row.worker_rss_mib:.1f} | {main} | {ratio} | "
            f"{', '.join(f'{v:.2f}' for v in row.rps_ratio_rounds)} | {p99} | "
            f"{', '.join(f'{v:.1f}' for v in row.p99_rounds)} | "
            f"{row.cpu_us_per_request:.1f} | {cpu_ratio} | "
            f"{', '.join(str(v) for v in row.tcp_timeouts)} |"
        )
    if not stream:  # a throughput-only run (--bodies)
        return "\n".join([*lines, ""])
    lines += ["", f"Latency at a fixed {args.rate} req/s (hey, 50 clients, "
              f"{args.rate_seconds:g} s, median of {args.rate_rounds} alternating rounds), "
              "workers=1:",
              "",
              "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | errors | p99 per round |",
              "|---|---|---|---|---|---|---|"]
    for entry in latency:
        per_round = ", ".join(f"{v:.1f}" for v in entry["p99_rounds_ms"])
        lines.append(f"| {entry['target']} | {entry['p50_ms']:.2f} | {entry['p99_ms']:.2f} | "
                     f"{entry['added_p50_ms']:.2f} | {entry['added_p99_ms']:.2f} | "
                     f"{entry['errors']} | {per_round} |")
    lines += ["", "Idle RSS right after start, before any traffic (MiB):", "",
              "| target | workers | per worker | master or supervisor |", "|---|---|---|---|"]
    for entry in startup:
        master = "-" if entry["master_rss_mib"] is None else f"{entry['master_rss_mib']:.1f}"
        lines.append(f"| {entry['target']} | {entry['workers']} | "
                     f"{entry['worker_rss_mib']:.1f} | {master} |")
    lines += ["", "Memory (workers=1, all processes of the target):", "",
              "| target | idle RSS MiB | with idle keep-alive connections | extra MiB |",
              "|---|---|---|---|"]
    for entry in idle:
        lines.append(f"| {entry['target']} | {entry['rss_before_mib']:.1f} | "
                     f"{entry['connections']}: {entry['rss_with_idle_mib']:.1f} | "
                     f"{entry['extra_mib']:.1f} |")
    lines += ["", f"Streaming {int(stream['bytes']) >> 20} MiB through failover-proxy (workers=1): "
              f"RSS {stream['rss_before_mib']:.1f} -> peak {stream['rss_peak_mib']:.1f} MiB "
              f"(+{stream['extra_mib']:.1f}) in {stream['seconds']:.1f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Many short rounds rather than a few long ones: a round's ratio to nginx swings by as much
    # with 1 s runs as with 3 s runs (ab.py: a log-ratio spread of 0.057 for both), so 24 rounds
    # of 1 s narrow an interval by sqrt(3) against 8 of 3 s in the same time (about 25 minutes
    # in all).
    parser.add_argument("--duration", type=float, default=1)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--rate-seconds", type=float, default=8)
    parser.add_argument("--rate-rounds", type=int, default=8,
                        help="rounds of the fixed-rate latency runs")
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true",
                        help="one round of 2 s runs, 64 connections only (a smoke test)")
    parser.add_argument("--bodies", choices=BODIES, nargs="+", default=list(BODIES),
                        help="measure these bodies only, throughput alone (compare-BODY.md)")
    args = parser.parse_args()
    subset = args.bodies != list(BODIES)
    if args.quick:
        args.duration, args.rounds, args.rate_seconds, args.rate_rounds = 2, 1, 3, 1
        args.idle = 2000
    connection_counts = [64] if args.quick else [64, 256]
    ensure_tools()
    limit = raise_open_file_limit()  # per process: this one holds the client ends
    if limit < args.idle + 1000:
        args.idle = max(100, limit - 1000)
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "www").mkdir()
        (tmp / "www" / "64k").write_bytes(os.urandom(64 * 1024))
        with open(tmp / "www" / "1g", "wb") as big:
            big.truncate(1 << 30)  # sparse: reads as zeros, costs no disk
        backend_port = free_port()
        backend = start_nginx("backend", "1", backend_block(backend_port, tmp / "www"), tmp, 1)
        processes.append(backend)
        try:
            wait_port(backend_port)
            direct = Target("backend", "1", backend_port, backend)
            targets = start_targets(tmp, backend_port)
            processes += [t.process for t in targets]
            floor = start_floor(tmp, backend_port)
            processes.append(floor.process)
            startup = startup_memory(targets)
            check_same_fields(targets)
            rows = measure([*targets, floor], direct, args.duration, args.rounds,
                           connection_counts, args.bodies)
            latency: list[dict[str, Any]] = []
            idle: list[dict[str, float | str]] = []
            stream: dict[str, float | str] = {}
            if not subset:
                print("fixed-rate latency…", flush=True)
                latency = fixed_rate_latency(targets, direct, args.rate, args.rate_seconds,
                                             args.rate_rounds)
                print("idle connections…", flush=True)
                idle = idle_connection_memory(targets, args.idle)
                ours = next(t for t in targets
                            if t.name == "failover-proxy" and t.workers == "1")
                print("streaming 1 GiB…", flush=True)
                stream = streaming_memory(ours, "/1g", 1 << 30)
        finally:
            for process in processes:
                process.send_signal(signal.SIGINT if process is not backend else signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
    table = markdown(rows, latency, startup, idle, stream, args)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "compare-" + "-".join(args.bodies) if subset else "compare"
    (RESULTS / f"{name}.md").write_text(table)
    (RESULTS / f"{name}.json").write_text(json.dumps({
        "cores": CORES, "duration_s": args.duration, "rounds": args.rounds,
        "throughput": [asdict(row) for row in rows], "fixed_rate_latency": latency,
        "startup_memory": startup, "idle_connections": idle, "streaming": stream,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
