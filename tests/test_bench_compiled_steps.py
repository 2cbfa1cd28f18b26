"""The step benchmark of the compiled core runs and prints every step of every shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from eplb.production import compiled_core_error

pytestmark = pytest.mark.skipif(compiled_core_error() is not None, reason="numba cannot load here")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_compiled_steps  # noqa: E402


@pytest.mark.parametrize("threshold", [None, "4096"])
def test_quick_run_prints_every_step_with_faults(run_benchmark, threshold) -> None:
    args = ("--quick",) if threshold is None else ("--quick", "--mmap-threshold", threshold)
    stdout = run_benchmark("bench_compiled_steps.py", *args)
    lines = stdout.splitlines()
    assert ("MALLOC_MMAP_THRESHOLD_=4096" if threshold else "default allocator") in lines[0]
    rows = [line for line in lines if line.startswith("tiny")]
    # shape (two or three words), step (one or more words), then five numbers.
    for shape in bench_compiled_steps.QUICK_SHAPES:
        steps = [row[24:42].strip() for row in rows if row.startswith(shape + " ")]
        assert steps == list(bench_compiled_steps.STEPS), stdout
    for row in rows:
        numbers = [float(word) for word in row[42:].split()]
        assert len(numbers) == 5 and all(n >= 0 for n in numbers), row
