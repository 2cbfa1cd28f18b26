"""``eplb conformance``: check an implementation of SPEC.md against the reference.

    eplb conformance                       # the project's numpy, JAX and torch implementations
    eplb conformance --impl my_mod:my_fn   # any callable with the reference's signature
    eplb conformance --examples 2000 --seed 7

Exit status 0 when it conforms, 1 when not (printing the smallest failing
input hypothesis found, its configuration and the first differing slot), 2
on a bad argument. Only argparse is imported at module level: hypothesis,
JAX and torch are imported when the command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .runner import Failure

__all__ = ["DEFAULT_EXAMPLES", "add_parser", "run"]

#: Valid inputs drawn when ``--examples`` is not given: enough to catch each
#: single deviation of tests/conformance_variants.py, derandomized.
DEFAULT_EXAMPLES = 300
# Loads up to this many entries are printed in full; larger ones by shape.
_PRINT_LIMIT = 4096


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> None:
    """Register the ``conformance`` subcommand; sets ``args.run``."""
    parser = subparsers.add_parser(
        name,
        help="check an implementation of SPEC.md against the reference",
        description=(
            "Search, with hypothesis, for an input on which an implementation differs from "
            "the numpy reference (placement, SPEC.md invariants, refusal of invalid input). "
            "Without --impl: the project's JAX reference and torch production path."
        ),
    )
    parser.add_argument(
        "--impl",
        metavar="MODULE:FUNCTION",
        help="callable with the reference's signature: fn(weight [L, E] float64 numpy, "
        "num_replicas, num_groups, num_nodes, num_gpus) -> (phy2log, log2phy, logcnt); "
        "the current directory is importable",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=DEFAULT_EXAMPLES,
        metavar="N",
        help=f"valid inputs to draw (default {DEFAULT_EXAMPLES}; a third as many invalid ones)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="hypothesis seed (default: derandomized, the same inputs on every run)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the checks; 0 when everything conforms, 1 when not."""
    if args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    from .runner import check_candidate, check_project

    def progress(line: str) -> None:
        print(f"  {line}", flush=True)

    mode = "derandomized" if args.seed is None else f"seed {args.seed}"
    if args.impl is None:
        print(f"eplb conformance: the project's implementations ({mode})", flush=True)
        failure = check_project(examples=args.examples, seed=args.seed, progress=progress)
        target = "the project's implementations"
    else:
        from .agreement import load_callable

        candidate = load_callable(args.impl)
        print(f"eplb conformance: {args.impl} against eplb.reference ({mode})", flush=True)
        failure = check_candidate(
            candidate, name=args.impl, examples=args.examples, seed=args.seed, progress=progress
        )
        target = args.impl
    if failure is None:
        print(f"CONFORMS: {target}")
        return 0
    print(_describe(failure))
    return 1


def _describe(failure: Failure) -> str:
    """The failure report: implementation, check, shrunk input, and what differs."""
    from .strategies import Problem

    problem = failure.problem
    lines = [
        f"DOES NOT CONFORM: {failure.implementation} ({failure.phase})",
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
    lines += [f"  {line}" for line in failure.message.splitlines()]
    if isinstance(problem, Problem) and failure.difference is not None:
        counts = ", ".join(str(c) for c in problem.counts)
        lines.append(
            "reproduce: eplb.reference.rebalance_experts(numpy.array(weight), " + counts + ")"
        )
    return "\n".join(lines)
