"""Header rules of a proxy: hop-by-hop removal, X-Forwarded-*, Via, request ids, framing.

Headers are kept as (lower-case name, name as sent, value) byte triples so that names go out
spelled as the client or backend spelled them, and every comparison is on the lower-case name.
"""

from __future__ import annotations

import itertools
import os
from http import HTTPStatus

Header = tuple[bytes, bytes, bytes]

# RFC 9110 §7.6.1 plus Trailer (we do not forward trailers) and Proxy-Connection (legacy).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request headers the proxy rewrites itself rather than passing through.
_REWRITTEN_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"via",
}
_REWRITTEN_RESPONSE = HOP_BY_HOP | {b"content-length", b"via"}
MAX_RESPONSE_HEAD = 64 * 1024
"""A backend sending a larger head is treated as broken (llhttp itself sets no limit)."""

VIA_TOKEN = b"1.1 failover-proxy"
_REQUEST_ID_PREFIX = os.urandom(6).hex().encode()
_request_counter = itertools.count(1)


_REASON_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASON_PHRASES.get(status, b"Unknown")


def new_request_id() -> bytes:
    """A process-unique id: random per-process prefix plus a counter (no syscall per request)."""
    return b"%s-%x" % (_REQUEST_ID_PREFIX, next(_request_counter))


def connection_tokens(value: bytes) -> set[bytes]:
    """Lower-case option names listed in a Connection header."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


_PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})
_NOTHING: frozenset[bytes] = frozenset()


def _extra_hop_by_hop(connection: bytes | None) -> frozenset[bytes] | set[bytes]:
    """Names a Connection header declares hop-by-hop (beyond close / keep-alive / upgrade)."""
    if not connection or connection.lower() in _PLAIN_CONNECTION_TOKENS:
        return _NOTHING
    return connection_tokens(connection) - _PLAIN_CONNECTION_TOKENS


def join_values(previous: bytes | None, value: bytes) -> bytes:
    """Combine repeated list-valued header fields (RFC 9110 §5.3)."""
    return value if previous is None else previous + b", " + value


def first_value(headers: list[Header], lname: bytes) -> bytes | None:
    for name, _, value in headers:
        if name == lname:
            return value
    return None


def build_request_head(
    method: bytes,
    target: bytes,
    headers: list[Header],
    *,
    host: bytes,
    client_ip: bytes,
    scheme: bytes,
    request_id: bytes,
    content_length: int | None,
    chunked: bool,
    upgrade: bytes | None,
    connection: bytes | None,
) -> bytes:
    """The request head sent to a backend, framed by the proxy itself (never the client)."""
    out = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    extra = _extra_hop_by_hop(connection) if connection else _NOTHING
    forwarded_for = client_ip
    original_host = b""
    via = VIA_TOKEN
    has_request_id = False
    for lname, name, value in headers:
        if lname in _REWRITTEN_REQUEST:
            if lname == b"x-forwarded-for":
                forwarded_for = value + b", " + client_ip
            elif lname == b"host":
                original_host = value
            elif lname == b"via":
                via = value + b", " + VIA_TOKEN
            continue
        if extra and lname in extra:
            continue
        if lname == b"x-request-id":
            has_request_id = True
        out += (name, b": ", value, b"\r\n")
    out += (b"X-Forwarded-For: ", forwarded_for, b"\r\nX-Forwarded-Proto: ", scheme, b"\r\n")
    if original_host:
        out += (b"X-Forwarded-Host: ", original_host, b"\r\n")
    length = b"%d" % content_length if content_length is not None else None
    return _finish_head(out, request_id, has_request_id, via, upgrade, chunked, length)


def _finish_head(
    out: list[bytes],
    request_id: bytes,
    has_request_id: bool,
    via: bytes,
    upgrade: bytes | None,
    chunked: bool,
    content_length: bytes | None,
) -> bytes:
    """The lines both directions end with: request id, Via, upgrade, framing, blank line."""
    if not has_request_id:
        out += (b"X-Request-Id: ", request_id, b"\r\n")
    out += (b"Via: ", via, b"\r\n")
    if upgrade is not None:
        out += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None:
        out += (b"Content-Length: ", content_length, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def build_response_head(
    status: int,
    reason: bytes,
    headers: list[Header],
    *,
    content_length: bytes | None,
    chunked: bool,
    keep_alive: bool,
    client_http10: bool,
    request_id: bytes,
    connection: bytes | None = None,
    upgrade: bytes | None = None,
    proxy_headers: bytes | None = None,
) -> bytes:
    """The response head sent to the client, with our own framing and connection headers
    (`proxy_headers`: complete header lines of the proxy's own to add)."""
    out = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    extra = _extra_hop_by_hop(connection) if connection else _NOTHING
    via = VIA_TOKEN
    has_request_id = False
    for lname, name, value in headers:
        if lname in _REWRITTEN_RESPONSE:
            if lname == b"via":
                via = value + b", " + VIA_TOKEN
            continue
        if extra and lname in extra:
            continue
        if lname == b"x-request-id":
            has_request_id = True
        out += (name, b": ", value, b"\r\n")
    if upgrade is None:
        if not keep_alive:
            out.append(b"Connection: close\r\n")
        elif client_http10:
            out.append(b"Connection: keep-alive\r\n")
    if proxy_headers is not None:
        out.append(proxy_headers)
    return _finish_head(out, request_id, has_request_id, via, upgrade, chunked, content_length)


def error_response(
    status: int,
    reason: str,
    detail: str,
    request_id: bytes,
    *,
    close: bool = False,
    retry_after: int | None = None,
    proxy_headers: bytes | None = None,
) -> bytes:
    """A short plain-text answer of the proxy's own: what failed and which request it was."""
    body = f"{status} {reason}: {detail} (request id {request_id.decode()})\n".encode()
    connection = b"close" if close else b"keep-alive"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"X-Request-Id: %s\r\nConnection: %s\r\n%s%s\r\n%s"
        % (
            status, reason.encode(), len(body), request_id, connection,
            b"Retry-After: %d\r\n" % retry_after if retry_after is not None else b"",
            proxy_headers or b"", body,
        )
    )
