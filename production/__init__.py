"""The torch path for expert-parallel serving.

Same placements as ``eplb.reference`` (SPEC.md), fast: packing vectorized in
numpy over all rows at once, one batched device-to-host copy of the load, weight
rearrangement over ``torch.distributed``, and the serving-side state.

Never imports JAX.
"""

from .rearrange import (
    PreparedRearrangement,
    RearrangeBuffers,
    RearrangePlan,
    RearrangeStats,
    keep_experts_in_place,
    plan_rearrangement,
    prepare_rearrangement,
    rearrange_expert_weights,
    warmup_rearrangement,
)
from .rebalance import rebalance_experts
from .serving import BalancerStats, ExpertBalancer, LoadWindow, RearrangeOptions
from .staged import StagedApply, StagedApplyError, StagedMove

__all__ = [
    "BalancerStats",
    "ExpertBalancer",
    "LoadWindow",
    "PreparedRearrangement",
    "RearrangeBuffers",
    "RearrangeOptions",
    "RearrangePlan",
    "RearrangeStats",
    "StagedApply",
    "StagedApplyError",
    "StagedMove",
    "keep_experts_in_place",
    "plan_rearrangement",
    "prepare_rearrangement",
    "rearrange_expert_weights",
    "rebalance_experts",
    "warmup_rearrangement",
]
