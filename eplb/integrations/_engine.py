"""What both engine adapters share: SPEC.md's placement with engine-style refusals."""

from __future__ import annotations

import numpy as np
import torch

from eplb.production import rebalance_experts

__all__ = ["EngineInputError", "log2phy_in_slot_order", "spec_placement"]


class EngineInputError(AssertionError):
    """An input the engine's own policy would refuse with ``assert`` (or eplb refuses).

    An ``AssertionError``, because engines catch that around their policies;
    the message is eplb's, naming the argument and the rule, and
    ``__cause__`` is eplb's ``ValueError``/``TypeError``.
    """


def spec_placement(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    hierarchical: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC.md's placement, hierarchical or global as the engine chose.

    weight: [L, E] real torch tensor, tokens routed to each logical expert.
    hierarchical: False runs the global policy (one group, one node), which
        leaves ``num_groups`` unused, as the engines do.

    Returns phy2log [L, R], log2phy [L, E, K], logcnt [L, E], int64 on
    ``weight``'s device. Raises ``EngineInputError`` on invalid input.
    """
    if hierarchical and num_groups % num_nodes:
        raise EngineInputError(
            f"the hierarchical policy needs num_nodes to divide num_groups: "
            f"num_groups={num_groups} % num_nodes={num_nodes} != 0"
        )
    groups, nodes = (num_groups, num_nodes) if hierarchical else (1, 1)
    try:
        return rebalance_experts(weight, num_replicas, groups, nodes, num_gpus)
    except (ValueError, TypeError) as exc:
        raise EngineInputError(str(exc)) from exc


def log2phy_in_slot_order(phy2log: np.ndarray, num_experts: int, width: int) -> np.ndarray:
    """log2phy ``[L, E, width]`` int64 for ``phy2log``: replica k of e is its k-th slot.

    phy2log: [L, R] int64, every expert held at least once and at most ``width`` times.
    """
    num_layers, num_slots = phy2log.shape
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, in slot order
    expert = np.take_along_axis(phy2log, order, axis=1)
    counts = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    first = np.cumsum(counts, axis=1) - counts  # where each expert's run starts
    rank = np.arange(num_slots) - np.take_along_axis(first, expert, axis=1)
    log2phy = np.full((num_layers, num_experts, width), -1, dtype=np.int64)
    log2phy[np.arange(num_layers)[:, None], expert, rank] = order
    return log2phy
