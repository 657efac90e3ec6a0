"""``benchmarks/run_all.py`` reports every goal of the performance table, in a stable shape.

One quick run (tiny sizes, two runs per figure) is checked for structure only: every row
present, the numbers positive and ordered, the verdict one of three words. No figure is
compared with a goal here: the machine's load decides those, and the benchmark is the check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# The rows of the performance table the benchmark answers (issue "Speed and scale"): a syscall
# against a bare hook, Qiling, callbacks, explorer rate and memory, a first write to a large
# region, 2 workers, cold start; and user code against raw Unicorn (bench_usercode's goal).
ROWS = [
    "syscall",
    "qiling",
    "callback",
    "explore_rate",
    "explore_memory",
    "first_write",
    "parallel",
    "cold_start",
    "user_code",
]
VERDICTS = {"met", "not met", "not measured"}
RUNS = 2


def _run_all(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [sys.executable, str(root / "benchmarks" / "run_all.py"), *args],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="module")
def quick(root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = _run_all(root, "--quick", "--runs", str(RUNS), "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def test_every_row_is_reported_once_in_order(quick: tuple[dict[str, Any], str]) -> None:
    data, _ = quick
    assert [r["key"] for r in data["rows"]] == ROWS


def test_measured_rows_have_positive_ordered_figures(quick: tuple[dict[str, Any], str]) -> None:
    data, _ = quick
    for r in data["rows"]:
        assert r["verdict"] in VERDICTS, r
        if r["verdict"] == "not measured":
            assert r["not_measured"], r  # says why
            assert r["median"] is None and r["min"] is None and r["max"] is None, r
            assert r["figure"].startswith("not measured: "), r
            continue
        assert r["not_measured"] is None, r
        assert r["runs"] == RUNS and len(r["samples"]) == RUNS, r
        assert all(s > 0 for s in r["samples"]), r
        assert 0 < r["min"] <= r["median"] <= r["max"], r
        assert r["goal"] and r["metric"] and r["detail"], r


def test_only_qiling_may_go_unmeasured(quick: tuple[dict[str, Any], str]) -> None:
    # Qiling lives in its own virtualenv, which a fresh machine may lack; every other row
    # needs nothing beyond emu's own dependencies.
    data, _ = quick
    unmeasured = {r["key"]: r["not_measured"] for r in data["rows"] if r["verdict"] == "not measured"}
    assert set(unmeasured) <= {"qiling"}, unmeasured
    if "qiling" in unmeasured:
        assert "Qiling is not importable" in unmeasured["qiling"]


def test_the_report_names_the_load_and_the_machine(quick: tuple[dict[str, Any], str]) -> None:
    data, stdout = quick
    assert data["quick"] is True and data["runs"] == RUNS
    assert data["cores"] >= 1
    assert len(data["load_before"]) == 3 and len(data["load_after"]) == 3
    assert all(x >= 0 for x in data["load_before"] + data["load_after"])
    assert "(1/5/15 min)" in stdout
    assert "load average at the end:" in stdout


def test_the_table_prints_one_line_per_row(quick: tuple[dict[str, Any], str]) -> None:
    data, stdout = quick
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("metric ") and "| verdict" in line)
    for r, line in zip(data["rows"], lines[header + 2 : header + 2 + len(data["rows"])], strict=True):
        cells = [c.strip() for c in line.split(" | ")]
        assert cells == [r["metric"], r["goal"], r["figure"], r["verdict"]]


def test_readme_table_is_rewritten_between_the_markers_only(
    root: Path, tmp_path: Path, quick: tuple[dict[str, Any], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import run_all

    readme = tmp_path / "README.md"
    before, after = "# title\n\ntext before\n\n", "\n\ntext after\n"
    readme.write_text(before + run_all.BEGIN + "\nold table\n" + run_all.END + after)
    data, _ = quick
    run_all.rewrite_readme(data, readme)
    text = readme.read_text()
    assert text.startswith(before + run_all.BEGIN) and text.endswith(run_all.END + after)
    assert "old table" not in text
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    assert len(table) == len(ROWS)
    for r, line in zip(data["rows"], table, strict=True):
        assert line.startswith(f"| {r['metric']} | ") and line.endswith(f" | {r['verdict']} |")


def test_the_repository_readme_has_the_generated_table(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import run_all

    text = (root / "README.md").read_text()
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1
    block = text.split(run_all.BEGIN)[1].split(run_all.END)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    assert len(rows) == len(ROWS)
    assert all(line.rsplit("|", 2)[1].strip() in VERDICTS for line in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "nosuch"], "unknown row(s) nosuch"),
        (["--quick", "--readme"], "--readme takes real figures"),
        (["--runs", "0", "--only", "syscall"], "--runs must be 1 or more"),
        (["--readme", "--from-json", "nosuch.json"], "nosuch.json: not a report written by --json"),
    ],
)
def test_bad_options_say_what_is_wrong(root: Path, args: list[str], message: str) -> None:
    done = _run_all(root, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
