"""Outlier ejection arithmetic on the real topology objects (no network: pure bookkeeping)."""

from __future__ import annotations

from failover_proxy.config import parse_config
from failover_proxy.topology import build_topology

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
