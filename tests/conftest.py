"""Shared fixtures: shipped scenarios and their runs (each run once per session)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from emu.api import Run, run

ROOT = Path(__file__).resolve().parent.parent
# Assembled bytes are cached by content (emu.loader.asm_cache): the suite keeps its own cache,
# so the many texts it assembles stay out of the user's, and every test session starts empty.
os.environ.setdefault("EMU_CACHE_DIR", tempfile.mkdtemp(prefix="emu-test-asm-"))
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
