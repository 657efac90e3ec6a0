"""Text and HTML panels of a run: disassembly around RIP, register diffs, the stack, states and traces.

These need no matplotlib (capstone only), so notebooks, the terminal and rich HTML
display (``_repr_html_``) can use them without the ``[notebooks]`` extra;
:mod:`emu.views.viz` re-exports them next to the figures.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import capstone

from emu.context import REGISTER_NAMES, UserContext
from emu.detection.prologue import is_return_address
from emu.detection.view import DispatcherFrame, ThreadView, callout_frame, dispatcher_frames, view_of
from emu.winnt import (
    UCALLOUT_BUFFER,
    UCALLOUT_LENGTH,
    UCALLOUT_MF_EFLAGS,
    UCALLOUT_MF_RIP,
    UCALLOUT_MF_RSP,
    UCALLOUT_MF_SEGCS,
    UCALLOUT_MF_SEGSS,
    status_name,
)

if TYPE_CHECKING:
    from emu.engine import Run
    from emu.loader.image import Image
    from emu.trace import State, Trace

Symbolize = Callable[[int], str]
RegisterChange = tuple[str, int, int]

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
# Going backwards from RIP means decoding forwards from an earlier label; labels further
# away than this are not worth decoding through.
_MAX_BACKTRACK = 0x400
_MAX_INSN = 15  # bytes: the longest x86 instruction (Intel SDM vol. 2, 2.3.11)


# --- disassembly -------------------------------------------------------------------------
def _image_at(run: Run, address: int) -> Image | None:
    for image in run.images:
        if image.contains(address):
            return image
    return None


def _code_end(image: Image, address: int) -> int:
    """End of the section bytes holding ``address`` (padding past the data is not code)."""
    for s in image.sections:
        start = image.base + s.rva
        if start <= address < start + s.size:
            return start + len(s.data)
    return address


def _decode(image: Image, start: int, end: int) -> list[capstone.CsInsn]:
    code = image.read(start, end - start) if end > start else b""
    return list(_md.disasm(code, start)) if code else []


def _lead_in(image: Image, rip: int, before: int) -> list[capstone.CsInsn]:
    """Up to ``before`` instructions ending exactly at ``rip``, decoded from the nearest label that lands there."""
    labels = sorted({a for a in image.symbols.values() if rip - _MAX_BACKTRACK <= a <= rip}, reverse=True)
    best: list[capstone.CsInsn] = []
    for start in labels:
        insns = _decode(image, start, rip)
        if insns and insns[-1].address + insns[-1].size != rip:
            continue  # this label does not decode onto RIP's instruction boundary
        if len(insns) > len(best):
            best = insns
        if len(best) >= before:
            break
    return best[-before:] if before > 0 else []


def _operand_note(insn: capstone.CsInsn, symbolize: Symbolize) -> str:
    """``; module!symbol`` for a direct branch or call target (what a debugger prints)."""
    if insn.mnemonic == "call" or insn.mnemonic.startswith("j"):
        try:
            target = int(insn.op_str, 16)
        except ValueError:
            return ""
        name = symbolize(target)
        return f"  ; {name}" if name != f"{target:#x}" else ""
    return ""


def disassembly(run: Run, state: State, before: int = 6, after: int = 6) -> str:
    """The code around a state's RIP, one instruction a line, the current one marked ``=>``.

    Each line shows the address, ``module!symbol+0xoff``, the bytes and the instruction.
    In kernel mode RIP is the user RIP saved in the trap frame: the instruction after the
    ``syscall`` that the thread runs when the kernel returns to it.

    Args:
        run: the run whose images hold the code.
        state: the state whose RIP is marked.
        before: instructions shown before RIP.
        after: instructions shown after RIP.
    """
    sym = run.symbolize
    rip = state.rip
    where = "user RIP saved in the trap frame" if state.mode == "kernel" else "RIP"
    head = f"s{state.id} ({state.mode}, depth {state.depth}): {where} = {rip:#x} {sym(rip)}"
    image = _image_at(run, rip)
    if image is None:
        return f"{head}\n=> {rip:#x}  (no image holds this address)\n"
    end = min(_code_end(image, rip), rip + _MAX_INSN * (after + 1))
    lead, rest = _lead_in(image, rip, before), _decode(image, rip, end)[: after + 1]
    insns = lead + rest
    width = max(len(sym(a)) for a in [rip, *(i.address for i in insns)])
    code_width = max((3 * i.size - 1 for i in insns), default=0)
    lines = [head]
    for insn in insns:
        mark = "=>" if insn.address == rip else "  "
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        lines.append(
            f"{mark} {insn.address:#x}  {sym(insn.address):<{width}}  {insn.bytes.hex(' '):<{code_width}}  "
            f"{text}{_operand_note(insn, sym)}".rstrip()
        )
    if not rest:  # RIP past the code (a fault after `int3`) or on bytes that do not decode
        lines.insert(1 + len(lead), f"=> {rip:#x}  {sym(rip):<{width}}  (no instruction decodes here)")
    return "\n".join(lines) + "\n"


# --- registers ---------------------------------------------------------------------------
def _context(x: State | UserContext) -> UserContext:
    return x if isinstance(x, UserContext) else x.context


def register_diff(a: State | UserContext, b: State | UserContext) -> list[RegisterChange]:
    """Registers that differ between two states (or contexts), in context order: (name, old, new).

    >>> from emu.context import UserContext
    >>> before = UserContext(*([0] * 16), 0x1000, 0x202)
    >>> register_diff(before, before._replace(rax=0xC0000008))
    [('rax', 0, 3221225480)]
    """
    return [(n, old, new) for n, old, new in zip(REGISTER_NAMES, _context(a), _context(b)) if old != new]


def _value_note(name: str, value: int, symbolize: Symbolize | None) -> str:
    if name == "rflags":
        return ""
    if symbolize is not None:
        s = symbolize(value)
        if s != f"{value:#x}":
            return s
    if name == "rax" and value >> 31 == 1 and value <= 0xFFFF_FFFF:
        # An error NTSTATUS (severity bits 11) is easier to read by name.
        text = status_name(value)
        return "" if text.startswith("0x") else text
    return ""


def register_table(diff: Sequence[RegisterChange], symbolize: Symbolize | None = None) -> str:
    """A text table of a :func:`register_diff`: register, old, new, what the new value names."""
    if not diff:
        return "no register changed\n"
    lines = [f"{'register':<9} {'before':<18}    {'after':<18}  note"]
    for name, old, new in diff:
        note = _value_note(name, new, symbolize)
        lines.append(f"{name:<9} {old:#018x} -> {new:#018x}  {note}".rstrip())
    return "\n".join(lines) + "\n"


def register_table_html(diff: Sequence[RegisterChange], symbolize: Symbolize | None = None) -> str:
    """The same table as :func:`register_table`, as an HTML ``<table>``."""
    rows = "".join(
        f"<tr><td><code>{n}</code></td><td><code>{old:#018x}</code></td><td><code>{new:#018x}</code></td>"
        f"<td>{html.escape(_value_note(n, new, symbolize))}</td></tr>"
        for n, old, new in diff
    )
    head = "<tr><th>register</th><th>before</th><th>after</th><th>note</th></tr>"
    return f'<table class="emu-regdiff">{head}{rows}</table>'


# --- stack -------------------------------------------------------------------------------
def entry_frame(view: ThreadView) -> DispatcherFrame | None:
    """The UCALLOUT_FRAME of a thread standing at KiUserCallbackDispatcher's first instruction.

    :func:`emu.detection.view.dispatcher_frames` finds frames by the dispatcher's return address,
    which is pushed only once the dispatcher calls the callback; at its entry the frame
    sits at RSP ("stack" convention) or above a return slot ("registers" convention).
    """
    ntdll = view.module("ntdll")
    if ntdll is None or view.context.rip != ntdll.export("KiUserCallbackDispatcher"):
        return None
    rsp = view.context.rsp
    for frame in (rsp, rsp + 8):
        found = callout_frame(view, frame, frame - 8)
        if found is not None:
            return found
    return None


def callout_frames(view: ThreadView) -> list[DispatcherFrame]:
    """Every UCALLOUT_FRAME on the stack, innermost first (the entry frame, then the dispatcher's)."""
    first = entry_frame(view)
    return ([first] if first is not None else []) + dispatcher_frames(view)


def _ascii(data: bytes | None) -> str:
    """`` "WM_PAINT"`` when a stack word is printable text (callback input often is)."""
    if data and all(0x20 <= b < 0x7F or b == 0 for b in data) and data.strip(b"\0"):
        text = data.rstrip(b"\0").decode("ascii")
        return f' "{text}"'
    return ""


def _frame_notes(view: ThreadView, frames: Sequence[DispatcherFrame], symbolize: Symbolize) -> dict[int, str]:
    notes: dict[int, str] = {}
    total = len(frames)
    for k, f in enumerate(frames):
        name = f"UCALLOUT_FRAME {k + 1}/{total}"
        rip = view.u64(f.frame + UCALLOUT_MF_RIP) or 0
        old_rsp = view.u64(f.frame + UCALLOUT_MF_RSP) or 0
        if f.return_slot >= view.context.rsp:
            value = view.u64(f.return_slot) or 0
            target = f"ret -> {symbolize(value)}" if view.module_at(value) is not None else f"{value:#x}"
            notes.setdefault(f.return_slot, f"{target} (return slot of {name})")
        notes[f.frame] = f"{name} +0x00 (home area of the callback's first call)"
        notes[f.frame + UCALLOUT_BUFFER] = f"{name} +0x20 Buffer = {f.buffer:#x}"
        notes[f.frame + UCALLOUT_LENGTH] = f"{name} +0x28 Length = {f.length:#x} | +0x2C ApiNumber = {f.api}"
        notes[f.frame + UCALLOUT_MF_RIP] = f"{name} +0x30 MachineFrame.Rip -> {symbolize(rip)}"
        notes[f.frame + UCALLOUT_MF_SEGCS] = f"{name} +0x38 MachineFrame.SegCs"
        notes[f.frame + UCALLOUT_MF_EFLAGS] = f"{name} +0x40 MachineFrame.EFlags"
        notes[f.frame + UCALLOUT_MF_RSP] = f"{name} +0x48 MachineFrame.Rsp = {old_rsp:#x} (RSP at the syscall)"
        notes[f.frame + UCALLOUT_MF_SEGSS] = f"{name} +0x50 MachineFrame.SegSs"
        for a in range(f.buffer & ~7, f.buffer + f.length, 8):
            notes.setdefault(a, f"{name} input buffer{_ascii(view.read(a, 8))}")
    return notes


def stack_panel(run: Run, state: State, words: int = 16) -> str:
    """The stack from RSP up, one qword a line, with return addresses and UCALLOUT_FRAME fields named.

    Frames come from :func:`callout_frames` (the debugger's stack scan, plus the frame at
    RSP when the thread stands at the dispatcher's entry). A value that symbolizes into
    a module is shown as ``-> module!symbol+0xoff``, marked ``ret`` when a call ends there.
    """
    sym = run.symbolize
    view = view_of(run, state)
    frames = callout_frames(view)
    notes = _frame_notes(view, frames, sym)
    rsp = state.rsp
    lines = [
        f"s{state.id} ({state.mode}, depth {state.depth}): RSP = {rsp:#x} {sym(rsp)}, "
        f"{len(frames)} UCALLOUT_FRAME(s) on the stack"
    ]
    for i in range(words):
        address = rsp + 8 * i
        value = state.stack_word(address)
        if value is None:
            lines.append(f"   rsp+{8 * i:#05x}  {address:#x}  (above the stack base)")
            break
        note = notes.get(address, "")
        if not note and sym.image_at(value) is not None:
            note = ("ret -> " if is_return_address(view, value) else "-> ") + sym(value)
        lines.append(f"   rsp+{8 * i:#05x}  {address:#x}  {value:#018x}  {note}".rstrip())
    shown_end = rsp + 8 * words
    for k, f in enumerate(frames):
        if f.frame >= shown_end:
            lines.append(
                f"   UCALLOUT_FRAME {k + 1}/{len(frames)} at rsp+{f.frame - rsp:#x}: ApiNumber = {f.api}, "
                f"Buffer = {f.buffer:#x}, Length = {f.length:#x} (beyond the {words} words shown)"
            )
    return "\n".join(lines) + "\n"


# --- rich display ------------------------------------------------------------------------
_PENDING_STYLE = ' style="background:#ffe0a8"'


def state_html(state: State, symbolize: Symbolize | None = None) -> str:
    """An HTML card for one state (for ``State._repr_html_``): mode, depth, service, registers."""
    sym = symbolize if symbolize is not None else (lambda a: f"{a:#x}")
    pending = " · <b>callback-return pending</b>" if state.pending else ""
    api = "" if state.api is None else f" · api {state.api}"
    title = (
        f"<b>s{state.id}</b> · thread {state.thread} · {state.mode} · depth {state.depth}"
        f"{' · ' + html.escape(state.service) if state.service else ''}{api}{pending}"
    )
    cells = []
    for name, value in zip(REGISTER_NAMES, state.context):
        note = sym(value) if name in ("rip", "rsp") else ""
        extra = f" <small>{html.escape(note)}</small>" if note and note != f"{value:#x}" else ""
        cells.append(f"<td><code>{name}</code></td><td><code>{value:#018x}</code>{extra}</td>")
    rows = "".join(f"<tr>{''.join(cells[i : i + 3])}</tr>" for i in range(0, len(cells), 3))
    style = _PENDING_STYLE if state.pending else ""
    return f'<div class="emu-state"{style}><div>{title}</div><table>{rows}</table></div>'


def trace_html(trace: Trace) -> str:
    """An HTML table of a trace's transitions (for ``Trace._repr_html_``), pending states highlighted."""
    head = (
        "<tr><th>step</th><th>kind</th><th>from → to</th><th>service</th><th>api</th>"
        "<th>user rip</th><th>depth</th><th>status</th><th></th></tr>"
    )
    rows = []
    for t in trace.transitions:
        src, dst = trace.state(t.src), trace.state(t.dst)
        mark = "callback-return pending" if dst.pending else ""
        style = _PENDING_STYLE if dst.pending else ""
        cells = (
            t.step, t.kind, f"{src.mode} → {dst.mode}", t.service or "", "" if t.api is None else t.api,
            t.rip_symbol, t.depth, t.status_name, mark,
        )  # fmt: skip
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f'<table class="emu-trace">{head}{"".join(rows)}</table>'
