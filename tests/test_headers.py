"""Response-head reading the proxy does itself, checked against llhttp's own reading."""

from __future__ import annotations

import contextlib

import httptools
import pytest

from failover_proxy.dataplane.http1.headers import (
    _RequestIds,
    decimal_value,
    parse_response_head,
    response_keeps_alive,
    response_status,
)

HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 404 Not Found\r\nConnection: keep-alive\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 503 x\r\nConnection: close\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: CLOSE \r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection:close\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: foo,close\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: ,close,\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: foo\r\nConnection: close\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: close\t\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: closed\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: xclose\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: c lose\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 x\r\nConnection: upgrade\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 204 No Content\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"1\"\r\n",
    b"HTTP/1.1 299\r\nTransfer-Encoding: chunked\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: foo, keep-alive\r\nContent-Length: 0\r\n",
    b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 999 Custom\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n",
]


def llhttp_reading(head: bytes) -> tuple[int, bool]:
    """What llhttp itself says of a head: its status, and whether the connection stays open."""
    seen: list[tuple[int, bool]] = []

    class Events:
        def on_headers_complete(self) -> None:
            seen.append((parser.get_status_code(), parser.should_keep_alive()))

    parser = httptools.HttpResponseParser(Events())
    with contextlib.suppress(httptools.HttpParserUpgrade):  # a 101 ends what llhttp reads
        parser.feed_data(head + b"\r\n")
    return seen[0]


@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.split(b"\r\n")[0].decode())
def test_status_and_keep_alive_read_as_llhttp_reads_them(head: bytes) -> None:
    status, keep_alive = llhttp_reading(head)
    assert response_status(head) == status
    ours = response_keeps_alive(head, parse_response_head(head, 0).connection)
    if status in (101, 204, 304) or b"Content-Length" in head or b"chunked" in head:
        assert ours == keep_alive
    else:
        assert not keep_alive  # llhttp folds in "the body ends with the close"; the caller does


def test_close_wins_over_keep_alive_even_for_http10() -> None:
    """llhttp keeps an HTTP/1.0 connection listing both; the proxy does not risk it."""
    head = b"HTTP/1.0 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 0\r\n"
    assert llhttp_reading(head)[1] is True
    assert response_keeps_alive(head, parse_response_head(head, 0).connection) is False


@pytest.mark.parametrize(
    ("text", "number"),
    [(b"0", 0), (b"100", 100), (b"65536", 65536), (b"007", 7), (b"5 \t ", 5), (b" 42", 42),
     (b"18446744073709551615", 18446744073709551615)],
)
def test_decimal_values(text: bytes, number: int) -> None:
    assert decimal_value(text) == number


@pytest.mark.parametrize("text", [b"", b"  ", b"1 2", b"+5", b"-1", b"0x10", b"1e3", b"12a"])
def test_decimal_values_refused(text: bytes) -> None:
    with pytest.raises(ValueError):
        decimal_value(text)


def test_request_ids_count_on_in_decimal_across_each_thousand() -> None:
    """Ids are the process prefix and a counter whose last three digits come from a table: in
    order, unique, and the digits after the prefix are the counter itself."""
    ids = _RequestIds()
    made = [ids.next() for _ in range(2500)]
    prefixes = {made_id[: made_id.index(b"-") + 1] for made_id in made}
    assert len(prefixes) == 1 and len(set(made)) == len(made)
    (prefix,) = prefixes
    assert [int(made_id[len(prefix):]) for made_id in made] == list(range(1, 2501))
    assert made[0] == prefix + b"0001" and made[998:1001] == [
        prefix + b"0999", prefix + b"1000", prefix + b"1001"
    ]
