"""SGLang's EPLB algorithm interface, computed by eplb (SPEC.md's placement).

SGLang picks an algorithm with ``compute_algorithm(raw_algorithm,
num_groups, num_nodes)`` and calls the dispatch ``rebalance_experts(
tokens_per_expert, num_physical_experts, num_local_physical_experts,
num_groups, num_nodes, algorithm)``, which for the DeepSeek algorithms sums
the load over its first axis and calls ``deepseek.rebalance_experts(weight,
num_replicas, num_groups, num_nodes, num_gpus, enable_hierarchical)``. This
module has all three, with the same arguments and results, so an engine
points its dispatch here (see the README, "Engines")::

    from eplb.integrations import sglang as eplb_sglang

    algorithm = eplb_sglang.compute_algorithm("auto", num_groups, num_nodes)
    phy2log, log2phy, logcnt = eplb_sglang.rebalance_experts(
        tokens_per_expert, num_physical_experts, num_local_physical_experts,
        num_groups, num_nodes, algorithm,
    )

What matches SGLang:

- inputs: ``tokens_per_expert`` a ``[windows, layers, num_logical_experts]``
  tensor of any real dtype (summed over windows with ``sum(dim=0)``, as
  SGLang does); ``num_groups`` may be None for the global algorithm, which
  ignores it; ``algorithm`` is this module's ``EplbAlgorithm``, SGLang's own
  enum member of the same name, or the name as a string;
- outputs: int64 CPU tensors (SGLang moves the load to the CPU first),
  ``log2phy`` padded with ``-1`` to the largest replica count;
- refusals: ``AssertionError`` (``EngineInputError``) where SGLang asserts,
  naming the argument and rule, before anything is computed;
  ``NotImplementedError`` for an algorithm other than ``deepseek`` and
  ``deepseek_hierarchical``, as SGLang's dispatch raises.

What differs: the placement is SPEC.md's, computed in float64 with ties
broken by lowest index, where SGLang computes in float32 with torch's sort.
"""

from __future__ import annotations

import enum

import torch

from ._engine import EngineInputError, spec_placement

__all__ = [
    "EngineInputError",
    "EplbAlgorithm",
    "compute_algorithm",
    "deepseek_rebalance_experts",
    "rebalance_experts",
]


class EplbAlgorithm(enum.Enum):
    """The SGLang algorithms this module computes (SGLang's names)."""

    deepseek = enum.auto()
    deepseek_hierarchical = enum.auto()


def compute_algorithm(raw_algorithm: str, num_groups: int | None, num_nodes: int) -> EplbAlgorithm:
    """SGLang's choice: "auto" is hierarchical when ``num_nodes`` divides ``num_groups``.

    Raises ``KeyError`` for an unknown name, as SGLang's ``EplbAlgorithm[...]`` does.
    """
    if raw_algorithm != "auto":
        return EplbAlgorithm[raw_algorithm]
    if num_groups is not None and num_groups % num_nodes == 0:
        return EplbAlgorithm.deepseek_hierarchical
    return EplbAlgorithm.deepseek


def rebalance_experts(
    tokens_per_expert: torch.Tensor,
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    algorithm: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang's dispatch (``sglang.srt.eplb.eplb_algorithms.rebalance_experts``).

    tokens_per_expert: [windows, layers, num_logical_experts] real tensor,
        tokens routed to each expert in each recorded window.
    num_physical_experts: slots per layer over all GPUs.
    num_local_physical_experts: slots per GPU.
    num_groups: expert groups (None: the global algorithm only).
    num_nodes: server nodes.
    algorithm: ``EplbAlgorithm.deepseek`` (global) or ``deepseek_hierarchical``,
        SGLang's member of that name, or the name.

    Returns phy2log, log2phy, logcnt as ``deepseek_rebalance_experts``.
    """
    name = algorithm if isinstance(algorithm, str) else getattr(algorithm, "name", None)
    if name not in EplbAlgorithm.__members__:
        raise NotImplementedError(f"eplb computes deepseek and deepseek_hierarchical, not {name}")
    if not isinstance(tokens_per_expert, torch.Tensor) or tokens_per_expert.ndim != 3:
        raise EngineInputError(
            "tokens_per_expert must be a 3-D [windows, layers, num_logical_experts] tensor, got "
            f"{type(tokens_per_expert).__name__} {tuple(getattr(tokens_per_expert, 'shape', ()))}"
        )
    if num_local_physical_experts < 1 or num_physical_experts % num_local_physical_experts:
        raise EngineInputError(
            "num_local_physical_experts must divide num_physical_experts: "
            f"{num_physical_experts} % {num_local_physical_experts} != 0"
        )
    if tokens_per_expert.dtype == torch.bool or tokens_per_expert.is_complex():
        # Refused before the sum, which would turn booleans into counts.
        raise EngineInputError(
            f"tokens_per_expert must hold real numbers, got dtype {tokens_per_expert.dtype}"
        )
    return deepseek_rebalance_experts(
        weight=tokens_per_expert.sum(dim=0),
        num_replicas=num_physical_experts,
        num_groups=num_groups,
        num_nodes=num_nodes,
        num_gpus=num_physical_experts // num_local_physical_experts,
        enable_hierarchical=name == EplbAlgorithm.deepseek_hierarchical.name,
    )


def deepseek_rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int | None,
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang's ``deepseek.rebalance_experts``.

    weight: [layers, num_logical_experts] real tensor, the load of each expert.
    num_replicas: physical experts, a multiple of ``num_gpus``.
    num_groups: expert groups; unused (and may be None) when not hierarchical.
    num_nodes: server nodes.
    num_gpus: GPUs, a multiple of ``num_nodes``.
    enable_hierarchical: the hierarchical policy (``num_nodes`` must divide
        ``num_groups``, ``num_groups`` the experts), else the global one.

    Returns, as int64 CPU tensors:
      phy2log: [layers, num_replicas], the logical expert of each slot.
      log2phy: [layers, num_logical_experts, K], the slots of each expert's
          replicas, -1 padded to K, the largest replica count.
      logcnt: [layers, num_logical_experts], each expert's replica count.

    Raises ``EngineInputError`` (an ``AssertionError``) on invalid input.
    """
    if not enable_hierarchical:
        groups = 1
    elif num_groups is None:
        raise EngineInputError("the hierarchical policy needs num_groups, got None")
    else:
        groups = num_groups
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu()
    return spec_placement(
        weight, num_replicas, groups, num_nodes, num_gpus, hierarchical=enable_hierarchical
    )
