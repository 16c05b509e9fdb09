"""The endpoint layer's cost: one backend named by a hostname of 4 addresses against 4 backends of
one address each, the same 4 nginx servers behind both.

A real DNS server on loopback (the tests' dnslib server) answers the name with 127.0.0.2-5; the
other proxy lists the 4 addresses as backends. Both run as `failover-proxy run` with one worker
pinned to core 0 (wrk on core 1), and take turns, round after round, so that the machine's drift
hits both alike. Reported: req/s, p99 and CPU per request (supervisor and worker together), and
the per-round ratio of the first to the second.

    python benchmarks/endpoints.py [--rounds 8] [--duration 3] [--connections 64]

Writes benchmarks/results/endpoints.md and endpoints.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    RESULTS,
    ROOT,
    cpu_seconds,
    ensure_tools,
    free_port,
    run_wrk,
    start_failover_proxy,
    start_nginx,
    wait_ready,
)

sys.path.insert(0, str(ROOT))
from tests.dnsserver import LoopbackDNS  # the tests' real DNS server

ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
NAME = "lb.bench.test"


def proxy_config(port: int, backends: str, dns: LoopbackDNS) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: {port}, backlog: 4096}}
admin: {{host: 127.0.0.1, port: {free_port()}}}
workers: 1
access_log: {{enabled: false}}
upstreams:
  bench:
    backends:
{backends}
    dns: {{nameservers: ["{dns.nameserver}"], min_ttl: 30s}}
    pool: {{max_idle_per_backend: 256}}
    health_check: {{path: /small, interval: 1s}}
    retry: {{attempts: 2}}
routes:
  - {{path_prefix: /, upstream: bench}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    ensure_tools({"nginx": "nginx", "wrk": "wrk"})
    dns = LoopbackDNS()
    dns.start()
    dns.set_addresses(NAME, list(ADDRESSES), ttl=300)
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        backend_port = free_port()
        listens = " ".join(f"listen {a}:{backend_port} backlog=4096;" for a in ADDRESSES)
        block = (f'server {{ {listens} location = /small '
                 f'{{ default_type text/plain; return 200 "{"x" * 100}"; }} }}')
        processes.append(start_nginx("backends", "1", block, tmp, None))
        one_name = f'      - {{name: lb, url: "http://{NAME}:{backend_port}", provider: local}}'
        four = "\n".join(
            f'      - {{name: b{i}, url: "http://{a}:{backend_port}", provider: local}}'
            for i, a in enumerate(ADDRESSES)
        )
        targets = {}
        for label, backends in (("1 backend of 4 addresses", one_name),
                                ("4 backends of 1 address", four)):
            port = free_port()
            conf = tmp / f"{len(targets)}.yaml"
            conf.write_text(proxy_config(port, backends, dns))
            process = start_failover_proxy(conf, 0)
            processes.append(process)
            targets[label] = (port, process)
        try:
            wait_ready([port for port, _ in targets.values()])
            samples: dict[str, list[tuple[float, float, float]]] = {t: [] for t in targets}
            for port, _ in targets.values():  # warm-up
                run_wrk(f"http://127.0.0.1:{port}/small", 1, args.connections)
            for round_number in range(args.rounds):
                order = list(targets.items())
                if round_number % 2:
                    order.reverse()
                for label, (port, process) in order:
                    before = cpu_seconds(process.pid)
                    result = run_wrk(f"http://127.0.0.1:{port}/small", args.duration,
                                     args.connections)
                    assert result.errors == 0, f"{label}: {result.errors} errors"
                    cpu = (cpu_seconds(process.pid) - before) / max(1, result.requests) * 1e6
                    samples[label].append((result.requests_per_second, result.p99_ms, cpu))
                    print(f"  round {round_number + 1} {label:26} {result.requests_per_second:8.0f}"
                          f" req/s  p99 {result.p99_ms:6.2f} ms  CPU {cpu:5.1f} us/req",
                          flush=True)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)
            dns.stop()
    first, second = list(samples)
    ratios = [a[0] / b[0] for a, b in zip(samples[first], samples[second], strict=True)]
    cpu_ratios = [a[2] / b[2] for a, b in zip(samples[first], samples[second], strict=True)]
    summary = {
        label: {
            "requests_per_second": statistics.median(s[0] for s in rows),
            "p99_ms": statistics.median(s[1] for s in rows),
            "cpu_us_per_request": statistics.median(s[2] for s in rows),
            "rounds": rows,
        }
        for label, rows in samples.items()
    }
    lines = [
        "# The endpoint layer: one hostname of 4 addresses against 4 backends",
        "",
        f"`python benchmarks/endpoints.py --rounds {args.rounds} --duration {args.duration:g} "
        f"--connections {args.connections}`: wrk, {args.connections} keep-alive connections, "
        "100-byte responses from nginx listening on 127.0.0.2-5; failover-proxy with one "
        "worker on core 0, wrk on core 1; the two configurations take turns; medians.",
        "",
        "| configuration | req/s | p99 (ms) | CPU per request (µs) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, row in summary.items():
        lines.append(f"| {label} | {row['requests_per_second']:.0f} | {row['p99_ms']:.2f} | "
                     f"{row['cpu_us_per_request']:.1f} |")
    lines += [
        "",
        f"Per-round ratio of req/s, {first} to {second}: median "
        f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)}); "
        f"of CPU per request: median {statistics.median(cpu_ratios):.3f}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    (RESULTS / "endpoints.md").write_text(text)
    (RESULTS / "endpoints.json").write_text(json.dumps(
        {"summary": summary, "rps_ratios": ratios, "cpu_ratios": cpu_ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
