"""The README's commands and example stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def test_readme_starts_with_the_two_commands(root: Path) -> None:
    lines = (root / "README.md").read_text().splitlines()
    assert lines[3] == "pip install -e . && emu run scenarios/callback_roundtrip.toml"
    assert lines[4] == (
        "apt-get update && apt-get install -y gcc-mingw-w64-x86-64 g++ gdb && pip install -e '.[test]' && "
        "python -m venv .venv-dumpulator && .venv-dumpulator/bin/pip install 'dumpulator==0.2.6' && python -m pytest -q"
    )
    ci = (root / ".ci" / "run").read_text()
    assert lines[4] in ci.splitlines()


def test_readme_python_example_runs(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (root / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    monkeypatch.chdir(root)
    code = block.group(1).replace('"nested.graphml"', repr(str(tmp_path / "nested.graphml")))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "ntdll!ZwCallbackReturn+0x14" in out
    assert (tmp_path / "nested.graphml").stat().st_size > 1000


def test_readme_names_every_shipped_scenario(root: Path) -> None:
    text = (root / "README.md").read_text()
    shipped = sorted(
        p.relative_to(root / "scenarios").with_suffix("").as_posix() for p in (root / "scenarios").rglob("*.toml")
    )
    missing = [name for name in shipped if f"`{name}`" not in text]
    assert not missing, f"README does not list {missing}"


def test_readme_says_how_to_build_the_pe_scenarios(root: Path) -> None:
    text = (root / "README.md").read_text()
    row = next(line for line in text.splitlines() if "`pe/third_party_ntdll`" in line)
    assert "python scripts/build_pe_scenarios.py" in row
    for p in (root / "scenarios/pe").glob("*.toml"):
        assert p.read_text().startswith("# Build the DLLs first"), p
    row = next(line for line in text.splitlines() if "`real/roundtrip`" in line)
    assert "python scripts/fetch_real_ntdll.py" in row
    for p in (root / "scenarios/real").glob("*.toml"):
        assert p.read_text().startswith(
            "# Fetch the DLLs first (a fresh clone has none): python scripts/fetch_real_ntdll.py"
        ), p


def test_readme_introduces_the_notebooks_and_their_extra_installs_jupyter(root: Path) -> None:
    import tomllib

    text = (root / "README.md").read_text()
    assert "## Notebooks" in text
    assert "pip install -e '.[notebooks]'" in text
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["notebooks"]
    assert any(dep.startswith(("jupyterlab", "notebook")) for dep in extra)


def test_readme_describes_detect_output_as_it_is(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from emu.cli.main import main

    text = (root / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `emu detect FILE"))
    assert not row.split("|")[2].strip().startswith("JSON")
    main(["detect", str(root / "scenarios/callback_roundtrip.toml")])
    out = capsys.readouterr().out
    assert out.startswith("s3: ntdll!ZwCallbackReturn+0x14")  # text, not JSON, without --json
    assert "`--allow-path DIR` may come before or after the subcommand" in text
    assert "`130` interrupted by Ctrl-C" in text
