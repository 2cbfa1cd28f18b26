"""Shared fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from eplb.conformance.strategies import register_profiles
from eplb.loads import real_loads as _real_loads

# Hypothesis profiles "ci" (derandomized, the default) and "thorough": select
# with HYPOTHESIS_PROFILE=thorough or pytest --hypothesis-profile=thorough.
register_profiles()
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def real_loads() -> dict[str, np.ndarray]:
    """The real DeepSeek-R1 loads ([58, 256] per workload).

    Skips when ../shared/data is absent, unless EPLB_REQUIRE_DATA=1 (CI), where a
    missing folder is an error rather than a silent skip.
    """
    loads = _real_loads()
    if not loads:
        if os.environ.get("EPLB_REQUIRE_DATA") == "1":
            pytest.fail("real loads not found (EPLB_REQUIRE_DATA=1); set EPLB_DATA_DIR")
        pytest.skip("real loads not found: put the data in ../shared/data or set EPLB_DATA_DIR")
    return loads


def _run_benchmark(script: str, *args: str) -> str:
    """Run ``benchmarks/<script>`` with ``args``; return its standard output (it must succeed)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    result = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def run_benchmark() -> Callable[..., str]:
    """``run_benchmark(script, *args)``: a benchmark's standard output; it must exit 0."""
    return _run_benchmark
