"""``eplb conformance``: it passes the reference and catches each one-deviation variant.

The variants live in tests/conformance_variants.py; each run here is the CLI's
default budget, derandomized, as a user would run it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import eplb.cli
from eplb.conformance import DEFAULT_EXAMPLES
from eplb.conformance.runner import check_candidate

ROOT = Path(__file__).resolve().parents[1]
VARIANTS_MODULE = "tests.conformance_variants"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # --impl imports from the current directory, as a user's would.
    monkeypatch.chdir(ROOT)


def _variant_names() -> tuple[str, ...]:
    import importlib
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(VARIANTS_MODULE).VARIANTS  # type: ignore[no-any-return]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = eplb.cli.main(["conformance", *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize("variant", _variant_names())
def test_cli_catches_variant(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _run(capsys, "--impl", f"{VARIANTS_MODULE}:{variant}")
    assert status == 1, out
    assert f"DOES NOT CONFORM: {VARIANTS_MODULE}:{variant} (valid input)" in out
    assert "smallest failing input found (shrunk by hypothesis)" in out
    assert re.search(r"configuration: Problem\(L=\d+, E=\d+, R=\d+, G=\d+, N=\d+, P=\d+", out)
    assert re.search(r"weight = \[\[", out)
    difference = re.search(
        r"first difference: (phy2log|log2phy|logcnt)\[layer \d+, (slot|expert) \d+.*\]: "
        r"expected -?\d+, got -?\d+",
        out,
    )
    assert difference, out


@pytest.mark.parametrize(
    "target", ["eplb.reference:rebalance_experts", f"{VARIANTS_MODULE}:faithful"]
)
def test_cli_passes_conforming_implementation(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # faithful is the variants' shared code with no deviation switched on: each
    # variant's failure above comes from its deviation alone.
    status, out = _run(capsys, "--impl", target)
    assert status == 0, out
    assert f"CONFORMS: {target}" in out
    assert f"placement on {DEFAULT_EXAMPLES} drawn inputs" in out


def test_cli_checks_project_implementations(capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _run(capsys, "--examples", "40", "--seed", "3")
    assert status == 0, out
    assert "torch production (cpu) gives the reference's placement on 40" in out
    assert "jax reference gives the reference's placement on 10" in out
    assert "CONFORMS: the project's implementations" in out


def _accepts_anything(weight, num_replicas, num_groups, num_nodes, num_gpus):  # type: ignore[no-untyped-def]
    from eplb.reference import rebalance_experts

    try:
        return rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    except (ValueError, TypeError):
        return None


def test_runner_reports_accepted_invalid_input() -> None:
    failure = check_candidate(_accepts_anything, examples=20)
    assert failure is not None
    assert failure.phase == "invalid input"
    assert failure.message.startswith("accepted an input that breaks")


def _modifies_input(weight, *counts):  # type: ignore[no-untyped-def]
    from eplb.reference import rebalance_experts

    result = rebalance_experts(weight, *counts)
    weight[...] = 0
    return result


def test_runner_reports_modified_input() -> None:
    failure = check_candidate(_modifies_input, examples=20)
    assert failure is not None
    assert "modified its input weight" in failure.message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--impl", "no_colon"], "MODULE:FUNCTION"),
        (["--impl", "no_such_module_xyz:f"], "cannot import"),
        (["--impl", "eplb.reference:no_such_function"], "no attribute"),
        (["--examples", "0"], "--examples must be >= 1"),
    ],
)
def test_cli_bad_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = _run(capsys, *args)
    assert status == 2
    assert message in out
