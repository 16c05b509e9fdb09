"""Choosing a backend inside a pool: smooth weighted round robin.

Smooth WRR (nginx's algorithm) spreads a heavy backend's turns through the cycle instead of
sending it a burst, and honours the weights exactly over every cycle of sum(weights) picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd
from typing import Generic, TypeVar

T = TypeVar("T")

# Above this cycle length the schedule is computed pick by pick instead of kept in a table.
_MAX_TABLE = 4096


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


class SmoothWeightedRoundRobin(Generic[T]):
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

    def pick(self) -> T:
        """The next item; raises IndexError when the pool is empty."""
        table = self._table
        if table is not None:
            position = self._position
            self._position = position + 1 if position + 1 < len(table) else 0
            return table[position]
        if not self._items:
            raise IndexError("no items to pick from")
        return self._items[_smooth_step(self._current, self._weights, self._total)]
