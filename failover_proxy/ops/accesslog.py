"""The access log: one JSON line per request, to standard output or a file.

A request costs one dict and one `json.dumps` on the event loop, never a system call: lines are
gathered and handed over in batches (each sweep, or every 64 KiB) to a writer thread. When the
reader of the log cannot keep up (a stalled pipe, a full disk) whole batches are dropped and
counted rather than letting the proxy block on its log.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
from typing import IO

from ..model.counters import MetricStore

_BATCH_BYTES = 64 * 1024
_QUEUED_BATCHES = 64
"""Batches waiting for the writer thread (at least 4 MiB) before lines are dropped."""
_ATOMIC_WRITE = 4096
"""PIPE_BUF: a write to a pipe up to this size is never interleaved with another process's
(worker processes share standard output), so writes are cut into whole lines up to it."""


def whole_line_pieces(batch: bytes, limit: int = _ATOMIC_WRITE) -> list[bytes]:
    """`batch` cut at line ends into pieces of at most `limit` bytes (a longer line alone)."""
    pieces = []
    start = 0
    while len(batch) - start > limit:
        cut = batch.rfind(b"\n", start, start + limit) + 1
        if cut <= start:
            cut = batch.find(b"\n", start + limit) + 1 or len(batch)
        pieces.append(batch[start:cut])
        start = cut
    if start < len(batch):
        pieces.append(batch[start:])
    return pieces


class AccessLog:
    """Formats request records as JSON lines and writes them off the event loop."""

    def __init__(self, path: str | None, store: MetricStore, redact_query: bool = False) -> None:
        self.path = path
        self.redact_query = redact_query
        """Log a target's query as `?REDACTED`: queries can carry tokens and personal data."""
        self._store = store
        self._stream: IO[bytes] = open(path, "ab") if path else sys.stdout.buffer  # noqa: SIM115
        self._lines: list[str] = []
        self._size = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(_QUEUED_BATCHES)
        self._second = -1
        self._second_text = ""
        self._writer = threading.Thread(target=self._write_forever, daemon=True, name="access-log")
        self._writer.start()

    def record(
        self,
        *,
        request_id: bytes,
        client: bytes,
        method: bytes,
        path: bytes,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        route: str,
        upstream: str,
        provider: str,
        backend: str,
        attempts: int,
        reason: str,
        health_view: int = 0,
        protocol: str = "http1",
    ) -> None:
        entry = {
            "time": self._timestamp(),
            "request_id": request_id.decode("latin-1"),
            "client": client.decode("latin-1"),
            "method": method.decode("latin-1"),
            "path": _without_query(path).decode("latin-1") if self.redact_query
            else path.decode("latin-1"),
            "status": status,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "duration_ms": round(duration * 1000, 3),
            "route": route,
            "upstream": upstream,
            "provider": provider,
            "backend": backend,
            "attempts": attempts,
        }
        if reason:
            entry["reason"] = reason
        if health_view:
            entry["health_view"] = health_view
        if protocol != "http1":  # (the usual one goes unsaid: each line stays short)
            entry["protocol"] = protocol
        line = json.dumps(entry, separators=(",", ":"))
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= _BATCH_BYTES:
            self.flush()

    def _timestamp(self) -> str:
        """UTC, ISO 8601 with milliseconds (the second's text is formatted once per second)."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def flush(self) -> None:
        """Hand the gathered lines to the writer thread (called by the data plane's sweep)."""
        if not self._lines:
            return
        batch = ("\n".join(self._lines) + "\n").encode()
        dropped = len(self._lines)
        self._lines = []
        self._size = 0
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self._store.inc("access_log_dropped", (), dropped)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is left (within `timeout`: a stalled reader must not hold up the stop)."""
        self.flush()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._writer.join(timeout)
        if self.path is not None:
            self._stream.close()

    def _write_forever(self) -> None:
        stream = self._stream
        while (batch := self._queue.get()) is not None:
            try:
                for piece in whole_line_pieces(batch):
                    stream.write(piece)
                    stream.flush()
            except (OSError, ValueError):
                pass  # the log's reader went away: requests keep being served


def _without_query(target: bytes) -> bytes:
    mark = target.find(b"?")
    return target if mark < 0 else target[:mark] + b"?REDACTED"
