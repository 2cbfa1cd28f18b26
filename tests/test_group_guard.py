"""GroupGuard with real processes: every rank fails in time, whatever one rank does.

Each scenario starts 3 gloo ranks (tests/guard_ranks.py) that agree on their
arguments and run a small ring move under a guard with a short timeout; one
rank raises, freezes (SIGSTOP), dies (SIGKILL), disagrees or fails its checks
with a MemoryError. Times are measured inside the ranks, from the start of the
guarded call (process start-up is not timed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from eplb.production.errors import AgreementError, GroupFault, RearrangeError, classify_layers
from eplb.production.group_guard import DEFAULT_TIMEOUT, GroupGuard, check_timeout

WORLD = 3
TIMEOUT = 4.0  # the guard's timeout where a wait must expire (seconds)
LONG = 30.0  # the guard's timeout where the others must learn of a failure before it
FAST = 5.0  # ... within this (a loaded 2-core CI machine; measured: well under 0.1 s)
SLACK = 4.0  # a loaded 2-core CI machine: how late after its deadline a wait may end
SCRIPT = Path(__file__).with_name("guard_ranks.py")

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


@pytest.fixture
def run(run_ranks: Callable[..., dict[int, Any]], tmp_path: Path) -> Callable[..., dict[int, Any]]:
    """``run(scenario, waiting_for, faulty=1, timeout=LONG)``: the ranks' reports."""

    def start(
        scenario: str, waiting_for: set[int], faulty: int = 1, timeout: float = LONG
    ) -> dict[int, Any]:
        env = {"EPLB_GUARD_FAULTY": str(faulty)}
        return run_ranks(SCRIPT, scenario, WORLD, timeout, tmp_path, waiting_for, env)

    return start


def test_a_rank_raising_alone_fails_every_rank_through_the_board(run: Any) -> None:
    reports = run("raise", {0, 1, 2})
    assert reports[1]["error"] == "RuntimeError"
    assert "injected failure" in reports[1]["message"]
    for r in (0, 2):
        report = reports[r]
        assert report["error"] == "GroupFault", report
        assert report["failed_ranks"] == [1] and not report["timed_out"]
        assert "rank 1 failed: RuntimeError: injected failure" in report["message"]
        # The failing rank stays alive and silent: only the board tells the others.
        assert report["elapsed"] < FAST, report
        assert report["faulted"], "the group must be marked faulted after a failed move"


def test_a_frozen_rank_fails_the_others_at_the_timeout(run: Any) -> None:
    reports = run("freeze", {0, 2}, timeout=TIMEOUT)
    for r in (0, 2):
        report = reports[r]
        assert report["error"] == "GroupFault", report
        # Rank 0 waits on rank 2, rank 2 on the frozen rank 1: whoever expires
        # first posts it, so the other may learn it from the board.
        assert TIMEOUT * 0.9 < report["elapsed"] < TIMEOUT + SLACK, report
    assert any(reports[r]["timed_out"] for r in (0, 2))


def test_a_frozen_store_host_fails_the_others_at_the_timeout(run: Any) -> None:
    reports = run("freeze", {1, 2}, faulty=0, timeout=TIMEOUT)
    for r in (1, 2):
        report = reports[r]
        assert report["error"] == "GroupFault", report
        assert report["timed_out"], report
        assert TIMEOUT * 0.9 < report["elapsed"] < TIMEOUT + SLACK, report


def test_a_killed_rank_fails_the_others_fast(run: Any) -> None:
    reports = run("kill", {0, 2})
    for r in (0, 2):
        report = reports[r]
        assert report["error"] == "GroupFault", report
        # gloo sees the closed connection at once; no wait runs to its deadline.
        assert report["elapsed"] < FAST, report


def test_a_mismatched_argument_is_refused_on_every_rank_by_name(run: Any) -> None:
    reports = run("mismatch", {0, 1, 2})
    for report in reports.values():
        assert report["error"] == "AgreementError", report
        assert report["argument"] == "max_batch_bytes"
        assert report["ranks"] == [1]
        assert "rank 1: 2097152" in report["message"]
        assert report["elapsed"] < FAST, report
        assert report["faulted"] is None, "a refused call leaves the group usable"


def test_any_exception_while_checking_is_a_shared_refusal(run: Any) -> None:
    reports = run("memory_error", {0, 1, 2})
    assert reports[1]["error"] == "MemoryError"
    for r in (0, 2):
        report = reports[r]
        assert report["error"] == "AgreementError", report
        assert report["argument"] is None and report["ranks"] == [1]
        assert "rank 1: MemoryError: simulated" in report["message"]
        assert report["elapsed"] < FAST, report
        assert report["faulted"] is None


def test_a_rank_frozen_before_the_agreement_is_named(run: Any) -> None:
    reports = run("agree_freeze", {0, 2}, timeout=TIMEOUT)
    for r in (0, 2):
        report = reports[r]
        assert report["error"] == "GroupFault", report
        # Expired itself, or learnt it from the board from a rank that expired first.
        assert "rank(s) [1] did not reach the agreement" in report["message"], report
        assert TIMEOUT * 0.9 < report["elapsed"] < TIMEOUT + SLACK, report
    assert any(reports[r]["failed_ranks"] == [1] and reports[r]["timed_out"] for r in (0, 2))


def test_a_healthy_move_passes_and_delivers(run: Any) -> None:
    reports = run("ok", {0, 1, 2})
    for r, report in reports.items():
        assert report["error"] is None, report
        left = (r - 1) % WORLD
        assert report["received"] == [left * 100 + step for step in range(4)]
        keys = report["keys"]
        assert keys[2:] == [keys[2]] * 4, keys  # old calls' keys are deleted


# ---------------------------------------------------------------------- one process


def test_timeout_is_checked() -> None:
    assert check_timeout(3) == 3.0
    for bad, kind in ((0, ValueError), (-1.0, ValueError), (float("inf"), ValueError)):
        with pytest.raises(kind, match="timeout must be"):
            check_timeout(bad)
    for bad in ("90", True, None):
        with pytest.raises(TypeError, match="timeout must be"):
            check_timeout(bad)
    assert 10 < DEFAULT_TIMEOUT < 30 * 60 / 10


def test_single_process_calls_need_no_store() -> None:
    guard = GroupGuard(timeout=1.0)
    assert (guard.rank, guard.world_size) == (0, 1)
    with guard.call("x") as call:
        assert call.agree(lambda: (7, {"a": 1})) == 7
        call.wait_works([])
        call.finish()
    with pytest.raises(MemoryError), guard.call("y") as call:
        call.agree(lambda: (_ for _ in ()).throw(MemoryError("boom")))


def test_rearrange_error_reports_layers() -> None:
    cause = GroupFault("rank 1 failed", rank=0, failed_ranks=(1,), timed_out=False)
    error = RearrangeError.from_layers(
        "move", rank=0, cause=cause, layers_new=(0, 1), layers_old=(3,), layers_mixed=(2,)
    )
    assert isinstance(error, RuntimeError)
    assert error.layers_changed == (0, 1, 2)
    assert error.cause is cause and error.rank == 0
    assert "layers [0, 1] hold new weights, layers [2] may be mixed, layers [3]" in str(error)


def test_agreement_error_is_a_value_error() -> None:
    assert issubclass(AgreementError, ValueError)


def test_a_wait_that_never_completes_ends_at_its_deadline() -> None:
    guard = GroupGuard(timeout=0.3)

    class StuckWork:
        def wait(self, timeout: Any) -> None:
            time.sleep(timeout.total_seconds())
            raise RuntimeError("Timed out waiting for recv")

    for wait in (
        lambda call: call.wait_until(lambda: False, "an event"),
        lambda call: call.wait_works([StuckWork()], "a recv"),
    ):
        begin = time.monotonic()
        with pytest.raises(GroupFault, match=r"did not complete within 0\.3 s") as info:
            with guard.call("stuck") as call:
                wait(call)
        assert info.value.timed_out
        assert 0.3 <= time.monotonic() - begin < 0.3 + SLACK


def test_gpu_host_check_runs_on_cpu(run_benchmark: Any) -> None:
    stdout = run_benchmark("check_group_guard.py")
    rows = dict(line.rsplit(maxsplit=1) for line in stdout.splitlines() if line.strip())
    assert {k.strip(): v for k, v in rows.items()}["all checks"] == "pass", stdout
    assert "ProcessGroup.get_group_store                     True" in stdout


def test_classify_layers_by_progress() -> None:
    steps = [{0}, {0, 1}, {1}, {2}, {4}]  # layer 3 is never written on this rank
    assert classify_layers(5, steps, issued=0, completed=0) == ((), (0, 1, 2, 3, 4), ())
    # Step 1 queued but not finished: layer 0 and 1 may be half written.
    assert classify_layers(5, steps, issued=2, completed=1) == ((), (2, 3, 4), (0, 1))
    assert classify_layers(5, steps, issued=3, completed=2) == ((0,), (2, 3, 4), (1,))
    assert classify_layers(5, steps, issued=4, completed=4) == ((0, 1, 2), (3, 4), ())
    assert classify_layers(5, steps, issued=5, completed=5) == ((0, 1, 2, 4), (3,), ())
    with pytest.raises(ValueError, match="completed <= issued"):
        classify_layers(5, steps, issued=1, completed=2)


def test_agreement_benchmark_runs(run_benchmark: Any) -> None:
    stdout = run_benchmark("bench_agreement.py", "--iterations", "3")
    rows = [line for line in stdout.splitlines() if "ms" not in line and "gloo" not in line]
    names = [line.rsplit(maxsplit=2)[0].strip() for line in rows if line.strip()]
    assert names == [
        "all_reduce of the verdicts (baseline)",
        "GuardedCall.agree",
        "GuardedCall.agree + finish",
    ], stdout
    assert all(float(line.split()[-1]) > 0 for line in rows if line.strip())
