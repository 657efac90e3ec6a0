"""The pictures and panels show what happened: lanes, arrows, labels, pending states, frames."""

from __future__ import annotations

import argparse
import importlib.util
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import emu
from conftest import SCENARIOS, asm_scenario
from emu.api import Run
from emu.cli.plot import add_parser, cmd_plot
from emu.exploration.explorer import explore
from emu.views import viz
from emu.winnt import STATUS_INVALID_HANDLE


def gids(ax: Axes, prefix: str) -> list[str]:
    """Ids of the artists drawn into ``ax`` whose id starts with ``prefix``."""
    return sorted(g for a in ax.get_children() if (g := a.get_gid()) and g.startswith(prefix))


def texts(ax: Axes, prefix: str) -> dict[str, str]:
    return {gid: t.get_text() for t in ax.texts if (gid := t.get_gid()) is not None and gid.startswith(prefix)}


def expected_lanes(depth: int) -> list[str]:
    return [f"{m} d{d}" for d in range(depth + 1) for m in ("user", "kernel")]


# --- timeline ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [p.stem for p in SCENARIOS])
def test_timeline_draws_one_arrow_per_transition_and_marks_pending_states(
    shipped_runs: dict[str, Run], name: str
) -> None:
    r = shipped_runs[name]
    fig = viz.timeline(r)
    ax = fig.axes[0]
    tids = sorted({s.thread for s in r.trace.states})
    want: list[str] = []
    for tid in tids:
        depth = max(s.depth for s in r.trace.states if s.thread == tid)
        prefix = f"T{tid} " if len(tids) > 1 else ""
        want += [prefix + lane for lane in expected_lanes(depth)]
    assert [t.get_text() for t in ax.get_yticklabels()] == want
    assert len(gids(ax, "transition-")) == len(r.trace)
    labels = texts(ax, "label-")
    assert len(labels) == len(r.trace)
    for t in r.trace:
        # An exception, an unwind or a process's end has no service: the arrow says its kind.
        label = f"api {t.api}" if t.kind in ("callback", "callback_return") else (t.service or t.kind)
        assert labels[f"label-{t.step}"] == label
    pending = [s for s in r.trace.states if s.pending]
    assert gids(ax, "pending-s") == sorted(f"pending-s{s.id}" for s in pending)
    box = ax.get_legend()
    assert box is not None
    legend = [t.get_text() for t in box.get_texts()]
    assert ("callback-return pending" in legend) == bool(pending)


def test_pending_states_sit_on_the_kernel_lane_of_their_depth(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["nested_callbacks"]
    ax = viz.timeline(r).axes[0]
    lanes = [t.get_text() for t in ax.get_yticklabels()]
    bars = {a.get_gid(): a for a in ax.get_lines() if (a.get_gid() or "").startswith("pending-s")}
    assert len(bars) == 3
    for s in r.trace.states:
        if s.pending:
            ys = set(bars[f"pending-s{s.id}"].get_ydata())  # type: ignore[arg-type]
            assert ys == {lanes.index(f"kernel d{s.depth}")}
    # every pending state is named where it is drawn, so it can be matched with r.detections
    assert set(texts(ax, "pending-label-").values()) == {f"s{d.state}" for d in r.detections}


def test_nested_timeline_labels_name_every_service_and_api(shipped_runs: dict[str, Run]) -> None:
    ax = viz.timeline(shipped_runs["nested_callbacks"]).axes[0]
    assert set(texts(ax, "label-").values()) == {
        "NtUserMessageCall", "NtUserCallOneParam", "NtUserCallNoParam", "NtCallbackReturn", "NtTerminateThread",
        "api 2", "api 3", "api 4",
    }  # fmt: skip


def test_timeline_draws_into_given_axes(shipped_runs: dict[str, Run]) -> None:
    fig = Figure()
    ax = fig.add_subplot()
    assert viz.timeline(shipped_runs["callback_roundtrip"], ax=ax) is fig
    assert len(gids(ax, "transition-")) == 7


def test_same_scenario_gives_byte_identical_svg_and_png(root: Path) -> None:
    out = []
    for _ in range(2):
        r = emu.run(root / "scenarios" / "nested_callbacks.toml")  # two separate runs
        svg, png = io.BytesIO(), io.BytesIO()
        viz.save_figure(viz.timeline(r), svg, "svg")
        viz.save_figure(viz.timeline(r), png, "png")
        out.append((svg.getvalue(), png.getvalue()))
    assert out[0] == out[1]
    svg_text = out[0][0].decode()
    assert "<dc:date>" not in svg_text and "Matplotlib v" not in svg_text
    assert svg_text.count('id="transition-') == 17
    assert svg_text.count('id="pending-s') == 3


def test_a_fault_ends_the_thread_on_the_lane_it_was_in(tmp_path: Path) -> None:
    path = tmp_path / "fault.toml"
    path.write_text(
        asm_scenario(
            "main:\n sub rsp, 0x28\n call NtUserMessageCall\n add rsp, 0x28\n ret\non_message:\n int3",
            table='[kernel_callback_table]\nsize = 4\n2 = "app!on_message"',
            services='[services.NtUserMessageCall]\nsteps = [{ kind = "callback", api = 2 }, { kind = "return", status = 0 }]',
            extra='[machine]\nexceptions = "stop"',  # the old stop at the first fault
        )
    )
    r = emu.run(path)
    assert [t.kind for t in r.trace] == ["syscall", "callback", "fault"]
    ax = viz.timeline(r).axes[0]
    assert len(gids(ax, "transition-")) == 3 and texts(ax, "label-")["label-2"] == "fault"
    (end,) = [a for a in ax.get_lines() if a.get_gid() == f"end-s{r.trace.transitions[2].dst}"]
    lanes = [t.get_text() for t in ax.get_yticklabels()]
    assert list(end.get_ydata()) == [lanes.index("user d1")]  # type: ignore[arg-type]
    # RIP is past the int3, where nothing decodes: still exactly one line is marked
    marked = [line for line in viz.disassembly(r, r.trace.states[-1]).splitlines() if line.startswith("=>")]
    assert len(marked) == 1 and "app!on_message+0x1" in marked[0]


# --- state graph -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nested_callbacks", "callback_depth_overflow", "syscall_basic"])
def test_state_graph_draws_every_state_and_transition(shipped_runs: dict[str, Run], name: str) -> None:
    r = shipped_runs[name]
    ax = viz.state_graph(r).axes[0]
    pending = [s for s in r.trace.states if s.pending]
    nodes = gids(ax, "node-s") + gids(ax, "pending-s")
    assert len(nodes) == len(r.trace.states)
    assert gids(ax, "pending-s") == sorted(f"pending-s{s.id}" for s in pending)
    assert len(gids(ax, "edge-")) == len(r.trace)
    tids = sorted({s.thread for s in r.trace.states})
    want: list[str] = []
    for tid in tids:
        depth = max(s.depth for s in r.trace.states if s.thread == tid)
        prefix = f"T{tid} " if len(tids) > 1 else ""
        want += [prefix + lane for lane in expected_lanes(depth)]
    assert [t.get_text() for t in ax.get_yticklabels()] == want


def test_state_graph_takes_a_state_graph(shipped_runs: dict[str, Run]) -> None:
    ax = viz.state_graph(shipped_runs["callback_roundtrip"].graph).axes[0]
    assert gids(ax, "pending-s") == ["pending-s3"]


# --- disassembly -------------------------------------------------------------------------
def test_disassembly_marks_the_instruction_after_the_syscall(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["callback_roundtrip"]
    state = next(s for s in r.trace.states if s.pending)
    lines = viz.disassembly(r, state).splitlines()
    marked = [i for i, line in enumerate(lines) if line.startswith("=>")]
    assert len(marked) == 1
    current = lines[marked[0]]
    assert "ntdll!ZwCallbackReturn+0x14" in current and current.endswith("ret")
    assert "0f 05" in lines[marked[0] - 1] and lines[marked[0] - 1].endswith("syscall")
    assert marked[0] == 7  # the header, then 6 instructions before
    assert len(lines) == 1 + 6 + 1 + 6
    assert all("!" in line for line in lines[1:])  # every line names module!symbol


def test_disassembly_figure_highlights_one_line(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["nested_callbacks"]
    fig = viz.disassembly_figure(r, r.trace.state(2), before=2, after=3)
    ax = fig.axes[0]
    assert gids(ax, "current") == ["current"]
    shown = [t.get_text() for t in ax.texts]
    assert sum(line.startswith("=> ") for line in shown) == 1
    assert any("ntdll!KiUserCallbackDispatcher " in line and line.startswith("=>") for line in shown)


# --- registers ---------------------------------------------------------------------------
def test_register_diff_across_a_sysret_is_rax_only(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["syscall_basic"]
    entry, back = r.trace.transitions[0], r.trace.transitions[1]
    kernel, user = r.trace.state(entry.dst), r.trace.state(back.dst)
    assert viz.register_diff(kernel, user) == [("rax", entry.ssn, STATUS_INVALID_HANDLE)]
    table = viz.register_table(viz.register_diff(kernel, user), r.symbolize)
    assert "STATUS_INVALID_HANDLE" in table and table.splitlines()[1].startswith("rax")
    assert "<td><code>rax</code></td>" in viz.register_table_html(viz.register_diff(kernel, user))


def test_register_diff_into_the_kernel_shows_what_syscall_did(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["syscall_basic"]
    start, kernel = r.trace.state(0), r.trace.state(1)
    diff = {name: new for name, _, new in viz.register_diff(start, kernel)}
    assert diff["rcx"] == kernel.rip  # SYSCALL: RCX <- the next RIP
    assert diff["r11"] == kernel.context.rflags  # SYSCALL: R11 <- RFLAGS
    assert diff["r10"] == 0x1234  # the stub's `mov r10, rcx`: the handle
    assert "ntdll!ZwClose+0x14" in viz.register_table(viz.register_diff(start, kernel), r.symbolize)


# --- stack -------------------------------------------------------------------------------
def _line(panel: str, needle: str) -> str:
    hits = [line for line in panel.splitlines() if needle in line]
    assert len(hits) == 1, panel
    return hits[0]


def test_stack_panel_at_the_dispatcher_entry_shows_the_ucallout_frame(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["callback_roundtrip"]
    state = r.trace.state(r.trace.transitions[1].dst)  # the callback transition's state
    assert r.symbolize(state.rip) == "ntdll!KiUserCallbackDispatcher"
    panel = viz.stack_panel(r, state)
    assert _line(panel, "ApiNumber").split()[0] == "rsp+0x028"
    assert "ApiNumber = 2" in _line(panel, "ApiNumber")
    assert "MachineFrame.Rip -> win32u!NtUserMessageCall+0x14" in panel
    assert 'input buffer "WM_PAINT"' in panel


def test_stack_panel_at_the_pending_state_names_every_frame(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["nested_callbacks"]
    state = r.trace.state(r.detections[0].state or 0)
    panel = viz.stack_panel(r, state)
    first = panel.splitlines()[1]
    assert first.split()[0] == "rsp+0x000" and "ret -> ntdll!KiUserCallbackDispatcherContinue+0xc" in first
    assert "ApiNumber = 4" in _line(panel, "UCALLOUT_FRAME 1/3 +0x28")
    assert "ApiNumber = 3" in _line(panel, "UCALLOUT_FRAME 2/3 at")
    assert "ApiNumber = 2" in _line(panel, "UCALLOUT_FRAME 3/3 at")


def test_stack_panel_without_callbacks_has_no_frames(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["no_callback_active"]
    panel = viz.stack_panel(r, r.trace.state(1), words=4)
    assert "0 UCALLOUT_FRAME(s)" in panel and "ApiNumber" not in panel
    assert len(panel.splitlines()) == 5


# --- rich display ------------------------------------------------------------------------
def test_html_of_states_and_traces(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["nested_callbacks"]
    page = viz.trace_html(r.trace)
    assert page.count("<tr") == 1 + len(r.trace)
    assert page.count("callback-return pending") == 3
    card = viz.state_html(r.trace.state(7), r.symbolize)
    assert "callback-return pending" in card and "ntdll!ZwCallbackReturn+0x14" in card
    assert "callback-return pending" not in viz.state_html(r.trace.state(6))


# --- emu plot ----------------------------------------------------------------------------
def plot_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="emu")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["plot", *argv])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_plot_every_shipped_scenario(scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, svg = tmp_path / "timeline.png", tmp_path / "graph.svg"
    assert cmd_plot(plot_args(str(scenario), "-o", str(png))) == 0
    assert cmd_plot(plot_args(str(scenario), "-o", str(svg), "--graph")) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    exp = explore(scenario)
    want = exp.graph.lean.number_of_edges() if exp.forks else len(emu.run(scenario).trace)
    assert svg.read_text().count('id="edge-') == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.svg", "timeline.png"]  # no temp files left
    assert "wrote" in capsys.readouterr().out


def test_plot_refuses_an_unknown_extension(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "timeline.pdf"
    assert cmd_plot(plot_args(str(root / "scenarios" / "syscall_basic.toml"), "-o", str(out))) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "timeline.pdf" in err and ".png or .svg" in err
    assert not out.exists()


# --- the README picture ------------------------------------------------------------------
def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_readme_picture_is_generated_by_the_script(root: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_readme_picture", root / "scripts" / "make_readme_picture.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    png = script.render()
    assert png == script.render()  # deterministic
    # Same layout as the committed picture (pixels may differ across matplotlib releases).
    assert _png_size(png) == _png_size((root / "docs" / "timeline.png").read_bytes())


def test_state_graph_draws_an_explored_graph(root) -> None:  # type: ignore[no-untyped-def]
    exp = explore(root / "scenarios/choice_nested_depth.toml")
    ax = viz.state_graph(exp.graph).axes[0]
    assert len(gids(ax, "edge-")) == exp.graph.lean.number_of_edges()
    assert len(gids(ax, "pending-")) == len(exp.pending) == 3


# --- pictures name what they show, and nothing overlaps ----------------------------------
@pytest.mark.parametrize("name", ["choice_nested_depth", "choice_status"])
def test_plot_graph_of_a_choice_scenario_draws_every_option(
    root: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = str(root / "scenarios" / f"{name}.toml")
    exp, r = explore(scenario), emu.run(scenario)
    assert exp.forks and exp.graph.lean.number_of_edges() > len(r.trace)
    every, default = tmp_path / "every.svg", tmp_path / "default.svg"
    assert cmd_plot(plot_args(scenario, "-o", str(every), "--graph")) == 0
    assert "explored state graph" in capsys.readouterr().out
    svg = every.read_text()
    assert svg.count('id="edge-') == exp.graph.lean.number_of_edges()
    assert svg.count('id="pending-n') == len(exp.pending)
    assert cmd_plot(plot_args(scenario, "-o", str(default), "--graph", "--default-run")) == 0
    assert default.read_text().count('id="edge-') == len(r.trace)
    # the picture is not the nested_callbacks one, and it is the same every time
    pngs = []
    for i, which in enumerate([scenario, scenario, str(root / "scenarios" / "nested_callbacks.toml")]):
        png = tmp_path / f"{i}.png"
        assert cmd_plot(plot_args(which, "-o", str(png), "--graph")) == 0
        pngs.append(png.read_bytes())
    assert pngs[0] == pngs[1] != pngs[2]


def test_graph_and_timeline_titles_name_the_scenario(root: Path, shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["nested_callbacks"]
    assert viz.state_graph(r).axes[0].get_title(loc="left").startswith("nested_callbacks: state graph: 18 states")
    assert viz.timeline(r).axes[0].get_title(loc="left").startswith("nested_callbacks: 17 transitions")
    exp = explore(root / "scenarios" / "choice_nested_depth.toml")
    title = viz.state_graph(exp.graph, name=exp.scenario.name).axes[0].get_title(loc="left")
    assert title == "choice_nested_depth: explored state graph (every option): 18 states, 20 transitions"


def _extents(fig: Figure) -> tuple[Axes, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return fig.axes[0], canvas.get_renderer()


@pytest.mark.parametrize("name", ["threads_no_deadlock", "threads_deadlock_sometimes", "callback_depth_overflow"])
def test_timeline_labels_overlap_neither_each_other_nor_a_state(shipped_runs: dict[str, Run], name: str) -> None:
    ax, renderer = _extents(viz.timeline(shipped_runs[name]))
    labels = [t for t in ax.texts if (t.get_gid() or "").startswith(("label-", "refused-"))]
    boxes = [(t.get_gid(), t.get_window_extent(renderer)) for t in labels]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            assert not box_a.overlaps(box_b), (a, b)
    bars = [line for line in ax.get_lines() if (line.get_gid() or "").startswith(("state-s", "pending-s"))]
    for line in bars:
        xa, xb = (float(v) for v in np.asarray(line.get_xdata(), dtype=float))
        y = float(np.asarray(line.get_ydata(), dtype=float)[0])
        (pa, pb) = ax.transData.transform([(xa, y), (xb, y)])
        for gid, box in boxes:
            crosses = box.x0 < pb[0] and pa[0] < box.x1 and box.y0 < pa[1] < box.y1
            assert not crosses, (gid, line.get_gid())


def test_depth_overflow_timeline_shows_the_refused_callback(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["callback_depth_overflow"]
    ax = viz.timeline(r).axes[0]
    (sysret,) = [t for t in r.trace if t.kind == "sysret" and t.depth == 23]
    (note,) = [t for t in ax.texts if (t.get_gid() or "").startswith("refused-")]
    assert note.get_gid() == f"refused-{sysret.step}"
    assert note.get_text() == "api 2 refused: STATUS_STACK_OVERFLOW"
    lanes = [t.get_text() for t in ax.get_yticklabels()]
    x, y = note.get_position()
    assert x == sysret.step - 0.5  # while the thread was in the kernel, refused the callback
    assert abs(y - lanes.index("kernel d23")) < 0.5
