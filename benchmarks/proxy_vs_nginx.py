"""wrk against failover-proxy and nginx (as a reverse proxy) in front of the same backend.

Both proxies run with one worker, keep-alive to the backend, and no access log. The backend is
a separate nginx serving a fixed small body. On a machine with two or more cores the proxy
under test is pinned to core 0 and the backend and wrk to core 1 (the same for both proxies), so
they do not fight over one core. Runs alternate (proxy, nginx, proxy, nginx…) so that drift
hits both alike; the table reports the best round of each and the ratio. Everything listens
on 127.0.0.1 only.

    python benchmarks/proxy_vs_nginx.py [--duration 10] [--connections 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SMALL_BODY = "x" * 100


def ensure_tools() -> None:
    """Install nginx and wrk with apt-get when they are missing (as CI and fresh machines need)."""
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if shutil.which("nginx") is None and Path("/usr/sbin/nginx").exists():
        os.environ["PATH"] += ":/usr/sbin"
        missing = [tool for tool in missing if tool != "nginx"]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get…", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True)
        os.environ["PATH"] += ":/usr/sbin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def nginx_conf(workdir: Path, body: str) -> str:
    return f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    {body}
}}
"""


PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if PIN else argv


def start_nginx(
    name: str, server_block: str, tmp: Path, core: int
) -> subprocess.Popen[bytes]:
    workdir = tmp / name
    workdir.mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, server_block))
    return subprocess.Popen(
        pinned(core, ["nginx", "-p", str(workdir), "-c", str(conf), "-g", "daemon off; user root;"]),  # noqa: E501
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port: int, duration: int, connections: int) -> WrkResult:
    out = subprocess.run(
        pinned(1, ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
                   f"http://127.0.0.1:{port}/"]),
        check=True, capture_output=True, text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    socket_errors = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
    if match := re.search(socket_errors, out):
        errors += sum(int(group) for group in match.groups())
    assert p50 and p99
    return WrkResult(rps, _ms(*p50.groups()), _ms(*p99.groups()), errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ensure_tools()
    backend_port, nginx_port, proxy_port = free_port(), free_port(), free_port()
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            processes.append(start_nginx("backend", f"""
    server {{ listen 127.0.0.1:{backend_port}; keepalive_timeout 300s;
             location / {{ default_type text/plain; return 200 "{SMALL_BODY}"; }} }}""", tmp, 1))
            processes.append(start_nginx("proxy", f"""
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 128; }}
    server {{ listen 127.0.0.1:{nginx_port};
             location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                          proxy_set_header Connection ""; }} }}""", tmp, 0))
            config = tmp / "proxy.yaml"
            config.write_text(
                f"listen: {{host: 127.0.0.1, port: {proxy_port}}}\n"
                "upstreams:\n  bench:\n    backends:\n"
                f"      - {{name: nginx, url: 'http://127.0.0.1:{backend_port}',"
                " provider: local}\n"
                "routes:\n  - {path_prefix: /, upstream: bench}\n"
            )
            processes.append(subprocess.Popen(
                pinned(0, [sys.executable, "-m", "failover_proxy", "run", "-c", str(config)]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
            ))
            for port in (backend_port, nginx_port, proxy_port):
                wait_port(port)
            for port in (nginx_port, proxy_port):  # warm up pools and caches
                run_wrk(port, 2, args.connections)
            best: dict[str, WrkResult] = {}
            paired_ratios: list[float] = []
            for _ in range(args.rounds):
                round_rps: dict[str, float] = {}
                for name, port in (("failover-proxy", proxy_port), ("nginx", nginx_port)):
                    result = run_wrk(port, args.duration, args.connections)
                    print(f"  {name:15} {result.requests_per_second:10.0f} req/s  "
                          f"p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  "
                          f"errors {result.errors}", flush=True)
                    previous = best.get(name)
                    rps = round_rps[name] = result.requests_per_second
                    if previous is None or rps > previous.requests_per_second:
                        best[name] = result
                paired_ratios.append(round_rps["failover-proxy"] / round_rps["nginx"])
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    ours, theirs = best["failover-proxy"], best["nginx"]
    ratio = ours.requests_per_second / theirs.requests_per_second
    median_ratio = statistics.median(paired_ratios)
    table = (
        f"wrk -t1 -c{args.connections} -d{args.duration}s, {len(SMALL_BODY)}-byte responses, "
        "1 worker each, keep-alive to backend, access log off, "
        f"{'proxy on core 0, backend and wrk on core 1' if PIN else 'unpinned'}\n\n"
        "| proxy | req/s | p50 ms | p99 ms | errors | req/s vs nginx |\n|---|---|---|---|---|---|\n"
        f"| failover-proxy | {ours.requests_per_second:.0f} | {ours.p50_ms:.2f} | "
        f"{ours.p99_ms:.2f} | {ours.errors} | {ratio:.2f}x |\n"
        f"| nginx | {theirs.requests_per_second:.0f} | {theirs.p50_ms:.2f} | "
        f"{theirs.p99_ms:.2f} | {theirs.errors} | 1.00x |\n\n"
        f"best round of each: {ratio:.2f}x nginx; median of {len(paired_ratios)} paired rounds: "
        f"{median_ratio:.2f}x\n"
    )
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "proxy_vs_nginx.md").write_text(table)
    (RESULTS / "proxy_vs_nginx.json").write_text(json.dumps(
        {"failover-proxy": asdict(ours), "nginx": asdict(theirs), "ratio_rps": ratio,
         "median_paired_ratio_rps": median_ratio, "paired_ratios": paired_ratios,
         "connections": args.connections, "duration_s": args.duration}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
