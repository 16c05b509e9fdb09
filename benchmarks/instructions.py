"""CPU instructions per proxied request, counted by valgrind (callgrind): a figure that does not
drift with the machine's load, for before/after comparisons of hot-path changes.

Throughput on this VM swings by 15-30% from one minute to the next, more than most single
changes to the hot path are worth. Instructions retired by the proxy per request are nearly
deterministic (a run-to-run spread of about 2%, from how many events each loop turn batches), so
a change worth 3% shows. The proxy runs under callgrind with instrumentation off; after a warm-up
it is switched on, the idle proxy is counted for a while (its timers), then wrk sends small
requests over 16 keep-alive connections (the same backend and configuration as compare.py), and
the count, less the idle rate over the same wall time, is divided by the requests wrk
completed. Instructions are not time: allocation, cache misses and system calls weigh
differently. This complements compare.py, it does not replace it.

    python benchmarks/instructions.py [--rounds 3] [--seconds 5] [--keep-dumps DIR] [--body N]
                                      [[LABEL=]CHECKOUT ...]

With --keep-dumps, `callgrind_annotate --inclusive=yes DIR/this-0.callgrind` shows where the
instructions go.

Each CHECKOUT is a source tree with its own `.venv` (e.g. `git worktree add /tmp/before HEAD~1`,
then `python -m venv .venv && .venv/bin/pip install -e .` in it); the default is this one.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BROWSER_HEADERS,
    RESULTS,
    ROOT,
    ensure_tools,
    free_port,
    run_wrk,
    start_nginx,
    wait_port,
)
from compare import SMALL_BODY, failover_config

CONNECTIONS = 16


def _dump_total(pid: int, tmp: Path) -> tuple[int, Path]:
    """Dump callgrind's counters (which zeroes them): the instructions counted, and the dump."""
    before = set(tmp.glob("callgrind.out.*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(100):
        dumped = set(tmp.glob("callgrind.out.*")) - before
        if dumped:
            break
        time.sleep(0.05)
    (dump,) = dumped
    for _ in range(100):  # callgrind writes the file in place; the totals line comes last
        totals = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
        if totals is not None:
            return int(totals.group(1)), dump
        time.sleep(0.05)
    raise RuntimeError(f"no count in {dump}")


def count_once(checkout: Path, backend_port: int, tmp: Path, seconds: float,
               keep: Path | None = None, headers: tuple[str, ...] = (),
               path: str = "/small") -> tuple[float, int]:
    """(instructions, requests) of one measured wrk run against a proxy under callgrind, less
    the instructions the idle proxy spends in the same wall time. Timer work (health probes,
    the sweep, the shared health view) runs per second, not per request, and under valgrind a
    second holds ~50 times fewer requests than it does natively: uncorrected, that work would
    weigh ~50 times too much. The loaded dump is copied to `keep` when given."""
    port = free_port()
    conf = tmp / "failover-proxy.yaml"
    conf.write_text(failover_config(port, backend_port, "1"))
    dump = tmp / "callgrind.out"
    # Profiled in one process: a worker's data plane runs the same code, but valgrind would
    # follow the supervisor, not the worker it starts. (Checkouts from before `run` started a
    # supervisor for one worker serve in one process without the option.)
    cli = (checkout / "failover_proxy" / "cli.py").read_text()
    one_process = ["--single-process"] if "--single-process" in cli else []
    proxy = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}",
         str(checkout / ".venv" / "bin" / "python"), "-m", "failover_proxy", "run", "-c",
         str(conf), *one_process],
        cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, timeout=120)  # imports are slow under valgrind
        url = f"http://127.0.0.1:{port}{path}"
        run_wrk(url, 3, CONNECTIONS, headers=headers)  # warm-up: pools, memos, caches
        subprocess.run(["callgrind_control", "-i", "on", str(proxy.pid)], check=True,
                       capture_output=True)
        started = time.monotonic()
        time.sleep(seconds)
        idle, _ = _dump_total(proxy.pid, tmp)
        idle_per_second = idle / (time.monotonic() - started)
        started = time.monotonic()
        load = run_wrk(url, seconds, CONNECTIONS, headers=headers)
        loaded, loaded_dump = _dump_total(proxy.pid, tmp)
        loaded_seconds = time.monotonic() - started
        if load.requests == 0:
            raise RuntimeError("wrk completed no request")
        if keep is not None:
            shutil.copyfile(loaded_dump, keep)
        return loaded - idle_per_second * loaded_seconds, load.requests
    finally:
        proxy.send_signal(signal.SIGINT)
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
        for leftover in tmp.glob("callgrind.out*"):
            leftover.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--keep-dumps", type=Path, metavar="DIR",
                        help="keep each round's callgrind dump here (LABEL-ROUND.callgrind)")
    parser.add_argument("--browser-headers", action="store_true",
                        help="requests carry a browser's 11 header fields (wrk alone sends Host)")
    parser.add_argument("--body", type=int, default=len(SMALL_BODY), metavar="BYTES",
                        help="size of the backend's response body (default: compare.py's 100)")
    parser.add_argument("checkouts", nargs="*", default=[f"this={ROOT}"])
    args = parser.parse_args()
    ensure_tools({"nginx": "nginx", "wrk": "wrk", "valgrind": "valgrind"})
    labels = {}
    for spec in args.checkouts:
        label, _, path = spec.rpartition("=")
        labels[Path(path).resolve()] = label or path
    checkouts = list(labels)
    counts: dict[Path, list[float]] = {path: [] for path in checkouts}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        backend_port = free_port()
        # Served from a file: nginx refuses a `return` string longer than its config buffer.
        sized = tmp / "www" / "sized"
        sized.parent.mkdir()
        sized.write_text(("{'items': [1, 2, 3], 'name': 'value'}, " * (args.body // 36 + 1))
                         [:args.body])
        block = f"""
    server {{ listen 127.0.0.1:{backend_port};
             location /small {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}
             location = /sized {{ default_type application/json; root {sized.parent}; }} }}"""
        backend = start_nginx("backend", "1", block, tmp, None)
        try:
            wait_port(backend_port)
            for round_number in range(args.rounds):
                for index, checkout in enumerate(checkouts):  # alternating, like compare.py
                    work = tmp / f"run-{round_number}-{index}"
                    work.mkdir()
                    started = time.monotonic()
                    keep = None
                    if args.keep_dumps is not None:
                        args.keep_dumps.mkdir(parents=True, exist_ok=True)
                        keep = args.keep_dumps / f"{labels[checkout]}-{round_number}.callgrind"
                    instructions, requests = count_once(
                        checkout, backend_port, work, args.seconds, keep,
                        BROWSER_HEADERS if args.browser_headers else (),
                        "/small" if args.body == len(SMALL_BODY) else "/sized")
                    per_request = instructions / requests
                    counts[checkout].append(per_request)
                    print(f"{labels[checkout]}: {per_request:,.0f} instructions per request "
                          f"({requests} requests, {time.monotonic() - started:.0f} s)",
                          flush=True)
        finally:
            backend.terminate()
            backend.wait()
    first = statistics.median(counts[checkouts[0]])
    lines = ["| checkout | instructions per request (median) | rounds | ratio to the first |",
             "|---|---|---|---|"]
    for checkout, values in counts.items():
        median = statistics.median(values)
        spread = ", ".join(f"{value:,.0f}" for value in values)
        lines.append(f"| {labels[checkout]} | {median:,.0f} | {spread} | {median / first:.3f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "instructions-browser" if args.browser_headers else "instructions"
    if args.body != len(SMALL_BODY):
        name += f"-body{args.body}"
    requests = ("GET requests with a browser's 11 header fields" if args.browser_headers
                else "GET requests with only a Host field (as wrk sends them)")
    (RESULTS / f"{name}.md").write_text(
        "# Instructions per proxied request (callgrind)\n\n"
        f"wrk, {CONNECTIONS} keep-alive connections, {requests}, {args.body}-byte responses from "
        "nginx, "
        f"{args.seconds:g} s measured per round, the configuration of compare.py (health checks, "
        "retries, metrics on; access log off). The idle proxy's own timer work over the same wall "
        "time is subtracted.\n\n" + table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {labels[path]: values for path, values in counts.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
