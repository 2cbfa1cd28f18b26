"""The placement service: the compiled core's integers, its refusals before submitting,
stop and restart, the fallback where it cannot run, and a placement that completes
while another thread holds the interpreter lock throughout."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb.loads import synthetic_load
from eplb.production import compiled_core_error, rebalance_experts
from eplb.production.placement_service import PlacementService

# Where numba loads on a POSIX platform the service must run: a service loop
# that fails to compile fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(
    compiled_core_error() is not None or sys.platform == "win32",
    reason="the placement service needs numba and POSIX pipes",
)

ROOT = Path(__file__).resolve().parents[1]


def _expected(weight: np.ndarray | torch.Tensor, *counts: int) -> list[np.ndarray]:
    tensor = weight if isinstance(weight, torch.Tensor) else torch.from_numpy(weight)
    return [r.numpy() for r in rebalance_experts(tensor, *counts, core="compiled")]


def _assert_same(got: tuple[np.ndarray, ...], expected: list[np.ndarray]) -> None:
    for name, g, e in zip(("phy2log", "log2phy", "logcnt"), got, expected, strict=True):
        assert g.dtype == np.int64 and g.shape == e.shape, (name, g.shape, e.shape)
        np.testing.assert_array_equal(g, e, err_msg=name)


@pytest.mark.parametrize(
    "shape",
    [
        (6, 64, 80, 8, 2, 8),  # hierarchical
        (3, 48, 64, 6, 4, 8),  # groups not divisible by nodes: the global policy
        (2, 16, 16, 1, 1, 4),  # no extra slot
        (4, 32, 96, 4, 2, 4),  # many replicas: log2phy at its widest
    ],
)
def test_results_are_the_compiled_cores_over_repeated_requests(shape: tuple[int, ...]) -> None:
    layers, experts, *counts = shape
    rng = np.random.default_rng(sum(shape))
    with PlacementService(layers, experts, *counts) as service:
        for request in range(6):
            # A new load each time, among them one that concentrates on a single
            # expert (the widest log2phy) and one of ties.
            weight = rng.exponential(100.0, (layers, experts)).round()
            if request == 1:
                weight[:, 0] = 1e9
            if request == 2:
                weight = rng.integers(0, 3, (layers, experts)).astype(np.float64)
            sent = weight.copy()
            service.submit(weight)
            weight[:] = -1.0  # submit copied it
            got = service.result(timeout=60)
            assert not service.in_flight and not service.poll()
            _assert_same(got, _expected(sent, *counts))


def test_float32_and_integer_loads_as_numpy_and_torch() -> None:
    load = synthetic_load(8, 64, seed=3, skew=0.4, tokens=1 << 16)
    with PlacementService(8, 64, 80, 8, 2, 8) as service:
        for weight in (
            load.astype(np.float32) / 7,  # float32 values that float64 holds exactly
            torch.from_numpy(load.astype(np.float32) / 3),
            torch.from_numpy(load.astype(np.int64)),
            torch.from_numpy(load).to(torch.bfloat16),
        ):
            service.submit(weight)
            _assert_same(service.result(timeout=60), _expected(weight, 80, 8, 2, 8))


def test_stop_and_restart() -> None:
    loads = [synthetic_load(4, 32, seed=s, skew=0.4, tokens=1 << 14) for s in range(3)]
    service = PlacementService(4, 32, 48, 4, 2, 4)
    service.submit(loads[0])
    service.stop()  # the placement in flight is dropped
    assert not service.running and not service.in_flight
    service.stop()  # a second stop does nothing
    with pytest.raises(RuntimeError, match="stopped"):
        service.submit(loads[1])
    service.start()
    assert service.running
    for load in loads:
        service.submit(load)
        _assert_same(service.result(timeout=60), _expected(load, 48, 4, 2, 4))
    service.stop()


def test_refusals_come_before_anything_is_submitted() -> None:
    with PlacementService(2, 8, 12, 2, 2, 4) as service:
        good = np.arange(16.0).reshape(2, 8)
        for bad, error, match in [
            (np.ones((2, 9)), ValueError, r"num_groups must divide"),
            (np.ones((3, 8)), ValueError, r"shape \[2, 8\]"),
            (np.where(good == 5, np.nan, good), ValueError, "finite"),
            (-good, ValueError, ">= 0"),
            (good > 3, TypeError, "boolean"),
            (good.astype(complex), TypeError, "real numbers"),
            (good.tolist(), TypeError, "numpy.ndarray"),
            (torch.ones(2, 8, dtype=torch.bool), TypeError, "boolean"),
        ]:
            with pytest.raises(error, match=match):
                service.submit(bad)
            assert not service.in_flight
        with pytest.raises(RuntimeError, match="submit"):
            service.result()
        service.submit(good)
        with pytest.raises(RuntimeError, match="in flight"):
            service.submit(good)
        _assert_same(service.result(timeout=60), _expected(good, 12, 2, 2, 4))
    with pytest.raises(TypeError, match="num_replicas"):
        PlacementService(2, 8, 12.0, 2, 2, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_gpus must divide"):
        PlacementService(2, 8, 12, 2, 1, 5)


def _lock_holders():  # numba functions that hold the interpreter lock while they spin
    import numba

    libc = ctypes.CDLL(None)
    sched_yield = libc.sched_yield
    sched_yield.argtypes, sched_yield.restype = (), ctypes.c_int

    @numba.njit(nogil=False)
    def until_changed(array: np.ndarray, seen: int, spins: int) -> int:
        """The spin at which array[0] left ``seen``, or -1 after ``spins``."""
        for spin in range(spins):
            if array[0] != seen:  # sched_yield is opaque: array[0] is read anew
                return spin
            sched_yield()
        return -1

    @numba.njit(nogil=False)
    def changes_during(array: np.ndarray, spins: int) -> int:
        """How much array[0] changed while the lock was held for ``spins`` spins."""
        before = array[0]
        for _ in range(spins):
            sched_yield()
        return array[0] - before

    return until_changed, changes_during


def test_a_placement_completes_while_another_thread_holds_the_lock() -> None:
    # The main thread holds the interpreter lock from the request until the
    # service's sequence number moves: inside a numba function compiled
    # without nogil, which never gives the lock up. A service that needed the
    # lock at any point (even to return from a call) could not finish; the
    # spin would end at its bound with the number unchanged.
    until_changed, _ = _lock_holders()
    load = synthetic_load(58, 256, seed=2, skew=0.4, tokens=1 << 18)
    with PlacementService(58, 256, 288, 8, 4, 32) as service:
        state = service.shared_state
        until_changed(state, -1, 1)  # compile first
        for _ in range(3):
            seen = int(state[0])
            service.submit(load)
            spins = until_changed(state, seen, 100_000_000)
            assert spins >= 0, "the placement did not complete while the lock was held"
            assert service.poll()
            _assert_same(service.result(timeout=0), _expected(load, 288, 8, 4, 32))


def test_the_lock_holder_stalls_a_python_thread_that_places() -> None:
    # The control of the test above: the same hold stops a Python thread that
    # calls the compiled core, which must take the lock back to return.
    from eplb.production.compiled_core import placement

    _, changes_during = _lock_holders()
    load = synthetic_load(58, 256, seed=2, skew=0.4, tokens=1 << 18)
    placed = np.zeros(1, dtype=np.int64)
    stop = threading.Event()

    def place() -> None:
        while not stop.is_set():
            placement(load, 288, 8, 4, 32)
            placed[0] += 1

    changes_during(placed, 1)  # compile first
    thread = threading.Thread(target=place)
    thread.start()
    try:
        while placed[0] < 2:  # it runs
            stop.wait(0.001)
        # Hundreds of placements' time, without one return.
        assert changes_during(placed, 200_000) == 0
    finally:
        stop.set()
        thread.join()


def test_unavailable_without_numba_and_the_balancer_falls_back() -> None:
    code = """
        import sys
        sys.modules["numba"] = None
        from eplb.production import ExpertBalancer
        from eplb.production.placement_service import PlacementService, placement_service_error
        print(placement_service_error())
        try:
            PlacementService(2, 8, 12, 2, 2, 4)
        except RuntimeError as exc:
            print("refused:", exc)
        balancer = ExpertBalancer(2, 8, 12, 2, 1, device="cpu")
        print(balancer.placement_service, balancer.placement_service_error is not None)
        """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "EPLB_CORE": ""},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    why, refused, fallback = result.stdout.splitlines()
    assert why.startswith("the compiled core cannot load") and "numba" in why, why
    assert refused == f"refused: the placement service cannot run here: {why}"
    assert fallback == "None True"
