"""How NCCL send/recv between 2 GPUs shares the GPU with same-device copies.

A diagnostic for the rearrangement executor's design (not a benchmark of ours):
it times, on 2 ranks with NCCL, both ways at once,

- one message of ``--mib`` per direction, and the same bytes as many
  slot-sized messages (``--slot-mib``) sent straight from the slots of a
  larger tensor (no packing);
- a same-device copy of ``--copy-mib`` alone, as ``copy_`` calls (a
  cudaMemcpyAsync each) and as one ``torch._foreach_copy_`` (a fused kernel);
- both at once, on two streams, against the sum of the two alone;
- the one message cut into back-to-back steps (``--step-mib``, one batch of
  one send and one receive each, on one stream), alone and beside the copy:
  what each step costs beyond its bytes.

With ``--registered`` the wire buffers come from NCCL's allocator and are
registered with the communicator (NCCL >= 2.23 then moves intra-node
send/recv without its internal staging copies).

Run under different ``NCCL_MAX_CTAS`` / ``NCCL_MIN_CTAS`` to see how the
number of NCCL blocks changes the sharing::

    python benchmarks/probe_overlap.py
    NCCL_MIN_CTAS=32 NCCL_MAX_CTAS=32 python benchmarks/probe_overlap.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MIB = 1 << 20

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_chunks(table, num_chunks, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        """Each program copies chunks pid, pid + G, ...: (src address, dst address, words)."""
        pid = tl.program_id(0)
        for c in range(pid, num_chunks, tl.num_programs(0)):
            src = tl.load(table + 3 * c).to(tl.pointer_type(tl.int64))
            dst = tl.load(table + 3 * c + 1).to(tl.pointer_type(tl.int64))
            n = tl.load(table + 3 * c + 2)
            for start in range(0, CHUNK, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < n
                tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

except ImportError:  # pragma: no cover
    triton = None


def _timed(run: Callable[[], None], repeats: int) -> float:
    """Median ms over ``repeats`` of ``run``, all ranks started together, slowest rank."""
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        value = torch.tensor([time.perf_counter() - start], device="cuda")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        times.append(value.item() * 1e3)
    return statistics.median(times[1:])


def _worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl", init_method=f"file://{store}", rank=rank, world_size=2, device_id=device
    )
    peer = 1 - rank
    nbytes = args.mib * MIB
    slot = args.slot_mib * MIB
    slots = nbytes // slot
    # Slots of a tensor twice as large, every other one sent: strided like real slots.
    weights = torch.ones(2 * slots, slot, dtype=torch.uint8, device=device)
    into = torch.empty(2 * slots, slot, dtype=torch.uint8, device=device)
    pool = None
    if args.registered:  # NCCL's allocator, registered with the communicator (zero-copy P2P)
        backend = dist.group.WORLD._get_backend(device)
        pool = torch.cuda.MemPool(backend.mem_allocator)
        with torch.cuda.use_mem_pool(pool):
            flat_out = torch.ones(nbytes, dtype=torch.uint8, device=device)
            flat_in = torch.empty(nbytes, dtype=torch.uint8, device=device)
        backend.register_mem_pool(pool)
    else:
        flat_out = torch.ones(nbytes, dtype=torch.uint8, device=device)
        flat_in = torch.empty(nbytes, dtype=torch.uint8, device=device)
    chunk = args.chunk_mib * MIB
    chunks = args.copy_mib // args.chunk_mib
    copy_src = torch.ones(chunks, chunk, dtype=torch.uint8, device=device).view(torch.int64)
    copy_dst = torch.empty_like(copy_src)
    src_rows, dst_rows = list(copy_src.unbind(0)), list(copy_dst.unbind(0))
    side = torch.cuda.Stream()

    def wire_one() -> None:
        ops = [
            dist.P2POp(dist.isend, flat_out, peer),
            dist.P2POp(dist.irecv, flat_in, peer),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def wire_slots() -> None:
        ops = [dist.P2POp(dist.isend, weights[2 * i], peer) for i in range(slots)]
        ops += [dist.P2POp(dist.irecv, into[2 * i + 1], peer) for i in range(slots)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def wire_steps(step_mib: int) -> Callable[[], None]:
        cut = step_mib * MIB
        pieces = list(zip(flat_out.split(cut), flat_in.split(cut), strict=True))

        def run() -> None:
            for out, into_ in pieces:
                ops = [dist.P2POp(dist.isend, out, peer), dist.P2POp(dist.irecv, into_, peer)]
                for work in dist.batch_isend_irecv(ops):
                    work.wait()

        return run

    def copy_memcpy() -> None:
        for d, s in zip(dst_rows, src_rows, strict=True):
            d.copy_(s)

    def copy_foreach() -> None:
        torch._foreach_copy_(dst_rows, src_rows)

    def triton_copy(ctas: int) -> Callable[[], None]:
        chunk_words = 1 << 16
        rows = []
        for d, s_ in zip(dst_rows, src_rows, strict=True):
            n = s_.numel()
            for off in range(0, n, chunk_words):
                rows.append(
                    (s_.data_ptr() + 8 * off, d.data_ptr() + 8 * off, min(chunk_words, n - off))
                )
        table = torch.tensor(rows, dtype=torch.int64, device=device)

        def run() -> None:
            _copy_chunks[(ctas,)](table, len(rows), BLOCK=4096, CHUNK=chunk_words, num_warps=8)

        copy_dst.zero_()
        copy_src.random_()
        run()
        if not torch.equal(copy_dst, copy_src):
            raise SystemExit("triton copy differs")
        return run

    def both(wire: Callable[[], None], copy: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                copy()
            wire()
            torch.cuda.current_stream().wait_stream(side)

        return run

    wire_slots()  # warms up the channels
    results = {}
    wires = {"one message": wire_one}
    if not args.registered:  # slot messages come from unregistered memory
        wires["slot messages"] = wire_slots
    for step_mib in args.step_mib:
        wires[f"steps of {step_mib} MiB"] = wire_steps(step_mib)
    for name, wire in wires.items():
        results[f"wire, {name}"] = _timed(wire, args.repeats)
    copies = {"copy_ (memcpy)": copy_memcpy, "_foreach_copy_": copy_foreach}
    if triton is not None:
        for ctas in args.ctas:
            copies[f"triton {ctas} CTAs"] = triton_copy(ctas)
    for name, copy in copies.items():
        results[f"copy, {name}"] = _timed(copy, args.repeats)
    for wname, wire in wires.items():
        for cname, copy in copies.items():
            if wname == "one message" or cname == "_foreach_copy_":
                results[f"both, {wname} + {cname}"] = _timed(both(wire, copy), args.repeats)
    if pool is not None:
        torch.cuda.synchronize()
        dist.barrier()
        dist.group.WORLD._get_backend(device).deregister_mem_pool(pool)
    if rank == 0:
        env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
        print(
            f"NCCL {torch.cuda.nccl.version()}, env {env}, wire buffers "
            f"{'registered' if args.registered else 'not registered'}; "
            f"wire {args.mib} MiB per direction "
            f"({slots} slots of {args.slot_mib} MiB), copy {args.copy_mib} MiB "
            f"({chunks} chunks)"
        )
        for name, ms in results.items():
            if name.startswith("wire"):
                rate = f"{nbytes / ms / 1e6:7.1f} GB/s per direction"
            elif name.startswith("copy"):
                rate = f"{args.copy_mib * MIB / ms / 1e6:7.1f} GB/s copied"
            else:
                wire_ms = results["wire, " + name.split(", ", 1)[1].split(" + ")[0]]
                copy_ms = results["copy, " + name.split(" + ")[1]]
                rate = (
                    f"sum alone {wire_ms + copy_ms:7.2f} ms, max alone {max(wire_ms, copy_ms):.2f}"
                )
            print(f"  {name:<45} {ms:8.2f} ms  {rate}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=4096, help="bytes per direction on the wire")
    parser.add_argument("--slot-mib", type=int, default=28, help="one slot message")
    parser.add_argument("--copy-mib", type=int, default=4096, help="bytes copied on the side")
    parser.add_argument("--chunk-mib", type=int, default=28, help="one copy call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ctas", type=int, nargs="*", default=[16, 32, 48, 64, 96])
    parser.add_argument(
        "--registered",
        action="store_true",
        help="wire buffers from NCCL's allocator, registered with the communicator",
    )
    parser.add_argument(
        "--step-mib", type=int, nargs="*", default=[256, 512, 1024, 2048], help="wire steps"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, str(Path(tmp) / "store")), nprocs=2, join=True)


if __name__ == "__main__":
    main()
