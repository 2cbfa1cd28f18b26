"""What a failed collective call tells its caller: who failed, and what it left in each layer.

- :class:`AgreementError` (a ValueError): the ranks' arguments differ or a rank
  refused its own; raised on every rank before anything is touched.
- :class:`GroupFault`: another rank failed, or a wait of this rank expired
  (a rank froze or died); see ``eplb.production.group_guard``.
- :class:`RearrangeError`: a weight move stopped on this rank; it says which
  layers hold new weights, which old, which may be mixed
  (:func:`classify_layers` works that out from the steps' progress).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = [
    "AgreementError",
    "GroupFault",
    "RearrangeError",
    "classify_layers",
    "move_failed_once_begun",
]


class RearrangeError(RuntimeError):
    """A weight move failed on this rank; says what it left in each layer.

    rank: this process's rank in the group.
    cause: the exception that stopped this rank (its own, or a
        :class:`GroupFault` reporting another rank).
    layers_new: layers whose slots on this rank all hold the new placement.
    layers_old: layers this rank has not written (the old placement).
    layers_mixed: layers this rank may have partly written.

    Recovery: reload ``layers_changed`` from the checkpoint (or the whole model),
    then tell the balancer which placement the weights hold.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        cause: BaseException,
        layers_new: tuple[int, ...] = (),
        layers_old: tuple[int, ...] = (),
        layers_mixed: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.cause = cause
        self.layers_new = tuple(layers_new)
        self.layers_old = tuple(layers_old)
        self.layers_mixed = tuple(layers_mixed)

    @property
    def layers_changed(self) -> tuple[int, ...]:
        """Layers that no longer hold the old placement on this rank (new or mixed)."""
        return tuple(sorted(self.layers_new + self.layers_mixed))

    @classmethod
    def from_layers(
        cls,
        what: str,
        *,
        rank: int,
        cause: BaseException,
        layers_new: tuple[int, ...],
        layers_old: tuple[int, ...],
        layers_mixed: tuple[int, ...],
    ) -> RearrangeError:
        """The error of ``what`` (e.g. the call's name), with a message naming the layers."""
        message = (
            f"{what} failed on rank {rank}: {type(cause).__name__}: {cause}. On this rank, "
            f"layers {list(layers_new)} hold new weights, layers {list(layers_mixed)} may be "
            f"mixed, layers {list(layers_old)} are unchanged: reload the changed layers, then "
            "install the placement they hold"
        )
        return cls(
            message,
            rank=rank,
            cause=cause,
            layers_new=layers_new,
            layers_old=layers_old,
            layers_mixed=layers_mixed,
        )


def classify_layers(
    num_layers: int, step_layers: Sequence[Collection[int]], issued: int, completed: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Which layers a move that stopped left (new, old, mixed) on this rank.

    step_layers: per step, the layers whose slots that step writes on this rank.
    issued: steps whose writes were started (on the device: queued).
    completed: steps whose writes are known finished (<= issued; on the
        device, the steps whose write events have completed, in order).

    New: every write of the layer completed. Old: none started (including
    layers this rank never writes: they hold the old placement's weights,
    which is what recovery needs). Mixed: the rest.
    """
    if not 0 <= completed <= issued <= len(step_layers):
        raise ValueError(
            f"need 0 <= completed <= issued <= steps, got completed={completed}, "
            f"issued={issued}, steps={len(step_layers)}"
        )
    started: set[int] = set().union(*step_layers[:issued])
    pending: set[int] = set().union(*step_layers[completed:])
    layers = range(num_layers)
    new = tuple(layer for layer in layers if layer in started and layer not in pending)
    old = tuple(layer for layer in layers if layer not in started)
    mixed = tuple(layer for layer in layers if layer in started and layer in pending)
    return new, old, mixed


class GroupFault(RuntimeError):
    """Another rank failed or did not answer in time; or this group faulted before.

    rank: this process's rank in the group.
    failed_ranks: the ranks that posted a failure or did not answer.
    timed_out: True when a deadline expired (a rank froze or died silently).
    """

    def __init__(
        self, message: str, *, rank: int, failed_ranks: tuple[int, ...], timed_out: bool
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.failed_ranks = tuple(failed_ranks)
        self.timed_out = timed_out


class AgreementError(ValueError):
    """The ranks' arguments differ, or a rank refused its own: nothing was touched.

    argument: the argument that differs, None when a rank refused.
    ranks: the refusing ranks, or those that disagree with the lowest rank.
    """

    def __init__(self, message: str, *, argument: str | None, ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.argument = argument
        self.ranks = tuple(ranks)


def move_failed_once_begun(error: BaseException | None) -> bool:
    """Whether ``error`` ends a move after its agreement: weights may no longer match the
    maps, and the group faulted (a RearrangeError, or a GroupFault)."""
    return isinstance(error, (RearrangeError, GroupFault))
