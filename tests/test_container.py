"""The project's Dockerfile, built and run as an operator would, without a Docker engine.

`make test-container` runs this (it needs root, buildah and debootstrap, which it installs).
No image registry is reachable here, so the base image is made on the spot: a Debian bookworm
with Python by debootstrap, committed as a local image, given to the Dockerfile as `BASE`. The
built image then runs under buildah's chroot isolation, which shares the host's loopback: the
proxy starts as the image's non-root user, answers /healthz and its own HEALTHCHECK, proxies a
request to a backend on 127.0.0.1, and drains on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, free_port


def _why_not() -> str | None:
    if os.environ.get("FAILOVER_PROXY_CONTAINER_TEST") != "1":
        return "builds an image for minutes: run `make test-container`"
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} could not be installed"
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot isolation need root"
    return None


pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.skipif(_why_not() is not None, reason=str(_why_not())),
]

IMAGE = "localhost/failover-proxy:test"
BASE_IMAGE = "localhost/failover-proxy-test-base:bookworm"
RUNTIME_UID = 10001
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class Buildah:
    """buildah with its own storage under a temporary directory (vfs: no kernel overlay needed),
    so a run leaves nothing behind in the machine's image store."""

    def __init__(self, root: Path) -> None:
        self.prefix = ["buildah", "--root", str(root / "storage"), "--runroot",
                       str(root / "run"), "--storage-driver", "vfs"]

    def __call__(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run([*self.prefix, *args], capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done.stdout

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen([*self.prefix, *args], stdout=out, stderr=subprocess.STDOUT)


def make_base_image(buildah: Buildah, work: Path) -> None:
    """A minimal Debian bookworm with Python 3.11 and venv, as a local image."""
    rootfs = work / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "bookworm", str(rootfs)],
        check=True, capture_output=True, timeout=900,
    )
    # This machine reaches PyPI through a TLS-inspecting proxy its own trust store knows; the
    # base carries that store, as an in-house base image carries its site's CA.
    if HOST_CA_BUNDLE.exists():
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        (rootfs / "etc/pip.conf").write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(work / "rootfs.tar"), "."], check=True)
    shutil.rmtree(rootfs)
    (work / "Containerfile").write_text("FROM scratch\nADD rootfs.tar /\nCMD [\"/bin/bash\"]\n")
    buildah("bud", "--isolation", "chroot", "-f", str(work / "Containerfile"), "-t", BASE_IMAGE,
            str(work))
    (work / "rootfs.tar").unlink()


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    """The project's image, built from its Dockerfile on a base made here."""
    work = tmp_path_factory.mktemp("container")
    tool = Buildah(work)
    started = time.monotonic()
    make_base_image(tool, work)
    base_seconds = time.monotonic() - started
    tool("bud", "--isolation", "chroot", "--format", "docker", "--build-arg",
         f"BASE={BASE_IMAGE}", "-t", IMAGE, str(ROOT), timeout=1200)
    print(f"base image {base_seconds:.0f}s, project image "
          f"{time.monotonic() - started - base_seconds:.0f}s")
    yield tool
    subprocess.run([*tool.prefix, "rm", "--all"], capture_output=True)
    subprocess.run([*tool.prefix, "rmi", "--all", "--force"], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


def image_config(buildah: Buildah) -> dict[str, object]:
    inspected = json.loads(buildah("inspect", "--type", "image", IMAGE))
    config: dict[str, object] = inspected["Docker"]["config"]
    return config


def test_image_runs_as_non_root_with_a_healthcheck_and_a_valid_default_config(
    buildah: Buildah,
) -> None:
    config = image_config(buildah)
    assert config["User"] == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert config["Entrypoint"] == ["failover-proxy"]
    assert config["Cmd"] == ["run", "-c", "/etc/failover-proxy/config.yaml"]
    healthcheck = config["Healthcheck"]
    assert isinstance(healthcheck, dict) and "/healthz" in " ".join(healthcheck["Test"])
    assert config["StopSignal"] == "SIGTERM"
    container = buildah("from", IMAGE).strip()
    identity = buildah("run", "--isolation", "chroot", container, "--", "id", "-u")
    assert identity.strip() == str(RUNTIME_UID)
    checked = buildah("run", "--isolation", "chroot", container, "--",
                      "failover-proxy", "check", "-c", "/etc/failover-proxy/config.yaml")
    assert "OK" in checked
    # No compiler and no wheels in the runtime image; the compiled data plane is in it.
    listing = buildah("run", "--isolation", "chroot", container, "--", "sh", "-c",
                      "command -v gcc || echo no-gcc; ls /wheels 2>/dev/null || echo no-wheels; "
                      "python3 -c 'import failover_proxy.dataplane.io._direct as m; print(m.__file__)'")
    assert "no-gcc" in listing and "no-wheels" in listing and ".so" in listing


class _Backend(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"from the backend on loopback\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def proxy_supervisor(launcher: int) -> int:
    """The proxy's main process: the first one under buildah's launcher processes that is not
    buildah's own (what a real runtime runs as PID 1). Found by parent ids: buildah is a Go
    program, and a child forked by another of its threads is not in the main thread's
    /proc/PID/task/PID/children."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, StopIteration):
                    parents[int(entry.name)] = _parent_of(int(entry.name))
        generation = [launcher]
        while generation:
            children = [pid for pid, parent in parents.items() if parent in generation]
            for pid in children:
                with contextlib.suppress(OSError):
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                    if name and not Path(name.decode()).name.startswith("buildah"):
                        return pid
            generation = children
        time.sleep(0.2)
    raise TimeoutError("the proxy's process did not appear")


def _status_number(pid: int, field: str) -> int:
    """The first number of a field of /proc/PID/status (`PPid`, `Uid`)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith(field + ":")))


def _parent_of(pid: int) -> int:
    return _status_number(pid, "PPid")


def uid_of(pid: int) -> int:
    return _status_number(pid, "Uid")


def test_image_serves_proxies_to_loopback_and_drains_on_sigterm(
    buildah: Buildah, tmp_path: Path
) -> None:
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port, admin_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
workers: 1
drain: {{delay: 0.5s, timeout: 5s}}
upstreams:
  web:
    backends:
      - {{name: local, url: "http://127.0.0.1:{backend.server_port}", provider: lo, region: a}}
routes:
  - {{path_prefix: /, upstream: web}}
""")
    config.chmod(0o644)
    image = image_config(buildah)
    entrypoint = [*image["Entrypoint"], *image["Cmd"]]  # type: ignore[misc]
    container = buildah("from", IMAGE).strip()
    log = tmp_path / "container.log"
    launcher = buildah.popen(
        "run", "--isolation", "chroot", "--env", f"ADMIN_PORT={admin_port}",
        "-v", f"{config}:/etc/failover-proxy/config.yaml:ro", container, "--", *entrypoint,
        log=log,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=1).text == "alive\n":
                    break
            except httpx.HTTPError:
                pass
            assert launcher.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        answer = httpx.get(f"http://127.0.0.1:{port}/anything", timeout=5)
        assert answer.status_code == 200 and answer.text == "from the backend on loopback\n"
        supervisor = proxy_supervisor(launcher.pid)
        assert uid_of(supervisor) == RUNTIME_UID
        # The image's own HEALTHCHECK command, run beside the proxy as a runtime would.
        health = image["Healthcheck"]["Test"]  # type: ignore[index]
        assert health[0] == "CMD"
        buildah("run", "--isolation", "chroot", "--env", f"ADMIN_PORT={admin_port}", container,
                "--", *health[1:])
        os.kill(supervisor, 15)
        assert launcher.wait(timeout=30) == 0, log.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        backend.shutdown()
    output = log.read_text()
    assert "SIGTERM: stopping gracefully" in output
    assert "Traceback" not in output
