"""Staged rebalance (``ExpertBalancer(..., layers_per_step=K)``): at every step each layer is
wholly old or wholly new, in its weights, its maps and its routing, on one and two gloo ranks;
the final placement is SPEC's; a rank failing before a commit leaves every rank old-or-new."""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eplb.production.staged as staged_module
from eplb import production
from eplb.production import (
    ExpertBalancer,
    PreparedRearrangement,
    RearrangeOptions,
    StagedApply,
    StagedApplyError,
    group_guard,
)
from eplb.production.errors import GroupFault, RearrangeError
from eplb.production.rearrange import RearrangeStats
from eplb.production.transport import TorchDistributedTransport
from eplb.reference import rebalance_experts

# 5 layers so that K = 2 leaves a short last chunk; 8 experts in 2 groups, 12 slots.
LAYERS, EXPERTS, SLOTS, GROUPS = 5, 8, 12, 2
INTERVAL, DELAY = 8, 1


def _balancer(
    world: int,
    layers_per_step: int | None,
    device: str = "cpu",
    keep_slots: bool = False,
    in_place: bool | None = None,
) -> ExpertBalancer:
    return ExpertBalancer(
        LAYERS,
        EXPERTS,
        SLOTS,
        GROUPS,
        1,
        device=device,
        window_size=INTERVAL,
        step_interval=INTERVAL,
        apply_delay=DELAY,
        layers_per_step=layers_per_step,
        rearrange=RearrangeOptions(keep_slots=keep_slots, in_place=in_place),
    )


def _weights(phy2log: torch.Tensor, rank: int, world: int) -> list[list[torch.Tensor]]:
    """Per layer, two tensors whose rows are filled with 100 * layer + expert of each slot."""
    local = SLOTS // world
    out = []
    for layer in range(LAYERS):
        code = 100.0 * layer + phy2log[layer, rank * local : (rank + 1) * local].cpu().double()
        out.append([code[:, None].repeat(1, 3), -code[:, None, None].repeat(1, 2, 2)])
    return out


def _ids(generator: torch.Generator, tokens: int, layer: int, phase: int) -> torch.Tensor:
    """[tokens, 2] distinct skewed expert ids; the hot experts depend on layer and phase."""
    popularity = 1.0 / torch.arange(1, EXPERTS + 1, dtype=torch.float64) ** 1.5
    return torch.multinomial(
        popularity.roll(3 * layer + 5 * phase).expand(tokens, -1), 2, generator=generator
    )


def _check_step(balancer: ExpertBalancer, weights, rank: int, world: int, ids_by_layer) -> None:
    """Every layer's slots hold exactly the experts its current maps name; routing lands on them."""
    phy2log, log2phy, logcnt = (
        t.cpu() for t in (balancer.phy2log, balancer.log2phy, balancer.logcnt)
    )
    expected = _weights(phy2log, rank, world)
    for layer in range(LAYERS):
        for got, want in zip(weights[layer], expected[layer], strict=True):
            assert torch.equal(got.cpu(), want), f"layer {layer}: slots and phy2log disagree"
        assert torch.equal(torch.bincount(phy2log[layer], minlength=EXPERTS), logcnt[layer])
        for expert in range(EXPERTS):
            held = log2phy[layer, expert, : logcnt[layer, expert]]
            assert torch.equal(phy2log[layer, held], torch.full_like(held, expert))
        ids = ids_by_layer[layer]
        slots = balancer.route(layer, ids.to(balancer.device), record=False).cpu()
        assert torch.equal(phy2log[layer][slots], ids)


def _serve(
    rank: int,
    world: int,
    layers_per_step: int | None,
    device: str = "cpu",
    keep: bool = False,
    in_place: bool | None = None,
):
    """Serve 2 intervals plus the apply; check every step. Returns (balancer, weights, load,
    steps at which each layer changed, steps step() returned True)."""
    balancer = _balancer(world, layers_per_step, device, keep, in_place)
    weights = [[w.to(device) for w in layer] for layer in _weights(balancer.phy2log, rank, world)]
    generator = torch.Generator().manual_seed(7 + rank)
    load = torch.zeros(LAYERS, EXPERTS, dtype=torch.int64)
    changed: dict[int, list[int]] = {layer: [] for layer in range(LAYERS)}
    applied_at = []
    chunks = 1 if layers_per_step is None else -(-LAYERS // layers_per_step)
    for step in range(1, 2 * INTERVAL + DELAY + chunks + 2):
        before = balancer.phy2log.cpu().clone()
        ids_by_layer = []
        for layer in range(LAYERS):
            ids = _ids(generator, 30 + 5 * rank, layer, step // INTERVAL)
            ids_by_layer.append(ids)
            balancer.route(layer, ids.to(device))
            if INTERVAL < step <= 2 * INTERVAL:  # the window the second interval sees
                load[layer] += torch.bincount(ids.reshape(-1), minlength=EXPERTS)
        if balancer.step(weights):
            applied_at.append(step)
        if device == "cuda":
            torch.cuda.synchronize()
        _check_step(balancer, weights, rank, world, ids_by_layer)
        for layer in range(LAYERS):
            if not torch.equal(before[layer], balancer.phy2log[layer].cpu()):
                changed[layer].append(step)
    return balancer, weights, load, changed, applied_at


def _check_schedule(changed, applied_at, layers_per_step: int | None) -> None:
    """The interval at step n applies at n + DELAY; chunk c commits at n + DELAY + c + 1."""
    starts = [INTERVAL + DELAY, 2 * INTERVAL + DELAY]
    if layers_per_step is None:
        assert applied_at == starts
        assert all(set(steps) <= set(starts) for steps in changed.values())
        return
    chunks = -(-LAYERS // layers_per_step)
    assert applied_at == [start + chunks for start in starts]
    for layer, steps in changed.items():
        commit = layer // layers_per_step + 1
        assert set(steps) <= {start + commit for start in starts}, (layer, steps)


@pytest.mark.parametrize("layers_per_step", [None, 1, 2, 4])
def test_one_rank_every_step_each_layer_wholly_old_or_new(layers_per_step):
    balancer, _, load, changed, applied_at = _serve(0, 1, layers_per_step)
    _check_schedule(changed, applied_at, layers_per_step)
    assert any(len(steps) == 2 for steps in changed.values())  # both rebalances moved slots
    spec = rebalance_experts(load.numpy(), SLOTS, GROUPS, 1, 1)
    assert torch.equal(balancer.phy2log, torch.from_numpy(spec[0]))
    assert torch.equal(balancer.logcnt, torch.from_numpy(spec[2]))
    assert balancer.stats.rebalances == 2 and not balancer.failed
    moved = balancer.stats.last_rearrange
    assert moved is not None and moved.local_copies > 0
    balancer.close()


@pytest.mark.parametrize("layers_per_step", [2, 9])
def test_staging_holds_one_chunk_of_this_ranks_slots(layers_per_step):
    balancer = _balancer(1, None)
    maps = (balancer.phy2log, balancer.log2phy, balancer.logcnt)
    staged = StagedApply(*maps, layers_per_step, max_batch_bytes=1 << 20)
    assert staged.staging_bytes == 0 and staged.num_chunks == -(-LAYERS // layers_per_step)
    weights = _weights(balancer.phy2log, 0, 1)
    host = tuple(m.clone() for m in maps)
    move = staged.prepare(host[0], host, weights)
    # Per slot: 3 + 4 float64 values; K layers, at most all of them.
    assert staged.staging_bytes == min(layers_per_step, LAYERS) * SLOTS * (3 + 4) * 8
    # One rank: nothing crosses a wire, so no chunk calls the move and none is
    # planned; every chunk's local copies are laid out ahead.
    assert move.first is None and not any(move.wired)
    assert all(copies is not None for copies in move.copies)
    assert torch.equal(move.old_logcnt, host[2])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)  # one core per rank: more threads only contend
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def _same_on_every_rank(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, tensor) for g in gathered)


def _two_rank_schedule(
    rank: int, world: int, port: int, layers_per_step: int, keep: bool, in_place: bool = False
) -> None:
    _init(rank, world, port)
    try:
        balancer, _, load, changed, applied_at = _serve(
            rank, world, layers_per_step, keep=keep, in_place=in_place
        )
        assert balancer._staged is not None and balancer._staged.in_place is in_place
        _check_schedule(changed, applied_at, layers_per_step)
        dist.all_reduce(load)
        spec = rebalance_experts(load.numpy(), SLOTS, GROUPS, 1, world)
        if keep:  # the same experts on each GPU, those staying there in their slots
            per_gpu = (LAYERS, world, SLOTS // world)
            assert torch.equal(
                balancer.phy2log.reshape(per_gpu).sort(dim=2).values,
                torch.from_numpy(spec[0]).reshape(per_gpu).sort(dim=2).values,
            )
        else:
            assert torch.equal(balancer.phy2log, torch.from_numpy(spec[0]))
        assert _same_on_every_rank(balancer.log2phy)
        moved = balancer.stats.last_rearrange
        assert moved is not None and moved.experts_received > 0
        balancer.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("layers_per_step", "keep"), [(1, False), (2, False), (2, True)])
def test_two_ranks_every_step_each_layer_wholly_old_or_new(layers_per_step, keep):
    # keep: kept slots, so many slots keep their expert and a commit copies only the others.
    args = (2, _free_port(), layers_per_step, keep)
    mp.spawn(_two_rank_schedule, args=args, nprocs=2, join=True)


@pytest.mark.parametrize(("layers_per_step", "keep"), [(1, False), (2, True)])
def test_two_ranks_in_place_commits_keep_each_layer_wholly_old_or_new(layers_per_step, keep):
    # The commit runs each layer's moves in place (the torch path of slot_moves on
    # the CPU, the same program as the Triton kernel's): received experts from staging.
    args = (2, _free_port(), layers_per_step, keep, True)
    mp.spawn(_two_rank_schedule, args=args, nprocs=2, join=True)


@pytest.mark.parametrize("layers_per_step", [1, 2, 4])
def test_one_rank_in_place_commits_keep_each_layer_wholly_old_or_new(layers_per_step):
    balancer, _, _, changed, applied_at = _serve(0, 1, layers_per_step, in_place=True)
    assert balancer._staged is not None and balancer._staged.in_place
    _check_schedule(changed, applied_at, layers_per_step)
    # Nothing crosses a wire on one rank: every move was an in-place local one.
    moved = balancer.stats.last_rearrange
    assert moved is not None and moved.experts_received == 0 and moved.local_copies > 0
    balancer.close()


def test_in_place_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match="in_place must be a bool or None"):
        RearrangeOptions(in_place=1)


def _wire_map(old: torch.Tensor, new: torch.Tensor, world: int) -> torch.Tensor:
    """``new`` where a slot's rank lacks its new expert, else ``old``: what crosses a wire."""
    local = old.shape[1] // world
    wire = new.clone()
    for layer in range(old.shape[0]):
        for slot in range(old.shape[1]):
            rank = slot // local
            if new[layer, slot] in old[layer, rank * local : (rank + 1) * local]:
                wire[layer, slot] = old[layer, slot]
    return wire


def _lazy_chunks(rank: int, world: int, port: int, layers_per_step: int) -> None:
    """Two staged rebalances; the move of every chunk after the first is planned by its launch."""
    if world > 1:
        _init(rank, world, port)
    real = staged_module.rearrange_expert_weights
    calls: list[tuple[torch.Tensor, object]] = []  # (new rows, prepared) per launch

    def spy(old, new, weights, group, **kwargs):
        calls.append((new.clone(), kwargs["prepared"]))
        return real(old, new, weights, group, **kwargs)

    staged_module.rearrange_expert_weights = spy
    try:
        balancer = _balancer(world, layers_per_step)
        weights = _weights(balancer.phy2log, rank, world)
        generator = torch.Generator().manual_seed(11 + rank)
        chunks = -(-LAYERS // layers_per_step)
        load = torch.zeros(LAYERS, EXPERTS, dtype=torch.int64)
        history = [balancer.phy2log.clone()]  # phy2log after each step (index = step)
        for step in range(1, 2 * INTERVAL + DELAY + chunks + 1):
            ids_by_layer = [_ids(generator, 24, layer, step // INTERVAL) for layer in range(LAYERS)]
            for layer, ids in enumerate(ids_by_layer):
                balancer.route(layer, ids)
                if INTERVAL < step <= 2 * INTERVAL:  # the window the second interval sees
                    load[layer] += torch.bincount(ids.reshape(-1), minlength=EXPERTS)
            balancer.step(weights)
            # Every layer's slots hold exactly the experts its maps name, at every step.
            _check_step(balancer, weights, rank, world, ids_by_layer)
            history.append(balancer.phy2log.clone())
        for interval in (INTERVAL, 2 * INTERVAL):
            start = interval + DELAY  # the apply step: launches chunk 0, commits nothing
            old, new = history[start], history[start + chunks]
            for layer in range(LAYERS):
                commit = start + layer // layers_per_step + 1
                rows = [history[t][layer] for t in range(start, start + chunks + 1)]
                # Wholly old up to its chunk's commit, wholly new from that step on.
                assert all(torch.equal(r, old[layer]) for r in rows[: commit - start]), layer
                assert all(torch.equal(r, new[layer]) for r in rows[commit - start :]), layer
            assert not torch.equal(old, new)
        # One call per chunk where something crosses a wire (none on one rank):
        # the first chunk's planned ahead, each later one in its call, with the
        # rows of its own chunk of the new placement, where the slots a local
        # copy fills keep their old expert (the move does not copy them).
        expected = []
        for interval in (INTERVAL, 2 * INTERVAL):
            start = interval + DELAY
            wire = _wire_map(history[start], history[start + chunks], world)
            for chunk in range(chunks):
                layers = slice(chunk * layers_per_step, (chunk + 1) * layers_per_step)
                if not torch.equal(wire[layers], history[start][layers]):
                    expected.append((chunk, wire[layers]))
        assert len(calls) == len(expected)
        if world == 1:
            assert not calls
        for (rows, prepared), (chunk, want) in zip(calls, expected, strict=True):
            assert isinstance(prepared, PreparedRearrangement) == (chunk == 0), chunk
            assert torch.equal(rows, want), chunk
        if world > 1:
            dist.all_reduce(load)
        spec = production.rebalance_experts(load, SLOTS, GROUPS, 1, world)
        assert torch.equal(balancer.phy2log, spec[0])
        assert torch.equal(balancer.logcnt, spec[2])
        assert balancer.stats.rebalances == 2 and not balancer.failed
        balancer.close()
    finally:
        staged_module.rearrange_expert_weights = real
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.parametrize("layers_per_step", [1, 2])
def test_lazily_planned_chunks_one_rank(layers_per_step):
    _lazy_chunks(0, 1, 0, layers_per_step)


@pytest.mark.parametrize("layers_per_step", [1, 2])
def test_lazily_planned_chunks_two_ranks(layers_per_step):
    args = (2, _free_port(), layers_per_step)
    mp.spawn(_lazy_chunks, args=args, nprocs=2, join=True)


def _fault_before_commit(rank: int, world: int, port: int) -> None:
    """Rank 1 raises after receiving chunk 1 (layers 2..3), before its commit."""
    if world > 1:
        _init(rank, world, port)
    real = staged_module.rearrange_expert_weights
    real_copies = StagedApply._chunk_copies
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        moved = real(*args, **kwargs)
        if len(calls) == 2 and rank == world - 1:
            raise RuntimeError("injected fault")
        return moved

    def failing_copies(self, move, live):
        # One rank: nothing crosses a wire, the chunk's local copies fail instead.
        if self._chunk == 1:
            raise RuntimeError("injected fault")
        return real_copies(self, move, live)

    staged_module.rearrange_expert_weights = failing
    if world == 1:
        StagedApply._chunk_copies = failing_copies  # type: ignore[method-assign]
    try:
        balancer = _balancer(world, 2)
        weights = _weights(balancer.phy2log, rank, world)
        initial = balancer.phy2log.clone()
        generator = torch.Generator().manual_seed(3 + rank)
        error, step = None, 0
        while step < INTERVAL + DELAY + 3:
            step += 1
            for layer in range(LAYERS):
                balancer.route(layer, _ids(generator, 30, layer, 1))
            try:
                balancer.step(weights)
            except StagedApplyError as exc:
                error = exc
                break
        # Every rank raises at the same step: chunk 1's commit.
        assert error is not None and step == INTERVAL + DELAY + 2, step
        assert error.layers_new == (0, 1) and error.layers_old == (2, 3, 4), error
        if rank == world - 1:
            assert "injected fault" in str(error.__cause__)
        assert f"rank(s) [{world - 1}]" in str(error)
        assert balancer.failed and balancer.error is error
        # Committed layers are new, the others old, weights and maps alike.
        assert not torch.equal(balancer.phy2log[:2], initial[:2])
        assert torch.equal(balancer.phy2log[2:], initial[2:])
        ids = [_ids(generator, 30, layer, 1) for layer in range(LAYERS)]
        _check_step(balancer, weights, rank, world, ids)
        if world > 1:
            assert _same_on_every_rank(balancer.phy2log)
        # The maps describe the weights: reset() alone resumes serving and rebalancing.
        staged_module.rearrange_expert_weights = real
        StagedApply._chunk_copies = real_copies  # type: ignore[method-assign]
        balancer.reset()
        for _ in range(INTERVAL + DELAY + 3):
            balancer.step(weights)
            _check_step(balancer, weights, rank, world, ids)
        assert balancer.stats.rebalances == 1 and not balancer.failed
        balancer.close()
    finally:
        staged_module.rearrange_expert_weights = real
        StagedApply._chunk_copies = real_copies  # type: ignore[method-assign]
        if world > 1:
            dist.destroy_process_group()


def test_fault_before_commit_one_rank():
    _fault_before_commit(0, 1, 0)


def test_fault_before_commit_two_ranks_leaves_every_layer_old_or_new():
    mp.spawn(_fault_before_commit, args=(2, _free_port()), nprocs=2, join=True)


def _fault_mid_chunk(rank: int, world: int, port: int) -> None:
    """Rank 1's link breaks in the middle of chunk 1's move (layers 2..3)."""
    _init(rank, world, port)
    real = TorchDistributedTransport.wait
    armed = []

    def breaking(self, pending):
        if armed and rank == 1:
            raise ConnectionError("injected: rank 1 lost its link")
        return real(self, pending)

    TorchDistributedTransport.wait = breaking  # type: ignore[method-assign]
    balancer = _balancer(world, 2)
    weights = _weights(balancer.phy2log, rank, world)
    initial = balancer.phy2log.clone()
    generator = torch.Generator().manual_seed(3 + rank)
    error, step = None, 0
    while step < INTERVAL + DELAY + 3:
        step += 1
        if step == INTERVAL + DELAY + 1:  # the step that commits chunk 0, launches chunk 1
            armed.append(True)
        for layer in range(LAYERS):
            balancer.route(layer, _ids(generator, 30, layer, 1))
        try:
            balancer.step(weights)
        except StagedApplyError as exc:
            error = exc
            break
    TorchDistributedTransport.wait = real  # type: ignore[method-assign]
    # Every rank's chunk move raised (one outcome), so every rank fails at its
    # commit, without a vote: nothing of chunk 1 was written to the live slots.
    assert error is not None and step == INTERVAL + DELAY + 2, step
    assert isinstance(error.__cause__, RearrangeError), repr(error.__cause__)
    assert "lost its link" in str(error.__cause__)
    assert error.layers_new == (0, 1) and error.layers_old == (2, 3, 4), error
    assert torch.equal(balancer.phy2log[2:], initial[2:])
    ids = [_ids(generator, 30, layer, 1) for layer in range(LAYERS)]
    _check_step(balancer, weights, rank, world, ids)
    # The failed move faulted the group: a new one is required to go on.
    with pytest.raises(ValueError, match="group is required"):
        balancer.reset()
    balancer.reset(group=dist.new_group(list(range(world))))
    for _ in range(INTERVAL + DELAY + 3):
        balancer.step(weights)
        _check_step(balancer, weights, rank, world, ids)
    assert balancer.stats.rebalances == 1 and not balancer.failed
    balancer.close()
    # The failed move's receives are still posted on the old group: gloo aborts
    # the process if it is destroyed before their deadline. Leave without it.
    dist.barrier()
    os._exit(0)


def test_fault_mid_chunk_needs_a_new_group_then_resumes():
    mp.spawn(_fault_mid_chunk, args=(2, _free_port()), nprocs=2, join=True)


def _bad_weights_on_one_rank(rank: int, world: int, port: int) -> None:
    """Rank 1 passes a wrongly shaped layer 1 when the first chunk launches."""
    _init(rank, world, port)
    try:
        balancer = _balancer(world, 2)
        weights = _weights(balancer.phy2log, rank, world)
        initial = [[t.clone() for t in layer] for layer in weights]
        before = balancer.phy2log.clone()
        generator = torch.Generator().manual_seed(3 + rank)
        for _ in range(INTERVAL + DELAY - 1):
            for layer in range(LAYERS):
                balancer.route(layer, _ids(generator, 30, layer, 1))
            balancer.step(weights)
        given = list(weights)
        if rank == 1:
            given[1] = [weights[1][0][:, :2], weights[1][1]]
        balancer.step(given)  # the apply step: launches chunk 0 (layers 0..1)
        with pytest.raises(StagedApplyError, match=r"rank\(s\) \[0, 1\]") as info:
            balancer.step(weights)
        assert info.value.layers_new == () and info.value.layers_old == tuple(range(LAYERS))
        if rank == 1:
            # The move's own checks (it reads the live slots, writes staging).
            assert "same list of tensor shapes and dtypes" in str(info.value.__cause__)
        else:
            assert "refused their input" in str(info.value.__cause__)
        assert torch.equal(balancer.phy2log, before) and balancer.failed
        for got, want in zip(weights, initial, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        balancer.close()
    finally:
        dist.destroy_process_group()


def test_a_rank_refusing_its_weights_at_a_launch_fails_every_rank_untouched():
    mp.spawn(_bad_weights_on_one_rank, args=(2, _free_port()), nprocs=2, join=True)


def _staged_apply(
    rank: int, world: int, layers_per_step: int
) -> tuple[ExpertBalancer, StagedApply, list[list[torch.Tensor]], staged_module.StagedMove]:
    """A StagedApply (timeout 1 s) on a balancer's maps, this rank's weights, a prepared move."""
    balancer = _balancer(world, None)  # its static maps and initial placement
    maps = (balancer.phy2log, balancer.log2phy, balancer.logcnt)
    staged = StagedApply(*maps, layers_per_step, max_batch_bytes=1 << 20, timeout=1.0)
    weights = _weights(balancer.phy2log, rank, world)
    load = torch.arange(LAYERS * EXPERTS).reshape(LAYERS, EXPERTS) % 7 + 1
    phy2log, log2phy, logcnt = rebalance_experts(load.numpy(), SLOTS, GROUPS, 1, world)
    padded = torch.full(maps[1].shape, -1, dtype=torch.int64)
    padded[..., : log2phy.shape[2]] = torch.from_numpy(log2phy)
    new = (torch.from_numpy(phy2log), padded, torch.from_numpy(logcnt))
    return balancer, staged, weights, staged.prepare(balancer.phy2log.clone(), new, weights)


def _silent_rank(rank: int, world: int, port: int) -> None:
    """Rank 1 stalls 4 s after its move, before voting; rank 0 must give up after 1 s."""
    _init(rank, world, port)
    real = staged_module.rearrange_expert_weights

    def stalling(*args, **kwargs):
        moved = real(*args, **kwargs)
        time.sleep(4.0)
        return moved

    try:
        balancer, staged, weights, move = _staged_apply(rank, world, 2)
        old = move.old_phy2log
        if rank == 1:
            staged_module.rearrange_expert_weights = stalling
        staged.begin(move, weights)
        if rank == 0:
            start = time.monotonic()
            with pytest.raises(StagedApplyError, match="did not come within 1 s") as info:
                staged.advance(weights)
            assert 1.0 <= time.monotonic() - start < 3.5
            assert info.value.layers_new == () and info.value.layers_old == tuple(range(LAYERS))
            assert torch.equal(balancer.phy2log, old) and not staged.active
            generator = torch.Generator().manual_seed(5)
            ids = [_ids(generator, 20, layer, 0) for layer in range(LAYERS)]
            _check_step(balancer, weights, rank, world, ids)
        dist.barrier()
        balancer.close()
    finally:
        staged_module.rearrange_expert_weights = real
        dist.destroy_process_group()


def test_a_rank_that_stops_answering_fails_the_commit_within_the_timeout():
    mp.spawn(_silent_rank, args=(2, _free_port()), nprocs=2, join=True)


class _Event:
    """A CUDA event's stand-in: query() is True for the first ``completes`` records only."""

    def __init__(self, completes: int) -> None:
        self.records, self.completes = 0, completes

    def record(self, stream: object = None) -> None:
        self.records += 1

    def query(self) -> bool:
        return self.records <= self.completes


@pytest.mark.parametrize("cuda", [False, True])
def test_a_staged_launch_leaves_the_host_wait_for_its_messages_to_the_vote_on_cuda(cuda):
    # On CUDA the launch's move must not wait on the host for its messages (they
    # are queued behind the forward pass in flight): the vote, with its deadline,
    # is that wait. gloo's messages complete only in a host wait: it stays.
    _, staged, weights, move = _staged_apply(0, 1, 2)
    move = dataclasses.replace(move, wired=(True,) * len(move.wired))  # as if a chunk crossed
    calls = []

    def spy(old, new, live, group, **kwargs):
        calls.append(kwargs)
        return RearrangeStats(0, 0, 0, 0, 0, 0, 0, 0, 0.0)

    real = staged_module.rearrange_expert_weights
    staged_module.rearrange_expert_weights = spy
    try:
        if cuda:  # the launch's CUDA branch; no streams (None: host order)
            staged._cuda, staged._voted = True, _Event(1)
        staged.begin(move, weights)
    finally:
        staged_module.rearrange_expert_weights = real
    assert len(calls) == 1 and calls[0]["host_wait"] is (not cuda)
    assert calls[0]["into"] == staged._staging[:2]


def _vote_never_completes(rank: int, world: int, port: int) -> None:
    """Rank 0's vote on chunk 1 (layers 3..4) never completes; rank 1's does."""
    _init(rank, world, port)
    aborted = []
    real_abort = group_guard.abort_group

    def abort(group):
        aborted.append(group)
        return real_abort(group)

    group_guard.abort_group = abort
    balancer, staged, weights, move = _staged_apply(rank, world, 3)
    if rank == 0:
        staged._voted = _Event(1)  # chunk 0's vote completes, chunk 1's never
    staged.begin(move, weights)
    assert not staged.advance(weights)  # commits chunk 0, launches chunk 1
    if rank == 0:
        with pytest.raises(StagedApplyError, match="did not come within 1 s") as info:
            staged.advance(weights)
        assert "faulted" in str(info.value) and "may also hold layers 3..4" in str(info.value)
        assert info.value.layers_new == (0, 1, 2) and info.value.layers_old == (3, 4)
        assert torch.equal(balancer.phy2log[:3], move.phy2log[:3])
        assert torch.equal(balancer.phy2log[3:], move.old_phy2log[3:])
        # Faulted the way a failed guarded call is: aborted (gloo: a no-op), marked.
        assert aborted == [None] and group_guard.fault_of(None) is not None
        with pytest.raises(GroupFault, match="faulted in an earlier call"):
            production.warmup_rearrangement(timeout=30)
        staged._voted = None  # back to the CPU's vote: none is issued on a faulted group
        staged.begin(move, weights)
        assert staged._vote is None
        with pytest.raises(StagedApplyError) as refused:
            staged.advance(weights)
        assert "faulted earlier" in str(refused.value.__cause__)
    else:
        # Its vote completed (rank 0 voted; only rank 0's host did not see it): it
        # commits the chunk rank 0 gave up on, and learns of the fault at its next
        # guarded call from the failure board, at once, not by a deadline.
        assert staged.advance(weights) and torch.equal(balancer.phy2log, move.phy2log)
        with pytest.raises(GroupFault, match="rank 0 failed: staged apply") as fault:
            production.warmup_rearrangement(timeout=30)
        assert not fault.value.timed_out and group_guard.fault_of(None) is not None
        assert aborted == [None]  # faulted here too (NCCL: aborted)
    group_guard.abort_group = real_abort
    dist.barrier()
    balancer.close()
    dist.destroy_process_group()


def test_a_vote_past_the_timeout_faults_the_group_and_later_calls_refuse_at_once():
    mp.spawn(_vote_never_completes, args=(2, _free_port()), nprocs=2, join=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers_per_step": 0}, ValueError, "layers_per_step must be >= 1"),
        ({"layers_per_step": 1.5}, TypeError, "layers_per_step must be an int"),
        ({"layers_per_step": True}, TypeError, "layers_per_step must be an int"),
        ({"layers_per_step": 1, "step_interval": 6}, ValueError, "must be < step_interval"),
    ],
)
def test_bad_layers_per_step_is_refused(kwargs, error, match):
    kwargs = {"device": "cpu", "step_interval": INTERVAL, **kwargs}
    with pytest.raises(error, match=match):
        ExpertBalancer(LAYERS, EXPERTS, SLOTS, GROUPS, 1, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layers_per_step", [1, 4])
def test_one_gpu_every_step_each_layer_wholly_old_or_new(layers_per_step):
    balancer, _, load, changed, applied_at = _serve(0, 1, layers_per_step, "cuda")
    _check_schedule(changed, applied_at, layers_per_step)
    spec = rebalance_experts(load.numpy(), SLOTS, GROUPS, 1, 1)
    assert torch.equal(balancer.phy2log.cpu(), torch.from_numpy(spec[0]))
    balancer.close()
