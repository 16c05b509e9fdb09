"""benchmarks/compare.py's run order: each ratio to nginx pairs runs made back to back."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from compare import Target, round_order

NAMES = [("backend", "1"), ("nginx", "1"), ("haproxy", "1"), ("failover-proxy", "1"),
         ("nginx", "all"), ("haproxy", "all"), ("failover-proxy", "all"), ("python-floor", "1")]


def targets() -> list[Target]:
    """compare.py's targets as main() lists them (no processes: only the order is under test)."""
    process: Any = None
    return [Target(name, workers, port, process) for port, (name, workers) in enumerate(NAMES)]


def labels(order: list[Target]) -> list[str]:
    return [f"{target.name}/{target.workers}" for target in order]


def test_nginx_runs_beside_both_proxies_at_each_worker_count_in_every_round() -> None:
    for round_number in range(4):
        order = labels(round_order(targets(), round_number))
        assert sorted(order) == sorted(f"{name}/{workers}" for name, workers in NAMES)
        for workers in ("1", "all"):
            nginx = order.index(f"nginx/{workers}")
            for proxy in ("haproxy", "failover-proxy"):
                assert abs(order.index(f"{proxy}/{workers}") - nginx) == 1, (round_number, order)


def test_worker_counts_run_as_groups_and_the_order_flips_each_round() -> None:
    first = labels(round_order(targets(), 0))
    second = labels(round_order(targets(), 1))
    assert second == first[::-1]
    assert [label.endswith("/1") for label in first] == [True] * 5 + [False] * 3
    assert first[0] == "backend/1" and second[-1] == "backend/1"
