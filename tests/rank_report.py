"""The start and the end of every fault-scenario rank script (fault_ranks, guard_ranks,
load_fault_ranks): ``SCENARIO RANK WORLD PORT TIMEOUT OUT_DIR`` in, OUT_DIR/RANK.json out."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist


def start_rank() -> tuple[str, int, int, float, str]:
    """(scenario, rank, world, timeout, out) from the command line, with this rank joined
    to a gloo group of ``world`` over TCP, whose own timeout is the default the code
    under test must beat (30 minutes)."""
    scenario, rank, world, port, timeout, out = sys.argv[1:]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=int(rank),
        world_size=int(world),
        timeout=timedelta(minutes=30),
    )
    return scenario, int(rank), int(world), float(timeout), out


def report_then_wait(out: str, rank: int, report: dict[str, Any]) -> None:
    """Write ``report`` to OUT/RANK.json at once (renamed into place), then stay alive until
    the test kills every rank: a rank that exits closes its gloo pairs (and rank 0 the
    store), which would tell the others too early; gloo also aborts the process if a group
    is destroyed while a failed receive is still posted."""
    Path(out, f"{rank}.json.tmp").write_text(json.dumps(report))
    Path(out, f"{rank}.json.tmp").rename(Path(out, f"{rank}.json"))
    time.sleep(300)
    os._exit(0)
