"""vLLM's EPLB policy interface, computed by eplb (SPEC.md's placement).

vLLM chooses its rebalancing algorithm through a policy class whose
classmethod ``rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices=None)`` returns ``(phy2log, log2phy,
logcnt)``; older releases call a function of the same name with ``num_gpus``
last. ``EplbPolicy`` and ``rebalance_experts`` here take the same arguments
and return the same things, so an engine swaps them in for its
``DefaultEplbPolicy`` (see the README, "Engines")::

    from eplb.integrations.vllm import EplbPolicy

    phy2log, log2phy, logcnt = EplbPolicy.rebalance_experts(
        weight, num_replicas, num_groups, num_nodes, num_ranks
    )

What matches vLLM:

- inputs: ``weight`` a ``[layers, num_logical_experts]`` tensor of any real
  dtype on any device; ``num_groups`` need not divide the experts when
  ``num_nodes`` does not divide ``num_groups``: vLLM then falls back to the
  global policy, which ignores the groups, and so does this adapter;
- outputs: int64 tensors on ``weight``'s device, ``log2phy`` padded with
  ``-1`` to ``num_replicas - num_logical_experts + 1`` columns, as vLLM
  allocates it;
- refusals: ``AssertionError`` (``EngineInputError``), which vLLM's callers
  catch, raised before anything is computed, naming the argument and rule;
- ``old_global_expert_indices``: the current ``[layers, num_replicas]``
  placement; experts that stay on a rank keep their slots there
  (``eplb.production.keep_experts_in_place``), so fewer weights are copied.

What differs: the placement is SPEC.md's, computed in float64 with ties
broken by lowest index, where vLLM computes in float32 and breaks ties as
numpy's unstable sort happens to. Where the two differ, the difference is
in tie order or float32 rounding (``eplb conformance --same-balance`` tells
which).
"""

from __future__ import annotations

import torch

from eplb.production import keep_experts_in_place

from ._engine import EngineInputError, log2phy_in_slot_order, spec_placement

__all__ = ["EngineInputError", "EplbPolicy", "rebalance_experts"]


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``rebalance_experts`` function (``vllm.distributed.eplb.rebalance_algo``).

    weight: [layers, num_logical_experts] real tensor, the load of each expert.
    num_replicas: physical experts, a multiple of ``num_gpus``.
    num_groups: expert groups; used only when ``num_nodes`` divides it.
    num_nodes: server nodes.
    num_gpus: GPUs, a multiple of ``num_nodes``.

    Returns, int64 on ``weight``'s device:
      phy2log: [layers, num_replicas], the logical expert of each slot.
      log2phy: [layers, num_logical_experts, num_replicas - num_logical_experts + 1],
          the slots of each expert's replicas, -1 padded.
      logcnt: [layers, num_logical_experts], each expert's replica count.

    Raises ``EngineInputError`` (an ``AssertionError``) on invalid input.
    """
    return EplbPolicy.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)


class EplbPolicy:
    """Stand-in for vLLM's ``DefaultEplbPolicy``: the same classmethod, SPEC.md's placement."""

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """vLLM's policy entry point.

        weight: [layers, num_logical_experts] real tensor, the load of each expert.
        num_replicas: physical experts, a multiple of ``num_ranks``.
        num_groups: expert groups; used only when ``num_nodes`` divides it.
        num_nodes: server nodes.
        num_ranks: EP ranks (GPUs), a multiple of ``num_nodes``.
        old_global_expert_indices: [layers, num_replicas] int, the placement in
            use; when given (and of that shape), experts that stay on a rank
            keep their slots on it. Not modified.

        Returns phy2log, log2phy, logcnt as ``rebalance_experts`` (this module).
        Raises ``EngineInputError`` (an ``AssertionError``) on invalid input.
        """
        if isinstance(num_groups, int) and isinstance(num_nodes, int) and num_nodes > 0:
            hierarchical = num_groups % num_nodes == 0
        else:
            hierarchical = True  # let eplb's checks name the bad count
        phy2log, log2phy, logcnt = spec_placement(
            weight, num_replicas, num_groups, num_nodes, num_ranks, hierarchical=hierarchical
        )
        num_layers, num_experts = logcnt.shape
        width = num_replicas - num_experts + 1
        if old_global_expert_indices is not None and tuple(old_global_expert_indices.shape) == (
            num_layers,
            num_replicas,
        ):
            old = old_global_expert_indices.detach().cpu().numpy()
            try:
                kept = keep_experts_in_place(old, phy2log.cpu().numpy(), num_ranks)
            except ValueError as exc:
                raise EngineInputError(f"old_global_expert_indices: {exc}") from exc
            phy2log = torch.from_numpy(kept).to(weight.device)
            table = log2phy_in_slot_order(kept, num_experts, width)
            return phy2log, torch.from_numpy(table).to(weight.device), logcnt
        padded = torch.full(
            (num_layers, num_experts, width), -1, dtype=torch.int64, device=log2phy.device
        )
        padded[:, :, : log2phy.shape[2]] = log2phy
        return phy2log, padded, logcnt
