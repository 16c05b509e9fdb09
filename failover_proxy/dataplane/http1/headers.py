"""Header rules of a proxy: hop-by-hop removal, X-Forwarded-*, Via, request ids, framing.

Request and response heads are read whole from their raw bytes once llhttp has accepted them:
`walk_fields` (in C, _fields.c) finds the few field lines the proxy reads. Most fields go
through untouched, in the runs of lines they came in, so they go out exactly as the client or
backend wrote them; the few the proxy rewrites (framing, hop-by-hop, Host, X-Forwarded-*, Via)
are kept as values and written by the proxy. Heads are assembled with `b"..." % (...)` of bytes
and ints, which mypyc compiles to one allocation and plain copies (a long `b"".join` costs a
malloc of its own)."""

from __future__ import annotations

import os
from collections.abc import Callable
from http import HTTPStatus
from typing import Final, cast

from ..request import field_value_at
from ..streams import ResponseHead

# What the proxy does with a header field, by its lower-case name (PASS: forwarded as is).
PASS: Final = 0
HOST: Final = 1
CONTENT_LENGTH: Final = 2
TRANSFER_ENCODING: Final = 3
CONNECTION: Final = 4
UPGRADE: Final = 5
EXPECT: Final = 6
VIA: Final = 7
X_FORWARDED_FOR: Final = 8
X_REQUEST_ID: Final = 9
PROXY_CONNECTION: Final = 10
DROPPED: Final = 11
"""Hop-by-hop fields (RFC 9110 §7.6.1, plus Trailer and the legacy Proxy-Connection) and the
X-Forwarded-Proto / X-Forwarded-Host the proxy sets itself."""
BAD_HOST: Final = 13
"""A Host field whose value is no `host[:port]` (empty, a space, `/`, `@`…): the walk reports
it so, and the request is refused (RFC 9112 §3.2)."""
TE: Final = 14
"""Hop-by-hop: what the client accepts (`trailers`); the proxy sends its own on its hop."""
UNDERSCORED: Final = 12
"""A name with an underscore: some backends (CGI-style, several frameworks) read `_` as `-`, so
`Transfer_Encoding` would frame a request for them. Dropped from requests unless
`limits.underscores_in_headers` (nginx's rule)."""

_KIND_BY_LOWER_NAME: Final = {
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"upgrade": UPGRADE,
    b"expect": EXPECT,
    b"via": VIA,
    b"x-forwarded-for": X_FORWARDED_FOR,
    b"x-request-id": X_REQUEST_ID,
    b"proxy-connection": PROXY_CONNECTION,
    b"keep-alive": DROPPED,
    b"te": TE,
    b"trailer": DROPPED,
    b"x-forwarded-proto": DROPPED,
    b"x-forwarded-host": DROPPED,
}
MAX_RESPONSE_HEAD: Final = 64 * 1024
"""A backend sending a larger head is treated as broken (llhttp itself sets no limit)."""

VIA_TOKEN: Final = b"1.1 failover-proxy"


HOST_BYTES: Final = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%:[]"
)
"""What a Host value may hold: a reg-name, an IPv4 address or a bracketed IP literal, and a
port (RFC 3986 §3.2.2; RFC 9110 §7.2). _fields.c checks the same bytes."""


def header_kind(name: bytes) -> int:
    """How the proxy treats a header field, by its name in any case."""
    kind = _KIND_BY_LOWER_NAME.get(name.lower(), PASS)
    return UNDERSCORED if kind == PASS and b"_" in name else kind


REQUEST_TAKEN: Final = sum(
    1 << kind for kind in range(HOST, DROPPED + 1) if kind != X_REQUEST_ID
) | 1 << BAD_HOST | 1 << TE
"""The kinds of request field the proxy reads and writes itself (walk_fields' `taken`): all
but X-Request-Id, which is forwarded as it came (and names with an underscore: see
UNDERSCORED_TAKEN)."""
UNDERSCORED_TAKEN: Final = 1 << UNDERSCORED
"""Added to REQUEST_TAKEN unless `limits.underscores_in_headers`: such fields are dropped."""
RESPONSE_TAKEN: Final = sum(
    1 << kind
    for kind in (CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION, UPGRADE, VIA, PROXY_CONNECTION,
                 DROPPED, TE)
)
"""The same for a response: Host, Expect and X-Forwarded-For mean nothing special in one."""
NOTED: Final = 1 << X_REQUEST_ID
"""Kinds read but forwarded as they came (walk_fields' `noted`)."""

WalkFields = Callable[[bytes, int, int, int, list[bytes]], list[int | bytes]]


def head_end_in_python(buf: bytes, start: int) -> int:
    """_fields.c's head_end, for builds without a C compiler."""
    end = buf.find(b"\r\n\r\n", start)
    return end + 4 if end >= 0 else -1


def walk_fields_in_python(
    buf: bytes, start: int, taken: int, noted: int, runs: list[bytes]
) -> list[int | bytes]:
    """_fields.c's walk_fields (see there what it gives), for builds without a C compiler."""
    found: list[int | bytes] = [-1, 0, -1]
    line_end = buf.find(b"\r\n", start)
    if line_end < 0:
        return found
    end = -1
    count = 0
    pos = run = line_end + 2
    while not buf.startswith(b"\r\n", pos):
        stop = buf.find(b"\r\n", pos)
        if stop < 0:
            break
        count += 1
        colon = buf.find(b":", pos, stop)
        kind = PASS if colon < 0 else header_kind(buf[pos:colon])
        if kind != PASS and taken >> kind & 1:
            if run < pos:
                runs.append(buf[run:pos])
            run = stop + 2
        if kind != PASS and (taken | noted) >> kind & 1:
            value = field_value_at(buf[pos:stop], colon - pos)
            if kind == HOST and (not value or value.translate(None, HOST_BYTES)):
                kind = BAD_HOST
            found += [kind, value]
        pos = stop + 2
    else:
        end = pos + 2
    if run < pos:
        runs.append(buf[run:pos])
    found[0] = end
    found[1] = count
    found[2] = line_end
    return found


def _walkers() -> tuple[Callable[[bytes, int], int], WalkFields]:
    try:
        from . import _fields
    except ImportError:  # a plain-Python build
        return head_end_in_python, walk_fields_in_python
    return _fields.head_end, _fields.walk_fields


_WALKERS: Final = _walkers()
head_end: Final = _WALKERS[0]
"""Where a head ends (_fields.c, or the same in Python)."""
walk_fields: Final = _WALKERS[1]
"""A head's fields, those the proxy reads apart (_fields.c, or the same in Python)."""


def _line_name(line: bytes) -> bytes:
    """The lower-case name of one field line (names cannot contain a colon)."""
    return line[: line.find(b":")].lower()


_LAST_DIGITS: Final = [b"%03d" % number for number in range(1000)]


class _RequestIds:
    """Process-unique ids: a random per-process prefix plus a decimal counter of at least four
    digits (no syscall per request). Its last three digits come from a table and the rest is
    formatted once per thousand ids, so an id costs one join of two bytes objects instead of
    formatting a number (about 180 instructions less per request)."""

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex().encode() + b"-"
        self.thousands = 0
        self.stem = self.prefix + b"0"
        self.last = 0

    def next(self) -> bytes:
        last = self.last + 1
        if last == 1000:
            last = 0
            self.thousands += 1
            self.stem = b"%s%d" % (self.prefix, self.thousands)
        self.last = last
        return self.stem + _LAST_DIGITS[last]


_REQUEST_IDS: Final = _RequestIds()


_REASON_PHRASES: Final = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASON_PHRASES.get(status, b"Unknown")


def new_request_id() -> bytes:
    return _REQUEST_IDS.next()


MAX_CLIENT_REQUEST_ID: Final = 128


def usable_request_id(value: bytes) -> bool:
    """Whether a client's own X-Request-Id can name its request in the proxy's log, answers and
    response as well (so one id follows the request everywhere): a printable token of at most
    MAX_CLIENT_REQUEST_ID bytes. Any other is forwarded as it came, but not adopted."""
    return 0 < len(value) <= MAX_CLIENT_REQUEST_ID and all(0x21 <= byte <= 0x7E for byte in value)


def connection_tokens(value: bytes) -> set[bytes]:
    """Lower-case option names listed in a Connection header."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


_PLAIN_CONNECTION_TOKENS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})


def forwarded_block(lines: list[bytes], connection: bytes | None) -> bytes:
    """The forwarded fields as one block (`lines`: finished lines, or runs of them), minus those
    a Connection header names as hop-by-hop (beyond close / keep-alive / upgrade), which the
    sender meant for this hop only."""
    block = lines[0] if len(lines) == 1 else b"".join(lines)
    if (
        connection is not None
        and connection != b"keep-alive"  # the usual values, compared without a method call
        and connection != b"close"
        and connection.lower() not in _PLAIN_CONNECTION_TOKENS
    ):
        named = connection_tokens(connection) - _PLAIN_CONNECTION_TOKENS
        if named:
            kept = [line for line in block.split(b"\r\n") if line and _line_name(line) not in named]
            block = b"".join(line + b"\r\n" for line in kept)
    return block


_ZERO: Final = ord("0")
_SPACE: Final = ord(" ")
_TAB: Final = ord("\t")


def decimal_value(value: bytes) -> int:
    """A Content-Length value as a number: digits, with optional whitespace around them (a
    compiled loop; `int()` on bytes costs a generic call and a text parse, ~900 instructions)."""
    number = 0
    digits = 0
    trailing = False
    for byte in value:
        if byte in (_SPACE, _TAB):  # mypyc compiles this to two comparisons
            trailing = digits > 0
            continue
        digit = byte - _ZERO
        if trailing or digit < 0 or digit > 9:
            raise ValueError(f"not a decimal number: {value!r}")
        number = number * 10 + digit
        digits += 1
    if not digits:
        raise ValueError("no digits in a number")
    return number


def response_status(head: bytes) -> int:
    """The status code of a response head llhttp has accepted: its status line is exactly
    `HTTP/d.d ddd` up to the reason (read here: the parser's getter is a generic method call)."""
    return (head[9] - _ZERO) * 100 + (head[10] - _ZERO) * 10 + (head[11] - _ZERO)


def response_keeps_alive(head: bytes, connection: bytes | None) -> bool:
    """Whether the backend keeps the connection open after this response (RFC 9112 §9.3), by
    llhttp's reading of the version: HTTP/1.1 semantics need a major and a minor above zero.
    A close token wins over keep-alive; framing that needs the close is the caller's concern."""
    http11 = head[5] != _ZERO and head[7] != _ZERO
    if connection is None:
        return http11
    if connection == b"keep-alive":
        return True
    if connection == b"close":
        return False
    tokens = connection_tokens(connection)
    if b"close" in tokens:
        return False
    return http11 or b"keep-alive" in tokens


def join_values(previous: bytes | None, value: bytes) -> bytes:
    """Combine repeated list-valued header fields (RFC 9110 §5.3)."""
    return value if previous is None else previous + b", " + value


class Http1Head(ResponseHead):
    """A backend's HTTP/1 response head as parsed: the forwarded fields as runs of finished
    lines, and the values of the fields the proxy rewrites."""

    # Defaults live on the class: a response sets only the fields it carries.
    content_length: bytes | None = None
    chunked = False
    """The backend framed the body with Transfer-Encoding."""
    connection: bytes | None = None
    upgrade: bytes | None = None
    via: bytes | None = None
    has_request_id = False
    size = -1
    """The head's length up to and including its blank line; -1 when the lines hold none."""
    raw = b""
    """The head's bytes up to and including its blank line (read_response_head)."""
    keeps_alive = False
    """Whether the backend keeps the connection open after this response."""
    block: bytes | None = None
    """The forwarded lines as one block (forwarded_block), once built."""
    usual_start: bytes | None = None
    usual_end = b""
    """The usual client head for this response (build_response_head), once built: the bytes
    before its request id and those after it."""
    h2_fields: list[tuple[bytes, bytes]] | None = None
    """Its forwarded fields (and length) as HTTP/2 fields, once built (http2/downstream.py)."""
    body_size = -1
    """The body's length when Content-Length alone frames it and the connection stays open
    after it (a final status with a body, kept alive); -1 otherwise. Such a message ends with
    the parser back at a message's start, so a later response whose head has these bytes can be
    framed without the parser (UpstreamConnection)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []


def read_response_head(buf: bytes, start: int) -> Http1Head:
    """The response head that begins at `start` in `buf`, which llhttp has found complete,
    parsed and checked: where llhttp saw it end must be where its blank line is.

    Nothing in a parsed head changes after this (but for `block` and the usual client head,
    built once from it when first needed), so a connection may hand the same one out again
    for a later response whose head has the same bytes (UpstreamConnection): a backend answers
    one kind of request with heads that differ at most once a second (Date).
    """
    parsed = parse_response_head(buf, start)
    size = parsed.size
    if size < 14:  # (no blank line: -1)
        raise ValueError("response head not found where the parser saw it")
    raw = buf if start == 0 and size == len(buf) else buf[start : start + size]
    if not raw.startswith(b"HTTP/"):  # startswith: a native call
        raise ValueError("response head not found where the parser saw it")
    parsed.raw = raw
    parsed.status = status = response_status(raw)
    parsed.keeps_alive = keeps_alive = response_keeps_alive(raw, parsed.connection)
    length = parsed.content_length
    if length is not None and not parsed.chunked:
        parsed.length = decimal_value(length)
    if (
        keeps_alive
        and length is not None
        and not parsed.chunked
        and status >= 200
        and status != 204
        and status != 304
    ):
        parsed.body_size = parsed.length
    return parsed


def parse_response_head(buf: bytes, start: int) -> Http1Head:
    """The response head at `start` in `buf`, which llhttp has accepted: a status line and field
    lines, each ended by CRLF, with no folding; the first blank line ends it (`size`, -1 when
    `buf` ends before one) and whatever follows is ignored. Fields forwarded as they came stay
    in the runs of lines they arrived in (walk_fields)."""
    parsed = Http1Head()
    found = walk_fields(buf, start, RESPONSE_TAKEN, NOTED, parsed.lines)
    end = cast(int, found[0])
    if end >= 0:
        parsed.size = end - start
    if end - start > MAX_RESPONSE_HEAD:
        raise ValueError("response head too large")
    for index in range(3, len(found), 2):
        kind = cast(int, found[index])
        value = cast(bytes, found[index + 1])
        if kind == CONTENT_LENGTH:
            parsed.content_length = value
        elif kind == TRANSFER_ENCODING:
            parsed.chunked = True
        elif kind == CONNECTION:
            parsed.connection = join_values(parsed.connection, value)
        elif kind == VIA:
            parsed.via = join_values(parsed.via, value)
        elif kind == UPGRADE:
            parsed.upgrade = value
        elif kind == X_REQUEST_ID:
            parsed.has_request_id = True
        # DROPPED, PROXY_CONNECTION: hop-by-hop, not forwarded
    return parsed


_TE_TRAILERS: Final = b"TE: trailers\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"


def last_chunk(trailers: list[bytes] | None) -> bytes:
    """The end of a chunked body with the trailer fields a proxy passes on: not framing,
    routing, connection or request-id fields (RFC 9110 §6.5.1: they mean nothing, or something
    else, after the body), which are dropped."""
    if not trailers:
        return LAST_CHUNK
    kept = [
        line + b"\r\n" for line in trailers
        if line.find(b":") > 0 and header_kind(line[: line.find(b":")]) == PASS
    ]
    return b"0\r\n" + b"".join(kept) + b"\r\n"


def host_line(host: bytes) -> bytes:
    """The end of a request line sent to a backend and the Host line after it: the first part
    of `usual_request_head` after the target."""
    return b" HTTP/1.1\r\nHost: %s\r\n" % host


def forwarded_prefix(forwarded_for: bytes | None, client_ip: bytes, scheme: bytes) -> bytes:
    """The X-Forwarded-For and -Proto lines of a request sent to a backend, and the name of
    X-Forwarded-Host, whose value (the client's Host) follows in `usual_request_head`."""
    if forwarded_for is not None:
        client_ip = b"%s, %s" % (forwarded_for, client_ip)
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: " % (
        client_ip, scheme
    )


def usual_request_head(
    method: bytes,
    target: bytes,
    host_line: bytes,
    fields: bytes,
    prefix: bytes,
    original_host: bytes,
    request_id: bytes,
    content_length: int | None,
    chunked: bool,
) -> bytes:
    """The request head sent to a backend for the usual request: it came with a Host, no
    X-Request-Id, Via or upgrade of its own. `host_line`: host_line(), kept per backend as
    Backend.host_line when the backend's name is sent; `prefix`: forwarded_prefix. The
    parts that stay the same are joined beforehand: each part of the format costs about 40
    instructions, and this one has 10 (13 with a Content-Length) where one built from scratch
    has 18 (21)."""
    if chunked:
        tail = _USUAL_CHUNKED_TAIL
    elif content_length is not None:
        return b"%s %s%s%s%s%s\r\nX-Request-Id: %s%sContent-Length: %d\r\n\r\n" % (
            method, target, host_line, fields, prefix, original_host, request_id,
            _USUAL_VIA_TAIL, content_length,
        )
    else:
        tail = _USUAL_END_TAIL
    return b"%s %s%s%s%s%s\r\nX-Request-Id: %s%s" % (
        method, target, host_line, fields, prefix, original_host, request_id, tail
    )


def build_request_head(
    method: bytes,
    target: bytes,
    fields: bytes,
    *,
    host: bytes,
    client_ip: bytes,
    forwarded_for: bytes | None,
    original_host: bytes | None,
    via: bytes | None,
    scheme: bytes,
    request_id: bytes,
    has_request_id: bool,
    content_length: int | None,
    chunked: bool,
    upgrade: bytes | None,
    te_trailers: bool = False,
) -> bytes:
    """The request head sent to a backend, framed by the proxy itself (never the client), for
    any request (usual_request_head makes the usual one faster); `fields`: the forwarded
    header lines (forwarded_block); `te_trailers`: the proxy takes trailers on its hop (it
    passes them on to a client that takes them)."""
    if forwarded_for is not None:
        client_ip = b"%s, %s" % (forwarded_for, client_ip)
    if original_host is not None:
        proto = b"X-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n" % (scheme, original_host)
    else:
        proto = b"X-Forwarded-Proto: %s\r\n" % scheme
    length = b"%d" % content_length if content_length is not None else None
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%sX-Forwarded-For: %s\r\n%s%s" % (
        method, target, host, fields, _TE_TRAILERS if te_trailers else b"", client_ip, proto,
        _closing_lines(request_id, has_request_id, via, upgrade, chunked, length),
    )


def _closing_lines(
    request_id: bytes,
    has_request_id: bool,
    via: bytes | None,
    upgrade: bytes | None,
    chunked: bool,
    content_length: bytes | None,
) -> bytes:
    """The lines both directions end with: request id, Via, upgrade, framing, blank line."""
    request_id_line = b"" if has_request_id else b"X-Request-Id: %s\r\n" % request_id
    via_line = b"Via: %s, %s\r\n" % (via, VIA_TOKEN) if via is not None else _PLAIN_VIA_LINE
    upgrade_lines = (
        b"Connection: upgrade\r\nUpgrade: %s\r\n" % upgrade if upgrade is not None else b""
    )
    if chunked:
        framing = _CHUNKED_END
    elif content_length is not None:
        framing = b"Content-Length: %s\r\n\r\n" % content_length
    else:
        framing = _CRLF_END
    return b"%s%s%s%s" % (request_id_line, via_line, upgrade_lines, framing)


_PLAIN_VIA_LINE: Final = b"Via: " + VIA_TOKEN + b"\r\n"
_CHUNKED_END: Final = b"Transfer-Encoding: chunked\r\n\r\n"
_CRLF_END: Final = b"\r\n"
_USUAL_VIA_TAIL: Final = b"\r\n" + _PLAIN_VIA_LINE
"""What follows the request id in the usual request head, before its framing."""
_USUAL_END_TAIL: Final = _USUAL_VIA_TAIL + _CRLF_END
_USUAL_CHUNKED_TAIL: Final = _USUAL_VIA_TAIL + _CHUNKED_END
_STATUS_LINES: Final = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, phrase) for status, phrase in _REASON_PHRASES.items()
}


def _status_line(status: int) -> bytes:
    status_line = _STATUS_LINES.get(status)
    if status_line is None:
        status_line = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
    return status_line


def _block(head: Http1Head) -> bytes:
    """The response's forwarded lines as one block, built once per head."""
    block = head.block
    if block is None:
        block = head.block = forwarded_block(head.lines, head.connection)
    return block


def build_response_head(
    status: int,
    head: Http1Head,
    *,
    chunked: bool,
    keep_alive: bool,
    client_http10: bool,
    request_id: bytes,
    upgrade: bytes | None = None,
    proxy_headers: bytes | None = None,
) -> bytes:
    """The response head sent to the client, with our own framing and connection headers
    (`proxy_headers`: complete header lines of the proxy's own to add). The reason phrase is the
    standard one (RFC 9112 §4: clients ignore it)."""
    content_length = None if head.chunked else head.content_length
    usual = (
        keep_alive and not client_http10 and upgrade is None and proxy_headers is None
        and not head.has_request_id and head.via is None
    )
    if usual and not chunked and content_length is not None and status == head.status:
        # The usual response, framed by its length: all but the request id is the same for
        # every response with this head (a connection hands the same ResponseHead out again
        # while the backend's heads repeat), so it is built once.
        start = head.usual_start
        if start is None:
            start = head.usual_start = (
                _status_line(status) + _block(head) + b"X-Request-Id: "
            )
            head.usual_end = b"\r\n%sContent-Length: %s\r\n\r\n" % (
                _PLAIN_VIA_LINE, content_length
            )
        return b"%s%s%s" % (start, request_id, head.usual_end)
    status_line = _status_line(status)
    block = _block(head)
    if usual:
        # One format for the whole head.
        if chunked:
            framing = _CHUNKED_END
        elif content_length is not None:
            return b"%s%sX-Request-Id: %s\r\n%sContent-Length: %s\r\n\r\n" % (
                status_line, block, request_id, _PLAIN_VIA_LINE, content_length
            )
        else:
            framing = _CRLF_END
        return b"%s%sX-Request-Id: %s\r\n%s%s" % (
            status_line, block, request_id, _PLAIN_VIA_LINE, framing
        )
    connection_line = b""
    if upgrade is None:
        if not keep_alive:
            connection_line = b"Connection: close\r\n"
        elif client_http10:
            connection_line = b"Connection: keep-alive\r\n"
    return b"%s%s%s%s%s" % (
        status_line,
        block,
        connection_line,
        proxy_headers if proxy_headers is not None else b"",
        _closing_lines(
            request_id, head.has_request_id, head.via, upgrade, chunked, content_length
        ),
    )


def error_response(
    status: int,
    reason: str,
    detail: str,
    request_id: bytes,
    *,
    close: bool = False,
    retry_after: int | None = None,
    proxy_headers: bytes | None = None,
    head_only: bool = False,
) -> bytes:
    """A short plain-text answer of the proxy's own: what failed and which request it was.
    `head_only`: it answers a HEAD request, so the body is described but not sent (RFC 9110
    §9.3.2); a client would read it as the start of the next response."""
    body = f"{status} {reason}: {detail} (request id {request_id.decode()})\n".encode()
    connection = b"close" if close else b"keep-alive"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"X-Request-Id: %s\r\nConnection: %s\r\n%s%s\r\n%s"
        % (
            status, reason.encode(), len(body), request_id, connection,
            b"Retry-After: %d\r\n" % retry_after if retry_after is not None else b"",
            proxy_headers or b"", b"" if head_only else body,
        )
    )
