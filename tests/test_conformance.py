"""The conformance suite itself: its strategies, its invariants, and agreement of the four
implementations (numpy and JAX references, torch production with its numpy core and with its
compiled core) on drawn inputs and on the real loads in every benchmark configuration.

Budgets follow the hypothesis profile (``tests/conftest.py``; ``ci`` by default,
``HYPOTHESIS_PROFILE=thorough`` for a long run).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from eplb._validation import validate_weight
from eplb.conformance import (
    BENCHMARK_MODELS,
    LOAD_KINDS,
    InvalidProblem,
    Problem,
    benchmark_workloads,
    check_agreement,
    check_invariants,
    check_refusal,
    compiled_production,
    first_difference,
    invalid_problems,
    jax_reference,
    numpy_reference,
    problems,
    project_implementations,
    torch_production,
)
from eplb.conformance.cases import SHAPE_MENU, SPEC_EXAMPLE, SPEC_LOGCNT, SPEC_PHY2LOG
from eplb.conformance.runner import menu_problems
from eplb.conformance.strategies import INVALID_RULES

_EXAMPLES = settings.default.max_examples
# "overflow" loads reach inf in float64 sums, as SPEC.md allows; numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
_T = TypeVar("_T")


def _spec_placement() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return numpy_reference(SPEC_EXAMPLE.weight, *SPEC_EXAMPLE.counts)


# --- strategies --------------------------------------------------------------------------


@given(problems())
def test_problems_are_valid(problem: Problem) -> None:
    _, config = validate_weight(problem.weight, *problem.counts)
    assert problem.weight.dtype == np.float64
    assert len(problem.kinds) == config.num_layers
    assert set(problem.kinds) <= set(LOAD_KINDS)


COVERAGE = {
    "global policy": lambda p: not p.hierarchical,
    "hierarchical, G == N > 1": lambda p: p.hierarchical and p.num_groups == p.num_nodes > 1,
    "hierarchical, G/N > 1, N > 1": lambda p: p.hierarchical and p.num_groups > p.num_nodes > 1,
    "P == N > 1": lambda p: p.num_gpus == p.num_nodes > 1,
    "R == E": lambda p: p.num_replicas == p.weight.shape[1],
    "one slot per GPU, P > 1": lambda p: p.num_replicas == p.num_gpus > 1,
    "4+ replicas per expert": lambda p: p.num_replicas >= 4 * p.weight.shape[1],
    "one layer": lambda p: p.weight.shape[0] == 1,
    "hundreds of experts": lambda p: p.weight.shape[1] >= 200,
    "dozens of layers": lambda p: p.weight.shape[0] >= 24,
    "groups of 9+ (pairwise sums differ)": lambda p: p.weight.shape[1] // p.num_groups >= 9,
    "ties within a row": lambda p: any(len(set(r)) < len(r) for r in p.weight.tolist()),
    "all-equal row": lambda p: (
        any(len(set(r)) == 1 for r in p.weight.tolist()) and p.weight.shape[1] > 1
    ),
    "value near 2**53": lambda p: bool((p.weight > 2.0**52).any()),
    "distinct in float64, equal in float32": lambda p: any(
        len(set(r)) > len(set(np.float32(r).tolist())) for r in p.weight.tolist()
    ),
    "group sums that depend on the order": lambda p: _order_dependent_group_sums(p),
}


def _order_dependent_group_sums(p: Problem) -> bool:
    grouped = p.weight.reshape(p.weight.shape[0], p.num_groups, -1)
    left = np.zeros(grouped.shape[:2])
    for offset in range(grouped.shape[2]):
        left = left + grouped[..., offset]
    right = np.zeros(grouped.shape[:2])
    for offset in reversed(range(grouped.shape[2])):
        right = right + grouped[..., offset]
    return bool((left != right).any())


def _drawn(strategy: st.SearchStrategy[_T], describe: Callable[[_T], set[str]]) -> set[str]:
    """Every label ``describe`` gives to the inputs one derandomized run draws."""
    seen: set[str] = set()

    # Inputs only, no placement: cheap, so a generous budget whatever the profile.
    @settings(max_examples=400, database=None, derandomize=True, phases=[Phase.generate])
    @given(strategy)
    def collect(value: _T) -> None:
        seen.update(describe(value))

    collect()
    return seen


def test_problems_reach_every_feature_and_load_kind() -> None:
    seen = _drawn(
        problems(),
        lambda p: {f for f, has in COVERAGE.items() if has(p)} | set(p.kinds),
    )
    assert set(COVERAGE) | set(LOAD_KINDS) <= seen, set(COVERAGE) | set(LOAD_KINDS) - seen


@given(invalid_problems())
def test_invalid_problems_are_refused_by_the_reference(bad: InvalidProblem) -> None:
    with pytest.raises(bad.error):
        numpy_reference(bad.weight, *bad.counts)


def test_invalid_problems_break_every_rule() -> None:
    seen = _drawn(
        invalid_problems(), lambda bad: {r for r in INVALID_RULES if bad.rule.startswith(r)}
    )
    assert seen == set(INVALID_RULES)


# --- invariants --------------------------------------------------------------------------


def test_invariants_hold_for_spec_example() -> None:
    check_invariants(*_spec_placement(), *SPEC_EXAMPLE.counts)


def _rebuild_log2phy(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """log2phy and logcnt consistent with an arbitrary phy2log (replicas in slot order)."""
    logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    log2phy = np.full((*logcnt.shape, max(1, logcnt.max())), -1)
    for layer, row in enumerate(phy2log):
        seen = np.zeros(num_experts, int)
        for slot, expert in enumerate(row):
            log2phy[layer, expert, seen[expert]] = slot
            seen[expert] += 1
    return log2phy, logcnt


def _swap_across_nodes() -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    phy2log = _spec_placement()[0].copy()
    phy2log[0, [0, 8]] = phy2log[0, [8, 0]]  # slot 0 on node 0, slot 8 on node 1
    return (phy2log, *_rebuild_log2phy(phy2log, 12)), SPEC_EXAMPLE.counts


def _three_groups_on_one_node() -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    # E=4, G=4, N=2, R=8, P=2: node 0 holds groups 0, 1, 2 and node 1 only group 3;
    # every other invariant holds.
    phy2log = np.array([[0, 1, 2, 0, 3, 3, 3, 3]])
    return (phy2log, *_rebuild_log2phy(phy2log, 4)), (8, 4, 2, 2)


def _set(
    array: str, index: tuple[int, ...], value: int
) -> Callable[[], tuple[tuple[np.ndarray, ...], tuple[int, ...]]]:
    """A maker of SPEC.md's placement with one entry of one output changed."""

    def make() -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
        outputs = tuple(a.copy() for a in _spec_placement())
        outputs[("phy2log", "log2phy", "logcnt").index(array)][index] = value
        return outputs, SPEC_EXAMPLE.counts

    return make


BROKEN = {
    "phy2log out of range": (_set("phy2log", (0, 0), 12), "outside 0..11"),
    "negative phy2log": (_set("phy2log", (1, 3), -1), "outside 0..11"),
    "logcnt below 1": (_set("logcnt", (0, 0), 0), "< 1"),
    "logcnt sum": (_set("logcnt", (1, 2), 2), "sums to 17"),
    "count disagrees with phy2log": (
        _set("phy2log", (0, 0), 0),
        "slots of phy2log",
    ),
    "padding not -1": (_set("log2phy", (0, 0, 1), 0), "expected -1"),
    "log2phy not inverse": (_set("log2phy", (0, 0, 0), 3), "holds expert"),
    "log2phy slot out of range": (_set("log2phy", (0, 0, 0), 16), "not a slot"),
    "K too wide": (
        lambda: (
            (
                _spec_placement()[0],
                np.concatenate([_spec_placement()[1], np.full((2, 12, 1), -1)], axis=2),
                _spec_placement()[2],
            ),
            SPEC_EXAMPLE.counts,
        ),
        "K=3 columns",
    ),
    "int32 output": (
        lambda: (tuple(a.astype(np.int32) for a in _spec_placement()), SPEC_EXAMPLE.counts),
        "expected int64",
    ),
    "phy2log shape": (lambda: (_spec_placement(), (24, 4, 2, 8)), "phy2log shape"),
    "group split over nodes": (_swap_across_nodes, "replicas of group"),
    "three groups on one node": (_three_groups_on_one_node, "groups per node [3, 1]"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_invariants_catch(broken: str) -> None:
    make, message = BROKEN[broken]
    outputs, counts = make()
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_invariants(*outputs, *counts)


def test_invariants_skip_node_rule_for_global_policy() -> None:
    # The same split group is fine when G % N != 0 (global policy): only the
    # hierarchical rule is broken, so G=3, N=2 must pass.
    phy2log = np.array([[0, 1, 2, 0, 1, 2]])
    log2phy, logcnt = _rebuild_log2phy(phy2log, 3)
    check_invariants(phy2log, log2phy, logcnt, 6, 3, 2, 2)
    with pytest.raises(AssertionError, match="replicas of group"):
        check_invariants(phy2log, log2phy, logcnt, 6, 3, 3, 3)


# --- first_difference ----------------------------------------------------------------------


def test_first_difference_names_output_and_slot() -> None:
    expected = _spec_placement()
    got = [a.copy() for a in expected]
    assert first_difference(expected, got) is None
    got[0][1, 7] = 0
    difference = first_difference(expected, got)
    assert difference is not None
    assert (difference.output, difference.index) == ("phy2log", (1, 7))
    assert str(difference) == f"phy2log[layer 1, slot 7]: expected {expected[0][1, 7]}, got 0"
    got[1] = got[1][:, :, :1]
    assert getattr(first_difference(expected, got), "output", None) == "phy2log"
    got[0] = expected[0]
    assert getattr(first_difference(expected, got), "output", None) == "log2phy shape"
    assert getattr(first_difference(expected, (1, 2)), "output", None) == "result"


# --- agreement -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl",
    [numpy_reference, torch_production, compiled_production, jax_reference],
    ids=lambda f: f.__name__,
)
def test_spec_worked_example(impl: Callable[..., tuple[np.ndarray, ...]]) -> None:
    phy2log, log2phy, logcnt = impl(SPEC_EXAMPLE.weight, *SPEC_EXAMPLE.counts)
    np.testing.assert_array_equal(phy2log, SPEC_PHY2LOG)
    np.testing.assert_array_equal(logcnt, SPEC_LOGCNT)
    check_invariants(phy2log, log2phy, logcnt, *SPEC_EXAMPLE.counts)


@settings(max_examples=_EXAMPLES * 2)
@given(problems())
def test_torch_agrees_with_numpy(problem: Problem) -> None:
    check_invariants(*numpy_reference(problem.weight, *problem.counts), *problem.counts)
    check_agreement(problem.weight, problem.counts, project_implementations(jax=False))


# Integer and float32 loads reach each implementation in their own dtype (the
# numpy reference converts them to float64 exactly, as every implementation must).
@settings(max_examples=max(10, _EXAMPLES // 2))
@given(
    st.sampled_from(["float32", "int64", "uint16"]),
    problems(large=False, kinds=tuple(k for k in LOAD_KINDS if k != "overflow")),
)
def test_torch_agrees_on_integer_and_float32_input(dtype: str, problem: Problem) -> None:
    # Integer dtypes get the integer part, wrapped into uint16's range.
    weight = problem.weight if dtype == "float32" else np.floor(problem.weight)
    weight = (weight % 2**16 if dtype == "uint16" else weight).astype(dtype)
    check_agreement(weight, problem.counts, project_implementations(jax=False))


@settings(max_examples=max(10, _EXAMPLES // 2))
@given(menu_problems())
def test_jax_agrees_with_numpy(problem: Problem) -> None:
    check_agreement(problem.weight, problem.counts, {"jax reference": jax_reference})


@given(invalid_problems())
def test_invalid_input_refused_alike(bad: InvalidProblem) -> None:
    assert check_refusal(bad.weight, bad.counts, project_implementations()) is bad.error


def test_jax_menu_covers_the_hierarchy() -> None:
    menu = [Problem(np.zeros(c[:2]), *c[2:]) for c in SHAPE_MENU]
    for feature in (
        "global policy",
        "hierarchical, G == N > 1",
        "R == E",
        "one layer",
        "one slot per GPU, P > 1",
        "4+ replicas per expert",
        "P == N > 1",
        "groups of 9+ (pairwise sums differ)",
    ):
        assert any(COVERAGE[feature](p) for p in menu), feature


# --- real loads in every benchmark configuration ------------------------------------------

# All 8 real files in both DeepSeek-V3 configurations, one or two for the derived
# models (the numpy reference needs 0.2-0.8 s a call at these sizes).
_REAL_FILES = {model: 8 if model.startswith("DeepSeek-V3") else 2 for model in BENCHMARK_MODELS}
_REAL_FILES["Kimi-K2 R=448"] = 1
# The JAX reference compiles each shape once (5-9 s on 2 cores): one file of the
# hierarchical DeepSeek-V3 and of the global-policy Kimi-K2.
_JAX_MODELS = ("DeepSeek-V3 R=288", "Kimi-K2 R=448")


@pytest.mark.parametrize("model", BENCHMARK_MODELS)
def test_real_loads_agree(model: str, real_loads: dict[str, np.ndarray]) -> None:
    chosen = dict(list(real_loads.items())[: _REAL_FILES[model]])
    for workload in benchmark_workloads(chosen, (model,)):
        impls = project_implementations(jax=False)
        if model in _JAX_MODELS and workload.source == next(iter(chosen)):
            impls["jax reference"] = jax_reference
        expected = numpy_reference(workload.weight, *workload.counts)
        check_invariants(*expected, *workload.counts)
        try:
            check_agreement(workload.weight, workload.counts, impls)
        except AssertionError as exc:
            raise AssertionError(f"{workload.name}: {exc}") from None


def test_real_workload_shapes(real_loads: dict[str, np.ndarray]) -> None:
    shapes = {
        w.model: w.weight.shape for w in benchmark_workloads(dict(list(real_loads.items())[:1]))
    }
    assert shapes == {
        "DeepSeek-V3 R=288": (58, 256),
        "DeepSeek-V3 R=320": (58, 256),
        "DeepSeek-V2-Lite R=64": (26, 64),
        "DeepSeek-V2-Lite R=72": (26, 64),
        "Qwen3-235B R=144": (94, 128),
        "Kimi-K2 R=448": (60, 384),
    }
    real = next(iter(real_loads.values()))
    lite = benchmark_workloads({"x": real}, ("DeepSeek-V2-Lite R=64",))[0].weight
    np.testing.assert_array_equal(lite[:, 1], real[:26, 4:8].sum(axis=1))
    kimi = benchmark_workloads({"x": real}, ("Kimi-K2 R=448",))[0].weight
    np.testing.assert_array_equal(kimi[58:, 256:], real[:2, :128])


# --- CUDA ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_torch_cuda_agrees_with_numpy(problem: Problem) -> None:
    check_agreement(problem.weight, problem.counts, project_implementations(jax=False, cuda=True))


def test_problem_repr_names_the_configuration() -> None:
    text = repr(dataclasses.replace(SPEC_EXAMPLE))
    assert text == "Problem(L=2, E=12, R=16, G=4, N=2, P=8, hierarchical, kinds=['spec'])"


def test_device_check_runs_on_cpu(
    real_loads: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    # The hypothesis-free check the GPU machine runs with --device cuda.
    from eplb.conformance.device_check import main

    assert main(["--device", "cpu", "--seeds", "1", "--files", "1"]) == 0
    out = capsys.readouterr().out
    assert f"({len(BENCHMARK_MODELS)} with real loads), 0 differ" in out


def test_project_implementations_leave_out_missing_jax(monkeypatch: pytest.MonkeyPatch) -> None:
    # A serving machine with torch only still runs `eplb conformance` (JAX left out).
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax" else find_spec(name, *a)
    )
    assert set(project_implementations(jax=None, cuda=False, compiled=False)) == {
        "torch production (cpu)"
    }
    assert "jax reference" in project_implementations(cuda=False)


def test_project_implementations_hold_the_compiled_core_where_it_loads() -> None:
    from eplb.production import compiled_core_error

    impls = project_implementations(jax=False, cuda=False)
    assert ("compiled core (cpu)" in impls) == (compiled_core_error() is None)
    assert "compiled core (cpu)" not in project_implementations(cuda=False, compiled=False)
