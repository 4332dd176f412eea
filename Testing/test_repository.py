"""Promises of the repository itself: the README's commands and CI agree."""

from __future__ import annotations

import re

from conftest import REPO


def readme_first_code_block() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```(?:bash)?\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_first_block_has_exactly_two_commands():
    lines = readme_first_code_block()
    assert len(lines) == 2
    assert "colipri-slicer demo" in lines[0] and "pytest" in lines[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert readme_first_code_block()[1] in ci
