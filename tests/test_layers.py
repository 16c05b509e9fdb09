"""The package's layers, kept by its imports (every import counts, those for type checking too):

    config -> model -> exchange -> codecs -> processes -> cli
    ops beside: it reads the config and the model (counts, topology), never the data plane
    sim apart: simulated providers import nothing of the proxy

Each module imports only its own layer and those below; no import circle spans two layers or
holds more than two files; and the exchange (route, attempts, retries, hedging, recording)
knows no protocol: it imports no codec and writes no HTTP/1 bytes."""

from __future__ import annotations

import ast
from pathlib import Path

import failover_proxy

PACKAGE = Path(failover_proxy.__file__).parent
EXCHANGE = (
    "dataplane.exchange", "dataplane.request", "dataplane.retries", "dataplane.streams",
    "dataplane.plane",
)
RANKS = {
    "config": 0,
    "model": 1,
    "ops": 1.5,
    **dict.fromkeys(EXCHANGE, 2),
    "dataplane.codecs": 3,
    "dataplane.http1": 3,
    "dataplane.http2": 3,
    "dataplane.io": 3,
    "process": 4,
    "cli": 5,
    "__main__": 5,
}
"""A module's layer by the longest prefix of its name (ops sits above the model: it may read
the model and the config, and only the processes and the CLI read it)."""


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name.removesuffix(".__init__") if name != "__init__" else ""] = path
    return found


def rank(module: str) -> float | None:
    """The layer of a module (None: the package root, or a subpackage's own __init__)."""
    if module.startswith("sim"):
        return -1.0
    best = max((prefix for prefix in RANKS if module == prefix or module.startswith(prefix + ".")),
               key=len, default=None)
    return RANKS[best] if best is not None else None


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports, wherever in it (functions, TYPE_CHECKING)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("failover_proxy"):
                target = node.module.removeprefix("failover_proxy").lstrip(".")
            else:
                continue
            for candidate in (target, *(f"{target}.{a.name}".lstrip(".") for a in node.names)):
                if candidate in known and candidate != module:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name.removeprefix("failover_proxy").lstrip(".")
                if alias.name.startswith("failover_proxy") and name in known:
                    found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {module: imports(module, path, known) for module, path in found.items()}


def test_every_module_has_a_layer() -> None:
    """All but the package itself and dataplane/'s own __init__ (the exchange's and the codecs'
    package) sit in a layer: a new module must be placed."""
    assert sorted(m for m in modules() if rank(m) is None) == ["", "dataplane"]


def test_each_layer_imports_only_downward() -> None:
    upward = []
    for module, targets in import_graph().items():
        mine = rank(module)
        for target in targets:
            theirs = rank(target)
            if mine is None or theirs is None:
                continue
            if mine == -1.0 or theirs == -1.0:
                if mine != theirs and mine < 5:  # only the CLI starts the simulators
                    upward.append(f"{module} -> {target}")
            elif theirs > mine:
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports against the layers:\n" + "\n".join(sorted(upward))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (Tarjan's strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle_spans_layers_or_more_than_two_files() -> None:
    circles = strongly_connected(import_graph())
    assert [c for c in circles if len(c) > 2] == []
    assert [c for c in circles if len({rank(m) for m in c}) > 1] == []


def test_the_exchange_knows_no_protocol() -> None:
    """No codec, no HTTP/1 parser, and no HTTP/1 syntax in its bytes (a status line, a field
    line, chunk framing): the codecs write every byte a peer sees."""
    graph = import_graph()
    for module in EXCHANGE:
        assert not [t for t in graph[module] if (rank(t) or 0) >= 3], module
        tree = ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert "httptools" not in imported, module
        if module in ("dataplane.exchange", "dataplane.streams", "dataplane.plane"):
            framing = [node.value for node in ast.walk(tree)
                       if isinstance(node, ast.Constant) and isinstance(node.value, bytes)
                       and (b"\r\n" in node.value or b"HTTP/" in node.value or b": " in node.value)]
            assert framing == [], (module, framing)


def test_the_check_sees_imports_at_all() -> None:
    graph = import_graph()
    assert "model.counters" in graph["ops.metrics"]
    assert "dataplane.streams" in graph["dataplane.http1.downstream"]
    assert "model.topology" in graph["model.healthstate"]  # (for type checking only)
