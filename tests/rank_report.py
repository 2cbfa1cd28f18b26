"""The end of every fault-scenario rank script (fault_ranks, guard_ranks, load_fault_ranks)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def report_then_wait(out: str, rank: int, report: dict[str, Any]) -> None:
    """Write ``report`` to OUT/RANK.json at once (renamed into place), then stay alive until
    the test kills every rank: a rank that exits closes its gloo pairs (and rank 0 the
    store), which would tell the others too early; gloo also aborts the process if a group
    is destroyed while a failed receive is still posted."""
    Path(out, f"{rank}.json.tmp").write_text(json.dumps(report))
    Path(out, f"{rank}.json.tmp").rename(Path(out, f"{rank}.json"))
    time.sleep(300)
    os._exit(0)
