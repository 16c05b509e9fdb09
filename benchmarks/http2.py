"""HTTP/2 from clients, h2c (prior knowledge) and h2 (TLS, ALPN): failover-proxy against nginx,
both in front of the same HTTP/1.1 nginx backend (compare.py's configurations, the listener
turned to HTTP/2); and failover-proxy in front of an h2c nginx backend (`protocol: h2c`: the
upstream cells; nginx proxies HTTP/1.1 only, so its figures are the same baseline).

h2load (Debian nghttp2-client) opens `c` connections with `m` streams in flight on each, asks
for the 100-byte /small or a 64 KiB file for a fixed time, and reports req/s (over TLS: an ECDSA
P-256 certificate, TLS 1.3). Each proxy runs one worker pinned
to core 0, h2load and the backends on core 1; targets alternate round by round (the order
flips); each figure is the median over rounds, ratios the medians of the per-round ratios to
nginx. CPU per request is what the proxy's processes were charged over the run. Then the
memory 10,000 idle HTTP/2 connections take (each after one answered request), per proxy.

    python benchmarks/http2.py [--rounds 6] [--duration 3] [--idle 10000]

(Not named h2.py: with benchmarks/ first on the import path, that name would shadow the `h2`
package the simulated backends import.)

Writes benchmarks/results/h2.md and h2.json. The goal (issue 38) is >= 1.0x nginx req/s and
<= 1.0x its CPU per request in every cell, and <= 150 MB for the idle connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import (
    RESULTS,
    cpu_seconds,
    ensure_tools,
    free_port,
    pinned,
    process_tree,
    raise_open_file_limit,
    rss_mib,
    start_failover_proxy,
    start_nginx,
    wait_port,
    wait_ready,
)
from compare import backend_block, failover_config, nginx_proxy_block
from tls import certificate

HUNG = -1
"""The failed count of an h2load run stopped with streams unanswered."""
TRANSPORTS = ("h2c", "h2")
BODIES = {"small": "/small", "64k": "/64k"}
LOADS = {"c16 m10": (16, 10), "c64 m100": (64, 100)}
CELLS = {f"{transport} {body} {load}": (transport, path, *shape)
         for transport in TRANSPORTS for body, path in BODIES.items()
         for load, shape in LOADS.items()}
"""cell name -> (transport, path, connections, streams per connection)"""
TARGETS = ("nginx", "failover-proxy", "failover-proxy h2c upstream")
IDLE_TARGETS = ("nginx", "failover-proxy")
_FINISHED = re.compile(rb"finished in [\d.]+s, ([\d.]+) req/s")
_SUCCEEDED = re.compile(
    rb"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed"
)


def run_h2load(port: int, seconds: float, connections: int, streams: int, tls: bool = False,
               path: str = "/small") -> tuple[float, int, int]:
    """req/s, requests that succeeded and failed: h2load against `path` for `seconds`. A run
    whose streams are still unanswered 30 s after its end is stopped and counted as one
    failed request and no rate (HUNG), so it marks its cell instead of ending the benchmark."""
    scheme = "https" if tls else "http"
    try:
        output = subprocess.run(
            pinned(1, ["h2load", "-D", f"{seconds:g}", "-c", str(connections),
                       "-m", str(streams), "-t", "1", f"{scheme}://127.0.0.1:{port}{path}"]),
            capture_output=True, check=True, timeout=seconds + 30,
        ).stdout
    except subprocess.TimeoutExpired:
        return 0.0, 0, HUNG
    rate = _FINISHED.search(output)
    counts = _SUCCEEDED.search(output)
    if rate is None or counts is None:
        raise RuntimeError(f"h2load said:\n{output.decode(errors='replace')}")
    return float(rate.group(1)), int(counts.group(1)), int(counts.group(2))


def start(tmp: Path, backend_port: int, h2c_backend_port: int, transport: str
          ) -> dict[str, tuple[int, subprocess.Popen[bytes]]]:
    """The three targets with an h2c (prior knowledge) or h2 (TLS) listener."""
    started = {}
    port = free_port()
    listen = f"listen 127.0.0.1:{port} http2 backlog=4096; http2_max_concurrent_streams 128;"
    failover_tls = ""
    if transport == "h2":
        cert, key, _ = certificate(tmp)
        listen = (f"listen 127.0.0.1:{port} ssl http2 backlog=4096; "
                  f"http2_max_concurrent_streams 128; ssl_certificate {cert}; "
                  f"ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;")
        failover_tls = f", tls: {{certificates: [{{cert_file: {cert}, key_file: {key}}}]}}"
    # 64 connections of 100 streams are 6,400 requests in flight, each wanting a connection to
    # the HTTP/1.1 backend: both proxies keep that many (for 4 s idle: the other targets' in
    # the meantime are closed). With compare.py's 256 both churn thousands of connections a
    # second, the cell measures connect and close, and the TIME_WAIT left behind uses up the
    # ephemeral ports within a few runs (a proxy then stalls on connects).
    block = nginx_proxy_block(port, backend_port).replace(
        f"listen 127.0.0.1:{port} backlog=4096;", listen).replace(
        "keepalive 256;", "keepalive 6400; keepalive_timeout 4s;")
    started["nginx"] = (port, start_nginx(f"nginx-{transport}", "1", block, tmp, 0))
    # 64 connections of 100 streams are 6,400 requests in flight, past the circuit breaker's
    # default 1,024 per backend (HTTP/1 clients never have more in flight than connections):
    # raised, as nginx has no such bound.
    breaker = "    circuit_breaker: {max_requests_per_backend: 100000, max_requests: 100000}\n"
    for name, origin, extra in (("failover-proxy", backend_port, ""),
                                ("failover-proxy h2c upstream", h2c_backend_port,
                                 "    protocol: h2c\n")):
        port = free_port()
        conf = tmp / f"{name.replace(' ', '-')}-{transport}.yaml"
        conf.write_text(failover_config(port, origin, "1").replace(
            "backlog: 4096}", f"backlog: 4096, http2: {{h2c: true}}{failover_tls}}}").replace(
            "    retry: {attempts: 2}\n", "    retry: {attempts: 2}\n" + extra + breaker).replace(
            "max_idle_per_backend: 256}", "max_idle_per_backend: 6400, idle_timeout: 4s}"))
        started[name] = (port, start_failover_proxy(conf, 0))
    wait_ready([port for port, _ in started.values()])
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--idle", type=int, default=10_000)
    args = parser.parse_args()
    ensure_tools({"nginx": "nginx", "h2load": "nghttp2-client"})
    raise_open_file_limit()
    samples: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "www").mkdir()
        (tmp / "www" / "64k").write_bytes(b"x" * 65536)
        backend_port = free_port()
        backend = start_nginx("backend", "1", backend_block(backend_port, tmp / "www"), tmp, 1)
        h2c_port = free_port()
        h2c_backend = start_nginx("backend-h2c", "1", backend_block(h2c_port, tmp / "www").replace(
            f"listen 127.0.0.1:{h2c_port} ", f"listen 127.0.0.1:{h2c_port} http2 ").replace(
            "location = /small", "http2_max_concurrent_streams 1000; location = /small"),
            tmp, 1)
        wait_port(backend_port)
        wait_port(h2c_port)
        targets = {transport: start(tmp, backend_port, h2c_port, transport)
                   for transport in TRANSPORTS}
        try:
            for transport, started in targets.items():  # warm up
                for port, _ in started.values():
                    run_h2load(port, 1, 16, 10, tls=transport == "h2")
            for round_number in range(args.rounds):
                order = list(TARGETS) if round_number % 2 == 0 else list(reversed(TARGETS))
                for cell, (transport, path, connections, streams) in CELLS.items():
                    for name in order:
                        port, process = targets[transport][name]
                        before = cpu_seconds(process.pid)
                        rate, done, failed = run_h2load(port, args.duration, connections,
                                                        streams, transport == "h2", path)
                        cpu = (cpu_seconds(process.pid) - before) / max(1, done)
                        samples.setdefault((name, cell), []).append((rate, cpu * 1e6, failed))
                        print(f"  round {round_number + 1} {cell:20} {name:27} {rate:9.0f} "
                              f"req/s  CPU {cpu * 1e6:6.1f} us/req  failed {failed}", flush=True)
            idle = [idle_memory(name, *targets["h2c"][name], args.idle) for name in IDLE_TARGETS]
        finally:
            for process in [p for started in targets.values() for _, p in started.values()]:
                process.terminate()
            backend.terminate()
            h2c_backend.terminate()
    write_results(samples, idle, args)


async def _hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` HTTP/2 connections, each after one answered request, left open: the preface,
    an empty SETTINGS, a GET on stream 1, its answer read to the end of the stream."""
    from hpack import Encoder

    block = Encoder().encode([(":method", "GET"), (":scheme", "http"), (":path", "/small"),
                              (":authority", "bench")])
    request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0"
               + len(block).to_bytes(3, "big") + b"\x01\x05\0\0\0\x01" + block)
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        buffer = b""
        while True:  # frames until one on stream 1 carries END_STREAM
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                buffer += await reader.read(65536)
            length, flags = int.from_bytes(buffer[:3], "big"), buffer[4]
            stream = int.from_bytes(buffer[5:9], "big")
            if buffer[3] == 4 and not flags & 1:
                writer.write(b"\0\0\0\x04\x01\0\0\0\0")  # ACK its SETTINGS
            buffer = buffer[9 + length :]
            if stream == 1 and flags & 1:
                break
        writers.append(writer)

    for start_at in range(0, count, 500):
        await asyncio.gather(*(one() for _ in range(min(500, count - start_at))))
    return writers


def tree_rss(pid: int) -> float:
    """RSS of a proxy's processes together (master or supervisor and workers), MiB."""
    return sum(rss_mib(each) for each in process_tree(pid))


def idle_memory(name: str, port: int, process: subprocess.Popen[bytes],
                count: int) -> dict[str, float | str]:
    before = tree_rss(process.pid)

    async def hold() -> float:
        writers = await _hold_idle(port, count)
        await asyncio.sleep(1.0)
        held = tree_rss(process.pid)
        for writer in writers:
            writer.close()
        await asyncio.sleep(0.5)
        return held

    held = asyncio.run(hold())
    print(f"  {name:15} {count} idle HTTP/2 connections: {before:.1f} -> {held:.1f} MiB",
          flush=True)
    return {"target": name, "connections": count, "rss_before_mib": before,
            "rss_with_idle_mib": held, "extra_mib": held - before}


def write_results(samples: dict[tuple[str, str], list[tuple[float, float, int]]],
                  idle: list[dict[str, float | str]], args: argparse.Namespace) -> None:
    rows = []
    for cell in CELLS:
        nginx = samples[("nginx", cell)]
        for name in TARGETS:
            runs = samples[(name, cell)]
            ratios = [mine[0] / theirs[0] for mine, theirs in zip(runs, nginx, strict=True)]
            cpu_ratios = [mine[1] / theirs[1] for mine, theirs in zip(runs, nginx, strict=True)]
            rows.append({
                "target": name, "cell": cell,
                "requests_per_second": statistics.median(r[0] for r in runs),
                "cpu_us_per_request": statistics.median(r[1] for r in runs),
                "failed": sum(r[2] for r in runs if r[2] != HUNG),
                "hung_runs": sum(1 for r in runs if r[2] == HUNG),
                "rps_vs_nginx": statistics.median(ratios),
                "cpu_vs_nginx": statistics.median(cpu_ratios),
            })
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "h2.json").write_text(json.dumps(
        {"rounds": args.rounds, "duration": args.duration, "rows": rows, "idle": idle},
        indent=2) + "\n")
    lines = [
        "# HTTP/2 from clients (h2c and h2 over TLS): failover-proxy against nginx",
        "",
        f"h2load, {args.duration:g} s per run, median of {args.rounds} alternating rounds; "
        "one worker each pinned to core 0, h2load and the nginx backends (HTTP/1.1, and h2c "
        "for the h2c upstream target; the 100-byte /small or a 64 KiB file) on core 1; h2: "
        "TLS 1.3, an ECDSA P-256 certificate. Ratios are the medians of the per-round ratios "
        "to nginx (which proxies HTTP/1.1 in every cell).",
        "",
        "| cell | target | req/s | vs nginx | CPU us/req | CPU vs nginx | failed | hung runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['cell']} | {row['target']} | {row['requests_per_second']:.0f} | "
            f"{row['rps_vs_nginx']:.2f}x | {row['cpu_us_per_request']:.1f} | "
            f"{row['cpu_vs_nginx']:.2f}x | {row['failed']} | {row['hung_runs']} |")
    lines += ["", "| idle HTTP/2 connections | target | RSS before | RSS with them | extra |",
              "|---|---|---|---|---|"]
    for row in idle:
        lines.append(f"| {row['connections']} | {row['target']} | {row['rss_before_mib']:.1f} MiB"
                     f" | {row['rss_with_idle_mib']:.1f} MiB | {row['extra_mib']:.1f} MiB |")
    (RESULTS / "h2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
