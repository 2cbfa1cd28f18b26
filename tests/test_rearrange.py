"""Weight rearrangement: the planner alone, then real gloo groups of 2, 4 and 8 processes.

Spawning torch processes costs seconds each on a 2-core CI box, so one group of
8 is spawned once per session; it forms sub-groups of 2 ranks (global 0-1) and
4 ranks (global 2-5) and runs every scenario in its group, writing what it saw
to files that the tests below check. The content of a slot is a pure function
of (scenario, layer, expert, tensor), so the expected weights are recomputed
here without trusting the worker.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.production import rearrange as rearrange_module
from eplb.production.errors import RearrangeError
from eplb.production.rearrange import (
    PreparedRearrangement,
    RearrangeBuffers,
    RearrangePlan,
    keep_experts_in_place,
    plan_rearrangement,
    prepare_rearrangement,
    rearrange_expert_weights,
    warmup_rearrangement,
)
from eplb.production.rearrange_schedule import local_waves, split_steps
from eplb.production.slot_work import SlotWork
from eplb.production.transport import TorchDistributedTransport

# (slot shape, dtype, stored transposed) of each tensor of a layer: several
# widths, bit patterns that are NaN as floats, 0-d slots and a non-contiguous view.
TENSORS = (
    ((4, 6), torch.float32, True),
    ((7,), torch.bfloat16, False),
    ((2, 3), torch.uint8, False),
    ((4,), torch.float8_e4m3fn, False),
    ((), torch.int8, False),
)
GROUPS = {2: [0, 1], 4: [2, 3, 4, 5], 8: list(range(8))}
WORLD = 8


# ----------------------------------------------------------------- helpers


def _slot_bytes(seed: int, layer: int, expert: int, tensor: int) -> np.ndarray:
    """The raw bytes of one slot of one tensor of ``expert``: a pure function of its key."""
    shape, dtype, _ = TENSORS[tensor]
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    return np.random.default_rng([seed, layer, expert, tensor]).integers(
        0, 256, size=nbytes, dtype=np.uint8
    )


def _expected(seed: int, phy2log: np.ndarray, slots: range) -> list[list[np.ndarray]]:
    """[layer][tensor] -> [slots, nbytes] uint8: what the given slots hold under ``phy2log``."""
    return [
        [
            np.stack([_slot_bytes(seed, layer, int(phy2log[layer, s]), t) for s in slots])
            for t in range(len(TENSORS))
        ]
        for layer in range(phy2log.shape[0])
    ]


def _weights(
    expected: list[list[np.ndarray]], device: str, strided: bool = True
) -> list[list[torch.Tensor]]:
    """Tensors of the TENSORS layout holding ``expected`` bytes (some stored transposed)."""
    layers = []
    for per_tensor in expected:
        tensors = []
        for raw, (shape, dtype, transposed) in zip(per_tensor, TENSORS, strict=True):
            value = torch.from_numpy(raw.copy()).view(dtype).view(len(raw), *shape)
            if transposed and strided:  # same values, strided storage
                storage = torch.empty(len(raw), *shape[::-1], dtype=dtype, device=device)
                tensor = storage.transpose(1, 2)
                tensor.copy_(value)
                assert not tensor.is_contiguous()
            else:
                tensor = value.to(device)
            tensors.append(tensor)
        layers.append(tensors)
    return layers


def _raw(weights: list[list[torch.Tensor]]) -> list[list[np.ndarray]]:
    """[layer][tensor] -> [slots, nbytes] uint8 of the tensors' current bits."""
    return [
        [t.cpu().contiguous().view(torch.uint8).reshape(t.shape[0], -1).numpy() for t in layer]
        for layer in weights
    ]


def _random_placement(
    rng: np.random.Generator, layers: int, experts: int, slots: int
) -> np.ndarray:
    """[layers, slots]: every expert at least once, extra replicas anywhere, shuffled."""
    rows = []
    for _ in range(layers):
        row = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        rows.append(rng.permutation(row))
    return np.stack(rows)


def _stacked_placement(
    rng: np.random.Generator, layers: int, experts: int, slots: int, stack: int = 3
) -> np.ndarray:
    """Like _random_placement, but slots 0..stack-1 hold one expert ``stack`` times."""
    rows = []
    for _ in range(layers):
        rest = np.concatenate(
            [np.arange(experts), rng.integers(0, experts, slots - stack - experts)]
        )
        rows.append(np.concatenate([np.full(stack, rng.integers(experts)), rng.permutation(rest)]))
    return np.stack(rows)


# ------------------------------------------------------ planner, no processes


def _simulate(plan: RearrangePlan, old: np.ndarray) -> np.ndarray:
    """Apply a plan to expert ids per slot, checking each step reads what it claims."""
    per_rank = plan.slots_per_rank
    after = old.copy()
    written = np.zeros(old.shape, dtype=int)
    for layer, expert, src_rank, src_slot, dst_rank, dst_slot in plan.transfers:
        assert src_rank != dst_rank
        assert src_slot // per_rank == src_rank and dst_slot // per_rank == dst_rank
        assert old[layer, src_slot] == expert  # reads the old placement, before any write
        after[layer, dst_slot] = expert
        written[layer, dst_slot] += 1
    for layer, src, dst in plan.local_copies:
        assert src // per_rank == dst // per_rank
        after[layer, dst] = old[layer, src]
        written[layer, dst] += 1
    for layer, src, dst in plan.post_copies:
        assert src // per_rank == dst // per_rank
        # the source was filled by a transfer of this plan
        assert ((plan.transfers[:, 0] == layer) & (plan.transfers[:, 5] == src)).sum() == 1
        after[layer, dst] = after[layer, src]
        written[layer, dst] += 1
    assert written.max(initial=0) <= 1, "a slot is written twice"
    np.testing.assert_array_equal(written == 1, old != after)
    return after


def _check_plan(old: np.ndarray, new: np.ndarray, ranks: int) -> RearrangePlan:
    plan = plan_rearrangement(old, new, ranks)
    np.testing.assert_array_equal(_simulate(plan, old), new)
    per_rank = plan.slots_per_rank
    t = plan.transfers
    # Each (layer, expert) is received at most once per rank ...
    keys = {(int(a), int(b), int(c)) for a, b, c in t[:, [0, 1, 4]]}
    assert len(keys) == len(t)
    # ... and never when the rank already had it.
    for layer, expert, _, _, dst_rank, _ in t:
        assert expert not in old[layer, dst_rank * per_rank : (dst_rank + 1) * per_rank]
    # The fixed message order: (layer, src_rank, dst_rank, expert).
    order = np.lexsort((t[:, 1], t[:, 4], t[:, 2], t[:, 0]))
    np.testing.assert_array_equal(order, np.arange(len(t)))
    return plan


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    layers=st.integers(1, 4),
    ranks=st.sampled_from([1, 2, 3, 4, 8]),
    per_rank=st.integers(1, 6),
    spare=st.integers(0, 5),
)
def test_plan_moves_every_slot_to_its_new_expert(seed, layers, ranks, per_rank, spare):
    rng = np.random.default_rng(seed)
    slots = ranks * per_rank
    experts = max(1, slots - spare)
    old = _random_placement(rng, layers, experts, slots)
    new = _random_placement(rng, layers, experts, slots)
    _check_plan(old, new, ranks)


def test_plan_of_no_change_is_empty():
    old = _random_placement(np.random.default_rng(0), 3, 10, 16)
    plan = _check_plan(old, old, 4)
    assert plan.transfers.size == plan.local_copies.size == plan.post_copies.size == 0


def test_plan_receives_once_then_copies_locally():
    # Rank 1 needs expert 0 in all four of its slots: one receive, three post copies.
    old = np.array([[0, 1, 2, 3, 1, 2, 3, 1]])
    new = np.array([[0, 1, 2, 3, 0, 0, 0, 0]])
    plan = _check_plan(old, new, 2)
    assert plan.transfers[:, [0, 1, 2, 4, 5]].tolist() == [[0, 0, 0, 1, 4]]
    assert plan.post_copies.tolist() == [[0, 4, 5], [0, 4, 6], [0, 4, 7]]


def test_plan_copies_local_experts_and_sends_nothing_for_them():
    # Each rank's experts only change slots within the rank.
    old = np.array([[0, 1, 2, 3, 4, 5]])
    new = np.array([[2, 0, 1, 5, 5, 3]])
    plan = _check_plan(old, new, 2)
    assert plan.transfers.size == 0
    assert plan.local_copies.tolist() == [
        [0, 2, 0],
        [0, 0, 1],
        [0, 1, 2],
        [0, 5, 3],
        [0, 5, 4],
        [0, 3, 5],
    ]


@pytest.mark.parametrize("ranks", [3, 5, 8])
def test_plan_spreads_senders_over_replica_holders(ranks):
    # Ranks 0..P-2 hold the same experts 0..S-1; the last rank needs all of them.
    per_rank, layers = 12, 3
    base = np.tile(np.arange(per_rank), ranks - 1)
    old = np.tile(np.concatenate([base, np.arange(per_rank, 2 * per_rank)]), (layers, 1))
    new = np.tile(np.concatenate([base, np.arange(per_rank)]), (layers, 1))
    plan = _check_plan(old, new, ranks)
    for layer in range(layers):
        senders = plan.transfers[plan.transfers[:, 0] == layer, 2]
        counts = np.bincount(senders, minlength=ranks)[: ranks - 1]
        assert counts.max() - counts.min() <= 1, counts
    # Over all layers too: ties rotate instead of always picking the lowest rank.
    totals = np.bincount(plan.transfers[:, 2], minlength=ranks)[: ranks - 1]
    assert totals.max() - totals.min() <= 1, totals


def test_plan_is_a_function_of_the_maps_only():
    rng = np.random.default_rng(3)
    old = _random_placement(rng, 5, 20, 32)
    new = _random_placement(rng, 5, 20, 32)
    reference = plan_rearrangement(old, new, 4)
    variants = [
        (old.astype(np.int32), new.astype(np.uint16)),
        (torch.from_numpy(old), torch.from_numpy(new).to(torch.int32)),
        (np.asfortranarray(old), new[:, ::-1].copy()[:, ::-1]),
    ]
    for a, b in variants:
        other = plan_rearrangement(a, b, 4)
        for name in ("transfers", "local_copies", "post_copies"):
            np.testing.assert_array_equal(getattr(other, name), getattr(reference, name))
    # What rank a sends to rank b is, row for row, what b expects from a.
    t = reference.transfers
    for a in range(4):
        for b in range(4):
            sent = t[t[:, 2] == a]
            received = t[t[:, 4] == b]
            np.testing.assert_array_equal(sent[sent[:, 4] == b], received[received[:, 2] == a])


@pytest.mark.parametrize(
    ("old", "new", "ranks", "error", "match"),
    [
        ([[0, 1, 2, 3]], [[0, 1, 2, 4]], 2, ValueError, "no rank can provide"),
        ([[0, 1, 2, 3]], [[0, 1, 2]], 2, ValueError, "same shape"),
        ([[0, 1, 2, 3]], [[0, 1, 2, -1]], 2, ValueError, ">= 0"),
        ([[0, 1, 2, 3]], [[0, 1, 2, 3]], 3, ValueError, "divide"),
        ([0, 1, 2, 3], [0, 1, 2, 3], 2, ValueError, "2-D"),
        ([[0.0, 1.0]], [[0, 1]], 2, TypeError, "integers"),
    ],
)
def test_plan_refuses_bad_maps(old, new, ranks, error, match):
    with pytest.raises(error, match=match):
        plan_rearrangement(np.array(old), np.array(new), ranks)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ranks=st.sampled_from([2, 3, 4]), budget=st.integers(1, 9))
def test_steps_follow_the_budget_and_keep_every_transfer(seed, ranks, budget):
    rng = np.random.default_rng(seed)
    old = _random_placement(rng, 3, 4 * ranks - 2, 4 * ranks)
    new = _random_placement(rng, 3, 4 * ranks - 2, 4 * ranks)
    plan = plan_rearrangement(old, new, ranks)
    order, step = split_steps(plan, 2, budget)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(plan.transfers)))
    assert (np.diff(step) >= 0).all() and (np.diff(plan.transfers[order, 0]) >= 0).all()
    t = plan.transfers[order]
    for s in np.unique(step):
        at = t[step == s]
        use = np.bincount(np.concatenate([at[:, 2], at[:, 4]]), minlength=ranks) * 2
        assert use.max() <= budget or len(at) == 1
        if s + 1 in step:  # greedy: the next transfer did not fit
            nxt = t[np.argmax(step == s + 1)]
            assert max(use[nxt[2]], use[nxt[4]]) + 2 > budget


@pytest.mark.parametrize("ranks", [2, 4])
def test_steps_use_every_direction_at_once(ranks):
    # Every rank swaps all its experts with the next rank's: each directed pair
    # has the same number of transfers. With a budget of two experts per rank
    # (one sent, one received), every step must carry one transfer of every
    # pair; steps going one way at a time would leave half of each link idle.
    per_rank = 4
    old = np.arange(ranks * per_rank).reshape(1, -1)
    new = np.roll(old, per_rank, axis=1)
    plan = plan_rearrangement(old, new, ranks)
    order, step = split_steps(plan, 1, 2)
    t = plan.transfers[order]
    pairs = {(int(a), int(b)) for a, b in t[:, [2, 4]]}
    assert len(pairs) == ranks
    for s in np.unique(step):
        at = t[step == s]
        assert {(int(a), int(b)) for a, b in at[:, [2, 4]]} == pairs, f"step {s}: {at[:, [2, 4]]}"
    assert step.max() + 1 == per_rank


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    ranks=st.sampled_from([1, 2, 3, 4]),
    per_rank=st.integers(1, 6),
    stacked=st.booleans(),
)
def test_keep_experts_in_place_keeps_the_most_and_changes_no_gpu(seed, ranks, per_rank, stacked):
    rng = np.random.default_rng(seed)
    slots = ranks * per_rank
    experts = max(1, slots - int(rng.integers(0, slots)))
    make = _stacked_placement if stacked and slots - 3 >= experts else _random_placement
    old = make(rng, 3, experts, slots)
    new = _random_placement(rng, 3, experts, slots)
    out = keep_experts_in_place(old, new, ranks)
    kept = 0
    for layer in range(3):
        for rank in range(ranks):
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            # The same experts on each GPU, as often: the same loads.
            assert sorted(out[layer, mine].tolist()) == sorted(new[layer, mine].tolist())
            # As many slots keep their expert as the two multisets share.
            before = collections.Counter(old[layer, mine].tolist())
            after = collections.Counter(new[layer, mine].tolist())
            kept += sum((before & after).values())
    assert int((out == old).sum()) == kept
    np.testing.assert_array_equal(keep_experts_in_place(old, out, ranks), out)  # idempotent
    plan = plan_rearrangement(old, out, ranks)
    assert len(plan.transfers) == len(plan_rearrangement(old, new, ranks).transfers)


@pytest.mark.parametrize(
    ("old", "new", "ranks", "error", "match"),
    [
        ([[0, 1]], [[0, 1, 1]], 1, ValueError, "same shape"),
        ([[0, 1, 2]], [[0, 1, 2]], 2, ValueError, "world size must divide"),
        ([[0, 1]], [[0, 2]], 1, ValueError, "no slot of old_phy2log holds"),
        ([[0.0, 1.0]], [[0, 1]], 1, TypeError, "integers"),
    ],
)
def test_keep_experts_in_place_refuses_bad_maps(old, new, ranks, error, match):
    with pytest.raises(error, match=match):
        keep_experts_in_place(np.array(old), np.array(new), ranks)


def _apply_waves(content: list[int], copies: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Run local_waves' order on slot contents; return them and the slots staged."""
    staged, waves = local_waves(copies)
    staging = [content[s] for s in staged]
    after = list(content)
    for wave in waves:
        values = [staging[-1 - src] if src < 0 else after[src] for src, _ in wave]
        for (_, dst), value in zip(wave, values, strict=True):
            after[dst] = value
    return after, len(staged)


def test_local_waves_copy_directly_without_cycles():
    # A chain 0 -> 1 -> 2 -> 3 and a fan-out 4 -> 5, 6: no staging at all.
    copies = [(0, 1), (1, 2), (2, 3), (4, 5), (4, 6)]
    after, staged = _apply_waves(list(range(7)), copies)
    assert staged == 0
    assert after == [0, 0, 1, 2, 4, 4, 4]


def test_local_waves_stage_one_slot_per_cycle():
    # Two cycles (0 1 2) and (3 4), a tail hanging off the first: two slots staged.
    copies = [(0, 1), (1, 2), (2, 0), (3, 4), (4, 3), (2, 5)]
    after, staged = _apply_waves(list(range(6)), copies)
    assert staged == 2
    assert after == [2, 0, 1, 4, 3, 2]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 12))
def test_local_waves_match_reading_everything_first(seed, size):
    rng = np.random.default_rng(seed)
    destinations = rng.choice(size, rng.integers(0, size + 1), replace=False).tolist()
    copies = [
        (int(src), dst)
        for dst in destinations
        for src in [rng.choice([s for s in range(size) if s != dst] or [dst])]
        if src != dst
    ]
    content = list(range(100, 100 + size))
    want = list(content)
    for src, dst in copies:
        want[dst] = content[src]
    after, staged = _apply_waves(content, copies)
    assert after == want
    # A cycle needs at least one staged slot, and at most one per cycle is used:
    # never more than the copies whose destination is also read.
    read = {src for src, _ in copies}
    assert staged <= sum(dst in read for _, dst in copies)


# ----------------------------------------------------- one rank, no process group


def _assert_holds_bits(weights: list, want: list, message: str = "") -> None:
    """Every tensor of every layer holds exactly ``want``'s bits."""
    for got, expected in zip(_raw(weights), want, strict=True):
        for g, w in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=message)


def test_single_rank_moves_locally_bit_for_bit():
    rng = np.random.default_rng(5)
    old = _random_placement(rng, 3, 6, 8)
    new = _random_placement(rng, 3, 6, 8)
    weights = _weights(_expected(9, old, range(8)), "cpu")
    # Model parameters (leaves that require grad) are rewritten in place as well.
    weights[1] = [torch.nn.Parameter(t, requires_grad=t.is_floating_point()) for t in weights[1]]
    stats = rearrange_expert_weights(torch.from_numpy(old), torch.from_numpy(new), weights)
    _assert_holds_bits(weights, _expected(9, new, range(8)))
    assert stats.bytes_sent == stats.bytes_received == stats.messages_sent == 0
    assert stats.local_copies == int((old != new).sum())


@pytest.mark.parametrize("prepare", [False, True])
def test_single_rank_moves_into_other_tensors_reading_only_the_slots(prepare):
    old, new, weights = _one_rank_case(11, 4)
    new[1] = old[1, ::-1]  # a layer of pure swaps: cycles an in-place move must stage
    before = _raw(weights)
    into = [[torch.zeros_like(t) for t in layer] for layer in weights]
    args = (torch.from_numpy(old), torch.from_numpy(new), weights)
    prepared = prepare_rearrangement(*args, into=into) if prepare else None
    stats = rearrange_expert_weights(*args, into=into, prepared=prepared)
    _assert_holds_bits(weights, before, "the slots are only read")
    want = _expected(4, new, range(8))
    changed = old != new
    for layer, (got, expected) in enumerate(zip(_raw(into), want, strict=True)):
        for g, w in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g[changed[layer]], w[changed[layer]])
            assert not g[~changed[layer]].any()  # slots keeping their expert: not written
    assert stats.local_copies == int(changed.sum())
    # An in-place preparation is another move's: refused.
    with pytest.raises(ValueError, match="prepared was made for other maps"):
        rearrange_expert_weights(*args, into=into, prepared=prepare_rearrangement(*args))


def test_into_must_match_the_weights():
    old, new, weights = _one_rank_case(12, 5)
    before = _raw(weights)
    other_dtype = [
        [t.float() if t.dtype == torch.uint8 else t.clone() for t in layer] for layer in weights
    ]
    fewer = [[torch.zeros_like(t) for t in layer] for layer in weights[:2]]
    args = (torch.from_numpy(old), torch.from_numpy(new), weights)
    for into, error, match in (
        (other_dtype, ValueError, "into must hold the same tensor shapes and dtypes"),
        (fewer, ValueError, "into must have one entry per layer"),
        (weights[0][0], TypeError, "into must be a list"),
    ):
        with pytest.raises(error, match=match):
            prepare_rearrangement(*args, into=into)
        with pytest.raises(error, match=match):
            rearrange_expert_weights(*args, into=into)
        _assert_holds_bits(weights, before)


@pytest.mark.parametrize("enabled_before", [True, False])
@pytest.mark.parametrize("bad", [False, True])
def test_garbage_collector_paused_during_the_call_only(monkeypatch, enabled_before, bad):
    rng = np.random.default_rng(7)
    old = _random_placement(rng, 2, 6, 8)
    new = _random_placement(rng, 2, 6, 8)
    weights = _weights(_expected(3, old, range(8)), "cpu")
    seen = []
    plan = rearrange_module.plan_checked

    def spy(*args):
        seen.append(gc.isenabled())
        return plan(*args)

    monkeypatch.setattr(rearrange_module, "plan_checked", spy)
    budget = 0 if bad else 1 << 20
    try:
        (gc.enable if enabled_before else gc.disable)()
        with pytest.raises(ValueError) if bad else contextlib.nullcontext():
            rearrange_expert_weights(
                torch.from_numpy(old), torch.from_numpy(new), weights, max_batch_bytes=budget
            )
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable()
    assert seen == ([] if bad else [False])


def test_prepared_call_plans_nothing_and_ends_the_same(monkeypatch):
    rng = np.random.default_rng(8)
    old = _random_placement(rng, 3, 6, 8)
    new = _random_placement(rng, 3, 6, 8)
    weights = _weights(_expected(4, old, range(8)), "cpu")
    before = _raw(weights)
    prepared = prepare_rearrangement(torch.from_numpy(old), torch.from_numpy(new), weights)
    assert isinstance(prepared, PreparedRearrangement) and prepared.seconds > 0
    assert (prepared.rank, prepared.world_size) == (0, 1)
    for got, want in zip(_raw(weights), before, strict=True):  # preparing reads no weight
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    planned = []
    plan = rearrange_module.plan_checked
    monkeypatch.setattr(
        rearrange_module, "plan_checked", lambda *args: planned.append(1) or plan(*args)
    )
    stats = rearrange_expert_weights(
        torch.from_numpy(old), torch.from_numpy(new), weights, prepared=prepared
    )
    assert planned == []
    _assert_holds_bits(weights, _expected(4, new, range(8)))
    unprepared = rearrange_expert_weights(torch.from_numpy(new), torch.from_numpy(old), weights)
    assert planned == [1]
    _assert_holds_bits(weights, _expected(4, old, range(8)))
    assert stats.local_copies == unprepared.local_copies == int((old != new).sum())
    # Used again, from the same weights, it ends the same.
    maps = torch.from_numpy(old), torch.from_numpy(new)
    rearrange_expert_weights(*maps, weights, prepared=prepared)
    _assert_holds_bits(weights, _expected(4, new, range(8)))


def test_prepared_views_serve_only_the_tensors_they_were_made_from(monkeypatch):
    rng = np.random.default_rng(11)
    old = _random_placement(rng, 3, 6, 8)
    new = _random_placement(rng, 3, 6, 8)
    weights = _weights(_expected(7, old, range(8)), "cpu")
    maps = torch.from_numpy(old), torch.from_numpy(new)
    prepared = prepare_rearrangement(*maps, weights)
    made = []
    original = SlotWork.__init__

    def counting(self, *args, **kwargs):
        made.append(kwargs.get("ahead"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(SlotWork, "__init__", counting)
    # Other tensors of the same shapes (a reloaded copy): the plan serves, the
    # views are made anew, and the prepared tensors stay as they were.
    copy = _weights(_expected(7, old, range(8)), "cpu")
    rearrange_expert_weights(*maps, copy, prepared=prepared)
    assert made == [False]
    _assert_holds_bits(copy, _expected(7, new, range(8)))
    _assert_holds_bits(weights, _expected(7, old, range(8)))
    # The very tensors: their prepared views serve, none are made.
    rearrange_expert_weights(*maps, weights, prepared=prepared)
    assert made == [False]
    _assert_holds_bits(weights, _expected(7, new, range(8)))
    # The same tensor objects with new memory since: the views are made anew.
    rearrange_expert_weights(maps[1], maps[0], weights)
    weights[0][0].data = weights[0][0].data.clone()
    made.clear()
    rearrange_expert_weights(*maps, weights, prepared=prepared)
    assert made == [False]
    _assert_holds_bits(weights, _expected(7, new, range(8)))


def test_prepared_for_another_call_is_refused_before_any_weight_is_touched():
    rng = np.random.default_rng(9)
    old = _random_placement(rng, 2, 6, 8)
    new = _random_placement(rng, 2, 6, 8)
    weights = _weights(_expected(5, old, range(8)), "cpu")
    maps = torch.from_numpy(old), torch.from_numpy(new)
    prepared = prepare_rearrangement(*maps, weights, max_batch_bytes=1 << 20)
    other_maps = prepare_rearrangement(maps[0], maps[0], weights)
    other_shapes = prepare_rearrangement(*maps, [layer[:1] + layer[2:] for layer in weights])
    refused = [
        ({"prepared": object()}, TypeError, "prepared must be a PreparedRearrangement"),
        ({"prepared": prepared}, ValueError, "max_batch_bytes=1048576, this call has"),
        ({"prepared": other_maps}, ValueError, "other maps or other expert_weights"),
        ({"prepared": other_shapes}, ValueError, "other maps or other expert_weights"),
    ]
    for kwargs, kind, match in refused:
        with pytest.raises(kind, match=match):
            rearrange_expert_weights(*maps, weights, **kwargs)
        _assert_holds_bits(weights, _expected(5, old, range(8)))


def test_prepare_refuses_bad_input_like_the_call():
    rng = np.random.default_rng(10)
    old = _random_placement(rng, 2, 6, 8)
    weights = _weights(_expected(6, old, range(8)), "cpu")
    for kwargs, kind in [
        ({"new_phy2log": torch.from_numpy(old + 100)}, ValueError),
        ({"new_phy2log": torch.from_numpy(old).float()}, TypeError),
        ({"max_batch_bytes": 0}, ValueError),
        ({"expert_weights": weights[:1]}, ValueError),
    ]:
        args = {
            "old_phy2log": torch.from_numpy(old),
            "new_phy2log": torch.from_numpy(old),
            "expert_weights": weights,
        } | kwargs
        with pytest.raises(kind):
            prepare_rearrangement(**args)
        with pytest.raises(kind):
            rearrange_expert_weights(**args)


def _bad_calls(old: np.ndarray, new: np.ndarray, weights: list) -> list[tuple[str, dict, type]]:
    """(rule, keyword arguments of a refused call, exception type)."""
    good = {
        "old_phy2log": torch.from_numpy(old),
        "new_phy2log": torch.from_numpy(new),
        "expert_weights": weights,
    }
    wrong_first_dim = [list(layer) for layer in weights]
    wrong_first_dim[1][2] = torch.zeros(5, 2, 3, dtype=torch.uint8)
    other_dtype = [list(layer) for layer in weights]
    other_dtype[2][1] = other_dtype[2][1].float()
    missing = new.copy()
    missing[0, 0] = 99
    return [
        ("missing expert", {**good, "new_phy2log": torch.from_numpy(missing)}, ValueError),
        ("negative id", {**good, "old_phy2log": torch.from_numpy(old - 1)}, ValueError),
        ("float map", {**good, "old_phy2log": torch.from_numpy(old).float()}, TypeError),
        ("shape mismatch", {**good, "new_phy2log": torch.from_numpy(new[:, :4])}, ValueError),
        ("layer count", {**good, "expert_weights": weights[:2]}, ValueError),
        ("first dimension", {**good, "expert_weights": wrong_first_dim}, ValueError),
        ("dtype differs between layers", {**good, "expert_weights": other_dtype}, ValueError),
        ("not a list", {**good, "expert_weights": weights[0][0]}, TypeError),
        ("budget", {**good, "max_batch_bytes": 0}, ValueError),
        ("group without torch.distributed", {**good, "group": object()}, ValueError),
    ]


def _one_rank_case(seed: int, content: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Two random placements of 3 layers, 6 experts, 8 slots, and weights holding the first."""
    rng = np.random.default_rng(seed)
    old = _random_placement(rng, 3, 6, 8)
    new = _random_placement(rng, 3, 6, 8)
    return old, new, _weights(_expected(content, old, range(8)), "cpu")


def test_single_rank_refuses_bad_input_and_touches_nothing():
    old, new, weights = _one_rank_case(6, 1)
    before = _raw(weights)
    for rule, kwargs, error in _bad_calls(old, new, weights):
        with pytest.raises(error):
            rearrange_expert_weights(**kwargs)
        _assert_holds_bits(weights, before, rule)


def test_buffers_are_checked_before_anything_moves():
    old, new, weights = _one_rank_case(8, 4)
    before = _raw(weights)
    maps = torch.from_numpy(old), torch.from_numpy(new)
    with RearrangeBuffers() as buffers:
        assert not buffers.registered  # no process group: nothing to register with
        with pytest.raises(TypeError, match="buffers must be a RearrangeBuffers"):
            rearrange_expert_weights(*maps, weights, buffers=object())
        with pytest.raises(ValueError, match="another process group"):
            rearrange_expert_weights(*maps, weights, group=None, buffers=_other_group())
    assert buffers.closed
    buffers.close()  # twice is fine
    with pytest.raises(ValueError, match="buffers was closed"):
        rearrange_expert_weights(*maps, weights, buffers=buffers)
    _assert_holds_bits(weights, before)
    # An open one moves the weights as without it.
    with RearrangeBuffers() as buffers:
        rearrange_expert_weights(*maps, weights, buffers=buffers)
    _assert_holds_bits(weights, _expected(4, new, range(8)))


def _other_group() -> RearrangeBuffers:
    """The same buffers, claiming another group (the check compares identity only)."""
    other = RearrangeBuffers()
    other.group = object()  # type: ignore[assignment]
    return other


def test_single_rank_handles_odd_offsets_and_strides():
    # Slots that start at odd byte offsets or are not dense still move exactly.
    rng = np.random.default_rng(8)
    old = _random_placement(rng, 2, 5, 6)
    new = _random_placement(rng, 2, 5, 6)
    storage = torch.from_numpy(rng.integers(0, 256, size=(2, 6 * 10 + 1), dtype=np.uint8))
    odd = [storage[layer, 1:].view(6, 10) for layer in range(2)]  # offset 1: no wide words
    wide = torch.from_numpy(rng.integers(-(2**31), 2**31, size=(2, 6, 8), dtype=np.int32))
    every_other = [wide[layer, :, ::2] for layer in range(2)]  # not dense
    weights = [[odd[layer], every_other[layer]] for layer in range(2)]
    before = [[t.clone() for t in layer] for layer in weights]
    rearrange_expert_weights(old, new, weights)
    for layer in range(2):
        for t in range(2):
            for slot in range(6):
                source = int(np.nonzero(old[layer] == new[layer, slot])[0][0])
                assert torch.equal(weights[layer][t][slot], before[layer][t][source])


# ------------------------------------------------ multi-process gloo scenarios


@dataclass
class Scenario:
    """One call of rearrange_expert_weights in one group; ``fault`` breaks it on purpose."""

    name: str
    ranks: int
    old: np.ndarray
    new: np.ndarray
    seed: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    fault: str = ""


def _scenarios() -> list[Scenario]:
    found = []
    for ranks in (2, 4, 8):
        rng = np.random.default_rng(ranks)
        per_rank, layers = 6, 4
        slots = ranks * per_rank
        experts = slots - ranks - 1
        # Several replicas of one expert on one rank, before (rank 0) and after (rank 1).
        old = _stacked_placement(rng, layers, experts, slots)
        new = np.roll(_stacked_placement(rng, layers, experts, slots), per_rank, axis=1)
        stacked = _random_placement(rng, layers, experts, slots)
        permuted = np.stack([rng.permutation(row) for row in old])
        found += [
            Scenario(f"random-{ranks}", ranks, old, new, seed=ranks),
            Scenario(f"unchanged-{ranks}", ranks, old, old.copy(), seed=ranks + 1),
            Scenario(f"permutation-{ranks}", ranks, old, permuted, seed=ranks + 2),
            Scenario(f"rotate-{ranks}", ranks, old, np.roll(old, per_rank, axis=1), seed=3),
            Scenario(
                f"tiny-budget-{ranks}", ranks, stacked, new, ranks + 4, {"max_batch_bytes": 1}
            ),
            Scenario(f"missing-expert-{ranks}", ranks, old, new, 5, fault="missing expert"),
            Scenario(f"first-dim-one-rank-{ranks}", ranks, old, new, 6, fault="first dim"),
            Scenario(f"maps-differ-{ranks}", ranks, old, new, 7, fault="maps differ"),
            Scenario(f"fails-midway-{ranks}", ranks, old, new, 8, {"max_batch_bytes": 1}, "midway"),
            # Rank 1 alone fails after its last step's messages, some layers written.
            *([_fails_alone(stacked, new, per_rank)] if ranks == 2 else []),
            # Three calls (there, back, there again) through one RearrangeBuffers.
            Scenario(f"kept-buffers-{ranks}", ranks, old, new, 9, {"buffers": True}),
            # Every rank but the last prepares its share ahead (ranks may mix).
            Scenario(f"prepared-{ranks}", ranks, old, new, 10, {"prepared": True}),
            Scenario(
                f"prepared-tiny-budget-{ranks}",
                ranks,
                stacked,
                new,
                11,
                {"prepared": True, "max_batch_bytes": 1},
            ),
            # Rank 1 prepared a move to other maps than the call's.
            Scenario(f"prepared-other-maps-{ranks}", ranks, old, new, 12, fault="prepared"),
        ]
    return found


def _fails_alone(old: np.ndarray, new: np.ndarray, per_rank: int) -> Scenario:
    """Rank 1 fails alone after its last messages; its last steps' writes never run.

    The last layer changes little (two slots swap ranks), so its writes all fall
    in the last steps: it stays unwritten while earlier layers changed, and a
    report naming one layer too many or too few is caught.
    """
    new = new.copy()
    new[-1] = old[-1]
    new[-1, [0, per_rank]] = old[-1, [per_rank, 0]]
    return Scenario("fails-alone-2", 2, old, new, 13, {"max_batch_bytes": 1}, "alone")


SCENARIOS = {s.name: s for s in _scenarios()}


def _run_scenario(scenario: Scenario, group: Any, rank: int, device: str) -> dict[str, Any]:
    """Run one scenario on this rank (group rank ``rank``) and report what happened."""
    per_rank = scenario.old.shape[1] // scenario.ranks
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    # In the random scenarios odd ranks store every tensor densely, the others
    # not: ranks whose tensors differ in strides must still agree on the bytes.
    strided = not (scenario.name.startswith("random") and rank % 2)
    weights = _weights(_expected(scenario.seed, scenario.old, mine), device, strided)
    old, new = scenario.old.copy(), scenario.new.copy()
    if scenario.fault == "missing expert":
        new[2, 0] = old.max() + 1
    if scenario.fault == "first dim" and rank == 1:
        weights[3][0] = torch.zeros(per_rank + 1, 4, 6, device=device)
    if scenario.fault == "maps differ" and rank == scenario.ranks - 1:
        new[1] = old[1]
    result: dict[str, Any] = {"error": None, "stats": None}
    kwargs = dict(scenario.kwargs)
    buffers = None
    if kwargs.pop("buffers", False):
        # For the whole world, the buffers name it while the calls pass None.
        owner = dist.group.WORLD if group is None else group
        buffers = RearrangeBuffers(owner, device if device != "cpu" else None)
        result["registered"] = buffers.registered
        for there, back in ((old, new), (new, old)):
            rearrange_expert_weights(
                torch.from_numpy(there), torch.from_numpy(back), weights, group, buffers=buffers
            )
        kwargs["buffers"] = buffers
    if kwargs.pop("prepared", False) and rank < scenario.ranks - 1:
        kwargs["prepared"] = prepare_rearrangement(
            torch.from_numpy(old), torch.from_numpy(new), weights, group, **kwargs
        )
    if scenario.fault == "prepared" and rank == 1:
        kwargs["prepared"] = prepare_rearrangement(
            torch.from_numpy(old), torch.from_numpy(old), weights, group
        )
    original = TorchDistributedTransport.post
    original_wait = TorchDistributedTransport.wait
    if scenario.fault == "alone" and rank == 1:
        steps = prepare_rearrangement(
            torch.from_numpy(old), torch.from_numpy(new), weights, group, **kwargs
        ).num_steps
        waits = []

        def failing_wait(self, pending):
            # The last step's messages complete (rank 0 finishes), then this rank
            # fails before its last writes: some layers written, others not.
            original_wait(self, pending)
            waits.append(1)
            if len(waits) == steps:
                raise RuntimeError("injected failure on rank 1 alone")

        TorchDistributedTransport.wait = failing_wait  # type: ignore[method-assign]
    if scenario.fault == "midway":
        calls = []

        def failing(self, *args, **kwargs):
            # Every rank fails once the second step's messages are posted, after
            # the first step's packs only. The messages in flight are drained
            # first, so the group stays usable.
            works = original(self, *args, **kwargs)
            calls.append(works)
            if len(calls) == 2:  # the first step's works were waited (twice hangs gloo)
                self.wait(works)
                raise RuntimeError("injected transport failure")
            return works

        TorchDistributedTransport.post = failing  # type: ignore[method-assign]
    try:
        stats = rearrange_expert_weights(
            torch.from_numpy(old).to(device),
            torch.from_numpy(new),
            weights,
            group,
            **kwargs,
        )
        result["stats"] = stats.__dict__
    except Exception as exc:
        result["error"] = (type(exc).__name__, str(exc))
        if isinstance(exc, RearrangeError):
            result["layers"] = (exc.layers_new, exc.layers_old, exc.layers_mixed)
    finally:
        TorchDistributedTransport.post = original  # type: ignore[method-assign]
        TorchDistributedTransport.wait = original_wait  # type: ignore[method-assign]
        if buffers is not None:
            buffers.close()
    result["weights"] = _raw(weights)
    return result


def _worker(rank: int, store_path: str, out_dir: str, backend: str, names: list[str]) -> None:
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    world = len(GROUPS[max(GROUPS)]) if backend == "gloo" else 2
    store = dist.FileStore(store_path, world)
    # A bug that leaves a message unmatched then fails the test instead of hanging CI.
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    # The end's barrier: a failed move aborts its NCCL group, the world included.
    sync = dist.new_group(backend="gloo")
    # Every rank creates every group, in the same order, as new_group requires.
    groups = {n: dist.new_group(r) if n < world else None for n, r in GROUPS.items() if n <= world}
    for n, group in groups.items():  # every pair opens its channels before moving
        if rank in GROUPS[n]:
            assert warmup_rearrangement(group) > 0.0
    results = {}
    for name in names:
        scenario = SCENARIOS[name]
        members = GROUPS[scenario.ranks]
        if rank in members:
            group = groups[scenario.ranks]
            results[name] = _run_scenario(scenario, group, members.index(rank), device)
        if scenario.fault in ("midway", "alone"):
            # A move that failed once it began faults its group (its messages may
            # be stale): every rank makes a new one, as new_group requires.
            groups[scenario.ranks] = dist.new_group(members)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier(group=sync)
    if backend == "nccl":
        os._exit(0)  # an aborted NCCL group cannot be torn down cleanly
    dist.destroy_process_group()


def _spawn(tmp: Path, backend: str, names: list[str], nprocs: int) -> dict[str, dict[int, Any]]:
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp), backend, names), nprocs=nprocs, join=True)
    by_scenario: dict[str, dict[int, Any]] = {}
    for rank in range(nprocs):
        for name, result in torch.load(tmp / f"rank{rank}.pt", weights_only=False).items():
            members = GROUPS[SCENARIOS[name].ranks]
            by_scenario.setdefault(name, {})[members.index(rank)] = result
    return by_scenario


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory) -> dict[str, dict[int, Any]]:
    """Every scenario, run once in one spawned group of 8 (sub-groups of 2 and 4)."""
    return _spawn(tmp_path_factory.mktemp("gloo"), "gloo", list(SCENARIOS), WORLD)


def _assert_holds(scenario: Scenario, results: dict[int, Any], phy2log: np.ndarray) -> None:
    per_rank = phy2log.shape[1] // scenario.ranks
    for rank in range(scenario.ranks):
        want = _expected(scenario.seed, phy2log, range(rank * per_rank, (rank + 1) * per_rank))
        got = results[rank]["weights"]
        for layer in range(phy2log.shape[0]):
            for tensor in range(len(TENSORS)):
                np.testing.assert_array_equal(
                    got[layer][tensor], want[layer][tensor], err_msg=f"rank {rank} layer {layer}"
                )


GOOD = [n for n, s in SCENARIOS.items() if not s.fault]


@pytest.mark.parametrize("name", GOOD)
def test_every_slot_holds_its_new_expert_bit_for_bit(gloo_results, name):
    scenario = SCENARIOS[name]
    results = gloo_results[name]
    assert [results[r]["error"] for r in range(scenario.ranks)] == [None] * scenario.ranks
    _assert_holds(scenario, results, scenario.new)


@pytest.mark.parametrize("name", GOOD)
def test_stats_match_the_plan(gloo_results, name):
    scenario = SCENARIOS[name]
    plan = plan_rearrangement(scenario.old, scenario.new, scenario.ranks)
    stats = [gloo_results[name][r]["stats"] for r in range(scenario.ranks)]
    t = plan.transfers
    per_rank = plan.slots_per_rank
    for rank, s in enumerate(stats):
        assert s["experts_sent"] == (t[:, 2] == rank).sum()
        assert s["experts_received"] == (t[:, 4] == rank).sum()
        copies = np.concatenate([plan.local_copies[:, 2], plan.post_copies[:, 2]])
        assert s["local_copies"] == (copies // per_rank == rank).sum()
        # At most one message per peer per batch, and none to itself.
        peers_per_batch = s["batches"] * (scenario.ranks - 1)
        assert s["messages_sent"] <= peers_per_batch and s["messages_received"] <= peers_per_batch
    assert sum(s["bytes_sent"] for s in stats) == sum(s["bytes_received"] for s in stats)
    assert sum(s["messages_sent"] for s in stats) == sum(s["messages_received"] for s in stats)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_kept_buffers_on_gloo_are_plain(gloo_results, ranks):
    # Three calls through one RearrangeBuffers ended exact (above); on the CPU
    # nothing is registered.
    assert [r["registered"] for r in gloo_results[f"kept-buffers-{ranks}"].values()] == [
        False
    ] * ranks


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_no_change_moves_nothing(gloo_results, ranks):
    for result in gloo_results[f"unchanged-{ranks}"].values():
        stats = result["stats"]
        assert stats["bytes_sent"] == stats["bytes_received"] == stats["local_copies"] == 0
        assert stats["messages_sent"] == stats["messages_received"] == 0


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_rotation_receives_exactly_what_is_missing(gloo_results, ranks):
    # Every rank takes over its left neighbour's slots: it receives, once each, the
    # neighbour's experts it did not hold, all from that neighbour (the only holder
    # unless replicas elsewhere share the work).
    scenario = SCENARIOS[f"rotate-{ranks}"]
    per_rank = scenario.old.shape[1] // ranks
    for rank, result in gloo_results[scenario.name].items():
        missing = 0
        for row in scenario.old:
            held = set(row[rank * per_rank : (rank + 1) * per_rank].tolist())
            left = (rank - 1) % ranks
            wanted = set(row[left * per_rank : (left + 1) * per_rank].tolist())
            missing += len(wanted - held)
        assert result["stats"]["experts_received"] == missing


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_tiny_budget_gives_one_step_per_transfer(gloo_results, ranks):
    # A budget below one expert: layers span many steps, results still exact (above).
    scenario = SCENARIOS[f"tiny-budget-{ranks}"]
    t = plan_rearrangement(scenario.old, scenario.new, ranks).transfers
    for rank, result in gloo_results[scenario.name].items():
        assert result["error"] is None
        assert result["stats"]["batches"] == ((t[:, 2] == rank) | (t[:, 4] == rank)).sum()


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize(
    ("fault", "faulty_rank", "own_match", "others_match"),
    [
        ("missing-expert", None, "no rank can provide", "no rank can provide"),
        ("first-dim-one-rank", 1, "first dimension", r"rank\(s\) \[1\] .* refused"),
        ("maps-differ", None, "differ", "differ"),
        ("prepared-other-maps", 1, "prepared was made for other maps", r"rank\(s\) \[1\]"),
    ],
)
def test_bad_input_is_refused_everywhere_and_touches_nothing(
    gloo_results, ranks, fault, faulty_rank, own_match, others_match
):
    scenario = SCENARIOS[f"{fault}-{ranks}"]
    results = gloo_results[scenario.name]
    for rank in range(ranks):
        kind, message = results[rank]["error"]
        # A rank refusing its own input raises its ValueError; the others an
        # AgreementError (a ValueError) naming it or the argument that differs.
        own = rank == faulty_rank or fault == "missing-expert"
        assert kind == ("ValueError" if own else "AgreementError"), (rank, kind, message)
        assert re.search(own_match if rank == faulty_rank else others_match, message), message
    _assert_untouched(scenario, results)


def _assert_untouched(scenario: Scenario, results: dict[int, Any]) -> None:
    per_rank = scenario.old.shape[1] // scenario.ranks
    for rank in range(scenario.ranks):
        want = _expected(scenario.seed, scenario.old, range(rank * per_rank, (rank + 1) * per_rank))
        for layer, tensors in enumerate(results[rank]["weights"]):
            for tensor, got in enumerate(tensors):
                if got.shape == want[layer][tensor].shape:  # the faulty rank's extra tensor
                    np.testing.assert_array_equal(got, want[layer][tensor])


def _assert_layers(result: dict[str, Any], seed: int, old, new, mine: range) -> None:
    """The layers a RearrangeError names new hold the new experts, those named old the old."""
    named_new, named_old, _ = result["layers"]
    for layers, phy2log in ((named_new, new), (named_old, old)):
        want = _expected(seed, phy2log, mine)
        for layer in layers:
            for tensor, got in enumerate(result["weights"][layer]):
                np.testing.assert_array_equal(got, want[layer][tensor], err_msg=f"layer {layer}")


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_failure_midway_names_the_changed_layers(gloo_results, ranks):
    scenario = SCENARIOS[f"fails-midway-{ranks}"]
    per_rank = scenario.old.shape[1] // ranks
    for rank, result in gloo_results[scenario.name].items():
        kind, message = result["error"]
        assert kind == "RearrangeError" and "injected transport failure" in message, (rank, message)
        named_new, named_old, mixed = result["layers"]
        # One transfer per step: the failure came before layers 2 and 3 were started.
        assert {2, 3} <= set(named_old)
        assert sorted(named_new + named_old + mixed) == list(range(scenario.old.shape[0]))
        mine = range(rank * per_rank, (rank + 1) * per_rank)
        _assert_layers(result, scenario.seed, scenario.old, scenario.new, mine)


def test_rank_failing_alone_names_exactly_the_layers_it_changed(gloo_results):
    scenario = SCENARIOS["fails-alone-2"]
    results = gloo_results[scenario.name]
    per_rank = scenario.old.shape[1] // 2
    layers = list(range(scenario.old.shape[0]))
    # Rank 0 finished its share, then learnt of rank 1's failure: one outcome,
    # every one of its layers new (those it never writes count as old).
    kind, message = results[0]["error"]
    assert kind == "RearrangeError" and "injected failure on rank 1 alone" in message
    new0, old0, mixed0 = results[0]["layers"]
    assert mixed0 == () and sorted(new0 + old0) == layers
    _assert_layers(results[0], scenario.seed, scenario.old, scenario.new, range(per_rank))
    for layer, tensors in enumerate(_expected(scenario.seed, scenario.new, range(per_rank))):
        for got0, want0 in zip(results[0]["weights"][layer], tensors, strict=True):
            np.testing.assert_array_equal(got0, want0)
    kind, message = results[1]["error"]
    assert kind == "RearrangeError" and "injected failure on rank 1 alone" in message
    named_new, named_old, mixed = results[1]["layers"]
    mine = range(per_rank, 2 * per_rank)
    _assert_layers(results[1], scenario.seed, scenario.old, scenario.new, mine)
    old = _expected(scenario.seed, scenario.old, mine)
    got = results[1]["weights"]
    changed = {
        layer
        for layer in layers
        if any(not np.array_equal(g, w) for g, w in zip(got[layer], old[layer], strict=True))
    }
    # The weights, not the message alone: the layers named changed are exactly
    # those whose bytes differ from before, and the move stopped part way.
    assert set(named_new) | set(mixed) == changed and changed
    assert layers[-1] in named_old  # the last layer's writes never ran


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_two_gpus(tmp_path):
    names = [n for n in SCENARIOS if n.endswith("-2") and "first-dim" not in n and "alone" not in n]
    results = _spawn(tmp_path, "nccl", names, 2)
    for name in names:
        errors = [results[name][r]["error"] for r in range(2)]
        if SCENARIOS[name].fault == "midway":
            assert [kind for kind, _ in errors] == ["RearrangeError"] * 2
        elif SCENARIOS[name].fault:
            assert {kind for kind, _ in errors} <= {"ValueError", "AgreementError"}
    for name in (n for n in names if not SCENARIOS[n].fault):
        _assert_holds(SCENARIOS[name], results[name], SCENARIOS[name].new)
    # Kept buffers come from a pool registered with NCCL.
    assert [results["kept-buffers-2"][r]["registered"] for r in range(2)] == [True, True]


def test_sender_ties_go_to_the_lowest_rank_among_holders():
    # 4 ranks of 2 slots; experts 0 and 1 are held by ranks 0 and 1 alike.
    old = np.array([[0, 1, 0, 1, 2, 3, 2, 3]])
    new = old.copy()
    new[0, 4] = 0  # rank 2 needs expert 0: ranks 0 and 1 tie (no sends yet): rank 0
    new[0, 6] = 1  # rank 3 needs expert 1: rank 0 has sent one, rank 1 none: rank 1
    t = plan_rearrangement(old, new, 4).transfers
    assert sorted((int(e), int(src)) for e, src in t[:, [1, 2]]) == [(0, 0), (1, 1)]
    # Every holder tied on both counts: the lowest rank, whatever the expert.
    for holders in ([1, 2], [0, 3], [2, 3]):
        old = np.array([[5, 6, 5, 6, 5, 6, 5, 6]])
        for rank in holders:
            old[0, 2 * rank] = 7
        new = old.copy()
        receiver = min(set(range(4)) - set(holders))
        new[0, 2 * receiver] = 7
        t = plan_rearrangement(old, new, 4).transfers
        assert t[:, 2].tolist() == [min(holders)], holders


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)],
)
def test_canary_of_expert_ids_arrives_as_the_new_map_says(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # A tiny tensor per slot holding its expert id travels with the weights.
    rng = np.random.default_rng(21)
    old = _random_placement(rng, 4, 10, 12)
    new = _random_placement(rng, 4, 10, 12)
    weights = _weights(_expected(21, old, range(12)), device)
    canary = [torch.from_numpy(row.copy()).to(device) for row in old]
    for layer, tensors in enumerate(weights):
        tensors.append(canary[layer])
    rearrange_expert_weights(torch.from_numpy(old), torch.from_numpy(new), weights)
    got = np.stack([weights[layer][-1].cpu().numpy() for layer in range(4)])
    np.testing.assert_array_equal(got, new)
