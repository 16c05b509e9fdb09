"""One owner for a connection's end: only dataplane/io/connio.py closes or aborts a transport, and
it detaches the direct reads and writes first (a socket number uvloop frees may become another
connection's at once)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from failover_proxy.dataplane.io import connio
from failover_proxy.dataplane.io.connio import ConnectionIO

CONNIO = Path(connio.__file__)
DATAPLANE = CONNIO.parent.parent
ENDINGS = {"close", "abort", "write_eof"}


def _ended_transports(path: Path) -> list[str]:
    """`<something named transport>.close()` (abort, write_eof) calls in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ENDINGS):
            target = ast.unparse(node.func.value)
            if "transport" in target:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_connio_ends_a_transport() -> None:
    modules = sorted(DATAPLANE.rglob("*.py"))
    assert len(modules) > 12
    offenders = [line for path in modules if path != CONNIO
                 for line in _ended_transports(path)]
    assert not offenders, "end connections through ConnectionIO:\n" + "\n".join(offenders)
    assert _ended_transports(CONNIO)  # the check sees such calls at all


def test_every_ending_detaches_first() -> None:
    """In ConnectionIO, each method that ends the transport stops the direct paths before."""
    tree = ast.parse(CONNIO.read_text())
    methods = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    for name in ("close", "abort", "write_eof"):
        body = [ast.unparse(statement) for statement in methods[name].body
                if not isinstance(statement, ast.Expr) or not isinstance(
                    statement.value, ast.Constant)]
        assert body[0] in ("self.detach()", "stop_direct_writes(self.send)"), (name, body)


async def test_abort_detaches_the_direct_writer_and_the_reader() -> None:
    direct = pytest.importorskip("failover_proxy.dataplane.io._direct").DirectWriter
    reads = pytest.importorskip("failover_proxy.dataplane.io._reads").Reader
    made: asyncio.Future[ConnectionIO] = asyncio.get_running_loop().create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.set_result(ConnectionIO(transport,  # type: ignore[arg-type]
                                         lambda _: None, lambda: None, lambda _: None))

    server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    io = await asyncio.wait_for(made, 5)
    assert isinstance(io.send, direct) and isinstance(io.reading, reads)
    io.reading.take_over()
    assert io.reading.registered and not io.send.detached
    io.abort()
    assert io.send.detached and not io.reading.registered
    writer.close()
    server.close()
