"""Pictures of a run (matplotlib), in one namespace: the state graph and a disassembly panel
drawn here, the swimlane timeline (:mod:`emu.views.timeline`), the text panels
(:mod:`emu.views.text`) and reproducible saving (:mod:`emu.views.figure`).

The state graph is drawn in the timeline's lanes (mode and callback depth), one node per
state. Figures are built on :class:`matplotlib.figure.Figure` directly, never through
pyplot, so importing this module changes no backend and leaves no global figure state;
in a notebook ``%matplotlib inline`` shows them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch
from matplotlib.ticker import MaxNLocator

from emu.graph import StateGraph
from emu.trace import state_html, trace_html
from emu.views.figure import (
    DPI,
    KIND_COLORS,
    LANE_H,
    MARGIN_BOTTOM,
    MARGIN_LEFT,
    MARGIN_RIGHT,
    MARGIN_TOP,
    MIN_PLOT_W,
    MONO,
    NODE_FACE,
    STATE_COLOR,
    STEP_W,
    TITLE_SIZE,
    draw_lanes,
    figure_style,
    lanes,
    legend,
    new_axes,
    root_figure,
    save_figure,
    text_length,
    transition_label,
)
from emu.views.text import (
    disassembly,
    register_diff,
    register_table,
    register_table_html,
    stack_panel,
)
from emu.views.timeline import timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from emu.engine import RunResult
    from emu.trace import State

__all__ = [
    "disassembly", "disassembly_figure", "lanes", "register_diff", "register_table", "register_table_html",
    "save_figure", "stack_panel", "state_graph", "state_html", "timeline", "trace_html", "transition_label",
]  # fmt: skip


# --- state graph -------------------------------------------------------------------------
def state_graph(graph_or_run: StateGraph | RunResult, ax: Axes | None = None, name: str | None = None) -> Figure:
    """The state graph drawn in layers: x = step order, y = lane (mode and callback depth).

    The title names the scenario: ``name``, or the run's scenario. An explored graph
    (edges without steps, from :func:`emu.exploration.explorer.explore`) is titled as every option's.

    A node is a state (``sN``; pending states orange), an edge a transition coloured by
    kind. Built from the graph's node and edge attributes only, so an explored graph
    with branches draws too: nodes that land on one spot are spread along their lane.
    Artists carry ids ``node-s<id>``, ``pending-s<id>`` and ``edge-<step>``.
    """
    if isinstance(graph_or_run, StateGraph):
        g = graph_or_run
    else:
        g, name = StateGraph.from_trace(graph_or_run.trace), name or graph_or_run.scenario.name
    nxg = g.nx
    nodes = dict(nxg.nodes(data=True))
    x_of: dict[str, float] = {}
    pred: dict[str, str] = {}
    explored = not all("step" in d for _, _, d in nxg.edges(data=True))
    if not explored:
        edges = sorted(nxg.edges(data=True), key=lambda e: (int(e[2]["step"]), str(e[0]), str(e[1])))
        for u, v, d in edges:
            if v not in x_of:
                x_of[v] = int(d["step"]) + 1
                pred[v] = u
    else:
        # An explored graph has no steps (a state is reached after different numbers of
        # steps on different paths): place each state at its distance from the start.
        first = next(iter(nxg.nodes), None)
        dist = nx.single_source_shortest_path_length(nxg, first) if first is not None else {}
        ordered = sorted(
            nxg.edges(data=True), key=lambda e: (dist.get(e[1], 0), dist.get(e[0], 0), str(e[0]), str(e[1]))
        )
        edges = [(u, v, {**d, "step": i}) for i, (u, v, d) in enumerate(ordered)]
        for u, v, _ in edges:
            pred.setdefault(v, u)
        x_of = {n: float(k) for n, k in dist.items()}
    depths: dict[int, int] = {}
    for d in nodes.values():
        depths[int(d["thread"])] = max(depths.get(int(d["thread"]), 0), int(d["depth"]))
    lane_set = lanes(depths)

    def lane(node: str) -> int:
        d = nodes[node]
        if d["mode"] == "exited" and node in pred:
            return lane(pred[node])
        mode = "kernel" if d["mode"] == "exited" else str(d["mode"])
        return lane_set.index(int(d["thread"]), mode, int(d["depth"]))

    pos: dict[str, tuple[float, float]] = {}
    taken: dict[tuple[float, int], int] = {}
    for node in sorted(nodes, key=lambda k: (x_of.get(k, 0), len(k), k)):  # s2 before s10
        spot = (x_of.get(node, 0), lane(node))
        k = taken.get(spot, 0)
        taken[spot] = k + 1
        pos[node] = (spot[0], spot[1] + 0.28 * k)
    n = len(lane_set.keys)
    x1 = max((p[0] for p in pos.values()), default=0) + 0.7

    with figure_style():
        if ax is None:
            plot_w = max(STEP_W * 1.2 * (x1 + 0.7), MIN_PLOT_W)
            plot_h = LANE_H * n
            fig, ax = new_axes(MARGIN_LEFT + plot_w + MARGIN_RIGHT, MARGIN_TOP + plot_h + MARGIN_BOTTOM, plot_w, plot_h)
        else:
            fig = root_figure(ax)
        draw_lanes(ax, lane_set, -0.7, x1)
        ax.set_ylim(n - 0.5 + 0.28 * max(0, max(taken.values(), default=1) - 1), -0.5)
        seen: dict[tuple[str, str], int] = {}
        for u, v, d in edges:
            kind = str(d["kind"])
            k = seen[u, v] = seen.get((u, v), -1) + 1
            rad = 0.25 * k  # parallel edges (an explored graph) bend apart
            ax.add_patch(
                FancyArrowPatch(pos[u], pos[v], arrowstyle="-|>", mutation_scale=8, lw=1.2,
                                color=KIND_COLORS.get(kind, "#000000"), shrinkA=7, shrinkB=7, zorder=2,
                                connectionstyle=f"arc3,rad={rad}", gid=f"edge-{d['step']}")
            )  # fmt: skip
        for node, (x, y) in pos.items():
            d = nodes[node]
            pending = bool(d.get("pending"))
            exited = d["mode"] == "exited"
            face = NODE_FACE.get("pending" if pending else str(d["mode"]), "#FFFFFF")
            ax.plot(x, y, marker="X" if exited else "o", ms=15, mfc=face, mec="#A04000" if pending else STATE_COLOR,
                    mew=1.8 if pending else 1.0, zorder=3, gid=f"{'pending' if pending else 'node'}-{node}")  # fmt: skip
            if not exited:
                ax.text(x, y, node, ha="center", va="center", fontsize=6, zorder=4, gid=f"node-label-{node}")
        ax.set_xlabel("step order", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(axis="x", labelsize=7)
        kinds = [k for k in KIND_COLORS if any(e[2]["kind"] == k for e in edges)]
        legend(ax, kinds, any(d.get("pending") for d in nodes.values()), "state", marker="o")
        what = "explored state graph (every option)" if explored else "state graph"
        title = f"{f'{name}: ' if name else ''}{what}: {len(nodes)} states, {len(edges)} transitions"
        ax.set_title(title, loc="left", fontsize=TITLE_SIZE, pad=34)
    return fig


# --- disassembly panel -------------------------------------------------------------------
def disassembly_figure(run: RunResult, state: State, before: int = 6, after: int = 6) -> Figure:
    """:func:`emu.views.text.disassembly` as a figure: a monospace panel, the ``=>`` line highlighted."""
    lines = disassembly(run, state, before, after).rstrip("\n").splitlines()
    line_h = 0.17
    width = 0.5 + max(text_length(s, 8, MONO) for s in lines)
    height = 0.3 + line_h * len(lines)
    with figure_style():
        fig = Figure(figsize=(width, height), dpi=DPI)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        for i, text in enumerate(lines):
            y = 0.15 + line_h * (i + 0.5)
            if text.startswith("=>"):
                ax.axhspan(y - line_h / 2, y + line_h / 2, color="#FFE0A8", lw=0, zorder=0, gid="current")
            ax.text(0.2, y, text, family=MONO, fontsize=8, va="center", fontweight="bold" if i == 0 else "normal",
                    gid=f"line-{i}")  # fmt: skip
    return fig
