"""The balancer's load all-reduce under a rank that freezes or dies (2 gloo ranks, real
processes): the interval step raises within the timeout, the group is faulted as a failed
guarded call faults it, and ``reset()`` then needs a new group."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from eplb.production.balancer_load import LoadTimeout, load_arrived

SCRIPT = Path(__file__).with_name("load_fault_ranks.py")
TIMEOUT = 3.0


@pytest.mark.parametrize("scenario", ["stop", "kill"])
def test_a_silent_peer_faults_the_group_at_the_load_all_reduce(run_ranks, tmp_path, scenario):
    report = run_ranks(SCRIPT, scenario, 2, TIMEOUT, tmp_path, {0})[0]
    print(f"\n{scenario}: rank 0 raised {report['error']} after {report['elapsed']:.3f} s")
    assert report["error"] is not None, report
    # Frozen: the deadline; killed: gloo sees the closed connection sooner.
    assert report["elapsed"] < TIMEOUT + 5, report
    if scenario == "stop":
        assert report["elapsed"] >= TIMEOUT * 0.9, report
    assert report["faulted"], report
    assert report["balancer_error"] == report["error"], report
    assert "group is required" in report["reset"], report


class _NeverDone:
    def query(self) -> bool:
        return False


def test_a_load_that_never_arrives_raises_load_timeout_past_its_deadline():
    # CUDA's path: the load's copy event is polled; past the deadline, LoadTimeout,
    # which the apply turns into a fault of the group.
    assert not load_arrived(_NeverDone(), time.monotonic() + 60, 60.0)  # type: ignore[arg-type]
    with pytest.raises(LoadTimeout, match="did not complete within 2 s"):
        load_arrived(_NeverDone(), time.monotonic() - 1, 2.0)  # type: ignore[arg-type]
    assert issubclass(LoadTimeout, TimeoutError)
