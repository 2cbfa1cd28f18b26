"""Load statistics GPU -> host during serving: does eplb stall the GPU?

Run on a CUDA machine (one GPU is enough)::

    python benchmarks/check_transfer.py [--data-dir DIR]

Checks and prints, in one run:

1. correctness: ``eplb.production.rebalance_experts`` on a CUDA load (float32,
   bfloat16, int64) returns on the load's device exactly what it returns on CPU,
   also when the kernel that writes the load is still queued on the stream
   (the copy must wait for it, and only for it);
2. no stall of other streams: while a side stream runs a long sleep kernel,
   the call on the serving stream returns after its own copy, not after the
   sleep, and never calls ``torch.cuda.synchronize`` (it is replaced by a trap
   during the call). A baseline that calls ``torch.cuda.synchronize()`` (the
   device-wide wait) is timed the same way;
3. the cost of the copies: one ``[58, 256]`` float32 copy into pinned memory vs
   58 per-layer blocking ``.cpu()`` copies; the whole call vs a blocking
   baseline (``.cpu()``, placement, ``.to(device)``).

On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from eplb.loads import find_data_dir, read_load, synthetic_load
from eplb.production import rebalance_experts

_CONFIG = (288, 8, 4, 32)  # DeepSeek-V3: R, G, N, P


def _median_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _sleep_cycles_for(ms: float) -> int:
    """Cycles of torch.cuda._sleep that last about ``ms`` on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * ms / start.elapsed_time(end))


def _refuse_synchronize(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch.cuda.synchronize() called inside rebalance_experts")


def _load(data_dir: str | None) -> np.ndarray:
    folder = Path(data_dir) if data_dir else find_data_dir()
    if folder is None:
        print("real loads not found: a synthetic DeepSeek-V3-shaped load is used")
        return synthetic_load(58, 256, seed=0)
    return read_load(folder / "decode_in1000out1000.json")[3:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder of the real load JSON files")
    parser.add_argument("--sleep-ms", type=float, default=300.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_transfer: no CUDA device here; nothing to measure.")
        return 0
    torch.set_num_threads(1)
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    host = _load(args.data_dir)
    failures = []

    # 1. Correctness on the device.
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        cpu_in = torch.from_numpy(host).to(dtype)
        got = rebalance_experts(cpu_in.to(device), *_CONFIG)
        want = rebalance_experts(cpu_in, *_CONFIG)
        same = all(
            g.device.type == "cuda" and torch.equal(g.cpu(), w)
            for g, w in zip(got, want, strict=True)
        )
        print(f"[{'ok' if same else 'FAIL'}] CUDA {dtype} input: same maps as CPU, on {device}")
        if not same:
            failures.append(f"CUDA {dtype}")
    weight = torch.from_numpy(host).float().to(device)
    torch.cuda.synchronize()

    # 1b. A load still being written: the copy must wait for its producer.
    want = rebalance_experts(weight.cpu(), *_CONFIG)
    torch.cuda._sleep(_sleep_cycles_for(50.0))  # delays the producer below
    pending = weight * 1.0  # queued behind the sleep on the same stream
    got = rebalance_experts(pending, *_CONFIG)
    same = all(torch.equal(g.cpu(), w) for g, w in zip(got, want, strict=True))
    print(f"[{'ok' if same else 'FAIL'}] load still being written: the copy waited for it")
    if not same:
        failures.append("pending load")
    torch.cuda.synchronize()

    # 2. A long kernel on a side stream must not be waited for.
    cycles = _sleep_cycles_for(args.sleep_ms)
    side = torch.cuda.Stream()
    rows = []
    for name, call in (
        ("eplb rebalance_experts", lambda: rebalance_experts(weight, *_CONFIG)),
        (
            "baseline: synchronize, .cpu(), placement",
            lambda: (
                torch.cuda.synchronize(),
                rebalance_experts(weight.cpu(), *_CONFIG),
            ),
        ),
    ):
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(cycles)
        trap = name.startswith("eplb")
        real_synchronize = torch.cuda.synchronize
        if trap:
            torch.cuda.synchronize = _refuse_synchronize  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            call()
            returned_ms = (time.perf_counter() - start) * 1e3
            side_busy = not side.query()
        finally:
            torch.cuda.synchronize = real_synchronize
        torch.cuda.synchronize()
        rows.append((name, returned_ms, side_busy))
    print(f"\nside stream sleeping {args.sleep_ms:.0f} ms; call on the serving stream:")
    print(f"{'call':44} {'returned after ms':>18} {'side stream still busy':>23}")
    for name, ms, busy in rows:
        print(f"{name:44} {ms:18.2f} {busy!s:>23}")
    ours_ms, ours_busy = rows[0][1], rows[0][2]
    if not (ours_busy and ours_ms < args.sleep_ms / 4):
        failures.append("eplb waited for another stream")
    print(f"[{'ok' if ours_busy else 'FAIL'}] eplb returned while the side stream still ran")

    # 3. Copy and call costs.
    pinned = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)

    def one_copy() -> None:
        pinned.copy_(weight, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()

    def per_layer() -> None:
        for layer in range(weight.shape[0]):
            weight[layer].cpu()

    def blocking_call() -> None:
        maps = rebalance_experts(weight.cpu(), *_CONFIG)
        for m in maps:
            m.to(device)

    def ours() -> None:
        maps = rebalance_experts(weight, *_CONFIG)
        maps[0].device  # noqa: B018 - results stay on the device; nothing waits for them

    torch.cuda.synchronize()
    table = [
        ("load D2H: one pinned non_blocking copy + event", _median_ms(one_copy), None),
        ("load D2H: 58 per-layer .cpu() copies", _median_ms(per_layer), None),
        ("rebalance, CUDA in/out (eplb)", _median_ms(ours), None),
        ("rebalance, blocking .cpu() + .to(device) x3", _median_ms(blocking_call), None),
    ]
    print(f"\n{'what (DeepSeek-V3 shape, 58 x 256)':52} {'median ms':>10}")
    for name, ms, _ in table:
        print(f"{name:52} {ms:10.3f}")
    print(f"per-layer copies / one copy: {table[1][1] / table[0][1]:.1f}x")
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
