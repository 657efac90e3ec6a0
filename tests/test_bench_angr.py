"""``benchmarks/bench_angr.py``: emu's side finds the five cases on the bytes angr is given, and
angr's side (``benchmarks/angr_side.py``, run by another interpreter) says in one line what is
wrong. angr itself is not needed: it is not one of emu's dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _side(root: Path, *args: str, python: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*python, str(root / "benchmarks" / "angr_side.py"), *args],
        capture_output=True,
        text=True,
        input="run\n",
        timeout=60,
        check=False,
    )


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    return lines[-1]


GOOD = ("--code", "c3", "--base", "0x400000", "--buffer", "0x800000", "--size", "16")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (GOOD[2:], "the following arguments are required: --code"),
        (("--code", "zz", *GOOD[2:]), "--code: expected hex bytes"),
        (("--code", "", *GOOD[2:]), "--code: expected at least one byte"),
        ((*GOOD[:6], "--size", "2"), "--size: expected 4..4096 bytes, not 2"),
        ((*GOOD[:2], "--base", "far", *GOOD[4:]), "argument --base: invalid"),
    ],
)
def test_angr_side_rejects_bad_arguments_in_one_line(root: Path, args: tuple[str, ...], message: str) -> None:
    assert message in _one_line(_side(root, *args))


def test_angr_side_without_angr_says_so_in_one_line(root: Path) -> None:
    # -I -S: no site-packages and no PYTHONPATH, so nothing but the standard library imports.
    line = _one_line(_side(root, *GOOD, python=(sys.executable, "-I", "-S")))
    assert line.startswith("angr_side.py: angr is not importable by ")
    assert "No module named 'angr'" in line


def test_a_missing_angr_interpreter_is_bad_input(root: Path) -> None:
    missing = root / "no-such-venv" / "bin" / "python"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_angr.py"), "--runs", "1", "--angr-python", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = _one_line(done)
    assert line.startswith(f"error: --angr-python: angr is not importable by {missing} (FileNotFoundError)")
    assert "pip install angr" in line


@pytest.fixture()
def bench(root: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import bench_angr

    return bench_angr


def test_emu_finds_the_five_cases_on_the_bytes_angr_gets(bench: Any) -> None:
    blob = bench.function_bytes()
    # mov eax, dword ptr [rcx] (Intel SDM: 8B /r, ModRM 0x01), then cmp eax, 0x0F (83 /7 ib).
    assert blob.startswith(bytes.fromhex("8b0183f80f"))
    assert blob.endswith(bytes.fromhex("b804000000c3"))  # mov eax, 4; ret
    got = bench.emu_once(blob)  # checks app!wndproc holds these very bytes
    assert got["complete"]
    assert got["paths"] == 5
    assert got["cases"] == ["WM_CLOSE", "WM_DESTROY", "WM_PAINT", "WM_QUIT", "other"]
    bench.check("emu", got)
    with pytest.raises(SystemExit, match="found 4 paths"):
        bench.check("angr", {**got, "paths": 4, "cases": got["cases"][:4]})


def test_a_failing_angr_side_is_reported_by_its_last_line(bench: Any) -> None:
    # This interpreter has no angr (it is not one of emu's dependencies): the child says so on
    # stderr and exits, and the benchmark raises that line rather than waiting for a reply.
    if _importable("angr"):
        pytest.skip("angr is importable here")
    with pytest.raises(RuntimeError, match=r"angr_side\.py: angr is not importable by "):
        bench.AngrSide(sys.executable, bench.function_bytes())


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
