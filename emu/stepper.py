"""Step a scenario in Jupyter: a widget over a :class:`~emu.session.Session`, or its static pages.

:class:`Stepper` keeps a session and a snapshot per step (so it can step back) and shows,
after each step, what the step recorded, the timeline so far (:mod:`emu.views.timeline`),
the registers with the ones the step changed, the stack from RSP up with return addresses
and UCALLOUT_FRAMEs named (:func:`emu.views.text.stack_panel`) and the thread's callback
stack. :meth:`Stepper.widget` draws that with ipywidgets (``pip install 'emu[notebooks]'``);
:meth:`Stepper.panel` gives the same as text or HTML, which is what :func:`static_steps`
and a notebook without widgets show: every step, one after another.

>>> from emu.stepper import Stepper
>>> st = Stepper("scenarios/callback_roundtrip.toml")
>>> for _ in range(3):
...     _ = st.step()
>>> print(st.panel(timeline=False).title)
step 3: syscall NtCallbackReturn (user -> kernel) at ntdll!ZwCallbackReturn+0x14 [callback-return pending]
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emu.context import REGISTER_NAMES, UserContext
from emu.scenario import Scenario
from emu.session import Session
from emu.session_snapshot import Snapshot
from emu.trace import State, Trace, Transition
from emu.views.text import register_diff, register_table_html, stack_panel

__all__ = ["Panel", "Stepper", "static_steps"]


@dataclass(frozen=True)
class Panel:
    """What one step shows, as text and as HTML (``timeline_png``: the picture, when drawn)."""

    title: str
    registers: str
    stack: str
    callbacks: str
    registers_html: str
    timeline_png: bytes | None = None

    @property
    def text(self) -> str:
        return "\n".join((self.title, "", self.registers, self.stack, self.callbacks))

    @property
    def html(self) -> str:
        picture = ""
        if self.timeline_png is not None:
            data = base64.b64encode(self.timeline_png).decode("ascii")
            picture = f'<img alt="timeline" src="data:image/png;base64,{data}"/>'
        return (
            f'<div class="emu-step"><h4>{html.escape(self.title)}</h4>{picture}{self.registers_html}'
            f"<pre>{html.escape(self.stack)}</pre><pre>{html.escape(self.callbacks)}</pre></div>"
        )

    def _repr_html_(self) -> str:
        return self.html


class Stepper:
    """A session shown one transition at a time, forwards and back.

    Stepping shows the next recorded transition, and runs the session when nothing more is
    recorded yet (a system call records its entry and what the kernel did next in one go;
    the stepper still shows them one by one, so the state at ZwCallbackReturn gets its own
    step). An instruction step runs the CPU by one instruction and shows it live; going
    back from one restores the snapshot taken before it.

    Args:
        scenario: a scenario (or its path), or a :class:`~emu.session.Session` to drive.
        timeline: draw the timeline up to the shown transition (needs matplotlib).
    """

    def __init__(self, scenario: Scenario | str | Path | Session, timeline: bool = True) -> None:
        self.session = scenario if isinstance(scenario, Session) else Session(scenario)
        self.timeline = timeline
        self.cursor = 0  # transitions shown
        self.live: UserContext | None = None  # after an instruction step: the registers before it
        self.history: list[tuple[Snapshot, int, UserContext | None]] = []

    @property
    def at_end(self) -> bool:
        return self.session.done and self.cursor >= len(self.session.trace)

    # --- driving ------------------------------------------------------------------------
    def step(self) -> Transition | None:
        """Show the next transition (running the session to record it if needed); None at the end."""
        s = self.session
        if self.cursor >= len(s.trace):
            if s.done:
                return None
            s.step()
            if self.cursor >= len(s.trace):
                return None
        self.live = None
        self.cursor += 1
        return s.trace.transitions[self.cursor - 1]

    def step_instruction(self) -> list[Transition]:
        """Run one instruction from where the session stands; show the CPU after it."""
        s = self.session
        if s.done:
            return []
        self.history.append((s.snapshot(), self.cursor, self.live))
        self.live = s.regs.context() if s.started else s.thread.entry_context
        got = s.step_instruction()
        self.cursor = len(s.trace)
        return got

    def back(self) -> bool:
        """One step back (an instruction step is undone by its snapshot): False at the start."""
        if self.live is not None and self.history:
            snap, self.cursor, self.live = self.history.pop()
            self.session.restore(snap)
            return True
        if self.cursor == 0:
            return False
        self.cursor -= 1
        return True

    def restart(self) -> None:
        """Back to the first state."""
        if self.history:
            self.session.restore(self.history[0][0])
            self.history.clear()
        self.cursor, self.live = 0, None

    # --- showing ------------------------------------------------------------------------
    def panel(self, timeline: bool | None = None) -> Panel:
        """What the stepper shows now: a transition, registers, stack, callback stack, and the
        timeline (``timeline``: draw it; by default as the stepper was made)."""
        s = self.session
        trace = s.trace
        if self.live is not None:
            state, before = self._live_state(), self.live
            title = f"instruction step: {s.symbol(state.rip)}" + (f" — the run ended ({s.stop})" if s.done else "")
            new = trace.transitions[self.history[-1][1] :] if self.history else []
            if new:
                title += " (recorded " + ", then ".join(_describe(t, s) for t in new) + ")"
        elif self.cursor == 0:
            state = trace.state(0)
            before = state.context
            title = f"step 0: {s.threads[state.thread].name} starts at {s.symbol(state.rip)}"
        else:
            t = trace.transitions[self.cursor - 1]
            state, before = trace.state(t.dst), trace.state(t.src).context
            title = f"step {self.cursor}: {_describe(t, s)}"
            if self.at_end:
                title += f" — the run ended ({s.stop})"
        diff = register_diff(before, state.context)
        changed = {name for name, _, _ in diff}
        regs = "\n".join(
            f"{'*' if name in changed else ' '} {name:<6} {value:#018x}  {_note(s, name, value)}".rstrip()
            for name, value in zip(REGISTER_NAMES, state.context)
        )
        result = s.process.result(None, "stopped")
        stack = stack_panel(result, state) if state.stack else "(no user stack at this state)\n"
        name = s.threads[state.thread].name
        if state.callbacks:
            lines = [f"callback stack of {name} ({len(state.callbacks)}, outermost first):"]
            lines += [f"  {i + 1}. api {api} from {service}" for i, (api, service) in enumerate(state.callbacks)]
            callbacks = "\n".join(lines)
        else:
            callbacks = f"callback stack of {name}: empty"
        picture = self._timeline_png() if (self.timeline if timeline is None else timeline) else None
        return Panel(
            title, f"registers ({state.mode} context; * changed):\n{regs}\n", stack, callbacks,
            register_table_html(diff, s.symbol) if diff else "<p>no register changed</p>", picture,
        )  # fmt: skip

    def _live_state(self) -> State:
        """The CPU now, as a state record (the thread's stack read from memory)."""
        s = self.session
        t = s.thread
        ctx = s.regs.context()
        stack = b""
        if t.stack_limit <= ctx.rsp < t.stack_base:
            stack = s.read(ctx.rsp, t.stack_base - ctx.rsp)
        frames = tuple((f.api, f.service) for f in s.callback_stack())
        return State(t.state_id, t.tid, "user" if not t.terminated else "exited", ctx, stack, t.stack_base,
                     len(frames), frames[-1][1] if frames else None, frames[-1][0] if frames else None, False, frames)  # fmt: skip

    def _timeline_png(self) -> bytes | None:
        s = self.session
        n = len(s.trace) if self.live is not None else self.cursor
        if n == 0:
            return None
        import matplotlib.pyplot as plt

        from emu.views.figure import save_figure
        from emu.views.timeline import timeline

        shown = Trace(s.trace.symbolize)
        last = s.trace.raw_transition(n - 1).dst
        shown.raw_states = [r for r in s.trace.raw_states if r[0] <= last]
        shown.raw_transitions = s.trace.raw_transitions[:n]
        fig = timeline(shown)
        buf = io.BytesIO()
        save_figure(fig, buf, "png", dpi=72)
        plt.close(fig)
        return buf.getvalue()

    def widget(self) -> Any:
        """An ipywidgets box: Step, Instruction, Back, Restart and To the end buttons over the
        panel's parts (title, timeline picture, registers, stack, callback stack)."""
        import ipywidgets as w

        title, picture = w.HTML(), w.Image(format="png")
        regs, stack, callbacks = w.HTML(), w.HTML(), w.HTML()
        buttons = {
            name: w.Button(description=name) for name in ("Step", "Instruction", "Back", "Restart", "To the end")
        }

        def refresh() -> None:
            p = self.panel()
            title.value = f"<b>{html.escape(p.title)}</b>"
            picture.value = p.timeline_png or b""
            picture.layout.display = None if p.timeline_png else "none"
            regs.value = f"<pre>{html.escape(p.registers)}</pre>"
            stack.value = f"<pre>{html.escape(p.stack)}</pre>"
            callbacks.value = f"<pre>{html.escape(p.callbacks)}</pre>"
            buttons["Step"].disabled = buttons["To the end"].disabled = self.at_end
            buttons["Instruction"].disabled = self.session.done
            buttons["Back"].disabled = self.cursor == 0 and self.live is None

        def to_end() -> None:
            while self.step() is not None:
                pass

        actions: dict[str, Callable[[], object]] = {"Step": self.step, "Instruction": self.step_instruction, "Back": self.back,
                   "Restart": self.restart, "To the end": to_end}  # fmt: skip

        def handler(act: Callable[[], object]) -> Callable[[object], None]:
            def clicked(_button: object) -> None:
                act()
                refresh()

            return clicked

        for label, button in buttons.items():
            button.on_click(handler(actions[label]))
        refresh()
        box = w.VBox([w.HBox(list(buttons.values())), title, picture, w.HBox([regs, w.VBox([stack, callbacks])])])
        box.stepper = self  # the notebook can reach the session through the widget
        return box

    def show(self) -> Any:
        """The widget, or without ipywidgets the current :class:`Panel` (HTML in a notebook)."""
        try:
            return self.widget()
        except ImportError:
            return self.panel()

    def _repr_html_(self) -> str:
        return self.panel().html


def _describe(t: Transition, s: Session) -> str:
    src, dst = s.trace.state(t.src), s.trace.state(t.dst)
    what = t.service or (f"api {t.api}" if t.api is not None else "")
    status = f" -> {t.status_name}" if t.status is not None and t.kind != "syscall" else ""
    pending = " [callback-return pending]" if dst.pending else ""
    return f"{t.kind} {what} ({src.mode} -> {dst.mode}) at {t.rip_symbol}{status}{pending}".replace("  ", " ")


def _note(s: Session, name: str, value: int) -> str:
    if name in ("rip", "rsp") or (name in ("rcx", "r11", "rdx", "r8", "r10") and s.symbol(value) != f"{value:#x}"):
        text = s.symbol(value)
        return "" if text == f"{value:#x}" else text
    return ""


def static_steps(scenario: Scenario | str | Path, timeline: bool = False) -> Iterator[Panel]:
    """Every transition of a scenario's run as a :class:`Panel`, from the first state to the
    last: what the widget shows step by step, for a notebook without widgets (or a CI log)."""
    st = Stepper(scenario, timeline=timeline)
    yield st.panel()
    while st.step() is not None:
        yield st.panel()
