"""Walking a head's field lines (_fields.c, and its plain-Python twin in headers.py): which
fields the proxy reads, what it forwards as it came, and where the head ends; the C walk and
the Python walk agree on every input, valid or not."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from failover_proxy.dataplane.http1 import headers
from failover_proxy.dataplane.http1.headers import (
    BAD_HOST,
    HOST,
    HOST_BYTES,
    NOTED,
    PASS,
    REQUEST_TAKEN,
    RESPONSE_TAKEN,
    TE,
    X_REQUEST_ID,
    WalkFields,
    head_end_in_python,
    header_kind,
    walk_fields_in_python,
)

HeadEnd = Callable[[bytes, int], int]

try:
    from failover_proxy.dataplane.http1 import _fields
except ImportError:  # a plain-Python build: only the Python walk is there
    _fields = None  # type: ignore[assignment]

WALKERS: list[tuple[HeadEnd, WalkFields]] = [(head_end_in_python, walk_fields_in_python)]
WALKER_IDS = ["python"]
if _fields is not None:
    WALKERS.append((_fields.head_end, _fields.walk_fields))
    WALKER_IDS.append("c")


def test_the_proxy_walks_heads_in_c_when_built() -> None:
    if _fields is None:
        pytest.skip("a plain-Python build")
    assert headers.walk_fields is _fields.walk_fields
    assert headers.head_end is _fields.head_end


NAMES = [
    b"Host", b"HOST", b"content-length", b"Transfer-Encoding", b"CONNECTION", b"Upgrade",
    b"expect", b"Via", b"X-Forwarded-For", b"x-request-id", b"Proxy-Connection", b"Keep-Alive",
    b"TE", b"Trailer", b"X-Forwarded-Proto", b"x-forwarded-host", b"cOnTeNt-LeNgTh",
    b"User-Agent", b"Accept", b"Cookie", b"Hosts", b"Vias", b"X-Requested-With", b"Te2",
    b"Upgrade-Insecure-Requests", b"1x", b"-", b"\xe9tag", b"Cookie-Jar", b"Content-Lengths",
    b"Hos", b"H\xcfst", b"Content_Length", b"X-Forwarded-For-Real", b"X_A_Name_Longer_Than_Any_Special",
]
ALL_KINDS = (1 << (TE + 1)) - 2  # every kind but PASS


@pytest.mark.parametrize("walker", WALKERS, ids=WALKER_IDS)
@pytest.mark.parametrize("name", NAMES, ids=lambda name: name.decode("latin-1"))
def test_a_field_is_known_by_its_name_in_any_case(
    walker: tuple[HeadEnd, WalkFields], name: bytes
) -> None:
    _, walk_fields = walker
    for value, trimmed in ((b" v", b"v"), (b"", b""), (b"\tv, w ", b"v, w"), (b"a: b", b"a: b")):
        head = b"GET / HTTP/1.1\r\n" + name + b":" + value + b"\r\n\r\n"
        runs: list[bytes] = []
        found = walk_fields(head, 0, ALL_KINDS, 0, runs)
        kind = header_kind(name)
        if kind == HOST and (not trimmed or trimmed.translate(None, HOST_BYTES)):
            kind = BAD_HOST  # no host[:port]: the request will be refused
        if kind == PASS:
            assert found[3:] == [] and runs == [head[16:-2]]
        else:
            assert found[3:] == [kind, trimmed] and runs == []
        assert found[:3] == [len(head), 1, 14]


@pytest.mark.parametrize("walker", WALKERS, ids=WALKER_IDS)
def test_a_special_name_in_a_value_is_no_field(walker: tuple[HeadEnd, WalkFields]) -> None:
    _, walk_fields = walker
    head = b"GET / HTTP/1.1\r\nX-Note: Connection: close\r\nCookie-Jar: Host: x\r\n\r\n"
    runs: list[bytes] = []
    assert walk_fields(head, 0, ALL_KINDS, 0, runs) == [len(head), 2, 14]
    assert runs == [head[16:-2]]


@pytest.mark.parametrize("walker", WALKERS, ids=WALKER_IDS)
def test_forwarded_fields_stay_in_runs_of_the_lines_they_came_in(
    walker: tuple[HeadEnd, WalkFields],
) -> None:
    """Taken fields split the runs and are read; noted ones (X-Request-Id) are read and stay."""
    _, walk_fields = walker
    head = (
        b"GET /a HTTP/1.1\r\nAccept: */*\r\nHost: example\r\nX-Request-Id: r-1\r\n"
        b"Cookie: c=1\r\nConnection: keep-alive\r\nTE: trailers\r\nUser-Agent: u\r\n\r\nGET "
    )
    runs: list[bytes] = []
    found = walk_fields(head, 0, REQUEST_TAKEN, NOTED, runs)
    assert found == [
        len(head) - 4, 7, 15,
        HOST, b"example", X_REQUEST_ID, b"r-1", 4, b"keep-alive", TE, b"trailers",
    ]
    assert runs == [
        b"Accept: */*\r\n", b"X-Request-Id: r-1\r\nCookie: c=1\r\n", b"User-Agent: u\r\n"
    ]
    response = b"HTTP/1.1 200 OK\r\nHost: h\r\nContent-Length: 2\r\nVia: 1.0 a\r\n\r\nok"
    runs = []
    found = walk_fields(response, 0, RESPONSE_TAKEN, NOTED, runs)
    assert found[3:] == [2, b"2", 7, b"1.0 a"]
    assert runs == [b"Host: h\r\n"]  # Host means nothing special in a response


_PIECES = [
    b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"\r\n", b"\r", b"\n", b":", b" ", b"\t",
    b"Host: a\r\n", b"content-length:  12 \r\n", b"X-Request-Id:x\r\n", b"Via:\r\n",
    b"Connection: close\r\n", b"Te: x\r\n", b"User-Agent: curl\r\n", b"nocolon\r\n",
    b"Accept: a:b\r\n", b"\r\n\r\n", b"x", b"HOST", b"\xff", b"\x00", b"X_Under: u\r\n",
    b"Host: bad host\r\n", b"Host: [::1]:80\r\n", b"Host:\r\n",
    b"_", b"Transfer_Encoding: chunked\r\n",
]


def _random_bytes(rng: random.Random) -> bytes:
    return b"".join(rng.choice(_PIECES) for _ in range(rng.randrange(0, 14)))


def test_the_c_walk_and_the_python_walk_agree_on_any_bytes() -> None:
    """Valid or not, cut anywhere, from any start: the same end, fields and runs."""
    if _fields is None:
        pytest.skip("a plain-Python build")
    rng = random.Random(20261124)
    for _ in range(20000):
        buf = _random_bytes(rng)
        if rng.random() < 0.5:
            buf = buf[: rng.randrange(0, len(buf) + 1)]
        start = rng.randrange(0, len(buf) + 1)
        taken = rng.choice([REQUEST_TAKEN, RESPONSE_TAKEN, ALL_KINDS, 0, rng.randrange(1 << 14)])
        noted = rng.choice([NOTED, 0, rng.randrange(1 << 14)])
        runs_c: list[bytes] = []
        runs_py: list[bytes] = []
        found_c = _fields.walk_fields(buf, start, taken, noted, runs_c)
        found_py = walk_fields_in_python(buf, start, taken, noted, runs_py)
        assert (found_c, runs_c) == (found_py, runs_py), (buf, start, taken, noted)
        assert _fields.head_end(buf, start) == head_end_in_python(buf, start), (buf, start)


def test_the_c_walk_refuses_bad_arguments() -> None:
    """It reads raw memory: an offset outside the bytes, or another type, is an error."""
    if _fields is None:
        pytest.skip("a plain-Python build")
    with pytest.raises(ValueError):
        _fields.head_end(b"abc", 4)
    with pytest.raises(ValueError):
        _fields.walk_fields(b"abc", -1, 0, 0, [])
    with pytest.raises(TypeError):
        _fields.walk_fields(bytearray(b"abc"), 0, 0, 0, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _fields.walk_fields(b"abc", 0, 0, 0, ())  # type: ignore[arg-type]
