"""Pictures of a run: a swimlane timeline, the state graph, a disassembly panel (matplotlib).

Lanes, top to bottom: ``user d0``, ``kernel d0``, ``user d1``, ``kernel d1``, … — the
thread's mode and how many callbacks are in progress. Each callback goes one step down
the page (kernel dN → user dN+1), each completed callback back up, so the picture of
nested callbacks is the callback stack growing and shrinking. A thread's end (``exit``,
``fault``) is drawn on the lane it ended in, not on a lane of its own.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot,
so importing this module changes no backend and leaves no global figure state; in a
notebook ``%matplotlib inline`` shows them. Sizes follow from the trace, fonts are
DejaVu Sans (shipped with matplotlib) and :func:`save_figure` strips dates and version
strings, so the same run gives byte-identical SVG and PNG files.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import matplotlib
import networkx as nx
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch
from matplotlib.ticker import MaxNLocator

from emu.graph import StateGraph
from emu.trace import Trace, Transition
from emu.viz_text import (
    disassembly,
    register_diff,
    register_table,
    register_table_html,
    stack_panel,
    state_html,
    trace_html,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from emu.engine import Run
    from emu.trace import State

__all__ = [
    "disassembly", "disassembly_figure", "lanes", "register_diff", "register_table", "register_table_html",
    "save_figure", "stack_panel", "state_graph", "state_html", "timeline", "trace_html", "transition_label",
]  # fmt: skip

FONT = "DejaVu Sans"
MONO = "DejaVu Sans Mono"
DPI = 100
LABEL_SIZE = 7.5
TITLE_SIZE = 9
LANE_H = 0.42  # inches per lane
STEP_W = 0.42  # inches per transition step (a rotated label is ~0.12 in wide)
MIN_PLOT_W = 5.2
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 1.15, 0.3, 0.85, 0.5

KIND_COLORS: dict[str, str] = {
    "syscall": "#4477AA",
    "sysret": "#228833",
    "callback": "#AA3377",
    "callback_return": "#882255",
    "exit": "#333333",
    "fault": "#CC3311",
    "exception": "#EE3377",
    "continue": "#009988",
    "unwind": "#33BBEE",
}
KIND_LEGEND = {"callback_return": "callback return"}
STATE_COLOR = "#555555"
PENDING_COLOR = "#EE7733"
PENDING_LABEL = "callback-return pending"
KERNEL_BAND = "#EEF2F8"
NODE_FACE = {"pending": PENDING_COLOR, "kernel": "#DDE8FF", "user": "#F2F2F2", "exited": "#FFFFFF"}

# Fixed rcParams for creating and saving: the font is resolved when text is created and
# again when ticks are laid out at save time, and svg.hashsalt makes SVG ids repeatable.
STYLE: dict[str, Any] = {
    "font.family": FONT,
    "font.size": 8,
    "svg.hashsalt": "emu",
    "svg.fonttype": "path",
}
# None drops the key: no creation date, no matplotlib version in the file.
_METADATA: dict[str, dict[str, Any]] = {"svg": {"Date": None, "Creator": None}, "png": {"Software": None}}


@contextmanager
def _style() -> Iterator[None]:
    # cast: newer matplotlib types rc keys as a Literal of every known name.
    with matplotlib.rc_context(cast(Any, STYLE)):
        yield


def save_figure(fig: Figure, target: str | Path | IO[bytes], fmt: str | None = None, dpi: int = DPI) -> None:
    """Save a figure byte-for-byte reproducibly (fixed DPI, fonts, SVG ids; no date or version).

    ``fmt`` is ``"png"`` or ``"svg"``; by default the path's extension. ``dpi`` sets the
    PNG's resolution (an SVG is the same at any).
    """
    if fmt is None:
        if not isinstance(target, str | Path):
            raise ValueError("save_figure: give fmt when saving to a file object")
        fmt = Path(target).suffix.lower().lstrip(".")
    if fmt not in _METADATA:
        raise ValueError(f"save_figure: unknown format {fmt!r} (use png or svg)")
    with _style():
        fig.savefig(target, format=fmt, dpi=dpi, metadata=_METADATA[fmt])


# --- layout ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lanes:
    """The lanes of a picture, top to bottom: (thread, mode, depth) for every depth a thread reached."""

    keys: tuple[tuple[int, str, int], ...]

    def index(self, thread: int, mode: str, depth: int) -> int:
        return self.keys.index((thread, mode, depth))

    def labels(self) -> list[str]:
        many = len({k[0] for k in self.keys}) > 1
        return [f"{f'T{t} ' if many else ''}{mode} d{depth}" for t, mode, depth in self.keys]


def lanes(depths: dict[int, int]) -> Lanes:
    """Lanes for threads reaching the given maximum depths: user d0, kernel d0, user d1, …

    >>> lanes({0: 1}).labels()
    ['user d0', 'kernel d0', 'user d1', 'kernel d1']
    """
    keys = [(t, m, d) for t in sorted(depths) for d in range(depths[t] + 1) for m in ("user", "kernel")]
    return Lanes(tuple(keys))


def transition_label(kind: str, service: str | None, api: int | None, ssn: int | None = None) -> str:
    """What an arrow says: ``api N`` for a callback and its return, else the service.

    >>> transition_label("callback", "NtUserMessageCall", 2)
    'api 2'
    >>> transition_label("syscall", "NtClose", None)
    'NtClose'
    """
    if kind in ("callback", "callback_return") and api is not None:
        return f"api {api}"
    if service:
        return service
    return f"ssn {ssn:#x}" if ssn is not None else kind


@functools.cache
def _text_length(text: str, size: float = LABEL_SIZE, family: str = FONT) -> float:
    """Length of a text in inches as Agg lays it out (layout is decided before any figure exists)."""
    w, _, _ = _measurer().get_text_width_height_descent(text, FontProperties(family=family, size=size), ismath=False)
    return float(w) / DPI


@functools.cache
def _measurer() -> Any:
    agg: Any = RendererAgg  # matplotlib's Agg backend carries no annotations
    return agg(1, 1, DPI)


def _trace_of(run: Run | Trace) -> tuple[Trace, str]:
    if isinstance(run, Trace):
        return run, "trace"
    return run.trace, run.scenario.name


def _new_axes(width: float, height: float, plot_w: float, plot_h: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((MARGIN_LEFT / width, MARGIN_BOTTOM / height, plot_w / width, plot_h / height))
    return fig, ax


def _root_figure(ax: Axes) -> Figure:
    """The figure an axes belongs to (through a SubFigure to its root)."""
    root = ax.figure.figure  # a Figure is its own .figure; a SubFigure's is the root
    if not isinstance(root, Figure):
        raise TypeError("the axes belong to no figure")
    return root


def _draw_lanes(ax: Axes, lane_set: Lanes, x0: float, x1: float, ys: list[float] | None = None) -> None:
    labels = lane_set.labels()
    at = ys if ys is not None else [float(i) for i in range(len(labels))]
    for y, (_, mode, _) in zip(at, lane_set.keys, strict=True):
        if mode == "kernel":
            ax.axhspan(y - 0.5, y + 0.5, color=KERNEL_BAND, lw=0, zorder=0)
        ax.axhline(y, color="#D0D0D0", lw=0.6, ls=(0, (2, 3)), zorder=0.5)
    ax.set_yticks(at, labels)
    ax.tick_params(axis="y", length=0)
    ax.set_ylabel("mode, callback depth dN", fontsize=7.5, color="#555555")
    ax.set_xlim(x0, x1)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _legend(ax: Axes, kinds: list[str], pending: bool, state_label: str, marker: str = "") -> None:
    handles = [Line2D([], [], color=KIND_COLORS[k], lw=1.6, label=KIND_LEGEND.get(k, k)) for k in kinds]
    if marker:
        handles.append(Line2D([], [], ls="", marker=marker, ms=9, mfc="#F2F2F2", mec=STATE_COLOR, label=state_label))
        if pending:
            handles.append(Line2D([], [], ls="", marker=marker, ms=9, mfc=PENDING_COLOR, mec="#A04000",
                                  mew=1.8, label=PENDING_LABEL))  # fmt: skip
    else:
        handles.append(Line2D([], [], color=STATE_COLOR, lw=4, label=state_label))
        if pending:
            handles.append(Line2D([], [], color=PENDING_COLOR, lw=7, label=PENDING_LABEL))
    ax.legend(
        handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=math.ceil(len(handles) / 2),
        frameon=False, fontsize=7.5, handlelength=2.0, borderaxespad=0.3, columnspacing=1.2,
    )  # fmt: skip


# --- timeline ----------------------------------------------------------------------------
def timeline(run: Run | Trace, ax: Axes | None = None) -> Figure:
    """A swimlane timeline: one lane per (mode, callback depth), one arrow per transition.

    x is the transition step. Each state is a bar on its lane between the transitions
    that enter and leave it; the states where the thread is at ZwCallbackReturn
    (``pending``) are orange and named ``sN``. Each arrow is labelled with its service,
    or ``api N`` for a callback and its return, and coloured by kind.

    Artists carry ids (``gid``) that name what they draw — ``transition-<step>``,
    ``label-<step>``, ``state-s<id>``, ``pending-s<id>`` — which the SVG keeps.

    Args:
        run: a Run (or its Trace).
        ax: draw into these axes instead of a new figure sized to the trace.

    Returns:
        The figure drawn into.
    """
    trace, name = _trace_of(run)
    states, transitions = trace.states, trace.transitions
    entered: dict[int, int] = {}
    left: dict[int, int] = {}
    for t in transitions:
        entered.setdefault(t.dst, t.step)
        left.setdefault(t.src, t.step)
    lane_set = lanes(_max_depths(trace))
    lane_of: dict[int, int] = {}
    for s in states:
        if s.mode != "exited":
            lane_of[s.id] = lane_set.index(s.thread, s.mode, s.depth)
    for t in transitions:
        if t.dst not in lane_of:  # the thread ended on the lane it was in
            lane_of[t.dst] = lane_of[t.src]

    n = len(lane_set.keys)
    last = max((t.step for t in transitions), default=0)
    x0, x1 = -0.8, last + 1.1
    refused = {t.step: _refusal(t) for t in transitions if _refusal(t)}
    sides, pads = _label_sides(transitions, lane_of, lane_set, refused)
    offset: dict[int, float] = {}
    below = 0.0
    for tid in sorted(pads):
        offset[tid] = below
        below += pads[tid]
    ys = [i + offset[k[0]] for i, k in enumerate(lane_set.keys)]
    lane_y = {sid: ys[i] for sid, i in lane_of.items()}
    pending = [s for s in states if s.pending]
    waiting = {0: "no state", 1: "1 state"}.get(len(pending), f"{len(pending)} states")
    depth = max((s.depth for s in states), default=0)
    title = f"{name}: {len(transitions)} transitions, callback depth up to {depth}, {waiting} at ZwCallbackReturn (callback-return pending)"

    with _style():
        if ax is None:
            plot_w = max(STEP_W * (x1 - x0), MIN_PLOT_W, _text_length(title, TITLE_SIZE) + 0.1)
            plot_h = LANE_H * (n + below)
            width = MARGIN_LEFT + plot_w + MARGIN_RIGHT
            fig, ax = _new_axes(width, MARGIN_TOP + plot_h + MARGIN_BOTTOM, plot_w, plot_h)
        else:
            fig = _root_figure(ax)
        _draw_lanes(ax, lane_set, x0, x1, ys)
        ax.set_ylim(n - 0.5 + below, -0.5)  # lane 0 at the top

        for s in states:
            if s.mode == "exited":
                continue
            xa = entered.get(s.id, x0 + 0.2)
            xb = left.get(s.id, xa + 0.6)
            y = lane_y[s.id]
            if s.pending:
                ax.plot([xa, xb], [y, y], color=PENDING_COLOR, lw=7, solid_capstyle="butt", zorder=2,
                        gid=f"pending-s{s.id}")  # fmt: skip
                ax.text((xa + xb) / 2, y - 0.3, f"s{s.id}", ha="center", va="bottom", fontsize=7,
                        color="#A04000", fontweight="bold", gid=f"pending-label-s{s.id}")  # fmt: skip
            else:
                ax.plot([xa, xb], [y, y], color=STATE_COLOR, lw=3.5, solid_capstyle="butt", zorder=2,
                        gid=f"state-s{s.id}")  # fmt: skip

        for t in transitions:
            color = KIND_COLORS.get(t.kind, "#000000")
            ya, yb = lane_y[t.src], lane_y[t.dst]
            x = float(t.step)
            if ya == yb:  # the thread's end (exit, fault): along its last lane to an end marker
                head = (x + 0.6, ya)
                arrow = FancyArrowPatch((x, ya), head, arrowstyle="-|>", mutation_scale=9, lw=1.4, color=color,
                                        shrinkA=0, shrinkB=3, zorder=3, gid=f"transition-{t.step}")  # fmt: skip
                if t.kind in ("exit", "fault"):
                    ax.plot(*head, marker="X", ms=7, color=color, zorder=4, gid=f"end-s{t.dst}")
                x = head[0]
            else:
                arrow = FancyArrowPatch((x, ya), (x, yb), arrowstyle="-|>", mutation_scale=9, lw=1.4, color=color,
                                        shrinkA=2, shrinkB=2, zorder=3, gid=f"transition-{t.step}")  # fmt: skip
            ax.add_patch(arrow)
            side, label_y = sides[t.step]
            label_y += offset[t.thread]
            ax.text(x, label_y, transition_label(t.kind, t.service, t.api, t.ssn), rotation=90, ha="center",
                    va="bottom" if side == "above" else "top", fontsize=LABEL_SIZE, color=color,
                    gid=f"label-{t.step}")  # fmt: skip

            if t.step in refused:  # drawn where the thread waited in the kernel for the refused callback
                side, label_y = sides[-1 - t.step]
                ax.text(float(t.step) - 0.5, label_y + offset[t.thread], refused[t.step], rotation=90, ha="center",
                        va="bottom" if side == "above" else "top", fontsize=LABEL_SIZE, color=KIND_COLORS["fault"],
                        fontweight="bold", gid=f"refused-{t.step}")  # fmt: skip

        if last <= 80:
            ax.set_xticks(range(last + 1))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("step", fontsize=8)
        kinds = [k for k in KIND_COLORS if any(t.kind == k for t in transitions)]
        _legend(ax, kinds, bool(pending), "a state of the thread")
        ax.set_title(title, loc="left", fontsize=TITLE_SIZE, pad=34)
    return fig


def _refusal(t: Transition) -> str:
    """``api N refused: STATUS_…`` for a service's return after the kernel refused its callback, else ''."""
    # emu/kernel/core.py words the refusal "callback api N refused: STATUS_… (why)" in the detail
    if t.kind != "sysret" or "refused:" not in t.detail:
        return ""
    what = t.detail[t.detail.index("callback api ") :] if "callback api " in t.detail else t.detail
    return what.removeprefix("callback ").split(" (")[0]


def _label_sides(
    transitions: list[Transition], lane_of: dict[int, int], lane_set: Lanes, refused: dict[int, str]
) -> tuple[dict[int, tuple[str, float]], dict[int, float]]:
    """Where each arrow's label starts (in lane units), and how much room to add below each thread's lanes.

    A label runs vertically from its arrow's end into the lanes of its own thread that the
    thread is not in at that step (a thread is in one lane at a time, so that column is
    free; other threads' lanes hold their own bars and labels): to the side with the more
    room when it fits there, else to the other, else below with extra room under that
    thread's lanes. The label of a thread's end starts past the end marker. A refused
    callback's status (key ``-1 - step``) runs from the kernel lane the thread waited in.
    """
    first: dict[int, int] = {}
    end: dict[int, int] = {}
    for i, (tid, _, _) in enumerate(lane_set.keys):
        first.setdefault(tid, i)
        end[tid] = i
    sides: dict[int, tuple[str, float]] = {}
    pads = dict.fromkeys(first, 0.0)

    def place(key: int, tid: int, ya: int, yb: int, gap: float, text: str) -> None:
        top, bottom = min(ya, yb), max(ya, yb)
        room_above, room_below = top - first[tid] + 0.5 - gap, end[tid] + 0.5 - bottom - gap
        need = _text_length(text) / LANE_H
        if need <= room_above and (need > room_below or room_above >= room_below):
            sides[key] = ("above", top - gap)
        else:
            sides[key] = ("below", bottom + gap)
            pads[tid] = max(pads[tid], need - room_below)

    for t in transitions:
        ya, yb = lane_of[t.src], lane_of[t.dst]
        place(t.step, t.thread, ya, yb, 0.34 if ya == yb else 0.16, transition_label(t.kind, t.service, t.api, t.ssn))
        if t.step in refused:
            place(-1 - t.step, t.thread, ya, ya, 0.16, refused[t.step])
    return sides, pads


def _max_depths(trace: Trace) -> dict[int, int]:
    depths: dict[int, int] = {}
    for s in trace.states:
        depths[s.thread] = max(depths.get(s.thread, 0), s.depth)
    return depths


# --- state graph -------------------------------------------------------------------------
def state_graph(graph_or_run: StateGraph | Run, ax: Axes | None = None, name: str | None = None) -> Figure:
    """The state graph drawn in layers: x = step order, y = lane (mode and callback depth).

    The title names the scenario: ``name``, or the run's scenario. An explored graph
    (edges without steps, from :func:`emu.explore.explore`) is titled as every option's.

    A node is a state (``sN``; pending states orange), an edge a transition coloured by
    kind. Built from the graph's node and edge attributes only, so an explored graph
    with branches draws too: nodes that land on one spot are spread along their lane.
    Artists carry ids ``node-s<id>``, ``pending-s<id>`` and ``edge-<step>``.
    """
    if isinstance(graph_or_run, StateGraph):
        g = graph_or_run
    else:
        g, name = graph_or_run.graph, name or graph_or_run.scenario.name
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

    with _style():
        if ax is None:
            plot_w = max(STEP_W * 1.2 * (x1 + 0.7), MIN_PLOT_W)
            plot_h = LANE_H * n
            fig, ax = _new_axes(
                MARGIN_LEFT + plot_w + MARGIN_RIGHT, MARGIN_TOP + plot_h + MARGIN_BOTTOM, plot_w, plot_h
            )
        else:
            fig = _root_figure(ax)
        _draw_lanes(ax, lane_set, -0.7, x1)
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
        _legend(ax, kinds, any(d.get("pending") for d in nodes.values()), "state", marker="o")
        what = "explored state graph (every option)" if explored else "state graph"
        title = f"{f'{name}: ' if name else ''}{what}: {len(nodes)} states, {len(edges)} transitions"
        ax.set_title(title, loc="left", fontsize=TITLE_SIZE, pad=34)
    return fig


# --- disassembly panel -------------------------------------------------------------------
def disassembly_figure(run: Run, state: State, before: int = 6, after: int = 6) -> Figure:
    """:func:`emu.viz_text.disassembly` as a figure: a monospace panel, the ``=>`` line highlighted."""
    lines = disassembly(run, state, before, after).rstrip("\n").splitlines()
    line_h = 0.17
    width = 0.5 + max(_text_length(s, 8, MONO) for s in lines)
    height = 0.3 + line_h * len(lines)
    with _style():
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
