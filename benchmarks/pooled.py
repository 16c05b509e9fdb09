"""Issue 6's req/s and p99 targets over several compare.py runs at once, their rounds pooled.

One run of 24 rounds gives each ratio to nginx an interval about +-3% wide on this VM, so a
proxy a few percent ahead of nginx can land "too close to call" in one run and "met" in the
next. Every round's ratio is paired in time with nginx's run beside it, so rounds from runs of
the same configuration are samples of the same ratio, and pooling them narrows the interval by
the square root of the count. Give it only runs of one configuration: the results say which.

    python benchmarks/pooled.py RUN.json [RUN.json ...]

Each RUN.json is a compare.json or compare-small.json (earlier ones: `git show
COMMIT:benchmarks/results/compare.json > run.json`). Prints the targets table and writes it to
benchmarks/results/pooled.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

from common import RESULTS
from compare import Row, targets_section


def pooled_rows(paths: list[Path]) -> list[Row]:
    """Every run's rows for the same cell merged into one: each per-round list (every list
    field of Row) joined in order; the medians and other single figures stay the first run's."""
    merged: dict[tuple[str, str, str, int], Row] = {}
    for path in paths:
        for entry in json.loads(path.read_text())["throughput"]:
            row = Row(**entry)
            key = (row.target, row.workers, row.body, row.connections)
            if key not in merged:
                merged[key] = row
                continue
            for field in fields(Row):
                value = getattr(row, field.name)
                if isinstance(value, list):
                    getattr(merged[key], field.name).extend(value)
    return list(merged.values())


def main() -> int:
    paths = [Path(arg) for arg in sys.argv[1:]]
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    rows = pooled_rows(paths)
    counts = sorted({len(row.rps_ratio_rounds) for row in rows if row.rps_ratio_rounds})
    title = (f"The targets over {len(paths)} runs pooled "
             f"({' or '.join(str(count) for count in counts)} rounds per cell)")
    text = "\n".join(targets_section(rows, [], [], title=title))
    text += "\nRuns: " + ", ".join(path.name for path in paths) + "\n"
    print(text)
    (RESULTS / "pooled.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
