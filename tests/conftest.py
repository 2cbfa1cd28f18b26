"""Shared fixtures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.fixture
def run_benchmark_fails() -> Callable[..., str]:
    """``run_benchmark_fails(script, *args)``: its standard error; it must exit non-zero."""

    def run(script: str, *args: str) -> str:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / script
        result = subprocess.run(
            [sys.executable, str(path), *args], capture_output=True, text=True, timeout=300
        )
        assert result.returncode != 0, result.stdout
        return result.stderr

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(
    script: Path,
    scenario: str,
    world: int,
    timeout: float,
    out: Path,
    waiting_for: set[int],
    env: dict[str, str] | None = None,
) -> dict[int, Any]:
    """Start ``world`` ranks of ``script``; their reports once ``waiting_for`` wrote theirs.

    Each rank runs ``script SCENARIO RANK WORLD PORT TIMEOUT OUT`` (gloo over
    TCP), writes ``OUT/RANK.json`` and then sleeps: every rank is killed here
    once the awaited reports are in (a rank exiting on its own would close its
    pairs and tell the others too early).
    """
    port = _free_port()
    args = [str(world), str(port), str(timeout), str(out)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), scenario, str(r), *args],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in range(world)
    ]
    try:
        limit = time.monotonic() + 240  # process start-up under load dominates
        while time.monotonic() < limit:
            if all((out / f"{r}.json").exists() for r in waiting_for):
                break
            if any(p.poll() not in (None, -signal.SIGKILL) for p in procs):
                break  # a rank crashed: its stderr says why
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # also ends a stopped process
        errors = [p.communicate()[1].decode(errors="replace")[-3000:] for p in procs]
    reports = {}
    for r in range(world):
        path = out / f"{r}.json"
        if path.exists():
            reports[r] = json.loads(path.read_text())
    missing = waiting_for - reports.keys()
    assert not missing, f"no report from ranks {missing}: " + "\n".join(errors)
    return reports


@pytest.fixture
def run_ranks() -> Callable[..., dict[int, Any]]:
    """``run_ranks(script, scenario, world, timeout, out, waiting_for, env=None)``: the
    ranks' JSON reports (see ``_run_ranks``)."""
    return _run_ranks
