"""Issue 13 item 4: maps that would lose weights, ids out of range, use after close.

Every refusal is a clear ValueError/RuntimeError raised before anything is
touched; none surfaces as a MemoryError, an overflow or a silent misroute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb.production import (
    ExpertBalancer,
    plan_rearrangement,
    prepare_rearrangement,
    rearrange_expert_weights,
)

LAYERS, EXPERTS, SLOTS = 2, 4, 6
OLD = np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2]])


def _weights() -> list[list[torch.Tensor]]:
    """One rank's slots, each filled with its expert id (to see that nothing moved)."""
    return [
        [torch.from_numpy(OLD[layer].astype(np.float32)[:, None].repeat(3, 1))] for layer in (0, 1)
    ]


def test_a_move_that_drops_an_expert_is_refused_before_touching_weights():
    new = OLD.copy()
    new[0, 3] = 2  # layer 0 no longer holds expert 3
    weights = _weights()
    before = [[t.clone() for t in layer] for layer in weights]
    for call in (rearrange_expert_weights, prepare_rearrangement):
        with pytest.raises(ValueError, match=r"layer 0 drops expert 3 .*would be lost"):
            call(torch.from_numpy(OLD), torch.from_numpy(new), weights)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(weights, before, strict=True))
    # The planner alone still plans it (its tests move a subset of experts).
    assert plan_rearrangement(OLD, new, 2).num_layers == LAYERS


@pytest.mark.parametrize("huge", [SLOTS, 2**40, 2**62])
def test_an_id_out_of_range_is_a_value_error_not_a_memory_error(huge):
    new = OLD.copy()
    new[1, 5] = huge
    with pytest.raises(ValueError, match="no slot of old_phy2log holds"):
        plan_rearrangement(OLD, new, 2)
    old = OLD.copy()
    old[1, 5] = huge  # held by both maps: consistent, yet not a placement of R slots
    with pytest.raises(
        ValueError, match=rf"ids must be < the number of slots R={SLOTS} .*, got {huge} at"
    ):
        plan_rearrangement(old, old, 2)
    with pytest.raises(ValueError, match=rf"ids must be < the number of slots R={SLOTS}"):
        rearrange_expert_weights(torch.from_numpy(old), torch.from_numpy(old), _weights())


def _balancer(**kwargs) -> ExpertBalancer:
    return ExpertBalancer(LAYERS, EXPERTS, SLOTS, 2, 1, device="cpu", **kwargs)


def test_route_sends_every_id_outside_the_experts_to_slot_minus_one_in_both_modes():
    valid = torch.tensor([[0, 1], [2, 3], [1, 1]])
    bad = torch.tensor([[-1, EXPERTS], [2**40, -(2**40)], [EXPERTS + 1, -2]])
    ids = torch.cat([valid, bad])
    counted = _balancer()
    silent = _balancer()
    for dtype in (torch.int64, torch.int32):
        if dtype == torch.int32:
            ids = ids.clamp(-(2**31), 2**31 - 1)
        routed = counted.route(0, ids.to(dtype), record=True)
        assert torch.equal(routed, silent.route(0, ids.to(dtype), record=False))
        assert routed.dtype == dtype
        assert (routed[len(valid) :] == -1).all()
        assert torch.equal(routed[: len(valid)], silent.route(0, valid.to(dtype), record=False))
    counted.step(_weights_for(counted))
    # Only valid ids counted, twice (two dtypes): 0 once, 1 three times, 2 and 3 once per call.
    assert counted.window_load()[0].tolist() == [2, 6, 2, 2]
    assert counted.window_load()[1].sum() == 0
    counted.close()
    silent.close()


def _weights_for(balancer: ExpertBalancer) -> list[list[torch.Tensor]]:
    return [[torch.zeros(SLOTS, 2)] for _ in range(LAYERS)]


def test_close_drops_a_pending_placement_and_use_after_close_raises():
    balancer = _balancer(step_interval=2, apply_delay=1)
    weights = _weights_for(balancer)
    before = balancer.phy2log.clone()
    balancer.route(0, torch.tensor([[1, 1], [1, 1], [1, 1]]))
    balancer.step(weights)
    balancer.step(weights)  # starts a rebalance, to apply at the next step
    assert balancer.stats.rebalances == 0
    balancer.close()
    balancer.close()  # a second close does nothing
    assert torch.equal(balancer.phy2log, before)
    ids = torch.zeros(1, 2, dtype=torch.int64)
    for use in (
        lambda: balancer.step(weights),
        lambda: balancer.route(0, ids),
        lambda: balancer.reset(),
        balancer.window_load,
    ):
        with pytest.raises(RuntimeError, match="ExpertBalancer was closed"):
            use()
    assert balancer.stats.rebalances == 0 and torch.equal(balancer.phy2log, before)


def test_reset_refuses_a_huge_id_by_position():
    balancer = _balancer()
    phy2log = OLD.copy()
    phy2log[1, 4] = 2**62
    with pytest.raises(
        ValueError, match=r"0\.\.3, got 4611686018427387904 at \[layer, slot\]=\[1, 4\]"
    ):
        balancer.reset(phy2log)
    balancer.close()


@pytest.mark.parametrize(
    ("host_wait", "into", "error", "match"),
    [
        (False, False, ValueError, r"host_wait=False needs into="),
        (False, True, ValueError, r"host_wait=False needs CUDA tensors, got cpu"),
        (0, True, TypeError, r"host_wait must be a bool, got int"),
    ],
)
def test_a_move_skips_its_host_wait_only_into_other_tensors_on_cuda(host_wait, into, error, match):
    # Without into= the live slots would be left in an unknown state; on gloo
    # the messages complete only inside a host wait. Refused before any write.
    new = OLD[:, ::-1].copy()
    weights = _weights()
    before = [[t.clone() for t in layer] for layer in weights]
    target = [[torch.full_like(t, -1.0) for t in layer] for layer in weights] if into else None
    with pytest.raises(error, match=match):
        rearrange_expert_weights(
            torch.from_numpy(OLD), torch.from_numpy(new), weights, into=target, host_wait=host_wait
        )
    assert all(torch.equal(a[0], b[0]) for a, b in zip(weights, before, strict=True))
    assert target is None or all((layer[0] == -1).all() for layer in target)
