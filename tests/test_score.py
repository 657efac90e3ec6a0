"""emu.score and `emu score`: confusion matrices per scenario and in total, misses named."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import emu
from conftest import ROOT, SCENARIOS
from emu.api import Run
from emu.cli.score import DetectorSpecError, add_parser, cmd_score, load_detector
from emu.detection.score import Confusion, ScoreReport, score
from emu.detection.signals import combined_detector, naive_detector
from emu.detection.view import Detection, ThreadView

AFTER = ROOT / "scenarios" / "hard_after_callback_return.toml"
FORGED = ROOT / "scenarios" / "hard_no_callback_forged_frame.toml"
DIRECT = ROOT / "scenarios" / "hard_direct_syscall_return.toml"


def test_score_is_public_and_counts_every_state(shipped_runs: dict[str, Run]) -> None:
    report = emu.score(naive_detector, [AFTER, FORGED, DIRECT])
    assert isinstance(report, ScoreReport) and report.detector == "emu.detection.signals:naive_detector"
    rows = {s.scenario: s.confusion.as_dict() for s in report.scenarios}
    assert rows == {
        "hard_after_callback_return": {"tp": 1, "fp": 3, "tn": 4, "fn": 0},
        "hard_no_callback_forged_frame": {"tp": 0, "fp": 2, "tn": 3, "fn": 0},
        "hard_direct_syscall_return": {"tp": 0, "fp": 0, "tn": 7, "fn": 1},
    }
    assert report.total.as_dict() == {"tp": 1, "fp": 5, "tn": 14, "fn": 1}
    assert report.total.total == sum(len(shipped_runs[p.stem].trace.states) for p in (AFTER, FORGED, DIRECT))
    assert not report.perfect and len(report.false_positives) == 5 and len(report.false_negatives) == 1


def test_each_miss_names_state_label_and_the_transitions_before_it() -> None:
    report = score(naive_detector, AFTER)
    sysret = report.misses[-1]
    assert (sysret.kind, sysret.scenario, sysret.state) == ("FP", "hard_after_callback_return", "s5")
    assert sysret.label == "user | depth 0 | user at ntdll!ZwCallbackReturn+0x14 | Running"
    assert sysret.path == (
        "step 2: syscall NtCallbackReturn at ntdll!ZwCallbackReturn+0x14",
        "step 3: callback_return NtUserMessageCall -> 0x00001234 at ntdll!ZwCallbackReturn+0x14",
        "step 4: sysret NtUserMessageCall -> 0x00001234 at ntdll!ZwCallbackReturn+0x14",
    )
    assert sysret.evidence == (
        "RIP ntdll!ZwCallbackReturn+0x14 is just after the system call instruction of ntdll!ZwCallbackReturn",
    )
    text = str(report)
    assert "FP hard_after_callback_return s5: user | depth 0 | user at ntdll!ZwCallbackReturn+0x14" in text
    assert "    after step 4: sysret NtUserMessageCall -> 0x00001234 at ntdll!ZwCallbackReturn+0x14" in text


def test_explored_misses_name_nodes_and_the_path() -> None:
    report = score(naive_detector, FORGED, explore=True)
    assert report.explore and [m.state for m in report.misses] == ["n1", "n2"]
    assert report.misses[1].path == (
        "n0 -> n1: syscall NtCallbackReturn",
        "n1 -> n2: sysret NtCallbackReturn -> STATUS_NO_CALLBACK_ACTIVE",
    )
    assert "nodes" in report.table().splitlines()[0]


def test_table_and_json() -> None:
    report = score(naive_detector, [FORGED, DIRECT])
    lines = report.table().splitlines()
    assert lines[0].split() == ["scenario", "states", "TP", "FP", "TN", "FN"]
    assert lines[2].split() == ["hard_no_callback_forged_frame", "5", "0", "2", "3", "0"]
    assert lines[-1].split() == ["total", "13", "0", "2", "10", "1"]
    data = json.loads(json.dumps(report.as_dict()))
    assert data["total"] == {"tp": 0, "fp": 2, "tn": 10, "fn": 1} and data["perfect"] is False
    assert data["scenarios"][0]["misses"][0]["label"].startswith("kernel | NtCallbackReturn | depth 0")


def test_any_truthy_answer_counts_and_folders_expand() -> None:
    def says_true(view: ThreadView) -> bool:
        return True

    def says_detection(view: ThreadView) -> Detection | None:
        return Detection(None, 0, "", "", 1, 2) if view.kernel_mode else None

    folder_report = score(says_true, ROOT / "scenarios")
    assert [s.scenario for s in folder_report.scenarios] == [p.stem for p in SCENARIOS]
    t = folder_report.total
    assert t.fn == 0 and t.tn == 0 and t.tp == sum(s.confusion.tp for s in folder_report.scenarios)
    assert score(says_detection, FORGED).total.as_dict() == {"tp": 0, "fp": 2, "tn": 3, "fn": 0}
    assert Confusion(1, 1, 2, 0).precision == 0.5 and Confusion().recall == 1.0


def test_a_detector_that_raises_is_named_with_the_state() -> None:
    def broken(view: ThreadView) -> bool:
        return view.context.rip // 0 > 0

    with pytest.raises(ZeroDivisionError) as e:
        score(broken, FORGED)
    assert "emu.score: the detector raised on hard_no_callback_forged_frame s0" in e.value.__notes__


def test_combined_is_perfect_on_every_shipped_scenario() -> None:
    report = score(combined_detector, SCENARIOS)
    assert report.perfect, str(report)
    assert "the detector matches the ground truth on every state" in str(report)


# --- emu score -----------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emu")
    parser.add_argument("--allow-path", action="append", default=[])
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_exit_codes_and_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["score", str(FORGED), "--detector", "emu.detection.signals:naive_detector"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("detector emu.detection.signals:naive_detector on 1 scenario(s)\n")
    assert "FP hard_no_callback_forged_frame s1: kernel | NtCallbackReturn | depth 0" in out
    assert _cli(["score", str(FORGED), str(AFTER)]) == 0  # the default detector: the built-in one
    assert "the detector matches the ground truth on every state" in capsys.readouterr().out
    assert (
        _cli(["score", str(FORGED), "--explore", "--json", "--detector", "emu.detection.signals:combined_detector"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["explore"] is True and data["perfect"] is True and data["scenarios"][0]["states"] == 5


def test_cli_detector_from_a_file_and_from_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mydetectors.py").write_text("def kernel_only(view):\n    return view.kernel_mode is True\n")
    assert _cli(["score", str(FORGED), "--detector", f"{tmp_path / 'mydetectors.py'}:kernel_only"]) == 1
    assert "FP hard_no_callback_forged_frame s1" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert load_detector("mydetectors:kernel_only").__name__ == "kernel_only"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "--detector 'nocolon': expected MODULE:FUNCTION, e.g. emu.detection.signals:naive_detector"),
        ("emu.detection.signals:nothing", "--detector 'emu.detection.signals:nothing': emu.detection.signals has no attribute 'nothing'"),
        ("emu.detection.signals:_SITES", "--detector 'emu.detection.signals:_SITES': _SITES is a dict, not a callable"),
        ("no_such_module_xyz:f", "--detector 'no_such_module_xyz:f': importing no_such_module_xyz failed: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
        ("missing.py:f", "--detector 'missing.py:f': missing.py is not a file"),
    ],
)  # fmt: skip
def test_cli_bad_detector_is_one_line_and_exit_2(spec: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DetectorSpecError) as e:
        load_detector(spec)
    assert str(e.value) == message
    assert _cli(["score", str(FORGED), "--detector", spec]) == 2
    assert capsys.readouterr().err == message + "\n"


def test_cli_bad_scenario_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["score", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.toml" in err


def test_cmd_score_is_what_the_parser_calls() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["score", "x.toml"]).func is cmd_score
