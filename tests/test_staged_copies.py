"""A staged rebalance's copies laid out ahead: the local copies are the plan's, the
wire map moves exactly what crosses a wire, and each launch and commit writes exactly
the slots whose expert changes (on one and two gloo ranks)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.production import (
    ExpertBalancer,
    StagedApply,
    keep_experts_in_place,
    rearrange_expert_weights,
)
from eplb.production.balancer_state import maps_from_phy2log
from eplb.production.rearrange_plan import plan_checked
from eplb.production.staged_copies import local_sources
from eplb.reference import rebalance_experts

LAYERS, EXPERTS, SLOTS, GROUPS = 5, 8, 12, 2
SENTINEL = -12345.0  # never an expert's code


def _placements(seed: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Two SPEC placements of random loads; the second keeps the experts staying on a GPU."""
    rng = np.random.default_rng(seed)
    old, new = (
        rebalance_experts(rng.integers(1, 50, (LAYERS, EXPERTS)), SLOTS, GROUPS, 1, world)[0]
        for _ in range(2)
    )
    return old, keep_experts_in_place(old, new, world) if seed % 2 else new


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_local_sources_are_the_plans_local_copies(world, seed):
    old, new = _placements(seed, world)
    source = local_sources(old, new, world)
    copied = (new != old) & (source >= 0)
    layers, slots = np.nonzero(copied)
    mine = {(int(l), int(source[l, s]), int(s)) for l, s in zip(layers, slots, strict=True)}
    assert mine == {tuple(row) for row in plan_checked(old, new, world).local_copies.tolist()}
    # The wire map (local copies left old) moves what crosses a wire, nothing else.
    wire = np.where(copied, old, new)
    full, wired = plan_checked(old, new, world), plan_checked(old, wire, world)
    assert wired.local_copies.size == 0
    assert np.array_equal(wired.transfers, full.transfers)
    assert np.array_equal(wired.post_copies, full.post_copies)


def _weights(phy2log: torch.Tensor, rank: int, world: int) -> list[list[torch.Tensor]]:
    """Per layer, two tensors whose rows hold 100 * layer + expert of each slot."""
    local = SLOTS // world
    out = []
    for layer in range(LAYERS):
        code = 100.0 * layer + phy2log[layer, rank * local : (rank + 1) * local].double()
        out.append([code[:, None].repeat(1, 3), -code[:, None, None].repeat(1, 2, 2)])
    return out


def _exact_slots(rank: int, world: int, port: int, layers_per_step: int) -> None:
    if world > 1:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    try:
        balancer = ExpertBalancer(
            LAYERS, EXPERTS, SLOTS, GROUPS, 1, device="cpu", window_size=8, step_interval=8
        )
        maps = (balancer.phy2log, balancer.log2phy, balancer.logcnt)
        staged = StagedApply(*maps, layers_per_step, max_batch_bytes=1 << 20)
        old = balancer.phy2log.clone()
        _, new = _placements(7, world)  # keeps slots: many keep their expert
        new_maps = maps_from_phy2log(new, EXPERTS, maps[1].shape[2])
        weights = _weights(old, rank, world)
        local = SLOTS // world
        changed = (old != new_maps[0])[:, rank * local : (rank + 1) * local]
        assert changed.any() and not changed.all()
        move = staged.prepare(old, new_maps, weights)
        for stage in staged._staging:
            for buffer in stage:
                buffer.fill_(SENTINEL)
        want_new = _weights(new_maps[0], rank, world)
        staged.begin(move, weights)
        # Per staging layer, the rows the previous commit read (they keep its data).
        kept = [torch.zeros(local, dtype=torch.bool) for _ in staged._staging]
        for chunk in range(staged.num_chunks):
            rows = staged.chunk(chunk)
            # The launch wrote exactly the chunk's changed slots of staging.
            for stage, layer, previous in zip(staged._staging, rows, kept, strict=False):
                written = changed[layer]
                for buffer, want in zip(stage, want_new[layer], strict=True):
                    assert torch.equal(buffer[written], want[written]), (chunk, layer)
                    assert (buffer[~written & ~previous] == SENTINEL).all(), (chunk, layer)
            # Every staging row the commit must not read: the sentinel.
            for index, stage in enumerate(staged._staging):
                kept[index] = changed[rows[index]] if index < len(rows) else kept[index] * False
                for buffer in stage:
                    buffer[~kept[index]] = SENTINEL
            done = staged.advance(weights)
            assert done == (chunk == staged.num_chunks - 1)
            for layer in range(LAYERS):
                committed = layer < rows.stop
                want = want_new[layer] if committed else _weights(old, rank, world)[layer]
                for got, expected in zip(weights[layer], want, strict=True):
                    assert torch.equal(got, expected), (chunk, layer)
        assert torch.equal(balancer.phy2log, new_maps[0])
        assert staged.stats().local_copies > 0
        if world > 1:
            dist.barrier()  # no rank leaves while the other's last move is in flight
        balancer.close()
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.parametrize("layers_per_step", [1, 2])
def test_each_step_writes_exactly_the_changed_slots_one_rank(layers_per_step):
    _exact_slots(0, 1, 0, layers_per_step)


def test_each_step_writes_exactly_the_changed_slots_two_ranks():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_exact_slots, args=(2, port, 2), nprocs=2, join=True)


def test_a_move_into_other_tensors_may_drop_an_expert():
    # Into other tensors the weights are only read: a map dropping an expert loses
    # nothing (in place, it is refused: tests/test_refusals.py).
    old = torch.tensor([[0, 1, 2, 3]])
    new = torch.tensor([[0, 1, 2, 2]])  # expert 3 dropped
    weights = [[old[0].double()[:, None].repeat(1, 2)]]
    into = [[torch.full((4, 2), SENTINEL, dtype=torch.float64)]]
    rearrange_expert_weights(old, new, weights, into=into)
    assert torch.equal(into[0][0][3], torch.tensor([2.0, 2.0]))
    assert (into[0][0][:3] == SENTINEL).all()  # unchanged slots are not written
    assert torch.equal(weights[0][0][:, 0], old[0].double())
