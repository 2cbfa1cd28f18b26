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
  walk one cycle of the permutation for one column block, in registers.

Every method's result is checked against ``layer[perm]``.

    python benchmarks/probe_permute.py [--slots 72] [--repeats 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slots", type=int, default=72)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--repeats", type=int, default=20)
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
        times = []
        for _ in range(args.repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        ms = sorted(times)[len(times) // 2]
        print(f"{name:18s} {ms:8.3f} {2 * layer_bytes / ms / 1e6:16.0f} {exact!s:>6s}")


if __name__ == "__main__":
    main()
