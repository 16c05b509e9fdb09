"""Route matching: which upstream serves a request, by host and longest path prefix.

A route with an exact host beats a `*.suffix` route, which beats a route for any host; among
routes of the same host rank the longest path prefix wins (a plain string prefix, as in Envoy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Generic, TypeVar

T = TypeVar("T")


class Route(Generic[T]):
    """A host (None: any; `*.suffix`: wildcard) and path prefix, and where they lead."""

    def __init__(self, host: str | None, path_prefix: str, target: T) -> None:
        self.host = host
        self.path_prefix = path_prefix
        self.target = target

    def __repr__(self) -> str:
        return f"Route({self.host!r}, {self.path_prefix!r}, {self.target!r})"


class Router(Generic[T]):
    """Matches (host, path) to a route's target without allocating on the hot path."""

    def __init__(self, routes: Sequence[Route[T]]) -> None:
        self.routes: Final = tuple(routes)
        self._exact: dict[str, list[tuple[bytes, Route[T]]]] = {}
        self._wildcard: list[tuple[str, list[tuple[bytes, Route[T]]]]] = []
        self._any: list[tuple[bytes, Route[T]]] = []
        wildcard: dict[str, list[tuple[bytes, Route[T]]]] = {}
        for route in routes:
            entry = (route.path_prefix.encode(), route)
            if route.host is None:
                self._any.append(entry)
            elif route.host.startswith("*."):
                wildcard.setdefault(route.host[1:], []).append(entry)
            else:
                self._exact.setdefault(route.host, []).append(entry)
        for group in (*self._exact.values(), *wildcard.values(), self._any):
            group.sort(key=lambda item: len(item[0]), reverse=True)
        # Longest suffix first, so *.eu.example.com beats *.example.com.
        self._wildcard = sorted(wildcard.items(), key=lambda item: len(item[0]), reverse=True)
        self._by_host = bool(self._exact or self._wildcard)

    def match_request(self, raw_host: bytes | None, path: bytes) -> Route[T] | None:
        """The route for a Host header as the client sent it and a request path; the host is
        normalized only when some route names one."""
        if not self._by_host:
            return _longest_prefix(self._any, path)
        return self.match(normalize_host(raw_host) if raw_host is not None else "", path)

    def match(self, host: str, path: bytes) -> Route[T] | None:
        """The route for a lower-case host (port removed) and a request path, or None."""
        group = self._exact.get(host)
        if group is not None and (found := _longest_prefix(group, path)) is not None:
            return found
        for suffix, wild_group in self._wildcard:
            if (
                host.endswith(suffix)
                and len(host) > len(suffix)
                and (found := _longest_prefix(wild_group, path)) is not None
            ):
                return found
        return _longest_prefix(self._any, path)


def _longest_prefix(group: list[tuple[bytes, Route[T]]], path: bytes) -> Route[T] | None:
    for prefix, route in group:
        if path.startswith(prefix):
            return route
    return None


_HOST_CACHE: Final[dict[bytes, str]] = {}
_HOST_CACHE_MAX: Final = 4096


def normalize_host(raw: bytes) -> str:
    """Host header value → lower-case name without port (IPv6 brackets kept), memoized."""
    host = _HOST_CACHE.get(raw)
    if host is None:
        host = _normalize_host(raw)
        if len(_HOST_CACHE) >= _HOST_CACHE_MAX:
            _HOST_CACHE.clear()
        _HOST_CACHE[raw] = host
    return host


def _normalize_host(raw: bytes) -> str:
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(":")
    return host[:colon] if colon != -1 else host
