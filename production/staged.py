"""Staged rebalance: apply a placement a few layers per step while serving goes on.

:class:`StagedApply` applies one placement (see ``ExpertBalancer(...,
layers_per_step=K)``) in chunks of K consecutive layers, one chunk per engine
step, so that no forward pass waits for the whole weight move:

1. Launch (step ``n``, after that step's forward pass was queued): on a side
   stream, this rank's local copies (slots whose new expert it already holds)
   from the chunk's live slots into a staging buffer, one copy call per dtype
   (:mod:`.staged_copies`: laid out ahead by :meth:`StagedApply.prepare`,
   from slot views made once per tensor); then what crosses a wire, by
   :func:`eplb.production.rearrange_expert_weights` with the chunk's old rows,
   its ``wire`` rows (the new ones with every slot a local copy fills left at
   its old expert, the same on every rank) and ``into=`` the staging buffer
   (the live slots are only read, the slots that change are written to
   staging, with no order among the copies and no cycle to break; its own
   pack, wire and write streams wait for the side stream and the side stream
   waits for them); a chunk where nothing crosses a wire on any rank makes no
   such call (no rank does). On CUDA that call returns once every rank has
   issued its move (``host_wait=False``): the host does not wait for the
   chunk's messages, which are queued behind the forward pass in flight. Then
   the vote: an all-reduce of "this rank holds the chunk" over the EP group,
   also on the side stream, so it completes only once every rank's move has.
   The live slots and maps are not touched:
   forward pass ``n + 1`` runs on the compute stream with the old weights and
   maps of those layers. The first chunk's wire move is planned ahead with
   the placement (:meth:`StagedApply.prepare`, on the balancer's worker
   thread); each later chunk's is planned by its launch.
2. Commit (step ``n + 1``): the host waits for the vote (at most ``timeout``
   seconds; on CUDA it has normally long completed): on CUDA the one host
   wait of a chunk, covering its messages too. If every rank holds the
   chunk, the compute stream waits for the vote's event (only this: it
   follows the move) and then, on the compute stream, copies staging into the
   slots and the new ``phy2log``/``log2phy``/``logcnt`` rows of those layers
   into the maps, in place (static buffers: CUDA graphs stay valid). Forward
   pass ``n + 2`` sees those layers wholly new. The next chunk is launched in
   the same step; its writes into staging wait (on the side stream) for this
   commit's copies only.

In place (``in_place``, the default where the Triton kernel of
:mod:`.slot_moves` runs): the launch makes no local copy (only the wire's
receives go into staging, and each layer's move program to the device), and
the commit runs each layer's moves in the slots themselves
(:func:`eplb.production.slot_moves.apply_slot_moves`, on the compute stream
after the vote): each changing slot is read and written once, where the
copies read and write it twice (live -> staging -> live). Before the vote,
only staging is written either way, so what a failure leaves is the same.

So a placement of L layers takes ``ceil(L / K)`` steps after the one that
launches its first chunk: chunk c is launched at step ``a + c`` and committed
at step ``a + c + 1``, one forward pass in flight each. In every forward pass
each layer's maps and weights agree: a layer is wholly old or wholly new.

Memory: one staging buffer of K layers of this rank's slots, allocated once
(:attr:`StagedApply.staging_bytes`), never zeroed (each launch writes the
chunk's changing slots, the only ones its commit reads), plus the move's
message ring, bounded by ``max_batch_bytes`` per pipeline step as for any
rearrangement. The vote's flags (and, on CUDA,
their pinned host copy and the events) are allocated once too.

Failure: nothing is written before every rank has voted that it holds the
chunk, so if any rank fails (its move raises, or it stops answering and the
vote does not complete within ``timeout``), every rank's layers are either
wholly old or wholly new, with maps that match. :class:`StagedApplyError`
lists them; the balancer's maps then describe the weights exactly. A move
that raises raises on every rank (its guarded call's one outcome) and faults
the group there. A vote that does not complete within ``timeout`` (a peer
froze or died, before or after its move: on CUDA the move's messages are
waited for only through the vote) faults the group on the rank that waited:
:meth:`~eplb.production.group_guard.GroupGuard.fault` posts it on the group's
failure board, marks the group faulted and aborts its NCCL communicator (the
move's and the vote's kernels stuck on the peer end); later guarded calls,
and later launches, on that group then refuse at once. A vote cannot be
withdrawn, so the ranks may differ by one chunk: a rank whose vote completed
(a peer that was late, not dead, or whose vote landed as the others' deadline
expired) commits that chunk while the rank that timed out does not. The
former learns of it at its next collective on the group: at once in a guarded
call (the failure board), else when that collective's own deadline expires;
its error then lists that chunk as new. Each rank's error is exact about its
own layers.

The glossary (phy2log, log2phy, logcnt, slot, rank) is in ``eplb.reference``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist

from .errors import GroupFault, move_failed_once_begun
from .group_guard import DEFAULT_TIMEOUT, GroupGuard, check_timeout, fault_of
from .rearrange import (
    RearrangeBuffers,
    RearrangeStats,
    prepare_rearrangement,
    rearrange_expert_weights,
)
from .slot_moves import SlotMoves, apply_slot_moves, plan_slot_moves, triton_available
from .staged_copies import ChunkCopies, CopyLayout, issue, local_sources
from .staged_move import StagedMove, changed_runs, check_in_place, logcnt_of

__all__ = [
    "StagedApply",
    "StagedApplyError",
    "StagedMove",
    "staged_steps",
]

# Host sleep between polls of the vote while waiting for it: short against a
# forward pass, long enough not to spin a core.
_POLL_SECONDS = 1e-4


def staged_steps(num_layers: int, layers_per_step: object) -> int:
    """Steps a staged apply of ``num_layers`` takes: ``ceil(num_layers / layers_per_step)``.

    Raises TypeError/ValueError unless ``layers_per_step`` is an int >= 1.
    """
    if isinstance(layers_per_step, bool) or not isinstance(layers_per_step, int):
        raise TypeError(
            f"layers_per_step must be an int or None, got {type(layers_per_step).__name__}"
        )
    if layers_per_step < 1:
        raise ValueError(f"layers_per_step must be >= 1, got {layers_per_step}")
    return -(-num_layers // layers_per_step)


class StagedApplyError(RuntimeError):
    """A staged apply stopped before its last commit.

    layers_new: layers holding the new placement (weights and maps) on this rank.
    layers_old: layers holding the old one on this rank. No layer is mixed. The
        same on every rank, unless a vote did not complete in time on some
        rank: a rank whose vote completed may then have committed one chunk more.
    """

    def __init__(self, message: str, layers_new: Sequence[int], layers_old: Sequence[int]) -> None:
        super().__init__(message)
        self.layers_new = tuple(layers_new)
        self.layers_old = tuple(layers_old)


class StagedApply:
    """Applies placements K layers per step into a balancer's maps (see the module docstring).

    phy2log, log2phy, logcnt: the balancer's static device maps ([L, R],
        [L, E, max_replicas], [L, E] int64), updated in place, a chunk's rows
        at its commit.
    layers_per_step: K, layers per chunk (>= 1).
    group: the EP process group (None: the world, or a single rank).
    max_batch_bytes, buffers: passed to every chunk's move.
    timeout: seconds any wait of a chunk's move, and a commit's wait for the
        other ranks' votes (on CUDA: for the chunk's messages too), may take
        (default ``group_guard.DEFAULT_TIMEOUT``); a vote past it faults the group.
    in_place: the commit runs each layer's slot moves in place
        (:func:`eplb.production.slot_moves.apply_slot_moves`) and the launch
        moves only what crosses a wire into staging; False: the launch copies
        the local moves into staging too and the commit copies every changing
        slot back. None: in place where the Triton kernel runs (CUDA). On one
        GPU that halves the bytes a chunk moves: each changing slot is read
        and written once, at the commit.

    Every rank must make the same calls at the same steps.
    """

    def __init__(
        self,
        phy2log: torch.Tensor,
        log2phy: torch.Tensor,
        logcnt: torch.Tensor,
        layers_per_step: int,
        *,
        group: dist.ProcessGroup | None = None,
        max_batch_bytes: int,
        buffers: RearrangeBuffers | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        in_place: bool | None = None,
    ) -> None:
        staged_steps(phy2log.shape[0], layers_per_step)
        timeout = check_timeout(timeout)
        if in_place is not None and not isinstance(in_place, bool):
            raise TypeError(f"in_place must be a bool or None, got {type(in_place).__name__}")
        self._maps = (phy2log, log2phy, logcnt)
        self.num_layers = phy2log.shape[0]
        self.layers_per_step = layers_per_step
        self.group = group
        self.max_batch_bytes = max_batch_bytes
        self.buffers = buffers
        self.timeout = float(timeout)
        self.device = phy2log.device
        distributed = dist.is_available() and dist.is_initialized()
        self._rank = dist.get_rank(group) if distributed else 0
        self._world_size = dist.get_world_size(group) if distributed else 1
        self._local = phy2log.shape[1] // self._world_size  # slots per rank
        #: Views of the staging buffer's and the weights' slots (with the staging buffer).
        self._layout: CopyLayout | None = None
        self._cuda = self.device.type == "cuda"
        self.in_place = (self._cuda and triton_available()) if in_place is None else in_place
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        #: K layers of this rank's slots, allocated by the first prepare and kept.
        self._staging: list[list[torch.Tensor]] = []
        # The state of the apply in progress.
        self._move: StagedMove | None = None
        self._current: tuple[torch.Tensor, torch.Tensor] | None = None  # host phy2log, logcnt
        self._chunk = 0  # the chunk in flight
        self._failure: BaseException | None = None  # this rank's, to report at the commit
        # The vote's buffers, made once (see _make_vote_buffers); the events are
        # recorded anew at each launch and commit, never waited on twice.
        self._make_vote_buffers()
        self._vote: dist.Work | None = None
        self._voting = False  # a vote was issued and not yet read
        self._voted = torch.cuda.Event() if self._cuda else None
        self._committed = torch.cuda.Event() if self._cuda else None
        self._moved: list[RearrangeStats] = []
        self._copies: ChunkCopies | None = None  # the chunk in flight's, from its launch
        #: Host seconds spent in ``begin`` and ``advance`` for the current or last apply.
        self.host_seconds = 0.0

    # ------------------------------------------------------------------ public

    @property
    def num_chunks(self) -> int:
        """Steps one placement takes: ``ceil(layers / layers_per_step)``."""
        return staged_steps(self.num_layers, self.layers_per_step)

    def chunk(self, index: int) -> range:
        """The layers of chunk ``index``."""
        start = index * self.layers_per_step
        return range(start, min(start + self.layers_per_step, self.num_layers))

    @property
    def active(self) -> bool:
        """True while a placement is being applied (a chunk is in flight)."""
        return self._move is not None

    @property
    def staging_bytes(self) -> int:
        """Bytes of the staging buffer (0 until the first :meth:`prepare`)."""
        return sum(t.numel() * t.element_size() for layer in self._staging for t in layer)

    def prepare(
        self,
        old_phy2log: torch.Tensor,
        new_maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        expert_weights: Sequence[Sequence[torch.Tensor]],
        *,
        ahead: bool = True,
    ) -> StagedMove:
        """Make a :class:`StagedMove` (host work, safe on a worker thread).

        old_phy2log: [layers, R] int64 host, the placement the weights hold.
        new_maps: host phy2log [L, R], log2phy [L, E, max_replicas], logcnt [L, E]
            of the new placement.
        expert_weights: per layer, this rank's weight tensors; the first call
            allocates the staging buffer after them (one chunk of layers). If
            they do not fit (not one list of tensors per layer), nothing is
            allocated or prepared and the launch refuses the move on every rank.
        ahead: also prepare the first chunk's move into the staging buffer
            (:func:`eplb.production.prepare_rearrangement`), so that the apply
            step starts moving at once; a preparation that refuses its input is
            left to the call, which refuses it on every rank at once. Later
            chunks are planned by their launches, one chunk per step: planning
            every chunk here would hold the interpreter lock against the serving
            thread for all the layers' planning at once.
        """
        if not self._staging:
            self._allocate_staging(expert_weights)
        old, new = old_phy2log.numpy(), new_maps[0].numpy()
        # Vectorized over every layer: a few numpy calls per placement, so the
        # worker holds the interpreter lock briefly.
        source = local_sources(old, new, self._world_size)
        copied = (new != old) & (source >= 0)
        wire = torch.from_numpy(np.where(copied, old, new))
        wired = tuple(
            bool((wire.numpy()[rows.start : rows.stop] != old[rows.start : rows.stop]).any())
            for rows in map(self.chunk, range(self.num_chunks))
        )
        mine = slice(self._rank * self._local, (self._rank + 1) * self._local)
        # In place, the programs below make the local moves; the copies' lists are not needed.
        local = tuple(
            (tuple(np.flatnonzero(row).tolist()), tuple((src[row] - mine.start).tolist()))
            for row, src in zip(copied[:, mine], source[:, mine], strict=True)
            if not self.in_place
        )
        first = None
        rows = self.chunk(0)
        if ahead and self._staging and wired[0]:
            try:
                first = prepare_rearrangement(
                    old_phy2log[rows.start : rows.stop],
                    wire[rows.start : rows.stop],
                    expert_weights[rows.start : rows.stop],
                    self.group,
                    max_batch_bytes=self.max_batch_bytes,
                    into=self._staging[: len(rows)],
                )
            except (TypeError, ValueError):
                pass
        changed = changed_runs(old, new, self._rank, self._world_size)
        copies: list[ChunkCopies | None] = []
        programs: list[SlotMoves] = []
        for layer in range(self.num_layers if self.in_place else 0):
            programs.append(plan_slot_moves(old[layer], new[layer], self._rank, self._world_size))
            if layer % 4 == 3:
                time.sleep(0)  # lets the serving thread take the interpreter lock
        for chunk in range(0 if self.in_place else self.num_chunks):
            rows = self.chunk(chunk)
            try:
                assert self._layout is not None  # made with the staging buffer
                live = [expert_weights[layer] for layer in rows]
                copies.append(self._layout.lay_out(rows, live, local, changed))
            except Exception:  # left to the launch, which fails the chunk on every rank
                copies.append(None)
            # Lets the serving thread take the interpreter lock between chunks.
            time.sleep(0)
        old_logcnt = logcnt_of(old_phy2log, new_maps[2])
        return StagedMove(
            old_phy2log,
            old_logcnt,
            *new_maps,
            first=first,
            changed=changed,
            wire=wire,
            wired=wired,
            local=local,
            copies=tuple(copies) if copies else (None,) * self.num_chunks,
            programs=tuple(programs),
        )

    def begin(self, move: StagedMove, expert_weights: Sequence[Sequence[torch.Tensor]]) -> None:
        """Launch the first chunk of ``move`` (collective: every rank, the same step)."""
        start = time.perf_counter()
        self._move = move
        self._current = (move.old_phy2log.clone(), move.old_logcnt.clone())
        self._chunk = 0
        self._moved = []
        self.host_seconds = 0.0
        if self._committed is not None:
            # The first chunk's slots as the compute stream leaves them (the
            # engine may have written them); later chunks wait for commits only.
            self._committed.record(torch.cuda.current_stream(self.device))
        self._launch(expert_weights)
        self.host_seconds += time.perf_counter() - start

    def advance(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Commit the chunk in flight and launch the next (collective: every rank, each step).

        Returns True when this committed the last chunk. Raises
        :class:`StagedApplyError` when some rank did not get the chunk (its
        move failed or its vote did not come within ``timeout``); nothing of
        the chunk is then written, and the apply is over.
        """
        start = time.perf_counter()
        if self._move is None:
            raise RuntimeError("advance() needs a staged apply in progress (begin() starts one)")
        self._commit(expert_weights, self._await_vote())
        self._chunk += 1
        done = self._chunk == self.num_chunks
        if done:
            self._move = None
        else:
            self._launch(expert_weights)
        self.host_seconds += time.perf_counter() - start
        return done

    def cancel(self) -> None:
        """Drop the apply in progress: the layers not yet committed keep the old placement."""
        self._move = None
        if self._voting:
            # The dropped vote may still write its buffers (gloo on its own
            # thread, NCCL once its stream gets there): the next vote gets new ones.
            self._make_vote_buffers()
        self._vote, self._voting = None, False
        self._failure = None
        self._copies = None

    def placement(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Host phy2log [L, R] and logcnt [L, E] of what the weights hold now, during or
        after the last apply (committed layers new, the others old)."""
        assert self._current is not None, "no staged apply yet"
        return self._current

    def stats(self) -> RearrangeStats:
        """The moves of the current or last apply, summed over its chunks."""
        sums = {}
        for f in fields(RearrangeStats):
            if f.name != "phase_ms":
                sums[f.name] = sum(getattr(m, f.name) for m in self._moved)
        return RearrangeStats(**sums)

    # ------------------------------------------------------------------ steps

    def _allocate_staging(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> None:
        """K layers shaped as the first layer's tensors; none if the weights do not fit."""
        try:
            if len(expert_weights) != self.num_layers:
                return
            first = [(t.shape, t.dtype, t.device) for t in expert_weights[0]]
        except (TypeError, AttributeError):
            return
        self._staging = [
            [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in first]
            for _ in range(min(self.layers_per_step, self.num_layers))
        ]
        self._layout = CopyLayout(self._staging)

    def _chunk_copies(
        self, move: StagedMove, live: Sequence[Sequence[torch.Tensor]]
    ) -> ChunkCopies:
        """The chunk's copies: laid out ahead if ``live`` are the tensors they were made
        of, else now (ValueError where they do not fit the staging buffer)."""
        ahead = move.copies[self._chunk]
        if ahead is not None and ahead.fits(live):
            return ahead
        if self._layout is None:
            raise ValueError("expert_weights must be one list of tensors per layer")
        return self._layout.lay_out(self.chunk(self._chunk), live, move.local, move.changed)

    def _make_vote_buffers(self) -> None:
        """The vote's [world] int32 flags on the device, their host copy (pinned on
        CUDA; the flags themselves on the CPU) and the [2, world] rows a rank copies
        in (0: it holds the chunk; 1: it does not, its own flag set)."""
        world = self._world_size
        votes = torch.zeros(2, world, dtype=torch.int32)
        votes[1, self._rank] = 1
        self._votes = votes.to(self.device)
        self._flags = torch.zeros(world, dtype=torch.int32, device=self.device)
        self._host_flags = (
            torch.zeros(world, dtype=torch.int32, pin_memory=True) if self._cuda else self._flags
        )

    def _launch(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> None:
        """Side stream: the move from the chunk's live slots into staging, the vote."""
        assert self._move is not None
        move, rows = self._move, self.chunk(self._chunk)
        staging = self._staging[: len(rows)]
        self._failure = self._refused()
        # The staging buffer is written only after the last commit's copies out
        # of it (the side stream waits for them); the move reads the live slots
        # and writes staging, so it needs no copy of them first and no order
        # among its local copies.
        with _on_stream(self._side, self._committed), torch.no_grad():
            try:
                if self._failure is not None:
                    raise self._failure
                if len(staging) != len(rows):
                    raise ValueError("expert_weights must have one entry per layer")
                live = [expert_weights[layer] for layer in rows]
                begun = time.perf_counter()
                if self.in_place:
                    # The local moves wait for the commit; the programs go to the
                    # device here, on the side stream, which the commit waits for.
                    moves = check_in_place(move, rows, live, staging)
                    for layer in rows if self._cuda else ():  # the CPU runs the host arrays
                        move.programs[layer].on(self.device)
                else:
                    self._copies = self._chunk_copies(move, live)
                    # This rank's local copies, laid out ahead: one call per dtype.
                    issue(self._copies.launch)
                    moves = self._copies.count
                self._moved.append(_local_stats(moves, time.perf_counter() - begun))
            except Exception as exc:
                # The move below then refuses no weights on every rank (its
                # agreement), instead of the others waiting for this rank.
                self._failure, staging, live = exc, [], []
            if move.wired[self._chunk]:  # the same on every rank: all call, or none
                try:
                    self._moved.append(
                        rearrange_expert_weights(
                            move.old_phy2log[rows.start : rows.stop],
                            move.wire[rows.start : rows.stop],
                            live,
                            self.group,
                            max_batch_bytes=self.max_batch_bytes,
                            buffers=self.buffers,
                            # Chunk 0 was planned ahead; the others are planned here.
                            prepared=move.first if self._chunk == 0 and staging else None,
                            timeout=self.timeout,
                            into=staging,
                            # CUDA: the vote, queued after the move, is the
                            # host's one wait for its messages (with a
                            # deadline that faults the group).
                            host_wait=not self._cuda,
                        )
                    )
                except Exception as exc:  # reported by every rank at the commit, after the vote
                    self._failure = self._failure or exc
            self._flags.copy_(self._votes[int(self._failure is not None)])
            # A move that failed once it began fails on every rank (its guard's
            # one outcome) and faults the group: no vote on it, which a frozen
            # rank would only hold up for another timeout.
            faulted = move_failed_once_begun(self._failure)
            self._vote = None
            if self._world_size > 1 and not faulted:
                # NCCL: queued on the side stream (the host returns at once); its
                # event tells the host. gloo: polled through its work handle.
                work = dist.all_reduce(
                    self._flags, op=dist.ReduceOp.MAX, group=self.group, async_op=not self._cuda
                )
                self._vote = None if self._cuda else work
            if self._voted is not None:
                self._host_flags.copy_(self._flags, non_blocking=True)
                self._voted.record(self._side)
            self._voting = True

    def _refused(self) -> GroupFault | None:
        """A GroupFault if an earlier failure faulted the group: no collective is issued on it."""
        reason = fault_of(self.group) if self._world_size > 1 else None
        if reason is None:
            return None
        return GroupFault(
            f"staged apply: the process group faulted earlier ({reason}); recreate it",
            rank=self._rank,
            failed_ranks=(),
            timed_out=False,
        )

    def _await_vote(self) -> list[int]:
        """Ranks that do not hold the chunk, once every rank voted (bounded wait).

        Past ``timeout``, or if the vote itself fails (gloo: a peer's connection
        closed), the group is faulted (:meth:`_vote_failed`).
        """
        deadline = time.monotonic() + self.timeout
        layers = _span(self.chunk(self._chunk))
        try:
            while not self._vote_done():
                if time.monotonic() > deadline:
                    self._vote_failed(
                        f"the other ranks' votes on layers {layers} did not come within "
                        f"{self.timeout:g} s"
                    )
                time.sleep(_POLL_SECONDS)
            if self._vote is not None:
                self._vote.wait()
        except StagedApplyError:
            raise
        except Exception as exc:
            self._failure = self._failure or exc
            self._vote_failed(f"the vote on layers {layers} failed ({type(exc).__name__}: {exc})")
        self._voting = False
        return [rank for rank, flag in enumerate(self._host_flags.tolist()) if flag]

    def _vote_failed(self, reason: str) -> None:
        """Fault the group, then StagedApplyError: the move's messages and the vote may
        be stuck on a dead peer (on CUDA the vote is the host's only wait for them), so
        the group is posted on its failure board, marked faulted and its NCCL
        communicator aborted (:meth:`GroupGuard.fault`)."""
        peers = [rank for rank in range(self._world_size) if rank != self._rank]
        GroupGuard(self.group, timeout=self.timeout).fault(f"staged apply: {reason}", peers)
        self._fail(f"{reason}; the process group is faulted (NCCL: aborted), recreate it", True)

    def _vote_done(self) -> bool:
        if self._voted is not None:
            return bool(self._voted.query())
        return self._vote is None or self._vote.is_completed()

    def _commit(self, expert_weights: Sequence[Sequence[torch.Tensor]], failed: list[int]) -> None:
        """Compute stream: staging -> slots, then the chunk's rows of the maps."""
        assert self._move is not None and self._current is not None
        if failed:
            self._fail(f"rank(s) {failed} did not get layers {_span(self.chunk(self._chunk))}")
        move, rows = self._move, self.chunk(self._chunk)
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        if stream is not None and self._voted is not None:
            stream.wait_event(self._voted)
        with torch.no_grad():
            # Slots keeping their expert already hold it (with keep_slots, about
            # those of every expert staying on this GPU): only the others are
            # copied, laid out ahead on the weights the launch checked.
            copies, live = self._copies, [expert_weights[layer] for layer in rows]
            if self.in_place:
                # The launch checked these tensors against staging; the
                # wire's receives are in staging, the local moves read the slots.
                for layer, tensors, stage in zip(rows, live, self._staging, strict=False):
                    for tensor, buffer in zip(tensors, stage, strict=True):
                        apply_slot_moves(tensor, buffer, move.programs[layer])
            else:
                if copies is None or not copies.fits(live):
                    assert self._layout is not None  # the launch had one
                    copies = self._layout.lay_out(rows, live, move.local, move.changed)
                issue(copies.commit)
            part = slice(rows.start, rows.stop)
            news = (move.phy2log, move.log2phy, move.logcnt)
            for target, new in zip(self._maps, news, strict=True):
                target[part].copy_(new[part], non_blocking=True)
        if stream is not None and self._committed is not None:
            self._committed.record(stream)
        phy2log, logcnt = self._current
        phy2log[part] = move.phy2log[part]
        logcnt[part] = move.logcnt[part]

    def _fail(self, reason: str, late: bool = False) -> None:
        """StagedApplyError for the chunk in flight. late: a vote did not come in time,
        so a rank whose vote completed may have committed the chunk."""
        rows = self.chunk(self._chunk)
        new, old = list(range(rows.start)), list(range(rows.start, self.num_layers))
        cause = self._failure
        self.cancel()
        where = (
            f"On this rank (a rank whose vote completed may also hold layers {_span(rows)} new)"
            if late
            else "On every rank"
        )
        raise StagedApplyError(
            f"staged rebalance stopped: {reason}; nothing of them was written. {where}, "
            f"layers {_span(new)} hold the new placement and layers {_span(old)} the old one, "
            "each with matching maps (none is mixed)",
            new,
            old,
        ) from cause


def _local_stats(copies: int, seconds: float) -> RearrangeStats:
    """A chunk's local copies, counted as a move's."""
    return RearrangeStats(0, 0, 0, 0, copies, 0, 0, 0, seconds)


def _span(layers: Sequence[int]) -> str:
    """``3..7`` for a non-empty run of layers, ``none`` for none."""
    if not layers:
        return "none"
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"


class _on_stream:
    """Run on ``stream`` after ``event`` (both None on the CPU: host order)."""

    def __init__(self, stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
        self._stream, self._event = stream, event
        self._context: torch.cuda.StreamContext | None = None

    def __enter__(self) -> None:
        if self._stream is not None:
            if self._event is not None:
                self._stream.wait_event(self._event)
            self._context = torch.cuda.stream(self._stream)
            self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
