"""Abuse limits, each with raw sockets: requests per connection, and what the access log keeps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from .conftest import read_one_response, single_upstream_config
from .test_request_framing import RecordingBackend, StartProxy, StartRaw


async def test_the_last_request_a_connection_may_carry_is_answered_with_close(
    proxy: StartProxy, raw_backend: StartRaw,
) -> None:
    backend = RecordingBackend()
    server = await proxy(single_upstream_config(
        [await raw_backend(backend)], top_extra="limits: {max_requests_per_connection: 3}\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    answers = []
    for number in range(3):
        writer.write(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % number)
        answers.append(await asyncio.wait_for(read_one_response(reader), 5))
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
    assert [b"\r\nConnection: close\r\n" in a for a in answers] == [False, False, True]
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and then closed
    writer.close()
    assert len(backend.heads) == 3


async def test_query_strings_can_be_kept_out_of_the_access_log(
    proxy: StartProxy, raw_backend: StartRaw, tmp_path: Path,
) -> None:
    log_file = tmp_path / "access.log"
    backend = RecordingBackend()
    server = await proxy(single_upstream_config(
        [await raw_backend(backend)],
        top_extra=f"access_log: {{path: '{log_file}', redact_query: true}}\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for target in (b"/login?token=s3cret&user=ann", b"/plain"):
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_one_response(reader), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    assert backend.heads[0].startswith(b"GET /login?token=s3cret&user=ann ")  # forwarded whole
    await asyncio.sleep(1.2)  # the sweep hands lines to the writer thread
    text = log_file.read_text()
    assert "s3cret" not in text
    assert [json.loads(line)["path"] for line in text.splitlines()] == [
        "/login?REDACTED", "/plain"]
