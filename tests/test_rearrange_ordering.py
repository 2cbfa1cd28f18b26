"""The executor's ordering, checked on the CPU with recording fakes of the streams and the wire.

On CUDA the executor's packs, messages and writes run on three streams that
meet only through events; the gloo suite runs them in host order, so a missing
wait never shows there. Here a recording stream layer gives every operation a
vector clock (streams as queues, events as the clocks they captured) and a
recording transport logs each step's messages as one operation reading its
send buffers and writing its receive buffers. Two operations touching the same
bytes, at least one writing, must be ordered by the events: a slot is written
only after every pack reading it, a send buffer is refilled only after its
messages, a receive buffer only after its unpacks. A write scheduled one step
early must be caught.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch

from eplb.production import plan_rearrangement
from eplb.production.rearrange_executor import run_steps
from eplb.production.rearrange_schedule import (
    Layout,
    Step,
    program,
    program_messages,
    program_writes,
)
from eplb.production.slot_work import SlotWork
from eplb.production.transport import Transport


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """The bytes ``t`` can touch: [first, last + 1) (conservative for strided views)."""
    if t.numel() == 0:
        return None
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    start = t.data_ptr()
    return start, start + (extent + 1) * t.element_size()


class RecordingStreams:
    """The executor's stream layer (use, wait, record, wait_event, copy), recording clocks."""

    cuda = False

    def __init__(self) -> None:
        self.current = "current"
        self.clocks: dict[str, dict[str, int]] = {}
        self.ops: list[tuple[str, dict[str, int], list, list, str]] = []

    def _clock(self, which: str) -> dict[str, int]:
        return self.clocks.setdefault(which, {})

    @contextlib.contextmanager
    def use(self, which: str) -> Iterator[None]:
        before, self.current = self.current, which
        try:
            yield
        finally:
            self.current = before

    def _merge(self, which: str, other: dict[str, int]) -> None:
        mine = self._clock(which)
        for stream, tick in other.items():
            mine[stream] = max(mine.get(stream, 0), tick)

    def wait(self, which: str, other: str) -> None:
        self._merge(which, dict(self._clock(other)))

    def record(self, which: str) -> dict[str, int]:
        return dict(self._clock(which))

    def wait_event(self, which: str, event: dict[str, int] | None) -> None:
        if event is None:
            raise AssertionError(f"the {which} stream waits for an event never recorded")
        self._merge(which, event)

    def op(self, reads: Sequence[torch.Tensor], writes: Sequence[torch.Tensor], label: str) -> None:
        clock = self._clock(self.current)
        clock[self.current] = clock.get(self.current, 0) + 1
        spans = [[s for t in ts if (s := _span(t))] for ts in (reads, writes)]
        self.ops.append((self.current, dict(clock), spans[0], spans[1], label))

    def copy(self, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        self.op(sources, destinations, "copy")
        torch._foreach_copy_(destinations, sources)


class RecordingTransport(Transport):
    """Logs each step's messages as one operation on the current stream; delivers nothing."""

    def __init__(self, streams: RecordingStreams) -> None:
        self.streams = streams

    def post(self, sends, recvs) -> object:
        self.streams.op([b for _, b in sends], [b for _, b in recvs], "wire")
        return None

    def wait(self, pending: object) -> None:
        pass

    def warm_up(self, device: torch.device) -> None:
        pass


def races(ops: list[tuple[str, dict[str, int], list, list, str]]) -> list[tuple[int, int]]:
    """Pairs of operations touching the same bytes (one writing) that no event orders."""

    def overlap(a: list, b: list) -> bool:
        return any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)

    found = []
    for j, (_, clock_j, reads_j, writes_j, _) in enumerate(ops):
        for i in range(j):
            stream_i, clock_i, reads_i, writes_i, _ = ops[i]
            if clock_i[stream_i] <= clock_j.get(stream_i, 0):
                continue  # i happens before j
            if (
                overlap(writes_i, reads_j)
                or overlap(reads_i, writes_j)
                or overlap(writes_i, writes_j)
            ):
                found.append((i, j))
    return found


TENSORS = ((3, 4), (5,))  # slot shapes of a layer's tensors (float32, contiguous)


def _case(seed: int, ranks: int, budget: int) -> tuple[np.ndarray, np.ndarray, Layout, int]:
    rng = np.random.default_rng(seed)
    layers, per_rank = 3, 4
    slots = ranks * per_rank
    experts = slots - 2
    old = np.stack([rng.permutation(np.arange(slots) % experts) for _ in range(layers)])
    new = np.stack([rng.permutation(row) for row in old])
    new[:, 0] = old[:, -1]  # an expert crosses from the last rank to the first
    nbytes = tuple(4 * int(np.prod(shape)) for shape in TENSORS)
    return old, new, Layout(nbytes, "f32"), budget


def _record(steps: list[Step], per_rank: int, layers: int) -> RecordingStreams:
    weights = [[torch.zeros(per_rank, *shape) for shape in TENSORS] for _ in range(layers)]
    streams = RecordingStreams()
    run_steps(
        steps,
        SlotWork(weights, steps, ahead=False),
        torch.device("cpu"),
        RecordingTransport(streams),
        False,
        lambda: None,
        contextlib.nullcontext,
        streams,
    )
    return streams


def _steps(seed: int, ranks: int, budget: int, rank: int) -> tuple[list[Step], int, int]:
    old, new, layout, budget = _case(seed, ranks, budget)
    plan = plan_rearrangement(old, new, ranks)
    return program(plan, layout, rank, budget), plan.slots_per_rank, plan.num_layers


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("budget", [1, 200, 1 << 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_conflicting_pair_is_ordered_by_events(seed, ranks, budget):
    for rank in range(ranks):
        steps, per_rank, layers = _steps(seed, ranks, budget, rank)
        streams = _record(steps, per_rank, layers)
        assert any(label == "wire" for *_, label in streams.ops) or len(steps) == 1
        assert races(streams.ops) == [], f"rank {rank}"


def _one_step_early(steps: list[Step], kind: str) -> bool:
    """Move one unpack a step earlier than the schedule put it; whether one was found.

    kind "receive": an unpack at its own receive step (it then reads the buffer
    before the message lands); "pack": an unpack at the step before the last
    pack reading its slot (it then overwrites the slot before that pack).
    """
    last_pack: dict[tuple[int, int], int] = {}
    for k, step in enumerate(steps):
        for message in step.sends:
            for layer, _, _, mine in message.parts:
                for slot in mine:
                    last_pack[layer, slot] = k
    for j in range(1, len(steps)):
        for unpack in steps[j].unpacks:
            if kind == "receive":
                hit = unpack.step == j
            else:
                packs = [last_pack.get((unpack.layer, s), -1) for s in unpack.slots]
                hit = max(packs) == j + 1 and unpack.step < j
            if hit:
                steps[j].unpacks.remove(unpack)
                steps[j - 1].unpacks.append(unpack)
                return True
    return False


@pytest.mark.parametrize("kind", ["receive", "pack"])
def test_a_write_scheduled_one_step_early_is_caught(kind):
    for seed in range(40):
        for rank in range(2):
            steps, per_rank, layers = _steps(seed, 2, 1, rank)
            if _one_step_early(steps, kind):
                assert races(_record(steps, per_rank, layers).ops) != []
                return
    pytest.fail(f"no case has an unpack of kind {kind!r} to move")


def test_a_missing_wait_for_the_pack_is_caught():
    # The checker itself: without the write stream's wait for the next pack, a
    # slot is overwritten while a pack may still read it.
    steps, per_rank, layers = _steps(0, 2, 1, 0)
    streams = RecordingStreams()
    waits = streams.wait_event
    streams.wait_event = lambda which, event: None if which == "write" else waits(which, event)
    weights = [[torch.zeros(per_rank, *shape) for shape in TENSORS] for _ in range(layers)]
    run_steps(
        steps,
        SlotWork(weights, steps, ahead=False),
        torch.device("cpu"),
        RecordingTransport(streams),
        False,
        lambda: None,
        contextlib.nullcontext,
        streams,
    )
    assert races(streams.ops) != []


@pytest.mark.parametrize("in_place", [True, False])
def test_writes_can_go_to_a_destination_other_than_the_live_slots(in_place):
    # SlotWork(into=...): the seam a staged move uses. Packs and local copies
    # read the live slots, every write lands in ``into``; the live slots keep
    # the old placement. One rank, so the copies are all local and checkable.
    # The in-place schedule works there too; the other one (what
    # rearrange_expert_weights(into=...) uses) has one wave and no staging.
    rng = np.random.default_rng(3)
    layers, slots = 3, 8
    old = np.stack([rng.permutation(np.arange(slots) % 6) for _ in range(layers)])
    new = np.stack([rng.permutation(row) for row in old])
    plan = plan_rearrangement(old, new, 1)
    nbytes = tuple(4 * int(np.prod(shape)) for shape in TENSORS)
    steps, sched = program_messages(plan, Layout(nbytes, "f32"), 0, 1 << 20)
    program_writes(plan, 0, steps, sched, in_place)
    local = [group for step in steps for group in step.local]
    assert local and (in_place or all(len(g.waves) == 1 and not g.staged for g in local))
    weights = [
        [
            torch.from_numpy(old[layer])
            .float()
            .reshape(-1, *[1] * len(shape))
            .expand(-1, *shape)
            .contiguous()
            for shape in TENSORS
        ]
        for layer in range(layers)
    ]
    before = [[t.clone() for t in layer] for layer in weights]
    into = [[torch.full_like(t, -1.0) for t in layer] for layer in weights]
    streams = RecordingStreams()
    run_steps(
        steps,
        SlotWork(weights, steps, ahead=False, into=into),
        torch.device("cpu"),
        RecordingTransport(streams),
        False,
        lambda: None,
        contextlib.nullcontext,
        streams,
    )
    assert races(streams.ops) == []
    for layer in range(layers):
        for tensor in range(len(TENSORS)):
            assert torch.equal(weights[layer][tensor], before[layer][tensor])
            for slot in range(slots):
                row = into[layer][tensor][slot]
                if old[layer, slot] == new[layer, slot]:
                    assert (row == -1).all()  # unchanged slots are not written
                else:
                    assert (row == float(new[layer, slot])).all(), (layer, tensor, slot)


class _DeviceStreams(RecordingStreams):
    """The recording fake as CUDA streams: run_steps then ends with its host wait."""

    cuda = True


class _WaitingTransport(RecordingTransport):
    def __init__(self, streams: RecordingStreams) -> None:
        super().__init__(streams)
        self.host_waits: list[str] = []

    def wait_device(self, done: object, what: str) -> None:
        self.host_waits.append(what)


@pytest.mark.parametrize("host_wait", [True, False])
@pytest.mark.parametrize("ranks", [1, 2])
def test_the_host_waits_for_the_last_messages_only_where_there_are_messages(ranks, host_wait):
    # A peer that froze leaves this rank's messages pending: the host waits for
    # them, within the deadline. Without messages (one rank) nothing can hold
    # the move up, and waiting would only wait for the work queued before it.
    # host_wait=False (a staged launch on CUDA): never; its vote is that wait.
    old, new, layout, _ = _case(4, ranks, 1 << 20)
    plan = plan_rearrangement(old, new, ranks)
    steps = program(plan, layout, 0, 1 << 20)
    weights = [[torch.zeros(plan.slots_per_rank, *s) for s in TENSORS] for _ in range(3)]
    streams = _DeviceStreams()
    transport = _WaitingTransport(streams)
    run_steps(
        steps,
        SlotWork(weights, steps, ahead=False),
        torch.device("cpu"),
        transport,
        False,
        lambda: None,
        contextlib.nullcontext,
        streams,
        host_wait=host_wait,
    )
    messages = any(step.sends or step.recvs for step in steps)
    assert messages == (ranks > 1)
    waited = messages and host_wait
    assert transport.host_waits == (["this rank's last messages"] if waited else [])
    assert races(streams.ops) == []  # ordered by events alone, either way
