"""The health state machine on the real topology objects, event by event (no network: pure
bookkeeping; test_failover_process.py drives it through the real process)."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import pytest

from failover_proxy.config.loading import parse_config
from failover_proxy.config.schema import HealthCheckConfig
from failover_proxy.model.backends import Backend
from failover_proxy.model.discovery import Address, Answer
from failover_proxy.model.topology import (
    Topology,
    Upstream,
    apply_snapshot,
    build_topology,
    take_snapshot,
)

CONFIG = """
upstreams:
  web:
    backends:
      - {name: a1, url: "http://127.0.0.1:1", provider: aws}
      - {name: a2, url: "http://127.0.0.1:2", provider: aws}
      - {name: g1, url: "http://127.0.0.1:3", provider: gcp}
      - {name: g2, url: "http://127.0.0.1:4", provider: gcp}
    outlier: {consecutive_failures: 3, base_ejection: 10s, max_ejection: 25s, max_ejection_percent: 50}
    policy: {correlated_failures: {backends: 3, window: 1s}}
routes:
  - {path_prefix: /, upstream: web}
"""


def test_ejection_backoff_probation_and_cap() -> None:
    upstream = build_topology(parse_config(CONFIG)).upstreams["web"]
    a1 = upstream.backends[0]
    health = upstream.health
    for second in range(2):
        health.request_failed(a1, 100.0 + second, "reset")
    assert a1.usable
    health.request_failed(a1, 102.0, "reset")
    assert not a1.usable and a1.state == "ejected" and a1.ejected_until == 112.0
    health.tick(112.5)
    assert a1.usable and a1.on_probation
    health.request_failed(a1, 113.0, "timeout")  # one failure on probation: out again, twice as long
    assert not a1.usable and a1.ejected_until == 133.0
    health.tick(133.0)
    health.request_succeeded(a1)
    assert not a1.on_probation
    for second in range(3):
        health.request_failed(a1, 140.0 + second, "reset")
    assert a1.ejected_until == 142.0 + 25.0  # 3 x 10 s capped at max_ejection


def test_max_ejection_percent_keeps_half_the_pool() -> None:
    upstream = build_topology(parse_config(CONFIG)).upstreams["web"]
    for index, backend in enumerate(upstream.backends):
        for n in range(3):
            upstream.health.request_failed(backend, 10.0 + index + n * 0.1, "reset")
    assert sum(1 for b in upstream.backends if b.usable) == 2


# -- the state machine, event by event ----------------------------------------------------------

CHECK = HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=2)

REGIONS = """
upstreams:
  web:
    backends:
      - {name: e1, url: "http://127.0.0.1:1", provider: aws, region: us-east-1}
      - {name: e2, url: "http://127.0.0.1:2", provider: aws, region: us-east-1}
      - {name: w1, url: "http://127.0.0.1:3", provider: aws, region: us-west-2}
      - {name: w2, url: "http://127.0.0.1:4", provider: aws, region: us-west-2}
      - {name: g1, url: "http://127.0.0.1:5", provider: gcp, region: us-central1}
      - {name: g2, url: "http://127.0.0.1:6", provider: gcp, region: us-central1}
    outlier: {consecutive_failures: 5, max_ejection_percent: 100}
    policy: {POLICY, correlated_failures: {backends: 2, window: 1s}, hold_down: 2s}
routes:
  - {path_prefix: /, upstream: web}
"""


def regions_upstream(policy: str = "strategy: weighted", extra: str = "") -> Upstream:
    text = REGIONS.replace("POLICY", policy).replace("routes:", extra + "routes:")
    return build_topology(parse_config(text), now=1.0).upstreams["web"]


def backend(upstream: Upstream, name: str) -> Backend:
    return next(b for b in upstream.backends if b.name == name)


def picks(upstream: Upstream, count: int = 60) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(count):
        chosen = upstream.pick()
        assert chosen is not None
        seen[chosen.name] = seen.get(chosen.name, 0) + 1
    return seen


def region(upstream: Upstream, name: str) -> Any:
    return next(r for r in upstream.regions if r.name == name)


@pytest.mark.parametrize("why", ["connect-failure", "timeout"])
def test_passing_check_ends_an_ejection_it_vouches_for(why: str) -> None:
    """A probe connects and is answered in time: it tests what these failures were."""
    upstream = build_topology(parse_config(CONFIG)).upstreams["web"]
    a1 = upstream.backends[0]
    for n in range(3):
        upstream.health.request_failed(a1, 100.0 + n * 0.1, why)
    assert a1.state == "ejected" and a1.ejected_until == 110.2
    upstream.health.probe_result(a1, True, "status 200", CHECK, 101.0, 0.0)
    assert a1.usable and a1.state == "healthy" and a1.on_probation
    upstream.health.request_failed(a1, 101.5, "reset")  # on probation: out again, for longer
    assert a1.ejected_until == 101.5 + 20.0


@pytest.mark.parametrize("why", ["status 503", "reset"])
def test_passing_check_does_not_end_a_gray_failures_ejection(why: str) -> None:
    """/healthz answers 200 while real requests get 503s or resets: the probe did not test
    what failed, so the ejection runs its time; then the backend is on probation."""
    upstream = build_topology(parse_config(CONFIG)).upstreams["web"]
    a1 = upstream.backends[0]
    for n in range(3):
        upstream.health.request_failed(a1, 100.0 + n * 0.1, why)
    assert a1.state == "ejected" and "probes cannot vouch" in a1.reason
    for second in range(9):
        upstream.health.probe_result(a1, True, "status 200", CHECK, 101.0 + second, 0.0)
        assert a1.state == "ejected" and not a1.usable, second
    upstream.health.tick(110.2)
    assert a1.usable and a1.on_probation
    upstream.health.request_failed(a1, 111.0, why)  # one more: out again, twice as long
    assert a1.ejected_until == 111.0 + 20.0


def test_passing_check_keeps_the_ejection_when_told_to() -> None:
    text = CONFIG.replace("max_ejection_percent: 50}", "max_ejection_percent: 50, "
                          "uneject_on_passing_check: false}")
    upstream = build_topology(parse_config(text)).upstreams["web"]
    a1 = upstream.backends[0]
    for n in range(3):
        upstream.health.request_failed(a1, 100.0 + n * 0.1, "reset")
    upstream.health.probe_result(a1, True, "status 200", CHECK, 101.0, 0.0)
    assert a1.state == "ejected" and not a1.usable


def test_probes_mark_unhealthy_and_healthy_by_thresholds() -> None:
    upstream = build_topology(parse_config(CONFIG)).upstreams["web"]
    a1 = upstream.backends[0]
    upstream.health.probe_result(a1, False, "status 503", CHECK, 1.0, 0.0)
    assert a1.healthy
    upstream.health.probe_result(a1, False, "status 503", CHECK, 2.0, 0.0)
    assert not a1.healthy and a1.reason == "health check failed 2 times: status 503"
    upstream.health.probe_result(a1, True, "status 200", CHECK, 3.0, 0.0)
    assert not a1.usable
    upstream.health.probe_result(a1, True, "status 200", CHECK, 4.0, 0.0)
    assert a1.usable and a1.usable_since == 4.0 and a1.last_check == "ok: status 200"


def test_a_failing_region_goes_out_alone_and_a_provider_wide_failure_takes_aws() -> None:
    upstream = regions_upstream()
    health = upstream.health
    health.request_failed(backend(upstream, "e1"), 10.0, "connect-failure")
    assert region(upstream, "aws/us-east-1").state == "up"
    health.request_failed(backend(upstream, "e2"), 10.2, "connect-failure")
    east = region(upstream, "aws/us-east-1")
    assert east.state == "down" and "2 backends failed within 1s" in east.reason
    aws = upstream.providers["aws"]
    assert aws.state == "degraded", aws.reason  # us-west-2 carries on
    assert set(picks(upstream)) == {"w1", "w2", "g1", "g2"}
    # aws keeps its weight (four backends to gcp's two) on the two it has left.
    assert upstream.provider_shares() == pytest.approx({"aws": 2 / 3, "gcp": 1 / 3})
    # A failure in a second region within the window: the provider itself is failing.
    health.request_failed(backend(upstream, "w1"), 10.4, "connect-failure")
    assert aws.state == "down" and "provider aws down: 3 backends failed within 1s" in aws.reason
    assert set(picks(upstream)) == {"g1", "g2"}
    # Hold-downs end; the backends were never ejected, so all comes back.
    health.tick(20.0)
    assert aws.state == "up" and east.state == "up"


def test_a_provider_is_down_when_all_its_regions_are() -> None:
    upstream = regions_upstream()
    for name in ("e1", "e2", "w1", "w2"):
        for moment in (1.0, 2.0):
            upstream.health.probe_result(backend(upstream, name), False, "refused", CHECK,
                                         moment, 0.0)
    aws = upstream.providers["aws"]
    assert aws.state == "down" and aws.reason == "provider aws down: all its regions are down"
    assert all(r.state == "down" for r in aws.regions)


def test_region_by_region_priority_before_leaving_the_provider() -> None:
    upstream = regions_upstream("strategy: priority, providers: [aws/us-east-1, "
                                "aws/us-west-2, gcp]")
    assert [t.name for t in upstream.tiers] == ["aws/us-east-1", "aws/us-west-2", "gcp"]
    assert set(picks(upstream)) == {"e1", "e2"}
    # A retry leaves the tier that failed: the next region of the same provider.
    chosen, reason = upstream.choose([backend(upstream, "e1")], ["aws/us-east-1"])
    assert chosen is not None and chosen.region == "us-west-2"
    assert reason == "retry on region aws/us-west-2 after aws/us-east-1"
    upstream.health.force(region(upstream, "aws/us-east-1"), True, 5.0)
    assert set(picks(upstream)) == {"w1", "w2"}
    assert upstream.policy.why_not_preferred() == (
        "region aws/us-east-1 forced down by an operator")
    upstream.health.force(region(upstream, "aws/us-west-2"), True, 5.0)
    assert set(picks(upstream)) == {"g1", "g2"}
    upstream.health.force(region(upstream, "aws/us-east-1"), False, 6.0)
    assert set(picks(upstream)) == {"e1", "e2"}


def test_unnamed_regions_follow_the_last_named_region_of_their_provider() -> None:
    upstream = regions_upstream("strategy: priority, providers: [aws/us-west-2, gcp]")
    assert [t.name for t in upstream.tiers] == ["aws/us-west-2", "aws/us-east-1", "gcp"]


LOCAL = """
      - {name: e3, url: "http://127.0.0.1:7", provider: aws, region: us-east-1}
      - {name: e4, url: "http://127.0.0.1:8", provider: aws, region: us-east-1}
"""


def test_local_region_keeps_traffic_and_spills_in_proportion() -> None:
    text = (REGIONS.replace("POLICY", "strategy: priority, providers: [aws, gcp], "
                            "local_region: us-east-1")
            .replace("    outlier:", LOCAL + "    outlier:"))
    upstream = build_topology(parse_config(text), now=1.0).upstreams["web"]

    def local_share() -> float:
        shares = upstream.backend_shares()
        return sum(shares[n] for n in ("e1", "e2", "e3", "e4"))

    assert local_share() == pytest.approx(1.0)
    # One of four local backends out: 1.4 x 3/4 > 1, the local region still takes everything.
    upstream.health.drain(backend(upstream, "e1"), True, 2.0)
    assert local_share() == pytest.approx(1.0)
    # Two of four out: 1.4 x 2/4 = 0.7 stays local, 0.3 spills to us-west-2.
    upstream.health.drain(backend(upstream, "e2"), True, 3.0)
    assert local_share() == pytest.approx(0.7, abs=0.01)
    shares = upstream.backend_shares()
    assert shares["w1"] + shares["w2"] == pytest.approx(0.3, abs=0.01)
    assert shares["g1"] == 0.0


def test_transitions_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    upstream = regions_upstream()
    caplog.set_level(logging.INFO, "failover_proxy.health")
    upstream.health.force(upstream.providers["gcp"], True, 3.0)
    upstream.health.force(upstream.providers["gcp"], False, 4.0)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("WARNING", "web provider gcp: up -> down (provider gcp forced down by an operator; "
            "forced_down)") in lines
    assert ("WARNING", "web provider gcp: down -> up (back in rotation; restored)") in lines
    counts = upstream.store.counters["health_transitions"]
    assert counts[("web", "provider", "gcp", "down", "forced_down")] == 1
    assert counts[("web", "provider", "gcp", "up", "restored")] == 1
    assert upstream.store.counters["failovers"] == {("web", "gcp", "aws", "forced_down"): 1}


def two_copies(text: str) -> tuple[Topology, Topology]:
    config = parse_config(text)
    return build_topology(config, now=1.0), build_topology(config, now=500.0)


def test_a_worker_adopts_the_supervisors_snapshot() -> None:
    supervisor, worker = two_copies(REGIONS.replace("POLICY", "strategy: weighted"))
    up = supervisor.upstreams["web"]
    up.health.request_failed(backend(up, "e1"), 10.0, "reset")
    up.health.request_failed(backend(up, "e2"), 10.1, "reset")
    up.health.drain(backend(up, "g1"), True, 10.2)
    snapshot = pickle.loads(pickle.dumps(take_snapshot(supervisor, 10.5, 7)))
    assert snapshot.version == 7
    apply_snapshot(worker, snapshot, 500.5)  # the worker's clock is elsewhere
    copy = worker.upstreams["web"]
    east = region(copy, "aws/us-east-1")
    assert east.state == "down" and east.down_until == pytest.approx(500.5 - 10.5 + 12.1)
    assert backend(copy, "g1").state == "draining"
    assert set(picks(copy)) == {"w1", "w2", "g2"}
    copy.health.tick(500.5 + 2.0)  # the hold-down ends on the worker's clock as well
    assert east.state == "up"


def test_a_worker_tells_every_move_of_its_regions_and_providers() -> None:
    """A worker logs no transitions (the supervisor does), but says when each region or
    provider moved in it: by a snapshot, or by its own clock ending a hold-down."""
    supervisor, worker = two_copies(REGIONS.replace("POLICY", "strategy: weighted"))
    moves: list[tuple[str, list[str]]] = []
    copy = worker.upstreams["web"]
    copy.health.quiet = True
    copy.health.moved = lambda event, moved: moves.append((event, moved))
    up = supervisor.upstreams["web"]
    up.health.request_failed(backend(up, "e1"), 10.0, "reset")
    up.health.request_failed(backend(up, "e2"), 10.1, "reset")
    apply_snapshot(worker, take_snapshot(supervisor, 10.5, 7), 500.5)
    assert moves == [("snapshot", ["region aws/us-east-1: up -> down",
                                   "provider aws: up -> degraded"])]
    apply_snapshot(worker, take_snapshot(supervisor, 10.6, 8), 500.6)  # nothing new
    copy.health.tick(500.5 + 2.0)
    assert moves[1:] == [("time_passed", ["region aws/us-east-1: down -> up",
                                          "provider aws: degraded -> up"])]


def test_peeking_moves_no_balancer() -> None:
    upstream = regions_upstream()
    first = [upstream.choose([], [], peek=True)[0] for _ in range(5)]
    assert len({id(b) for b in first}) == 1
    assert upstream.pick() is first[0]  # the real pick is still the one peeked at


def test_a_failure_is_confined_while_another_domain_can_take_over() -> None:
    upstream = regions_upstream()
    health = upstream.health
    health.request_failed(backend(upstream, "g1"), 10.0, "status 503")
    assert health.failure_confined(backend(upstream, "g1"), 10.0)  # g1 alone fails
    health.request_failed(backend(upstream, "e1"), 10.05, "status 503")
    # Two providers fail at once: not one domain's failure, the budget applies.
    assert not health.failure_confined(backend(upstream, "e1"), 10.05)
    assert not health.failure_confined(backend(upstream, "g1"), 10.05)
    health.request_failed(backend(upstream, "g2"), 11.1, "status 503")  # e1's is older now
    health.request_failed(backend(upstream, "g1"), 11.1, "status 503")
    assert health.failure_confined(backend(upstream, "g2"), 11.1)  # gcp fails, aws can take it
    for name in ("e1", "e2", "w1", "w2"):
        for moment in (11.2, 12.0):
            health.probe_result(backend(upstream, name), False, "refused", CHECK, moment, 0.0)
    # Nothing else is left: retries are no longer the failover, the budget applies again.
    assert not health.failure_confined(backend(upstream, "g2"), 12.0)


def test_a_hostname_fails_when_all_its_endpoints_fail() -> None:
    """aws-lb resolves to two addresses: one endpoint failing is that endpoint's failure; both
    failing is aws-lb's, and with aws-b also failing, aws is down (correlated failure counts
    configured backends, not addresses)."""
    text = """
upstreams:
  web:
    backends:
      - {name: aws-lb, url: "http://lb.aws.test:80", provider: aws}
      - {name: aws-b, url: "http://127.0.0.1:2", provider: aws}
      - {name: gcp-a, url: "http://127.0.0.1:3", provider: gcp}
    outlier: {consecutive_failures: 5}
    policy: {correlated_failures: {backends: 2, window: 1s}}
routes:
  - {path_prefix: /, upstream: web}
"""
    upstream = build_topology(parse_config(text), now=1.0).upstreams["web"]
    health = upstream.health
    assert not backend(upstream, "aws-lb").usable  # not resolved yet
    addresses = (Address("127.0.0.2", 80), Address("127.0.0.3", 80))
    assert health.dns_answered("aws-lb", Answer(addresses, 5.0, "ok"), 2.0, 0.0)
    first, second = backend(upstream, "aws-lb@127.0.0.2:80"), backend(upstream, "aws-lb@127.0.0.3:80")
    assert first.usable and second.usable and first.share == 0.5
    health.request_failed(first, 10.0, "reset")
    health.request_failed(backend(upstream, "aws-b"), 10.1, "reset")
    assert upstream.providers["aws"].state != "down"  # aws-lb still answers on .3
    health.request_failed(second, 10.2, "reset")
    assert upstream.providers["aws"].state == "down"
    assert set(upstream.providers["aws"].recent_failures) == {"aws-lb", "aws-b"}


def test_a_worker_s_balancers_keep_their_place_across_snapshots() -> None:
    """Each failure a worker reports comes back as a snapshot the worker adopts. Rebuilding
    the balancers each time would start their cycle over: every next request would go to the
    same first backend, and a second failing backend would never be tried (so correlated
    failure could not see it). Unchanged balancers keep their position."""
    text = CONFIG.replace("consecutive_failures: 3", "consecutive_failures: 50")
    supervisor = build_topology(parse_config(text), now=1.0)
    worker = build_topology(parse_config(text), now=1.0)
    upstream = worker.upstreams["web"]
    seen = []
    for version in range(1, 9):
        chosen = upstream.pick()
        assert chosen is not None
        seen.append(chosen.name)
        # The worker reports the failure (2 s apart: no correlated failure, no ejection); the
        # supervisor's machine counts it and sends its picture back.
        now = version * 2.0
        supervisor.upstreams["web"].health.request_failed(
            supervisor.upstreams["web"].backends[["a1", "a2", "g1", "g2"].index(chosen.name)],
            now, "status 503")
        apply_snapshot(worker, take_snapshot(supervisor, now, version), now)
    assert sorted(seen) == ["a1", "a1", "a2", "a2", "g1", "g1", "g2", "g2"], seen


def test_every_moment_of_a_slow_start_ramp_makes_a_valid_split() -> None:
    """A provider back from down ramps over slow_start; a share that rounds to all of it
    (0.996) once asked for a split of 100 : 0, which the balancer refused, and the exception
    ended the supervisor's sweep for good (no hold-down or ejection ended again)."""
    upstream = regions_upstream("strategy: priority, providers: [aws, gcp], slow_start: 2s")
    aws = upstream.providers["aws"]
    upstream.health.force(aws, True, 10.0)
    upstream.health.force(aws, False, 20.0)
    shares = []
    for millisecond in range(2001):  # every millisecond of the ramp
        upstream.health.tick(20.0 + millisecond / 1000)
        shares.append(upstream.provider_shares()["aws"])
    assert shares[0] == 0.1 and shares[-1] == 1.0, shares[::100]
    assert shares == sorted(shares)
