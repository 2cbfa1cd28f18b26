"""In-place slot moves (``production/slot_moves.py``): the planner's program moves every
slot's new expert from a slot or staging row that holds it, in an order that reads every slot
before it is overwritten, lines up with the rearrangement plan's local/remote choice, and its
execution gives exactly the gather of the new placement; the Triton kernel matches on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eplb.production import plan_rearrangement
from eplb.production.slot_moves import (
    FROM_SAVED,
    FROM_SLOT,
    FROM_STAGING,
    SlotMoves,
    apply_slot_moves,
    plan_slot_moves,
    triton_available,
)


@st.composite
def placements(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """Old and new rows of one layer (replicas, unchanged slots, cycles) and a world size."""
    world = draw(st.integers(1, 4))
    per_rank = draw(st.integers(1, 9))
    slots = world * per_rank
    experts = draw(st.integers(1, slots))
    extra = draw(st.lists(st.integers(0, experts - 1), min_size=slots - experts,
                          max_size=slots - experts))  # fmt: skip
    old = np.array(draw(st.permutations(list(range(experts)) + extra)), dtype=np.int64)
    new = old.copy()
    moved = draw(st.lists(st.integers(0, slots - 1), unique=True))
    new[moved] = [draw(st.integers(0, experts - 1)) for _ in moved]
    if draw(st.booleans()):  # also a permutation of some slots: cycles
        chosen = draw(st.lists(st.integers(0, slots - 1), unique=True))
        new[chosen] = new[draw(st.permutations(chosen))]
    return old, new, world


def _execute(program: SlotMoves, old_rows: torch.Tensor, staging: torch.Tensor) -> torch.Tensor:
    out = old_rows.clone()
    apply_slot_moves(out, staging, program)
    return out


def _check_order(program: SlotMoves, changed: np.ndarray) -> None:
    """Each changed slot written once, no unchanged slot written; no slot read after its write."""
    written = program.ops[:, 0].tolist()
    assert sorted(written) == np.flatnonzero(changed).tolist()
    for start, length, saved in program.components.tolist():
        assert length >= 1
        done: set[int] = set()
        for k, (dst, kind, index) in enumerate(program.ops[start : start + length].tolist()):
            if kind == FROM_SLOT:
                assert index not in done, "a slot is read after it was overwritten"
            elif kind == FROM_SAVED:
                assert index == saved and k == length - 1
            done.add(dst)
        if saved >= 0:
            assert program.ops[start + length - 1, 1] == FROM_SAVED
    lengths = program.components[:, 1].tolist()
    assert lengths == sorted(lengths, reverse=True)


@given(placements(), st.integers(0, 2**31 - 1))
def test_program_moves_the_new_experts_in_a_safe_order(case, seed):
    old, new, world = case
    per_rank = old.size // world
    plan = plan_rearrangement(old[None], new[None], world)
    generator = torch.Generator().manual_seed(seed)
    for rank in range(world):
        base = rank * per_rank
        mine_old, mine_new = old[base : base + per_rank], new[base : base + per_rank]
        changed = mine_old != mine_new
        program = plan_slot_moves(old, new, rank, world)
        _check_order(program, changed)

        # Each slot gets its new expert: from an old local slot holding it (one that keeps
        # its expert where there is one), or from the staging row of its expert.
        kinds = dict.fromkeys(range(per_rank), -1)
        for dst, kind, index in program.ops.tolist():
            kinds[dst] = kind
            if kind == FROM_STAGING:
                assert mine_new[index] == mine_new[dst]
                assert index in program.received.tolist()
            else:
                assert mine_old[index] == mine_new[dst]
                keepers = np.flatnonzero(~changed & (mine_old == mine_new[dst]))
                if keepers.size:
                    assert index == keepers[0]

        # Lines up with the rearrangement plan: the same slots local and remote, staging
        # rows are the slots its transfers fill (post copies read those).
        local = {int(d) - base for _, _, d in plan.local_copies if base <= d < base + per_rank}
        into = plan.transfers[plan.transfers[:, 4] == rank]
        received = sorted(int(d) - base for d in into[:, 5])
        post = {
            int(d) - base: int(s) - base
            for _, s, d in plan.post_copies
            if base <= d < base + per_rank
        }
        assert {d for d, k in kinds.items() if k in (FROM_SLOT, FROM_SAVED)} == local
        assert program.received.tolist() == received
        staged = {int(d): int(i) for d, k, i in program.ops.tolist() if k == FROM_STAGING}
        assert staged == {**{r: r for r in received}, **post}

        # Executed, the program is the gather of its sources; with rows that encode the
        # expert (replicas alike), the result is the new placement's weights.
        rows = torch.randn(per_rank, 3, generator=generator)
        staging = torch.randn(per_rank, 3, generator=generator)
        sources = torch.from_numpy(program.sources())
        gathered = torch.where(
            (sources >= 0)[:, None], rows[sources.clamp(min=0)], staging[(-1 - sources).clamp(0)]
        )
        assert torch.equal(_execute(program, rows, staging), gathered)
        code = torch.from_numpy(mine_old).double()[:, None] * torch.tensor([1.0, -2.0])
        wanted = torch.from_numpy(mine_new).double()[:, None] * torch.tensor([1.0, -2.0])
        assert torch.equal(_execute(program, code, wanted), wanted)


def test_cycles_chains_and_replicas_by_hand():
    # One rank: slots 0..2 a 3-cycle, slot 3 reads slot 0 (a tree on the cycle), slots 4 and
    # 5 read slot 6, which keeps its expert (two components of one move), slot 7 unchanged.
    old = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    new = np.array([1, 2, 0, 0, 6, 6, 6, 7])
    program = plan_slot_moves(old, new, 0, 1)
    assert program.components.tolist() == [[0, 4, 0], [4, 1, -1], [5, 1, -1]]
    assert program.ops.tolist() == [
        [3, FROM_SLOT, 0],  # the tree first, while slot 0 still holds expert 0
        [0, FROM_SLOT, 1],
        [1, FROM_SLOT, 2],
        [2, FROM_SAVED, 0],
        [4, FROM_SLOT, 6],
        [5, FROM_SLOT, 6],
    ]
    # Two ranks: rank 1 needs expert 0 twice (one staging row, its lowest slot) and
    # expert 2 from its own slot 3 (local 1).
    old = np.array([0, 1, 2, 3, 4, 2, 6, 7])
    new = np.array([0, 1, 2, 3, 0, 2, 0, 7])
    program = plan_slot_moves(old, new, 1, 2)
    assert program.received.tolist() == [0]
    assert sorted(program.ops.tolist()) == [[0, FROM_STAGING, 0], [2, FROM_STAGING, 0]]
    assert plan_slot_moves(old, new, 0, 2).ops.shape == (0, 3)


def test_a_whole_permutation_is_one_cycle_and_exact_in_every_dtype():
    slots = 9
    old = np.arange(slots)
    new = np.roll(old, 1)
    program = plan_slot_moves(old, new, 0, 1)
    assert program.components.tolist() == [[0, slots, 0]]
    dtypes = [torch.bfloat16, torch.float32, torch.int8, torch.complex64]
    dtypes += [torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else []
    for dtype in dtypes:
        bits = torch.randint(-100, 100, (slots, 5, 6)).to(torch.float32)
        layer = bits.to(dtype)
        want = layer[torch.from_numpy(program.sources())]
        apply_slot_moves(layer, None, program)
        assert torch.equal(layer.view(torch.uint8), want.view(torch.uint8)), dtype
    # Slots that are not one dense block (a transposed view) move through the same path.
    base = torch.randn(slots, 6, 5)
    layer = base.transpose(1, 2)
    want = layer[torch.from_numpy(program.sources())].clone()
    apply_slot_moves(layer, None, program)
    assert torch.equal(layer, want)


@pytest.mark.parametrize(
    ("args", "error", "names"),
    [
        (("x", [0], 0, 1), TypeError, "old_phy2log"),
        (([0], [0.5], 0, 1), TypeError, "new_phy2log"),
        (([[0]], [[0]], 0, 1), ValueError, "old_phy2log"),
        (([0, 1], [0], 0, 1), ValueError, "same length"),
        (([0, -1], [0, 0], 0, 1), ValueError, "old_phy2log"),
        (([0, 1, 2], [0, 1, 2], 0, 2), ValueError, "world_size"),
        (([0, 1], [0, 1], 2, 2), ValueError, "rank"),
        (([0, 1], [0, 1], 0, 1.0), TypeError, "world_size"),
        (([0, 1], [0, 3], 0, 1), ValueError, "new_phy2log holds expert 3"),
    ],
)
def test_bad_rows_are_refused_by_name(args, error, names):
    with pytest.raises(error, match=names):
        plan_slot_moves(*args)


def test_bad_tensors_are_refused_by_name():
    program = plan_slot_moves([0, 1, 2, 3], [0, 1, 0, 0], 1, 2)  # rank 1 receives expert 0
    layer = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="program"):
        apply_slot_moves(layer, torch.zeros(2, 4), "plan")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensor"):
        apply_slot_moves(np.zeros((2, 4)), torch.zeros(2, 4), program)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tensor"):
        apply_slot_moves(torch.zeros(3, 4), torch.zeros(2, 4), program)
    with pytest.raises(ValueError, match="staging is None"):
        apply_slot_moves(layer, None, program)
    with pytest.raises(ValueError, match="staging must be"):
        apply_slot_moves(layer, torch.zeros(2, 5), program)
    with pytest.raises(ValueError, match="staging must have"):
        apply_slot_moves(layer, torch.zeros(2, 4, dtype=torch.float64), program)
    with pytest.raises(ValueError, match="block_bytes"):
        apply_slot_moves(layer, torch.zeros(2, 4), program, block_bytes=0)
    assert torch.equal(layer, torch.zeros(2, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float32, getattr(torch, "float8_e4m3fn", torch.uint8)]
)
def test_triton_kernel_matches_the_torch_path_bit_for_bit(dtype):
    rng = np.random.default_rng(7)
    world, per_rank = 2, 24
    old = rng.permutation(np.repeat(np.arange(per_rank), world))
    new = rng.permutation(old)
    new[:4] = new[0]  # replicas of one expert
    for rank in range(world):
        program = plan_slot_moves(old, new, rank, world)
        # A row of 3 * 5 * 67 elements is no multiple of any block; also a staging
        # tensor offset by one element, whose rows align on no wide word.
        for shape, block, prefetch, offset in (
            ((5, 67), 64, True, 0),
            ((5, 67), 1024, False, 1),
            ((128, 176), 16384, True, 0),
        ):
            layer = torch.randn(per_rank, 3, *shape).to(dtype)
            staging = torch.randn(per_rank, 3, *shape).to(dtype)
            want = layer.clone()
            apply_slot_moves(want, staging, program)  # the torch path, on the CPU
            got = layer.cuda()
            on_gpu = torch.empty(staging.numel() + offset, dtype=dtype, device="cuda")
            on_gpu = on_gpu[offset:].view(staging.shape)
            on_gpu.copy_(staging)
            apply_slot_moves(got, on_gpu, program, block_bytes=block, prefetch=prefetch)
            assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
