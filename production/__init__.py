"""The torch path for expert-parallel serving.

Same placements as ``eplb.reference`` (SPEC.md), fast: packing vectorized in
numpy over all rows at once, one batched device-to-host copy of the load, weight
rearrangement over ``torch.distributed``, and the serving-side state.

Never imports JAX.
"""

from .migration import rebalance_experts_migration_aware, relabel_for_migration
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
from .serving import BalancerStats, ExpertBalancer

__all__ = [
    "BalancerStats",
    "ExpertBalancer",
    "PreparedRearrangement",
    "RearrangeBuffers",
    "RearrangePlan",
    "RearrangeStats",
    "keep_experts_in_place",
    "plan_rearrangement",
    "prepare_rearrangement",
    "rearrange_expert_weights",
    "rebalance_experts",
    "rebalance_experts_migration_aware",
    "relabel_for_migration",
    "warmup_rearrangement",
]
