"""What the guarded agreement costs beside the all-reduce agreement it replaces.

Before a weight move every rank must learn that every other rank accepted the
same arguments. Today that is one all-reduce of [refused flags, fingerprint]
(no deadline, no reason, no argument name); ``GroupGuard`` posts each rank's
verdict in the group's store instead (a deadline, the refusing rank's reason,
the differing argument's name) and can add a closing round (``finish``) so
that every rank sees one outcome. This times, per call, on ``--world`` gloo
ranks of this machine:

- baseline: ``dist.all_reduce`` of the verdict vector (what rearrange.py does);
- ``GuardedCall.agree`` (post, poll, read);
- ``agree`` + ``finish`` (the whole guarded call around an empty move).

    python benchmarks/bench_agreement.py [--world 4] [--iterations 200]

Prints the median and 90th percentile in ms, per rank 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.production.group_guard import GroupGuard


def _fields() -> dict[str, object]:
    maps = np.arange(58 * 288, dtype=np.int64).reshape(58, 288) % 256  # DeepSeek-V3's maps
    return {
        "old_phy2log": maps,
        "new_phy2log": maps[:, ::-1],
        "expert_weights": "[torch.float8_e4m3fn [9, 2048, 7168]] x3",
        "max_batch_bytes": 1 << 30,
        "buffers": False,
    }


def _time(run: Callable[[], None], iterations: int) -> list[float]:
    times = []
    for _ in range(iterations):
        dist.barrier()
        begin = time.perf_counter()
        run()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def _worker(rank: int, world: int, port: int, iterations: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    fields = _fields()
    guard = GroupGuard(timeout=60)

    def all_reduce() -> None:
        flags = torch.zeros(world + 2, dtype=torch.int64)
        flags[world] = 12345
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)

    def agree() -> None:
        with guard.call("bench") as call:
            call.agree(lambda: (None, fields))

    def agree_finish() -> None:
        with guard.call("bench") as call:
            call.agree(lambda: (None, fields))
            call.finish()

    rows = []
    for name, run in (
        ("all_reduce of the verdicts (baseline)", all_reduce),
        ("GuardedCall.agree", agree),
        ("GuardedCall.agree + finish", agree_finish),
    ):
        _time(run, 3)  # warm-up
        times = sorted(_time(run, iterations))
        rows.append((name, statistics.median(times), times[int(0.9 * (len(times) - 1))]))
    if rank == 0:
        print(f"torch {torch.__version__}, {world} gloo ranks, {iterations} calls each")
        print(f"{'per call (rank 0)':<40} {'median ms':>10} {'p90 ms':>10}")
        for name, median, p90 in rows:
            print(f"{name:<40} {median:>10.3f} {p90:>10.3f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(args.world, port, args.iterations), nprocs=args.world)


if __name__ == "__main__":
    main()
