"""benchmarks/pooled.py: rounds of several compare.py runs pooled into one verdict per cell."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from compare import Row, targets_section
from pooled import pooled_rows


def run_file(path: Path, ratios: list[float]) -> Path:
    """A compare.json holding failover-proxy's workers=1 small 64-connection row only."""
    row = Row("failover-proxy", "1", "small", 64, 60000.0, 0.8, 2.0, 0, 28.0, 53.0,
              rounds=[60000.0] * len(ratios), p99_rounds=[2.0] * len(ratios),
              rps_ratio_rounds=ratios, p99_ratio_rounds=[1.0] * len(ratios),
              cpu_rounds=[15.0] * len(ratios), tcp_timeouts=[0] * len(ratios))
    path.write_text(json.dumps({"throughput": [asdict(row)]}))
    return path


def verdict_line(rows: list[Row]) -> str:
    return next(line for line in targets_section(rows, [], [], title="t")
                if line.startswith("| req/s >= 1.0x nginx"))


def test_pooling_joins_the_rounds_of_every_run_in_order(tmp_path: Path) -> None:
    first = run_file(tmp_path / "a.json", [1.01, 0.99, 1.04])
    second = run_file(tmp_path / "b.json", [1.05, 1.02])
    (row,) = pooled_rows([first, second])
    assert row.rps_ratio_rounds == [1.01, 0.99, 1.04, 1.05, 1.02]
    assert len(row.rounds) == len(row.p99_rounds) == len(row.tcp_timeouts) == 5


def test_more_rounds_of_the_same_ratio_can_turn_too_close_into_met(tmp_path: Path) -> None:
    swing = [1.08, 1.00, 0.97, 1.07, 1.03, 1.05]
    one = [run_file(tmp_path / "one.json", swing)]
    assert "too close to call" in verdict_line(pooled_rows(one))
    many = [run_file(tmp_path / f"{n}.json", swing) for n in range(6)]
    assert verdict_line(pooled_rows(many)).endswith("| met |")
