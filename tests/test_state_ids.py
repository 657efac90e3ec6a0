"""One state-id scheme across commands: ``s3``, ``n3`` and ``3`` are accepted everywhere."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from emu.cli.main import main
from emu.exploration.explorer import explore

CHOICE = "scenarios/choice_status.toml"


def test_explain_reads_a_bare_number_as_a_node_id(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for spelling in ("3", "n3", "s3"):
        assert main(["explain", str(root / CHOICE), spelling]) == 0
        assert capsys.readouterr().out.startswith("n3: user | depth 0 | user at ntdll!ZwClose+0x14\n")


def test_explain_lists_the_states_an_ambiguous_prefix_matches(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = explore(root / CHOICE)
    digests = {n: exp.graph.lean.nodes[n]["digest"] for n in exp.graph.lean}
    letter, count = Counter(d[0] for d in digests.values() if not d[0].isdigit()).most_common(1)[0]
    assert count >= 2, "the test needs two digests starting with the same letter"
    assert main(["explain", str(root / CHOICE), letter]) == 2
    err = capsys.readouterr().err.strip()
    assert f"digest prefix {letter!r} matches {count} states: " in err
    for n, d in digests.items():
        if d.startswith(letter):
            assert f"{n} ({d[:12]})" in err
    assert err.endswith("give more digits")


def test_explain_names_the_range_for_an_id_out_of_range(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(root / CHOICE), "n99"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{root / CHOICE}: no state 'n99': the explored graph has 13 states (n0..n12)"
    )


def test_dump_accepts_an_explored_node_on_the_runs_path(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "n2.dmp"
    assert main(["dump", str(root / CHOICE), "--state", "n2", "-o", str(out)]) == 0
    assert "state s2 (user mode), rip ntdll!ZwClose+0x14" in capsys.readouterr().out
    # n7 is on the failure path; the default run takes success.
    assert main(["dump", str(root / CHOICE), "--state", "n7", "-o", str(tmp_path / "n7.dmp")]) == 2
    assert "the default run does not pass through n7" in capsys.readouterr().err
    assert not (tmp_path / "n7.dmp").exists()
