"""The explored states as a graph numbered independently of the exploration's order.

Nodes are numbered by a breadth-first walk from the start state with each state's
out-edges in a canonical order (the transition's fields, then the target's mode, depth
and RIP, then its digest), so one process, any strategy and any number of workers
export the same bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from emu.exploration.adjacency import CompactDiGraph, Neighbors
from emu.graph import EdgeInfo, StateGraph
from emu.trace import State

# (src digest, dst digest, (kind, service, ssn, status, api, detail))
EdgeKey = tuple[str, str, tuple[object, ...]]
# a transition's sort key, its EdgeInfo and the attribute dict of an edge with that transition only
Kind = tuple[tuple[str, ...], EdgeInfo, dict[str, object]]


def canonical_graph(
    root: str | None,
    nodes: Mapping[str, State],
    edges: Iterable[EdgeKey],
    deadlocks: Mapping[str, list[str]],
    chains: Mapping[str, list[str]],
    symbolize: Callable[[int], str],
    consume: bool = False,
) -> StateGraph:
    """The states reachable from ``root`` over ``edges``, numbered n0, n1, ... canonically.

    ``consume``: ``edges`` is a dict the caller no longer needs; it is emptied once read,
    so the graph is built in the memory its keys held.
    """
    # Few distinct transitions recur over many edges: one sort key and one (frozen) EdgeInfo
    # each. Per source: its out-edge, or a list of them when it has more than one (the edge
    # keys themselves: nothing is allocated per edge before the graph's own adjacency).
    kinds: dict[tuple[object, ...], Kind] = {}
    out_edges: dict[str, EdgeKey | list[EdgeKey]] = {}
    for key in edges:
        tail = key[2]
        if tail not in kinds:
            kind, service, ssn, status, api, detail = tail
            info = EdgeInfo(str(kind), service, ssn, status, api, str(detail or ""))  # type: ignore[arg-type]
            kinds[tail] = (edge_sort(tail), info, {"edge": info})
        have = out_edges.get(key[0])
        if have is None:
            out_edges[key[0]] = key
        elif isinstance(have, list):
            have.append(key)
        else:
            out_edges[key[0]] = [have, key]
    if consume and isinstance(edges, dict):
        edges.clear()

    def label(d: str) -> tuple[str, int, int]:
        s = nodes[d]  # (mode, depth, RIP) by index: State fields 2, 6 and its context's RIP
        return (s[2], s[6], s[3][16])

    # Node names by digest, numbered in breadth-first order (the dict's insertion order).
    order: dict[str, str] = {}
    queue = deque([root] if root else [])
    if root:
        order[root] = "n0"
    while queue:
        out = out_edges.get(queue.popleft())
        if out is None:
            continue
        if isinstance(out, list):
            _sort_pair(out, lambda e: (kinds[e[2]][0], label(e[1]), e[1]), lambda e: kinds[e[2]][0])
        for _, dst, _ in out if isinstance(out, list) else (out,):
            if dst not in order:
                order[dst] = f"n{len(order)}"
                queue.append(dst)
    g = CompactDiGraph()  # a networkx DiGraph with small adjacency maps (emu.exploration.adjacency)
    # The adjacency is filled directly, as add_nodes_from/add_edges_from fill it (node, successor
    # and predecessor maps), without their copy of every attribute dict.
    node, succ, pred = g._node, g._adj, g._pred
    for d, name in order.items():
        attrs = _node_attrs(nodes[d], d)
        if d in deadlocks:
            attrs["deadlock"] = "; ".join(deadlocks[d])
        if d in chains:
            attrs["wait_chains"] = "; ".join(chains[d])
        node[name] = attrs
        succ[name] = Neighbors()
        pred[name] = Neighbors()
    # Edges in canonical order (source, target, transition). Two different transitions between
    # the same two states: the first is the edge, the others are listed under "also". Edges of
    # the same transition(s) share one attribute dict (read-only, like the frozen EdgeInfo in it):
    # a dict per edge would be ~180 bytes an edge. A source's edge keys go once its edges are in
    # the graph, so the graph grows into the memory they held.
    shared: dict[tuple[EdgeInfo, ...], dict[str, object]] = {}
    for d, u in order.items():
        out = out_edges.pop(d, None)
        if out is None:
            continue
        if not isinstance(out, list):
            out = [out]
        elif len(out) > 1:
            _sort_pair(out, lambda e: (_number(order[e[1]]), kinds[e[2]][0]), lambda e: _number(order[e[1]]))
        targets = succ[u]
        j, n = 0, len(out)
        while j < n:
            dst = out[j][1]
            kind = kinds[out[j][2]]
            j += 1
            if j < n and out[j][1] == dst:
                infos = [kind[1]]
                while j < n and out[j][1] == dst:
                    infos.append(kinds[out[j][2]][1])
                    j += 1
                group = tuple(infos)
                a = shared.get(group)
                if a is None:
                    a = shared[group] = {"edge": group[0], "also": group[1:]}
            else:
                a = kind[2]  # one transition to this target: the dict its kind keeps
            v = order[dst]
            targets[v] = a
            pred[v][u] = a
    return StateGraph(g, symbolize)


class _NodeAttrs:
    """Only its instance dictionary is kept: see :func:`_node_attrs`."""

    state: State
    digest: str


def _node_attrs(state: State, digest: str) -> dict[str, object]:
    """A node's attribute dict ``{"state": ..., "digest": ...}``, as a key-sharing dictionary.

    An instance dictionary shares its key table with every other instance's of the same
    class (PEP 412): about 135 bytes a node instead of 220 for a dict display. It is an
    ordinary dict to everyone (keys added later, copies, pickling and order behave alike).
    """
    holder = _NodeAttrs()
    holder.state = state
    holder.digest = digest
    return holder.__dict__


def node_name(graph: StateGraph, digest: str) -> str:
    """The node id of the state with ``digest`` (the digest itself when it is not in the graph)."""
    for n, a in graph.lean.nodes(data=True):
        if a.get("digest") == digest:
            return str(n)
    return digest


def name_faults(graph: StateGraph, faults: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Faults found at state digests, named by ``graph``'s node ids, in node order (deduplicated)."""
    if not faults:
        return []
    ids = {str(a.get("digest")): str(n) for n, a in graph.lean.nodes(data=True)}
    named = {(ids.get(d, d), m) for d, m in faults}
    return sorted(named, key=lambda f: (node_order(f[0]), f[1]))


def _sort_pair(out: list[EdgeKey], key: Callable[[EdgeKey], Any], first: Callable[[EdgeKey], Any]) -> None:
    """``out.sort(key=key)``, where ``first(e)`` is the first item of ``key(e)``; a pair (a fork's two
    options, the usual case) whose first items differ is put in order by those alone."""
    if len(out) == 2:
        a, b = first(out[0]), first(out[1])
        if a != b:
            if a > b:
                out.reverse()
            return
    out.sort(key=key)


def _number(name: str) -> int:
    return int(name[1:])


def node_order(name: str) -> tuple[int, str]:
    return (int(name[1:]), name) if name[1:].isdigit() else (1 << 62, name)


def edge_sort(transition: tuple[object, ...]) -> tuple[str, ...]:
    """A transition's (kind, service, ssn, status, api, detail) as sortable strings."""
    return tuple("" if v is None else str(v) for v in transition)
