"""One rank of a fault scenario for tests/test_group_guard.py (run as a script, not collected).

Usage: python guard_ranks.py SCENARIO RANK WORLD PORT TIMEOUT OUT_DIR
(the misbehaving rank: EPLB_GUARD_FAULTY, default 1)

Every rank agrees on its arguments through a GroupGuard, then runs a small
ring move under it: STEPS steps, each sending this rank's tensor to the next
rank and receiving the previous rank's. The scenario makes one rank (FAULTY)
misbehave; every rank writes what it raised, and when, to OUT_DIR/RANK.json.
"""

from __future__ import annotations

import os
import signal
import time
import traceback

import torch
import torch.distributed as dist
from rank_report import report_then_wait, start_rank

from eplb.production.errors import AgreementError, GroupFault, RearrangeError
from eplb.production.group_guard import GroupGuard, GuardedCall

FAULTY = int(os.environ.get("EPLB_GUARD_FAULTY", "1"))
STEPS = 4


def _check(scenario: str, rank: int) -> tuple[None, dict[str, object]]:
    """This rank's argument checks: what a weight move would agree on."""
    if scenario == "agree_freeze" and rank == FAULTY:
        os.kill(os.getpid(), signal.SIGSTOP)
    if scenario == "memory_error" and rank == FAULTY:
        raise MemoryError("simulated: cannot allocate 2**62 experts")
    mbb = 2 << 20 if scenario == "mismatch" and rank == FAULTY else 1 << 20
    return None, {
        "new_phy2log": torch.arange(8).reshape(2, 4),
        "expert_weights": "[torch.float32 [2, 16]]",
        "max_batch_bytes": mbb,
        "buffers": False,
    }


def _move(scenario: str, rank: int, world: int, call: GuardedCall) -> list[float]:
    """The ring move; returns what this rank received, step by step."""
    got = []
    for step in range(STEPS):
        if step == 1 and rank == FAULTY:
            if scenario == "raise":
                raise RuntimeError("injected failure in the middle of the move")
            if scenario == "freeze":
                os.kill(os.getpid(), signal.SIGSTOP)
            if scenario == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        send = torch.full((16,), float(rank * 100 + step))
        recv = torch.empty(16)
        works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, send, (rank + 1) % world),
                dist.P2POp(dist.irecv, recv, (rank - 1) % world),
            ]
        )
        call.wait_works(works, f"step {step}", peers=[(rank + 1) % world, (rank - 1) % world])
        got.append(float(recv[0]))
    return got


def main() -> None:
    scenario, rank_i, world_i, timeout, out = start_rank()
    guard = GroupGuard(timeout=timeout)
    report: dict[str, object] = {"rank": rank_i}
    # A warm-up call: the pairs are connected before anything is timed.
    with guard.call("warm-up") as call:
        call.agree(lambda: (None, {"world": world_i}))
        _move("ok", rank_i, world_i, call)
        call.finish()
    start = time.monotonic()
    try:
        with guard.call("move") as call:
            call.agree(lambda: _check(scenario, rank_i))
            report["agreed_at"] = time.monotonic() - start
            report["received"] = _move(scenario, rank_i, world_i, call)
            call.finish()
        report["error"] = None
        if scenario == "ok":  # the store must not fill up with old calls' keys
            world = dist.group.WORLD
            assert world is not None
            store = world.get_group_store()
            keys = []
            for _ in range(6):
                with guard.call("again") as call:
                    call.agree(lambda: (None, {"world": world_i}))
                    call.finish()
                dist.barrier()
                keys.append(store.num_keys())
                dist.barrier()
            report["keys"] = keys
    except BaseException as exc:
        report.update(error=type(exc).__name__, message=str(exc))
        if isinstance(exc, GroupFault):
            report.update(failed_ranks=list(exc.failed_ranks), timed_out=exc.timed_out)
        if isinstance(exc, AgreementError):
            report.update(argument=exc.argument, ranks=list(exc.ranks))
        if not isinstance(exc, (GroupFault, AgreementError, RearrangeError, MemoryError)):
            report["traceback"] = traceback.format_exc()
    report["elapsed"] = time.monotonic() - start
    report["faulted"] = guard.faulted
    report_then_wait(out, rank_i, report)


if __name__ == "__main__":
    main()
