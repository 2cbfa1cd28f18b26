"""``eplb conformance --same-balance``: tie order passes, a real difference fails and says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import eplb.cli
from eplb.conformance import exact_gpu_loads, first_balance_difference
from eplb.conformance.balance import REAL_DIFFERENCE, TIE_ORDER_ONLY, as_integer_placement
from eplb.conformance.runner import check_candidate
from eplb.reference import rebalance_experts

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = "tests.conformance_variants"
# Enough draws for moved_slot's difference to show (it needs 2+ GPUs a node
# and two slots of unequal load), few enough to keep the file at seconds.
EXAMPLES = "60"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # --impl imports from the current directory


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = eplb.cli.main(["conformance", "--examples", EXAMPLES, *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_relabelled_gpus_and_slots_pass_same_balance(capsys: pytest.CaptureFixture[str]) -> None:
    # int32 outputs, log2phy padded to R - E + 1, AssertionError on invalid input.
    status, out = _run(capsys, "--impl", f"{VARIANTS}:relabelled", "--same-balance")
    assert status == 0, out
    assert f"CONFORMS (same balance): {VARIANTS}:relabelled" in out
    assert "refuses" in out and "with an exception" in out


def test_relabelled_fails_exact_as_tie_order_only(capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _run(capsys, "--impl", f"{VARIANTS}:relabelled")
    assert status == 1, out
    assert "first difference: phy2log dtype: expected int64, got int32" in out
    assert f"classification: {TIE_ORDER_ONLY}" in out
    assert "passes --same-balance" in out


def test_moved_slot_fails_same_balance_as_real_difference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out = _run(capsys, "--impl", f"{VARIANTS}:moved_slot", "--same-balance")
    assert status == 1, out
    assert f"classification: {REAL_DIFFERENCE}" in out
    assert "per-GPU loads differ from SPEC.md's" in out
    table = [line.split() for line in out.splitlines() if line.strip().endswith("<")]
    assert len(table) >= 2  # GPUs 0 and 1, SPEC.md's load beside the candidate's
    for _gpu, want, have, _mark in table:
        assert float(want) != float(have)


def test_same_balance_needs_impl(capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _run(capsys, "--same-balance")
    assert status == 2
    assert "--same-balance needs --impl" in out


def _asserts_on_valid_input(weight, *counts):  # type: ignore[no-untyped-def]
    raise AssertionError("refuses everything")


def test_any_exception_on_valid_input_still_fails() -> None:
    failure = check_candidate(_asserts_on_valid_input, examples=5, same_balance=True)
    assert failure is not None
    assert failure.phase == "valid input"
    assert "raised AssertionError on valid input" in failure.message


def test_exact_gpu_loads_do_not_depend_on_slot_order() -> None:
    # In slot order, 1e16 + 1 + 1 rounds to 1e16 but 1 + 1 + 1e16 to 1e16 + 2:
    # fsum gives the exactly rounded 1e16 + 2 both ways.
    weight = np.array([[1e16, 1.0, 1.0]])
    logcnt = np.ones((1, 3), dtype=np.int64)
    forward = exact_gpu_loads(weight, np.array([[0, 1, 2]]), logcnt, 1)
    backward = exact_gpu_loads(weight, np.array([[2, 1, 0]]), logcnt, 1)
    assert forward[0, 0] == backward[0, 0] == 1e16 + 2
    assert np.sum(weight[0]) != 1e16 + 2  # what an order-dependent sum gives


def test_exact_gpu_loads_overflow_to_inf() -> None:
    weight = np.array([[1e308, 1e308]])
    loads = exact_gpu_loads(weight, np.array([[0, 1]]), np.ones((1, 2), np.int64), 1)
    assert loads[0, 0] == np.inf


def test_first_balance_difference_sees_relabelling_as_equal() -> None:
    weight = np.array([[90.0, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
    expected = rebalance_experts(weight, 16, 4, 2, 8)
    phy2log = expected[0].reshape(1, 8, 2)[:, ::-1].reshape(1, 16)  # GPUs in reverse
    got = (phy2log, expected[1], expected[2])
    assert first_balance_difference(weight, 8, expected, got) is None
    swapped = expected[0].copy()
    swapped[0, [0, 3]] = swapped[0, [3, 0]]  # experts 5 and 7, GPUs 0 and 1
    difference = first_balance_difference(weight, 8, expected, (swapped, *expected[1:]))
    assert difference is not None and difference.layer == 0
    assert sorted(difference.expected) != sorted(difference.got)


def test_as_integer_placement_accepts_int32_and_wide_padding() -> None:
    phy2log = np.array([[0, 1, 0]], dtype=np.int32)
    log2phy = np.array([[[0, 2, -1, -1], [1, -1, -1, -1]]], dtype=np.int32)
    logcnt = np.array([[2, 1]], dtype=np.int32)
    placement = as_integer_placement((phy2log, log2phy, logcnt), 2)
    assert not isinstance(placement, str)
    assert all(a.dtype == np.int64 for a in placement)
    assert placement[1].shape == (1, 2, 2)
    floats = as_integer_placement((phy2log.astype(float), log2phy, logcnt), 2)
    assert isinstance(floats, str) and "integer dtype" in floats


def _int32_reference(weight, *counts):  # type: ignore[no-untyped-def]
    return tuple(out.astype(np.int32) for out in rebalance_experts(weight, *counts))


def test_int32_copy_of_spec_is_told_apart_from_tie_order() -> None:
    exact = check_candidate(_int32_reference, examples=5)
    assert exact is not None and exact.classification == TIE_ORDER_ONLY
    assert "SPEC.md's placement itself, in another integer dtype" in exact.message
    assert check_candidate(_int32_reference, examples=5, same_balance=True) is None
