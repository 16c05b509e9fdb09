"""Writes docs/configuration.md, the config reference, from failover_proxy/config/schema.py.

Every setting, its type, its default and what it means come from the config classes and the
docstrings under their fields, so the reference cannot drift from the code: the test suite
regenerates it and fails when the committed file differs.

    python docs/make_config_reference.py          # rewrite docs/configuration.md
    python docs/make_config_reference.py --check  # exit 1 when docs/configuration.md is stale
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "failover_proxy" / "config" / "schema.py"
OUTPUT = ROOT / "docs" / "configuration.md"

SECTIONS = {
    "ProxyConfig": "(top level)",
    "ListenConfig": "listen",
    "ListenTlsConfig": "listen.tls",
    "Http2Config": "listen.http2",
    "CertificateConfig": "listen.tls.certificates[]",
    "AdminConfig": "admin",
    "AccessLogConfig": "access_log",
    "DrainConfig": "drain",
    "LimitsConfig": "limits",
    "RouteConfig": "routes[]",
    "UpstreamConfig": "upstreams.NAME",
    "BackendConfig": "upstreams.NAME.backends[]",
    "DnsConfig": "upstreams.NAME.dns (and a backend's dns)",
    "TimeoutsConfig": "upstreams.NAME.timeouts",
    "TlsConfig": "upstreams.NAME.tls",
    "PoolConfig": "upstreams.NAME.pool",
    "HealthCheckConfig": "upstreams.NAME.health_check",
    "OutlierConfig": "upstreams.NAME.outlier",
    "PolicyConfig": "upstreams.NAME.policy",
    "CorrelatedFailuresConfig": "upstreams.NAME.policy.correlated_failures",
    "RetryConfig": "upstreams.NAME.retry",
    "RequestBufferingConfig": "upstreams.NAME.request_buffering",
    "CircuitBreakerConfig": "upstreams.NAME.circuit_breaker",
    "HashOnConfig": "upstreams.NAME.hash_on",
}

INTRO = """# Config reference

Generated from `failover_proxy/config/schema.py` by `python docs/make_config_reference.py`: every
setting with its type and default. Durations are written `250ms`, `2s`, `1m`, `1h` (or seconds
as a number); sizes `64KiB`, `1MiB`, `10MB` (or bytes); fractions `10%` or `0.1`. `${VAR}` and
`${VAR:-default}` are replaced from the environment. A setting marked *required* has no default;
`none` means unset. A bad value is refused with `file:line: field: message`, and a running
proxy keeps its old config.

Active health checks are **off** unless an upstream has `health_check`; passive outlier
detection and retries are on by default.
"""


ALIASES = {"Duration": "duration", "ByteSize": "size", "Fraction": "fraction",
           "AbsolutePath": "path", "AtLeastOne": "int >= 1", "Port": "port",
           "StatusRange": "status range", "str": "string", "float": "number"}


def _type_text(node: ast.expr) -> str:
    """A field's annotation as an operator reads it (no `|`: it would split the table)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_type_text(node.left)} or {_type_text(node.right)}"
    if isinstance(node, ast.Constant):
        return "none" if node.value is None else f"`{node.value}`"
    if isinstance(node, ast.Name):
        if node.id in SECTIONS:
            return f"see `{SECTIONS[node.id]}`"
        return ALIASES.get(node.id, node.id)
    if isinstance(node, ast.Subscript):
        head = ast.unparse(node.value)
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "Annotated":
            return _type_text(args[0])
        if head == "Literal":
            return " or ".join(_type_text(arg) for arg in args)
        if head == "list":
            return f"list of {_type_text(args[0])}"
        if head == "dict":
            return f"map of {_type_text(args[0])} to {_type_text(args[1])}"
    return ast.unparse(node).replace("|", "or")


def _default_text(node: ast.expr | None) -> str:
    if node is None:
        return "*required*"
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        for keyword in node.keywords:
            if keyword.arg == "default_factory" and isinstance(keyword.value, ast.Lambda):
                return f"`{ast.unparse(keyword.value.body)}`"
            if keyword.arg == "default_factory":
                return f"`{ast.unparse(keyword.value)}()`"
    if isinstance(node, ast.Call):
        return "(its defaults)"
    if isinstance(node, ast.Constant) and node.value is None:
        return "none"
    return f"`{ast.unparse(node)}`"


def reference() -> str:
    tree = ast.parse(SCHEMA.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out = [INTRO]
    for name, where in SECTIONS.items():
        node = classes[name]
        out.append(f"## `{where}`\n")
        doc = ast.get_docstring(node)
        if doc:
            out.append(" ".join(doc.split()) + "\n")
        out.append("| setting | type | default | meaning |")
        out.append("| --- | --- | --- | --- |")
        body = node.body
        for index, item in enumerate(body):
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            meaning = ""
            following = body[index + 1] if index + 1 < len(body) else None
            if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                meaning = " ".join(following.value.value.split())
            out.append(f"| `{item.target.id}` | {_type_text(item.annotation)} | "
                       f"{_default_text(item.value)} | {meaning.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    text = reference()
    if "--check" in sys.argv[1:]:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python docs/make_config_reference.py")
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
