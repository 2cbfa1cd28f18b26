"""Conformance suite: proves implementations of SPEC.md return identical placements.

What CI runs on every change, and what an engine author points at their own
copy of the algorithm (``eplb conformance --impl my_module:my_function``).

- ``cases``: the problem types, load kinds, SPEC.md's worked example and a
  menu of configurations (numpy only).
- ``strategies``: hypothesis strategies for valid inputs (``problems``,
  ``configs``, ``loads``) and invalid ones (``invalid_problems``), and the
  ``ci`` / ``thorough`` settings profiles.
- ``invariants``: ``check_invariants``, SPEC.md's invariants of any placement.
- ``agreement``: adapters for the four implementations, ``first_difference``,
  ``check_agreement``, ``check_refusal``.
- ``balance``: same balance, for placements that differ from SPEC.md's only
  where SPEC.md chose between equals (``exact_gpu_loads``,
  ``first_balance_difference``).
- ``runner``: the hypothesis search (``check_candidate``, ``check_project``)
  that the ``eplb conformance`` command (``eplb._cli_conformance``) runs; the
  library never imports the command.
- ``workloads``: the benchmark configurations with real loads.
- ``migration``: the same for SPEC.md's second policy, migration-aware
  rebalancing (``migration_problems``, ``check_migration_agreement``,
  ``check_migration_result``).
- ``device_check``: a hypothesis-free agreement run on a given torch device
  (``python -m eplb.conformance.device_check --device cuda``).

Names are imported on first use, so ``import eplb.conformance`` (done by the
``eplb`` command) needs neither hypothesis nor JAX nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .agreement import (
        Difference,
        check_agreement,
        check_refusal,
        compiled_production,
        first_difference,
        jax_reference,
        numpy_reference,
        project_implementations,
        torch_production,
    )
    from .balance import BalanceDifference, exact_gpu_loads, first_balance_difference
    from .cases import (
        DEFAULT_EXAMPLES,
        LOAD_KINDS,
        SHAPE_MENU,
        SPEC_EXAMPLE,
        InvalidProblem,
        Problem,
        make_load,
    )
    from .invariants import check_invariants
    from .migration import (
        MigrationProblem,
        check_migration_agreement,
        check_migration_result,
        migration_problems,
    )
    from .runner import Failure, check_candidate, check_project
    from .strategies import (
        INVALID_RULES,
        configs,
        invalid_problems,
        loads,
        problems,
        register_profiles,
    )
    from .workloads import BENCHMARK_MODELS, BENCHMARK_SHAPES, Workload, benchmark_workloads

# public name -> submodule that defines it
_EXPORTS = {
    "BENCHMARK_MODELS": "workloads",
    "BENCHMARK_SHAPES": "workloads",
    "BalanceDifference": "balance",
    "DEFAULT_EXAMPLES": "cases",
    "Difference": "agreement",
    "Failure": "runner",
    "INVALID_RULES": "strategies",
    "InvalidProblem": "cases",
    "LOAD_KINDS": "cases",
    "MigrationProblem": "migration",
    "Problem": "cases",
    "SHAPE_MENU": "cases",
    "SPEC_EXAMPLE": "cases",
    "make_load": "cases",
    "Workload": "workloads",
    "benchmark_workloads": "workloads",
    "check_agreement": "agreement",
    "check_candidate": "runner",
    "check_invariants": "invariants",
    "check_migration_agreement": "migration",
    "check_migration_result": "migration",
    "check_project": "runner",
    "check_refusal": "agreement",
    "compiled_production": "agreement",
    "configs": "strategies",
    "exact_gpu_loads": "balance",
    "first_balance_difference": "balance",
    "first_difference": "agreement",
    "invalid_problems": "strategies",
    "jax_reference": "agreement",
    "loads": "strategies",
    "migration_problems": "migration",
    "numpy_reference": "agreement",
    "problems": "strategies",
    "project_implementations": "agreement",
    "register_profiles": "strategies",
    "torch_production": "agreement",
}

__all__ = [
    "BENCHMARK_MODELS",
    "BENCHMARK_SHAPES",
    "DEFAULT_EXAMPLES",
    "INVALID_RULES",
    "LOAD_KINDS",
    "SHAPE_MENU",
    "SPEC_EXAMPLE",
    "BalanceDifference",
    "Difference",
    "Failure",
    "InvalidProblem",
    "MigrationProblem",
    "Problem",
    "Workload",
    "benchmark_workloads",
    "check_agreement",
    "check_candidate",
    "check_invariants",
    "check_migration_agreement",
    "check_migration_result",
    "check_project",
    "check_refusal",
    "compiled_production",
    "configs",
    "exact_gpu_loads",
    "first_balance_difference",
    "first_difference",
    "invalid_problems",
    "jax_reference",
    "loads",
    "make_load",
    "migration_problems",
    "numpy_reference",
    "problems",
    "project_implementations",
    "register_profiles",
    "torch_production",
]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
