"""The compiled placement core: SPEC.md's integers step by step and on the edges,
how a core is chosen (argument, EPLB_CORE, fallback without numba), its cache,
and the interpreter lock it leaves free.

The drawn-input agreement of the compiled core with the other implementations
lives in tests/test_conformance.py (it is one of ``project_implementations``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb import reference
from eplb.conformance import check_agreement, check_invariants, project_implementations
from eplb.production import compiled_core_error, rebalance_experts, resolve_core
from eplb.production.cores import ENV_VAR, warm_up_placement

pytestmark = [
    pytest.mark.skipif(compiled_core_error() is not None, reason="numba cannot load here"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
MAX = np.finfo(np.float64).max
TINY = np.finfo(np.float64).smallest_subnormal


def _core():  # the module, imported only where numba loads
    from eplb.production import compiled_core

    return compiled_core


def _rows(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """Rows built to test one tie or float rule of SPEC.md."""
    if kind == "ties":
        return rng.integers(0, 3, shape).astype(np.float64)
    if kind == "subnormal":
        return rng.integers(0, 4, shape) * TINY
    if kind == "near max":
        return rng.choice([0.0, 1.0, MAX / 3, MAX / 2, MAX], shape)
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "last bits":
        # Distinct values that differ only in the lowest mantissa bits, which
        # the sort's keys drop: the exact re-sort must put them in order.
        return 1.0 + rng.integers(0, 64, shape) * np.finfo(np.float64).eps
    return rng.exponential(100.0, shape)


KINDS = ("ties", "subnormal", "near max", "zeros", "last bits", "random")


# --- the steps, against the reference's steps -----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("items", "packs"),
    [(8, 8), (8, 4), (72, 8), (16, 2), (448, 64), (96, 32), (34, 17), (200, 100), (130, 65)],
    ids=lambda v: str(v),
)
def test_balanced_packing_is_the_reference(kind: str, items: int, packs: int) -> None:
    # Each path of the greedy: up to 8 packs in registers, more in an
    # eight-way tree of two levels (17, 32, 64) or three (65, 100); rows longer
    # than 64 are sorted in blocks and merged (72, 130, 200, 448, odd ones too).
    weight = _rows(np.random.default_rng(items * packs), kind, (6, items))
    got = _core().balanced_packing(weight, packs)
    want = reference.balanced_packing(weight, packs)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("experts", "slots"), [(8, 8), (8, 9), (6, 40), (64, 72), (384, 448)])
def test_replicate_experts_is_the_reference(kind: str, experts: int, slots: int) -> None:
    weight = _rows(np.random.default_rng(experts + slots), kind, (5, experts))
    for got, want in zip(
        _core().replicate_experts(weight, slots),
        reference.replicate_experts(weight, slots),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_hierarchy_is_the_reference() -> None:
    weight = _rows(np.random.default_rng(3), "ties", (4, 32))
    for got, want in zip(
        _core().rebalance_experts_hierarchical(weight, 48, 8, 4, 8),
        reference.rebalance_experts_hierarchical(weight, 48, 8, 4, 8),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


# --- whole placements on the edges ----------------------------------------------------------

EDGES = {
    "one layer, one expert, one GPU": (1, 1, (1, 1, 1, 1)),
    "one expert, many replicas": (2, 1, (8, 1, 1, 4)),
    "R == E, one slot per GPU": (3, 16, (16, 4, 2, 16)),
    "groups not divisible by nodes (global)": (3, 12, (24, 3, 2, 4)),
    "G == N": (2, 16, (32, 4, 4, 8)),
    "P == N": (2, 16, (24, 4, 2, 2)),
    "one expert per group": (2, 8, (16, 8, 2, 4)),
    "one node": (2, 24, (36, 6, 1, 6)),
    "8 replicas per expert": (2, 6, (48, 2, 2, 4)),
    "many packs (tree)": (2, 128, (192, 1, 1, 64)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("edge", EDGES)
def test_compiled_core_on_config_edges(edge: str, kind: str) -> None:
    layers, experts, counts = EDGES[edge]
    weight = _rows(np.random.default_rng(layers * experts), kind, (layers, experts))
    expected = reference.rebalance_experts(weight, *counts)
    check_invariants(*expected, *counts)
    check_agreement(weight, counts, project_implementations(jax=False, cuda=False))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8]
)
def test_compiled_core_on_every_input_dtype(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(5)
    weight = torch.from_numpy(rng.integers(0, 200, (3, 32)).astype(np.float64)).to(dtype)
    if dtype == torch.float32:
        weight[0, :8] = torch.tensor(1e-45)  # float32 subnormals, all tied
    counts = (40, 4, 2, 8)
    host = weight.float().numpy() if dtype == torch.bfloat16 else weight.numpy()
    expected = reference.rebalance_experts(host, *counts)
    for got, want in zip(
        rebalance_experts(weight, *counts, core="compiled"), expected, strict=True
    ):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize(
    ("value", "match"),
    [(np.nan, "finite"), (np.inf, "finite"), (-1.0, ">= 0"), (-TINY, ">= 0")],
)
def test_compiled_core_refuses_like_the_numpy_core(value: float, match: str) -> None:
    weight = torch.ones(2, 8, dtype=torch.float64)
    weight[1, 3] = value
    messages = []
    for core in ("numpy", "compiled"):
        with pytest.raises(ValueError, match=match) as info:
            rebalance_experts(weight, 8, 1, 1, 2, core=core)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_refusal_of_a_float16_load_names_its_own_value() -> None:
    # The compiled path converts float16 to float64 first; the message still
    # shows the value as given, as the numpy core's does.
    weight = torch.ones(2, 8, dtype=torch.float16)
    weight[1, 2] = -0.1
    for core in ("numpy", "compiled"):
        with pytest.raises(
            ValueError, match=r"got -0\.0999755859375 at \[layer, expert\]=\[1, 2\]"
        ):
            rebalance_experts(weight, 8, 1, 1, 2, core=core)


def test_minus_zero_is_a_valid_load_that_ties_with_zero() -> None:
    weight = np.array([[0.0, -0.0, 1.0, -0.0, 0.0, 2.0, -0.0, 0.0]])
    check_agreement(weight, (12, 2, 2, 4), project_implementations(jax=False, cuda=False))


# --- choosing a core --------------------------------------------------------------------------


def test_core_argument_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_core() == "compiled"
    assert resolve_core("numpy") == "numpy"
    monkeypatch.setenv(ENV_VAR, "numpy")
    assert resolve_core() == "numpy"
    assert resolve_core("compiled") == "compiled"  # the argument wins
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match="EPLB_CORE must be one of"):
        resolve_core()
    with pytest.raises(ValueError, match="core must be one of"):
        rebalance_experts(torch.ones(1, 4), 4, 1, 1, 1, core="fast")
    assert warm_up_placement("compiled")[0] == "compiled"


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        cwd=ROOT,
    )


def test_numpy_core_is_the_fallback_without_numba() -> None:
    # A None entry in sys.modules makes `import numba` raise ImportError, as on a
    # machine without numba.
    result = _python(
        """
        import sys
        sys.modules["numba"] = None
        import torch
        from eplb.production import compiled_core_error, rebalance_experts, resolve_core
        assert resolve_core() == "numpy", resolve_core()
        assert "numba" in compiled_core_error(), compiled_core_error()
        phy2log, _, _ = rebalance_experts(torch.arange(16.0).view(2, 8), 12, 2, 2, 4)
        print(phy2log.tolist())
        try:
            rebalance_experts(torch.ones(1, 4), 4, 1, 1, 1, core="compiled")
        except RuntimeError as exc:
            print("refused:", exc)
        """,
        EPLB_CORE="",
    )
    assert result.returncode == 0, result.stderr
    expected = reference.rebalance_experts(np.arange(16.0).reshape(2, 8), 12, 2, 2, 4)[0]
    lines = result.stdout.splitlines()
    assert lines[0] == str(expected.tolist())
    assert lines[1].startswith("refused: core='compiled' was asked for, but the compiled core")


def test_environment_chooses_the_core_in_a_fresh_process() -> None:
    code = """
        from eplb.production import resolve_core
        print(resolve_core())
        """
    assert _python(code, EPLB_CORE="numpy").stdout.strip() == "numpy"
    assert _python(code, EPLB_CORE="compiled").stdout.strip() == "compiled"


@pytest.mark.slow
def test_compiles_in_memory_where_no_cache_dir_is_writable() -> None:
    # Only the user-provided cache directory is allowed, and it cannot be
    # created: numba refuses cache=True, and the core compiles without a cache.
    result = _python(
        """
        import numpy as np
        from eplb.production import compiled_core
        ok, phy2log, _, _ = compiled_core.placement(np.arange(16.0).reshape(2, 8), 12, 2, 2, 4)
        print(compiled_core.CACHED, ok, phy2log.tolist())
        """,
        NUMBA_CACHE_LOCATOR_CLASSES="UserProvidedCacheLocator",
        NUMBA_CACHE_DIR="/dev/null/numba-cache",
    )
    assert result.returncode == 0, result.stderr
    expected = reference.rebalance_experts(np.arange(16.0).reshape(2, 8), 12, 2, 2, 4)[0]
    assert result.stdout.strip() == f"False True {expected.tolist()}"


# --- the interpreter lock -----------------------------------------------------------------------


def _progress_during(call: Callable[[], object], calls: int = 6) -> list[int]:
    """Iterations a pure-Python thread makes while each of ``calls`` calls of ``call`` runs.

    Decided by the lock, not by timing: the switch interval is raised to 1 s,
    so the main thread never loses the lock to a forced switch (each call is
    far shorter); the busy thread gives it up by itself (``time.sleep(0)``)
    after every few hundred iterations, and the main thread sleeps between
    calls so that the busy thread never waits long. A call that holds the
    lock from start to end therefore sees no iteration at all, whatever the
    machine's load; a call that gives it up sees some as soon as the busy
    thread gets a core.
    """
    call()  # compile, warm caches: nothing but the call itself is probed
    state = {"count": 0, "stop": False}

    def busy() -> None:
        count = 0
        while not state["stop"]:
            for _ in range(200):
                count += 1
            state["count"] = count
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    thread = threading.Thread(target=busy, daemon=True)
    progress = []
    try:
        thread.start()
        for _ in range(calls):
            time.sleep(0.005)
            before = state["count"]
            call()
            progress.append(state["count"] - before)
    finally:
        state["stop"] = True
        thread.join()
        sys.setswitchinterval(interval)
    return progress


def _spin(nogil: bool) -> Callable[[], object]:
    """~10-50 ms of compiled arithmetic that holds the lock or not: the probe's control."""
    import numba

    @numba.njit(nogil=nogil)
    def spin(steps: int) -> int:
        value = 1
        for _ in range(steps):
            value = (value * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFF
        return value

    return lambda: spin(30_000_000)


def test_the_lock_probe_tells_a_call_that_holds_the_lock() -> None:
    assert _progress_during(_spin(nogil=False)) == [0] * 6
    assert sum(_progress_during(_spin(nogil=True))) > 0


def test_placement_keeps_running_beside_a_busy_python_thread() -> None:
    # The compiled core gives the lock up for the whole placement: a busy
    # Python thread keeps running while it computes (a core compiled without
    # nogil would let it run not once). The load: Kimi-K2's shape, ten times
    # the layers (about 15 ms on the development machine).
    rng = np.random.default_rng(0)
    weight = np.floor(rng.exponential(1000.0, (600, 384)))
    progress = _progress_during(lambda: _core().placement(weight, 448, 1, 8, 64))
    assert sum(progress) > 0, progress


def test_gil_benchmark_quick_run(run_benchmark) -> None:
    stdout = run_benchmark("bench_gil.py", "--quick")
    rows = [line.split() for line in stdout.splitlines() if line.startswith("DeepSeek-V3")]
    # shape (two words), core, busy loop, ms alone, ms beside, kept, loop kept, waits, met
    expected = [["numpy", "python"], ["compiled", "python"], ["service", "python"]]
    assert [row[2:4] for row in rows] == expected, stdout
    assert all(row[9] in ("yes", "no") for row in rows), stdout
    assert all(float(row[4]) > 0 and float(row[5]) >= float(row[4]) * 0.5 for row in rows), stdout
    assert all(0 < float(row[7]) for row in rows), stdout


# --- the work space a thread keeps ---------------------------------------------------------------


def test_results_are_never_written_while_anything_refers_to_them() -> None:
    # placement keeps a work space per thread: results held whole, as views of
    # a part, or as torch tensors must keep their values through later placements.
    rng = np.random.default_rng(11)
    weights = [rng.exponential(100.0, (4, 32)) * rng.integers(1, 4, (4, 32)) for _ in range(5)]
    expected = [reference.rebalance_experts(w, 48, 8, 4, 8) for w in weights]
    held: list[tuple[int, int, tuple]] = []
    for step in range(120):
        which = int(rng.integers(len(weights)))
        valid, *results = _core().placement(weights[which], 48, 8, 4, 8)
        assert valid
        for got, want in zip(results, expected[which], strict=True):
            np.testing.assert_array_equal(got, want)
        form = step % 4
        kept = (
            tuple(results),
            (results[0][1:], results[1][0]),
            tuple(torch.from_numpy(r) for r in results),
            (),
        )[form]
        del results
        held.append((which, form, kept))
        held = [h for h in held if rng.random() < 0.7]
        for which_held, form_held, kept_held in held:
            want = expected[which_held]
            if form_held == 0:
                np.testing.assert_array_equal(kept_held[0], want[0])
                np.testing.assert_array_equal(kept_held[2], want[2])
            elif form_held == 1:
                np.testing.assert_array_equal(kept_held[0], want[0][1:])
                np.testing.assert_array_equal(kept_held[1], want[1][0])
            elif form_held == 2:
                np.testing.assert_array_equal(kept_held[1].numpy(), want[1])
