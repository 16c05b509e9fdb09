"""Smooth weighted round robin and route matching."""

from __future__ import annotations

from collections import Counter

from failover_proxy.model.balance import SmoothWeightedRoundRobin, smooth_wrr_schedule
from failover_proxy.model.routing import Route, Router, normalize_host


def test_weights_are_honoured_exactly_over_every_cycle() -> None:
    picker = SmoothWeightedRoundRobin(["a", "b", "c"], [5, 3, 2])
    for _ in range(4):
        assert Counter(picker.pick() for _ in range(10)) == {"a": 5, "b": 3, "c": 2}


def test_heavy_backend_is_spread_not_bursted() -> None:
    # nginx's documented sequence for weights 5, 1, 1.
    assert "".join("abc"[i] for i in smooth_wrr_schedule([5, 1, 1])) == "aabacaa"


def test_long_cycles_computed_pick_by_pick_agree_with_the_table() -> None:
    weights = [4999, 3001, 2000]  # sum 10000: above the table size, computed live
    picker = SmoothWeightedRoundRobin([0, 1, 2], weights)
    picks = Counter(picker.pick() for _ in range(10000))
    assert picks == {0: 4999, 1: 3001, 2: 2000}


def test_gcd_reduces_the_cycle() -> None:
    assert len(smooth_wrr_schedule([200, 100])) == 3


def router() -> Router[str]:
    return Router(
        [
            Route(None, "/", "default"),
            Route(None, "/static/", "static"),
            Route("api.example.com", "/", "api"),
            Route("api.example.com", "/v1", "api-v1"),
            Route("*.example.com", "/", "wild"),
            Route("*.eu.example.com", "/", "wild-eu"),
        ]
    )


def test_host_rank_then_longest_prefix() -> None:
    r = router()
    assert r.match("api.example.com", b"/v1/users").target == "api-v1"  # type: ignore[union-attr]
    assert r.match("api.example.com", b"/v2").target == "api"  # type: ignore[union-attr]
    assert r.match("www.example.com", b"/x").target == "wild"  # type: ignore[union-attr]
    assert r.match("a.eu.example.com", b"/x").target == "wild-eu"  # type: ignore[union-attr]
    assert r.match("example.com", b"/static/a.css").target == "static"  # type: ignore[union-attr]
    assert r.match("other.org", b"/").target == "default"  # type: ignore[union-attr]


def test_match_request_reads_the_host_as_sent() -> None:
    """The Host header as the client wrote it (case, port) is normalized when routes name
    hosts; a router without host routes matches by path alone, Host or not."""
    r = router()
    assert r.match_request(b"API.Example.com:8443", b"/v1").target == "api-v1"  # type: ignore[union-attr]
    assert r.match_request(None, b"/static/x").target == "static"  # type: ignore[union-attr]
    by_path = Router([Route(None, "/", "any"), Route(None, "/a", "a")])
    assert by_path.match_request(b"Whatever:1", b"/ab").target == "a"  # type: ignore[union-attr]
    assert by_path.match_request(None, b"/b").target == "any"  # type: ignore[union-attr]
    assert Router([Route("a.com", "/", 1)]).match_request(None, b"/") is None


def test_no_route() -> None:
    assert Router([Route("a.com", "/x", 1)]).match("a.com", b"/y") is None


def test_host_normalization() -> None:
    assert normalize_host(b"API.Example.com:8443") == "api.example.com"
    assert normalize_host(b"[::1]:8080") == "[::1]"
    assert normalize_host(b"localhost") == "localhost"
