"""``emu corpus``: one dump per state (or explored state) and the labels, for detectors in any language.

Checks: every state has its dump and label, each dump's thread is the labelled state's, the
labels agree with the kernel model's ground truths, the bytes are the same on a second run,
files get the umask's mode, a folder with files is kept without --force; and the README's
C++ detector compiles (g++), reads the corpus and scores itself against the labels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emu.api import run
from emu.cli.main import main
from emu.detection.observers import is_true, statuses
from emu.dump import read_minidump, thread_id
from emu.exploration.explorer import explore

ROOT = Path(__file__).resolve().parent.parent
ROUNDTRIP = ROOT / "scenarios" / "callback_roundtrip.toml"
NO_CALLBACK = ROOT / "scenarios" / "no_callback_active.toml"
WAITS = ROOT / "scenarios" / "callback_waits_on_event.toml"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_one_dump_per_state_with_its_truths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "corpus"
    assert main(["corpus", str(ROUNDTRIP), str(WAITS), "-o", str(out)]) == 0
    doc = json.loads((out / "labels.json").read_text())
    assert doc["format"] == "emu-corpus" and set(doc["truths"]) == {"seed", "waiting-in-callback"}
    labels = {d["file"]: d for d in doc["dumps"]}
    for path in (ROUNDTRIP, WAITS):
        r = run(path)
        known = statuses(r.trace)
        assert sum(1 for f in labels if f.startswith(r.scenario.name + "/")) == len(r.trace.states)
        for s in r.trace.states:
            label = labels[f"{r.scenario.name}/s{s.id}.dmp"]
            view = read_minidump(out / label["file"])
            first = view.threads()[0]
            assert first.thread == thread_id(s.thread) == label["thread"]["thread_id"]
            assert first.context == s.context and label["rip"] == f"{s.rip:#x}"
            assert label["truths"] == {t: is_true(t, s, known[s.id]) for t in ("seed", "waiting-in-callback")}
            assert view.kernel_stream  # each can start a run
    seed = [f for f, d in labels.items() if d["truths"]["seed"]]
    waiting = [f for f, d in labels.items() if d["truths"]["waiting-in-callback"]]
    assert len(seed) == 2 and len(waiting) == 1
    # The seed's instant in callback_waits_on_event is not something a user-context observer can stop at.
    w = labels[waiting[0]]["observers"]
    assert w["user-context"]["sees"] and w["user-context"]["truths"]["waiting-in-callback"]
    assert all(not labels[f]["observers"]["user-context"]["sees"] for f in seed)
    tsv = (out / "labels.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[8] == "seed" and len(tsv) == len(labels) + 1


def test_explored_corpus_has_every_node(tmp_path: Path) -> None:
    out = tmp_path / "explored"
    assert main(["corpus", str(WAITS), "--explore", "-o", str(out)]) == 0
    exp = explore(WAITS)
    doc = json.loads((out / "labels.json").read_text())
    labels = {d["state"]: d for d in doc["dumps"]}
    assert set(labels) == set(exp.graph.lean.nodes)
    for node in exp.graph.lean.nodes:
        st = exp.graph.state(node)
        view = read_minidump(out / labels[node]["file"])
        assert view.threads()[0].context == st.context, node
        assert labels[node]["truths"]["seed"] == st.pending, node
    assert sum(d["truths"]["seed"] for d in doc["dumps"]) == len(exp.pending)


def test_same_bytes_umask_and_no_overwrite(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "emu.cli", "corpus", str(ROUNDTRIP), "-o"]
    old = os.umask(0o027)
    try:
        a = subprocess.run([*cmd, str(tmp_path / "a")], capture_output=True, text=True, check=False)
        b = subprocess.run([*cmd, str(tmp_path / "b")], capture_output=True, text=True, check=False)
    finally:
        os.umask(old)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "a").rglob("*") if p.is_file()} == {0o640}
    again = subprocess.run([*cmd, str(tmp_path / "a")], capture_output=True, text=True, check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr
    forced = subprocess.run([*cmd, str(tmp_path / "a"), "--force"], capture_output=True, text=True, check=False)
    assert forced.returncode == 0 and _files(tmp_path / "a") == _files(tmp_path / "b")


def _readme_block(lang: str, marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S):
        if marker in m.group(1):
            return m.group(1)
    raise AssertionError(f"no ```{lang} block with {marker!r} in the README")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_readme_cpp_detector_scores_itself_against_the_labels(tmp_path: Path) -> None:
    src = tmp_path / "detect.cpp"
    src.write_text(_readme_block("cpp", "labels.tsv"))
    exe = tmp_path / "detect"
    built = subprocess.run(
        ["g++", "-std=c++17", "-O1", str(src), "-o", str(exe)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr
    out = tmp_path / "corpus"
    assert main(["corpus", str(ROUNDTRIP), str(NO_CALLBACK), "-o", str(out)]) == 0
    got = subprocess.run([str(exe), str(out), "5"], capture_output=True, text=True, check=False)
    lines = got.stdout.splitlines()
    # NtCallbackReturn is 5 on Windows 10 (j00ru/windows-syscalls). The naive rule fires on both of
    # no_callback_active's states at that syscall (its entry and its return): no callback is active there.
    r = run(NO_CALLBACK)
    after = [s.id for s in r.trace.states if r.symbolize(s.rip) == "ntdll!ZwCallbackReturn+0x14"]
    assert len(after) == 2
    assert lines[:-1] == [f"no_callback_active/s{i}.dmp: detector 1, label 0" for i in after]
    total = len(run(ROUNDTRIP).trace.states) + len(r.trace.states)
    assert lines[-1] == f"{total - 2} agree, 2 disagree" and got.returncode == 1
