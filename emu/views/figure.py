"""What every picture of emu shares: fonts, colours, lanes, legends and reproducible saving.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot,
so importing this module changes no backend and leaves no global figure state. Sizes
follow from the data, fonts are DejaVu Sans (shipped with matplotlib) and
:func:`save_figure` strips dates and version strings, so the same run gives
byte-identical SVG and PNG files.
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
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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
def figure_style() -> Iterator[None]:
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
    with figure_style():
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
def text_length(text: str, size: float = LABEL_SIZE, family: str = FONT) -> float:
    """Length of a text in inches as Agg lays it out (layout is decided before any figure exists)."""
    w, _, _ = _measurer().get_text_width_height_descent(text, FontProperties(family=family, size=size), ismath=False)
    return float(w) / DPI


@functools.cache
def _measurer() -> Any:
    agg: Any = RendererAgg  # matplotlib's Agg backend carries no annotations
    return agg(1, 1, DPI)


def new_axes(width: float, height: float, plot_w: float, plot_h: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((MARGIN_LEFT / width, MARGIN_BOTTOM / height, plot_w / width, plot_h / height))
    return fig, ax


def root_figure(ax: Axes) -> Figure:
    """The figure an axes belongs to (through a SubFigure to its root)."""
    root = ax.figure.figure  # a Figure is its own .figure; a SubFigure's is the root
    if not isinstance(root, Figure):
        raise TypeError("the axes belong to no figure")
    return root


def draw_lanes(ax: Axes, lane_set: Lanes, x0: float, x1: float, ys: list[float] | None = None) -> None:
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


def legend(ax: Axes, kinds: list[str], pending: bool, state_label: str, marker: str = "") -> None:
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
