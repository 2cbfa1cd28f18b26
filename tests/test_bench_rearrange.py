"""The rearrangement benchmark's host-only report: how real moves are cut into steps."""

from __future__ import annotations


def test_plan_report_steps_use_both_directions(real_loads, run_benchmark):
    # The fixture fails or skips the test where the real loads are missing.
    stdout = run_benchmark("bench_rearrange.py", "--plan-only")
    rows = [line.split() for line in stdout.splitlines() if line.startswith("DeepSeek")]
    # Two shapes, two moves, two ranks; columns: name, move, rank, steps, one-way
    # steps, deferred, buffers GB, program ms.
    assert len(rows) == 8, stdout
    for row in rows:
        steps, one_way, deferred, buffers = int(row[3]), int(row[4]), int(row[5]), float(row[6])
        # Sorted by sender, 46-50 of DeepSeek-V3's 62-63 steps went one way and one
        # rank needed 18 GB of buffers; pairs taking turns leave at most the last
        # step of a layer one way.
        assert one_way <= 1, row
        assert deferred <= steps and buffers < 10, row
