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


async def test_one_address_holds_at_most_its_connections(
    proxy: StartProxy, raw_backend: StartRaw,
) -> None:
    """limits.max_connections_per_ip: 2. A third connection from 127.0.0.1 is answered 429 and
    closed at once; once one of the two ends, a new one is served. Another address is not
    limited by this one's count."""
    backend = RecordingBackend()
    server = await proxy(single_upstream_config(
        [await raw_backend(backend)], top_extra="limits: {max_connections_per_ip: 2}\n"))
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    for reader, writer in held:
        writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_one_response(reader), 5)).startswith(b"HTTP/1.1 200")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    refused = await asyncio.wait_for(reader.read(), 5)  # answered and closed, unasked
    writer.close()
    assert refused.startswith(b"HTTP/1.1 429 ") and b"Connection: close" in refused
    other_reader, other_writer = await asyncio.open_connection(
        "127.0.0.1", server.port, local_addr=("127.0.0.2", 0))  # another client address
    other_writer.write(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(read_one_response(other_reader), 5)).startswith(
        b"HTTP/1.1 200")
    other_writer.close()
    held[0][1].close()
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(read_one_response(reader), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    held[1][1].close()
    assert server.store.counters["connections_refused"] == {("per_ip_limit",): 1}
