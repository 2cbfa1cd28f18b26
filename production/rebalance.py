"""Production rebalance: torch tensors in and out, SPEC.md's placement in between.

``rebalance_experts`` returns exactly what ``eplb.reference.rebalance_experts``
returns, as int64 tensors on the device of the load. On CUDA it costs one
device-to-host copy of the load and one host-to-device copy of the result,
and waits for nothing but its own copy: the serving stream keeps running.
The placement itself is computed by the compiled core (``compiled_core``,
numba, without the interpreter lock) where it loads, else by the vectorized
numpy core of ``_packing``; ``cores`` says how one is chosen.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb._validation import EplbConfig, validate_config, validate_weight

from . import cores
from ._packing import (
    balanced_packing,
    inverse_map,
    rebalance_experts_hierarchical,
    replicate_experts,
)

__all__ = [
    "balanced_packing",
    "prepare_weight",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    core: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute the placement of SPEC.md for every layer.

    weight: [L, E] real tensor (any float or integer dtype, bfloat16 and float16
        included; CPU or CUDA), tokens routed to each logical expert in each layer.
        Non-negative and finite. Never modified.
    num_replicas: R, slots per layer over all GPUs.
    num_groups: G, expert groups; experts ``g*E/G .. (g+1)*E/G - 1`` form group g.
    num_nodes: N, server nodes.
    num_gpus: P, GPUs (EP ranks) in all.
    core: ``"compiled"``, ``"numpy"`` or ``"auto"``; None reads ``$EPLB_CORE``
        (default ``"auto"``: compiled where numba loads). Both give the same
        integers; see ``eplb.production.cores``.

    Returns, as int64 tensors on ``weight.device``:
      phy2log: [L, R], the logical expert held by each slot.
      log2phy: [L, E, K], the slot of each replica of each expert, -1 padded.
      logcnt: [L, E], the replica count of each logical expert.

    Raises TypeError (not a tensor, boolean or complex dtype, non-integer
    counts) or ValueError (shape, counts, NaN, inf or negative loads), naming
    the argument, before anything is computed; the same types as
    ``eplb.reference``.
    """
    # Steps 1-2: the shape, dtype and count rules; one device-to-host copy.
    host, config = _checked_host(weight, num_replicas, num_groups, num_nodes, num_gpus)
    chosen = cores.resolve_core(core)

    if chosen == "compiled":
        # Steps 3-5 in one compiled call that never holds the interpreter lock.
        return _results_to_device(_compiled_placement(host, config), weight.device)

    # Step 3: the value rules (finite, >= 0) and float64, by the same code as
    # the reference.
    weight64, config = validate_weight(host, num_replicas, num_groups, num_nodes, num_gpus)

    # Step 4: the placement. The global policy is the hierarchy with one group
    # and one node (SPEC.md "Policy choice").
    groups, nodes = (config.num_groups, config.num_nodes) if config.hierarchical else (1, 1)
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
        weight64, config.num_replicas, groups, nodes, config.num_gpus
    )

    # Step 5: log2phy from phy2log and the replica ranks.
    log2phy = inverse_map(phy2log, phyrank, logcnt)

    # Step 6: one host-to-device copy of all three.
    return _results_to_device((phy2log, log2phy, logcnt), weight.device)


def _compiled_placement(
    host: np.ndarray, config: EplbConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log, log2phy, logcnt) of a host load by the compiled core, in one call.

    host: [L, E] real numpy array, the load as ``_load_to_host`` gives it.

    float32 and float64 loads go in as they are (the core converts float32 to
    float64 exactly, as numpy does); other dtypes are converted by numpy first,
    as exactly. The core checks the value rules as it converts; on a bad value
    ``validate_weight`` raises the very error the numpy core raises.
    """
    compiled = cores.load_compiled_core()
    assert compiled is not None, "resolve_core chose a core that does not load"
    loads = host
    if loads.dtype not in (np.float32, np.float64) or not loads.flags.c_contiguous:
        loads = np.ascontiguousarray(loads, dtype=np.float64)
    valid, phy2log, log2phy, logcnt = compiled.placement(
        loads, config.num_replicas, config.num_groups, config.num_nodes, config.num_gpus
    )
    if not valid:
        validate_weight(host, *config[2:])  # the load as given: the same message
        raise AssertionError("the compiled core refused a load that validate_weight accepts")
    return phy2log, log2phy, logcnt


def prepare_weight(
    weight: torch.Tensor,
    num_replicas: object,
    num_groups: object,
    num_nodes: object,
    num_gpus: object,
) -> tuple[np.ndarray, EplbConfig]:
    """Check the input of a rebalance and bring the load to the host as float64.

    weight: [L, E] real tensor on any device, tokens routed to each logical expert.

    Returns the load [L, E] float64 (numpy) and the validated config. Raises
    TypeError/ValueError naming the argument, the same types as ``eplb.reference``.
    """
    host, _ = _checked_host(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return validate_weight(host, num_replicas, num_groups, num_nodes, num_gpus)


def _checked_host(
    weight: object,
    num_replicas: object,
    num_groups: object,
    num_nodes: object,
    num_gpus: object,
) -> tuple[np.ndarray, EplbConfig]:
    """The load on the host after the rules its shape, dtype and counts alone decide.

    weight: [L, E] real tensor on any device. Refused before any copy.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype == torch.bool:
        raise TypeError("weight must hold real numbers, got boolean dtype")
    if weight.is_complex():
        raise TypeError(f"weight must hold real numbers, got dtype {weight.dtype}")
    config = validate_config(tuple(weight.shape), num_replicas, num_groups, num_nodes, num_gpus)
    return _load_to_host(weight), config


def _load_to_host(weight: torch.Tensor) -> np.ndarray:
    """The load as a host numpy array, in a dtype numpy has; exact.

    weight: [L, E] real tensor on any device.

    bfloat16 (which numpy lacks) travels as its raw 16 bits and becomes
    float32 on the host: a bfloat16 is the upper half of the float32 of the
    same value, so the shift is exact. That keeps the copy at 2 bytes per
    load and launches no conversion kernel on the serving stream, which a
    device-side ``.float()`` would. Other dtypes numpy lacks (float8 kinds)
    are widened to float32 on the device, also exactly.
    """
    weight = weight.detach()
    raw_bfloat16 = weight.dtype == torch.bfloat16
    if raw_bfloat16:
        weight = weight.view(torch.int16)
    elif weight.is_floating_point() and weight.dtype not in _NUMPY_FLOATS:
        weight = weight.to(torch.float32)
    if weight.device.type == "cuda":
        host = _copy_from_cuda(weight)
    else:
        host = weight.cpu().numpy()
    if raw_bfloat16:
        host = (host.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return host


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _copy_from_cuda(weight: torch.Tensor) -> np.ndarray:
    """One non-blocking copy into pinned memory; waits on that copy only.

    weight: [L, E] CUDA tensor, a dtype numpy has.

    The copy is queued on the current stream of the load's device, behind the
    kernels that wrote the load; one event recorded after it is all the host
    waits for. Other streams (and the device as a whole) are never waited on:
    no ``torch.cuda.synchronize``, no blocking ``.cpu()``.
    """
    stream = torch.cuda.current_stream(weight.device)
    host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(weight, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
    copied.synchronize()
    return host.numpy()


def _results_to_device(
    results: tuple[np.ndarray, np.ndarray, np.ndarray], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int64 results as tensors on ``device``: one copy for all three on CUDA.

    results: phy2log [L, R], log2phy [L, E, K], logcnt [L, E], int64 numpy arrays.

    On CUDA the three are packed into one pinned int64 buffer, copied with
    one non-blocking copy, and returned as views of its device copy. The
    caching host allocator keeps the pinned buffer alive until that copy has
    run, so the host does not wait for it.
    """
    if device.type == "cpu":
        return tuple(torch.from_numpy(r) for r in results)  # type: ignore[return-value]
    sizes = [r.size for r in results]
    if device.type == "cuda":
        packed = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=True)
        packed_np = packed.numpy()
        start = 0
        for result, size in zip(results, sizes, strict=True):
            packed_np[start : start + size] = result.ravel()
            start += size
        on_device = packed.to(device, non_blocking=True)
    else:
        on_device = torch.from_numpy(np.concatenate([r.ravel() for r in results])).to(device)
    views = torch.split(on_device, sizes)
    return tuple(v.view(r.shape) for v, r in zip(views, results, strict=True))  # type: ignore[return-value]
