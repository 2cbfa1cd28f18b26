"""The rearrangement benchmark's host-only report: how real moves are cut into steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plan_report_steps_use_both_directions(real_loads):
    # The fixture fails or skips the test where the real loads are missing.
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_rearrange.py"), "--plan-only"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("DeepSeek")]
    # Two shapes, two moves, two ranks; columns: name, move, rank, steps, one-way
    # steps, deferred, buffers GB, program ms.
    assert len(rows) == 8, result.stdout
    for row in rows:
        steps, one_way, deferred, buffers = int(row[3]), int(row[4]), int(row[5]), float(row[6])
        # Sorted by sender, 46-50 of DeepSeek-V3's 62-63 steps went one way and one
        # rank needed 18 GB of buffers; pairs taking turns leave at most the last
        # step of a layer one way.
        assert one_way <= 1, row
        assert deferred <= steps and buffers < 10, row
