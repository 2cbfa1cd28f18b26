"""Hypothesis run programmatically: search for an input where an implementation disagrees.

``check_candidate`` is what ``eplb conformance --impl`` runs for any callable;
``check_project`` what plain ``eplb conformance`` runs for the project's
implementations. Each returns None when nothing was found, else a
``Failure`` holding the smallest failing input hypothesis shrank to; its
``report()`` is the text the command prints. Progress goes to a callback:
this module prints nothing and knows nothing of the command line.

Two bars: *exact* (the default) wants SPEC.md's integers; *same balance*
(``same_balance=True``) accepts a placement that differs only where SPEC.md
chose between equals (see ``eplb.conformance.balance``). Either way a
placement that differs is classified: tie order only, or a real difference.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import hypothesis
import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

from eplb._validation import EplbConfig

from .agreement import (
    Difference,
    Implementation,
    Placement,
    first_difference,
    numpy_reference,
    project_implementations,
)
from .balance import (
    REAL_DIFFERENCE,
    TIE_ORDER_ONLY,
    as_integer_placement,
    first_balance_difference,
)
from .cases import (
    DEFAULT_EXAMPLES,
    SHAPE_MENU,
    SPEC_EXAMPLE,
    SPEC_LOGCNT,
    SPEC_PHY2LOG,
    InvalidProblem,
    Problem,
)
from .invariants import check_invariants
from .strategies import invalid_problems, loads, problems

__all__ = [
    "DEFAULT_EXAMPLES",
    "Failure",
    "check_candidate",
    "check_project",
    "menu_problems",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Failure:
    """The smallest input found on which an implementation does not conform.

    phase: which check failed ("valid input", "invalid input", "SPEC.md example").
    implementation: its name.
    problem: the (shrunk) input.
    message: what went wrong, one or more lines.
    difference: the first differing entry, when outputs differ.
    classification: for a placement that differs from SPEC.md's and keeps its
        invariants, ``"tie order only"`` (every layer's per-GPU loads equal
        SPEC.md's as sorted lists) or ``"real difference"``; else None.
    """

    phase: str
    implementation: str
    problem: Problem | InvalidProblem
    message: str
    difference: Difference | None = None
    classification: str | None = None

    def report(self) -> str:
        """The failure as ``eplb conformance`` prints it: check, shrunk input, what differs."""
        problem = self.problem
        lines = [
            f"DOES NOT CONFORM: {self.implementation} ({self.phase})",
            "smallest failing input found (shrunk by hypothesis):",
            f"  configuration: {problem!r}",
        ]
        weight = problem.weight
        if isinstance(weight, np.ndarray) and weight.size <= _PRINT_LIMIT:
            # tolist() prints each float as its shortest exact repr: the input
            # can be pasted back as it is.
            lines.append(f"  weight = {weight.tolist()!r}  # dtype {weight.dtype}")
        else:
            lines.append(f"  weight: {type(weight).__name__} {getattr(weight, 'shape', '')}")
        lines += [f"  {line}" for line in self.message.splitlines()]
        if isinstance(problem, Problem) and self.difference is not None:
            counts = ", ".join(str(c) for c in problem.counts)
            lines.append(
                "reproduce: eplb.reference.rebalance_experts(numpy.array(weight), " + counts + ")"
            )
        return "\n".join(lines)


# Loads up to this many entries are printed in full; larger ones by shape.
_PRINT_LIMIT = 4096


class _Nonconforming(Exception):
    """Raised (from a single place, so hypothesis sees one bug) on a failing input."""


def _search(
    strategy: st.SearchStrategy[_T],
    check: Callable[[_T], Failure | None],
    examples: int,
    seed: int | None,
) -> Failure | None:
    """Run ``check`` on ``examples`` draws; the shrunk failure, or None."""
    found: list[Failure] = []

    def probe(value: _T) -> None:
        failure = check(value)
        if failure is not None:
            # Shrinking ends by replaying the smallest failing input: the
            # last failure recorded is that one.
            found[:] = [failure]
            raise _Nonconforming(failure.message)

    test = settings(
        max_examples=examples,
        derandomize=seed is None,
        database=None,
        deadline=None,
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(probe))
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    with warnings.catch_warnings():
        # The "overflow" loads make float64 sums reach inf, as SPEC.md allows;
        # numpy-based candidates warn about it on every such input.
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        try:
            test()
        except _Nonconforming:
            return found[-1]
    return None


@st.composite
def menu_problems(draw: st.DrawFn, menu: tuple[EplbConfig, ...] = SHAPE_MENU) -> Problem:
    """A valid input whose configuration (shape included) comes from ``menu``."""
    config = draw(st.sampled_from(menu))
    weight, kinds = draw(
        loads(
            config.num_layers,
            config.num_logical_experts,
            config.num_logical_experts // config.num_groups,
        )
    )
    return Problem(weight, *config[2:], kinds=kinds)


def _compare(
    name: str,
    impl: Implementation,
    problem: Problem,
    phase: str = "valid input",
    *,
    same_balance: bool = False,
) -> Failure | None:
    """Compare ``impl`` with the numpy reference on one valid input.

    same_balance: pass a placement that differs from the reference's when it
        keeps SPEC.md's invariants and every layer's per-GPU loads (as sorted
        lists); integer outputs of any width are accepted then.
    """
    expected = numpy_reference(problem.weight.copy(), *problem.counts)
    weight = problem.weight.copy()
    try:
        got = impl(weight, *problem.counts)
    except Exception as exc:  # any exception on valid input is a finding, not a crash
        return Failure(phase, name, problem, f"raised {type(exc).__name__} on valid input: {exc}")
    lines = []
    difference = first_difference(expected, got)
    classification = None
    if difference is None:
        # Equal to the reference's: a reference that broke them shows here.
        phy2log, log2phy, logcnt = cast(Placement, got)
        try:
            check_invariants(phy2log, log2phy, logcnt, *problem.counts)
        except AssertionError as exc:
            lines.append(str(exc))
    else:
        classification, detail = _classify(problem, expected, got)
        if not (same_balance and classification == TIE_ORDER_ONLY):
            lines.append(f"first difference: {difference}")
            if classification is not None:
                lines.append(f"classification: {classification}")
            lines += detail
    if not np.array_equal(weight, problem.weight, equal_nan=True):
        lines.append("it modified its input weight")
    if not lines:
        return None
    return Failure(phase, name, problem, "\n".join(lines), difference, classification)


def _classify(problem: Problem, expected: Placement, got: object) -> tuple[str | None, list[str]]:
    """Tie order only or a real difference, with the lines that show it.

    None (with the reason) when ``got`` is not a sound placement: there is no
    balance to compare then.
    """
    placement = as_integer_placement(got, problem.weight.shape[1])
    if isinstance(placement, str):
        return None, [placement]
    try:
        check_invariants(*placement, *problem.counts)
    except AssertionError as exc:
        return None, [str(exc)]
    balance = first_balance_difference(problem.weight, problem.num_gpus, expected, placement)
    if balance is None and all(
        np.array_equal(want, have) for want, have in zip(expected, placement, strict=True)
    ):
        return TIE_ORDER_ONLY, [
            "SPEC.md's placement itself, in another integer dtype or log2phy width "
            "(passes --same-balance)"
        ]
    if balance is None:
        return TIE_ORDER_ONLY, [
            "every layer's per-GPU loads equal SPEC.md's (sorted): the placement differs only "
            "where SPEC.md chose between equals (passes --same-balance)"
        ]
    return REAL_DIFFERENCE, str(balance).splitlines()


def _refuses(
    name: str, impl: Implementation, bad: InvalidProblem, *, same_type: bool, any_type: bool
) -> Failure | None:
    """Check that ``impl`` refuses ``bad``.

    same_type: the reference's exception type is required; any_type: any
    exception will do (an engine's ``assert``); neither: ValueError or TypeError.
    """
    try:
        impl(bad.weight, *bad.counts)
    except (ValueError, TypeError) as exc:
        if same_type and type(exc) is not bad.error:
            return Failure(
                "invalid input",
                name,
                bad,
                f"raised {type(exc).__name__} ({exc}), the reference raises {bad.error.__name__}",
            )
        return None
    except Exception as exc:
        if any_type:
            return None
        return Failure(
            "invalid input",
            name,
            bad,
            f"raised {type(exc).__name__} ({exc}), expected ValueError or TypeError",
        )
    return Failure("invalid input", name, bad, f"accepted an input that breaks '{bad.rule}'")


def _invalid_examples(examples: int) -> int:
    # The rules are few: a third of the budget visits each of them many times.
    return max(20, examples // 3)


def _check_all(
    impls: dict[str, Implementation],
    *,
    examples: int,
    seed: int | None,
    same_type: bool,
    same_balance: bool = False,
    progress: Callable[[str], None],
) -> Failure | None:
    """Valid inputs, invalid inputs, then SPEC.md's example, for each implementation.

    same_balance: the bar of ``check_candidate(same_balance=True)``.
    The JAX reference (a name starting with "jax") is drawn on ``SHAPE_MENU``
    shapes only, a quarter as many times: each new shape compiles.
    """
    for name, impl in impls.items():
        jax = name.startswith("jax")
        count = max(10, examples // 4) if jax else examples
        strategy = menu_problems() if jax else problems()
        compare = functools.partial(_compare, name, impl, same_balance=same_balance)
        failure = _search(strategy, compare, count, seed)
        if failure is not None:
            return failure
        gives = "the reference's balance" if same_balance else "the reference's placement"
        progress(f"ok    valid input: {name} gives {gives} on {count} drawn inputs")
    invalid = _invalid_examples(examples)
    refused_as = "the reference's exception type" if same_type else "ValueError/TypeError"
    if same_balance:
        refused_as = "an exception"
    for name, impl in impls.items():
        failure = _search(
            invalid_problems(),
            functools.partial(_refuses, name, impl, same_type=same_type, any_type=same_balance),
            invalid,
            seed,
        )
        if failure is not None:
            return failure
        progress(f"ok    invalid input: {name} refuses {invalid} drawn inputs with {refused_as}")
    # The figures are facts: a reference that lost them fails every candidate.
    phy2log, _, logcnt = numpy_reference(SPEC_EXAMPLE.weight, *SPEC_EXAMPLE.counts)
    for output, got, want in (("phy2log", phy2log, SPEC_PHY2LOG), ("logcnt", logcnt, SPEC_LOGCNT)):
        if not np.array_equal(got, want):
            message = f"the numpy reference's {output} is not SPEC.md's: {got.tolist()}"
            return Failure("SPEC.md example", "numpy reference", SPEC_EXAMPLE, message)
    for name, impl in impls.items():
        failure = _compare(name, impl, SPEC_EXAMPLE, "SPEC.md example", same_balance=same_balance)
        if failure is not None:
            return failure
    progress(
        f"ok    SPEC.md worked example: SPEC.md's {'balance' if same_balance else 'placement'}"
    )
    return None


def check_candidate(
    candidate: Implementation,
    *,
    name: str = "candidate",
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = None,
    same_balance: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> Failure | None:
    """Check any implementation against the numpy reference (``eplb conformance --impl``).

    candidate: called as ``candidate(weight, R, G, N, P)`` with a float64
        numpy ``weight`` [L, E]; its outputs may be anything numpy.asarray converts.
    examples: inputs drawn for the valid-input check (a third as many invalid ones).
    seed: hypothesis seed; None runs derandomized (the same inputs every time).
    same_balance: the bar for engines whose copy breaks ties its own way
        (``eplb conformance --same-balance``): a placement may differ from
        the reference's if it keeps SPEC.md's invariants and, in every layer,
        its per-GPU loads (each summed with ``math.fsum``) equal the
        reference's as sorted lists; outputs of any integer dtype (int32
        included) and ``log2phy`` padded wider with ``-1`` are accepted, and
        any exception (``AssertionError`` included) refuses an invalid input.
    progress: called with one line per finished check ("ok    ...", "skip  ...").

    Checks, in order: equal outputs (or balance) and SPEC.md's invariants on
    ``examples`` drawn valid inputs; a ValueError or TypeError (any exception
    with ``same_balance``) on drawn invalid inputs; SPEC.md's worked example
    (last, so that a failure found by the search is reported shrunk, not as
    the worked example). A placement that differs is classified in the
    failure: tie order only, or a real difference with the GPU loads side by side.
    """
    return _check_all(
        {name: candidate},
        examples=examples,
        seed=seed,
        same_type=False,
        same_balance=same_balance,
        progress=progress,
    )


def check_project(
    *,
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = None,
    cuda: bool | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> Failure | None:
    """Check the project's implementations against the numpy reference (``eplb conformance``).

    torch production (CPU, and CUDA when available or ``cuda`` is True) on
    ``examples`` drawn inputs of every shape; the JAX reference on a quarter
    as many, drawn on the shapes of ``SHAPE_MENU``; all of them on drawn invalid
    inputs, which each must refuse with the reference's exception type, and
    on SPEC.md's worked example.
    """
    impls = project_implementations(jax=None, cuda=cuda)
    if "jax reference" not in impls:
        progress("skip  jax reference: JAX is not installed")
    return _check_all(
        impls,
        examples=examples,
        seed=seed,
        same_type=True,
        progress=progress,
    )
