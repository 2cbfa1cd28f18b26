"""The `eplb simulate` command on a real trace: a few drifting windows, all three policies."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from eplb._cli_simulate import DEEPSEEK_V3_EXPERT_BYTES, drifting_windows
from eplb.cli import main
from eplb.loads import find_data_dir


def test_deepseek_v3_expert_bytes():
    # hidden 7168, MoE intermediate 2048: gate and up [2048, 7168], down [7168, 2048], bf16.
    assert DEEPSEEK_V3_EXPERT_BYTES == 88_080_384


def test_drifting_windows_stay_within_the_drift():
    load = np.arange(1.0, 13.0).reshape(3, 4)
    windows = drifting_windows(load, 4, 0.1, seed=1)
    assert len(windows) == 4 and np.array_equal(windows[0], load)
    for before, after in itertools.pairwise(windows):
        ratio = after / before
        assert (ratio >= 0.9).all() and (ratio <= 1.1).all() and not np.allclose(ratio, 1.0)
    assert np.array_equal(drifting_windows(load, 4, 0.1, seed=1)[3], windows[3])


def _row(out: str, policy: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(policy + " "))


def test_simulate_real_trace_reports_every_policy_and_plots(tmp_path, capsys, real_loads):
    path = find_data_dir() / "decode_in1000out1000.json"
    plot = tmp_path / "sim.png"
    args = ["simulate", str(path), "--replicas", "288", "--groups", "8", "--nodes", "4"]
    assert main([*args, "--gpus", "32", "--windows", "3", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "61 layers (58 with load) x 256 experts" in out and "2 rebalances" in out
    spec, relabel, migration = (_row(out, p) for p in ("spec", "relabel", "migration"))
    # Relabelling keeps SPEC's balance and moves fewer experts; migration moves far fewer.
    assert spec[1:3] == relabel[1:3]
    assert float(relabel[3]) < float(spec[3])
    assert float(migration[3]) * 5 < float(spec[3])
    assert float(migration[2]) >= float(spec[2]) / 1.02 - 1e-4  # printed to 4 decimals
    assert re.match(r"1/\d+\.\d", migration[8])
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--windows", "1"], "--windows must be >= 2"),
        (["--drift", "1.5"], "--drift must be in"),
        (["--plot", "x.jpg"], "--plot must end in .png"),
        (["--tolerance", "-1"], "tolerance must be finite and >= 0"),
    ],
)
def test_simulate_refuses_bad_options(tmp_path, capsys, extra, message):
    load = tmp_path / "load.npy"
    np.save(load, np.ones((2, 8)))
    args = ["simulate", str(load), "--replicas", "8", "--groups", "2", "--nodes", "1"]
    assert main([*args, "--gpus", "2", *extra]) == 2
    assert message in capsys.readouterr().err


def test_migration_benchmark_quick_run(run_benchmark, real_loads):
    stdout = run_benchmark("bench_migration.py", "--quick")
    assert "migration ms" in stdout and stdout.strip().endswith("True")
