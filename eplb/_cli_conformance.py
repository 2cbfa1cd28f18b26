"""``eplb conformance``: check an implementation of SPEC.md against the reference.

    eplb conformance                       # the project's implementations
    eplb conformance --impl my_mod:my_fn   # any callable with the reference's signature
    eplb conformance --impl my_mod:my_fn --same-balance   # ties broken its own way
    eplb conformance --examples 2000 --seed 7

Exit status 0 when it conforms, 1 when not (printing the smallest failing
input hypothesis found, its configuration, the first differing slot and
whether the difference is in tie order only), 2 on a bad argument.

The command line sits on top of ``eplb.conformance``, which never imports
it. Only argparse and the light ``eplb.conformance.cases`` are imported at
module level: hypothesis, JAX and torch are imported when the command runs.
"""

from __future__ import annotations

import argparse

from eplb.conformance.cases import DEFAULT_EXAMPLES

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> None:
    """Register the ``conformance`` subcommand; sets ``args.run``."""
    parser = subparsers.add_parser(
        name,
        help="check an implementation of SPEC.md against the reference",
        description=(
            "Search, with hypothesis, for an input on which an implementation differs from "
            "the numpy reference (placement, SPEC.md invariants, refusal of invalid input). "
            "Without --impl: the project's own implementations."
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
        "--same-balance",
        action="store_true",
        help="with --impl: pass a placement that differs from SPEC.md's only where SPEC.md "
        "chose between equals (every layer's per-GPU loads equal SPEC.md's as sorted lists, "
        "invariants kept); accept any integer dtype and any exception on invalid input",
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
    parser.set_defaults(run=_run)


def _progress(line: str) -> None:
    print(f"  {line}", flush=True)


def _run(args: argparse.Namespace) -> int:
    """Run the checks; 0 when everything conforms, 1 when not."""
    if args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    if args.same_balance and args.impl is None:
        raise ValueError("--same-balance needs --impl: the project's implementations are exact")
    from eplb.conformance.agreement import load_callable
    from eplb.conformance.runner import check_candidate, check_project

    mode = "derandomized" if args.seed is None else f"seed {args.seed}"
    if args.impl is None:
        print(f"eplb conformance: the project's implementations ({mode})", flush=True)
        failure = check_project(examples=args.examples, seed=args.seed, progress=_progress)
        target = "the project's implementations"
    else:
        candidate = load_callable(args.impl)
        bar = "same balance as" if args.same_balance else "against"
        print(f"eplb conformance: {args.impl} {bar} eplb.reference ({mode})", flush=True)
        failure = check_candidate(
            candidate,
            name=args.impl,
            examples=args.examples,
            seed=args.seed,
            same_balance=args.same_balance,
            progress=_progress,
        )
        target = args.impl
    if failure is None:
        verdict = "CONFORMS (same balance)" if args.same_balance else "CONFORMS"
        print(f"{verdict}: {target}")
        return 0
    print(failure.report())
    return 1
