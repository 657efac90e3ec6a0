"""State graph: structure, queries and byte-identical exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import networkx as nx

from emu.api import Run, run


def test_graph_nodes_and_edges_follow_the_trace(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["callback_roundtrip"]
    g = r.graph
    assert len(g) == len(r.trace.states)
    assert g.nx.number_of_edges() == len(r.trace.transitions)
    assert g.pending() == ["s3"]
    label = g.nx.nodes["s3"]["label"]
    assert (
        label == "kernel | NtUserMessageCall | depth 1 | user at ntdll!ZwCallbackReturn+0x14 | callback-return pending"
    )
    assert [d["kind"] for _, _, d in g.nx.edges(data=True)][:4] == ["syscall", "callback", "syscall", "callback_return"]
    assert g.path_to("s3") == ["s0", "s1", "s2", "s3"]
    assert g.nx.nodes["s3"]["reg_rip"] == f"{r.trace.state(3).rip:#x}"


def test_exports_parse_back(shipped_runs: dict[str, Run], tmp_path: Path) -> None:
    g = shipped_runs["nested_callbacks"].graph
    back = nx.read_graphml(_write(tmp_path / "g.graphml", g.to_graphml()))
    assert back.number_of_nodes() == len(g)
    assert sum(1 for _, d in back.nodes(data=True) if d["pending"]) == 3
    import json

    data = json.loads(g.to_json())
    assert len(data["nodes"]) == len(g) and len(data["edges"]) == g.nx.number_of_edges()
    dot = g.to_dot()
    assert dot.startswith("digraph emu {") and dot.count("->") == g.nx.number_of_edges()


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_exports_are_byte_identical_across_runs_and_hash_seeds(root: Path, tmp_path: Path) -> None:
    scenario = root / "scenarios" / "nested_callbacks.toml"
    outputs = []
    for seed in ("0", "12345"):
        files = []
        for ext in ("graphml", "json", "dot"):
            out = tmp_path / f"{seed}.{ext}"
            env = dict(os.environ, PYTHONHASHSEED=seed)
            subprocess.run(
                [sys.executable, "-m", "emu.cli", "graph", str(scenario), "-o", str(out)],
                check=True,
                env=env,
                capture_output=True,
            )
            files.append(out.read_bytes())
        outputs.append(files)
    assert outputs[0] == outputs[1]
    again = run(scenario).graph
    assert again.to_graphml().encode() == outputs[0][0]


def test_mode_view_folds_states_to_mode_and_depth(shipped_runs: dict[str, Run]) -> None:
    g = shipped_runs["nested_callbacks"].graph
    folded = g.mode_view()
    assert set(folded.nodes) == {f"{m} d{d}" for m in ("user", "kernel") for d in range(4)} | {"exited d0"}
    calls = {(u, v): d["count"] for u, v, d in folded.edges(data=True) if d["kind"] == "callback"}
    assert calls == {("kernel d0", "user d1"): 1, ("kernel d1", "user d2"): 1, ("kernel d2", "user d3"): 1}
    assert sum(d["count"] for _, _, d in folded.edges(data=True)) == g.lean.number_of_edges()
