"""A staged apply over NCCL in which one rank freezes or dies mid-chunk: the other must not hang.

On CUDA a staged launch's move returns without the host waiting for its
messages (``host_wait=False``): the commit's wait for the vote, bounded by the
staged ``timeout``, is the host's one wait for them. This checks, with 2
processes on 2 GPUs, that rank 0 then raises StagedApplyError within that
timeout and faults its group (NCCL communicator aborted, group marked: a
later guarded call refuses at once), for these scenarios of rank 1 at the
launch of chunk 1 (layers 2..3 of 8, K = 2, every slot crossing the wire):

- ``none``: no fault; the apply completes on both ranks, every layer's slots
  hold the new experts bit for bit (the weights are filled with expert ids),
  and rank 0's launches made no host wait for their messages;
- ``freeze-move``: rank 1 stops (SIGSTOP) in the middle of its chunk-1 move
  (its second pipeline step): rank 0's move ends at its closing round's
  deadline, inside the launch (RearrangeError, guard abort), and its next
  commit raises at once;
- ``freeze-vote``: rank 1 stops after its chunk-1 move returned, before its
  vote: rank 0's vote never completes, its commit times out;
- ``kill``: rank 1 dies (SIGKILL) at the same point.

Run on a machine with 2 GPUs (part ``staged-fault`` of run_gpu_suite.sh):

    python benchmarks/check_staged_faults.py [--timeout 10]

``--backend gloo`` runs the same on the CPU, as a check of the script (gloo's
host waits are on its works, not CUDA events, so ``host waits`` is 0 there
too; its communicator is not aborted). Prints one row per scenario (``host
waits``: rank 0's host waits for a move's messages, ``Transport.wait_device``;
``aborted``: what each ``abort_group`` returned); exits non-zero if a check
fails.
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

import numpy as np
import torch
import torch.distributed as dist

import eplb.production.staged as staged_module
from eplb.production import StagedApply, StagedApplyError, group_guard, warmup_rearrangement
from eplb.production.balancer_state import maps_from_phy2log
from eplb.production.errors import GroupFault
from eplb.production.transport import TorchDistributedTransport

_LAYERS, _PER_RANK, _EXPERTS, _SLOT_FLOATS = 8, 4, 6, 1 << 20  # 4 MiB per slot
SCENARIOS = ("none", "freeze-move", "freeze-vote", "kill")


def _misbehave(scenario: str) -> None:
    """Rank 1: break at the launch of chunk 1 as ``scenario`` says."""
    real_move, real_wait = staged_module.rearrange_expert_weights, TorchDistributedTransport.wait
    moves: list[int] = []
    waits: list[int] = []

    def move(*args: Any, **kwargs: Any) -> Any:
        moves.append(1)
        done = real_move(*args, **kwargs)
        if len(moves) == 2 and scenario in ("freeze-vote", "kill"):
            os.kill(os.getpid(), signal.SIGSTOP if scenario == "freeze-vote" else signal.SIGKILL)
        return done

    def wait(self: Any, pending: object) -> None:
        if len(moves) == 2 and scenario == "freeze-move":
            waits.append(1)
            if len(waits) == 2:
                os.kill(os.getpid(), signal.SIGSTOP)
        real_wait(self, pending)

    staged_module.rearrange_expert_weights = move
    TorchDistributedTransport.wait = wait  # type: ignore[method-assign]


def _rank(scenario: str, rank: int, port: int, timeout: float, backend: str, out: str) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    warmup_rearrangement(timeout=timeout)
    slots = 2 * _PER_RANK
    old = np.tile(np.arange(slots) % _EXPERTS, (_LAYERS, 1))
    new = np.roll(old, _PER_RANK, axis=1)  # every slot's expert crosses the wire
    replicas = 2
    live = [m.to(device) for m in maps_from_phy2log(old, _EXPERTS, replicas)]
    staged = StagedApply(*live, 2, max_batch_bytes=1, timeout=timeout)  # one expert per step
    mine = slice(rank * _PER_RANK, (rank + 1) * _PER_RANK)
    floats = _SLOT_FLOATS if device.type == "cuda" else 1024  # gloo: the CPU's memory copies
    weights = [
        [
            torch.tensor(old[layer, mine], dtype=torch.float32, device=device)[:, None]
            .expand(-1, floats)
            .contiguous()
        ]
        for layer in range(_LAYERS)
    ]
    move = staged.prepare(
        torch.from_numpy(old), maps_from_phy2log(new, _EXPERTS, replicas), weights
    )
    host_waits: list[str] = []
    real_device_wait = TorchDistributedTransport.wait_device

    def counted(self: Any, done: Any, what: str) -> None:
        host_waits.append(what)
        real_device_wait(self, done, what)

    TorchDistributedTransport.wait_device = counted  # type: ignore[method-assign]
    aborted: list[bool] = []
    real_abort = group_guard.abort_group

    def abort(group: Any) -> bool:
        aborted.append(real_abort(group))
        return aborted[-1]

    group_guard.abort_group = abort
    if rank == 1:
        _misbehave(scenario)
    report: dict[str, Any] = {"error": None}
    staged.begin(move, weights)
    start = time.monotonic()  # the step that launches chunk 1 (and commits chunk 0)
    try:
        while not staged.advance(weights):
            pass
        if device.type == "cuda":
            torch.cuda.synchronize()
        held = np.stack([w[0][:, 0].cpu().numpy() for w in weights])
        report["bits"] = bool((held == new[:, mine]).all())
    except StagedApplyError as exc:
        report.update(error="StagedApplyError", layers=[list(exc.layers_new), list(exc.layers_old)])
        report["cause"] = type(exc.__cause__).__name__ if exc.__cause__ else None
    report["seconds"] = time.monotonic() - start
    report["host_waits"] = len(host_waits)
    report["faulted"] = group_guard.fault_of(None) is not None
    report["aborted"] = aborted
    if report["faulted"]:
        begun = time.monotonic()
        try:
            warmup_rearrangement(timeout=timeout)
            report["refused"] = None
        except GroupFault:
            report["refused"] = time.monotonic() - begun
    Path(out, f"{rank}.json").write_text(json.dumps(report))
    time.sleep(600)  # killed by the parent; an aborted NCCL group cannot be torn down
    os._exit(0)


def _run(scenario: str, timeout: float, backend: str) -> dict[str, Any] | None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        options = ["--timeout", str(timeout), "--backend", backend]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, *options, "--child", scenario, str(r), str(port), out]
            )
            for r in range(2)
        ]
        wanted = [Path(out, "0.json")] + ([Path(out, "1.json")] if scenario == "none" else [])
        limit = time.monotonic() + timeout + 120
        while not all(p.exists() for p in wanted) and time.monotonic() < limit:
            time.sleep(0.1)
        time.sleep(0.2)  # the report is written in one call; let it land
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process dies only once resumed
            proc.kill()
            proc.wait()
        if not wanted[0].exists():
            return None
        report = json.loads(wanted[0].read_text())
        if scenario == "none" and wanted[-1].exists():
            report["bits1"] = json.loads(wanted[-1].read_text()).get("bits")
        return report


def _check(scenario: str, report: dict[str, Any], timeout: float, backend: str) -> bool:
    if scenario == "none":
        ok = report["error"] is None and report.get("bits") and report.get("bits1")
        return bool(ok and (backend != "nccl" or report["host_waits"] == 0))
    return (
        report["error"] == "StagedApplyError"
        and report["layers"] == [[0, 1], [2, 3, 4, 5, 6, 7]]
        and report["seconds"] < timeout + 3
        and report["faulted"]
        and report.get("refused") is not None
        and (backend != "nccl" or any(report["aborted"]))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--timeout", type=float, default=10.0, help="the staged timeout (s)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    # One rank of a scenario: "scenario rank port out" (the parent starts two).
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        scenario, rank, port, out = args.child
        _rank(scenario, int(rank), int(port), args.timeout, args.backend, out)
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        print("staged apply over NCCL with a failing rank: needs 2 GPUs")
        return 0
    print(f"backend {args.backend}, staged timeout {args.timeout:g} s, torch {torch.__version__}")
    header = (
        "rank 1",
        "rank 0 got",
        "cause",
        "s to raise",
        "layers new / old",
        "faulted",
        "aborted",
        "next call refused (s)",
        "host waits",
        "check",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    ok = True
    for scenario in args.scenarios.split(","):
        report = _run(scenario, args.timeout, args.backend)
        if report is None:
            print(f"| {scenario} | NO REPORT (hung?) |" + " |" * (len(header) - 2))
            ok = False
            continue
        passed = _check(scenario, report, args.timeout, args.backend)
        ok &= passed
        refused = report.get("refused")
        bits = report.get("bits") and report.get("bits1")
        got = report["error"] or f"completed, bits {bits}"
        cells = (
            scenario,
            got,
            report.get("cause") or "",
            f"{report['seconds']:.2f}",
            str(report.get("layers", "")),
            str(report["faulted"]),
            str(report["aborted"]),
            "" if refused is None else f"{refused:.3f}",
            str(report["host_waits"]),
            "pass" if passed else "FAIL",
        )
        print("| " + " | ".join(cells) + " |")
    print("all checks", "pass" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
