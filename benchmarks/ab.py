"""Throughput of two or more failover-proxy checkouts side by side, with nginx, in the same
minutes: for the req/s and CPU side of a hot-path change's before/after.

On this VM the machine's speed drifts by up to a third between minutes, and compare.py's ratio
to nginx moves by more between days than most changes are worth. Here every checkout runs with
one worker, pinned to core 0 (the backend and wrk on core 1, as compare.py's workers=1 rows),
in short alternating runs whose order flips each round; each figure is the median over rounds
of its ratio to the first checkout in the same round. CPU per request is the user and system
time of the proxy's processes (/proc), which does not depend on who had the core that second.
instructions.py gives the steadier count; this gives the time it buys.

    python benchmarks/ab.py [--rounds 12] [--seconds 3] [--connections 64] [--body small|64k]
                            [LABEL=]CHECKOUT [[LABEL=]CHECKOUT ...]

Each CHECKOUT is a source tree with its own `.venv` (as for instructions.py); the first is the
reference. Writes benchmarks/results/ab.md and ab.json (ab-64k.* with --body 64k).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    RESULTS,
    cpu_seconds,
    ensure_tools,
    free_port,
    pinned,
    run_wrk,
    start_nginx,
    wait_port,
)
from compare import backend_block, failover_config, nginx_proxy_block, per_round_ratios


def start(label: str, checkout: Path, backend_port: int,
          tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The checkout's failover-proxy with compare.py's configuration and one worker, on core 0."""
    port = free_port()
    conf = tmp / f"{label}.yaml"
    conf.write_text(failover_config(port, backend_port, "1"))
    process = subprocess.Popen(
        pinned(0, [str(checkout / ".venv" / "bin" / "python"), "-m", "failover_proxy", "run",
                   "-c", str(conf)]),
        cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--body", choices=("small", "64k"), default="small",
                        help="100-byte responses (the default) or 64 KiB ones")
    parser.add_argument("checkouts", nargs="+")
    args = parser.parse_args()
    ensure_tools({"nginx": "nginx", "wrk": "wrk"})
    labels: dict[str, Path] = {}
    for spec in args.checkouts:
        label, _, path = spec.rpartition("=")
        labels[label or path] = Path(path).resolve()
    processes: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    samples: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fp-ab-") as name:
        tmp = Path(name)
        (tmp / "www").mkdir()
        (tmp / "www" / "64k").write_bytes(os.urandom(64 * 1024))
        backend_port = free_port()
        backend = start_nginx("backend", "1", backend_block(backend_port, tmp / "www"), tmp, 1)
        try:
            for label, checkout in labels.items():
                processes[label] = start(label, checkout, backend_port, tmp)
            nginx_port = free_port()
            processes["nginx"] = (start_nginx(
                "nginx", "1", nginx_proxy_block(nginx_port, backend_port), tmp, 0), nginx_port)
            wait_port(backend_port)
            for _, port in processes.values():
                wait_port(port)
            for _, port in processes.values():  # warm up pools and caches
                run_wrk(f"http://127.0.0.1:{port}/small", 1, args.connections)
            order = list(processes)
            samples = {name: [] for name in order}
            for round_number in range(args.rounds):
                for name in order if round_number % 2 == 0 else reversed(order):
                    process, port = processes[name]
                    before = cpu_seconds(process.pid)
                    result = run_wrk(f"http://127.0.0.1:{port}/{args.body}", args.seconds,
                                     args.connections)
                    cpu = (cpu_seconds(process.pid) - before) / max(1, result.requests) * 1e6
                    samples[name].append((result.requests_per_second, cpu))
                print(f"round {round_number + 1}: " + "  ".join(
                    f"{name} {samples[name][-1][0]:.0f} req/s {samples[name][-1][1]:.1f} us/req"
                    for name in order), flush=True)
        finally:
            for process, _ in processes.values():
                process.send_signal(signal.SIGINT)
            backend.send_signal(signal.SIGTERM)
            for process in [backend, *(process for process, _ in processes.values())]:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
    reference = next(iter(labels))
    lines = ["| target | req/s (median) | CPU us/req (median) | req/s vs " + reference
             + " | CPU/req vs " + reference + " | req/s ratio per round |",
             "|---|---|---|---|---|---|"]
    for name, values in samples.items():
        ratios = per_round_ratios([v[0] for v in values], [v[0] for v in samples[reference]])
        cpu_ratios = per_round_ratios([v[1] for v in values], [v[1] for v in samples[reference]])
        lines.append(
            f"| {name} | {statistics.median(v[0] for v in values):.0f} "
            f"| {statistics.median(v[1] for v in values):.1f} "
            f"| {statistics.median(ratios):.3f}x | {statistics.median(cpu_ratios):.3f}x "
            f"| {', '.join(f'{r:.2f}' for r in ratios)} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "ab" if args.body == "small" else f"ab-{args.body}"
    body_text = "100-byte" if args.body == "small" else "64 KiB"
    (RESULTS / f"{name}.md").write_text(
        "# Same-minute A/B (benchmarks/ab.py)\n\n"
        f"wrk, {args.connections} connections, {args.seconds} s runs, {args.rounds} rounds, "
        f"alternating (the order flips each round); {body_text} responses from nginx; each "
        "failover-proxy with one worker pinned to core 0 and compare.py's configuration, nginx "
        "with one worker, a keepalive upstream pool and the header fields failover-proxy adds "
        "(compare.py's); ratios are the medians of each round's "
        f"ratio to {reference}.\n\n" + table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"connections": args.connections, "seconds": args.seconds, "reference": reference,
         "body": args.body,
         "checkouts": {label: str(path) for label, path in labels.items()},
         "rounds": {name: [{"requests_per_second": rps, "cpu_us_per_request": cpu}
                           for rps, cpu in values] for name, values in samples.items()}},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
