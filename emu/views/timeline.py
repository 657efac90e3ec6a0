"""The swimlane timeline of a run (matplotlib): one lane per (mode, callback depth), one arrow per transition.

Lanes, top to bottom: ``user d0``, ``kernel d0``, ``user d1``, ``kernel d1``, … — the
thread's mode and how many callbacks are in progress. Each callback goes one step down
the page (kernel dN → user dN+1), each completed callback back up, so the picture of
nested callbacks is the callback stack growing and shrinking. A thread's end (``exit``,
``fault``) is drawn on the lane it ended in, not on a lane of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from emu.trace import Trace, Transition
from emu.views.figure import (
    KIND_COLORS,
    LABEL_SIZE,
    LANE_H,
    MARGIN_BOTTOM,
    MARGIN_LEFT,
    MARGIN_RIGHT,
    MARGIN_TOP,
    MIN_PLOT_W,
    PENDING_COLOR,
    STATE_COLOR,
    STEP_W,
    TITLE_SIZE,
    Lanes,
    draw_lanes,
    figure_style,
    lanes,
    legend,
    new_axes,
    root_figure,
    text_length,
    transition_label,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from emu.engine import RunResult

__all__ = ["max_depths", "timeline"]


def _trace_of(run: RunResult | Trace) -> tuple[Trace, str]:
    if isinstance(run, Trace):
        return run, "trace"
    return run.trace, run.scenario.name


# --- timeline ----------------------------------------------------------------------------
def timeline(run: RunResult | Trace, ax: Axes | None = None) -> Figure:
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
    lane_set = lanes(max_depths(trace))
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

    with figure_style():
        if ax is None:
            plot_w = max(STEP_W * (x1 - x0), MIN_PLOT_W, text_length(title, TITLE_SIZE) + 0.1)
            plot_h = LANE_H * (n + below)
            width = MARGIN_LEFT + plot_w + MARGIN_RIGHT
            fig, ax = new_axes(width, MARGIN_TOP + plot_h + MARGIN_BOTTOM, plot_w, plot_h)
        else:
            fig = root_figure(ax)
        draw_lanes(ax, lane_set, x0, x1, ys)
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

            if t.step in refused:  # drawn where the thread was in the kernel when the callback was refused
                side, label_y = sides[-1 - t.step]
                ax.text(float(t.step) - 0.5, label_y + offset[t.thread], refused[t.step], rotation=90, ha="center",
                        va="bottom" if side == "above" else "top", fontsize=LABEL_SIZE, color=KIND_COLORS["fault"],
                        fontweight="bold", gid=f"refused-{t.step}")  # fmt: skip

        if last <= 80:
            ax.set_xticks(range(last + 1))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("step", fontsize=8)
        kinds = [k for k in KIND_COLORS if any(t.kind == k for t in transitions)]
        legend(ax, kinds, bool(pending), "a state of the thread")
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
    callback's status (key ``-1 - step``) runs from the kernel lane the thread was in.
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
        need = text_length(text) / LANE_H
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


def max_depths(trace: Trace) -> dict[int, int]:
    depths: dict[int, int] = {}
    for s in trace.states:
        depths[s.thread] = max(depths.get(s.thread, 0), s.depth)
    return depths
