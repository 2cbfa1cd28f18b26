"""How far a weight move got on this rank: which layers it left new, old or mixed.

The executor (:func:`eplb.production.rearrange_executor.run_steps`) tells a
:class:`MoveProgress` when it issues each step's writes (local copies,
unpacks, post copies), with the event that marks their end on the device (None
on the CPU, where a write is done when its call returns). When a move stops,
:meth:`MoveProgress.layers` works out, from those records alone, which layers
hold the new placement on this rank, which the old and which may be mixed
(:func:`eplb.production.errors.classify_layers`): the report of a
:class:`eplb.production.errors.RearrangeError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import classify_layers
from .rearrange_schedule import Step, layers_written

__all__ = ["MoveProgress"]


class MoveProgress:
    """The writes of one move on this rank, step by step, as the executor issues them.

    steps: this rank's program; its writes may be scheduled later (the executor
        schedules them while the first steps move), but before the first
        :meth:`issuing`.
    num_layers: layers of the move.
    """

    def __init__(self, steps: Sequence[Step], num_layers: int) -> None:
        self._steps = steps
        self.num_layers = num_layers
        #: Steps whose writes were started (the host called into them).
        self.issued = 0
        #: Steps whose writes returned on the host (on the device: were queued).
        self._queued = 0
        self._done: list[torch.cuda.Event | None] = []
        #: Steps whose writes are known finished (a prefix: writes run in step order).
        self.completed = 0

    def issuing(self, step: int) -> None:
        """Step ``step``'s writes are about to be issued (steps go in order)."""
        if step != self.issued:
            raise AssertionError(f"writes issued out of order: step {step} after {self.issued}")
        self.issued += 1

    def issued_all(self, step: int, done: torch.cuda.Event | None) -> None:
        """Step ``step``'s writes are issued; ``done`` completes when they have run (None: now)."""
        self._done.append(done)
        self._queued = step + 1
        self.settle()

    def settle(self) -> None:
        """Advance :attr:`completed` over the steps whose writes are known done (never blocks).

        A device in error (an aborted communicator) may raise from ``query()``:
        such a step counts as not done, so its layers are reported mixed, never new.
        """
        while self.completed < self._queued:
            event = self._done[self.completed]
            try:
                finished = event is None or bool(event.query())
            except RuntimeError:
                finished = False
            if not finished:
                return
            self.completed += 1

    def layers(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(new, old, mixed) layers on this rank, from what was issued and completed so far."""
        self.settle()
        if self.issued == 0:  # writes maybe never scheduled: nothing was written
            return (), tuple(range(self.num_layers)), ()
        step_layers = [layers_written(step) for step in self._steps]
        return classify_layers(self.num_layers, step_layers, self.issued, self.completed)
