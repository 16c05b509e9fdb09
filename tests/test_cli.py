"""The commands as a user runs them: `demo`, `run`, `python -m failover_proxy`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from aiohttp import web

from failover_proxy import __version__

from .conftest import (
    ROOT,
    ProxyProcess,
    env_without_proxy_vars,
    free_port,
    hello_app,
    single_upstream_config,
    wait_for_port,
)

StartApp = Callable[[web.Application], Awaitable[int]]
StartProcess = Callable[..., ProxyProcess]


def test_demo_serves_three_providers_and_stops_cleanly_on_ctrl_c() -> None:
    port, admin_port = free_port(), free_port()
    env = env_without_proxy_vars() | {"PROXY_PORT": str(port), "ADMIN_PORT": str(admin_port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "failover_proxy", "demo"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process=process)
        with httpx.Client(trust_env=False, timeout=5) as http:
            answers = [http.get(f"http://127.0.0.1:{port}/hello").json() for _ in range(6)]
            # The printed recipe: break aws, and nothing fails; its share goes elsewhere.
            broken = http.post("http://127.0.0.1:9100/providers/aws/refusing")
            assert broken.text == "aws: refusing\n"
            during = [http.get(f"http://127.0.0.1:{port}/hello") for _ in range(12)]
            http.post("http://127.0.0.1:9100/providers/aws/healthy")
            status = http.get(f"http://127.0.0.1:{admin_port}/status").json()
            page = http.get(f"http://127.0.0.1:{admin_port}/")
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=20)
    text = out.decode()
    assert {a["provider"] for a in answers} == {"aws", "azure", "gcp"}
    assert {a["backend"] for a in answers} == {
        "aws-use1-a", "aws-use1-b", "azure-eus-a", "azure-eus-b", "gcp-usc1-a", "gcp-usc1-b",
    }
    assert all(a["path"] == "/hello" and a["region"] for a in answers)
    assert [r.status_code for r in during] == [200] * 12
    assert {r.json()["provider"] for r in during} == {"azure", "gcp"}
    assert f"curl http://127.0.0.1:{port}/" in text
    assert f"Live status page: http://127.0.0.1:{admin_port}/" in text
    assert set(status["upstreams"]["web"]["providers"]) == {"aws", "azure", "gcp"}
    assert page.status_code == 200 and "failover-proxy status" in page.text
    logged = [line for line in text.splitlines() if line.startswith('{"time"')]
    assert len(logged) == 18 and all('"path":"/hello"' in line for line in logged)
    assert process.returncode == 0, text
    assert "Traceback" not in text


def test_run_serves_a_config_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "p.yaml"
    config.write_text(
        f"listen: {{port: {port}}}\n"
        "upstreams:\n  web:\n    backends:\n"
        f"      - {{name: dead, url: 'http://127.0.0.1:{free_port()}', provider: aws}}\n"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
        "drain: {delay: 200ms}\n"  # the graceful stop's serving-while-unready stretch
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "failover_proxy", "run", "-c", str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process=process)
        with httpx.Client(trust_env=False, timeout=5) as http:
            response = http.get(f"http://127.0.0.1:{port}/")
        assert response.status_code == 502
        assert "cannot connect to backend dead" in response.text
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=20)
    assert process.returncode == 0, out.decode()


def test_a_stop_signal_while_starting_still_stops_gracefully(tmp_path: Path) -> None:
    """SIGTERM as soon as the port answers: the supervisor has bound it but its worker is
    still starting. The signal is kept until the start is over, then the proxy drains and
    exits 0 (it used to die of the signal, its worker left to notice alone)."""
    port = free_port()
    config = tmp_path / "p.yaml"
    config.write_text(
        f"listen: {{port: {port}}}\n"
        "upstreams:\n  web:\n    backends:\n"
        f"      - {{name: a, url: 'http://127.0.0.1:{free_port()}', provider: aws}}\n"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
        "drain: {delay: 0s}\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "failover_proxy", "run", "-c", str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    wait_for_port(port, process=process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out.decode()
    assert b"SIGTERM: stopping gracefully" in out


def test_run_refuses_a_bad_config_with_its_location(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("listen: {port: 70000}\n")
    result = subprocess.run(
        [sys.executable, "-m", "failover_proxy", "run", "-c", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"{config}:1: listen.port: Input should be less than or equal to 65535" in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "failover-proxy"
    result = subprocess.run(
        [str(script), "check", "-c", str(ROOT / "config" / "demo.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1


def test_the_demo_on_a_taken_port_says_so_and_exits() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "failover_proxy", "demo", "--port", str(port),
             "--admin-port", str(free_port())],
            capture_output=True, text=True, timeout=30, cwd=ROOT, env=env_without_proxy_vars(),
        )
    assert result.returncode != 0
    assert "cannot start" in result.stderr and "--port" in result.stderr, result.stderr
    assert str(port) in result.stderr


def test_version_and_help_show_what_people_run() -> None:
    script = Path(sys.executable).parent / "failover-proxy"
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"failover-proxy {__version__}"
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    assert "{run,check,audit,drill,demo,schema}" in shown.stdout
    assert "worker" not in shown.stdout and "SUPPRESS" not in shown.stdout


def test_a_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "p.yaml"
        config.write_text(
            f"listen: {{port: {port}}}\n"
            "upstreams:\n  web:\n    backends:\n"
            "      - {name: b, url: 'http://127.0.0.1:1', provider: aws}\n"
            "routes:\n  - {path_prefix: /, upstream: web}\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "failover_proxy", "run", "-c", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.startswith(f"failover-proxy: cannot start: cannot listen on 127.0.0.1:{port}")
    assert "address already in use" in result.stderr.lower() and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


async def test_run_with_one_worker_restarts_it_and_loses_no_queued_connection(
    aiohttp_backend: StartApp, proxy_process: StartProcess
) -> None:
    """`workers: 1` still gets a supervisor: when the one worker dies, clients that connect
    meanwhile wait in the socket's queue (the supervisor holds it) and the new worker serves
    them."""
    port = free_port()
    config = single_upstream_config([await aiohttp_backend(hello_app())], listen_port=port)
    process = await asyncio.to_thread(proxy_process, config, port)
    supervisor, worker = process.pids()
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/")).text == "hello"
    os.kill(worker, signal.SIGKILL)
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:  # new connections
        replies = await asyncio.gather(*(http.get(f"http://127.0.0.1:{port}/") for _ in range(8)))
    assert [r.text for r in replies] == ["hello"] * 8
    pids = process.pids()
    assert len(pids) == 2 and pids[0] == supervisor and worker not in pids
    out = await asyncio.to_thread(process.stop)
    assert f"worker 0 (pid {worker}) died with exit code -9; restarting it" in out


async def test_single_process_serves_without_a_supervisor(
    tmp_path: Path, aiohttp_backend: StartApp, proxy_process: StartProcess
) -> None:
    """`run --single-process` (for profilers): one process serves, probes and answers."""
    port = free_port()
    config = single_upstream_config([await aiohttp_backend(hello_app())], listen_port=port)
    process = await asyncio.to_thread(proxy_process, config, port, "--single-process")
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/")).text == "hello"
    assert process.pids() == [process.process.pid]
    assert "Traceback" not in await asyncio.to_thread(process.stop)
    four = tmp_path / "four.yaml"
    four.write_text(config + "workers: 4\n")
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "failover_proxy", "run", "--single-process", "-c", str(four)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr == (f"{four}: --single-process serves with one process, but "
                              "workers: 4 asks for 4\n")
