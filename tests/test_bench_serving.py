"""The serving benchmark's CPU smoke run: every mode serves, rebalances on schedule, moves most
slots and ends with every slot holding its mapped expert (the script checks, exits non-zero)."""

from __future__ import annotations

import pytest
import torch


def _rows(stdout: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The main table's rows and the ratio table's, by mode."""
    modes = ("none", "blocking", "all", "staged")
    main, ratios = stdout.split("columns:")

    def table(part: str) -> dict[str, list[str]]:
        return {
            line.split()[0]: line.split() for line in part.splitlines() if line.startswith(modes)
        }

    return table(main), table(ratios)


@pytest.mark.parametrize("world", ["1", "2"])
def test_tiny_run_on_gloo(real_loads, run_benchmark, tmp_path, world):
    # The fixture fails or skips the test where the real loads are missing.
    plot = tmp_path / "steps.png"
    modes = "none,blocking,all,staged1,staged2,staged4" if world == "2" else "none,staged2"
    stdout = run_benchmark(
        "bench_serving.py",
        *("--tiny", "--device", "cpu", "--world-size", world, "--modes", modes),
        *("--plot", str(plot)),
    )
    rows, ratios = _rows(stdout)
    assert list(rows) == list(ratios) == modes.split(","), stdout
    # p99 x, max x and same work x are none's own over none's; window/before has no window.
    assert ratios["none"][1:] == ["1.000", "1.000", "1.000", "nan"]
    for mode in modes.split(",")[1:]:
        # Every rebalancing mode has windows with steps before them: a ratio, not nan.
        assert float(ratios[mode][4]) > 0, ratios[mode]
    assert "discarded" in stdout.split("mode")[0]  # the warm-up run, before the table
    # columns: mode, p50, p99, max, worst rebalance step, done, steps, moved fraction,
    # step() max, step() reb, step() int
    for mode, row in rows.items():
        p50, p99, top = (float(v) for v in row[1:4])
        assert 0 < p50 <= p99 <= top, row
        done, steps, moved = int(row[5]), int(row[6]), float(row[7])
        # 36 steps, an interval every 10: 3 rebalances; apply_delay 1, 4 layers.
        fixed = {"none": (0, 0), "blocking": (3, 0), "all": (3, 1)}
        expected = fixed[mode] if mode in fixed else (3, 1 + -(-4 // int(mode[6:])))
        assert (done, steps) == expected, row
        assert (moved > 0.5) == (mode != "none"), row
        _check_step_columns(mode, row, top)
    assert plot.stat().st_size > 10_000


def _check_step_columns(mode: str, row: list[str], step_max: float) -> None:
    """step() is part of a step: its max is at most the step's; reb and int are means over
    some of the timed steps (none for no rebalancing), so at most its max."""
    inside, reb, start = (float(v) for v in row[8:11])
    assert 0 < inside <= step_max, row
    if mode == "none":
        assert row[9:11] == ["nan", "nan"], row
    else:
        assert 0 < reb <= inside and 0 < start <= inside, row


def test_cpu_shape_runs_on_one_rank(real_loads, run_benchmark):
    stdout = run_benchmark(
        "bench_serving.py",
        *("--shape", "cpu", "--world-size", "1", "--modes", "none,staged4", "--steps", "60"),
    )
    rows, _ = _rows(stdout)
    assert "12 layers, 16 experts, 24 slots" in stdout
    # An interval at step 40, applied at 41 over ceil(12 / 4) = 3 more steps.
    assert rows["staged4"][5:7] == ["1", "4"], rows
    for mode, row in rows.items():
        _check_step_columns(mode, row, float(row[3]))


def test_migration_tolerance_moves_fewer_slots_than_spec(real_loads, run_benchmark):
    # Two ranks: on one, every placement is balanced and nothing needs to move.
    stdout = run_benchmark(
        "bench_serving.py",
        *("--tiny", "--device", "cpu", "--world-size", "2", "--modes", "blocking,staged1"),
        *("--migration-tolerance", "0.01"),
    )
    rows, _ = _rows(stdout)
    assert "migration-aware placement, tolerance 0.01" in stdout
    # blocking keeps SPEC's placement (most slots move); staged1 the migration-aware one.
    spec, aware = float(rows["blocking"][7]), float(rows["staged1"][7])
    assert spec > 0.5 and aware < spec / 2, rows
    assert rows["staged1"][5] == "3", rows


def test_apply_delay_moves_the_apply_one_step_later(real_loads, run_benchmark):
    stdout = run_benchmark(
        "bench_serving.py",
        *("--tiny", "--device", "cpu", "--world-size", "1", "--modes", "all,staged2"),
        *("--apply-delay", "2"),
    )
    rows, _ = _rows(stdout)
    assert "apply_delay 2 (all, staged)" in stdout
    # Steps from each interval to the end of its apply: 2, and 2 + ceil(4 / 2).
    assert [rows[m][5:7] for m in ("all", "staged2")] == [["3", "2"], ["3", "4"]], rows


def test_cuda_graph_needs_cuda(run_benchmark_fails):
    stderr = run_benchmark_fails("bench_serving.py", "--tiny", "--device", "cpu", "--cuda-graph")
    assert "--cuda-graph needs --device cuda" in stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_replayed_from_a_cuda_graph_sees_every_staged_commit(real_loads, run_benchmark):
    # The captured graph reads the maps and weights in place: the script's check
    # after each mode (every slot holds its mapped expert) fails if a commit
    # replaced a buffer instead of writing into it.
    stdout = run_benchmark(
        "bench_serving.py",
        *("--tiny", "--device", "cuda", "--world-size", "1", "--cuda-graph"),
        *("--modes", "none,all,staged1,staged2"),
    )
    rows, _ = _rows(stdout)
    assert "replayed from a CUDA graph" in stdout
    assert list(rows) == ["none", "all", "staged1", "staged2"], stdout
    for mode in ("all", "staged1", "staged2"):
        assert int(rows[mode][5]) == 3 and float(rows[mode][7]) > 0.5, rows[mode]
