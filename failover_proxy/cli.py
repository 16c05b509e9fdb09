"""Command line: `failover-proxy run | check | demo`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config.schema import ConfigError, ProxyConfig, parse_duration

if TYPE_CHECKING:
    from .config.loading import ConfigSource

EXIT_CONFIG_ERROR = 2


def _load_or_report(path: str) -> tuple[ProxyConfig, ConfigSource] | None:
    """The validated config and the file it came from (imported here: yaml and pydantic are
    for the commands that read config files, not for the workers this CLI also starts)."""
    from .config.loading import ConfigSource, parse_config

    try:
        source = ConfigSource(path)
        return parse_config(source.text, source.path), source
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return None


EXIT_START_FAILED = 1


def _run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run until stopped; a listener that cannot start is one clear line, not a traceback."""
    import uvloop

    try:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(main())
    except OSError as exc:
        print(f"failover-proxy: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_START_FAILED
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .config.loading import summarize

    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_CONFIG_ERROR
    print(f"{args.config}: OK: {summarize(loaded[0])}")
    if not args.resolve:
        return 0  # a check resolves nothing: a config stays checkable offline
    from .model.discovery import resolve_config

    lines, good = asyncio.run(resolve_config(loaded[0]))
    print("\n".join(lines) or "no backend is named by a hostname")
    return 0 if good else EXIT_CONFIG_ERROR


def cmd_audit(args: argparse.Namespace) -> int:
    from .config.loading import line_finder
    from .ops.audit import as_json, as_text, audit

    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_CONFIG_ERROR
    config, source = loaded
    findings = audit(config, line_finder(source.text), args.client_deadline)
    print(as_json(findings, source.path) if args.format == "json"
          else as_text(findings, source.path))
    return 1 if any(f.severity == "high" for f in findings) else 0


def cmd_drill(args: argparse.Namespace) -> int:
    from .ops.drill import as_json, run_drill

    report = asyncio.run(run_drill(args))
    print(as_json(report) if args.format == "json" else report.text())
    return 0 if report.passed else 1


def cmd_run(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_CONFIG_ERROR
    config, source = loaded
    if args.single_process:
        if config.worker_count != 1:
            print(f"{args.config}: --single-process serves with one process, but workers: "
                  f"{config.workers} asks for {config.worker_count}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        from .process.server import serve

        return _run_loop(lambda: serve(config, config_source=source))
    from .process.supervisor import supervise

    return _run_loop(lambda: supervise(config, source))


def cmd_worker(args: argparse.Namespace) -> int:
    from .process.worker import run_worker

    return _run_loop(lambda: run_worker(args.listen_fd, args.ipc_fd))


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from .config.loading import json_schema

    print(json.dumps(json_schema(), indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .process.server import serve
    from .sim.demo import CONTROL_PORT, Demo, demo_config_path

    args.config = args.config or demo_config_path()
    # config/demo.yaml reads its ports from these (`${PROXY_PORT:-8080}`).
    if args.port is not None:
        os.environ["PROXY_PORT"] = str(args.port)
    if args.admin_port is not None:
        os.environ["ADMIN_PORT"] = str(args.admin_port)
    loaded = _load_or_report(str(args.config))
    if loaded is None:
        return EXIT_CONFIG_ERROR
    config, source = loaded

    async def demo() -> None:
        simulated = Demo()
        await simulated.start()
        ready = asyncio.Event()
        proxy = asyncio.create_task(serve(config, ready, source))
        started = asyncio.create_task(ready.wait())
        await asyncio.wait({proxy, started}, return_when=asyncio.FIRST_COMPLETED)
        if proxy.done():  # it could not start (a port taken): say so, never wait forever
            started.cancel()
            await simulated.stop()
            try:
                proxy.result()
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror or exc} (the demo listens on "
                              f"{config.listen.port}, its admin API on "
                              f"{config.admin.port if config.admin else '-'}: --port and "
                              "--admin-port move them)") from exc
            return
        url = f"http://{config.listen.host}:{config.listen.port}/"
        control = f"http://127.0.0.1:{CONTROL_PORT}/providers"
        admin = config.admin
        status = (
            f"\nLive status page: http://{admin.host}:{admin.port}/  (metrics at /metrics)\n"
            f"A failover drill through the admin API:\n"
            f"  curl -X POST http://{admin.host}:{admin.port}/providers/web/gcp/force-down\n"
            f"  curl -X POST http://{admin.host}:{admin.port}/providers/web/gcp/restore\n"
            if admin is not None
            else ""
        )
        print(
            "failover-proxy demo: simulated providers aws, azure and gcp (two backends each) on "
            f"127.0.0.1:9101-9106\nconfig: {args.config}\n\n"
            f"Try:\n  curl {url}\n"
            f"  for i in $(seq 6); do curl -s {url}; done   # the providers take turns\n\n"
            "Break a whole provider, and watch the others take its traffic with no errors:\n"
            f"  curl -X POST {control}/aws/refusing      # or blackhole, 5xx, slow, flapping\n"
            f"  for i in $(seq 6); do curl -s {url}; done\n"
            f"  curl -X POST {control}/aws/healthy       # it returns after its hold-down\n"
            f"{status}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        try:
            await proxy
        finally:
            await simulated.stop()

    return _run_loop(demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="failover-proxy", description="Multi-cloud failover reverse proxy."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # The metavar lists the commands people run: `worker` is started by `run` alone.
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{run,check,audit,drill,demo,schema}"
    )

    run = commands.add_parser("run", help="run the proxy from a YAML config")
    run.add_argument("-c", "--config", required=True, help="path to the YAML config")
    run.add_argument(
        "--single-process", action="store_true",
        help="serve, probe and answer the admin API in this one process, with no supervisor "
        "(for profilers and debuggers, like nginx's `master_process off`; needs workers: 1)",
    )
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser("check", help="validate a config and exit")
    check.add_argument("-c", "--config", required=True, help="path to the YAML config")
    check.add_argument("--resolve", action="store_true",
                       help="also resolve every backend hostname and print its endpoints")
    check.set_defaults(handler=cmd_check)

    audit = commands.add_parser(
        "audit", help="list a config's single points of failure and risky settings")
    audit.add_argument("-c", "--config", required=True, help="path to the YAML config")
    audit.add_argument("--format", choices=("text", "json"), default="text")
    audit.add_argument("--client-deadline", type=float, default=60.0, metavar="SECONDS",
                       help="how long clients wait for a response (default 60)")
    audit.set_defaults(handler=cmd_audit)

    drill = commands.add_parser(
        "drill", help="force a provider (or region) down on a running proxy and report")
    drill.add_argument("--admin", required=True, help="the proxy's admin URL")
    drill.add_argument("--token", default=None, help="the admin token, when it has one")
    drill.add_argument("--upstream", required=True)
    drill.add_argument("--provider", required=True)
    drill.add_argument("--region", default=None, help="drill one region of the provider")
    drill.add_argument("--duration", type=parse_duration, default=30.0,
                       help="how long the outage lasts (default 30s)")
    drill.add_argument("--probe-url", required=True, help="a URL served through the proxy")
    drill.add_argument("--rate", type=float, default=50.0, help="probes per second (50)")
    drill.add_argument("--format", choices=("text", "json"), default="text")
    drill.set_defaults(handler=cmd_drill)

    demo = commands.add_parser("demo", help="run the proxy before simulated aws/azure/gcp")
    demo.add_argument(
        "-c", "--config", type=Path, default=None, help="config instead of config/demo.yaml"
    )
    demo.add_argument("--port", type=int, default=None, help="the proxy's port (8080)")
    demo.add_argument("--admin-port", type=int, default=None,
                      help="the admin API's port (9901)")
    demo.set_defaults(handler=cmd_demo)

    schema = commands.add_parser(
        "schema", help="print the config's JSON Schema (for editors' completion and checks)")
    schema.set_defaults(handler=cmd_schema)

    # Started by the supervisor that `run` starts, never by hand.
    worker = commands.add_parser("worker")
    worker.add_argument("--listen-fd", type=int, required=True)
    worker.add_argument("--ipc-fd", type=int, required=True)
    worker.set_defaults(handler=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # httpx logs every request at INFO: each HTTP/2 health check, five a second per
        # backend. What a check found is the health machine's to log.
        for chatty in ("httpx", "httpcore"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    handler = args.handler
    result: int = handler(args)
    return result
