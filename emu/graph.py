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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import networkx
import networkx as nx

from emu.context import REGISTER_NAMES
from emu.errors import OutputExists
from emu.trace import State, Trace, Transition
from emu.winnt import status_name

STACK_WORDS = 8


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


@dataclass(frozen=True, slots=True)
class EdgeInfo:
    """A transition as an explored graph keeps it: what happened, not when (no step)."""

    kind: str
    service: str | None
    ssn: int | None
    status: int | None
    api: int | None
    detail: str


class StateGraph:
    """States and transitions in a networkx DiGraph, with queries and exports.

    ``lean`` holds one ``state`` (a :class:`State`) per node and one ``edge`` (a
    :class:`Transition` or :class:`EdgeInfo`) per edge, so building it costs little;
    :attr:`nx` is the same graph with every attribute spelled out (labels, registers,
    stack words, symbols), built on first use for exports and for people.
    """

    def __init__(self, lean: networkx.DiGraph, symbolize: Callable[[int], str] = lambda a: f"{a:#x}") -> None:
        self.lean = lean
        self.symbolize = symbolize

    @classmethod
    def from_trace(cls, trace: Trace) -> StateGraph:
        # A run never connects the same two states twice (each transition makes a new
        # state), so a DiGraph holds it; the node names are built once and shared by the
        # adjacency dicts (about 0.85 KiB per state in all).
        g = nx.DiGraph()
        states = trace.states
        names = [f"s{s.id}" for s in states]
        g.add_nodes_from((names[s.id], {"state": s}) for s in states)
        g.add_edges_from((names[t.src], names[t.dst], {"edge": t}) for t in trace.transitions)
        return cls(g, trace.symbolize)

    @cached_property
    def nx(self) -> networkx.DiGraph:
        """The graph with every attribute as a GraphML-friendly scalar."""
        g = nx.DiGraph()
        for n in self.lean.nodes:
            g.add_node(n, **self.attrs(n))
        for u, v, d in self.lean.edges(data=True):
            attrs = edge_attrs(d["edge"])
            if d.get("also"):
                attrs["also"] = "; ".join(" ".join(str(x) for x in (e.kind, e.service) if x) for e in d["also"])
            if d.get("notes"):
                attrs["notes"] = d["notes"]
            g.add_edge(u, v, **attrs)
        return g

    # --- queries ----------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.lean.number_of_nodes())

    def state(self, node: str) -> State:
        s: State = self.lean.nodes[node]["state"]
        return s

    def attrs(self, node: str) -> dict[str, object]:
        """Everything known about a node, as scalars (label, registers, stack words, ...)."""
        d = self.lean.nodes[node]
        attrs = node_attrs(d["state"], self.symbolize)
        if "digest" in d:
            attrs["digest"] = d["digest"]
        # path_condition and witness: states of an exploration with symbolic values (emu.symbolic)
        # notes and hook_stop: what hooks recorded in an exploration (emu.exploration.hooked)
        for key in ("deadlock", "wait_chains", "path_condition", "witness", "notes", "hook_stop"):
            if key in d:
                attrs[key] = d[key]
        return attrs

    def nodes(self) -> Iterator[str]:
        return iter(self.lean.nodes)

    def pending(self) -> list[str]:
        """Nodes where the thread is at ZwCallbackReturn: callback-return pending (ground truth)."""
        return [n for n, d in self.lean.nodes(data=True) if d["state"].pending]

    def merges(self) -> list[str]:
        """Nodes reached along more than one edge."""
        return [n for n in self.lean.nodes if self.lean.in_degree(n) >= 2]

    def path_to(self, node: str, start: str | None = None) -> list[str]:
        """Shortest path of node ids from ``start`` (the first node) to ``node``."""
        first = start if start is not None else next(iter(self.lean.nodes))
        return list(nx.shortest_path(self.lean, first, node))

    def mode_view(self) -> networkx.MultiDiGraph:
        """The graph folded to mode and callback level (``user d0``, ``kernel d1``, ...) for teaching.

        Edges between levels carry the transition kind and how many transitions they stand for.
        """
        folded = nx.MultiDiGraph()
        counts: dict[tuple[str, str, str], int] = {}
        for _, d in self.lean.nodes(data=True):
            s = d["state"]
            folded.add_node(_level(s), mode=s.mode, depth=s.depth)
        for u, v, d in self.lean.edges(data=True):
            key = (_level(self.state(u)), _level(self.state(v)), d["edge"].kind)
            counts[key] = counts.get(key, 0) + 1
        for (u, v, kind), n in sorted(counts.items()):
            folded.add_edge(u, v, key=kind, kind=kind, count=n)
        return folded

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

    def render(self, path: str | Path) -> str:
        """The export for ``path``'s extension: .graphml, .json or .dot (.gv)."""
        p = Path(path)
        fmt = p.suffix.lower().lstrip(".")
        text = {"graphml": self.to_graphml, "json": self.to_json, "dot": self.to_dot, "gv": self.to_dot}.get(fmt)
        if text is None:
            raise OutputExists(f"{path}: unknown graph format '{p.suffix}' (expected .graphml, .json or .dot)")
        return text()


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


def _level(s: State) -> str:
    return f"{s.mode} d{s.depth}"


def edge_attrs(t: Transition | EdgeInfo) -> dict[str, object]:
    attrs: dict[str, object] = {"kind": t.kind}
    if isinstance(t, Transition):
        attrs.update(step=t.step, thread=t.thread, depth=t.depth, rip_symbol=t.rip_symbol)
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
    if isinstance(t, Transition) and t.woke:
        attrs["woke"] = ",".join(map(str, t.woke))  # threads whose wait was satisfied before it
    return attrs


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')
