"""Nothing escapes the emu command: bad paths, deep input, missing backends, odd arguments.

Each case once gave a traceback or a misleading success; each now gives one line and the
documented exit code.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest

from emu.cli.main import main

ROUNDTRIP = "scenarios/callback_roundtrip.toml"


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["graph", "plot", "dump", "explore"])
def test_an_output_in_a_folder_that_cannot_be_made_is_one_line(
    root: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # /proc refuses new files: the temporary file cannot be created there.
    out = {"graph": "/proc/emu-x.json", "plot": "/proc/emu-x.png", "dump": "/proc/emu-x.dmp"}.get(
        command, "/proc/emu-x.json"
    )
    extra = ["--state", "3"] if command == "dump" else []
    assert main([command, str(root / ROUNDTRIP), *extra, "-o", out]) == 2
    assert _one_line(capsys.readouterr().err) == f"{out}: cannot write the file (No such file or directory)"


@pytest.mark.parametrize("command", ["graph", "plot", "dump"])
def test_an_output_onto_a_directory_is_refused_even_with_force(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / f"out.{ {'graph': 'json', 'plot': 'png', 'dump': 'dmp'}[command] }"
    out.mkdir()
    extra = ["--state", "3"] if command == "dump" else []
    assert main([command, str(root / ROUNDTRIP), *extra, "-o", str(out), "--force"]) == 2
    assert _one_line(capsys.readouterr().err) == f"{out}: is a directory, expected a file name"
    assert out.is_dir()


def test_a_deeply_nested_toml_value_is_one_scenario_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "deep.toml"
    p.write_text("a = " + "[" * 500 + "]" * 500 + "\n")
    assert main(["run", str(p)]) == 2
    assert _one_line(capsys.readouterr().err) == f"{p}: not readable: arrays or tables nested too deeply"


def test_ray_backend_without_ray_is_one_line(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make `import ray` fail the way it does where Ray is not installed.
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ray" else object())
    assert main(["explore", str(root / "scenarios/choice_status.toml"), "--backend", "ray"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == "backend 'ray' needs Ray installed: pip install 'emu[ray]'"


def test_oserror_recursion_memory_and_ctrl_c_each_become_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from emu.cli.main import guarded

    def raiser(exc: BaseException):  # type: ignore[no-untyped-def]
        def f(args: object) -> int:
            raise exc

        return f

    cases = [
        (PermissionError(13, "Permission denied", "/x/y"), 2, "emu t: /x/y: Permission denied"),
        (RecursionError(), 2, "emu t: the input is nested too deeply to read"),
        (MemoryError(), 3, "emu t: out of memory (lower the scenario's budgets)"),
        (KeyboardInterrupt(), 130, "emu t: interrupted"),
    ]
    for exc, code, line in cases:
        assert guarded(raiser(exc), None, "t") == code  # type: ignore[arg-type]
        assert _one_line(capsys.readouterr().err) == line


def test_outputs_get_the_umask_mode(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = os.umask(0o027)
    try:
        out = tmp_path / "g.json"
        assert main(["graph", str(root / ROUNDTRIP), "-o", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        os.umask(0o002)
        dump = tmp_path / "s.dmp"
        assert main(["dump", str(root / ROUNDTRIP), "--state", "3", "-o", str(dump)]) == 0
        assert stat.S_IMODE(dump.stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_score_on_no_scenarios_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    assert main(["score", str(empty)]) == 2
    captured = capsys.readouterr()
    assert "accuracy" not in captured.out
    assert _one_line(captured.err) == f"{empty}: no scenario files to score (a folder is searched for *.toml)"


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_workers_must_be_positive(root: Path, capsys: pytest.CaptureFixture[str], workers: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["explore", str(root / ROUNDTRIP), f"--workers={workers}"])
    assert e.value.code == 2
    assert "argument --workers: expected a whole number of 1 or more" in capsys.readouterr().err


def test_detect_refuses_a_scenario_and_a_dump_together(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["detect", "--dump", str(tmp_path / "x.dmp"), str(root / ROUNDTRIP)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("emu detect: give a scenario file or --dump FILE.dmp, not both")


def test_allow_path_is_accepted_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    scenario = tmp_path / "a" / "s.toml"
    scenario.write_text(
        '[scenario]\nname = "x"\n[ntdll]\npath = "../b/n.dll"\n'
        '[[module]]\nname = "app"\ncode = "main: ret"\n[thread]\nentry = "app!main"\n'
    )
    assert main(["run", str(scenario)]) == 2
    assert "is outside the scenario's folder" in capsys.readouterr().err
    for argv in (["run", "--allow-path", str(tmp_path / "b"), str(scenario)],
                 ["--allow-path", str(tmp_path / "b"), "run", str(scenario)]):  # fmt: skip
        assert main(argv) == 2
        assert _one_line(capsys.readouterr().err).endswith("n.dll does not exist or is not a file")


APP = '[[module]]\nname = "app"\ncode = "main: ret"\n[thread]\nentry = "app!main"\n'


def _run_text(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> tuple[int, str, Path]:
    p = tmp_path / "s.toml"
    p.write_text('[scenario]\nname = "x"\n' + text)
    code = main(["run", str(p)])
    return code, _one_line(capsys.readouterr().err), p


def test_a_bad_return_status_lists_callback_among_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line, p = _run_text(
        tmp_path, capsys, APP + "[services.NtClose]\nsteps = [{ kind = 'return', status = 'bogus' }]\n"
    )
    assert code == 2
    assert line.startswith(
        f'{p}:9 [services.NtClose.steps[0].status]: expected an NTSTATUS (0..0xffffffff or one of "callback", STATUS_'
    )


def test_the_memory_budget_message_reads_in_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line, p = _run_text(tmp_path, capsys, "[budgets]\nmemory = 65536\n" + APP)
    assert code == 3
    assert re.fullmatch(
        rf"budget 'memory' exceeded \(limit 65536 bytes\) at {re.escape(str(p))}: \d+ bytes mapped", line
    )


def test_memory_over_kuser_shared_data_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line, p = _run_text(
        tmp_path, capsys, "[[memory]]\nname = 'k'\nstart = 0x7FFE0000\nsize = 0x1000\nperms = 'rw'\n" + APP
    )
    assert code == 2
    assert line == f"{p}:3 [memory[0]]: k overlaps KUSER_SHARED_DATA at 0x7ffe0000..0x7ffe1000"


@pytest.mark.parametrize(
    ("written", "echo"),
    [("0", "expected an integer in 1..1048576, got 0"), ("0x0", "expected an integer in 0x1..0x100000, got 0x0")],
)
def test_numbers_are_echoed_in_the_base_they_were_written_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], written: str, echo: str
) -> None:
    code, line, p = _run_text(tmp_path, capsys, f"[budgets]\ncallback_depth = {written}\n" + APP)
    assert code == 2
    assert line == f"{p}:4 [budgets.callback_depth]: {echo}"


def test_a_bad_base_says_what_an_address_looks_like(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["image", "--base", "zzz", "x.dll"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid <lambda> value" not in err
    assert err.strip().endswith("argument --base: expected an address such as 0x180000000, got 'zzz'")
