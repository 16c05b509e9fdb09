"""What the benchmarks share: installing the tools, ports, processes, wrk and hey output, RSS.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "hey": "hey"}
"""command -> Debian package."""


def ensure_tools(packages: dict[str, str] = PACKAGES) -> None:
    """Install what is missing with apt-get (as CI and fresh machines need); `packages`:
    command -> Debian package."""
    os.environ["PATH"] += ":/usr/sbin"
    missing = sorted({pkg for tool, pkg in packages.items() if shutil.which(tool) is None})
    if missing:
        print(f"installing {' '.join(missing)} with apt-get…", flush=True)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", *missing], check=True)


def raise_open_file_limit() -> int:
    """As many file descriptors as allowed (10,000 idle connections need them); children
    started afterwards inherit the limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def wait_ready(ports: list[int]) -> None:
    """Every target listening, then a second more: their first health checks pass before
    any load is measured."""
    for port in ports:
        wait_port(port)
    time.sleep(1.0)


PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(core: int | None, argv: list[str]) -> list[str]:
    """Run on one core (when there are two or more); None: anywhere."""
    return ["taskset", "-c", str(core), *argv] if PIN and core is not None else argv


@dataclass
class LoadResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    """Requests completed (wrk only)."""
    tcp_timeouts: int = 0
    """Retransmission timeouts on the machine during the run (wrk only; TcpExt TCPTimeouts).
    Linux waits at least 200 ms before one, so a p99 near 200 ms with timeouts here is the
    kernel's doing, not the proxy's."""
    retransmits: int = 0
    """TCP segments retransmitted on the machine during the run (wrk only)."""


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP counters (/proc/net/snmp and /proc/net/netstat: a line of names, then a
    line of values, per group), as "Group.Name" -> value; empty where /proc has none."""
    counters: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            group, _, name_text = names.partition(":")
            for name, value in zip(name_text.split(), values.partition(":")[2].split(),
                                   strict=False):
                if value.lstrip("-").isdigit():
                    counters[f"{group}.{name}"] = int(value)
    return counters


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


BROWSER_HEADERS: Final = (
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language: en-US,en;q=0.5",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Referer: http://127.0.0.1/index.html",
    "Cookie: session=4f2a9c1e7b; theme=dark",
    "Upgrade-Insecure-Requests: 1",
    "Sec-Fetch-Dest: document",
    "Sec-Fetch-Mode: navigate",
    "Sec-Fetch-Site: same-origin",
    "Priority: u=0, i",
)
"""The fields a browser sends with a page request (wrk alone sends only Host)."""


def run_wrk(url: str, duration: float, connections: int, threads: int = 1,
            core: int | None = 1, headers: tuple[str, ...] = ()) -> LoadResult:
    fields = [argument for header in headers for argument in ("-H", header)]
    before = tcp_counters()
    out = subprocess.run(
        pinned(core, ["wrk", f"-t{threads}", f"-c{connections}",
                      f"-d{max(1, round(duration))}s",  # wrk takes whole seconds only
                      "--latency", *fields,
                      url]),
        check=True, capture_output=True, text=True,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    if not (rps and p50 and p99):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    socket_errors = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
    if match := re.search(socket_errors, out):
        errors += sum(int(group) for group in match.groups())
    done = re.search(r"(\d+) requests in", out)
    after = tcp_counters()

    def grown(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    return LoadResult(float(rps.group(1)), _ms(*p50.groups()), _ms(*p99.groups()), errors,
                      int(done.group(1)) if done else 0,
                      grown("TcpExt.TCPTimeouts"), grown("Tcp.RetransSegs"))


def run_hey(url: str, seconds: float, rate: int, clients: int = 50) -> LoadResult:
    """A fixed request rate (hey's -q is per client), for latency rather than throughput."""
    out = subprocess.run(
        pinned(1, ["hey", "-z", f"{seconds}s", "-c", str(clients), "-q",
                   str(max(1, rate // clients)), url]),
        check=True, capture_output=True, text=True,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50% in ([\d.]+) secs", out)
    p99 = re.search(r"99% in ([\d.]+) secs", out)
    if not (rps and p50 and p99):
        raise RuntimeError(f"unexpected hey output:\n{out}")
    codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
    errors = sum(int(n) for code, n in codes if code != "200")
    return LoadResult(float(rps.group(1)), float(p50.group(1)) * 1000,
                      float(p99.group(1)) * 1000, errors)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [pid]
    if children.exists():
        for child in children.read_text().split():
            found += process_tree(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time charged so far to `pid` and its descendants (/proc/PID/stat;
    a process that has exited is not counted)."""
    ticks = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def nginx_conf(workdir: Path, workers: str, body: str) -> str:
    return f"""
worker_processes {workers};
worker_rlimit_nofile 19000;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 18000; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    {body}
}}
"""


def start_failover_proxy(conf: Path, core: int | None) -> subprocess.Popen[bytes]:
    """`failover-proxy run -c conf` from this checkout, pinned to `core`, output dropped."""
    return subprocess.Popen(
        pinned(core, [sys.executable, "-m", "failover_proxy", "run", "-c", str(conf)]),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_nginx(name: str, workers: str, server_block: str, tmp: Path,
                core: int | None) -> subprocess.Popen[bytes]:
    workdir = tmp / name
    workdir.mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, workers, server_block))
    return subprocess.Popen(
        pinned(core, ["nginx", "-p", str(workdir), "-c", str(conf),
                      "-g", "daemon off; user root;"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
