"""Header fields between HTTP/1.1's form (`Name: value` lines, as the exchange keeps them) and
HTTP/2's (lower-case (name, value) pairs), both ways, for both sides of the proxy."""

from __future__ import annotations

from typing import Final

from ..http1.headers import (
    CONTENT_LENGTH,
    RESPONSE_TAKEN,
    VIA,
    X_REQUEST_ID,
    Http1Head,
    header_kind,
    join_values,
)

CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
"""Fields HTTP/2 forbids (RFC 9113 §8.2.2): never sent in an HTTP/2 message."""

Fields = list[tuple[bytes, bytes]]


def fields_of_lines(block: bytes, skip: frozenset[bytes] = frozenset()) -> Fields:
    """`Name: value` lines (CRLF-ended) as HTTP/2 fields: names in lower case, the
    connection-specific ones and those in `skip` left out, and `te` only as `trailers`."""
    fields: Fields = []
    for line in block.split(b"\r\n"):
        colon = line.find(b":")
        if colon <= 0:
            continue
        name = line[:colon].strip().lower()
        if name in CONNECTION_SPECIFIC or name in skip:
            continue
        value = line[colon + 1 :].strip()
        if name == b"te" and value.lower() != b"trailers":
            continue
        fields.append((name, value))
    return fields


def trailer_fields(lines: list[bytes]) -> Fields:
    """Trailer fields as the exchange carries them (`name: value` lines) for HTTP/2."""
    return fields_of_lines(b"\r\n".join(lines))


def trailer_lines(fields: Fields) -> list[bytes]:
    """HTTP/2 trailers as the exchange carries them; pseudo-header fields have no place there
    (the caller refuses them first)."""
    return [name + b": " + value for name, value in fields]


def response_head(fields: Fields) -> Http1Head:
    """A backend's HTTP/2 response head as the exchange and every client codec take it: the
    fields as `Name: value` lines, with the ones the proxy writes itself (the length, Via)
    read out of them, as an HTTP/1 head is parsed. Raises ValueError when it is malformed."""
    head = Http1Head()
    lines: list[bytes] = []
    status = -1
    for name, value in fields:
        if name[:1] == b":":
            if name != b":status" or status >= 0 or len(value) != 3 or not value.isdigit():
                raise ValueError("a response with a malformed or repeated :status")
            status = int(value)
            continue
        kind = header_kind(name)
        if (1 << kind) & RESPONSE_TAKEN:
            if kind == CONTENT_LENGTH:
                if not value.isdigit():
                    raise ValueError("a malformed content-length")
                head.content_length = value
                head.length = int(value)
            elif kind == VIA:
                head.via = join_values(head.via, value)
            continue
        if kind == X_REQUEST_ID:
            head.has_request_id = True
        lines.append(name + b": " + value + b"\r\n")
    if status < 0:
        raise ValueError("a response without :status")
    head.status = status
    head.keeps_alive = True
    head.lines = [b"".join(lines)]
    return head
