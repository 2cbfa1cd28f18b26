"""The numpy reference: SPEC.md turned into code, line for line.

Glossary (used unchanged across eplb):

- **logical expert**: an expert of the model, ``0 .. E-1`` in each layer.
- **slot** (physical expert): one of the ``R`` places that hold an expert's
  weights; slot ``s`` lives on GPU ``s // (R/P)`` and node ``s // (R/N)``.
- **phy2log** ``[L, R]``: the logical expert held by each slot.
- **log2phy** ``[L, E, K]``: the slots holding each logical expert, one per
  replica rank, ``-1`` padded to ``K`` = the largest replica count.
- **logcnt** ``[L, E]``: how many slots hold each logical expert (``>= 1``).
- **pack**: a bin that packing fills (a node, or a GPU within a node); the
  pack of an item is the bin it was put in.
- **rank**: an item's position in its pack, in order of arrival (for a slot,
  also its offset on its GPU); a replica rank is the ``k`` of ``log2phy``.

``eplb.reference.migration`` is SPEC.md's second policy, migration-aware
rebalancing (``relabel_for_migration``, ``rebalance_experts_migration_aware``;
numpy, and scipy for its optimal assignments).

Only numpy is imported here: the JAX version lives in ``eplb.reference.jax``
and is imported on demand.
"""

from .migration import rebalance_experts_migration_aware, relabel_for_migration
from .numpy_ref import (
    balanced_packing,
    rebalance_experts,
    rebalance_experts_hierarchical,
    replicate_experts,
)

__all__ = [
    "balanced_packing",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "rebalance_experts_migration_aware",
    "relabel_for_migration",
    "replicate_experts",
]
