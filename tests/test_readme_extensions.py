"""The README's example of Python services and hooks runs and prints what the README says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest


def test_readme_services_and_hooks_example(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (root / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python services and hooks", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    monkeypatch.chdir(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.group(1), "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    # Two callbacks each copy their three bytes; the service returns the two handlers'
    # 0x1234 added up, and the sysret hook stops the run there.
    assert printed == [
        "hook",
        "2 handler on_message(b'one')",
        "5 handler on_message(b'two')",
        "8 returned stopped: NtUserMessageCall returned 0x2468",
    ]
    stated = section.split("```", 2)[2].split("**Services.**")[0]
    for line in printed:
        assert f"`{line}`" in stated


def test_readme_hooks_in_an_exploration_example(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (root / "README.md").read_text(encoding="utf-8")
    section = text.split("### Hooks in an exploration", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    monkeypatch.chdir(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.group(1), "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    # choice_nested_depth: 18 states explored; stopping before on_level3 loses its callback's
    # NtCallbackReturn and callback_return states. Each level's callback is on one path.
    assert printed == ["16 [('n11', 'level 3')]", "['called_back: api 2', 'called_back: api 3', 'called_back: api 4']"]
    stated = section.split("```", 2)[2]
    for line in printed:
        assert f"`{line}`" in stated
