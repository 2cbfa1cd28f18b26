"""The serving balancer's plain state: its options, its load window and its counters.

:class:`RearrangeOptions` (how an ``ExpertBalancer`` moves weights),
:class:`LoadWindow` (the sliding window of per-expert token counts),
:class:`BalancerStats` (what the balancer has done), :class:`Plan` (a
placement ready to apply), and the host helpers that turn a ``phy2log`` into
the balancer's maps. ``eplb.production.serving``
re-exports the three classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from eplb._validation import EplbConfig, check_count
from eplb.metrics import balancedness, gpu_loads

from .group_guard import DEFAULT_TIMEOUT, check_timeout
from .rearrange import (
    DEFAULT_MAX_BATCH_BYTES,
    PreparedRearrangement,
    RearrangeStats,
    keep_experts_in_place,
)
from .staged import StagedMove

__all__ = [
    "BalancerStats",
    "LoadWindow",
    "Plan",
    "RearrangeOptions",
    "as_host_placement",
    "finish_maps",
    "maps_from_phy2log",
    "pad_replicas",
]


class Plan(NamedTuple):
    """A placement ready for an ``ExpertBalancer`` to apply (host tensors), with its figures."""

    phy2log: torch.Tensor  # [L, R] int64
    log2phy: torch.Tensor  # [L, E, max_replicas] int64, -1 padded
    logcnt: torch.Tensor  # [L, E] int64
    balancedness_before: float
    balancedness_after: float
    seconds: float
    prepared: PreparedRearrangement | None  # None: its preparation refused the input
    staged: StagedMove | None = None  # with layers_per_step: the move in chunks


@dataclass(frozen=True)
class RearrangeOptions:
    """How an :class:`ExpertBalancer` moves the weights when it applies a placement.

    The defaults are the README's recommended setting where it costs nothing:
    the move is prepared ahead on the worker thread. Kept, registered buffers
    hold their memory between rebalances, so they stay opt-in; high-priority
    NCCL streams belong to the process group the engine creates (see
    ``rearrange_expert_weights``).

    max_batch_bytes: the step budget of each weight rearrangement (see
        :func:`rearrange_expert_weights`): its buffers grow with it.
    keep_buffers: keep the rearrangement's message buffers from one rebalance
        to the next in a :class:`RearrangeBuffers` (with NCCL, registered with
        the communicator: faster, but the memory stays reserved);
        ``ExpertBalancer.close`` releases them, before the group is destroyed.
        False: allocated for the apply step only.
    keep_slots: reorder each new placement's slots within every GPU so that
        experts staying on a GPU keep their slots (:func:`keep_experts_in_place`):
        the same loads, far fewer local copies, but ``phy2log`` is then no longer
        the SPEC placement itself.
    prepare_ahead: the worker thread also prepares this rank's share of the move
        (:func:`eplb.production.prepare_rearrangement`), so the apply starts
        moving at once. Its Python work then shares the interpreter lock with the
        serving thread while the forward passes run; False plans inside the apply.
    timeout: seconds any one wait of the balancer's collectives may take (the
        load's all-reduce, every weight move and a staged commit's vote): a
        rank that fails, freezes or dies makes every other rank raise within
        it. The default (``group_guard.DEFAULT_TIMEOUT``, 90 s) is an order of
        magnitude above a whole legitimate move yet twenty times below the
        process group's own timeout (30 minutes), which would stall serving.
    in_place: with ``layers_per_step``, how a commit moves this rank's slots:
        True runs each layer's moves in place (:mod:`eplb.production.slot_moves`:
        local slots read once and written once, at the commit; only what
        crosses a wire goes through staging); False copies every changing slot
        into staging at the launch and back at the commit. None (default): in
        place where its Triton kernel runs (CUDA with Triton), else copies.
    """

    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    keep_buffers: bool = False
    keep_slots: bool = False
    prepare_ahead: bool = True
    timeout: float = DEFAULT_TIMEOUT
    in_place: bool | None = None

    def __post_init__(self) -> None:
        check_count("max_batch_bytes", self.max_batch_bytes)
        object.__setattr__(self, "timeout", check_timeout(self.timeout))
        if self.in_place is not None and not isinstance(self.in_place, bool):
            raise TypeError(f"in_place must be a bool or None, got {type(self.in_place).__name__}")
        for name in ("keep_buffers", "keep_slots", "prepare_ahead"):
            flag = getattr(self, name)
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


class LoadWindow:
    """Tokens each logical expert received in each of the last ``size`` steps, on one rank.

    ``add`` counts a layer's routed tokens into the current step (tensor ops
    only, graph-capturable); ``roll`` closes the step: it enters the window and
    the oldest step leaves it. ``total`` is the running sum, kept so that a
    rebalance need not sum the whole window.

    size: steps kept. layers, experts: the load's shape. device: where it lives.
    """

    def __init__(self, size: int, layers: int, experts: int, device: torch.device) -> None:
        self.size = check_count("window_size", size)
        # int32 halves the window's memory and holds any realistic per-step
        # count; the running total is int64.
        self._step = torch.zeros(layers, experts, dtype=torch.int32, device=device)
        self._steps = torch.zeros(self.size, layers, experts, dtype=torch.int32, device=device)
        #: [layers, experts] int64, tokens per logical expert over the window (live).
        self.total = torch.zeros(layers, experts, dtype=torch.int64, device=device)
        self._position = 0
        self._one = torch.ones((), dtype=torch.int32, device=device)

    def add(
        self, layer: int, expert_ids: torch.Tensor, counted: torch.Tensor | None = None
    ) -> None:
        """Count ``expert_ids`` ([n] int, logical experts) into this step's load of ``layer``.

        counted: [n] bool or None; where False, that id is not counted (masked ids).
        """
        ones = self._one.expand(expert_ids.numel())
        self._step[layer].index_add_(0, expert_ids, ones if counted is None else counted.int())

    def roll(self) -> None:
        """Close the step: it enters the window, the oldest step leaves."""
        oldest = self._steps[self._position]
        self.total.sub_(oldest).add_(self._step)
        oldest.copy_(self._step)
        self._step.zero_()
        self._position = (self._position + 1) % self.size


@dataclass
class BalancerStats:
    """What an :class:`ExpertBalancer` has done so far (host values, no device sync to read)."""

    #: Calls of ``step()``.
    steps: int = 0
    #: Placements applied (weights moved and maps updated).
    rebalances: int = 0
    #: Intervals at which no rebalance was started because the balancer had failed.
    skipped: int = 0
    #: Applies that had to wait for the worker thread.
    waits: int = 0
    #: The step at which the last placement was applied (0: none yet).
    last_rebalance_step: int = 0
    #: Worker-thread seconds spent computing the last placement and preparing its
    #: weight rearrangement (off the critical path).
    last_plan_seconds: float = 0.0
    #: Host seconds the last apply spent inside ``step()``: waiting for the worker,
    #: issuing the weight rearrangement and the map updates.
    last_apply_seconds: float = 0.0
    #: Mean over layers of SPEC.md's balancedness of the last rebalance's window load
    #: under the placement it replaced (1.0 is perfect).
    balancedness_before: float = float("nan")
    #: The same under the new placement.
    balancedness_after: float = float("nan")
    #: What the last weight rearrangement moved (bytes, experts, messages, seconds).
    last_rearrange: RearrangeStats | None = None


def as_host_placement(phy2log: torch.Tensor | np.ndarray, layers: int, slots: int) -> np.ndarray:
    """phy2log as a host int64 array, checked to be [layers, slots]."""
    if isinstance(phy2log, torch.Tensor):
        phy2log = phy2log.detach().cpu().numpy()
    host = np.asarray(phy2log)
    if host.shape != (layers, slots):
        raise ValueError(f"phy2log must have shape [{layers}, {slots}], got {host.shape}")
    if host.dtype.kind not in "iu":
        raise TypeError(f"phy2log must hold integers, got dtype {host.dtype}")
    return host.astype(np.int64)


def maps_from_phy2log(
    phy2log: np.ndarray, num_experts: int, max_replicas: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """phy2log [L, R] (host) to host phy2log, log2phy [L, E, max_replicas] and logcnt [L, E].

    Replica ranks follow slot order. Raises ValueError if an expert id is out
    of range or an expert has no slot.
    """
    layers, slots = phy2log.shape
    bad = (phy2log < 0) | (phy2log >= num_experts)
    if bad.any():
        layer, slot = np.argwhere(bad)[0]
        raise ValueError(
            f"phy2log values must lie in 0..{num_experts - 1}, got {phy2log[layer, slot]} at "
            f"[layer, slot]=[{layer}, {slot}]"
        )
    rows = np.repeat(np.arange(layers), slots)
    logcnt = np.zeros((layers, num_experts), dtype=np.int64)
    np.add.at(logcnt, (rows, phy2log.ravel()), 1)
    if (logcnt == 0).any():
        layer, expert = np.argwhere(logcnt == 0)[0]
        raise ValueError(f"phy2log must hold every expert: layer {layer} has no slot of {expert}")
    order = np.argsort(phy2log, axis=1, kind="stable")
    experts = np.take_along_axis(phy2log, order, axis=1)
    first = np.cumsum(logcnt, axis=1) - logcnt
    replica = np.arange(slots) - np.take_along_axis(first, experts, axis=1)
    log2phy = np.full((layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    log2phy[rows, experts.ravel(), replica.ravel()] = order.ravel()
    padded = pad_replicas(log2phy, max_replicas)
    return torch.from_numpy(phy2log), torch.from_numpy(padded), torch.from_numpy(logcnt)


def pad_replicas(log2phy: np.ndarray, max_replicas: int) -> np.ndarray:
    """log2phy [L, E, K] to [L, E, max_replicas]: -1 padded, or cut to the first ranks."""
    out = np.full((*log2phy.shape[:2], max_replicas), -1, dtype=np.int64)
    kept = min(max_replicas, log2phy.shape[2])
    out[..., :kept] = log2phy[..., :kept]
    return out


def finish_maps(
    maps: list[torch.Tensor],
    load: np.ndarray,
    old: tuple[np.ndarray, np.ndarray],
    config: EplbConfig,
    max_replicas: int,
    *,
    keep_slots: bool,
    pin: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """A computed placement made ready for a balancer: (phy2log, log2phy, logcnt, mean
    balancedness before, after).

    maps: CPU phy2log [L, R], log2phy [L, E, K], logcnt [L, E] of the new placement.
    load: [L, E] tokens per logical expert over the window (all ranks).
    old: phy2log [L, R] and logcnt [L, E] of the placement the weights hold.
    keep_slots: reorder the new placement's slots within every GPU so that experts
        staying on a GPU keep their slots (the same loads, far fewer copies).
    pin: pin the three maps (the balancer's host-to-device copies then do not block).
    log2phy comes back padded to ``max_replicas``.
    """
    phy2log, log2phy, logcnt = maps
    gpus = config.num_gpus
    before = balancedness(gpu_loads(load, old[0], old[1], gpus))
    after = balancedness(gpu_loads(load, phy2log.numpy(), logcnt.numpy(), gpus))
    if keep_slots:
        kept = keep_experts_in_place(old[0], phy2log.numpy(), gpus)
        phy2log, log2phy, logcnt = maps_from_phy2log(kept, config.num_logical_experts, max_replicas)
    else:
        log2phy = torch.from_numpy(pad_replicas(log2phy.numpy(), max_replicas))
    if pin:
        phy2log, log2phy, logcnt = (t.pin_memory() for t in (phy2log, log2phy, logcnt))
    return phy2log, log2phy, logcnt, float(before.mean()), float(after.mean())
