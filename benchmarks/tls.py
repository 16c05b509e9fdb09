"""TLS termination: failover-proxy against nginx and HAProxy, each terminating TLS with the same
ECDSA P-256 certificate in front of the same nginx backend (compare.py's configurations, the
listener turned to TLS).

Two cells: keep-alive (wrk, 64 connections, many requests per connection: the cost of
encrypting and decrypting), and new connections (wrk with `Connection: close`: a full TLS
handshake per request). wrk resumes sessions where the server lets it, so session caches and
tickets are off on all three: every handshake is a full one. Each proxy runs one worker pinned to
core 0, wrk pinned to core 1; targets alternate round by round (the order flips), and each
figure is the median over rounds; ratios are the medians of the per-round ratios to nginx. CPU
per request is what the proxy's processes were charged (user + system) over the run, divided
by requests.

    python benchmarks/tls.py [--rounds 8] [--duration 3]

Writes benchmarks/results/tls.md and tls.json. Goal (issue 29): keep-alive req/s >= 0.8x
nginx's, handshakes/s >= 0.7x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import trustme
from common import (
    RESULTS,
    cpu_seconds,
    ensure_tools,
    free_port,
    pinned,
    raise_open_file_limit,
    run_wrk,
    start_failover_proxy,
    start_nginx,
    wait_port,
    wait_ready,
)
from compare import backend_block, failover_config, haproxy_conf, nginx_proxy_block

CELLS = {"keep-alive": (), "handshake": ("Connection: close",)}
TARGETS = ("nginx", "haproxy", "failover-proxy")


def certificate(tmp: Path) -> tuple[Path, Path, Path]:
    """An ECDSA P-256 certificate for 127.0.0.1 (cert, key, and both in one file for HAProxy)."""
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    issued = ca.issue_cert("127.0.0.1", "bench.test", key_type=trustme.KeyType.ECDSA)
    cert, key, both = tmp / "bench.crt", tmp / "bench.key", tmp / "bench.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, both


def start(tmp: Path, backend_port: int, cert: Path, key: Path, both: Path
          ) -> dict[str, tuple[int, subprocess.Popen[bytes]]]:
    started = {}
    port = free_port()
    block = nginx_proxy_block(port, backend_port).replace(
        f"listen 127.0.0.1:{port} backlog=4096;",
        f"listen 127.0.0.1:{port} ssl backlog=4096; ssl_certificate {cert}; "
        f"ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3; "
        "ssl_session_cache off; ssl_session_tickets off;")
    started["nginx"] = (port, start_nginx("nginx-tls", "1", block, tmp, 0))
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(haproxy_conf(port, backend_port, 1)
                    .replace(f"bind 127.0.0.1:{port}",
                             f"bind 127.0.0.1:{port} ssl crt {both} alpn http/1.1 no-tls-tickets")
                    .replace("X-Forwarded-Proto http", "X-Forwarded-Proto https")
                    .replace("    maxconn 9000\n", "    maxconn 9000\n    tune.ssl.cachesize 0\n",
                             1))
    started["haproxy"] = (port, subprocess.Popen(
        pinned(0, ["haproxy", "-db", "-f", str(conf)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    port = free_port()
    conf = tmp / "failover-proxy.yaml"
    conf.write_text(failover_config(port, backend_port, "1").replace(
        "backlog: 4096}",
        f"backlog: 4096, tls: {{certificates: [{{cert_file: {cert}, key_file: {key}}}], "
        "session_tickets: false}}"))
    started["failover-proxy"] = (port, start_failover_proxy(conf, 0))
    wait_ready([port for port, _ in started.values()])
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    ensure_tools()
    raise_open_file_limit()
    samples: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "www").mkdir()
        backend_port = free_port()
        backend = start_nginx("backend", "1", backend_block(backend_port, tmp / "www"), tmp, 1)
        wait_port(backend_port)
        cert, key, both = certificate(tmp)
        targets = start(tmp, backend_port, cert, key, both)
        try:
            for port, _ in targets.values():  # warm up
                run_wrk(f"https://127.0.0.1:{port}/small", 1, args.connections)
            for round_number in range(args.rounds):
                order = list(TARGETS) if round_number % 2 == 0 else list(reversed(TARGETS))
                for cell, headers in CELLS.items():
                    for name in order:
                        port, process = targets[name]
                        before = cpu_seconds(process.pid)
                        result = run_wrk(f"https://127.0.0.1:{port}/small", args.duration,
                                         args.connections, headers=headers)
                        cpu = (cpu_seconds(process.pid) - before) / max(1, result.requests)
                        samples.setdefault((name, cell), []).append(
                            (result.requests_per_second, result.p99_ms, cpu * 1e6,
                             result.errors))
                        print(f"  round {round_number + 1} {cell:10} {name:15} "
                              f"{result.requests_per_second:9.0f} req/s  p99 "
                              f"{result.p99_ms:6.2f} ms  CPU {cpu * 1e6:6.1f} us/req  "
                              f"errors {result.errors}", flush=True)
        finally:
            for _, process in targets.values():
                process.terminate()
            backend.terminate()
    write_results(samples, args)


def write_results(samples: dict[tuple[str, str], list[tuple[float, float, float, int]]],
                  args: argparse.Namespace) -> None:
    rows = []
    for cell in CELLS:
        nginx = samples[("nginx", cell)]
        for name in TARGETS:
            runs = samples[(name, cell)]
            rows.append({
                "cell": cell, "target": name,
                "requests_per_second": statistics.median(r[0] for r in runs),
                "p99_ms": statistics.median(r[1] for r in runs),
                "cpu_us_per_request": statistics.median(r[2] for r in runs),
                "errors": sum(r[3] for r in runs),
                "rps_vs_nginx": statistics.median(r[0] / n[0] for r, n in zip(runs, nginx,
                                                                              strict=True)),
                "cpu_vs_nginx": statistics.median(r[2] / n[2] for r, n in zip(runs, nginx,
                                                                             strict=True)),
            })
    goals = {"keep-alive": 0.8, "handshake": 0.7}
    lines = [
        "# TLS termination (benchmarks/tls.py)", "",
        f"wrk, {args.connections} connections, {args.rounds} rounds of {args.duration:g} s, "
        "alternating; one worker each pinned to core 0, wrk on core 1; ECDSA P-256 "
        "certificate; 100-byte responses from an nginx backend; no session resumption "
        "(handshake: `Connection: close`, a full handshake per request: session caches and "
        "tickets off). Ratios: medians of the per-round ratios to nginx. `per core` is "
        "requests per second of CPU (1 / CPU per request): what a saturated core would serve, "
        "which the req/s of a cell that does not saturate the proxy's core hides.", "",
        "| cell | target | req/s | p99 | CPU per request | core busy | req/s vs nginx | "
        "per core vs nginx | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['cell']} | {row['target']} | {row['requests_per_second']:,.0f} | "
            f"{row['p99_ms']:.2f} ms | {row['cpu_us_per_request']:.1f} µs | "
            f"{row['requests_per_second'] * row['cpu_us_per_request'] / 1e6:.0%} | "
            f"{row['rps_vs_nginx']:.3f}x | {1 / row['cpu_vs_nginx']:.3f}x | {row['errors']} |")
    lines.append("")
    for cell, goal in goals.items():
        ours = next(r for r in rows if r["cell"] == cell and r["target"] == "failover-proxy")
        rate, per_core = ours["rps_vs_nginx"], 1 / ours["cpu_vs_nginx"]
        lines.append(f"- {cell} (goal {goal}x): failover-proxy at {rate:.3f}x nginx's req/s "
                     f"({'met' if rate >= goal else 'missed'}), {per_core:.3f}x per core "
                     f"({'met' if per_core >= goal else 'missed'}).")
    (RESULTS / "tls.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "tls.json").write_text(json.dumps(
        {"rows": rows, "samples": {f"{k[0]}/{k[1]}": v for k, v in samples.items()}},
        indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
