"""When a failed attempt may be sent again: the retry rules as plain decisions on plain values,
so that each can be checked on its own (tests/test_retries.py), as the health machine's are.

The exchange asks `retry_verdict` after a failure and `within_budget` before a hedge, and acts
on the answer (retries elsewhere, answers the client, counts an overflow).
"""

from __future__ import annotations

import enum
from typing import Final

from ..config.schema import IDEMPOTENT_METHODS, RetryConfig

_IDEMPOTENT: Final = IDEMPOTENT_METHODS


class Verdict(enum.Enum):
    RETRY = "retry"
    NOT_ASKED = "not_asked"  # the condition is not in `retry.on`, or no attempts are left
    UNSAFE = "unsafe"  # the method is not idempotent (and no idempotency key is honoured)
    UPGRADE = "upgrade"  # an upgrade request: the backend may have switched already
    BODY_GONE = "body_gone"  # the body passed the replay buffer: it cannot be sent again
    OVER_BUDGET = "over_budget"  # retries in flight have their whole share


def within_budget(retry: RetryConfig, active_requests: int, active_retries: int) -> bool:
    """Retries in flight (hedges included) below their share of requests in flight:
    `budget_percent` of them, and never fewer than `min_retry_concurrency`."""
    budget = max(retry.min_retry_concurrency, int(active_requests * retry.budget_percent / 100))
    return active_retries < budget


def retry_verdict(
    retry: RetryConfig,
    *,
    condition: str,
    attempts: int,
    method: bytes,
    has_idempotency_key: bool,
    upgrade: bool,
    replayable: bool,
    nothing_sent: bool,
    exempt: bool,
    retrying: bool,
    active_requests: int,
    active_retries: int,
) -> Verdict:
    """Whether an attempt that failed with `condition` (a RETRY_CONDITIONS word or a status)
    after `attempts` attempts may be retried.

    `nothing_sent`: the request reached nothing (a connect failure), so any method is safe.
    `exempt`: the failure is confined to one failure domain, which retries are for, or reached
    nothing: the budget does not apply (`retry.attempts` still does). `retrying`: this request
    already holds its place in the budget (a hedge or an earlier retry)."""
    if condition not in retry.on or attempts >= retry.attempts:
        return Verdict.NOT_ASKED
    safe = (
        nothing_sent
        or method in _IDEMPOTENT
        or (retry.retry_with_idempotency_key and has_idempotency_key)
    )
    if not safe:
        return Verdict.UNSAFE
    if upgrade:
        return Verdict.UPGRADE
    if not replayable:
        return Verdict.BODY_GONE
    if exempt or retrying or within_budget(retry, active_requests, active_retries):
        return Verdict.RETRY
    return Verdict.OVER_BUDGET
