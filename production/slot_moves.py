"""A layer's slot moves on one rank, done in place: the program and its executor.

When a placement changes, every local slot whose expert changes gets the new
expert either from another local slot that holds it under the old placement (a
**local move**) or from a **staging row** that a transfer from another rank
filled. :func:`plan_slot_moves` orders the moves so that they can be done in
the weight tensor itself, without copying the changing slots out first;
:func:`apply_slot_moves` runs that order on one weight tensor.

The local moves form a functional graph: each changed slot reads one source, a
source may feed several slots. Its components (slots linked by local moves,
unchanged slots and staging rows left out, since nothing writes them) are
trees hanging off a cycle, or trees whose root reads an unchanged slot or a
staging row. Within a component a slot is written only after every slot that
reads it: tree slots deepest first, then the cycle, whose first slot's old
content is saved (in registers, per column block, by the kernel) and written
into the cycle's last slot at the end. Components share no slot they write, so
they run in parallel; so do column blocks (each byte of a row moves on its own).

Which slots are staged lines up with
:func:`eplb.production.plan_rearrangement` (``rearrange_plan``): a changed slot
whose new expert this rank holds in some old slot is moved locally (the plan's
local copy; the source may differ, see :func:`plan_slot_moves`, which costs no
byte on the wire); every other changed slot reads the staging row of the
lowest local slot that needs the same expert, which is the slot the plan's
transfer fills (``transfers[:, 5]``); the plan's post copies are those reads
by further slots. ``rearrange_expert_weights(..., into=staging)`` writes those
rows (with staging shaped like the layer, one row per local slot).

Triton is optional: without it, on the CPU, or where rows are not dense, the
same program runs through torch copies, wave by wave (the i-th move of every
component together), which is exact too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .slot_work import bit_view, copy_all

__all__ = [
    "FROM_SAVED",
    "FROM_SLOT",
    "FROM_STAGING",
    "SlotMoves",
    "apply_slot_moves",
    "plan_slot_moves",
    "triton_available",
]

#: Kinds of source of one move (``SlotMoves.ops[:, 1]``).
FROM_SLOT, FROM_STAGING, FROM_SAVED = 0, 1, 2

# Bytes of one row each kernel program moves per move, and its warps.
# Chosen on an H200 with benchmarks/probe_permute.py (see the README).
_BLOCK_BYTES = 4096
_NUM_WARPS = 4
_PREFETCH = True
_MAX_BLOCKS = 65535  # CUDA's limit on the grid's second dimension


@dataclass(frozen=True)
class SlotMoves:
    """One layer's in-place move program on one rank (host arrays, read-only).

    ops: [moves, 3] int32 rows (destination, kind, index), destination a local
        slot; kind FROM_SLOT: read local slot ``index`` (its old content);
        FROM_STAGING: read staging row ``index``; FROM_SAVED: write the old
        content of the component's saved slot (``index`` is that slot). Grouped
        by component, each group in the order it must run.
    components: [components, 3] int32 rows (start, length, saved): the ops
        ``start .. start + length - 1`` run in order; ``saved`` is the slot whose
        old content is kept before the first op (a cycle's first slot; its
        FROM_SAVED op is the group's last), or -1. Longest first.
    received: [rows] int32, ascending: the staging rows the ops read, each the
        local slot the rearrangement's transfer fills with that expert.
    num_slots: local slots of the layer (the weight tensor's first dimension).
    """

    ops: np.ndarray
    components: np.ndarray
    received: np.ndarray
    num_slots: int
    _on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def staging_rows(self) -> int:
        """Rows a staging tensor needs: one past the highest row read (0 if none)."""
        return int(self.received[-1]) + 1 if self.received.size else 0

    def sources(self) -> np.ndarray:
        """[num_slots] int64, what each slot holds after the moves: its own old content
        (``s``) where nothing writes it, old slot ``s`` where a move or cycle brings it,
        or ``-1 - row`` for a staging row. A gather with this gives the same result."""
        out = np.arange(self.num_slots, dtype=np.int64)
        for dst, kind, index in self.ops.tolist():
            out[dst] = -1 - index if kind == FROM_STAGING else index
        return out

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``components`` and ``ops`` as int32 tensors on ``device``, copied once and kept.

        On CUDA the copy is queued on the current stream from pinned memory (no
        host wait); later calls return the same tensors.
        """
        device = torch.device(device)
        cached = self._on_device.get(device)
        if cached is None:
            packed = torch.from_numpy(np.concatenate([self.components.ravel(), self.ops.ravel()]))
            if device.type == "cuda":
                packed = packed.pin_memory().to(device, non_blocking=True)
            else:
                packed = packed.to(device)
            split = 3 * len(self.components)
            cached = self._on_device[device] = (packed[:split], packed[split:])
        return cached


def plan_slot_moves(
    old_phy2log: object, new_phy2log: object, rank: int, world_size: int
) -> SlotMoves:
    """The in-place moves of one layer's slots on ``rank`` (pure host code).

    old_phy2log: [R] int, the expert each slot of the layer holds now (all ranks).
    new_phy2log: [R] int, the expert each slot must hold afterwards; every id
        must be held in ``old_phy2log``.
    rank, world_size: rank ``rank`` of ``world_size`` holds slots
        ``rank * R / P .. (rank + 1) * R / P - 1``.

    A changed slot whose new expert this rank holds moves it from a local slot:
    one that keeps its expert if any (nothing then orders the move), else the
    lowest. Raises TypeError/ValueError naming the argument on bad input.
    """
    old, new = _check_rows(old_phy2log, new_phy2log, rank, world_size)
    per_rank = old.size // world_size
    base = rank * per_rank
    old_l = old[base : base + per_rank].tolist()
    new_l = new[base : base + per_rank].tolist()
    changed = [a != b for a, b in zip(old_l, new_l, strict=True)]
    holder: dict[int, int] = {}
    for slot, expert in enumerate(old_l):
        current = holder.get(expert)
        if current is None or (changed[current] and not changed[slot]):
            holder[expert] = slot
    # source[d]: a local slot >= 0, or -1 - row for a staging row.
    source = [0] * per_rank
    row_of: dict[int, int] = {}
    for slot in range(per_rank):
        if changed[slot]:
            local = holder.get(new_l[slot])
            source[slot] = local if local is not None else -1 - row_of.setdefault(new_l[slot], slot)
    groups = _components(changed, source)
    groups.sort(key=lambda group: -len(group[0]))
    ops: list[tuple[int, int, int]] = []
    components = []
    for order, saved in groups:
        components.append((len(ops), len(order), saved))
        for dst in order:
            src = source[dst]
            if src < 0:
                ops.append((dst, FROM_STAGING, -1 - src))
            else:
                ops.append((dst, FROM_SLOT, src))
        if saved >= 0:  # the cycle's last slot takes the saved slot's old content
            ops[-1] = (ops[-1][0], FROM_SAVED, saved)
    return SlotMoves(
        ops=_frozen(np.array(ops, dtype=np.int32).reshape(-1, 3)),
        components=_frozen(np.array(components, dtype=np.int32).reshape(-1, 3)),
        received=_frozen(np.array(sorted(row_of.values()), dtype=np.int32)),
        num_slots=per_rank,
    )


def _components(changed: list[bool], source: list[int]) -> list[tuple[list[int], int]]:
    """Each component's slots in the order they are written, and its saved slot (or -1).

    changed: [slots] whether each local slot is written; source: [slots] its
    source (a local slot, or < 0 for staging). Only reads of a changed slot
    link slots; a cycle's slots are ``c0 <- c1 <- ... <- c(m-1) <- c0``, c0 saved.
    """
    slots = len(changed)
    comp = [-1] * slots  # component of each changed slot
    depth = [0] * slots  # moves between the slot and its root (a cycle slot or a terminal)
    cycles: list[list[int]] = []  # per component, its cycle or []
    for start in range(slots):
        if not changed[start] or comp[start] >= 0:
            continue
        path: list[int] = []
        on_path: dict[int, int] = {}
        slot = start
        while slot >= 0 and changed[slot] and comp[slot] < 0 and slot not in on_path:
            on_path[slot] = len(path)
            path.append(slot)
            slot = source[slot]
        if slot >= 0 and slot in on_path:  # a new cycle: path[at:]
            at = on_path[slot]
            cid, below = len(cycles), 0
            cycles.append(path[at:])
            for s in path[at:]:
                comp[s], depth[s] = cid, 0
            path = path[:at]
        elif slot >= 0 and changed[slot]:  # joins a known component
            cid, below = comp[slot], depth[slot]
        else:  # reads a terminal: the path's last slot roots a new component
            cid, below = len(cycles), -1
            cycles.append([])
        for k, s in enumerate(reversed(path)):
            comp[s], depth[s] = cid, below + 1 + k
    members: list[list[int]] = [[] for _ in cycles]
    for slot in range(slots):
        if comp[slot] >= 0 and (not cycles[comp[slot]] or depth[slot] > 0):
            members[comp[slot]].append(slot)
    groups = []
    for cid, cycle in enumerate(cycles):
        # Deepest first: a slot's readers are one deeper, so all run before it.
        order = sorted(members[cid], key=lambda s: (-depth[s], s))
        groups.append((order + cycle, cycle[0] if cycle else -1))
    return groups


def apply_slot_moves(
    tensor: torch.Tensor,
    staging: torch.Tensor | None,
    program: SlotMoves,
    *,
    block_bytes: int = _BLOCK_BYTES,
    num_warps: int = _NUM_WARPS,
    prefetch: bool = _PREFETCH,
) -> None:
    """Run ``program`` on one weight tensor, in place, on the current stream.

    tensor: [num_slots, ...] one tensor of the layer's weights, local slots.
    staging: [rows, ...] same trailing shape, dtype and device, rows >=
        ``program.staging_rows`` (None if the program reads no staging row).
    block_bytes, num_warps, prefetch: the kernel's tuning (bytes of a row per
        program, warps per program, whether a move's load is issued before the
        previous move's store); ignored by the torch path.

    On CUDA with Triton, one kernel (grid: components x column blocks); else
    torch copies wave by wave. Both are exact for every dtype (bits are moved).
    Raises TypeError/ValueError naming the argument on bad input.
    """
    _check_apply(tensor, staging, program)
    if block_bytes < 1 or num_warps < 1:
        raise ValueError(
            f"block_bytes and num_warps must be >= 1, got {block_bytes} and {num_warps}"
        )
    if not len(program.components):
        return
    rows = _dense_rows(tensor, staging) if tensor.is_cuda else None
    launch = _kernel() if rows is not None else None
    if launch is None or rows is None:
        _run_waves(tensor, staging, program)
        return
    slots, stage = rows
    comps, ops = program.on(tensor.device)
    width = slots.shape[1]
    # Words per program: a power of two (Triton's rule), few enough blocks for CUDA's grid.
    words = max(16, block_bytes // slots.element_size(), -(-width // _MAX_BLOCKS))
    block = 1 << (words - 1).bit_length()
    grid = (len(program.components), -(-width // block))
    launch[grid](
        slots,
        slots if stage is None else stage,
        comps,
        ops,
        width,
        slots.stride(0),
        slots.stride(0) if stage is None else stage.stride(0),
        BLOCK=block,
        PREFETCH=prefetch,
        num_warps=num_warps,
    )


def triton_available() -> bool:
    """Whether the Triton kernel can be used (Triton importable)."""
    return _kernel() is not None


def _check_rows(
    old_phy2log: object, new_phy2log: object, rank: int, world_size: int
) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for name, row in (("old_phy2log", old_phy2log), ("new_phy2log", new_phy2log)):
        if isinstance(row, torch.Tensor):
            row = row.detach().cpu().numpy()
        if not isinstance(row, (np.ndarray, list, tuple)):
            raise TypeError(f"{name} must be a 1-D int array, got {type(row).__name__}")
        array = np.asarray(row)
        if array.ndim != 1 or not array.size:
            raise ValueError(f"{name} must be a non-empty 1-D row, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
        if (array < 0).any():
            raise ValueError(f"{name} must hold expert ids >= 0, got {int(array.min())}")
        rows.append(array.astype(np.int64))
    old, new = rows
    if old.shape != new.shape:
        raise ValueError(
            f"old_phy2log and new_phy2log must have the same length, got {old.size} and {new.size}"
        )
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or old.size % world_size:
        raise ValueError(
            f"world_size must be >= 1 and divide the row's {old.size} slots, got {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    missing = np.setdiff1d(new, old)
    if missing.size:
        raise ValueError(
            f"new_phy2log holds expert {int(missing[0])}, which no slot of old_phy2log holds"
        )
    return old, new


def _check_apply(tensor: object, staging: object, program: object) -> None:
    if not isinstance(program, SlotMoves):
        raise TypeError(f"program must be a SlotMoves, got {type(program).__name__}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 1 or tensor.shape[0] != program.num_slots:
        raise ValueError(
            f"tensor must have the program's {program.num_slots} slots in its first "
            f"dimension, got shape {tuple(tensor.shape)}"
        )
    if staging is None:
        if program.staging_rows:
            raise ValueError(f"staging is None but the program reads {program.staging_rows} rows")
        return
    if not isinstance(staging, torch.Tensor):
        raise TypeError(f"staging must be a torch.Tensor or None, got {type(staging).__name__}")
    if staging.shape[1:] != tensor.shape[1:] or staging.shape[0] < program.staging_rows:
        raise ValueError(
            f"staging must be [>= {program.staging_rows}, *{tuple(tensor.shape[1:])}], "
            f"got {tuple(staging.shape)}"
        )
    if staging.dtype != tensor.dtype or staging.device != tensor.device:
        raise ValueError(
            f"staging must have tensor's dtype and device ({tensor.dtype}, {tensor.device}), "
            f"got {staging.dtype}, {staging.device}"
        )


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _dense_rows(
    tensor: torch.Tensor, staging: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """[slots, words] integer views of both (the same word), or None where a row is not dense."""
    views = [bit_view(t) for t in (tensor, staging) if t is not None]
    if any(v.dim() != 2 or v.stride(1) != 1 for v in views):
        return None
    if len({v.dtype for v in views}) > 1:  # differently aligned: fall back to bytes
        views = [v.view(torch.uint8) for v in views]
    return views[0], (views[1] if len(views) > 1 else None)


def _run_waves(tensor: torch.Tensor, staging: torch.Tensor | None, program: SlotMoves) -> None:
    """The program through torch copies: the i-th op of every component in one batch.

    Components write disjoint slots and read only their own slots, unchanged
    slots and staging, so running their i-th ops together is the kernel's
    order; each batch is a list of row copies (bits, so every dtype is exact).
    """
    rows = bit_view(tensor).unbind(0)
    staged = bit_view(staging).unbind(0) if staging is not None else ()
    comps = program.components.tolist()
    ops = program.ops.tolist()
    saved = {s: rows[s].clone() for _, _, s in comps if s >= 0}
    for wave in range(max((length for _, length, _ in comps), default=0)):
        dsts, srcs = [], []
        for start, length, _ in comps:
            if wave < length:
                dst, kind, index = ops[start + wave]
                dsts.append(rows[dst])
                if kind == FROM_SLOT:
                    srcs.append(rows[index])
                elif kind == FROM_STAGING:
                    srcs.append(staged[index])
                else:
                    srcs.append(saved[index])
        copy_all(dsts, srcs)


_KERNEL: list[Any] = []  # [the jitted kernel, or None without Triton], made on first use


def _kernel() -> Any:
    if not _KERNEL:
        _KERNEL.append(_make_kernel())
    return _KERNEL[0]


def _make_kernel() -> Any:
    """The Triton kernel, or None where Triton does not import (it is optional)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _moves(slots, stage, comps, ops, width, slot_stride, stage_stride, BLOCK: tl.constexpr,
               PREFETCH: tl.constexpr):  # fmt: skip
        # One program: one component's ops, in order, for one block of columns.
        # Masks that depend on a scalar are written as a column limit (0: none);
        # an op's source row is a pointer chosen between staging and the slots.
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        comp = comps + 3 * tl.program_id(0)
        start = tl.load(comp)
        length = tl.load(comp + 1)
        saved = tl.load(comp + 2)
        closes = saved >= 0
        kept = tl.load(
            slots + tl.maximum(saved, 0).to(tl.int64) * slot_stride + cols,
            mask=cols < tl.where(closes, width, 0),
        )
        count = length - closes.to(tl.int32)
        if PREFETCH:
            # No op reads a slot an earlier op of its program wrote, so the next
            # op's load may go before this op's store: two rows in flight.
            op = ops + 3 * start
            index = tl.load(op + 2).to(tl.int64)
            row = tl.where(
                tl.load(op + 1) == 1, stage + index * stage_stride, slots + index * slot_stride
            )
            value = tl.load(row + cols, mask=cols < tl.where(count > 0, width, 0))
            for i in range(count):
                op = ops + 3 * (start + i)
                more = i + 1 < count
                ahead = op + 3 * more.to(tl.int32)  # the next op, or this one again
                index = tl.load(ahead + 2).to(tl.int64)
                row = tl.where(
                    tl.load(ahead + 1) == 1,
                    stage + index * stage_stride,
                    slots + index * slot_stride,
                )
                following = tl.load(row + cols, mask=cols < tl.where(more, width, 0))
                tl.store(slots + tl.load(op).to(tl.int64) * slot_stride + cols, value, mask=mask)
                value = following
        else:
            for i in range(count):
                op = ops + 3 * (start + i)
                index = tl.load(op + 2).to(tl.int64)
                row = tl.where(
                    tl.load(op + 1) == 1, stage + index * stage_stride, slots + index * slot_stride
                )
                value = tl.load(row + cols, mask=mask)
                tl.store(slots + tl.load(op).to(tl.int64) * slot_stride + cols, value, mask=mask)
        if closes:
            last = tl.load(ops + 3 * (start + length - 1)).to(tl.int64)
            tl.store(slots + last * slot_stride + cols, kept, mask=mask)

    return _moves
