"""The explored states as a graph numbered independently of the exploration's order.

Nodes are numbered by a breadth-first walk from the start state with each state's
out-edges in a canonical order (the transition's fields, then the target's mode, depth
and RIP, then its digest), so one process, any strategy and any number of workers
export the same bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping

import networkx as nx

from emu.graph import EdgeInfo, StateGraph
from emu.trace import State

EdgeKey = tuple[object, ...]  # (src digest, dst digest, kind, service, ssn, status, api, detail)


def canonical_graph(
    root: str | None,
    nodes: Mapping[str, State],
    edges: Iterable[EdgeKey],
    deadlocks: Mapping[str, list[str]],
    chains: Mapping[str, list[str]],
    symbolize: Callable[[int], str],
) -> StateGraph:
    """The states reachable from ``root`` over ``edges``, numbered n0, n1, ... canonically."""
    out_edges: dict[str, list[EdgeKey]] = {}
    sort_key: dict[EdgeKey, tuple[str, ...]] = {}  # each edge's sort key, computed once
    # Few distinct transitions recur over many edges: one sort key and one (frozen) EdgeInfo each.
    kinds: dict[tuple[object, ...], tuple[tuple[str, ...], EdgeInfo]] = {}
    for key in edges:
        out_edges.setdefault(str(key[0]), []).append(key)
        tail = key[2:]
        known = kinds.get(tail)
        if known is None:
            kind, service, ssn, status, api, detail = tail
            info = EdgeInfo(str(kind), service, ssn, status, api, str(detail or ""))  # type: ignore[arg-type]
            known = kinds[tail] = (edge_sort(key), info)
        sort_key[key] = known[0]

    def label(d: str) -> str:
        s = nodes[d]
        return f"{s.mode}|{s.depth}|{s.rip:#x}"

    order: dict[str, int] = {}
    queue = deque([root] if root else [])
    if root:
        order[root] = 0
    while queue:
        out = out_edges.get(queue.popleft())
        if not out:
            continue
        if len(out) > 1:
            out.sort(key=lambda k: (sort_key[k], label(str(k[1])), str(k[1])))
        for key in out:
            dst = str(key[1])
            if dst not in order:
                order[dst] = len(order)
                queue.append(dst)
    names = {d: f"n{i}" for d, i in order.items()}  # insertion order is the numbering
    node_rows = []
    for d, name in names.items():
        attrs: dict[str, object] = {"state": nodes[d], "digest": d}
        if d in deadlocks:
            attrs["deadlock"] = "; ".join(deadlocks[d])
        if d in chains:
            attrs["wait_chains"] = "; ".join(chains[d])
        node_rows.append((name, attrs))
    # Two different transitions between the same two states: the first (in canonical order)
    # is the edge, the others are listed under "also".
    edge_infos: dict[tuple[str, str], tuple[EdgeInfo, ...]] = {}
    for key in sorted(sort_key, key=lambda k: (order[str(k[0])], order[str(k[1])], sort_key[k])):
        uv = (names[str(key[0])], names[str(key[1])])
        edge_infos[uv] = edge_infos.get(uv, ()) + (kinds[key[2:]][1],)
    # Edges of the same transition(s) share one attribute dict (read-only, like the frozen
    # EdgeInfo in it): a dict per edge would be ~180 bytes an edge.
    shared: dict[tuple[EdgeInfo, ...], dict[str, object]] = {}
    edge_rows = []
    for uv, infos in edge_infos.items():
        a = shared.get(infos)
        if a is None:
            a = shared[infos] = {"edge": infos[0], "also": infos[1:]} if len(infos) > 1 else {"edge": infos[0]}
        edge_rows.append((uv[0], uv[1], a))
    return StateGraph(_digraph(node_rows, edge_rows), symbolize)


def _digraph(
    node_rows: list[tuple[str, dict[str, object]]], edge_rows: list[tuple[str, str, dict[str, object]]]
) -> nx.DiGraph:
    """A DiGraph holding these nodes (in order) and edges, their attribute dicts used as given.

    ``add_nodes_from``/``add_edges_from`` would copy every attribute dict; the adjacency is
    filled directly instead, as those methods fill it (node, successor and predecessor maps).
    """
    g = nx.DiGraph()
    node, succ, pred = g._node, g._adj, g._pred
    for name, attrs in node_rows:
        node[name] = attrs
        succ[name] = {}
        pred[name] = {}
    for u, v, a in edge_rows:
        succ[u][v] = a
        pred[v][u] = a
    return g


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


def node_order(name: str) -> tuple[int, str]:
    return (int(name[1:]), name) if name[1:].isdigit() else (1 << 62, name)


def edge_sort(key: EdgeKey) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in key[2:])
