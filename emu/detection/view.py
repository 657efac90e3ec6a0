"""Detecting the seed's state from what a debugger can see.

"If a thread is waiting for a kernel-mode callback to complete, the user-mode side
of the thread will delay at a call to the ZwCallbackReturn function." (MS DevNotes,
*Detecting Kernel-Mode Callbacks*.)

A detector gets a :class:`ThreadView` — the thread's user-mode context, readable
memory ranges and the module list with exports and unwind data — and nothing from the
kernel model. Ground truth (``State.pending``) comes from the kernel model; the two are
compared in the tests on every state of every shipped scenario. Which states a tool can see
at all, and with which context, depends on the observer (:mod:`emu.detection.observers`).

The built-in detector, :func:`detect_callback_return_pending`, is the combination of three
signals (symbol, code, stack) in :mod:`emu.detection.signals`; :func:`dispatcher_frames` is the plain
stack scan a debugger without unwind data would do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import field
from functools import cached_property
from typing import TYPE_CHECKING

from emu.context import UserContext
from emu.loader.image import Image
from emu.loader.pdata import RuntimeFunction, function_end, function_table
from emu.records import record
from emu.winnt import UCALLOUT_API_NUMBER, UCALLOUT_BUFFER, UCALLOUT_FRAME_SIZE, UCALLOUT_LENGTH, UCALLOUT_MF_RSP

if TYPE_CHECKING:
    from emu.engine import RunResult
    from emu.trace import State

CALLBACK_RETURN_NAMES = ("ZwCallbackReturn", "NtCallbackReturn")


@record(frozen=True)
class ModuleInfo:
    """A loaded module as a debugger lists it: name, range, exports, and its bytes."""

    name: str
    base: int
    size: int
    exports: dict[str, int]
    image: Image = field(repr=False, compare=False)
    # What the signals have read from this module's code (stubs, syscall sites): it never changes.
    memo: dict[object, object] = field(default_factory=dict, repr=False, compare=False)

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size

    def export(self, *names: str) -> int | None:
        for n in names:
            if n in self.exports:
                return self.exports[n]
        return None

    def function_end(self, address: int) -> int:
        """Where the function at ``address`` ends: its .pdata entry's end, else the next export's
        address, else the module's end (:func:`emu.loader.pdata.function_end`)."""
        return function_end(self.function_table, self.exports.values(), address, self.base + self.size)

    def export_end(self, address: int) -> int:
        """The same as :meth:`function_end` (the name detectors written for emu already use)."""
        return self.function_end(address)

    @cached_property
    def function_table(self) -> tuple[RuntimeFunction, ...]:
        """The module's .pdata (RUNTIME_FUNCTION entries, absolute addresses), read once; empty if none."""
        return function_table(self.image)


@record(frozen=True)
class ThreadView:
    """What a tool can see of one thread: user context, memory, modules.

    ``kernel_mode`` is what a live (kernel) debugger knows about the thread; it is
    None when the source cannot tell (a user-mode dump).
    """

    thread: int
    context: UserContext
    memory: tuple[tuple[int, bytes], ...]
    modules: tuple[ModuleInfo, ...]
    kernel_mode: bool | None = None

    def read(self, address: int, size: int) -> bytes | None:
        for start, data in self.memory:
            if start <= address and address + size <= start + len(data):
                return data[address - start : address - start + size]
        for m in self.modules:
            if m.contains(address):
                return m.image.read(address, size)
        return None

    def u64(self, address: int) -> int | None:
        b = self.read(address, 8)
        return None if b is None else int.from_bytes(b, "little")

    def u32(self, address: int) -> int | None:
        b = self.read(address, 4)
        return None if b is None else int.from_bytes(b, "little")

    def module(self, name: str) -> ModuleInfo | None:
        for m in self.modules:
            if m.name.lower() == name.lower():
                return m
        return None

    def module_at(self, address: int) -> ModuleInfo | None:
        for m in self.modules:
            if m.contains(address):
                return m
        return None

    def symbol(self, address: int) -> str:
        """``module!export+0xoff`` from the export table alone (what a tool without PDBs shows)."""
        m = self.module_at(address)
        if m is None:
            return f"{address:#x}"
        best: tuple[int, str] | None = None
        for name, a in m.exports.items():
            if a <= address and (best is None or a > best[0] or (a == best[0] and _pref(name) < _pref(best[1]))):
                best = (a, name)
        if best is None:
            return f"{m.name}+{address - m.base:#x}"
        off = address - best[0]
        return f"{m.name}!{best[1]}" + (f"+{off:#x}" if off else "")

    def stack_end(self) -> int:
        """End of the readable memory range holding RSP (the stack base as far as the view goes)."""
        rsp = self.context.rsp
        for start, data in self.memory:
            if start <= rsp < start + len(data):
                return start + len(data)
        return rsp


def _pref(name: str) -> tuple[int, str]:
    return (0 if name.startswith("Zw") else 1, name)


@record(frozen=True)
class DispatcherFrame:
    """A KiUserCallbackDispatcher frame found on the user stack."""

    return_slot: int  # stack address holding the return address into the dispatcher
    frame: int  # address of the UCALLOUT_FRAME
    api: int
    buffer: int
    length: int


@record(frozen=True)
class Detection:
    """A thread found at ZwCallbackReturn while the kernel completes a callback (the seed's state).

    ``rip`` and ``return_address`` are symbols (``module!export+0xoff``); ``rip_address`` and
    ``return_address_value`` are the raw values behind them (RIP, and the qword at [RSP]; None
    when a detector does not give them or [RSP] is not readable).
    """

    state: int | None
    thread: int
    rip: str
    return_address: str
    depth: int
    api_number: int | None
    rip_address: int | None = None
    return_address_value: int | None = None

    def as_dict(self) -> dict[str, object]:
        """For JSON: raw addresses as ``"0x..."`` strings (lowercase hex), as everywhere in emu's
        JSON output (``emu image --json``, ``emu graph`` nodes), or None."""
        return {
            "state": self.state,
            "thread": self.thread,
            "rip": self.rip,
            "rip_address": _hex(self.rip_address),
            "return_address": self.return_address,
            "return_address_value": _hex(self.return_address_value),
            "depth": self.depth,
            "api_number": self.api_number,
        }


def _hex(value: int | None) -> str | None:
    return None if value is None else f"{value:#x}"


def syscall_sites(view: ThreadView, start: int, end: int) -> list[int]:
    """Addresses just after each `syscall` / `int 2Eh` in [start, end), by disassembly."""
    code = view.read(start, end - start)
    if code is None:
        return []
    from emu.loader.disasm import disasm  # (capstone's answers, kept on disk by content)

    out = []
    for insn in disasm(code, start):
        if insn.mnemonic == "syscall" or (insn.mnemonic == "int" and insn.op_str.lower() in ("0x2e", "46")):
            out.append(insn.address + insn.size)
    return out


def dispatcher_frames(view: ThreadView) -> list[DispatcherFrame]:
    """Scan the stack from RSP up for return addresses into KiUserCallbackDispatcher.

    A candidate is kept only if a plausible UCALLOUT_FRAME (:func:`callout_frame`) sits above
    it, first for the stack convention (frame right above the slot), then for the registers
    convention (frame above the dispatcher's 0x28-byte home area and a return slot). Innermost
    first. Stack scanning, like a debugger without unwind data: a dispatcher with a larger
    frame (a C function, as Wine 8's) is found by the unwind in :mod:`emu.detection.unwind` only.
    """
    ntdll = view.module("ntdll")
    if ntdll is None:
        return []
    disp = ntdll.export("KiUserCallbackDispatcher")
    if disp is None:
        return []
    disp_end = _dispatcher_end(ntdll, disp)
    rsp = view.context.rsp
    end = view.stack_end()
    frames: list[DispatcherFrame] = []
    slot = rsp
    while slot + 8 <= end:
        value = view.u64(slot)
        if value is not None and disp < value < disp_end:
            for frame in (slot + 8, slot + 8 + 0x28 + 8):
                f = callout_frame(view, frame, slot)
                if f is not None:
                    frames.append(f)
                    break
        slot += 8
    return frames


def _dispatcher_end(ntdll: ModuleInfo, disp: int) -> int:
    # The dispatcher's code runs until the next export that is not one of its own labels.
    later = sorted(a for n, a in ntdll.exports.items() if a > disp and not n.startswith("KiUserCallbackDispatcher"))
    return later[0] if later else ntdll.base + ntdll.size


def callout_frame(view: ThreadView, frame: int, slot: int) -> DispatcherFrame | None:
    """The UCALLOUT_FRAME at ``frame`` if it is plausible, else None; ``slot`` is the return slot
    the found :class:`DispatcherFrame` names.

    The one plausibility check every reader of these frames uses (unwind, stack scan, stack
    panel). KeUserModeCallback (ReactOS ntoskrnl/ke/amd64/usercall.c; WRK callback.c) copies
    the input right above the frame and below the RSP it saves in MachineFrame.Rsp, so: the
    whole frame is in one readable stack range of the view, Buffer is at or above the frame's
    end, Buffer + Length is at or below MachineFrame.Rsp, and that RSP is in the same range
    (at most its end).
    """
    for start, data in view.memory:
        if start <= frame and frame + UCALLOUT_FRAME_SIZE <= start + len(data):
            off = frame - start
            buffer = int.from_bytes(data[off + UCALLOUT_BUFFER : off + UCALLOUT_BUFFER + 8], "little")
            length = int.from_bytes(data[off + UCALLOUT_LENGTH : off + UCALLOUT_LENGTH + 4], "little")
            api = int.from_bytes(data[off + UCALLOUT_API_NUMBER : off + UCALLOUT_API_NUMBER + 4], "little")
            old_rsp = int.from_bytes(data[off + UCALLOUT_MF_RSP : off + UCALLOUT_MF_RSP + 8], "little")
            if frame + UCALLOUT_FRAME_SIZE <= buffer and buffer + length <= old_rsp <= start + len(data):
                return DispatcherFrame(slot, frame, api, buffer, length)
            return None
    return None


def detect_callback_return_pending(view: ThreadView) -> Detection | None:
    """The seed's rule, from a debugger's view of one thread (the built-in combined detector).

    Reports when (1) RIP is just after the `syscall` (or `int 2Eh`) of NtCallbackReturn —
    by ntdll's export (symbol signal) or by the stub's SSN read from code (code signal),
    (2) the thread is not known to be in user mode, and (3) unwinding the user stack finds
    at least one KiUserCallbackDispatcher frame (stack signal) — without (3) the call
    fails with STATUS_NO_CALLBACK_ACTIVE at once. :func:`emu.detection.signals.combined`
    gives all three verdicts with their evidence.
    """
    from emu.detection.signals import code_signal, combined, symbol_signal  # the signals build on this module

    if view.kernel_mode is False or not (symbol_signal(view) or code_signal(view)):
        return None
    return combined(view).detection


Detector = Callable[[ThreadView], object]  # any truthy answer (a Detection, a verdict, True) means "pending"

_MODULES: dict[int, tuple[Sequence[Image], int, tuple[ModuleInfo, ...]]] = {}
_MODULES_KEPT = 32


def modules_of(images: Sequence[Image]) -> tuple[ModuleInfo, ...]:
    """The module list for a set of loaded images, built once per list (unwind tables are parsed once)."""
    hit = _MODULES.get(id(images))
    if hit is not None and hit[0] is images and hit[1] == len(images):
        return hit[2]
    mods = tuple(ModuleInfo(i.name, i.base, i.size, dict(i.exports), i) for i in images)
    if len(_MODULES) >= _MODULES_KEPT:
        del _MODULES[next(iter(_MODULES))]
    _MODULES[id(images)] = (images, len(images), mods)  # the list is kept, so its id is not reused
    return mods


def view_from(images: Sequence[Image], state: State) -> ThreadView:
    """The debugger-style view of a recorded state (from a run or an explored graph)."""
    memory = ((state.context.rsp, state.stack),) if state.stack else ()
    kernel = None if state.mode == "exited" else state.mode == "kernel"
    return ThreadView(state.thread, state.context, memory, modules_of(images), kernel)


def view_of(run: RunResult, state: State) -> ThreadView:
    """The debugger-style view of a recorded state: context, stack bytes, modules."""
    return view_from(run.images, state)


def detect_run(
    run: RunResult,
    detector: Callable[[ThreadView], Detection | None] = detect_callback_return_pending,
    observer: str = "kernel-debugger",
) -> list[Detection]:
    """Run a detector over every state of a run that ``observer`` can see, in state order.

    ``kernel-debugger`` sees every state; ``user-context`` only the states where
    GetThreadContext, a suspend or a minidump writer can stop the thread, with the base
    trap frame's context and no word on the thread's mode (see :mod:`emu.detection.observers`).
    """
    from emu.detection.observers import check_observer, statuses, view_for

    check_observer(observer)
    known = statuses(run.trace) if observer != "kernel-debugger" else None
    out = []
    for state in run.trace.states:
        if known is None:
            view: ThreadView | None = view_of(run, state)
        else:
            view = view_for(observer, run.images, state, known[state.id])
        if view is None:
            continue
        d = detector(view)
        if d is not None:
            out.append(
                Detection(
                    state.id, d.thread, d.rip, d.return_address, d.depth, d.api_number,
                    d.rip_address, d.return_address_value,
                )
            )  # fmt: skip
    return out


def detect(target: RunResult | ThreadView, observer: str = "kernel-debugger") -> list[Detection] | Detection | None:
    """Detect the seed's state: over every state of a Run ``observer`` can see, or on one ThreadView."""
    if isinstance(target, ThreadView):
        return detect_callback_return_pending(target)
    return detect_run(target, observer=observer)
