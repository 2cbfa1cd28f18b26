"""Serving state: record the load in the forward pass, rebalance on schedule, never stall the GPU.

A MoE serving engine holds one :class:`ExpertBalancer` per model and EP rank.
In every MoE layer of the forward pass it calls :meth:`ExpertBalancer.route`,
which turns the router's logical expert ids into physical slot ids and counts
the tokens per logical expert. Once per engine step it calls
:meth:`ExpertBalancer.step`, which keeps a sliding window of those counts and,
every ``step_interval`` steps, moves to a placement balanced for the window's
load (SPEC.md) without blocking the compute stream:

1. step ``n`` (a multiple of ``step_interval``): a snapshot of the window's
   total is queued on the compute stream; a side stream waits for it, sums it
   over the EP group (``all_reduce``) and copies it into a pinned host buffer
   (``non_blocking``, one event); the host returns at once. With
   ``apply_delay >= 2``, each ``step()`` polls that event, then hands the load
   to a placement service that never needs the interpreter lock
   (:mod:`eplb.production.placement_service`) and polls it. A worker thread
   prepares the move to the placement (and, with ``apply_delay=1``, where the
   service cannot run or for the migration-aware policy, computes it first).
2. step ``n + apply_delay``: every rank takes the worker's placement (waiting
   only if the worker has not finished), moves the expert weights to it
   (:func:`eplb.production.rearrange_expert_weights`, a collective) and
   updates the maps in place, ordered on the compute stream after every
   forward pass already queued. The worker has already worked out this rank's
   share of that move (:func:`eplb.production.prepare_rearrangement`), so the
   rearrangement starts moving at once.

   With ``layers_per_step=K``, the move is spread over the next
   ``ceil(L / K)`` steps instead, K layers each, on a side stream while
   forward passes run, each layer switching wholly at a step boundary
   (:mod:`eplb.production.staged`).

The glossary (phy2log, log2phy, logcnt, slot, rank) is in ``eplb.reference``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

from eplb._validation import check_count, validate_config, validate_tolerance

from .balancer_load import LoadTimeout, fault_load_group, load_arrived, reduce_load
from .balancer_state import (
    BalancerStats,
    LoadWindow,
    Plan,
    RearrangeOptions,
    as_host_placement,
    finish_maps,
    maps_from_phy2log,
)
from .errors import move_failed_once_begun
from .group_guard import fault_of
from .migration import rebalance_experts_migration_aware
from .placement_service import PlacementInFlight, service_for
from .rearrange import (
    PreparedRearrangement,
    RearrangeBuffers,
    RearrangeStats,
    prepare_rearrangement,
    rearrange_expert_weights,
    warmup_rearrangement,
)
from .rebalance import rebalance_experts
from .staged import StagedApply, staged_steps
from .transport import rank_and_size

__all__ = ["BalancerStats", "ExpertBalancer", "LoadWindow", "RearrangeOptions"]


class ExpertBalancer:
    """Per-model EPLB state of one EP rank: load statistics, maps, scheduled rebalancing.

    Use::

        balancer = ExpertBalancer(58, 256, 288, 8, 4, device="cuda", group=ep_group)
        slots = balancer.route(layer, topk_ids)  # in each MoE layer, graph-capturable
        balancer.step(expert_weights)  # once per engine step, after the forward pass

    Static device buffers (their ``data_ptr`` never changes, so CUDA graphs
    captured against them stay valid; every update is an in-place ``copy_``):

    - ``phy2log``: [layers, num_replicas] int64, the logical expert each slot holds.
    - ``log2phy``: [layers, num_logical_experts, max_replicas] int64, the slots of
      each expert, one per replica rank, -1 padded.
    - ``logcnt``: [layers, num_logical_experts] int64, replicas of each expert.
    - the load window: the tokens each logical expert received in each of the
      last ``window_size`` steps on this rank (see :meth:`window_load`).

    Initial placement: slot ``s`` holds expert ``s % num_logical_experts`` in
    every layer: the checkpoint order when ``num_replicas == num_logical_experts``,
    and with extra slots, a second replica of experts ``0 .. R-E-1`` (the layout
    engines such as vLLM load redundant experts in). Call :meth:`reset` with
    another phy2log if the weights were loaded in another placement.

    Schedule: at every step ``n`` that is a multiple of ``step_interval`` the
    window's load, summed over the EP group, goes to ``placement_service``
    (a :class:`PlacementService`; None with ``apply_delay=1`` or where it cannot run, and
    ``placement_service_error`` says why: then the worker thread computes the
    placement), polled by each ``step()``; a worker thread prepares this rank's
    share of the weight move (``RearrangeOptions.prepare_ahead``). At step
    ``n + apply_delay`` every rank applies it, waiting only if it is not ready
    (counted in ``stats.waits``). The placement is a deterministic function of
    the all-reduced load, so every rank computes the same one, and applying it
    at a fixed step makes every rank enter the rearrangement collective at the
    same point. ``apply_delay < step_interval``, so a rebalance is never still
    running at the next interval.

    Failure (every collective waits at most ``RearrangeOptions.timeout``): the
    exception that failed a rebalance is kept in ``error``. ``step()`` re-raises
    it and the maps keep the old placement.

    - A move that failed once it began (a rank raised, froze or died) raises
      :class:`eplb.production.errors.RearrangeError` on every rank; its
      ``layers_changed`` are this rank's layers that no longer hold the old
      placement (new or mixed). The weights no longer match the maps, so
      every later ``step()`` raises RuntimeError until the engine recovers:
      reload ``error.layers_changed`` from the checkpoint in the old placement
      (``phy2log`` still holds it), recreate the process group (the failed
      move aborted it and later moves on it are refused), then call
      ``reset(phy2log, group=new_group)`` on every rank at the same step.
      A GroupFault (a rank did not reach the agreement) is handled the same way.
    - The load's all-reduce not completing within the timeout (a rank froze
      or died before the move) raises the backend's error (gloo: its
      ``wait(timeout)``'s RuntimeError, at the interval step) or
      ``balancer_load.LoadTimeout``, a TimeoutError (CUDA: at the apply).
      No weight was touched; the group is faulted as by a failed guarded call
      (posted on the failure board, marked faulted, NCCL aborted): recreate
      the group and call ``reset(group=new_group)``.
    - A placement computation that raises, or a move refused before any
      weight was touched (TypeError/ValueError on the refusing rank,
      AgreementError on the others): routing goes on with the old maps and
      later intervals start no rebalance (``stats.skipped``) until ``reset()``.
    - A staged apply (``layers_per_step``) that fails raises
      :class:`eplb.production.StagedApplyError` on every rank at the same
      step; the maps then describe the weights exactly (its ``layers_new``
      hold the new placement, ``layers_old`` the old one), so ``reset()``
      resumes (with ``group=`` a new group if its move faulted the old one).

    Every rank of ``group`` must create its balancer with the same arguments
    (construction is collective: it opens the point-to-point channels the
    rearrangement uses, :func:`eplb.production.warmup_rearrangement`) and call
    :meth:`step` the same number of times.
    """

    def __init__(
        self,
        num_layers: int,
        num_logical_experts: int,
        num_replicas: int,
        num_groups: int = 1,
        num_nodes: int = 1,
        *,
        device: torch.device | str,
        group: dist.ProcessGroup | None = None,
        window_size: int = 1000,
        step_interval: int = 3000,
        apply_delay: int = 1,
        max_replicas: int | None = None,
        rearrange: RearrangeOptions | None = None,
        layers_per_step: int | None = None,
        migration_tolerance: float | None = None,
    ) -> None:
        """Allocate the buffers and install the initial placement.

        num_layers, num_logical_experts, num_replicas, num_groups, num_nodes: the
            model's MoE shape as in SPEC.md (L, E, R, G, N); num_gpus is the size
            of ``group``.
        device: where the buffers live (the device the forward pass runs on).
        group: the EP process group; None is the default group, or a single
            rank when torch.distributed is not initialized. With NCCL, give it
            high-priority streams (see ``rearrange_expert_weights``).
        window_size: steps of load kept in the sliding window.
        step_interval: steps between rebalances.
        apply_delay: steps between computing a placement and applying it
            (``1 <= apply_delay < step_interval``); the worker has this many
            forward passes to finish.
        max_replicas: replica ranks kept in ``log2phy`` (default and maximum
            ``R - E + 1``, the most any placement can give one expert). With
            less, replicas beyond it keep their weights but receive no tokens.
        rearrange: how the weights move (:class:`RearrangeOptions`; default:
            its defaults, the move prepared ahead on the worker thread).
        layers_per_step: apply each placement this many layers per step, the
            weights moving on a side stream while forward passes go on, each
            layer switching wholly at a step boundary
            (:class:`eplb.production.StagedApply`): ``ceil(num_layers /
            layers_per_step)`` steps after the apply step, which must end
            before the next interval. None: all layers in the apply step.
        migration_tolerance: None computes SPEC's placement for each window; a
            number uses the migration-aware policy
            (:func:`eplb.production.rebalance_experts_migration_aware`) from the
            current placement instead: experts stay where they are unless moving
            them is needed to bring each layer's largest GPU load within this
            fraction of SPEC's.
        """
        _, self.num_gpus = rank_and_size(group)
        self.config = validate_config(
            (num_layers, num_logical_experts), num_replicas, num_groups, num_nodes, self.num_gpus
        )
        if rearrange is None:
            rearrange = RearrangeOptions()
        if not isinstance(rearrange, RearrangeOptions):
            raise TypeError(
                f"rearrange must be a RearrangeOptions or None, got {type(rearrange).__name__}"
            )
        self.rearrange = rearrange
        self.window_size = check_count("window_size", window_size)
        self.step_interval = check_count("step_interval", step_interval)
        self.apply_delay = check_count("apply_delay", apply_delay)
        self.migration_tolerance = (
            None
            if migration_tolerance is None
            else validate_tolerance(migration_tolerance, "migration_tolerance")
        )
        if self.apply_delay >= self.step_interval:
            raise ValueError(
                f"apply_delay must be < step_interval, got apply_delay={self.apply_delay} "
                f"and step_interval={self.step_interval}"
            )
        if layers_per_step is not None:
            chunks = staged_steps(num_layers, layers_per_step)
            if self.apply_delay + chunks >= self.step_interval:
                raise ValueError(
                    "apply_delay + ceil(num_layers / layers_per_step) must be < step_interval, "
                    f"got {self.apply_delay} + {chunks} and step_interval={self.step_interval}"
                )
        largest = num_replicas - num_logical_experts + 1
        self.max_replicas = (
            largest if max_replicas is None else check_count("max_replicas", max_replicas)
        )
        if self.max_replicas > largest:
            raise ValueError(
                f"max_replicas must be <= num_replicas - num_logical_experts + 1 = {largest}, "
                f"got {self.max_replicas}"
            )
        # route() must not pick a replica rank that log2phy does not keep.
        self._truncated = self.max_replicas < largest
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # route() compares devices: "cuda" must match the tensors' "cuda:N".
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.group = group
        self.stats = BalancerStats()
        from .cores import warm_up_placement

        warm_up_placement()  # the placement core compiles (or loads) here, not on the worker
        #: The exception that failed the last rebalance, None while healthy.
        self.error: BaseException | None = None

        layers, experts = num_layers, num_logical_experts
        dev = self.device
        self.phy2log = torch.empty(layers, num_replicas, dtype=torch.int64, device=dev)
        self.log2phy = torch.empty(
            layers, experts, self.max_replicas, dtype=torch.int64, device=dev
        )
        self.logcnt = torch.empty(layers, experts, dtype=torch.int64, device=dev)
        # route() adds into the window's step; step() rolls it.
        self.window = LoadWindow(self.window_size, layers, experts, dev)
        # The interval's load: written on the compute stream, then reduced and
        # copied to the host on the side stream while the next steps run.
        self._snapshot = torch.zeros(layers, experts, dtype=torch.int64, device=dev)

        cuda = self.device.type == "cuda"
        self._side_stream = torch.cuda.Stream(self.device) if cuda else None
        self._copied: torch.cuda.Event | None = None
        self._host_load = (
            torch.zeros(layers, experts, dtype=torch.int64, pin_memory=True)
            if cuda
            else self._snapshot
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-plan")
        self._pending: Future[Plan] | None = None
        self.placement_service, self.placement_service_error = service_for(
            self.config, self.migration_tolerance is not None, self.apply_delay
        )
        self._placing: PlacementInFlight | None = None  # in the service, polled by step()
        self._closed = False
        self._apply_at = 0

        # The first rebalance should not pay for opening the P2P channels
        # (RearrangeBuffers opens them too).
        self._buffers = (
            RearrangeBuffers(group, self.device if cuda else None, rearrange.timeout)
            if rearrange.keep_buffers
            else None
        )
        if self._buffers is None:
            warmup_rearrangement(group, self.device if cuda else None, timeout=rearrange.timeout)

        initial = np.tile(np.arange(num_replicas) % experts, (layers, 1))
        self._host_phy2log = torch.from_numpy(initial)
        self._host_logcnt = torch.empty(0, dtype=torch.int64)
        self._install(*maps_from_phy2log(initial, experts, self.max_replicas))
        self._staged = (
            None
            if layers_per_step is None
            else StagedApply(
                self.phy2log,
                self.log2phy,
                self.logcnt,
                layers_per_step,
                group=group,
                max_batch_bytes=rearrange.max_batch_bytes,
                buffers=self._buffers,
                timeout=rearrange.timeout,
                in_place=rearrange.in_place,
            )
        )
        self._staging: Plan | None = None  # the plan a staged apply is applying

    # ------------------------------------------------------------------ forward pass

    def route(self, layer: int, topk_ids: torch.Tensor, record: bool = True) -> torch.Tensor:
        """Physical slots for the router's choices in ``layer``; counts the load.

        layer: the MoE layer, a Python int (fixed when a CUDA graph is captured).
        topk_ids: [tokens, k] int32/int64 on ``device``, the logical expert each
            token chose in each of its k choices. An id outside 0..E-1 (e.g. -1
            for a padding token) goes to slot -1 and is not counted, with or
            without ``record``: raising instead would need a host sync.
        record: count these tokens in the load (False for warm-up and dummy
            batches, e.g. those run while capturing CUDA graphs).

        Returns [tokens, k], same dtype: the slot each choice goes to, -1 for
        ids outside 0..E-1 (MoE kernels skip such entries). Token ``t``'s choice
        of expert ``e`` goes to replica ``t % logcnt[layer, e]``, so an
        expert's tokens spread over its replicas deterministically. Tensor ops
        only: no host sync, safe inside ``torch.cuda.graph`` capture.
        """
        self._check_open()
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer must be in 0..{self.config.num_layers - 1}, got {layer}")
        if topk_ids.dim() != 2:
            raise ValueError(f"topk_ids must be 2-D [tokens, k], got shape {tuple(topk_ids.shape)}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
        if topk_ids.device != self.device:
            raise ValueError(f"topk_ids must be on {self.device}, got {topk_ids.device}")
        # Masked, not checked: ids outside 0..E-1 look up expert 0, then count
        # nothing and get slot -1, the same in both modes.
        valid = (topk_ids >= 0) & (topk_ids < self.config.num_logical_experts)
        ids = topk_ids.where(valid, 0)
        if record:
            self.window.add(layer, ids.reshape(-1), valid.reshape(-1))
        count = self.logcnt[layer][ids]
        if self._truncated:
            count.clamp_(max=self.max_replicas)
        token = torch.arange(topk_ids.shape[0], device=self.device).unsqueeze(1)
        slots = self.log2phy[layer][ids, token % count]
        return slots.where(valid, -1).to(topk_ids.dtype)

    def window_load(self) -> torch.Tensor:
        """[layers, num_logical_experts] int64 on ``device``: this rank's tokens per
        logical expert over the window, as of the last ``step()``. A live buffer:
        read it, do not write it."""
        self._check_open()
        return self.window.total

    # ------------------------------------------------------------------ once per step

    def step(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> bool:
        """End an engine step: roll its load into the window, rebalance on schedule.

        expert_weights: per layer, this rank's expert weight tensors, each
            [R / num_gpus, ...] (slot ``rank * R / num_gpus + i`` at index i); moved
            in place when a placement is applied.

        Returns True when this step finished applying a new placement (with
        ``layers_per_step``: committed its last layers). Raises what the
        rearrangement or the placement computation raised (see the class
        docstring); the balancer is then failed until :meth:`reset`. After a
        move that failed once begun (RearrangeError, GroupFault), raises
        RuntimeError, before counting the step, until ``reset(phy2log, ...)``.
        """
        self._check_open()
        if move_failed_once_begun(self.error):
            raise RuntimeError(
                "a rebalance of this ExpertBalancer failed while moving weights "
                f"({type(self.error).__name__}: {self.error}); the weights no longer match the "
                "maps: reload the layers it names (error.layers_changed) and call "
                "reset(phy2log, group=...) on every rank first"
            ) from self.error
        self.window.roll()
        self.stats.steps += 1
        applied = False
        if self._staging is not None:
            applied = self._advance_staged(expert_weights)
        if self._placing is not None:
            self._collect(expert_weights, block=False)
        due = self.stats.steps >= self._apply_at
        if (self._pending is not None or self._placing is not None) and due:
            applied = self._apply(expert_weights)
        if self.stats.steps % self.step_interval == 0:
            if self.error is None:
                self._start_rebalance(expert_weights)
            else:
                self.stats.skipped += 1
        return applied

    def reset(
        self,
        phy2log: torch.Tensor | np.ndarray | None = None,
        *,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """Forget a failure and any placement not yet applied; optionally install one.

        phy2log: [layers, num_replicas] int, the placement the expert weights
            hold now (the maps are updated in place to it); None keeps the maps.
            Every expert must appear at least once. The load window is kept.
            Required after a move failed once it began (``error`` a
            RearrangeError or GroupFault): only the engine knows what it reloaded.
        group: a new EP process group of the same size, replacing one a failed
            move aborted (required then); the balancer's later collectives use
            it. Given, the call is collective (it opens the new group's
            point-to-point channels).

        Every rank must call it at the same step.
        """
        self._check_open()
        if phy2log is None and move_failed_once_begun(self.error):
            raise ValueError(
                "phy2log is required: the last rebalance failed while moving weights; pass "
                "the placement the weights hold after reloading error.layers_changed"
            )
        if group is None and fault_of(self.group) is not None:
            raise ValueError(
                "group is required: a failed move aborted the process group; pass a new one"
            )
        maps = None
        if phy2log is not None:
            host = as_host_placement(phy2log, self.config.num_layers, self.config.num_replicas)
            maps = maps_from_phy2log(host, self.config.num_logical_experts, self.max_replicas)
        if self._placing is not None:
            self._placing.drop()
            self._placing = None
        if self._pending is not None:
            # Dropped: it was planned against the old maps, which the worker
            # reads until it returns.
            self._pending.exception()
            self._pending = None
        if self._staging is not None:
            assert self._staged is not None
            # The layers committed so far hold the new placement.
            self._staged.cancel()
            self._staging = None
            if maps is None:
                maps = maps_from_phy2log(
                    self._staged.placement()[0].numpy(),
                    self.config.num_logical_experts,
                    self.max_replicas,
                )
        if maps is not None:
            self._install(*maps)
        if group is not None:
            self._replace_group(group)
        self.error = None

    def _replace_group(self, group: dist.ProcessGroup) -> None:
        """Use ``group`` from now on (collective: opens its channels, remakes kept buffers)."""
        if rank_and_size(group)[1] != self.num_gpus:
            raise ValueError(f"group must have {self.num_gpus} ranks like the one it replaces")
        self.group = group
        device = self.device if self.device.type == "cuda" else None
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = RearrangeBuffers(group, device, self.rearrange.timeout)
        else:
            warmup_rearrangement(group, device, timeout=self.rearrange.timeout)
        if self._staged is not None:
            self._staged.group = group
            self._staged.buffers = self._buffers

    def close(self) -> None:
        """Drop a placement not yet applied, stop the worker thread, free kept buffers.

        Waits for a placement being computed, then drops it: no later call
        applies it. Call it on every rank before destroying the process group.
        Any use after ``close()`` raises RuntimeError; a second close does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._pending = self._placing = None
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.placement_service is not None:
            self.placement_service.stop()
        if self._buffers is not None:
            self._buffers.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ExpertBalancer was closed; make a new one")

    @property
    def failed(self) -> bool:
        """True after a failed rebalance, until :meth:`reset`."""
        return self.error is not None

    # ------------------------------------------------------------------ internals

    def _start_rebalance(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> None:
        self._snapshot.copy_(self.window.total)
        try:
            self._copied = reduce_load(
                self._snapshot,
                self._host_load,
                self.group,
                self.num_gpus > 1,
                self._side_stream,
                self.rearrange.timeout,
            )
        except Exception as exc:
            self.error = exc
            raise
        self._apply_at = self.stats.steps + self.apply_delay
        if self.placement_service is None:
            self._pending = self._executor.submit(self._plan, expert_weights)
            return
        self._placing = PlacementInFlight(
            self.placement_service, self._host_load, self._copied, self.rearrange.timeout
        )
        self._collect(expert_weights, block=False)

    def _collect(self, expert_weights: Sequence[Sequence[torch.Tensor]], block: bool) -> None:
        """Once the service's placement is done (``block``: wait), the worker prepares its move."""
        assert self._placing is not None
        pending = self._placing.hand_over(block, self._executor, self._plan_from, expert_weights)
        if pending is not None:
            self._pending, self._placing = pending, None

    def _plan(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> Plan:
        """Worker thread, without the service: wait for the load, place, ``_plan_from``."""
        deadline = time.monotonic() + self.rearrange.timeout
        while not load_arrived(self._copied, deadline, self.rearrange.timeout):
            time.sleep(1e-3)  # the apply raises its TimeoutError
        start = time.perf_counter()
        cfg = self.config
        counts = (cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus)
        if self.migration_tolerance is None:
            phy2log, log2phy, logcnt = rebalance_experts(self._host_load, *counts)
        else:
            phy2log, log2phy, logcnt = rebalance_experts_migration_aware(
                self._host_load,
                *counts,
                old_phy2log=self._host_phy2log,
                tolerance=self.migration_tolerance,
            )
        seconds = time.perf_counter() - start
        return self._plan_from([phy2log, log2phy, logcnt], expert_weights, seconds)

    def _plan_from(
        self,
        maps: list[torch.Tensor],
        expert_weights: Sequence[Sequence[torch.Tensor]],
        seconds: float,
    ) -> Plan:
        """Worker thread: the Plan of maps (phy2log, log2phy, logcnt; CPU), with this rank's
        share of the move (views of the weights' slots, no data read): the apply then
        moves weights at once. seconds: the placement's."""
        start = time.perf_counter()
        # Main thread changes the host maps only in _apply, after this returns.
        phy2log, log2phy, logcnt, before, after = finish_maps(
            maps,
            self._host_load.numpy(),
            (self._host_phy2log.numpy(), self._host_logcnt.numpy()),
            self.config,
            self.max_replicas,
            keep_slots=self.rearrange.keep_slots,
            pin=self._side_stream is not None,
        )
        prepared: PreparedRearrangement | None = None
        staged = None
        if self._staged is not None:
            new_maps = (phy2log, log2phy, logcnt)
            staged = self._staged.prepare(
                self._host_phy2log, new_maps, expert_weights, ahead=self.rearrange.prepare_ahead
            )
        elif self.rearrange.prepare_ahead:
            try:
                prepared = prepare_rearrangement(
                    self._host_phy2log,
                    phy2log,
                    expert_weights,
                    self.group,
                    max_batch_bytes=self.rearrange.max_batch_bytes,
                )
            except (TypeError, ValueError):
                # Left to the apply's call: it checks again, on every rank at once,
                # and refuses there; a refusal here alone would leave the others waiting.
                pass
        seconds += time.perf_counter() - start
        return Plan(
            phy2log,
            log2phy,
            logcnt,
            before,
            after,
            seconds,
            prepared,
            staged,
        )

    def _apply(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Apply the worker's placement; False when it goes on in chunks (``_advance_staged``)."""
        start = time.perf_counter()
        waited = self._placing is not None
        if waited:
            self._collect(expert_weights, block=True)
        assert self._pending is not None
        if waited or not self._pending.done():
            self.stats.waits += 1
        pending, self._pending = self._pending, None
        try:
            plan = pending.result()
            if plan.staged is not None:
                assert self._staged is not None
                self._staged.begin(plan.staged, expert_weights)
                self._staging = plan
                return False
            moved = rearrange_expert_weights(
                self._host_phy2log,
                plan.phy2log,
                expert_weights,
                self.group,
                max_batch_bytes=self.rearrange.max_batch_bytes,
                buffers=self._buffers,
                prepared=plan.prepared,
                timeout=self.rearrange.timeout,
            )
        except BaseException as exc:
            self.error = exc
            if isinstance(exc, LoadTimeout):
                fault_load_group(self.group, exc, self.rearrange.timeout)
            raise
        self._install(plan.phy2log, plan.log2phy, plan.logcnt)
        self._record(plan, moved, time.perf_counter() - start)
        return True

    def _advance_staged(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Commit the chunk in flight, launch the next; True once the last is committed."""
        assert self._staged is not None and self._staging is not None
        plan = self._staging
        try:
            done = self._staged.advance(expert_weights)
        except BaseException as exc:
            # The weights hold the committed layers' new placement, the rest the old.
            self._staging = None
            self._host_phy2log, self._host_logcnt = self._staged.placement()
            self.error = exc
            raise
        if not done:
            return False
        self._staging = None
        self._host_phy2log, self._host_logcnt = plan.phy2log, plan.logcnt
        self._record(plan, self._staged.stats(), self._staged.host_seconds)
        return True

    def _record(self, plan: Plan, moved: RearrangeStats, apply_seconds: float) -> None:
        stats = self.stats
        stats.rebalances += 1
        stats.last_rebalance_step = stats.steps
        stats.last_plan_seconds = plan.seconds
        stats.balancedness_before = plan.balancedness_before
        stats.balancedness_after = plan.balancedness_after
        stats.last_rearrange = moved
        stats.last_apply_seconds = apply_seconds

    def _install(self, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
        """Copy host maps into the static buffers, ordered on the current stream."""
        self.phy2log.copy_(phy2log, non_blocking=True)
        self.log2phy.copy_(log2phy, non_blocking=True)
        self.logcnt.copy_(logcnt, non_blocking=True)
        self._host_phy2log, self._host_logcnt = phy2log, logcnt


# ---------------------------------------------------------------------- helpers
