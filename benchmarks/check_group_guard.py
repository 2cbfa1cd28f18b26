"""Check what GroupGuard relies on in the installed torch, and time its waits.

Run on the GPU host (one process, one GPU; a group of one rank):

    python benchmarks/check_group_guard.py

and on any CPU machine (gloo; the CUDA rows print "no CUDA"). It prints:

1. which torch APIs exist (``ProcessGroup.get_group_store``, ``ProcessGroup.abort``,
   ``Store.multi_get``) for the backend in use;
2. a CUDA event wait with a deadline: a kernel that sleeps ``--kernel-ms``
   awaited by ``GuardedCall.wait_event`` (host polls ``event.query()``)
   beside ``event.synchronize()`` (the baseline, a blocking host wait), and
   the same kernel awaited with a deadline shorter than the kernel: it must
   raise GroupFault at the deadline, not at the kernel's end;
3. ``abort_group`` on an NCCL group of one rank after a fault (True if aborted)
   and whether a collective after it fails instead of hanging.

Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from eplb.production.group_guard import GroupFault, GroupGuard, abort_group


def _row(name: str, value: object) -> None:
    print(f"{name:<48} {value}")


def _apis(group: dist.ProcessGroup) -> bool:
    store = group.get_group_store() if hasattr(group, "get_group_store") else None
    _row("torch", torch.__version__)
    _row("backend", dist.get_backend(group))
    _row("ProcessGroup.get_group_store", store is not None)
    _row("ProcessGroup.abort", hasattr(group, "abort"))
    _row("c10d._abort_process_group", hasattr(dist.distributed_c10d, "_abort_process_group"))
    _row("Store.multi_get", store is not None and hasattr(store, "multi_get"))
    return store is not None


def _sleep_kernel(ms: float) -> torch.cuda.Event:
    """Queue a kernel that spins ``ms`` milliseconds; the event after it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    cycles_per_ms = 1_000_000 / start.elapsed_time(end)
    torch.cuda._sleep(int(ms * cycles_per_ms))
    done = torch.cuda.Event()
    done.record()
    return done


def _events(kernel_ms: float) -> bool:
    if not torch.cuda.is_available():
        _row("CUDA event waits", "no CUDA")
        return True
    ok = True
    for name in ("event.synchronize() (baseline)", "GuardedCall.wait_event"):
        times = []
        for _ in range(5):
            event = _sleep_kernel(kernel_ms)
            begin = time.perf_counter()
            if name.startswith("event"):
                event.synchronize()
            else:
                with GroupGuard(timeout=60).call("wait") as call:
                    call.wait_event(event)
            times.append((time.perf_counter() - begin) * 1e3)
        _row(f"{name}, {kernel_ms:g} ms kernel (ms, median)", f"{sorted(times)[2]:.2f}")
    deadline = kernel_ms / 4 / 1e3
    event = _sleep_kernel(kernel_ms)
    begin = time.perf_counter()
    try:
        with GroupGuard(timeout=deadline).call("wait") as call:
            call.wait_event(event)
        raised = "no"
        ok = False
    except GroupFault as exc:
        raised = f"GroupFault (timed_out={exc.timed_out})"
    waited = (time.perf_counter() - begin) * 1e3
    _row(f"deadline {deadline * 1e3:g} ms on a {kernel_ms:g} ms kernel", raised)
    _row("  raised after (ms)", f"{waited:.1f}")
    ok &= waited < kernel_ms / 2
    torch.cuda.synchronize()
    return ok


def _abort(group: dist.ProcessGroup) -> bool:
    if "nccl" not in str(dist.get_backend(group)):
        _row("abort_group (NCCL only)", "not NCCL: skipped")
        return True
    aborted = abort_group(group)
    _row("abort_group on NCCL", aborted)
    try:
        dist.all_reduce(torch.ones(1, device="cuda"), group=group)
        torch.cuda.synchronize()
        after = "a collective after abort returned (not refused)"
    except Exception as exc:  # what an aborted communicator raises varies by version
        after = f"refused: {type(exc).__name__}"
    _row("collective after abort", after)
    return aborted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kernel-ms", type=float, default=200.0)
    args = parser.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            backend, init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1
        )
        group = dist.group.WORLD
        assert group is not None
        ok = _apis(group)
        ok &= _events(args.kernel_ms)
        ok &= _abort(group)
        _row("all checks", "pass" if ok else "FAIL")
        if backend != "nccl":
            dist.destroy_process_group()
    sys.stdout.flush()
    # An aborted NCCL group cannot be torn down cleanly: leave without it.
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
