"""Hierarchical EPLB in JAX: SPEC.md again, jit-compiled and vmapped over rows.

Same step functions and the same integers as the numpy reference
(``eplb.reference``, whose docstring holds the glossary), for every valid
input. Each step is a ``lax.scan`` over items, ``vmap``-ed over rows, and
jit-compiled with the counts static: a repeated call with the same shape and
counts reuses the compiled program.

float64: every public function here runs inside ``with jax.enable_x64(True):``
and casts its load to float64 first. That context manager is thread-local and
restores the previous value on exit, so the caller's ``jax_enable_x64``
setting is never changed (no global flag is flipped); only the returned
arrays are 64-bit (int64), whatever the caller's setting. The step functions
can also be traced inside your own ``jit``/``vmap``, but only with x64 on
for that trace (else they raise TypeError): a trace begun in 32 bits cannot
switch.

Subnormal loads: XLA flushes subnormal float64 values to zero in every
operation (CPU and GPU), where numpy computes with them. ``rebalance_experts``
therefore first scales each layer that holds a subnormal load by a power of
two, on the host: that is exact, and every sum, ratio and comparison of the
algorithm scales with it, so the placement is unchanged, while the loads are
now normal numbers XLA keeps. Where numpy rounds a share per replica to the
subnormal grid, the JAX code rounds the lifted share to the lifted grid the
same way. Exact for every layer whose largest load is below ``2**900``
(larger ones cannot be lifted far enough; layers without loads below
``2**-1022 * R`` are never lifted).

``K`` (the last axis of ``log2phy``) is data-dependent, which ``jit`` cannot
express; the compiled program fills a ``-1``-padded map with the static bound
``R/N - E/N + 1`` (no expert has more replicas than its node has spare slots
plus one) and ``rebalance_experts`` slices it to ``K = logcnt.max()`` outside
``jit`` (one host sync for ``K``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eplb._validation import validate_weight

__all__ = [
    "balanced_packing",
    "rebalance_experts",
    "rebalance_experts_batched",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _in_float64(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Run ``fn`` with 64-bit types on and its first argument (the load) as float64."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        weight, *rest = args
        # A trace begun with x64 off has already fixed 32-bit types; switching
        # x64 on inside it mixes widths and fails deep in lax, so say why here.
        if isinstance(weight, jax.core.Tracer) and not jax.enable_x64.value:
            raise TypeError(
                f"{fn.__name__} computes in float64: inside jit/vmap, trace it under "
                "`with jax.enable_x64(True):`"
            )
        with jax.enable_x64(True):
            return fn(jnp.asarray(weight, dtype=jnp.float64), *rest, **kwargs)  # type: ignore[arg-type]

    return wrapper


def _pack_row(weight: jax.Array, num_packs: int) -> tuple[jax.Array, jax.Array]:
    """balanced_packing for one row: weight [n] float64 -> pack [n], rank [n] int64."""
    num_items = weight.shape[0]
    items_per_pack = num_items // num_packs
    pack_index = jnp.arange(num_packs)
    # lax.sort treats -0.0 and 0.0 as equal, like Python's sort in the numpy reference.
    order = jnp.argsort(-weight, stable=True)

    def arrive(
        state: tuple[jax.Array, jax.Array], item_weight: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        totals, counts = state
        is_open = counts < items_per_pack
        # The first open pack reaching the smallest open total: lowest index wins
        # ties. Comparing with the minimum (not masking with inf) stays right when
        # totals overflow to inf.
        smallest = jnp.min(jnp.where(is_open, totals, jnp.inf))
        best = jnp.argmax(is_open & (totals == smallest))
        chosen = pack_index == best
        # Adding 0.0 to the other totals leaves them bit for bit as they were.
        totals = totals + jnp.where(chosen, item_weight, 0.0)
        return (totals, counts + chosen), (best, counts[best])

    start = (jnp.zeros(num_packs, jnp.float64), jnp.zeros(num_packs, jnp.int64))
    _, (pack_sorted, rank_sorted) = lax.scan(arrive, start, weight[order])
    # The scan went in sorted order; put each result back at its item.
    pack = jnp.zeros(num_items, jnp.int64).at[order].set(pack_sorted)
    rank = jnp.zeros(num_items, jnp.int64).at[order].set(rank_sorted)
    return pack, rank


@_in_float64
@functools.partial(jax.jit, static_argnames=("num_packs",))
def balanced_packing(weight: jax.Array, num_packs: int) -> tuple[jax.Array, jax.Array]:
    """SPEC.md primitive 1: pack ``n`` items of each row into ``num_packs`` equal packs.

    weight: [X, n] float, the weight of each item; rows are independent.
    num_packs: number of packs ``m``; must divide ``n``.

    Returns
      pack: [X, n] int64, the pack of each item.
      rank: [X, n] int64, the item's position in its pack, in order of arrival.
    """
    num_rows, num_items = weight.shape
    if num_items // num_packs == 1:
        identity = jnp.broadcast_to(jnp.arange(num_items, dtype=jnp.int64), (num_rows, num_items))
        return identity, jnp.zeros((num_rows, num_items), jnp.int64)
    pack_rows = jax.vmap(functools.partial(_pack_row, num_packs=num_packs))
    return pack_rows(weight)


def _share(load: jax.Array, count: jax.Array, quantum: jax.Array) -> jax.Array:
    """``load / count`` rounded as numpy rounds it before the layer was lifted.

    load: [n] float64, lifted loads (``_lift_subnormals``); count: [n] float64,
    replica counts (integers below ``2**26``); quantum: the lifted spacing of
    float64's subnormals, ``2**-1074`` times the layer's scale (0: not lifted).

    numpy rounds a quotient below ``2**-1022`` to a multiple of ``2**-1074``,
    not to 53 bits. Lifted, that is a multiple of ``quantum`` below
    ``unit = 2**52 * quantum``: the 53-bit quotient ``r`` is moved to the
    nearer multiple, and where ``r`` sits on a midpoint (it may have been
    rounded onto it), the exact sign of ``load - r * count`` (Dekker's split
    of ``r``, computed in units of ``unit`` so that nothing overflows) says
    which side the true quotient lies on; an exact tie goes to the even multiple.
    """
    r = load / count
    below = (quantum > 0) & (r < quantum * 2.0**52)
    safe = jnp.where(quantum > 0, quantum, 1.0)
    steps = jnp.floor(r / safe)
    low = steps * safe
    unit = safe * 2.0**52
    scaled = r / unit
    split = scaled * 134217729.0  # 2**27 + 1: the high half of r keeps 26 bits
    high = split - (split - scaled)
    ahead = (load / unit - high * count) - (scaled - high) * count  # sign of load - r * count
    past_half = r - low - 0.5 * safe
    odd = jnp.mod(steps, 2.0) == 1.0
    up = (past_half > 0) | ((past_half == 0) & ((ahead > 0) | ((ahead == 0) & odd)))
    return jnp.where(below, jnp.where(up, low + safe, low), r)


def _replicate_row(
    weight: jax.Array, quantum: jax.Array, num_phy: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """replicate_experts for one row: weight [n] float64 -> phy2log, rank [num_phy], logcnt [n]."""
    num_log = weight.shape[0]
    expert = jnp.arange(num_log, dtype=jnp.int64)

    def add_slot(count: jax.Array, _: None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        # argmax returns the first maximum: lowest expert index among equal loads.
        best = jnp.argmax(_share(weight, count.astype(jnp.float64), quantum))
        return count + (expert == best), (best, count[best])

    count, (extra, extra_rank) = lax.scan(
        add_slot, jnp.ones(num_log, jnp.int64), None, length=num_phy - num_log
    )
    phy2log = jnp.concatenate([expert, extra.astype(jnp.int64)])
    rank = jnp.concatenate([jnp.zeros(num_log, jnp.int64), extra_rank])
    return phy2log, rank, count


@_in_float64
@functools.partial(jax.jit, static_argnames=("num_phy",))
def replicate_experts(
    weight: jax.Array, num_phy: int, quantum: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SPEC.md primitive 2: give the ``num_phy - n`` extra slots to the hottest experts.

    weight: [X, n] float, the load of each expert; rows are independent.
    num_phy: slots per row, ``>= n``.
    quantum: [X] float64, for rows lifted out of the subnormal range: the
        lifted ``2**-1074`` (see ``rebalance_experts``); None or 0: not lifted.

    Returns
      phy2log: [X, num_phy] int64, the expert of each slot.
      rank: [X, num_phy] int64, the replica rank of each slot.
      logcnt: [X, n] int64, the replica count of each expert.
    """
    if quantum is None:
        quantum = jnp.zeros(weight.shape[0], jnp.float64)
    replicate_rows = jax.vmap(functools.partial(_replicate_row, num_phy=num_phy))
    return replicate_rows(weight, quantum)


def _scatter_rows(index: jax.Array, value: jax.Array, width: int) -> jax.Array:
    """out [X, width] int64 with out[x, index[x, i]] = value[x, i] (index rows are permutations)."""
    return jax.vmap(lambda i, v: jnp.zeros(width, jnp.int64).at[i].set(v))(index, value)


@_in_float64
@functools.partial(
    jax.jit, static_argnames=("num_physical_experts", "num_groups", "num_nodes", "num_gpus")
)
def rebalance_experts_hierarchical(
    weight: jax.Array,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    quantum: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SPEC.md "The hierarchy": groups to nodes, replicas within nodes, slots to GPUs.

    weight: [L, E] float, load of each logical expert in each layer (not validated here).
    quantum: [L] float64, for layers lifted out of the subnormal range: the
        lifted ``2**-1074`` (see ``rebalance_experts``); None or 0: not lifted.

    Returns
      phy2log: [L, R] int64, the logical expert of each slot.
      phyrank: [L, R] int64, the replica rank of each slot.
      logcnt: [L, E] int64, the replica count of each logical expert.
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical_experts // num_nodes
    slots_per_gpu = num_physical_experts // num_gpus
    gpus_per_node = num_gpus // num_nodes

    # Step 1: group loads, each summed left to right. A scan over the columns
    # fixes the order; jnp.sum would be free to add pairwise.
    columns = jnp.moveaxis(weight.reshape(num_layers, num_groups, group_size), 2, 0)
    group_load, _ = lax.scan(
        lambda total, column: (total + column, None),
        jnp.zeros((num_layers, num_groups), jnp.float64),
        columns,
    )

    # Step 2: groups to nodes.
    group_pack, group_rank = balanced_packing(group_load, num_nodes)

    # Step 3: node-local order; mlog2log is the inverse permutation of log2mlog.
    expert = jnp.arange(num_logical, dtype=jnp.int64)
    group, offset = expert // group_size, expert % group_size
    log2mlog = (group_pack[:, group] * groups_per_node + group_rank[:, group]) * group_size + offset
    mlog2log = _scatter_rows(log2mlog, jnp.broadcast_to(expert, log2mlog.shape), num_logical)

    # Step 4: replicate within each node; row layer*N + node holds that node's experts.
    node_load = jnp.take_along_axis(weight, mlog2log, axis=1).reshape(-1, experts_per_node)
    if quantum is None:
        quantum = jnp.zeros(num_layers, jnp.float64)
    node_quantum = jnp.repeat(quantum, num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(node_load, slots_per_node, node_quantum)

    # Step 5: the load each slot carries.
    slot_load = jax.vmap(_share)(
        jnp.take_along_axis(node_load, phy2mlog, axis=1),
        jnp.take_along_axis(mlogcnt, phy2mlog, axis=1).astype(jnp.float64),
        node_quantum,
    )

    # Step 6: slots to GPUs within each node.
    gpu_pack, gpu_rank = balanced_packing(slot_load, gpus_per_node)

    # Step 7: map back to physical indices and logical experts. Reshaping
    # [L*N, R/N] to [L, R] lays the nodes of a layer side by side.
    node = (jnp.arange(num_layers * num_nodes, dtype=jnp.int64) % num_nodes)[:, None]
    phy = (node * slots_per_node + gpu_pack * slots_per_gpu + gpu_rank).reshape(num_layers, -1)
    mlog = (node * experts_per_node + phy2mlog).reshape(num_layers, -1)
    slot_expert = jnp.take_along_axis(mlog2log, mlog, axis=1)
    phy2log = _scatter_rows(phy, slot_expert, num_physical_experts)
    out_rank = _scatter_rows(phy, phyrank.reshape(num_layers, -1), num_physical_experts)
    logcnt = jnp.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return phy2log, out_rank, logcnt


@functools.partial(jax.jit, static_argnames=("num_replicas", "num_groups", "num_nodes", "num_gpus"))
def _placement(
    weight: jax.Array,
    quantum: jax.Array,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The compiled part of rebalance_experts, with log2phy padded to the static bound.

    weight: [L, E] float64, validated loads; the counts are already policy-adjusted.
    quantum: [L] float64, the lifted 2**-1074 of each lifted layer, else 0.

    Returns phy2log [L, R], log2phy [L, E, R/N - E/N + 1] (-1 padded), logcnt [L, E].
    """
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
        weight, num_replicas, num_groups, num_nodes, num_gpus, quantum
    )
    num_layers, num_logical = weight.shape
    bound = (num_replicas - num_logical) // num_nodes + 1
    layer = jnp.arange(num_layers)[:, None]
    slot = jnp.broadcast_to(jnp.arange(num_replicas, dtype=jnp.int64), phy2log.shape)
    log2phy = jnp.full((num_layers, num_logical, bound), -1, jnp.int64)
    return phy2log, log2phy.at[layer, phy2log, phyrank].set(slot), logcnt


def rebalance_experts(
    weight: jax.Array,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Compute the placement of SPEC.md for every layer (same integers as the numpy reference).

    weight: [L, E] real, tokens routed to each logical expert in each layer
        (a jax.Array, or anything numpy's reference accepts; converted to float64).
    num_replicas: R, slots per layer over all GPUs.
    num_groups: G, expert groups; experts ``g*E/G .. (g+1)*E/G - 1`` form group g.
    num_nodes: N, server nodes.
    num_gpus: P, GPUs (EP ranks) in all.

    Returns, as int64 jax.Arrays on the device of ``weight`` (the default
    device for numpy input or an array sharded over several devices):
      phy2log: [L, R] int64, the logical expert held by each slot.
      log2phy: [L, E, K] int64, the slot of each replica of each expert, -1 padded.
      logcnt: [L, E] int64, the replica count of each logical expert.

    Raises ValueError / TypeError (naming the argument) on invalid input, with
    the rules and exception types of the numpy reference. Not traceable: the
    load is validated on the host (use rebalance_experts_hierarchical under jit).
    """
    # Step 1: validate a host copy, with the numpy reference's rules.
    host = weight if isinstance(weight, np.ndarray) else np.asarray(weight)
    weight64, config = validate_weight(host, num_replicas, num_groups, num_nodes, num_gpus)

    # Step 2: policy choice; the global policy is the hierarchy with one group and one node.
    groups, nodes = config.num_groups, config.num_nodes
    if not config.hierarchical:
        groups, nodes = 1, 1

    # Step 3: layers with subnormal loads scaled up by a power of two (exact).
    weight64, quantum = _lift_subnormals(weight64, config.num_replicas)

    with jax.enable_x64(True):
        # Step 4: the validated float64 goes back to the caller's device (the
        # default one for numpy input or a sharded array) for the compiled hierarchy.
        devices = weight.devices() if isinstance(weight, jax.Array) else set()
        target = next(iter(devices)) if len(devices) == 1 else None
        phy2log, log2phy, logcnt = _placement(
            jax.device_put(weight64, target),
            jax.device_put(quantum, target),
            config.num_replicas,
            groups,
            nodes,
            config.num_gpus,
        )

        # Step 5: cut the padded log2phy to K, known only now.
        return phy2log, log2phy[:, :, : int(logcnt.max())], logcnt


def _lift_subnormals(weight: np.ndarray, num_replicas: int) -> tuple[np.ndarray, np.ndarray]:
    """Each layer holding a subnormal load, times the largest safe power of two.

    weight: [L, E] float64, validated loads (finite, >= 0).
    num_replicas: R, the largest replica count a load is divided by: a load
        below ``2**-1022 * R`` is normal but its per-replica share may not be.

    XLA flushes subnormals to zero; numpy does not. Multiplying a layer by
    ``2**k`` is exact (no rounding) and commutes with every operation of the
    algorithm (sums, ratios to replica counts, comparisons), as long as no
    result leaves the normal range. So ``k`` puts the layer's largest load
    just below ``2**(1022 - bits(E))``, where no sum of the layer can
    overflow, and only scales up: a layer whose sums overflow in numpy keeps
    them overflowing. The host does it: inside XLA the subnormals would be
    flushed before the multiply. What scaling does not carry over is numpy's
    rounding of quotients to the subnormal grid: ``_share`` redoes it.

    Returns the lifted loads [L, E] and, per layer, the lifted ``2**-1074``
    (0.0 for layers left as they were) [L] float64.
    """
    small = np.ldexp(np.finfo(np.float64).tiny, int(num_replicas).bit_length())
    lift = ((weight > 0) & (weight < small)).any(axis=1)
    if not lift.any():
        return weight, np.zeros(weight.shape[0])
    _, top_exponent = np.frexp(weight.max(axis=1))  # max < 2**top_exponent
    headroom = 1022 - int(weight.shape[1]).bit_length()
    shift = np.where(lift, np.maximum(headroom - top_exponent, 0), 0).astype(np.int32)
    quantum = np.where(lift, np.ldexp(1.0, shift - 1074), 0.0)
    return np.ldexp(weight, shift[:, None]), quantum


def rebalance_experts_batched(
    weight: jax.Array,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """rebalance_experts over a leading batch axis, as one compiled call.

    weight: [B, L, E] real, B independent load matrices (e.g. load windows or
        workloads); every row is placed on its own, so the batch is just more
        rows to the vmapped steps, and each matrix gets what rebalance_experts
        gives it, except that K is the largest replica count over the whole batch.

    Returns phy2log [B, L, R], log2phy [B, L, E, K], logcnt [B, L, E], int64.
    Error messages about a load give its [row, expert] in the flattened [B*L, E].
    """
    shape = tuple(np.shape(weight))
    if len(shape) != 3 or shape[0] < 1:
        raise ValueError(
            f"weight must be 3-D [batch, layers, num_logical_experts] with batch >= 1, "
            f"got shape {shape}"
        )
    batch, layers, experts = shape
    if isinstance(weight, jax.Array):
        # Reshaped on its device; with x64 on, so a float64 load stays float64.
        with jax.enable_x64(True):
            rows = weight.reshape(batch * layers, experts)
    else:
        rows = np.reshape(np.asarray(weight), (batch * layers, experts))
    phy2log, log2phy, logcnt = rebalance_experts(
        rows, num_replicas, num_groups, num_nodes, num_gpus
    )
    return (
        phy2log.reshape(batch, layers, -1),
        log2phy.reshape(batch, layers, experts, -1),
        logcnt.reshape(batch, layers, experts),
    )
