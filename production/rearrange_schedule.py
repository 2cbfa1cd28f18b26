"""When each byte of a rearrangement moves: steps, messages, write schedule, ring sizing.

Pure host code (numpy and plain Python, no torch): from a
:class:`~eplb.production.rearrange_plan.RearrangePlan` (what moves where), the
byte layout of one layer's tensors (:class:`Layout`) and a step budget, it
makes this rank's program, a list of :class:`Step`:

- :func:`split_steps` orders the plan's transfers and cuts them into pipeline
  steps (the same on every rank);
- :func:`program_messages` lays out one message per peer and direction per
  step (what the first steps need to start);
- :func:`program_writes` decides at the end of which step each slot is written
  (local copies wave by wave, unpacks, post copies), never before the last
  pack reading its old content;
- :func:`ring_depth` and :func:`buffer_bytes` size the receive ring the writes
  need.

The executor (:mod:`eplb.production.rearrange_executor`) runs a program; the
ordering rules it relies on are stated on :func:`program_writes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .rearrange_plan import RearrangePlan

__all__ = [
    "ALIGN",
    "FIRST_RECV_SLOTS",
    "HOST_LEAD",
    "RING_SLACK",
    "Layout",
    "LocalGroup",
    "Message",
    "Schedule",
    "Step",
    "Unpack",
    "buffer_bytes",
    "last_use",
    "layers_written",
    "local_waves",
    "program",
    "program_messages",
    "program_writes",
    "ring_depth",
    "slot_bytes",
    "split_steps",
]

_TURN_ROUNDS = 3  # see _deal_turns

# Receive buffers beyond what the plan's deferred writes need: steps the write
# stream may fall behind the wire (a layer's local copies run in a few steps)
# before the wire waits for it.
RING_SLACK = 2

# Steps the host issues messages and packs ahead of writes. A step whose writes
# take the host long to issue (a layer's local copies, wave after wave) then
# does not delay the next messages: NCCL's kernels start only when both ranks
# have issued them, so one rank's host running late stalls the link for both.
HOST_LEAD = 2

# Receive slots a call starts with: steps 0 .. HOST_LEAD are issued before the
# writes (and so the full ring depth) are known.
FIRST_RECV_SLOTS = HOST_LEAD + 1

# Regions inside a message start at multiples of this, so that each can be viewed
# as its tensor's dtype (view(dtype) needs an aligned offset) with aligned loads.
ALIGN = 64


@dataclass(frozen=True)
class Layout:
    """What every layer's tensor list looks like: bytes per slot of each tensor, and where."""

    slot_nbytes: tuple[int, ...]
    signature: str  # shapes and dtypes as given, for the cross-rank check

    def region(self, tensor: int, count: int) -> int:
        """Bytes one tensor's ``count`` slots take in a message, padded to ALIGN."""
        return -(-count * self.slot_nbytes[tensor] // ALIGN) * ALIGN


@dataclass
class Message:
    """One message to or from a peer (group rank).

    parts: (layer, tensor, byte offset, local slots) per region, in message order:
        the region holds that tensor's slots of those slots, one after another.
    """

    peer: int
    nbytes: int
    experts: int
    parts: list[tuple[int, int, int, list[int]]]


@dataclass
class Unpack:
    """Rows of one received message part written to their slots at some step."""

    step: int  # the step whose receive buffer holds them
    message: int  # index in that step's recvs
    layer: int
    tensor: int
    offset: int
    count: int  # rows in the part
    rows: list[int]  # which rows of the part
    slots: list[int]  # their destination slots


@dataclass
class LocalGroup:
    """Consecutive waves of one layer's local copies (see local_waves), run in one step.

    The layer's first group (``stages``) first copies ``staged`` to staging rows.
    """

    layer: int
    staged: list[int]
    waves: list[list[tuple[int, int]]]
    stages: bool


@dataclass
class Step:
    """This rank's share of one pipeline step, and the writes issued at its end."""

    sends: list[Message]
    recvs: list[Message]
    local: list[LocalGroup] = field(default_factory=list)
    unpacks: list[Unpack] = field(default_factory=list)
    post: list[tuple[int, list[int], list[int]]] = field(default_factory=list)


def program(plan: RearrangePlan, layout: Layout, rank: int, max_step_bytes: int) -> list[Step]:
    """This rank's steps: messages with their byte layout, and when each slot is written."""
    steps, sched = program_messages(plan, layout, rank, max_step_bytes)
    program_writes(plan, rank, steps, sched)
    return steps


@dataclass
class Schedule:
    """What :func:`program_writes` needs from :func:`program_messages`."""

    t: np.ndarray  # [T, 6] the plan's transfers in step order
    step_of: np.ndarray  # [T] the step of each
    last_pack: np.ndarray  # [layers, R/P] the last step packing each local slot


def program_messages(
    plan: RearrangePlan, layout: Layout, rank: int, max_step_bytes: int
) -> tuple[list[Step], Schedule]:
    """This rank's steps with their messages only: all the first steps need to start.

    The writes (:func:`program_writes`) are scheduled while the first steps
    move: they take longer to work out on the host than the messages.
    """
    per_rank = plan.slots_per_rank
    base = rank * per_rank
    order, step_of = split_steps(plan, sum(layout.slot_nbytes), max_step_bytes)
    t = plan.transfers[order]
    num_steps = int(step_of[-1]) + 1 if step_of.size else 1
    steps = [Step([], []) for _ in range(num_steps)]
    mine = t[:, 2] == rank
    last_pack = np.zeros((plan.num_layers, per_rank), dtype=np.int64)
    np.maximum.at(last_pack, (t[mine, 0], t[mine, 3] - base), step_of[mine])
    for s, messages in _messages(step_of[mine], t[mine][:, [0, 4, 3]] - [0, 0, base], layout):
        steps[s].sends = messages
    theirs = t[:, 4] == rank
    for s, messages in _messages(step_of[theirs], t[theirs][:, [0, 2, 5]] - [0, 0, base], layout):
        steps[s].recvs = messages
    return steps, Schedule(t, step_of, last_pack)


def program_writes(
    plan: RearrangePlan, rank: int, steps: list[Step], sched: Schedule, in_place: bool = True
) -> None:
    """Fill in when each slot is written: local copies, unpacks and post copies.

    in_place: False when the writes go to other tensors than the slots packs
    and local copies read (``rearrange_expert_weights(..., into=...)``): a
    layer's local copies are then one wave, nothing staged (the ordering
    below still holds, it only costs nothing then).

    A write to slot X is issued at the end of step s, after the packs of step
    s + 1 (the executor orders its streams so), so s >= (last step packing X) - 1;
    local copies of a layer run before unpacks and post copies that overwrite
    their sources. Slots are local here (0 .. R/P - 1). Per-slot facts are dense
    [layers, R/P] arrays.
    """
    per_rank = plan.slots_per_rank
    base = rank * per_rank
    t, step_of, last_pack = sched.t, sched.step_of, sched.last_pack
    num_steps = len(steps)

    # No write of a layer before the first step moving anything of it (or of a
    # later layer): a failure then leaves later layers untouched.
    first_step = np.full(plan.num_layers + 1, num_steps - 1, dtype=np.int64)
    np.minimum.at(first_step, t[:, 0], step_of)
    first_step = np.minimum.accumulate(first_step[::-1])[::-1]
    # [layers, R/P]: the first step at whose end a slot may be written.
    earliest = np.maximum(last_pack - 1, first_step[:-1, None])

    local = plan.local_copies[plan.local_copies[:, 2] // per_rank == rank] - [0, base, base]
    read_locally = np.zeros_like(earliest)  # step of the last local wave reading a slot
    layer_cuts = np.searchsorted(local[:, 0], np.arange(plan.num_layers + 1))
    for layer in range(plan.num_layers):
        rows = local[layer_cuts[layer] : layer_cuts[layer + 1], 1:]
        if not len(rows):
            continue
        if not in_place:
            # One wave: each copy as early as the packs of its destination allow.
            at = earliest[layer, rows[:, 1]]
            np.maximum.at(read_locally[layer], rows[:, 0], at)
            first = int(at.min())
            for when in np.unique(at).tolist():
                part: list[tuple[int, int]] = list(map(tuple, rows[at == when].tolist()))
                steps[when].local.append(LocalGroup(layer, [], [part], when == first))
            continue
        staged, waves = local_waves([(src, dst) for src, dst in rows.tolist()])
        # Each copy as early as the packs of its destination and the copies
        # reading that destination allow, not the whole layer at its last pack:
        # a late copy delays the receives into the slot it reads, and their
        # buffers stay taken. Readers come in earlier waves, so one pass in wave
        # order settles every copy; within a step, waves keep their order.
        read_at: dict[int, int] = dict.fromkeys(staged, int(first_step[layer]))
        pieces: dict[int, list[list[tuple[int, int]]]] = {}
        for wave in waves:
            parts: dict[int, list[tuple[int, int]]] = {}
            for src, dst in wave:
                at = max(int(earliest[layer, dst]), read_at.get(dst, 0))
                parts.setdefault(at, []).append((src, dst))
                if src >= 0:
                    read_at[src] = max(read_at.get(src, 0), at)
            for at, part in parts.items():
                pieces.setdefault(at, []).append(part)
        for slot, at in read_at.items():
            read_locally[layer, slot] = at
        read_locally[layer, staged] = np.maximum(read_locally[layer, staged], min(pieces))
        for at in sorted(pieces):
            steps[at].local.append(LocalGroup(layer, staged, pieces[at], at == min(pieces)))
    write_after = np.maximum(earliest, read_locally)

    filled = np.zeros_like(earliest)  # step at whose end a received slot is written
    for s, flight in enumerate(steps):
        for index, message in enumerate(flight.recvs):
            due: dict[int, tuple[list[int], list[int]]] = {}
            for layer, tensor, offset, slots in message.parts:
                if tensor == 0:  # every tensor of a layer has the same slots: shared lists
                    when = np.maximum(write_after[layer, slots], s)
                    filled[layer, slots] = when
                    due = {}
                    for row, (step, slot) in enumerate(zip(when.tolist(), slots, strict=True)):
                        rows, dsts = due.setdefault(step, ([], []))
                        rows.append(row)
                        dsts.append(slot)
                for step, (rows, dsts) in due.items():
                    steps[step].unpacks.append(
                        Unpack(s, index, layer, tensor, offset, len(slots), rows, dsts)
                    )
    post = plan.post_copies[plan.post_copies[:, 2] // per_rank == rank] - [0, base, base]
    for layer, src, dst in post.tolist():
        at = max(int(filled[layer, src]), int(write_after[layer, dst]))
        steps[at].post.append((layer, [src], [dst]))


def _messages(
    step_of: np.ndarray, rows: np.ndarray, layout: Layout
) -> list[tuple[int, list[Message]]]:
    """Per step, one message per peer, from (layer, peer, local slot) rows in plan order.

    step_of: [rows] int, the step of each row (non-decreasing).
    rows: [rows, 3] int, (layer, peer, local slot); layers ascend within a step
        (the plan's order), so each message holds its layers one after another.

    A message lays out its experts layer by layer, tensor by tensor: a region per
    (layer, tensor) with that tensor's rows of the layer's slots, in row order.
    Both sides of a message see the same rows in the same order.
    """
    if not len(rows):
        return []
    # Stable: within a (step, peer), the plan's (layer, expert) order is kept.
    sort = np.lexsort((rows[:, 1], step_of))
    rows, step_of = rows[sort], step_of[sort]
    new_message = np.ones(len(rows), dtype=bool)
    new_message[1:] = (np.diff(step_of) != 0) | (np.diff(rows[:, 1]) != 0)
    new_run = new_message.copy()  # a run: one layer of one message
    new_run[1:] |= np.diff(rows[:, 0]) != 0
    starts = np.flatnonzero(new_run)
    stops = np.append(starts[1:], len(rows)).tolist()
    # Whole arrays to Python once, then a loop over runs (a few per message):
    # this runs before the first byte moves.
    slots = rows[:, 2].tolist()
    found: dict[int, list[Message]] = {}
    message: Message | None = None
    for start, stop, opens, layer, peer, step in zip(
        starts.tolist(),
        stops,
        new_message[starts].tolist(),
        rows[starts, 0].tolist(),
        rows[starts, 1].tolist(),
        step_of[starts].tolist(),
        strict=True,
    ):
        if opens:
            message = Message(peer, 0, 0, [])
            found.setdefault(step, []).append(message)
        assert message is not None  # the first run opens a message
        mine = slots[start:stop]  # shared by the layer's tensors
        for tensor in range(len(layout.slot_nbytes)):
            message.parts.append((layer, tensor, message.nbytes, mine))
            message.nbytes += layout.region(tensor, len(mine))
        message.experts += len(mine)
    # All tensors empty: nothing to ship.
    return [(step, kept) for step, sent in found.items() if (kept := [m for m in sent if m.nbytes])]


def slot_bytes(steps: list[Step]) -> tuple[int, int]:
    """Bytes of one send and one receive ring slot: the most any step sends and receives."""
    sent = max((sum(m.nbytes for m in step.sends) for step in steps), default=0)
    received = max((sum(m.nbytes for m in step.recvs) for step in steps), default=0)
    return sent, received


def ring_depth(steps: list[Step], last_use: list[int], slack: int) -> int:
    """Receive ring slots: the most steps a write is deferred past its receive, + 1 + slack.

    last_use: per step, the last step whose writes read its receive buffers.
    """
    deferred = max((last - k for k, last in enumerate(last_use)), default=0)
    return min(len(steps), deferred + 1 + slack)


def buffer_bytes(steps: list[Step]) -> int:
    """Bytes of the two rings a call allocates for these steps (for reports)."""
    sent, received = slot_bytes(steps)
    depth = max(
        ring_depth(steps, last_use(steps), HOST_LEAD + RING_SLACK),
        min(FIRST_RECV_SLOTS, len(steps)),
    )
    return min(2, len(steps)) * sent + depth * received


def layers_written(step: Step) -> set[int]:
    return (
        {group.layer for group in step.local}
        | {unpack.layer for unpack in step.unpacks}
        | {layer for layer, _, _ in step.post}
    )


def last_use(steps: list[Step]) -> list[int]:
    """Per step, the last step whose writes read its receive buffers."""
    last = list(range(len(steps)))
    for k, step in enumerate(steps):
        for unpack in step.unpacks:
            last[unpack.step] = max(last[unpack.step], k)
    return last


def split_steps(
    plan: RearrangePlan, expert_nbytes: int, max_step_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Order the transfers and cut them into pipeline steps (same on every rank).

    expert_nbytes: bytes of one expert (all tensors of one slot).
    max_step_bytes: the most bytes one step may send plus receive on any rank; a
        step holds at least one transfer, so a lone expert may exceed it.

    Returns ``order`` [T] int64, the rows of ``plan.transfers`` in execution order,
    and ``step`` [T] int64, the step of each row of ``order`` (non-decreasing). Within a
    layer, transfers that read a slot this plan overwrites go first and those that
    write a slot something still reads go last, so that a slot's last read rarely
    comes after its write (the executor delays such writes); within those, the
    (sender, receiver) pairs take turns, so that every step uses every direction,
    and each pair sends first the slots that are overwritten first.
    """
    t = plan.transfers
    if not t.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    shape = (plan.num_layers, plan.num_slots)
    written = np.zeros(shape, dtype=bool)
    read = np.zeros(shape, dtype=bool)
    for table, src, dst in ((t, 3, 5), (plan.local_copies, 1, 2), (plan.post_copies, 1, 2)):
        written[table[:, 0], table[:, dst]] = True
        if table is not plan.post_copies:  # post copies read new content
            read[table[:, 0], table[:, src]] = True
    reads_written = written[t[:, 0], t[:, 3]]
    writes_read = read[t[:, 0], t[:, 5]]
    rank_class = np.where(reads_written, 0, 2) + writes_read
    # Slots a local copy overwrites: their old content is sent first, so that
    # the copy (and the receive into the slot it reads) need not wait.
    copied_into = np.zeros(shape, dtype=bool)
    copied_into[plan.local_copies[:, 0], plan.local_copies[:, 2]] = True
    turn = _deal_turns(t, rank_class, plan.num_slots, copied_into[t[:, 0], t[:, 3]])
    # The pairs take turns: the i-th transfer of every (sender, receiver) pair
    # before the (i+1)-th of any, so a step carries every direction at once.
    # Sorted by sender, steps went one way at a time and left the other
    # direction of each link idle (half the bandwidth).
    order = np.lexsort((t[:, 4], t[:, 2], turn, rank_class, t[:, 0]))
    # Every transfer weighs one expert, so the budget is a count per rank.
    per_step = max_step_bytes // expert_nbytes
    if per_step == 0:  # a lone expert exceeds the budget: one transfer per step
        return order, np.arange(order.size, dtype=np.int64)
    # A plain loop on ints: it runs before the first byte moves, and numpy per
    # row (or per step, for steps of a few experts) costs more than it saves.
    step = [0] * order.size
    used = [0] * plan.world_size
    current = 0
    ordered = t[order]
    for i, (src, dst) in enumerate(
        zip(ordered[:, 2].tolist(), ordered[:, 4].tolist(), strict=True)
    ):
        a, b = used[src], used[dst]
        if (a if a > b else b) >= per_step:  # never on a step's first transfer
            current += 1
            used = [0] * plan.world_size
        used[src] += 1
        used[dst] += 1
        step[i] = current
    return order, np.array(step, dtype=np.int64)


def _deal_turns(
    t: np.ndarray,
    rank_class: np.ndarray,
    num_slots: int,
    urgent: np.ndarray,
    rounds: int = _TURN_ROUNDS,
) -> np.ndarray:
    """[T] int64: each transfer's turn within its (layer, class, sender, receiver) group.

    A receive into a slot must wait until that slot's old content is sent (the
    executor keeps the received bytes buffered until then), so each pair sends
    first the slots that the other direction overwrites first: a few rounds of
    sorting every pair by the turn at which its source slot is written, starting
    from expert order. Fewer writes wait, and fewer receive buffers are needed.
    """
    slot_written = t[:, 0] * num_slots + t[:, 5]  # each slot is written at most once
    slot_read = t[:, 0] * num_slots + t[:, 3]
    by_written = np.argsort(slot_written)
    where = np.minimum(np.searchsorted(slot_written[by_written], slot_read), len(t) - 1)
    writer = by_written[where]
    has_writer = slot_written[writer] == slot_read
    key = np.where(urgent, -1, 0)
    # One int64 sort key per round, (group, key, expert), instead of a six-key
    # lexsort: this runs before the first byte moves. Group ids are dense ranks.
    by_group = np.lexsort((t[:, 4], t[:, 2], rank_class, t[:, 0]))
    group_key = np.stack([t[:, 0], rank_class, t[:, 2], t[:, 4]], axis=1)[by_group]
    new_group = np.ones(len(t), dtype=bool)
    new_group[1:] = (group_key[1:] != group_key[:-1]).any(axis=1)
    group = np.empty(len(t), dtype=np.int64)
    group[by_group] = np.cumsum(new_group) - 1
    experts = int(t[:, 1].max()) + 1
    keys = len(t) + 2  # key + 1 is in 0 .. len(t) + 1
    turn = np.zeros(len(t), dtype=np.int64)
    for _ in range(rounds + 1):
        grouped = np.argsort((group * keys + key + 1) * experts + t[:, 1], kind="stable")
        starts = np.ones(len(t), dtype=bool)
        starts[1:] = group[grouped[1:]] != group[grouped[:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(len(t)), 0))
        turn[grouped] = np.arange(len(t)) - first
        key = np.where(urgent, -1, np.where(has_writer, turn[writer], len(t)))
    return turn


def local_waves(copies: list[tuple[int, int]]) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Order one rank's local copies of one layer so that most go slot to slot.

    copies: (source slot, destination slot) pairs; each destination once, never
    its own source. A copy may only write a slot once every copy reading that
    slot's old content has run; where that is impossible (a cycle), one slot per
    cycle is staged first.

    Returns ``staged`` (slots whose old content goes to staging row i, before
    anything else) and ``waves``: lists of (source, destination) run one wave
    after another, copies within a wave independent. A source ``-1 - i`` means
    staging row i.
    """
    pending = {dst: src for src, dst in copies}
    readers: dict[int, int] = {}
    for src in pending.values():
        readers[src] = readers.get(src, 0) + 1
    staged: list[int] = []
    waves: list[list[tuple[int, int]]] = []
    while pending:
        ready = sorted(dst for dst in pending if not readers.get(dst, 0))
        if not ready:  # every slot left is still to be read: break one cycle
            slot = min(pending)
            for dst, src in pending.items():
                if src == slot:
                    pending[dst] = -1 - len(staged)
            staged.append(slot)
            readers[slot] = 0
            continue
        wave = []
        for dst in ready:
            src = pending.pop(dst)
            wave.append((src, dst))
            if src >= 0:
                readers[src] -= 1
        waves.append(wave)
    return staged, waves
