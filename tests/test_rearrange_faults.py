"""rearrange_expert_weights with real processes: one rank misbehaves, every rank ends in time.

Each scenario starts 3 gloo ranks (tests/fault_ranks.py) that move 6 layers,
one expert per step; rank 1 disagrees on ``max_batch_bytes``, fails its checks
with a MemoryError, or raises, freezes (SIGSTOP) or dies (SIGKILL) in the
middle of the move, after some steps' writes. Every rank reports what it
raised, how long the call took (measured in the rank, from the call) and which
expert each of its slots holds afterwards, read back from the bits.
Times are loose bounds: they are deadlines, not speed claims.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.distributed as dist

from eplb.production.errors import RearrangeError

WORLD = 3
PER_RANK = 4
TIMEOUT = 4.0  # where a wait must expire (a frozen rank)
LONG = 30.0  # where the others must learn of a failure long before the timeout
SLACK = 3.0  # how late after its deadline a loaded 2-core CI machine may end a wait
SCRIPT = Path(__file__).with_name("fault_ranks.py")

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


@pytest.fixture
def run(run_ranks: Callable[..., dict[int, Any]], tmp_path: Path) -> Callable[..., dict[int, Any]]:
    """``run(scenario, waiting_for, timeout=LONG)``: the ranks' reports."""

    def start(scenario: str, waiting_for: set[int], timeout: float = LONG) -> dict[int, Any]:
        reports = run_ranks(SCRIPT, scenario, WORLD, timeout, tmp_path, waiting_for)
        # The README's fault timings: `pytest -s tests/test_rearrange_faults.py` shows them.
        elapsed = {r: round(rep["elapsed"], 3) for r, rep in sorted(reports.items())}
        print(f"{scenario} (timeout {timeout:g} s): seconds to raise per rank {elapsed}")
        return reports

    return start


def _mine(placement: list[list[int]], rank: int) -> np.ndarray:
    return np.asarray(placement)[:, rank * PER_RANK : (rank + 1) * PER_RANK]


def _assert_untouched(report: dict[str, Any]) -> None:
    np.testing.assert_array_equal(report["held"], _mine(report["old"], report["rank"]))


def _assert_accounted(report: dict[str, Any]) -> None:
    """The layers the error names new hold the new experts, those named old the old, exactly."""
    assert report["error"] == "RearrangeError", report
    held = np.asarray(report["held"])
    old, new = _mine(report["old"], report["rank"]), _mine(report["new"], report["rank"])
    named = report["layers_new"] + report["layers_old"] + report["layers_mixed"]
    assert sorted(named) == list(range(held.shape[0])), report
    for layer in report["layers_new"]:
        np.testing.assert_array_equal(held[layer], new[layer], err_msg=f"layer {layer}")
    for layer in report["layers_old"]:
        np.testing.assert_array_equal(held[layer], old[layer], err_msg=f"layer {layer}")
    for layer in report["layers_mixed"]:  # each slot holds its old or its new expert
        assert ((held[layer] == old[layer]) | (held[layer] == new[layer])).all(), layer


def test_ranks_disagreeing_on_max_batch_bytes_are_refused_everywhere(run: Any) -> None:
    reports = run("mismatch", {0, 1, 2})
    for report in reports.values():
        assert report["error"] == "AgreementError", report
        assert report["argument"] == "max_batch_bytes" and report["ranks"] == [1]
        assert "no weights were changed" in report["message"].lower()
        _assert_untouched(report)


def test_a_memory_error_while_checking_is_a_shared_refusal(run: Any) -> None:
    reports = run("memory", {0, 1, 2})
    assert reports[1]["error"] == "MemoryError", reports[1]
    for rank in (0, 2):
        assert reports[rank]["error"] == "AgreementError", reports[rank]
        assert reports[rank]["ranks"] == [1] and reports[rank]["argument"] is None
        assert "MemoryError" in reports[rank]["message"]
    for report in reports.values():
        assert report["elapsed"] < LONG / 2, report
        _assert_untouched(report)


def test_a_rank_raising_alone_mid_move_fails_every_rank_fast(run: Any) -> None:
    reports = run("raise", {0, 1, 2})
    assert reports[1]["cause"] == "RuntimeError"
    assert "injected failure in the middle of the move" in reports[1]["message"]
    for report in reports.values():
        _assert_accounted(report)
        # The failing rank posts on the board at once: nobody waits for a deadline.
        assert report["elapsed"] < LONG / 2, report
    for rank in (0, 2):
        assert reports[rank]["cause"] == "GroupFault" and reports[rank]["failed_ranks"] == [1]
    # Rank 1 failed at its 30th of 60 steps (fault_ranks.MIDWAY), its writes two
    # steps behind: layers 0-1 all written, layer 2 in part, 3-5 not at all.
    assert reports[1]["layers_new"] == [0, 1], reports[1]
    assert reports[1]["layers_mixed"] == [2], reports[1]
    assert reports[1]["layers_old"] == [3, 4, 5], reports[1]


def test_a_frozen_rank_fails_the_others_within_the_timeout(run: Any) -> None:
    reports = run("stop", {0, 2}, timeout=TIMEOUT)
    for rank in (0, 2):
        report = reports[rank]
        _assert_accounted(report)
        assert report["cause"] == "GroupFault", report
        assert report["elapsed"] < TIMEOUT + SLACK, report
    # Only a deadline can tell a frozen rank: at least one wait ran to it.
    assert max(reports[r]["elapsed"] for r in (0, 2)) > TIMEOUT * 0.9


def test_a_killed_rank_fails_the_others_fast(run: Any) -> None:
    reports = run("kill", {0, 2})
    for rank in (0, 2):
        report = reports[rank]
        _assert_accounted(report)
        assert report["cause"] == "GroupFault", report
        # gloo sees the closed connection at once; no wait runs to its deadline.
        assert report["elapsed"] < LONG / 2, report


def test_rearrange_error_names_layers_changed() -> None:
    error = RearrangeError.from_layers(
        "move",
        rank=0,
        cause=RuntimeError("x"),
        layers_new=(0,),
        layers_old=(2,),
        layers_mixed=(1,),
    )
    assert error.layers_changed == (0, 1) and "layers [0] hold new weights" in str(error)
