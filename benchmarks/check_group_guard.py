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
   and whether a collective after it fails instead of hanging;
4. with 2 GPUs or more, a weight move over NCCL between 2 processes in which
   rank 1 raises, then one in which it freezes (SIGSTOP), in the middle of the
   move: rank 0 must raise RearrangeError (cause GroupFault) within
   ``--move-timeout`` seconds (raise: well under it), its communicator
   aborted, never a host or a stream stuck in the collective. Prints the
   seconds rank 0 took and the layers it reports. One GPU: "needs 2 GPUs".

Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eplb.production import rearrange_expert_weights, warmup_rearrangement
from eplb.production.errors import RearrangeError
from eplb.production.group_guard import GroupFault, GroupGuard, abort_group
from eplb.production.transport import TorchDistributedTransport

_LAYERS, _PER_RANK, _SLOT_FLOATS = 8, 4, 1 << 20  # 4 MiB per slot


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


def _move_rank(scenario: str, rank: int, port: int, timeout: float, out: str) -> None:
    """One rank of a 2-process NCCL move in which rank 1 raises or freezes at its 4th step."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    warmup_rearrangement(timeout=timeout)
    slots = 2 * _PER_RANK
    old = torch.arange(slots).remainder(slots - 2).expand(_LAYERS, -1)
    new = old.roll(_PER_RANK, dims=1)
    weights = [[torch.zeros(_PER_RANK, _SLOT_FLOATS, device="cuda")] for _ in range(_LAYERS)]
    if rank == 1:
        original, waits = TorchDistributedTransport.wait, []

        def misbehaving(self: Any, pending: object) -> None:
            waits.append(1)
            if len(waits) == 4:
                if scenario == "raise":
                    raise RuntimeError("injected failure in the middle of the move")
                os.kill(os.getpid(), signal.SIGSTOP)
            original(self, pending)

        TorchDistributedTransport.wait = misbehaving  # type: ignore[method-assign]
    report: dict[str, Any] = {"error": None}
    start = time.monotonic()
    try:  # one expert per step: many steps
        rearrange_expert_weights(old, new, weights, max_batch_bytes=1, timeout=timeout)
    except RearrangeError as exc:
        report.update(
            error="RearrangeError",
            cause=type(exc.cause).__name__,
            layers=[list(exc.layers_new), list(exc.layers_old), list(exc.layers_mixed)],
        )
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["seconds"] = time.monotonic() - start
    Path(out, f"{rank}.json").write_text(json.dumps(report))
    time.sleep(600)  # killed by the parent; an aborted NCCL group cannot be torn down
    os._exit(0)


def _moves(timeout: float) -> bool:
    if torch.cuda.device_count() < 2:
        _row("NCCL move with a failing rank", "needs 2 GPUs")
        return True
    ok = True
    for scenario in ("raise", "freeze"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as out:
            common = ["--scenario", scenario, "--port", str(port), "--out", out]
            common += ["--move-timeout", str(timeout)]
            procs = [
                subprocess.Popen([sys.executable, __file__, "--rank", str(rank), *common])
                for rank in range(2)
            ]
            report_path = Path(out, "0.json")
            limit = time.monotonic() + timeout + 120
            while not report_path.exists() and time.monotonic() < limit:
                time.sleep(0.1)
            for proc in procs:
                proc.kill()
                proc.wait()
            report = json.loads(report_path.read_text()) if report_path.exists() else None
        if report is None:
            _row(f"NCCL move, rank 1 {scenario}s: rank 0", "NO REPORT (hung?)")
            ok = False
            continue
        bound = timeout / 2 if scenario == "raise" else timeout + 3
        passed = report.get("cause") == "GroupFault" and report["seconds"] < bound
        _row(
            f"NCCL move, rank 1 {scenario}s: rank 0 raised after (s)",
            f"{report['seconds']:.2f} (bound {bound:g}): {report.get('error')} "
            f"cause {report.get('cause')}, layers new/old/mixed {report.get('layers')}",
        )
        ok &= passed
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kernel-ms", type=float, default=200.0)
    parser.add_argument("--move-timeout", type=float, default=10.0)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="raise", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        _move_rank(args.scenario, args.rank, args.port, args.move_timeout, args.out)
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
        ok &= _moves(args.move_timeout)
        _row("all checks", "pass" if ok else "FAIL")
        if backend != "nccl":
            dist.destroy_process_group()
    sys.stdout.flush()
    # An aborted NCCL group cannot be torn down cleanly: leave without it.
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
