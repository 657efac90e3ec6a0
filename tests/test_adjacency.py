"""The explored graph's small adjacency maps behave as the dicts networkx would keep."""

from __future__ import annotations

import copy
import pickle
import random
from pathlib import Path

import networkx as nx
import pytest

from conftest import SCENARIOS
from emu.exploration.adjacency import CompactDiGraph, Neighbors
from emu.exploration.explorer import Explorer
from emu.scenario import load_scenario


def test_neighbors_follow_a_dict_through_random_changes() -> None:
    rng = random.Random(18)
    for _ in range(200):
        ours, want = Neighbors(), dict[int, dict[str, int]]()
        for _ in range(rng.randrange(1, 12)):
            key = rng.randrange(5)
            if rng.random() < 0.35 and want:
                key = rng.choice(list(want))
                del ours[key]
                del want[key]
            else:
                value = {"w": rng.randrange(100)}
                ours[key] = value
                want[key] = value
            # Same entries in the same (insertion) order, by every way of reading them.
            assert list(ours) == list(want)
            assert list(ours.items()) == list(want.items())
            assert list(ours.values()) == list(want.values())
            assert len(ours) == len(want) and ours == want and want == ours
            assert all((k in ours) == (k in want) for k in range(6))
            assert ours.get(5, "none") == "none" and repr(ours) == repr(want)
            assert ours.copy() == want and type(ours.copy()) is dict
        with pytest.raises(KeyError):
            del ours[9]
        with pytest.raises(KeyError):
            ours[9]


def test_neighbors_refuse_unhashable_keys_and_keep_equal_keys_as_one() -> None:
    ours = Neighbors()
    with pytest.raises(TypeError):
        ours[[1]] = 1
    ours[1] = "a"
    ours[1.0] = "b"  # 1 == 1.0: one key, as in a dict
    assert list(ours.items()) == [(1, "b")]


def _sample(cls: type[nx.DiGraph]) -> nx.DiGraph:
    g = cls()
    g.add_edges_from([("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("c", "a", {"w": 2}), ("d", "d")])
    return g


def test_a_compact_graph_answers_as_a_plain_digraph() -> None:
    plain, ours = _sample(nx.DiGraph), _sample(CompactDiGraph)
    assert isinstance(ours, nx.DiGraph)
    assert list(ours.edges(data=True)) == list(plain.edges(data=True))
    assert list(ours.in_edges(data=True)) == list(plain.in_edges(data=True))
    assert dict(ours.in_degree) == dict(plain.in_degree) and dict(ours.out_degree) == dict(plain.out_degree)
    assert nx.shortest_path(ours, "b", "d") == nx.shortest_path(plain, "b", "d") == ["b", "c", "a", "d"]
    assert nx.node_link_data(ours, edges="edges") == nx.node_link_data(plain, edges="edges")
    for twin in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours), ours.copy(), ours.reverse().reverse()):
        assert nx.utils.graphs_equal(twin, plain)
        assert list(twin.edges) == list(plain.edges)
    ours.remove_node("a")
    plain.remove_node("a")
    ours.remove_edge("b", "c")
    plain.remove_edge("b", "c")
    assert list(ours.edges) == list(plain.edges) and list(ours.pred["c"]) == list(plain.pred["c"])


@pytest.mark.parametrize("name", ["choice_nested_depth", "threads_deadlock_sometimes"])
def test_an_explored_graph_exports_as_its_plain_copy(name: str) -> None:
    path: Path = next(p for p in SCENARIOS if p.stem == name)
    graph = Explorer(load_scenario(path), "bfs").run().graph
    assert type(graph.lean) is CompactDiGraph
    plain = nx.DiGraph(graph.lean)  # every adjacency map a dict
    assert list(plain.edges(data=True)) == list(graph.lean.edges(data=True))
    assert list(plain.in_edges) == list(graph.lean.in_edges)
    assert nx.node_link_data(plain, edges="edges") == nx.node_link_data(graph.lean, edges="edges")
