"""One rank of the balancer's load all-reduce fault for tests/test_serving_faults.py (a script).

Usage: python load_fault_ranks.py SCENARIO RANK WORLD PORT TIMEOUT OUT_DIR

Every rank serves steps of an ``ExpertBalancer`` on the CPU (gloo) with a
rebalance at step 2. Rank 1 misbehaves at that step: ``stop`` freezes it
(SIGSTOP) before its ``step()``, ``kill`` kills it (SIGKILL). Rank 0 reports
what its interval step raised and when, whether the group is then marked
faulted, and what ``reset()`` without and with a new group does, to
OUT_DIR/0.json; then every rank sleeps until the test kills it (see
fault_ranks.py on why no rank exits by itself).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
from rank_report import report_then_wait, start_rank

from eplb.production import ExpertBalancer, RearrangeOptions
from eplb.production.group_guard import fault_of

LAYERS, EXPERTS, SLOTS = 3, 4, 4


def main() -> None:
    scenario, rank, world, timeout, out = start_rank()
    group = dist.new_group(list(range(world)))
    balancer = ExpertBalancer(
        LAYERS,
        EXPERTS,
        SLOTS,
        1,
        1,
        device="cpu",
        group=group,
        window_size=2,
        step_interval=2,
        rearrange=RearrangeOptions(timeout=timeout),
    )
    local = SLOTS // world
    weights = [[torch.zeros(local, 2)] for _ in range(LAYERS)]
    balancer.step(weights)
    report: dict[str, Any] = {"rank": rank}
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP if scenario == "stop" else signal.SIGKILL)
    start = time.monotonic()
    try:
        balancer.step(weights)  # the interval step: the load's all-reduce
        report["error"] = None
    except Exception as exc:
        report.update(error=type(exc).__name__, message=str(exc))
    report["elapsed"] = time.monotonic() - start
    report["faulted"] = fault_of(group) is not None
    report["balancer_error"] = type(balancer.error).__name__ if balancer.error else None
    try:
        balancer.reset()
        report["reset"] = "accepted"
    except ValueError as exc:
        report["reset"] = str(exc)
    report_then_wait(out, rank, report)


if __name__ == "__main__":
    main()
