"""Shared fixtures: shipped scenarios and their runs (each run once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emu.api import Run, run

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shipped_runs() -> dict[str, Run]:
    return {p.stem: run(p) for p in SCENARIOS}


def asm_scenario(code: str, *, services: str = "", table: str = "", extra: str = "", data: str = "") -> str:
    """A scenario text around one module's code (entry `main`)."""
    data_line = f'data = """\n{data}\n"""\n' if data else ""
    return f'''
[scenario]
name = "t"
{extra}
[[module]]
name = "app"
code = """
{code}
"""
{data_line}
[thread]
entry = "app!main"

{table}
{services}
'''
