"""A backend's declared capacity (`capacity`, requests per second) as a live limit.

When a provider fails, its traffic lands on the others; if they cannot carry it, the failover
causes the next outage. A backend with a declared capacity is therefore never sent more than
that: the policy spills the excess to the next provider with room, and when nothing has room the
excess is shed at once (503 with Retry-After) instead of queueing where it would time out.

Each process admits its own share of a backend's capacity (capacity / workers): the workers
share no memory, and the listener spreads connections evenly over them (SO_REUSEPORT), so the
shares add up to the whole. A token bucket refills continuously at that rate and holds at most
BURST_SECONDS of it, so a short burst passes and a sustained excess does not.
"""

from __future__ import annotations

import time
from typing import Final

BURST_SECONDS: Final = 0.1
"""How much unused capacity a bucket keeps: a tenth of a second's worth (at least one request),
enough for the jitter of arrivals, too little to let a backend be flooded after a quiet spell."""

monotonic: Final = time.monotonic


class RateLimit:
    """A token bucket: `rate` requests per second, at most `burst` at once."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * BURST_SECONDS)
        self.tokens = self.burst
        self.stamp = monotonic()

    def spare(self, now: float) -> float:
        """Requests it would admit right now (tokens, refilled up to `now`)."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.tokens = tokens
        self.stamp = now
        return tokens

    def admit(self, now: float) -> bool:
        """Take one request's room; False (and nothing taken) when there is none."""
        if self.spare(now) >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def process_rate(capacity: float, share: float, processes: int) -> float:
    """What one process may send a backend endpoint: its part (`share`) of the configured
    backend's capacity, divided among the processes serving traffic."""
    return capacity * share / max(processes, 1)
