"""The README's commands and example stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def test_readme_starts_with_the_two_commands(root: Path) -> None:
    lines = (root / "README.md").read_text().splitlines()
    assert lines[3] == "pip install -e . && emu run scenarios/callback_roundtrip.toml"
    assert lines[4] == (
        "apt-get update && apt-get install -y gcc-mingw-w64-x86-64 && pip install -e '.[test]' && "
        "python -m venv .venv-dumpulator && .venv-dumpulator/bin/pip install 'dumpulator==0.2.6' && python -m pytest -q"
    )
    ci = (root / ".ci" / "run").read_text()
    assert lines[4] in ci.splitlines()


def test_readme_python_example_runs(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = (root / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    monkeypatch.chdir(root)
    code = block.group(1).replace('"nested.graphml"', repr(str(tmp_path / "nested.graphml")))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "ntdll!ZwCallbackReturn+0x14" in out
    assert (tmp_path / "nested.graphml").stat().st_size > 1000
