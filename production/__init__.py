"""The torch path for expert-parallel serving.

Same placements as ``eplb.reference`` (SPEC.md), fast: computed by a compiled
core (numba, without the interpreter lock) or, where numba cannot load, by a
numpy core vectorized over all rows at once (``cores`` chooses); one batched
device-to-host copy of the load; weight rearrangement over
``torch.distributed``; and the serving-side state.

Never imports JAX.
"""

from .cores import compiled_core_error, resolve_core, warm_up_placement
from .errors import AgreementError, GroupFault, RearrangeError
from .migration import rebalance_experts_migration_aware, relabel_for_migration
from .placement_service import PlacementService, placement_service_error
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
    "AgreementError",
    "BalancerStats",
    "ExpertBalancer",
    "GroupFault",
    "LoadWindow",
    "PlacementService",
    "PreparedRearrangement",
    "RearrangeBuffers",
    "RearrangeError",
    "RearrangeOptions",
    "RearrangePlan",
    "RearrangeStats",
    "StagedApply",
    "StagedApplyError",
    "StagedMove",
    "compiled_core_error",
    "keep_experts_in_place",
    "placement_service_error",
    "plan_rearrangement",
    "prepare_rearrangement",
    "rearrange_expert_weights",
    "rebalance_experts",
    "rebalance_experts_migration_aware",
    "relabel_for_migration",
    "resolve_core",
    "warm_up_placement",
    "warmup_rearrangement",
]
