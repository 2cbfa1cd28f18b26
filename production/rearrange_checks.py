"""Input checks of a weight move: the maps, the weights' layout, the options.

What :func:`eplb.production.rearrange_expert_weights` and
:func:`eplb.production.prepare_rearrangement` refuse, each with a
TypeError/ValueError naming the argument and the rule, before anything is
planned or touched (the call runs them inside its agreement, so a refusal
is shared by every rank).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from .rearrange_plan import check_keeps_experts, check_maps
from .rearrange_schedule import Layout
from .slot_work import bit_view

__all__ = ["check_host_wait", "check_input", "check_weights"]


def check_host_wait(host_wait: object, into: object, device: torch.device | None) -> None:
    """Refuse ``host_wait=False`` where the host must wait for a move's messages.

    Only a move into other tensors (``into``) on CUDA may return without that
    wait: its ``expert_weights`` are only read, so whatever later happens to
    the messages cannot corrupt them, and on CUDA the messages are ordered on
    the streams, while gloo's complete only inside a host wait. device: the
    weights' (None: not checked yet).
    """
    if not isinstance(host_wait, bool):
        raise TypeError(f"host_wait must be a bool, got {type(host_wait).__name__}")
    if host_wait:
        return
    if into is None:
        raise ValueError(
            "host_wait=False needs into=: only a move that writes other tensors than "
            "expert_weights may return before its messages are known to have arrived"
        )
    if device is not None and device.type != "cuda":
        raise ValueError(
            f"host_wait=False needs CUDA tensors, got {device.type}: elsewhere (gloo) a "
            "move's messages complete only while the host waits for them"
        )


def check_input(
    old_phy2log: object,
    new_phy2log: object,
    expert_weights: object,
    world_size: int,
    max_batch_bytes: object,
    into: object = None,
) -> tuple[np.ndarray, np.ndarray, Layout, torch.device | None]:
    """The checks :func:`rearrange_expert_weights` and :func:`prepare_rearrangement` share.

    Returns both maps on the host, the weights' layout and their device (with
    ``into``, the layout's signature says so: the write schedule differs).
    """
    old, new = _maps_to_host(old_phy2log, new_phy2log, world_size)
    if into is None:
        # In place, an expert the new map drops would be overwritten and lost;
        # with ``into`` the weights are only read, so nothing is lost.
        check_keeps_experts(old, new)
    layout, device = check_weights(expert_weights, old.shape, world_size)
    if into is not None:
        into_layout, into_device = check_weights(into, old.shape, world_size, "into")
        if into_layout.signature != layout.signature or into_device != device:
            raise ValueError(
                f"into must hold the same tensor shapes and dtypes on the same device as "
                f"expert_weights: into has {into_layout.signature} on {into_device}, "
                f"expert_weights {layout.signature} on {device}"
            )
        layout = Layout(layout.slot_nbytes, f"{layout.signature} into others")
    if isinstance(max_batch_bytes, bool) or not isinstance(max_batch_bytes, numbers.Integral):
        raise TypeError(f"max_batch_bytes must be an int, got {type(max_batch_bytes).__name__}")
    if max_batch_bytes < 1:
        raise ValueError(f"max_batch_bytes must be >= 1, got {max_batch_bytes}")
    return old, new, layout, device


def _maps_to_host(
    old_phy2log: object, new_phy2log: object, world_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both maps, checked, as host int64 arrays (one device-to-host copy where both are on one)."""
    for name, phy2log in (("old_phy2log", old_phy2log), ("new_phy2log", new_phy2log)):
        if not isinstance(phy2log, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"{name} must be a torch.Tensor (or numpy.ndarray), got {type(phy2log).__name__}"
            )
        if isinstance(phy2log, torch.Tensor) and (
            phy2log.is_floating_point() or phy2log.is_complex() or phy2log.dtype == torch.bool
        ):
            raise TypeError(f"{name} must hold integers, got dtype {phy2log.dtype}")
    if (
        isinstance(old_phy2log, torch.Tensor)
        and isinstance(new_phy2log, torch.Tensor)
        and old_phy2log.device == new_phy2log.device
        and old_phy2log.device.type != "cpu"
        and old_phy2log.shape == new_phy2log.shape
    ):
        both = torch.stack((old_phy2log.to(torch.int64), new_phy2log.to(torch.int64))).cpu()
        return check_maps(both[0].numpy(), both[1].numpy(), world_size)
    old = old_phy2log.detach().cpu() if isinstance(old_phy2log, torch.Tensor) else old_phy2log
    new = new_phy2log.detach().cpu() if isinstance(new_phy2log, torch.Tensor) else new_phy2log
    return check_maps(old, new, world_size)


def check_weights(
    expert_weights: object,
    map_shape: tuple[int, ...],
    world_size: int,
    name: str = "expert_weights",
) -> tuple[Layout, torch.device | None]:
    """Validate ``expert_weights`` (argument ``name``) against the maps' shape and world size."""
    if isinstance(expert_weights, torch.Tensor) or not isinstance(expert_weights, Sequence):
        raise TypeError(
            f"{name} must be a list (per layer) of lists of tensors, got "
            f"{type(expert_weights).__name__}"
        )
    num_layers, num_slots = (int(d) for d in map_shape)
    if len(expert_weights) != num_layers:
        raise ValueError(
            f"{name} must have one entry per layer of the maps: got {len(expert_weights)} "
            f"layers, the maps have {num_layers}"
        )
    if num_slots % world_size:
        raise ValueError(
            f"the group size must divide the number of slots: R={num_slots} % world_size="
            f"{world_size} != 0"
        )
    per_rank = num_slots // world_size
    template: list[tuple[tuple[int, ...], torch.dtype]] | None = None
    device: torch.device | None = None
    for layer, tensors in enumerate(expert_weights):
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
            raise TypeError(
                f"{name}[{layer}] must be a list of tensors, got {type(tensors).__name__}"
            )
        signature = []
        for index, tensor in enumerate(tensors):
            where = f"{name}[{layer}][{index}]"
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{where} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() < 1 or tensor.shape[0] != per_rank:
                raise ValueError(
                    f"{where} must have first dimension R / world_size = {num_slots} / "
                    f"{world_size} = {per_rank}, got shape {tuple(tensor.shape)}"
                )
            device = device or tensor.device
            if tensor.device != device:
                raise ValueError(
                    f"all expert weights must be on one device: {where} is on {tensor.device}, "
                    f"{name}[0][0] on {device}"
                )
            try:
                if template is None:  # later layers must match these dtypes
                    bit_view(tensor)
            except (KeyError, RuntimeError) as exc:
                raise TypeError(
                    f"{where} has dtype {tensor.dtype}, which cannot be moved as bits"
                ) from exc
            signature.append((tuple(tensor.shape), tensor.dtype))
        if template is None:
            template = signature
        elif signature != template:
            raise ValueError(
                f"every layer must hold the same list of tensor shapes and dtypes: {name}"
                f"[{layer}] has {_describe(signature)}, {name}[0] has {_describe(template)}"
            )
    template = template or []
    return Layout(
        slot_nbytes=tuple(
            math.prod(shape[1:]) * torch.empty(0, dtype=dtype).element_size()
            for shape, dtype in template
        ),
        signature=_describe(template),
    ), device


def _describe(signature: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str:
    return "[" + ", ".join(f"{dtype} {list(shape)}" for shape, dtype in signature) + "]"
