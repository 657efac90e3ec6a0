"""The state graph: states as nodes, transitions as edges, deterministic exports.

Nodes are named the way a person would say them
(``kernel | NtUserMessageCall | depth 1 | user at ntdll!ZwCallbackReturn+0x14 |
callback-return pending``) and carry the concrete registers and top stack words.
Exports (GraphML, node-link JSON, DOT) depend only on the trace, so the same
scenario gives byte-identical files on every run.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import networkx as nx

from emu.context import REGISTER_NAMES
from emu.trace import State, Trace, Transition
from emu.winnt import status_name

STACK_WORDS = 8


def node_id(state_id: int) -> str:
    return f"s{state_id}"


def state_label(state: State, symbolize: Callable[[int], str]) -> str:
    """The human name of a state."""
    parts: list[str] = [state.mode]
    if state.service:
        parts.append(state.service)
    parts.append(f"depth {state.depth}")
    parts.append(f"user at {symbolize(state.rip)}")
    if state.pending:
        parts.append("callback-return pending")
    return " | ".join(parts)


class StateGraph:
    """A networkx MultiDiGraph of states and transitions, with queries and exports."""

    def __init__(self, graph: nx.MultiDiGraph) -> None:
        self.nx = graph

    @classmethod
    def from_trace(cls, trace: Trace) -> StateGraph:
        g = nx.MultiDiGraph()
        sym = trace.symbolize
        for s in trace.states:
            g.add_node(node_id(s.id), **node_attrs(s, sym))
        for t in trace.transitions:
            g.add_edge(node_id(t.src), node_id(t.dst), key=t.step, **_edge_attrs(t))
        return cls(g)

    # --- queries ----------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.nx.number_of_nodes())

    def nodes(self) -> Iterator[tuple[str, dict[str, object]]]:
        return iter(self.nx.nodes(data=True))

    def pending(self) -> list[str]:
        """Nodes where the thread waits at ZwCallbackReturn (ground truth)."""
        return [n for n, d in self.nx.nodes(data=True) if d.get("pending")]

    def path_to(self, node: str, start: str = "s0") -> list[str]:
        """Shortest path of node ids from ``start`` to ``node``."""
        return list(nx.shortest_path(self.nx, start, node))

    # --- exports ----------------------------------------------------------------------
    def to_graphml(self) -> str:
        buf = io.BytesIO()
        nx.write_graphml(self.nx, buf, encoding="utf-8", prettyprint=True, named_key_ids=True)
        return buf.getvalue().decode("utf-8")

    def to_json(self) -> str:
        data = nx.node_link_data(self.nx, edges="edges")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    def to_dot(self) -> str:
        lines = ["digraph emu {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
        for n, d in self.nx.nodes(data=True):
            style = (
                ', style=filled, fillcolor="#ffd7a8"'
                if d.get("pending")
                else (', style=filled, fillcolor="#dde8ff"' if d.get("mode") == "kernel" else "")
            )
            lines.append(f'  {n} [label="{_dot_escape(str(d["label"]))}"{style}];')
        for u, v, d in self.nx.edges(data=True):
            label = f"{d['step']}: {d['kind']}" if "step" in d else str(d["kind"])
            if d.get("service"):
                label += f" {d['service']}"
            if "status" in d:
                label += f" {d['status']}"
            lines.append(f'  {u} -> {v} [label="{_dot_escape(label)}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> str:
        """Write by extension: .graphml, .json or .dot. Returns the format used."""
        p = Path(path)
        fmt = p.suffix.lower().lstrip(".")
        text = {"graphml": self.to_graphml, "json": self.to_json, "dot": self.to_dot, "gv": self.to_dot}.get(fmt)
        if text is None:
            raise ValueError(f"{path}: unknown graph format '{p.suffix}' (use .graphml, .json or .dot)")
        p.write_text(text(), encoding="utf-8")
        return fmt


def node_attrs(s: State, sym: Callable[[int], str]) -> dict[str, object]:
    attrs: dict[str, object] = {
        "label": state_label(s, sym),
        "thread": s.thread,
        "mode": s.mode,
        "depth": s.depth,
        "pending": s.pending,
        "rip": f"{s.rip:#x}",
        "rip_symbol": sym(s.rip),
        "rsp": f"{s.rsp:#x}",
        "rsp_symbol": sym(s.rsp),
    }
    if s.service:
        attrs["service"] = s.service
    if s.api is not None:
        attrs["api"] = s.api
    if s.callbacks:
        attrs["callbacks"] = " > ".join(f"api {api} ({svc})" for api, svc in s.callbacks)
    for name, value in zip(REGISTER_NAMES, s.context):
        attrs[f"reg_{name}"] = f"{value:#x}"
    words = [s.stack[i : i + 8] for i in range(0, min(len(s.stack), 8 * STACK_WORDS), 8)]
    attrs["stack"] = " ".join(f"{int.from_bytes(w, 'little'):#x}" for w in words if len(w) == 8)
    return attrs


def _edge_attrs(t: Transition) -> dict[str, object]:
    attrs: dict[str, object] = {
        "step": t.step,
        "kind": t.kind,
        "thread": t.thread,
        "depth": t.depth,
        "rip_symbol": t.rip_symbol,
    }
    if t.service:
        attrs["service"] = t.service
    if t.ssn is not None:
        attrs["ssn"] = t.ssn
    if t.status is not None:
        attrs["status"] = status_name(t.status)
    if t.api is not None:
        attrs["api"] = t.api
    if t.detail:
        attrs["detail"] = t.detail
    return attrs


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')
