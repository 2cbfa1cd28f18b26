"""The engine adapters: vLLM's and SGLang's policy interfaces, without either engine installed."""

from __future__ import annotations

import enum
import inspect

import numpy as np
import pytest
import torch

from eplb.conformance import SPEC_EXAMPLE, check_invariants
from eplb.conformance.cases import SPEC_LOGCNT, SPEC_PHY2LOG
from eplb.integrations import sglang, vllm
from eplb.production import rebalance_experts

SPEC_WEIGHT = torch.from_numpy(SPEC_EXAMPLE.weight).to(torch.int64)  # engines pass token counts


def _params(fn: object) -> list[str]:
    return [name for name in inspect.signature(fn).parameters if name != "cls"]  # type: ignore[arg-type]


def test_signatures_are_the_engines():
    assert _params(vllm.EplbPolicy.rebalance_experts) == [
        "weight",
        "num_replicas",
        "num_groups",
        "num_nodes",
        "num_ranks",
        "old_global_expert_indices",
    ]
    assert _params(vllm.rebalance_experts) == [
        "weight",
        "num_replicas",
        "num_groups",
        "num_nodes",
        "num_gpus",
    ]
    assert _params(sglang.rebalance_experts) == [
        "tokens_per_expert",
        "num_physical_experts",
        "num_local_physical_experts",
        "num_groups",
        "num_nodes",
        "algorithm",
    ]
    assert _params(sglang.deepseek_rebalance_experts) == [
        "weight",
        "num_replicas",
        "num_groups",
        "num_nodes",
        "num_gpus",
        "enable_hierarchical",
    ]
    assert _params(sglang.compute_algorithm) == ["raw_algorithm", "num_groups", "num_nodes"]


def _check_consistent(phy2log, log2phy, logcnt, counts):  # type: ignore[no-untyped-def]
    """SPEC.md's invariants, after cutting log2phy's extra -1 columns."""
    width = int(logcnt.max())
    assert (log2phy[:, :, width:] == -1).all()
    check_invariants(phy2log, log2phy[:, :, :width], logcnt, *counts)


def test_vllm_policy_gives_spec_placement_with_vllm_widths():
    phy2log, log2phy, logcnt = vllm.EplbPolicy.rebalance_experts(SPEC_WEIGHT, 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log.numpy(), SPEC_PHY2LOG)
    np.testing.assert_array_equal(logcnt.numpy(), SPEC_LOGCNT)
    assert log2phy.shape == (2, 12, 16 - 12 + 1)  # vLLM's num_redundant_experts + 1
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    _check_consistent(phy2log, log2phy, logcnt, (16, 4, 2, 8))
    function = vllm.rebalance_experts(SPEC_WEIGHT, 16, 4, 2, 8)
    for a, b in zip(function, (phy2log, log2phy, logcnt), strict=True):
        assert torch.equal(a, b)


def test_vllm_falls_back_to_global_when_groups_do_not_divide():
    # vLLM's own test: 4 experts, 3 groups, 2 nodes: the global policy, no error.
    weight = torch.tensor([[10, 20, 30, 40]])
    phy2log, log2phy, logcnt = vllm.EplbPolicy.rebalance_experts(weight, 8, 3, 2, 4)
    expected = rebalance_experts(weight, 8, 1, 1, 4)
    assert torch.equal(phy2log, expected[0]) and torch.equal(logcnt, expected[2])
    assert log2phy.shape == (1, 4, 5)


@pytest.mark.parametrize(
    ("weight", "counts", "words"),
    [
        (torch.tensor([[10, 20, 30, 40]]), (7, 2, 2, 4), "num_replicas"),  # vLLM's own case
        (torch.tensor([[10, 20, 30, 40, 50, 60]]), (8, 4, 2, 4), "num_groups"),  # E % G
        (torch.tensor([[1.0, -1.0, 2.0, 3.0]]), (4, 2, 2, 2), ">= 0"),
        (torch.tensor([[True, False, True, True]]), (4, 2, 2, 2), "boolean"),
        (torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (4, 2, 2, 3), "num_nodes must divide num_gpus"),
    ],
    ids=["R%P", "E%G", "negative", "bool", "P%N"],
)
def test_vllm_refuses_with_assertion_error(weight, counts, words):
    with pytest.raises(AssertionError, match=words) as refused:
        vllm.EplbPolicy.rebalance_experts(weight, *counts)
    assert isinstance(refused.value, vllm.EngineInputError)
    assert isinstance(refused.value.__cause__, ValueError | TypeError)


def test_vllm_keeps_experts_in_their_old_slots():
    rng = np.random.default_rng(0)
    old_weight, new_weight = (torch.from_numpy(rng.integers(0, 100, (3, 16))) for _ in range(2))
    counts = (24, 4, 2, 8)
    old = vllm.EplbPolicy.rebalance_experts(old_weight, *counts)[0]
    fresh, _, fresh_cnt = vllm.EplbPolicy.rebalance_experts(new_weight, *counts)
    before = old.clone()
    phy2log, log2phy, logcnt = vllm.EplbPolicy.rebalance_experts(new_weight, *counts, old)
    assert torch.equal(old, before)  # the old map is not modified
    assert torch.equal(logcnt, fresh_cnt)
    _check_consistent(phy2log, log2phy, logcnt, counts)
    per_gpu = (3, 8, 3)
    # The same experts on every GPU as the fresh placement (same balance) ...
    assert torch.equal(phy2log.view(per_gpu).sort(-1).values, fresh.view(per_gpu).sort(-1).values)
    # ... and more slots unchanged from the old placement than the fresh one has.
    assert int((phy2log == old).sum()) > int((fresh == old).sum())


def test_sglang_dispatch_sums_windows_and_matches_production():
    rng = np.random.default_rng(1)
    tokens = torch.from_numpy(rng.integers(0, 50, (3, 2, 16)))  # [windows, layers, experts]
    for name, hierarchical in (("deepseek_hierarchical", True), ("deepseek", False)):
        algorithm = sglang.EplbAlgorithm[name]
        got = sglang.rebalance_experts(tokens, 24, 3, 4, 2, algorithm)
        groups, nodes = (4, 2) if hierarchical else (1, 1)
        expected = rebalance_experts(tokens.sum(dim=0), 24, groups, nodes, 8)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
            assert a.device.type == "cpu" and a.dtype == torch.int64
        assert got[1].shape[2] == int(got[2].max())  # SGLang's width: the largest count


def test_sglang_accepts_its_own_enum_strings_and_no_groups():
    class SglangAlgorithm(enum.Enum):  # what SGLang passes: its own enum
        deepseek = enum.auto()
        deepseek_hierarchical = enum.auto()
        deepseek_vec = enum.auto()

    tokens = torch.ones(1, 2, 12)
    by_enum = sglang.rebalance_experts(tokens, 12, 3, 4, 2, SglangAlgorithm.deepseek_hierarchical)
    by_name = sglang.rebalance_experts(tokens, 12, 3, 4, 2, "deepseek_hierarchical")
    assert torch.equal(by_enum[0], by_name[0])
    # The global algorithm ignores the groups, which may be None.
    global_ = sglang.rebalance_experts(tokens, 12, 3, None, 2, SglangAlgorithm.deepseek)
    assert global_[0].shape == (2, 12)
    with pytest.raises(NotImplementedError, match="deepseek_vec"):
        sglang.rebalance_experts(tokens, 12, 3, 4, 2, SglangAlgorithm.deepseek_vec)


def test_sglang_compute_algorithm():
    assert sglang.compute_algorithm("auto", 8, 4) is sglang.EplbAlgorithm.deepseek_hierarchical
    assert sglang.compute_algorithm("auto", 8, 3) is sglang.EplbAlgorithm.deepseek
    assert sglang.compute_algorithm("auto", None, 2) is sglang.EplbAlgorithm.deepseek
    assert sglang.compute_algorithm("deepseek", 8, 4) is sglang.EplbAlgorithm.deepseek
    with pytest.raises(KeyError):
        sglang.compute_algorithm("no_such", 8, 4)


_deepseek = sglang.deepseek_rebalance_experts


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: _deepseek(torch.ones(1, 12), 12, 3, 2, 2, True), "divide"),
        (lambda: _deepseek(torch.ones(1, 12), 12, None, 2, 2, True), "None"),
        (lambda: sglang.rebalance_experts(torch.ones(2, 12), 12, 3, 4, 2, "deepseek"), "3-D"),
        (lambda: sglang.rebalance_experts(torch.ones(1, 2, 12), 12, 5, 4, 2, "deepseek"), "divide"),
        (
            lambda: sglang.rebalance_experts(
                torch.ones(1, 2, 12, dtype=torch.bool), 12, 3, 4, 2, "deepseek"
            ),
            "real numbers",
        ),
        (lambda: _deepseek(-torch.ones(1, 12), 12, 4, 2, 2, True), ">= 0"),
    ],
    ids=["G%N", "no-groups", "2-D", "local", "bool", "negative"],
)
def test_sglang_refuses_with_assertion_error(call, words):
    with pytest.raises(AssertionError, match=words):
        call()
