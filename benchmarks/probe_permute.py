"""What a layer's in-place slot permutation costs on one GPU, by method.

A diagnostic for the staged rebalance's design (not a benchmark of ours). On
one GPU every slot that changes expert gets it from another slot of the same
layer: the move is a permutation of slots. Today a staged chunk copies the
changed slots into a staging buffer (side stream) and back at the commit:
twice the bytes of a copy. This times, per layer of DeepSeek-V2-Lite's shape
(72 slots, three bf16 matrices of 2048 x 1408 each), GPU time from events:

- ``copy once``: one fused copy of every slot into a buffer (the floor: each
  byte read and written once);
- ``via staging``: into a buffer and back (today's staged move plus commit);
- ``chunked C MiB``: in place, column block by column block, each block
  gathered into a C MiB temporary (``index_select``) and scattered back
  (``index_copy_``): the temporary may stay in L2, so HBM sees about one read
  and one write per byte;
- ``triton cycles`` (where Triton is installed): a kernel whose programs each
  walk one cycle of the permutation for one column block, in registers;
- ``slot_moves B/W/P``: ``eplb.production.slot_moves`` (the general program:
  trees, replicas, cycles, staging rows) at B KiB per program, W warps, with (P)
  or without prefetch of the next move's row (the tuning sweep).

Every method's result is checked against ``layer[perm]``.

A second table (``--experts``, default 64) is a realistic rank of 2: the layer's
``--slots`` slots over 2 GPUs, random old and new placements with replicas, this
GPU's half: its changed slots come from its own slots or from staging rows that
a transfer filled (filled before timing, as the wire would). Per method, the
GPU time of what the compute stream does at a commit, or before it:

- ``today (move + commit)``: changed slots copied into staging (local sources
  and second copies of received experts), then staging into the slots;
- ``commit only``: staging into the changed slots (the floor of today's commit);
- ``slot_moves``: the in-place program (received rows read from staging).

Results checked against the new placement's weights (each expert's own rows).

    python benchmarks/probe_permute.py [--slots 72] [--repeats 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from eplb.production.slot_moves import apply_slot_moves, plan_slot_moves, triton_available


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slots", type=int, default=72)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--experts", type=int, default=64, help="experts of the 2-rank case")
    return p.parse_args()


def cycles_of(perm: list[int]) -> list[list[int]]:
    """Cycles of ``dst <- perm[dst]``, fixed points left out."""
    seen, cycles = [False] * len(perm), []
    for start in range(len(perm)):
        if seen[start] or perm[start] == start:
            continue
        cycle, slot = [], start
        while not seen[slot]:
            seen[slot] = True
            cycle.append(slot)
            slot = perm[slot]
        cycles.append(cycle)
    return cycles


def triton_mover() -> Callable[[torch.Tensor, list[list[int]]], None] | None:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def walk(base, order, starts, lengths, row, BLOCK: tl.constexpr):
        cycle, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row
        first = tl.load(starts + cycle)
        length = tl.load(lengths + cycle)
        head = tl.load(order + first).to(tl.int64)
        saved = tl.load(base + head * row + cols, mask=mask)
        current = head
        for i in range(1, length):
            nxt = tl.load(order + first + i).to(tl.int64)
            tl.store(
                base + current * row + cols, tl.load(base + nxt * row + cols, mask=mask), mask=mask
            )
            current = nxt
        tl.store(base + current * row + cols, saved, mask=mask)

    def move(tensor: torch.Tensor, cycles: list[list[int]]) -> None:
        flat = [s for c in cycles for s in c]
        order = torch.tensor(flat, dtype=torch.int32, device=tensor.device)
        lengths = torch.tensor([len(c) for c in cycles], dtype=torch.int32, device=tensor.device)
        starts = torch.cumsum(lengths, 0, dtype=torch.int32) - lengths
        row = tensor[0].numel()
        block = 4096
        walk[(len(cycles), triton.cdiv(row, block))](
            tensor, order, starts, lengths, row, BLOCK=block
        )

    return move


def main() -> None:
    args = parse_args()
    device = torch.device("cuda")
    shapes = ((args.hidden, args.ffn), (args.hidden, args.ffn), (args.ffn, args.hidden))
    layer = [torch.randn(args.slots, *s, device=device).to(torch.bfloat16) for s in shapes]
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(args.slots, generator=gen).tolist()
    cycles = cycles_of(perm)
    src = torch.tensor(perm, device=device)
    dst = torch.arange(args.slots, device=device)
    want = [t[src].clone() for t in layer]
    staging = [torch.empty_like(t) for t in layer]
    layer_bytes = sum(t.numel() * t.element_size() for t in layer)

    def copy_once() -> None:
        torch._foreach_copy_(
            [s[i] for s in staging for i in range(args.slots)],
            [t[perm[i]] for t in layer for i in range(args.slots)],
        )

    def via_staging() -> None:
        copy_once()
        torch._foreach_copy_(
            [t[i] for t in layer for i in range(args.slots)],
            [s[i] for s in staging for i in range(args.slots)],
        )

    def chunked(mib: int) -> Callable[[], None]:
        def run() -> None:
            for t in layer:
                flat = t.view(args.slots, -1)
                width = max(1, (mib << 20) // (args.slots * t.element_size()))
                for start in range(0, flat.shape[1], width):
                    part = flat[:, start : start + width]
                    part.index_copy_(0, dst, part.index_select(0, src))

        return run

    methods: list[tuple[str, Callable[[], None], bool]] = [
        ("copy once", copy_once, False),
        ("via staging", via_staging, True),
    ]
    for mib in (4, 8, 16, 32):
        methods.append((f"chunked {mib} MiB", chunked(mib), True))
    mover = triton_mover()
    if mover is not None:
        methods.append(("triton cycles", lambda: [mover(t, cycles) for t in layer], True))
    if triton_available():
        program = plan_slot_moves(np.arange(args.slots), np.array(perm), 0, 1)
        for kib, warps, prefetch in SWEEP:
            methods.append(
                (
                    f"slot_moves {kib}/{warps}/{'P' if prefetch else '-'}",
                    _slot_moves(layer, None, program, kib, warps, prefetch),
                    True,
                )
            )
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.slots} slots, "
        f"{layer_bytes / 2**20:.0f} MiB per layer, {len(cycles)} cycles (longest "
        f"{max(map(len, cycles))}); GPU ms per layer, median of {args.repeats}"
    )
    print(f"{'method':18s} {'ms':>8s} {'GB/s (2x bytes)':>16s} {'exact':>6s}")
    for name, run, in_place in methods:
        if in_place:
            for t, w in zip(layer, want, strict=True):  # start from the layer, check the result
                t.copy_(w[torch.argsort(src)])
            run()
            torch.cuda.synchronize()
            exact = all(torch.equal(t, w) for t, w in zip(layer, want, strict=True))
        else:
            run()
            torch.cuda.synchronize()
            exact = all(torch.equal(s, w) for s, w in zip(staging, want, strict=True))
        ms = _median_ms(run, args.repeats)
        print(f"{name:18s} {ms:8.3f} {2 * layer_bytes / ms / 1e6:16.0f} {exact!s:>6s}")
    two_ranks(args, shapes)


#: (KiB of a row per program, warps, prefetch) tried for slot_moves.
SWEEP = [(kib, w, p) for kib in (4, 8, 16, 32) for w in (4, 8) for p in (True, False)]


def _slot_moves(layer, staging, program, kib: int, warps: int, prefetch: bool):  # type: ignore[no-untyped-def]
    stagings = staging if staging is not None else [None] * len(layer)

    def run() -> None:
        for t, s in zip(layer, stagings, strict=True):
            apply_slot_moves(
                t, s, program, block_bytes=kib << 10, num_warps=warps, prefetch=prefetch
            )

    return run


def _median_ms(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def two_ranks(args: argparse.Namespace, shapes) -> None:  # type: ignore[no-untyped-def]
    """Rank 0 of 2: random old and new placements with replicas (see the docstring)."""
    rng = np.random.default_rng(1)
    slots, experts, per_rank = args.slots, args.experts, args.slots // 2

    def placement() -> np.ndarray:
        return rng.permutation(
            np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        )

    old, new = placement(), placement()
    program = plan_slot_moves(old, new, 0, 2)
    mine_old, mine_new = old[:per_rank], new[:per_rank]
    changed = np.flatnonzero(mine_old != mine_new).tolist()
    device = torch.device("cuda")
    # Each expert's own rows; the slots hold the old placement's, staging the received ones.
    rows = [torch.randn(experts, *s, device=device).to(torch.bfloat16) for s in shapes]
    old_t = torch.from_numpy(mine_old).to(device)
    new_t = torch.from_numpy(mine_new).to(device)
    layer = [r[old_t] for r in rows]
    staging = [r[new_t] for r in rows]  # rows the ops read hold the received expert
    want = [r[new_t] for r in rows]
    start = [t.clone() for t in layer]
    received = [s.clone() for s in staging]
    local = {int(d) for d, kind, _ in program.ops.tolist() if kind != 1}
    holder = {}
    for slot, expert in enumerate(mine_old.tolist()):
        holder.setdefault(expert, slot)
    firsts = {int(r) for r in program.received.tolist()}

    def today() -> None:
        # The launch's local copies (old slots) and post copies (staging rows of
        # received experts) into staging, then the commit: staging into the slots.
        dst, src = [], []
        for t, st in zip(layer, staging, strict=True):
            for d in changed:
                if d in local:
                    dst.append(st[d]), src.append(t[holder[int(mine_new[d])]])
                elif d not in firsts:
                    first = min(f for f in firsts if mine_new[f] == mine_new[d])
                    dst.append(st[d]), src.append(st[first])
        torch._foreach_copy_(dst, src)
        commit()

    def commit() -> None:
        torch._foreach_copy_(
            [t[d] for t in layer for d in changed], [s[d] for s in staging for d in changed]
        )

    methods = [("today (move + commit)", today), ("commit only", commit)]
    if triton_available():
        for kib, warps, prefetch in SWEEP:
            methods.append(
                (
                    f"slot_moves {kib}/{warps}/{'P' if prefetch else '-'}",
                    _slot_moves(layer, staging, program, kib, warps, prefetch),
                )
            )
    moved_bytes = len(changed) * sum(t[0].numel() * t.element_size() for t in layer)
    print(
        f"\n2 ranks, {slots} slots, {experts} experts; rank 0: {len(changed)} of {per_rank} "
        f"slots change ({len(local)} local, {len(changed) - len(local)} from "
        f"{len(firsts)} staging rows), {moved_bytes / 2**20:.0f} MiB written; GPU ms, "
        f"median of {args.repeats}"
    )
    print(f"{'method':22s} {'ms':>8s} {'GB/s (2x bytes)':>16s} {'exact':>6s}")
    for name, run in methods:
        for t, s in zip(layer + staging, start + received, strict=True):
            t.copy_(s)  # today's move writes staging rows from the slots: start afresh
        run()
        torch.cuda.synchronize()
        exact = all(torch.equal(t, w) for t, w in zip(layer, want, strict=True))
        ms = _median_ms(run, args.repeats)
        print(f"{name:22s} {ms:8.3f} {2 * moved_bytes / ms / 1e6:16.0f} {exact!s:>6s}")


if __name__ == "__main__":
    main()
