"""Choosing a backend inside a provider: smooth weighted round robin, least request, hash.

Smooth WRR (nginx's algorithm) spreads a heavy backend's turns through the cycle instead of
sending it a burst, and honours the weights exactly over every cycle of sum(weights) picks.
Least request is power-of-two-choices over in-flight requests and latency; the consistent hash
keeps a client on one backend and moves as few keys as possible when a backend leaves.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from math import gcd
from typing import Final, Generic, TypeVar

T = TypeVar("T")


class Balancer(Generic[T]):
    """What a provider's pool needs from a balancing algorithm. A base class rather than a
    Protocol: mypyc then calls `pick` through the class's method table, not by name."""

    __slots__ = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def pick(self, key: int = 0) -> T:
        """The next item (`key` is for hashing balancers)."""
        raise NotImplementedError

    def shares(self) -> list[tuple[T, float]]:
        """Each item with its share of picks."""
        raise NotImplementedError

    def peek(self, exclude: Sequence[T]) -> T:
        """What the next pick would be (not one of `exclude` when another is possible),
        without moving the balancer on: for explaining a decision, not for making one."""
        raise NotImplementedError


# Above this cycle length the schedule is computed pick by pick instead of kept in a table.
_MAX_TABLE: Final = 4096


def smooth_wrr_schedule(weights: Sequence[int]) -> list[int]:
    """The indexes picked over one full cycle of smooth weighted round robin."""
    divisor = 0
    for weight in weights:
        divisor = gcd(divisor, weight)
    reduced = [weight // divisor for weight in weights] if divisor else list(weights)
    total = sum(reduced)
    current = [0] * len(reduced)
    schedule = []
    for _ in range(total):
        best = _smooth_step(current, reduced, total)
        schedule.append(best)
    return schedule


def _smooth_step(current: list[int], weights: Sequence[int], total: int) -> int:
    best = 0
    for index, weight in enumerate(weights):
        current[index] += weight
        if current[index] > current[best]:
            best = index
    current[best] -= total
    return best


class SmoothWeightedRoundRobin(Balancer[T]):
    """Picks items in smooth WRR order; O(1) per pick through a precomputed cycle."""

    __slots__ = ("_current", "_items", "_position", "_table", "_total", "_weights")

    def __init__(self, items: Sequence[T], weights: Sequence[int]) -> None:
        if len(items) != len(weights):
            raise ValueError("items and weights differ in length")
        if any(weight <= 0 for weight in weights):
            raise ValueError("weights must be positive")
        divisor = 0
        for weight in weights:
            divisor = gcd(divisor, weight)
        self._items = list(items)
        self._weights = [weight // divisor for weight in weights] if divisor else list(weights)
        self._total = sum(self._weights)
        self._current = [0] * len(weights)
        self._position = 0
        self._table: list[T] | None = None
        if self._total <= _MAX_TABLE and self._items:
            self._table = [self._items[i] for i in smooth_wrr_schedule(self._weights)]

    def __len__(self) -> int:
        return len(self._items)

    def shares(self) -> list[tuple[T, float]]:
        """Each item with its share of picks."""
        return [(item, w / self._total) for item, w in zip(self._items, self._weights, strict=True)]

    def peek(self, exclude: Sequence[T]) -> T:
        table = self._table
        if table is None:
            current = list(self._current)
            order = [_smooth_step(current, self._weights, self._total) for _ in self._items]
            candidates = [self._items[i] for i in order]
        else:
            count = len(table)
            candidates = [table[(self._position + n) % count] for n in range(count)]
        for item in candidates:
            if item not in exclude:
                return item
        return candidates[0]

    def pick(self, key: int = 0) -> T:
        """The next item (`key` is for hashing balancers); IndexError when the pool is empty."""
        table = self._table
        if table is not None:
            position = self._position
            self._position = position + 1 if position + 1 < len(table) else 0
            return table[position]
        if not self._items:
            raise IndexError("no items to pick from")
        return self._items[_smooth_step(self._current, self._weights, self._total)]


class LeastRequest(Balancer[T]):
    """Power of two choices: of two random backends, the one with fewer requests in flight
    per unit of weight, scaled by its recent latency (EWMA). O(1) per pick, no global scan."""

    __slots__ = ("_items", "_load", "_random", "_weights")

    def __init__(
        self,
        items: Sequence[T],
        weights: Sequence[int],
        load: Callable[[T], float],
    ) -> None:
        self._items = list(items)
        self._weights = [max(w, 1) for w in weights]
        self._load = load
        self._random = random.Random()

    def __len__(self) -> int:
        return len(self._items)

    def pick(self, key: int = 0) -> T:
        items = self._items
        if len(items) == 1:
            return items[0]
        first, second = self._random.sample(range(len(items)), 2)
        load = self._load
        if load(items[first]) / self._weights[first] <= load(items[second]) / self._weights[second]:
            return items[first]
        return items[second]

    def peek(self, exclude: Sequence[T]) -> T:
        """The least loaded item (a pick compares two random ones)."""
        order = sorted(
            range(len(self._items)),
            key=lambda i: self._load(self._items[i]) / self._weights[i],
        )
        for index in order:
            if self._items[index] not in exclude:
                return self._items[index]
        return self._items[order[0]]

    def shares(self) -> list[tuple[T, float]]:
        total = sum(self._weights)
        return [(item, w / total) for item, w in zip(self._items, self._weights, strict=True)]


class ConsistentHash(Balancer[T]):
    """A hash ring: the same key lands on the same backend, and when a backend leaves only
    the keys it held move (to their next backend on the ring)."""

    __slots__ = ("_items", "_points", "_ring_items", "_weights")

    POINTS_PER_WEIGHT = 160

    def __init__(self, items: Sequence[T], weights: Sequence[int], names: Sequence[str]) -> None:
        self._items = list(items)
        self._weights = [max(w, 1) for w in weights]
        ring: list[tuple[int, int]] = []
        for index, (name, weight) in enumerate(zip(names, self._weights, strict=True)):
            for replica in range(self.POINTS_PER_WEIGHT * weight):
                ring.append((hash_key(f"{name}#{replica}".encode()), index))
        ring.sort()
        self._points = [point for point, _ in ring]
        self._ring_items = [index for _, index in ring]

    def __len__(self) -> int:
        return len(self._items)

    def pick(self, key: int = 0) -> T:
        position = bisect.bisect(self._points, key)
        if position == len(self._points):
            position = 0
        return self._items[self._ring_items[position]]

    def peek(self, exclude: Sequence[T]) -> T:
        """Where key 0 lands, or the next item along the ring not in `exclude`."""
        for index in self._ring_items:
            if self._items[index] not in exclude:
                return self._items[index]
        return self._items[self._ring_items[0]]

    def shares(self) -> list[tuple[T, float]]:
        total = sum(self._weights)
        return [(item, w / total) for item, w in zip(self._items, self._weights, strict=True)]


def hash_key(data: bytes) -> int:
    """A stable 64-bit hash (the same in every process and replica, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
