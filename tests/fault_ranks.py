"""One rank of a weight-move fault scenario for tests/test_rearrange_faults.py (a script).

Usage: python fault_ranks.py SCENARIO RANK WORLD PORT TIMEOUT OUT_DIR
(the misbehaving rank: 1)

Every rank holds its slots of LAYERS layers, two tensors per layer; every
value of slot s in layer l is ``l * 1000 + expert`` (the second tensor twice
that), so the expert a slot holds can be read back from its bits. The ranks
warm up, then call ``rearrange_expert_weights`` once with a budget of one
expert per step (many steps). The scenario makes rank 1 misbehave:

- ``mismatch``: it passes another ``max_batch_bytes``;
- ``memory``: its ``expert_weights`` raise MemoryError when checked (a list
  whose ``len()`` does);
- ``raise``, ``stop``, ``kill``: at the wait of step MIDWAY (writes of earlier
  steps issued) it raises, freezes (SIGSTOP) or dies (SIGKILL). Injected by
  wrapping the public ``TorchDistributedTransport.wait``: the transport is the
  seam where a real wire would fail.

Every rank writes what it raised, when (seconds from the call), and which
expert each of its slots holds, to OUT_DIR/RANK.json, then sleeps until the
test kills it: a rank that exits closes its gloo pairs (and rank 0 the store),
and gloo aborts the process (SIGABRT) if a group is destroyed while a receive
posted by a failed move has not reached its deadline.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Any

import numpy as np
import torch
from rank_report import report_then_wait, start_rank

from eplb.production import rearrange_expert_weights, warmup_rearrangement
from eplb.production.errors import AgreementError, GroupFault, RearrangeError
from eplb.production.transport import TorchDistributedTransport

FAULTY = 1
LAYERS = 6
PER_RANK = 4
MIDWAY = 30  # the wait at which rank 1 misbehaves: 60 steps, its layers 0-1 written, 2 partly


def placements(world: int) -> tuple[np.ndarray, np.ndarray]:
    """[LAYERS, R] old and new placements: every layer moves experts between ranks."""
    slots = world * PER_RANK
    experts = slots - 2
    rng = np.random.default_rng(5)
    old = np.stack([rng.permutation(np.arange(slots) % experts) for _ in range(LAYERS)])
    new = np.stack([np.roll(row, PER_RANK + layer) for layer, row in enumerate(old)])
    return old, new


def weights(old: np.ndarray, rank: int) -> list[list[torch.Tensor]]:
    mine = old[:, rank * PER_RANK : (rank + 1) * PER_RANK]
    layers = []
    for layer, row in enumerate(mine):
        value = torch.from_numpy(layer * 1000.0 + row.astype(np.float64))
        layers.append([value[:, None].repeat(1, 5), (2 * value)[:, None].repeat(1, 3)])
    return layers


def held(layers: list[list[torch.Tensor]]) -> list[list[int]]:
    """Per layer, the expert each slot holds (-1 where its bits are not one expert's)."""
    out = []
    for layer, (first, second) in enumerate(layers):
        row = []
        for slot in range(first.shape[0]):
            values = set(first[slot].tolist()) | {v / 2 for v in second[slot].tolist()}
            one = len(values) == 1 and next(iter(values)) - layer * 1000
            row.append(int(one) if one is not False and 0 <= one < 1000 else -1)
        out.append(row)
    return out


class _Unmeasurable(list):  # type: ignore[type-arg]
    """Weights whose size cannot be taken: their check raises MemoryError on this rank."""

    def __len__(self) -> int:
        raise MemoryError("simulated: cannot allocate while checking expert_weights")


def main() -> None:
    scenario, rank, world, timeout, out = start_rank()
    warmup_rearrangement(timeout=timeout)
    old, new = placements(world)
    layers = weights(old, rank)
    given: Any = layers
    kwargs: dict[str, Any] = {"max_batch_bytes": 1, "timeout": timeout}
    if rank == FAULTY:
        if scenario == "mismatch":
            kwargs["max_batch_bytes"] = 2
        if scenario == "memory":
            given = _Unmeasurable(layers)
        if scenario in ("raise", "stop", "kill"):
            original = TorchDistributedTransport.wait
            waits = []

            def misbehaving(self: Any, pending: object) -> None:
                waits.append(1)
                if len(waits) == MIDWAY:
                    if scenario == "raise":
                        raise RuntimeError("injected failure in the middle of the move")
                    os.kill(os.getpid(), signal.SIGSTOP if scenario == "stop" else signal.SIGKILL)
                original(self, pending)

            TorchDistributedTransport.wait = misbehaving  # type: ignore[method-assign]
    report: dict[str, Any] = {"rank": rank, "old": old.tolist(), "new": new.tolist()}
    start = time.monotonic()
    try:
        rearrange_expert_weights(torch.from_numpy(old), torch.from_numpy(new), given, **kwargs)
        report["error"] = None
    except BaseException as exc:
        report.update(error=type(exc).__name__, message=str(exc))
        if isinstance(exc, RearrangeError):
            report.update(
                layers_new=list(exc.layers_new),
                layers_old=list(exc.layers_old),
                layers_mixed=list(exc.layers_mixed),
                cause=type(exc.cause).__name__,
            )
            if isinstance(exc.cause, GroupFault):
                report.update(failed_ranks=list(exc.cause.failed_ranks))
        if isinstance(exc, AgreementError):
            report.update(argument=exc.argument, ranks=list(exc.ranks))
        if not isinstance(exc, (RearrangeError, AgreementError, MemoryError, GroupFault)):
            report["traceback"] = traceback.format_exc()
    report["elapsed"] = time.monotonic() - start
    report["held"] = held(layers)
    report_then_wait(out, rank, report)


if __name__ == "__main__":
    main()
