"""The README's Python snippets run as written, on a CPU machine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_api_serving_and_engine_snippets():
    joined = "\n".join(SNIPPETS)
    for name in ("rebalance_experts", "ExpertBalancer", "integrations"):
        assert name in joined
    # CUDA appears only in comments, as the GPU variant of a CPU line.
    code = [line.split("#")[0] for line in joined.splitlines()]
    assert not [line for line in code if "cuda" in line]
    assert "cuda" in joined


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(snippet: str) -> None:
    # Each snippet in a fresh namespace, as a reader pastes it; its asserts must hold.
    exec(compile(snippet, str(README), "exec"), {"__name__": "__readme__"})
