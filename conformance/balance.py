"""Same balance: a placement that differs from SPEC.md's only where SPEC.md chose between equals.

SPEC.md closes every choice an implementation could make between equal
loads (stable sort, lowest index on ties). An engine's own copy of the
algorithm often breaks those ties another way, or lays the slots of a GPU out
in another order, or numbers the GPUs of a node differently. Its placement
then differs from SPEC.md's slot by slot, yet serves exactly as well. This
module tells the two cases apart:

- ``as_integer_placement``: a candidate's result as three int64 arrays,
  whatever integer dtype it used (int32 included) and however wide it padded
  ``log2phy`` with ``-1``.
- ``exact_gpu_loads``: the load of each GPU, summed with ``math.fsum`` so
  that the figure does not depend on the order of the GPU's slots.
- ``first_balance_difference``: the first layer whose per-GPU loads, as
  sorted lists, differ from SPEC.md's; None when every layer's match.

Two placements have the same balance when, in every layer, the sorted lists
of per-GPU loads are equal: the same multiset of GPU loads, whatever GPU holds
which. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "REAL_DIFFERENCE",
    "TIE_ORDER_ONLY",
    "BalanceDifference",
    "as_integer_placement",
    "exact_gpu_loads",
    "first_balance_difference",
]

#: A placement that differs from SPEC.md's but balances every layer as well.
TIE_ORDER_ONLY = "tie order only"
#: A placement whose per-GPU loads differ from SPEC.md's in some layer.
REAL_DIFFERENCE = "real difference"

#: (phy2log [L, R], log2phy [L, E, K], logcnt [L, E]), int64.
_Placement = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class BalanceDifference:
    """The first layer whose per-GPU loads differ from SPEC.md's.

    expected, got: [P] float64, the load of each GPU in that layer, SPEC.md's
        and the candidate's, in GPU order.
    """

    layer: int
    expected: np.ndarray
    got: np.ndarray

    def __str__(self) -> str:
        lines = [
            f"layer {self.layer}: per-GPU loads differ from SPEC.md's "
            f"(max {float(self.expected.max())!r} for SPEC.md, {float(self.got.max())!r} here)",
            f"  {'GPU':>5}  {'SPEC.md':>24}  {'candidate':>24}",
        ]
        for gpu, (want, have) in enumerate(
            zip(self.expected.tolist(), self.got.tolist(), strict=True)
        ):
            mark = "" if want == have else "  <"
            lines.append(f"  {gpu:>5}  {want!r:>24}  {have!r:>24}{mark}")
        return "\n".join(lines)


def as_integer_placement(result: object, num_experts: int) -> _Placement | str:
    """The candidate's result as three int64 arrays, or what is wrong with it.

    result: (phy2log [L, R], log2phy [L, E, K'], logcnt [L, E]) of any integer
        dtype, in anything ``numpy.asarray`` converts; K' may exceed the
        largest replica count when the extra columns are all ``-1`` (vLLM pads
        to ``R - E + 1``): they are cut to ``K = logcnt.max()``.
    num_experts: E, to check ``logcnt``'s width before using it.
    """
    if not isinstance(result, tuple | list) or len(result) != 3:
        return f"expected a tuple (phy2log, log2phy, logcnt), got {repr(result)[:80]}"
    try:
        arrays = [np.asarray(out) for out in result]
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"outputs are not arrays numpy.asarray converts: {exc}"
    for name, array in zip(("phy2log", "log2phy", "logcnt"), arrays, strict=True):
        if array.dtype.kind not in "iu":
            return f"{name} dtype is {array.dtype}, expected an integer dtype"
    phy2log, log2phy, logcnt = (a.astype(np.int64) for a in arrays)
    if logcnt.ndim != 2 or logcnt.shape[1] != num_experts or log2phy.ndim != 3:
        return (
            f"shapes phy2log {phy2log.shape}, log2phy {log2phy.shape}, logcnt {logcnt.shape}: "
            f"expected [L, R], [L, {num_experts}, K], [L, {num_experts}]"
        )
    width = int(logcnt.max()) if logcnt.size else 0
    if log2phy.shape[2] > width >= 1 and (log2phy[:, :, width:] == -1).all():
        log2phy = log2phy[:, :, :width]
    return phy2log, log2phy, logcnt


def exact_gpu_loads(
    weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int
) -> np.ndarray:
    """The load of each GPU, independent of the order of its slots: ``[L, P]`` float64.

    weight: [L, E] float64, the load of each logical expert.
    phy2log: [L, R] int64, the logical expert of each slot (valid ids).
    logcnt: [L, E] int64, the replica count of each logical expert (>= 1).

    Each slot carries ``weight[e] / logcnt[e]`` (float64, as SPEC.md step 5);
    a GPU's slots are summed with ``math.fsum``, which rounds the exact sum
    once, so any order of the same slots gives the same figure. A sum past the
    float64 range is ``inf``, as SPEC.md's own sums become.
    """
    num_layers, num_slots = phy2log.shape
    per_gpu = num_slots // num_gpus
    slot_load = np.take_along_axis(weight / logcnt, phy2log, axis=1)
    loads = np.empty((num_layers, num_gpus), dtype=np.float64)
    for layer in range(num_layers):
        for gpu in range(num_gpus):
            loads[layer, gpu] = _fsum(slot_load[layer, gpu * per_gpu : (gpu + 1) * per_gpu])
    return loads


def _fsum(values: np.ndarray) -> float:
    # fsum raises on an intermediate overflow; the loads are >= 0, so the
    # exact sum is then past the float64 range: inf. (inf inputs sum to inf.)
    try:
        return math.fsum(values.tolist())
    except OverflowError:
        return math.inf


def first_balance_difference(
    weight: np.ndarray, num_gpus: int, expected: _Placement, got: _Placement
) -> BalanceDifference | None:
    """The first layer where ``got``'s sorted per-GPU loads differ from ``expected``'s.

    weight: [L, E] float64, the load both placements were computed for.
    expected, got: int64 placements (see ``as_integer_placement``), already
        checked against SPEC.md's invariants.
    """
    want = exact_gpu_loads(weight, expected[0], expected[2], num_gpus)
    have = exact_gpu_loads(weight, got[0], got[2], num_gpus)
    unequal = np.flatnonzero((np.sort(want, axis=1) != np.sort(have, axis=1)).any(axis=1))
    if not unequal.size:
        return None
    layer = int(unequal[0])
    return BalanceDifference(layer, want[layer], have[layer])
