"""The ``eplb`` command: one entry point, one module per subcommand.

Each subcommand module provides ``add_parser(subparsers)`` and
``run(args) -> int``; they are imported only when chosen, so that
``eplb --help`` stays fast and needs neither torch nor JAX.

Errors in arguments or files print one line and exit non-zero, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# subcommand -> module providing add_parser(subparsers) and run(args)
_SUBCOMMANDS = {
    "rebalance": "eplb._cli_rebalance",
    "demo": "eplb._cli_rebalance",
    "conformance": "eplb._cli_conformance",
    "simulate": "eplb._cli_simulate",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eplb", description="Expert-parallel load balancing for MoE serving."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in _SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(subparsers, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eplb`` command; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
