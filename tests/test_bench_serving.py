"""The serving benchmark's CPU smoke run: every mode serves, rebalances on schedule, moves most
slots and ends with every slot holding its mapped expert (the script checks, exits non-zero)."""

from __future__ import annotations

import pytest


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
