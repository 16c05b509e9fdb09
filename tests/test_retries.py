"""The retry rules, decision by decision (dataplane/retries.py): which failed attempts are sent
again, and what the retry budget allows. End to end they are in test_failover.py."""

from __future__ import annotations

from typing import Any

import pytest

from failover_proxy.config.schema import RetryConfig
from failover_proxy.dataplane.retries import Verdict, retry_verdict, within_budget

RETRY = RetryConfig(attempts=3, budget_percent=20.0, min_retry_concurrency=2)


def verdict(retry: RetryConfig = RETRY, **changes: Any) -> Verdict:
    """The verdict on a GET that failed once with a reset, with `changes` to that."""
    facts: dict[str, Any] = dict(
        condition="reset", attempts=1, method=b"GET", has_idempotency_key=False, upgrade=False,
        replayable=True, nothing_sent=False, exempt=False, retrying=False,
        active_requests=10, active_retries=0,
    )
    facts.update(changes)
    return retry_verdict(retry, **facts)


def test_an_idempotent_request_is_retried_while_attempts_are_left() -> None:
    assert verdict() is Verdict.RETRY
    assert verdict(attempts=2) is Verdict.RETRY
    assert verdict(attempts=3) is Verdict.NOT_ASKED  # retry.attempts counts the first one


def test_only_the_conditions_asked_for_are_retried() -> None:
    assert verdict(condition="503") is Verdict.RETRY
    only_connect = RetryConfig(on=["connect-failure"])
    assert verdict(only_connect, condition="reset") is Verdict.NOT_ASKED
    assert verdict(only_connect, condition="connect-failure", nothing_sent=True) is Verdict.RETRY


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"])
def test_idempotent_methods_are_safe(method: bytes) -> None:
    assert verdict(method=method) is Verdict.RETRY


def test_a_post_is_retried_only_when_nothing_reached_the_backend_or_a_key_says_so() -> None:
    assert verdict(method=b"POST") is Verdict.UNSAFE
    assert verdict(method=b"POST", condition="connect-failure", nothing_sent=True) is Verdict.RETRY
    assert verdict(method=b"POST", has_idempotency_key=True) is Verdict.UNSAFE
    keyed = RetryConfig(retry_with_idempotency_key=True)
    assert verdict(keyed, method=b"POST", has_idempotency_key=True) is Verdict.RETRY
    assert verdict(keyed, method=b"PATCH", has_idempotency_key=False) is Verdict.UNSAFE


def test_upgrades_and_bodies_past_the_replay_buffer_are_never_retried() -> None:
    assert verdict(upgrade=True) is Verdict.UPGRADE
    assert verdict(replayable=False) is Verdict.BODY_GONE
    assert verdict(replayable=False, exempt=True) is Verdict.BODY_GONE


def test_the_budget_is_a_share_of_requests_in_flight_with_a_floor() -> None:
    assert within_budget(RETRY, active_requests=100, active_retries=19)
    assert not within_budget(RETRY, active_requests=100, active_retries=20)  # 20 % of 100
    assert within_budget(RETRY, active_requests=3, active_retries=1)  # the floor: 2
    assert not within_budget(RETRY, active_requests=3, active_retries=2)
    assert not within_budget(RetryConfig(budget_percent=0, min_retry_concurrency=0), 100, 0)


def test_the_budget_refuses_unless_the_failure_is_confined_or_already_charged() -> None:
    full = dict(active_requests=100, active_retries=20)
    assert verdict(**full) is Verdict.OVER_BUDGET
    # Confined to one failure domain (or reaching nothing): retries are the failover itself.
    assert verdict(exempt=True, **full) is Verdict.RETRY
    # A request that already holds its place (a hedge, an earlier retry) keeps it.
    assert verdict(retrying=True, **full) is Verdict.RETRY
    # The attempts bound holds all the same.
    assert verdict(exempt=True, attempts=3, **full) is Verdict.NOT_ASKED
