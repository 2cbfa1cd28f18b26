"""ExpertBalancer: exact load counts, routing onto holding slots, in-place maps, weights moved
right, on one rank, on two gloo ranks, in the end-to-end example, and in a CUDA graph."""

from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eplb.production.rearrange as rearrange_module
import eplb.production.serving as serving
from eplb.production.errors import RearrangeError
from eplb.production.group_guard import DEFAULT_TIMEOUT
from eplb.production.rearrange import (
    PreparedRearrangement,
    RearrangeBuffers,
    rearrange_expert_weights,
)
from eplb.production.serving import ExpertBalancer, LoadWindow, RearrangeOptions
from eplb.reference import rebalance_experts

ROOT = Path(__file__).resolve().parents[1]

# A small hierarchical shape: 3 layers, 8 experts in 2 groups, 12 slots.
LAYERS, EXPERTS, SLOTS, GROUPS = 3, 8, 12, 2


def _skewed_ids(generator: torch.Generator, tokens: int, k: int, layer: int) -> torch.Tensor:
    """[tokens, k] distinct expert ids per token, hot experts differing per layer."""
    popularity = 1.0 / torch.arange(1, EXPERTS + 1, dtype=torch.float64) ** 1.5
    popularity = popularity.roll(3 * layer)
    return torch.multinomial(popularity.expand(tokens, -1), k, generator=generator)


def _encoded_weights(phy2log: torch.Tensor, rank: int, world: int) -> list[list[torch.Tensor]]:
    """Per layer, two tensors whose rows encode (layer, expert) of this rank's slots."""
    local = SLOTS // world
    weights = []
    for layer in range(LAYERS):
        experts = phy2log[layer, rank * local : (rank + 1) * local].to(torch.float32)
        code = 100.0 * layer + experts
        weights.append([code[:, None].repeat(1, 3), -code[:, None, None].repeat(1, 2, 2)])
    return weights


def _assert_weights_follow(weights, phy2log: torch.Tensor, rank: int, world: int) -> None:
    expected = _encoded_weights(phy2log.cpu(), rank, world)
    for got_layer, want_layer in zip(weights, expected, strict=True):
        for got, want in zip(got_layer, want_layer, strict=True):
            assert torch.equal(got, want)


def _assert_maps_consistent(balancer: ExpertBalancer) -> None:
    phy2log, log2phy, logcnt = (
        t.cpu() for t in (balancer.phy2log, balancer.log2phy, balancer.logcnt)
    )
    for layer in range(LAYERS):
        counts = torch.bincount(phy2log[layer], minlength=EXPERTS)
        assert torch.equal(counts, logcnt[layer])
        for expert in range(EXPERTS):
            slots = log2phy[layer, expert]
            held = slots[: logcnt[layer, expert]]
            assert torch.equal(phy2log[layer, held], torch.full_like(held, expert))
            assert (slots[logcnt[layer, expert] :] == -1).all()


def _assert_routes_to_holders(balancer: ExpertBalancer, ids: torch.Tensor, layer: int) -> None:
    slots = balancer.route(layer, ids, record=False)
    assert slots.shape == ids.shape and slots.dtype == ids.dtype
    assert torch.equal(balancer.phy2log[layer][slots.long()], ids.long())
    # Hot experts' tokens spread over all their replicas.
    replicated = 0
    for expert in ids.unique().tolist():
        count = int(balancer.logcnt[layer, expert])
        if count > 1 and (ids == expert).sum() >= 20:
            assert len(slots[ids == expert].unique()) == count
            replicated += 1
    assert replicated > 0


_OPTIONS = ("max_batch_bytes", "keep_buffers", "keep_slots", "prepare_ahead", "timeout")


def _balancer(world: int = 1, **kwargs) -> ExpertBalancer:
    """A small balancer; RearrangeOptions' fields may be given as keywords too."""
    options = {name: kwargs.pop(name) for name in _OPTIONS if name in kwargs}
    if options:
        kwargs["rearrange"] = RearrangeOptions(**options)
    kwargs = {"window_size": 4, "step_interval": 3, "device": "cpu", **kwargs}
    return ExpertBalancer(LAYERS, EXPERTS, SLOTS, GROUPS, 1, **kwargs)


def _run_until_rebalance(balancer, weights, generator, rank=0):
    """Route skewed tokens for step_interval + apply_delay steps; return the expected total load.

    The expected load is the sum of bincounts of what was routed in the window
    the rebalance saw (this rank only).
    """
    per_step = []
    for _ in range(balancer.step_interval + balancer.apply_delay):
        counts = torch.zeros(LAYERS, EXPERTS, dtype=torch.int64)
        for layer in range(LAYERS):
            ids = _skewed_ids(generator, 40 + 7 * rank, 2, layer)
            balancer.route(layer, ids)
            counts[layer] = torch.bincount(ids.reshape(-1), minlength=EXPERTS)
        per_step.append(counts)
        applied = balancer.step(weights)
        assert applied == (balancer.stats.steps == balancer.step_interval + balancer.apply_delay)
    seen = per_step[: balancer.step_interval][-balancer.window_size :]
    return torch.stack(seen).sum(0)


def test_initial_placement_is_slot_mod_experts():
    balancer = _balancer()
    expected = torch.arange(SLOTS).remainder(EXPERTS).expand(LAYERS, -1)
    assert torch.equal(balancer.phy2log, expected)
    assert balancer.log2phy.shape == (LAYERS, EXPERTS, SLOTS - EXPERTS + 1)
    _assert_maps_consistent(balancer)


def test_counts_are_exact_and_the_window_slides():
    balancer = _balancer(window_size=3, step_interval=100)
    generator = torch.Generator().manual_seed(1)
    history = []
    for _ in range(5):
        counts = torch.zeros(LAYERS, EXPERTS, dtype=torch.int64)
        for layer in range(LAYERS):
            for tokens in (5, 17):  # two calls per layer add up
                ids = torch.randint(0, EXPERTS, (tokens, 3), generator=generator)
                balancer.route(layer, ids.to(torch.int32))
                counts[layer] += torch.bincount(ids.reshape(-1), minlength=EXPERTS)
        balancer.route(0, ids, record=False)
        history.append(counts)
        balancer.step([])
        assert torch.equal(balancer.window_load(), torch.stack(history[-3:]).sum(0))


def test_rebalance_moves_weights_and_keeps_buffer_addresses():
    balancer = _balancer(apply_delay=2, step_interval=4)
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    addresses = [t.data_ptr() for t in (balancer.phy2log, balancer.log2phy, balancer.logcnt)]
    load = _run_until_rebalance(balancer, weights, torch.Generator().manual_seed(2))

    expected = rebalance_experts(load.numpy(), SLOTS, GROUPS, 1, 1)
    assert torch.equal(balancer.phy2log, torch.from_numpy(expected[0]))
    assert torch.equal(balancer.logcnt, torch.from_numpy(expected[2]))
    assert [t.data_ptr() for t in (balancer.phy2log, balancer.log2phy, balancer.logcnt)] == (
        addresses
    )
    _assert_maps_consistent(balancer)
    _assert_weights_follow(weights, balancer.phy2log, 0, 1)
    stats = balancer.stats
    assert (stats.rebalances, stats.last_rebalance_step, stats.skipped) == (1, 6, 0)
    # One rank: balancedness is 1 for any placement; the two-rank test checks it improves.
    assert stats.balancedness_before == stats.balancedness_after == 1.0
    ids = _skewed_ids(torch.Generator().manual_seed(3), 200, 2, 1)
    _assert_routes_to_holders(balancer, ids, 1)
    balancer.close()


def test_max_replicas_keeps_only_the_first_replicas():
    balancer = _balancer(max_replicas=1)
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    _run_until_rebalance(balancer, weights, torch.Generator().manual_seed(4))
    assert int(balancer.logcnt.max()) > 1  # the placement replicated hot experts
    ids = _skewed_ids(torch.Generator().manual_seed(5), 100, 2, 0)
    slots = balancer.route(0, ids, record=False)
    assert torch.equal(slots, balancer.log2phy[0][ids, 0])


def test_failed_rearrangement_keeps_maps_skips_intervals_until_reset(monkeypatch):
    balancer = _balancer()
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    before = balancer.phy2log.clone()

    def broken(*args, **kwargs):
        raise RuntimeError("rank 1 is gone")

    monkeypatch.setattr(serving, "rearrange_expert_weights", broken)
    with pytest.raises(RuntimeError, match="rank 1 is gone"):
        _run_until_rebalance(balancer, weights, torch.Generator().manual_seed(6))
    assert balancer.failed and torch.equal(balancer.phy2log, before)
    for _ in range(3):
        balancer.step(weights)
    assert (balancer.stats.skipped, balancer.stats.rebalances) == (1, 0)

    monkeypatch.undo()
    shifted = before.roll(1, dims=1)
    balancer.reset(shifted)
    assert not balancer.failed and torch.equal(balancer.phy2log, shifted)
    _assert_maps_consistent(balancer)
    for _ in range(4):  # steps 8..11: the interval at 9 starts, 10 applies
        balancer.step(_encoded_weights(shifted, 0, 1))
    assert balancer.stats.rebalances == 1


def test_kept_slots_give_the_same_gpus_with_fewer_copies():
    balancer = _balancer(apply_delay=2, step_interval=4, keep_slots=True)
    before = balancer.phy2log.clone()
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    load = _run_until_rebalance(balancer, weights, torch.Generator().manual_seed(2))

    placement = rebalance_experts(load.numpy(), SLOTS, GROUPS, 1, 1)
    spec, logcnt = torch.from_numpy(placement[0]), torch.from_numpy(placement[2])
    # One GPU: the same experts as the SPEC placement, as often, in other slots.
    assert torch.equal(balancer.phy2log.sort(dim=1).values, spec.sort(dim=1).values)
    assert torch.equal(balancer.logcnt, logcnt)
    kept = int((balancer.phy2log == before).sum())
    assert kept > int((spec == before).sum())
    assert kept == sum(
        sum((collections.Counter(a.tolist()) & collections.Counter(b.tolist())).values())
        for a, b in zip(before, spec, strict=True)
    )
    _assert_maps_consistent(balancer)
    _assert_weights_follow(weights, balancer.phy2log, 0, 1)
    _assert_routes_to_holders(balancer, _skewed_ids(torch.Generator().manual_seed(3), 200, 2, 1), 1)
    balancer.close()


def _record_rearrangements(monkeypatch) -> list[dict]:
    """The keyword arguments of every rearrangement the balancer makes from now on."""
    calls: list[dict] = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return rearrange_expert_weights(*args, **kwargs)

    monkeypatch.setattr(serving, "rearrange_expert_weights", recording)
    return calls


def test_rearrangement_gets_the_step_budget(monkeypatch):
    balancer = _balancer(max_batch_bytes=12345)
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    calls = _record_rearrangements(monkeypatch)
    _run_until_rebalance(balancer, weights, torch.Generator().manual_seed(7))
    assert [c["max_batch_bytes"] for c in calls] == [12345] and balancer.stats.rebalances == 1


@pytest.mark.parametrize("mode", ["ahead", "refused", "off"])
def test_the_worker_prepares_the_move_and_the_apply_plans_nothing(monkeypatch, mode):
    refused = mode != "ahead"
    balancer = _balancer(apply_delay=2, step_interval=4, prepare_ahead=mode != "off")
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    calls = _record_rearrangements(monkeypatch)
    planned_on: list[str] = []
    plan = rearrange_module.plan_checked

    def spy(*args):
        planned_on.append(threading.current_thread().name)
        return plan(*args)

    monkeypatch.setattr(rearrange_module, "plan_checked", spy)
    if mode == "refused":  # the call checks again and moves (one rank, nothing to refuse)

        def refusing(*args, **kwargs):
            raise ValueError("refused by the worker")

        monkeypatch.setattr(serving, "prepare_rearrangement", refusing)
    _run_until_rebalance(balancer, weights, torch.Generator().manual_seed(7))
    assert balancer.stats.rebalances == 1 and balancer.error is None
    (call,) = calls
    if refused:
        assert call["prepared"] is None
        assert planned_on == [threading.main_thread().name]
    else:
        assert isinstance(call["prepared"], PreparedRearrangement)
        assert planned_on and all(n.startswith("eplb-plan") for n in planned_on)
    _assert_weights_follow(weights, balancer.phy2log, 0, 1)
    balancer.close()


@pytest.mark.parametrize("keep", [False, True])
def test_kept_buffers_go_to_every_rearrangement_and_close_with_the_balancer(monkeypatch, keep):
    balancer = _balancer(keep_buffers=keep)
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    calls = _record_rearrangements(monkeypatch)
    _run_until_rebalance(balancer, weights, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(8)
    for _ in range(balancer.step_interval):  # to the next rebalance
        for layer in range(LAYERS):
            balancer.route(layer, _skewed_ids(generator, 40, 2, LAYERS - 1 - layer))
        balancer.step(weights)
    given = [c["buffers"] for c in calls]
    assert balancer.stats.rebalances == 2 and len(given) == 2
    if keep:  # one RearrangeBuffers for both, open until close()
        assert isinstance(given[0], RearrangeBuffers) and given[1] is given[0]
        assert not given[0].closed
    else:
        assert given == [None, None]
    balancer.close()
    assert not keep or given[0].closed


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keep_buffers": 1}, TypeError, "keep_buffers must be a bool"),
        ({"keep_slots": "yes"}, TypeError, "keep_slots must be a bool"),
        ({"prepare_ahead": None}, TypeError, "prepare_ahead must be a bool"),
        ({"apply_delay": 3}, ValueError, "apply_delay must be < step_interval"),
        ({"max_replicas": SLOTS - EXPERTS + 2}, ValueError, "max_replicas must be <="),
        ({"window_size": 0}, ValueError, "window_size must be >= 1"),
        ({"step_interval": 2.0}, TypeError, "step_interval must be an int"),
        ({"max_batch_bytes": 0}, ValueError, "max_batch_bytes must be >= 1"),
        ({"group": object()}, ValueError, "not initialized"),
        ({"rearrange": {"keep_slots": True}}, TypeError, "rearrange must be a RearrangeOptions"),
    ],
)
def test_bad_configuration_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        _balancer(**kwargs)


def test_bad_route_and_reset_arguments_are_refused():
    balancer = _balancer()
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="layer must be in"):
        balancer.route(LAYERS, ids)
    with pytest.raises(ValueError, match="2-D"):
        balancer.route(0, ids.reshape(-1))
    with pytest.raises(TypeError, match="int32 or int64"):
        balancer.route(0, ids.float())
    missing = torch.zeros(LAYERS, SLOTS, dtype=torch.int64)
    with pytest.raises(ValueError, match="every expert"):
        balancer.reset(missing)
    with pytest.raises(ValueError, match="shape"):
        balancer.reset(missing[:, :-1])
    with pytest.raises(ValueError, match="one entry per layer"):
        for _ in range(4):
            balancer.step([])
    assert torch.equal(balancer.window_load().sum(), torch.tensor(0))  # nothing was recorded


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _late_rank(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 never reaches the interval: rank 0's load all-reduce must end at the timeout."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    timeout = 2.0
    balancer = _balancer(world, timeout=timeout)  # step_interval 3
    weights = _encoded_weights(balancer.phy2log, rank, world)
    for _ in range(2):
        balancer.step(weights)
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(RuntimeError):  # gloo's own timeout error
            balancer.step(weights)
        assert balancer.failed
        Path(out).write_text(str(time.monotonic() - start))
    else:  # late: until rank 0 has given up on it
        limit = time.monotonic() + 60
        while not Path(out).exists() and time.monotonic() < limit:
            time.sleep(0.05)
    # rank 0's timed-out all-reduce closed its pairs: leave without tearing down.
    os._exit(0)


def test_a_late_rank_fails_the_load_all_reduce_at_the_timeout(tmp_path):
    out = tmp_path / "seconds"
    mp.spawn(_late_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    seconds = float(out.read_text())
    assert 1.5 < seconds < 2.0 + 3.0, seconds  # the 2 s timeout, loose: a loaded CI box


def _two_rank_checks(rank: int, world: int, port: int, keep_slots: bool) -> None:
    """Runs in each spawned rank: one rebalance over gloo, checked from every side."""
    torch.set_num_threads(1)  # one core per rank: more threads only contend
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        balancer = _balancer(world, keep_slots=keep_slots)
        weights = _encoded_weights(balancer.phy2log, rank, world)
        addresses = [t.data_ptr() for t in (balancer.phy2log, balancer.log2phy, balancer.logcnt)]
        load = _run_until_rebalance(
            balancer, weights, torch.Generator().manual_seed(10 + rank), rank
        )
        dist.all_reduce(load)
        phy2log, _, logcnt = rebalance_experts(load.numpy(), SLOTS, GROUPS, 1, world)
        if keep_slots:  # the same experts on each GPU, in other slots
            per_gpu = (LAYERS, world, SLOTS // world)
            assert torch.equal(
                balancer.phy2log.reshape(per_gpu).sort(dim=2).values,
                torch.from_numpy(phy2log).reshape(per_gpu).sort(dim=2).values,
            )
        else:
            assert torch.equal(balancer.phy2log, torch.from_numpy(phy2log))
        assert torch.equal(balancer.logcnt, torch.from_numpy(logcnt))
        assert [t.data_ptr() for t in (balancer.phy2log, balancer.log2phy, balancer.logcnt)] == (
            addresses
        )
        _assert_maps_consistent(balancer)
        _assert_weights_follow(weights, balancer.phy2log, rank, world)
        stats = balancer.stats
        assert stats.balancedness_after > stats.balancedness_before
        ids = _skewed_ids(torch.Generator().manual_seed(20 + rank), 300, 2, 2)
        _assert_routes_to_holders(balancer, ids, 2)
        balancer.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("keep_slots", [False, True])
def test_two_ranks_over_gloo(keep_slots):
    mp.spawn(_two_rank_checks, args=(2, _free_port(), keep_slots), nprocs=2, join=True)


def _run_example(*extra: str) -> subprocess.CompletedProcess[str]:
    """examples/moe_ep_example.py on the CPU, 6 steps of 48 tokens, with ``extra`` flags."""
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "moe_ep_example.py"),
            *("--device", "cpu", "--steps", "6", "--tokens", "48"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_example_runs_and_balancedness_improves():
    result = _run_example()
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"balancedness before ([\d.]+) after ([\d.]+)", result.stdout)
    assert match, result.stdout
    assert float(match[2]) > float(match[1])
    assert "outputs match" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_route_in_a_cuda_graph_follows_in_place_rebalances():
    balancer = _balancer(device="cuda")
    weights = [[w.cuda() for w in layer] for layer in _encoded_weights(balancer.phy2log, 0, 1)]
    generator = torch.Generator().manual_seed(30)
    static_ids = _skewed_ids(generator, 64, 2, 0).cuda()
    # Warm up on a side stream before capture, as torch.cuda.graphs requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        balancer.route(0, static_ids, record=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_slots = balancer.route(0, static_ids)

    recorded = torch.zeros(EXPERTS, dtype=torch.int64)
    for step in range(1, balancer.step_interval + balancer.apply_delay + 1):
        ids = _skewed_ids(generator, 64, 2, 0)
        static_ids.copy_(ids)
        graph.replay()
        if step <= balancer.step_interval:
            recorded += torch.bincount(ids.reshape(-1), minlength=EXPERTS)
        assert torch.equal(balancer.phy2log[0][static_slots], static_ids)
        # A long kernel ahead of step(): if step() waited for the GPU (a host
        # sync), the stream would be idle when it returns. The apply step is
        # left out: the weight rearrangement may sync.
        torch.cuda._sleep(1_000_000_000)
        balancer.step(weights)
        if step != balancer.step_interval + balancer.apply_delay:
            assert not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
    assert balancer.stats.rebalances == 1
    expected = rebalance_experts(
        torch.cat([recorded[None], torch.zeros(LAYERS - 1, EXPERTS, dtype=torch.int64)]).numpy(),
        SLOTS,
        GROUPS,
        1,
        1,
    )
    assert torch.equal(balancer.phy2log.cpu(), torch.from_numpy(expected[0]))
    # The captured graph reads the updated maps.
    static_ids.copy_(_skewed_ids(generator, 64, 2, 0))
    graph.replay()
    assert torch.equal(balancer.phy2log[0][static_slots], static_ids)
    _assert_weights_follow([[w.cpu() for w in layer] for layer in weights], balancer.phy2log, 0, 1)
    balancer.close()


def test_load_window_keeps_the_last_steps_only():
    window = LoadWindow(2, 1, 3, torch.device("cpu"))
    for ids in ([0, 0, 1], [2], [1, 1]):
        window.add(0, torch.tensor(ids))
        window.roll()
    # The first step ([0, 0, 1]) has left the window of 2.
    assert window.total.tolist() == [[0, 2, 1]]
    assert window.total.dtype == torch.int64


def test_default_options_prepare_ahead_and_keep_no_buffers():
    balancer = _balancer()
    assert balancer.rearrange == RearrangeOptions()
    assert balancer.rearrange.prepare_ahead and not balancer.rearrange.keep_buffers
    balancer.close()


def test_a_move_failed_once_begun_refuses_steps_until_reset_with_the_placement():
    balancer = _balancer()
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    old = balancer.phy2log.clone()
    cause = RuntimeError("rank 1 lost its link")
    balancer.error = RearrangeError.from_layers(
        "move", rank=0, cause=cause, layers_new=(0,), layers_old=(1,), layers_mixed=()
    )
    assert balancer.error.layers_changed == (0,)
    with pytest.raises(RuntimeError, match="reload the layers it names"):
        balancer.step(weights)
    assert balancer.stats.steps == 0  # refused before anything was counted
    with pytest.raises(ValueError, match="phy2log is required"):
        balancer.reset()
    balancer.reset(old)
    assert balancer.error is None
    balancer.step(weights)
    assert balancer.stats.steps == 1
    balancer.close()


def test_timeout_option_is_checked():
    assert RearrangeOptions().timeout == DEFAULT_TIMEOUT
    with pytest.raises(ValueError, match="timeout"):
        RearrangeOptions(timeout=0)
    with pytest.raises(TypeError, match="timeout"):
        RearrangeOptions(timeout="90")  # type: ignore[arg-type]


def test_example_recovers_from_an_injected_fault():
    timeout = 10.0
    result = _run_example("--inject-fault", "--fault-timeout", str(timeout))
    assert result.returncode == 0, result.stdout + result.stderr
    pattern = r"rank (\d): step \d+ raised RearrangeError after ([\d.]+) s"
    raised = re.findall(pattern, result.stdout)
    assert sorted(rank for rank, _ in raised) == ["0", "1"], result.stdout
    # Rank 1 posts its failure at once: rank 0 learns it long before the timeout.
    assert all(float(seconds) < timeout / 2 for _, seconds in raised), result.stdout
    # Rank 1 fails from the injected broken link itself, not from anything before it.
    assert re.search(
        r"rank 1: step \d+ raised RearrangeError .*\(cause ConnectionError\)", result.stdout
    ), result.stdout
    assert "step() refuses" in result.stdout
    assert "rebalanced again and the outputs match" in result.stdout


def test_the_placement_runs_in_the_service_where_it_can(monkeypatch):
    from eplb.production.cores import compiled_core_error

    if compiled_core_error() is not None:
        pytest.skip("the placement service needs the compiled core")

    def no_worker_placement(*args, **kwargs):
        raise AssertionError("the worker computed the placement")

    monkeypatch.setattr(serving, "rebalance_experts", no_worker_placement)
    balancer = _balancer(apply_delay=2, step_interval=4)
    assert balancer.placement_service is not None and balancer.placement_service_error is None
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    load = _run_until_rebalance(balancer, weights, torch.Generator().manual_seed(5))
    expected = rebalance_experts(load.numpy(), SLOTS, GROUPS, 1, 1)
    assert torch.equal(balancer.phy2log, torch.from_numpy(expected[0]))
    # A placement dropped by reset() while in the service (steps 7-8 start one)
    # leaves the service free for the next (steps 12 and 14).
    weights = _encoded_weights(balancer.phy2log, 0, 1)
    for _ in range(2):
        balancer.step(weights)
    balancer.reset()
    for _ in range(6):
        balancer.step(weights)
    assert balancer.stats.rebalances == 2 and balancer.stats.last_rebalance_step == 14
    balancer.close()
    assert not balancer.placement_service.running

    # apply_delay 1: the worker places and prepares back to back.
    soon = _balancer(apply_delay=1, step_interval=4)
    assert soon.placement_service is None and "apply_delay" in soon.placement_service_error
    soon.close()
    migrating = _balancer(apply_delay=2, step_interval=4, migration_tolerance=0.01)
    assert migrating.placement_service is None
    assert "migration-aware" in migrating.placement_service_error
    monkeypatch.setenv("EPLB_CORE", "numpy")
    numpy_core = _balancer(apply_delay=2, step_interval=4)
    assert numpy_core.placement_service is None and "numpy" in numpy_core.placement_service_error
