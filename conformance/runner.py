"""Hypothesis run programmatically: search for an input where an implementation disagrees.

``check_candidate`` is what ``eplb conformance --impl`` runs for any callable;
``check_project`` what plain ``eplb conformance`` runs for the project's
three implementations. Each returns None when nothing was found, else a
``Failure`` holding the smallest failing input hypothesis shrank to.
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
from .cases import SHAPE_MENU, SPEC_EXAMPLE, SPEC_LOGCNT, SPEC_PHY2LOG, InvalidProblem, Problem
from .cli import DEFAULT_EXAMPLES
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
    """

    phase: str
    implementation: str
    problem: Problem | InvalidProblem
    message: str
    difference: Difference | None = None


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
    name: str, impl: Implementation, problem: Problem, phase: str = "valid input"
) -> Failure | None:
    """Compare ``impl`` with the numpy reference on one valid input."""
    expected = numpy_reference(problem.weight.copy(), *problem.counts)
    weight = problem.weight.copy()
    try:
        got = impl(weight, *problem.counts)
    except Exception as exc:  # any exception on valid input is a finding, not a crash
        return Failure(phase, name, problem, f"raised {type(exc).__name__} on valid input: {exc}")
    lines = []
    difference = first_difference(expected, got)
    if difference is not None:
        lines.append(f"first difference: {difference}")
    if difference is None or difference.index is not None:
        # Three arrays of the reference's shapes and dtype: the invariants apply.
        phy2log, log2phy, logcnt = cast(Placement, got)
        try:
            check_invariants(phy2log, log2phy, logcnt, *problem.counts)
        except AssertionError as exc:
            lines.append(str(exc))
    if not np.array_equal(weight, problem.weight, equal_nan=True):
        lines.append("it modified its input weight")
    if not lines:
        return None
    return Failure(phase, name, problem, "\n".join(lines), difference)


def _refuses(
    name: str, impl: Implementation, bad: InvalidProblem, *, same_type: bool
) -> Failure | None:
    """Check that ``impl`` refuses ``bad``: ValueError/TypeError, the expected one if same_type."""
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
    progress: Callable[[str], None],
) -> Failure | None:
    """Valid inputs, invalid inputs, then SPEC.md's example, for each implementation.

    The JAX reference (a name starting with "jax") is drawn on ``SHAPE_MENU``
    shapes only, a quarter as many times: each new shape compiles.
    """
    for name, impl in impls.items():
        jax = name.startswith("jax")
        count = max(10, examples // 4) if jax else examples
        strategy = menu_problems() if jax else problems()
        failure = _search(strategy, functools.partial(_compare, name, impl), count, seed)
        if failure is not None:
            return failure
        progress(
            f"ok    valid input: {name} gives the reference's placement on {count} drawn inputs"
        )
    invalid = _invalid_examples(examples)
    refused_as = "the reference's exception type" if same_type else "ValueError/TypeError"
    for name, impl in impls.items():
        failure = _search(
            invalid_problems(),
            functools.partial(_refuses, name, impl, same_type=same_type),
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
        failure = _compare(name, impl, SPEC_EXAMPLE, "SPEC.md example")
        if failure is not None:
            return failure
    progress("ok    SPEC.md worked example: SPEC.md's placement")
    return None


def check_candidate(
    candidate: Implementation,
    *,
    name: str = "candidate",
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> Failure | None:
    """Check any implementation against the numpy reference (``eplb conformance --impl``).

    candidate: called as ``candidate(weight, R, G, N, P)`` with a float64
        numpy ``weight`` [L, E]; its outputs may be anything numpy.asarray converts.
    examples: inputs drawn for the valid-input check (a third as many invalid ones).
    seed: hypothesis seed; None runs derandomized (the same inputs every time).
    progress: called with one line per finished check ("ok    ...", "skip  ...").

    Checks, in order: equal outputs and SPEC.md's invariants on ``examples``
    drawn valid inputs; a ValueError or TypeError on drawn invalid inputs;
    SPEC.md's worked example (last, so that a failure found by the search is
    reported shrunk, not as the worked example).
    """
    return _check_all(
        {name: candidate}, examples=examples, seed=seed, same_type=False, progress=progress
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
