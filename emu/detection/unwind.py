"""Walking a thread's user stack the way a debugger does: x64 unwind data first, code second.

Facts from Microsoft's "x64 exception handling" (learn.microsoft.com/cpp/build/exception-handling-x64,
sections "struct RUNTIME_FUNCTION", "struct UNWIND_INFO", "struct UNWIND_CODE" and "Unwind
procedure"), checked against ReactOS ``sdk/lib/rtl/amd64/unwind.c`` (RtlVirtualUnwind):

* ``.pdata`` holds RUNTIME_FUNCTION {BeginAddress, EndAddress, UnwindData}: three RVAs, sorted.
* UNWIND_INFO is Version:3|Flags:5, SizeOfProlog, CountOfCodes, FrameRegister:4|FrameOffset:4,
  then CountOfCodes 16-bit slots (padded to an even count); with UNW_FLAG_CHAININFO a
  RUNTIME_FUNCTION follows, whose codes are applied after these.
* Codes are listed in reverse prologue order; a code applies when its CodeOffset (the end of its
  prologue instruction) is at or before the offset of RIP in the function.
* A function without an entry is a leaf: the return address is at [RSP].
* UWOP_PUSH_MACHFRAME pops a machine frame (Rip at +0, Rsp at +0x18) instead of a return
  address.

KiUserCallbackDispatcher is entered by the kernel, not called, with the UCALLOUT_FRAME that
KeUserModeCallback built on the user stack (WRK callback.c, ReactOS usercall.c; emu's kernel
model does the same). How its frame is unwound depends on what its unwind data says, and the
walk reads that, never a build name:

* codes ending in UWOP_PUSH_MACHFRAME (a dispatcher written in assembly with
  ``.seh_pushframe``, as emu's built-in one, after Wine's assembly version in
  dlls/ntdll/signal_x86_64.c): the machine frame is the UCALLOUT_FRAME's MachineFrame at
  +0x30, and the walk goes on from its Rip and Rsp.
* codes without one (a plain C function, as Wine 8's PE ntdll: ``PUSH_NONVOL rbx;
  ALLOC_LARGE 0x150``), or no unwind data at all (then the dispatcher's code, followed from
  its export, gives the same RSP change): the codes bring RSP back to the value the
  dispatcher was entered with. The UCALLOUT_FRAME sits there ("stack" convention) or right
  above a slot that holds no return address ("registers" convention: emu's kernel writes 0
  there). The one that passes :func:`emu.detection.view.callout_frame` is taken, in the order the
  dispatcher's first instructions suggest (:func:`emu.loader.stubs.guess_dispatcher_convention`),
  and the walk goes on from its MachineFrame. A real return address in the slot means an
  ordinary call: it is popped.

Scenario assembly and hand-written PE code often have no unwind data although they are not
leaves (the x64 ABI requires it, assembly authors skip it). For those frames the walk reads the
code instead: the RSP changes from the nearest export to RIP (pushes, ``sub rsp``, a frame
pointer), then a leaf at a known symbol, then a stack scan for a return address; every
candidate return address must follow a ``call``. The walk never raises: a broken stack ends
it with a ``problem``.
"""

from __future__ import annotations

import contextlib

from emu.detection.prologue import (
    CS_GPR,
    RSP,
    Sweep,
    function_start,
    is_reg,
    is_return_address,
    stub_containing,
    sweep,
)
from emu.detection.unwind_data import RuntimeFunction, UnwindInfo, lookup, read_unwind_info
from emu.detection.unwind_data import WalkStop as _Stop
from emu.detection.view import DispatcherFrame, ModuleInfo, ThreadView, callout_frame
from emu.loader.disasm import Insn, disasm
from emu.loader.stubs import guess_dispatcher_convention
from emu.records import record
from emu.winnt import (
    UCALLOUT_BUFFER,
    UCALLOUT_LENGTH,
    UCALLOUT_MF_RIP,
    UCALLOUT_MF_RSP,
    UWOP_ALLOC_LARGE,
    UWOP_ALLOC_SMALL,
    UWOP_PUSH_MACHFRAME,
    UWOP_PUSH_NONVOL,
    UWOP_SAVE_NONVOL,
    UWOP_SAVE_NONVOL_FAR,
    UWOP_SET_FPREG,
)

# MACHINE_FRAME as UWOP_PUSH_MACHFRAME pops it: Rip +0, SegCs +8, EFlags +0x10, Rsp +0x18, SegSs +0x20
# (MS docs "struct UNWIND_CODE"; the same layout as the UCALLOUT_FRAME's MachineFrame in emu.winnt).
MACHFRAME_RIP, MACHFRAME_RSP = 0x0, 0x18
MAX_FRAMES = 4096  # a 256 KiB stack holds a few thousand frames at most; the walk reports a stop here
# Every thread starts in ntdll!RtlUserThreadStart as if called with a zero return address
# (ReactOS dll/ntdll/dispatch/amd64/dispatch.S, emu.process_start.ThreadStart.create_thread): the walk ends there,
# and a zero return address anywhere else is a broken stack.
THREAD_START = "RtlUserThreadStart"
SCAN_LIMIT = 0x2000  # bytes of stack a scan looks through for a return address


# --- the walk ---------------------------------------------------------------------------------
@record(frozen=True)
class Frame:
    """One frame of the walk: the RIP and RSP it runs at, and how the walk got there."""

    rip: int
    rsp: int
    how: str  # "context", "unwind data", "machine frame", "dispatcher layout", "leaf stub", ...
    regs: tuple[int, ...] = ()  # the 16 general registers in this frame, as far as the unwind restored them


@record(frozen=True)
class StackWalk:
    """The frames from RIP outwards, the KiUserCallbackDispatcher frames among them (innermost
    first), whether the walk reached the thread's first frame, and why it stopped if not."""

    frames: tuple[Frame, ...]
    dispatchers: tuple[DispatcherFrame, ...]
    complete: bool
    problem: str | None


class _Walker:
    def __init__(self, view: ThreadView) -> None:
        self.view = view
        self.regs = list(view.context[:16])
        self.frames: list[Frame] = []
        self.dispatchers: list[DispatcherFrame] = []
        self.frame_rsp = self.regs[RSP]
        ntdll = view.module("ntdll")
        self.ntdll = ntdll
        disp = ntdll.export("KiUserCallbackDispatcher") if ntdll else None
        self.disp = disp
        self.disp_end = 0
        if ntdll is not None and disp is not None:
            self.disp_end = ntdll.function_end(disp)
        self.rip = view.context.rip
        start = ntdll.export(THREAD_START) if ntdll else None
        self.thread_start = (start, ntdll.function_end(start)) if ntdll and start is not None else (0, 0)

    # stack memory only: a pointer into an image's bytes is not a stack
    def word(self, address: int) -> int:
        for start, data in self.view.memory:
            if start <= address and address + 8 <= start + len(data):
                return int.from_bytes(data[address - start : address - start + 8], "little")
        raise _Stop(f"stack word {address:#x} is not readable")

    def in_stack(self, address: int) -> bool:
        return any(start <= address < start + len(data) for start, data in self.view.memory)

    def run(self) -> StackWalk:
        rsp, rip = self.regs[RSP], self.view.context.rip
        self.frames.append(Frame(rip, rsp, "context", tuple(self.regs)))
        try:
            if rsp % 8:
                raise _Stop(f"RSP {rsp:#x} is not 8-byte aligned")
            if not self.in_stack(rsp):
                raise _Stop(f"RSP {rsp:#x} is not in readable stack memory")
            trap = True  # RIP is where the thread stopped (not a return address)
            for _ in range(MAX_FRAMES):
                caller, how, trap = self.step(rip, trap)
                if caller == 0:
                    if not self.thread_start[0] <= rip < self.thread_start[1]:
                        raise _Stop(f"a zero return address above {self.view.symbol(rip)}, not RtlUserThreadStart")
                    self.frames.append(Frame(0, self.regs[RSP], how, tuple(self.regs)))
                    return self._done(True, None)
                rip = caller
                new_rsp = self.regs[RSP]
                if new_rsp <= rsp:
                    raise _Stop(f"unwinding {how} did not move up the stack (RSP {rsp:#x} -> {new_rsp:#x})")
                rsp = new_rsp
                self.frames.append(Frame(rip, rsp, how, tuple(self.regs)))
            raise _Stop(f"more than {MAX_FRAMES} frames")
        except _Stop as e:
            return self._done(False, str(e))

    def _done(self, complete: bool, problem: str | None) -> StackWalk:
        return StackWalk(tuple(self.frames), tuple(self.dispatchers), complete, problem)

    def step(self, rip: int, trap: bool) -> tuple[int, str, bool]:
        """Unwind one frame: the caller's RIP, how, and whether that RIP is a trap RIP."""
        view = self.view
        self.frame_rsp, self.rip = self.regs[RSP], rip
        module = view.module_at(rip)
        if module is None:
            raise _Stop(f"RIP {rip:#x} is in no module")
        # A return address may sit just past a noreturn call at a function's end: look it up at -1.
        entry = lookup(module, rip if trap else rip - 1)
        if entry is not None:
            return self.unwind_data(module, entry, rip)
        if self.disp is not None and self.disp <= rip < self.disp_end and module is self.ntdll:
            return self.dispatcher_layout(module, rip)
        if trap and stub_containing(module, rip) is not None:
            return self.pop_return(), "leaf stub", False
        start = function_start(module, rip)
        if start is not None:
            found = sweep(module.image, start, rip)
            if found is not None:
                ret = self.try_frame(found)
                if ret is not None:
                    return ret, "prologue analysis", False
        ret = self.try_frame(Sweep(0, {}))
        if ret is not None:
            return ret, "leaf", False
        return self.scan(), "stack scan", False

    def unwind_data(self, module: ModuleInfo, entry: RuntimeFunction, rip: int) -> tuple[int, str, bool]:
        read, regs = self.view.read, self.regs
        info = read_unwind_info(read, entry.unwind, module.base)
        offset = rip - entry.begin
        dispatcher = module is self.ntdll and self.disp is not None and self._root(entry, info) == self.disp
        if offset > info.prolog_size and info.codes and self.epilogue(entry, info, rip):
            if dispatcher:
                return self.callout_at_entry("unwind data (epilogue)")
            return self.pop_return(), "unwind data (epilogue)", False
        machine: int | None = None
        codes = [c for c in info.codes if c.offset <= offset or offset >= info.prolog_size]
        # SAVE_NONVOL offsets are from the establisher frame: the frame register minus
        # 16 * FrameOffset once SET_FPREG has run, else RSP (ReactOS GetEstablisherFrame; the
        # Windows unwinder copied in dotnet/runtime reads FrameBase + offset).
        fp_set = info.frame_register and any(c.op == UWOP_SET_FPREG for c in codes)
        base = regs[info.frame_register] - 16 * info.frame_offset if fp_set else regs[RSP]
        for _ in range(32):  # chained entries; bounded against a cycle
            for c in codes:
                if c.op == UWOP_PUSH_NONVOL:
                    regs[c.info] = self.word(regs[RSP])
                    regs[RSP] += 8
                elif c.op in (UWOP_ALLOC_LARGE, UWOP_ALLOC_SMALL):
                    regs[RSP] += c.value
                elif c.op == UWOP_SET_FPREG:
                    regs[RSP] = regs[info.frame_register] - 16 * info.frame_offset
                elif c.op in (UWOP_SAVE_NONVOL, UWOP_SAVE_NONVOL_FAR):
                    regs[c.info] = self.word(base + c.value)
                elif c.op == UWOP_PUSH_MACHFRAME:
                    regs[RSP] += 8 if c.info else 0  # an error code below the frame
                    machine = regs[RSP]
                    break  # the machine frame ends this frame's unwind (it must be the last code)
            if machine is not None or info.chained is None:
                break
            info = read_unwind_info(read, info.chained.unwind, module.base)
            codes = list(info.codes)  # chained codes apply in full
        if machine is None:
            if dispatcher:
                return self.callout_at_entry("unwind data")
            return self.pop_return(), "unwind data", False
        new_rip, regs[RSP] = self.word(machine + MACHFRAME_RIP), self.word(machine + MACHFRAME_RSP)
        if dispatcher:
            self.record(machine - UCALLOUT_MF_RIP)
        return new_rip, "machine frame", True

    def _root(self, entry: RuntimeFunction, info: UnwindInfo) -> int:
        """The start of the function ``entry`` belongs to: the end of its chain of RUNTIME_FUNCTIONs
        (MS docs "Chained unwind info structures": the chained entry is the primary one)."""
        begin = entry.begin
        for _ in range(32):
            if info.chained is None:
                break
            begin = info.chained.begin
            info = read_unwind_info(self.view.read, info.chained.unwind, self.ntdll.base if self.ntdll else 0)
        return begin

    def epilogue(self, entry: RuntimeFunction, info: UnwindInfo, rip: int) -> bool:
        """MS "Unwind procedure": if RIP is in an epilog (add rsp / lea rsp, pops, ret or jmp), finish it."""
        code = self.view.read(rip, 64) or b""
        rsp, regs, undone = self.regs[RSP], list(self.regs), False
        for n, insn in enumerate(disasm(code, rip, 20)):
            ops, m = insn.operands, insn.mnemonic
            if n == 0 and m == "add" and is_reg(ops, 0, RSP) and ops[1].type == "imm":
                rsp += ops[1].imm
            elif n == 0 and m == "lea" and is_reg(ops, 0, RSP) and ops[1].type == "mem":
                base = CS_GPR.get(ops[1].mem.base)
                if base is None or base != info.frame_register or ops[1].mem.index != "":
                    return False
                rsp = regs[base] + ops[1].mem.disp
            elif m == "pop" and ops and ops[0].type == "reg" and ops[0].reg in CS_GPR:
                regs[CS_GPR[ops[0].reg]] = self.word(rsp)
                rsp += 8
            elif m == "ret" or (undone and m == "jmp" and not _jumps_inside(insn, entry)):
                regs[RSP] = rsp
                self.regs[:] = regs
                return True
            else:
                return False  # not an epilog (a jmp first is a branch in the body, not a tail call)
            undone = True
        return False

    def pop_return(self) -> int:
        slot = self.regs[RSP]
        value = self.word(slot)
        self.regs[RSP] = slot + 8
        return value

    def try_frame(self, sweep: Sweep) -> int | None:
        """Take a frame found by reading code only if its return address is 0 or follows a call."""
        entry_rsp = self.regs[RSP] + sweep.delta
        try:
            value = self.word(entry_rsp)
        except _Stop:
            return None
        if not (
            is_return_address(self.view, value)
            or (value == 0 and self.thread_start[0] <= self.rip < self.thread_start[1])
        ):
            return None
        for reg, off in sweep.saved.items():
            with contextlib.suppress(_Stop):  # a push slot out of the captured stack: keep the register
                self.regs[reg] = self.word(entry_rsp - off)
        self.regs[RSP] = entry_rsp + 8
        return value

    def scan(self) -> int:
        rsp = self.regs[RSP]
        for slot in range(rsp, rsp + SCAN_LIMIT, 8):
            if not self.in_stack(slot):
                break
            value = self.word(slot)
            if is_return_address(self.view, value):
                self.regs[RSP] = slot + 8
                return value
        raise _Stop(f"no return address found on the stack above {rsp:#x}")

    def dispatcher_layout(self, module: ModuleInfo, rip: int) -> tuple[int, str, bool]:
        """KiUserCallbackDispatcher without unwind data: its code, read from its export to RIP
        (:func:`emu.detection.prologue.sweep`), gives its entry RSP; the frame sits there or above it."""
        found = sweep(module.image, self.disp or rip, rip)
        if found is None:
            raise _Stop(f"cannot follow KiUserCallbackDispatcher's code to {self.view.symbol(rip)}")
        entry = self.regs[RSP] + found.delta
        for reg, off in found.saved.items():
            with contextlib.suppress(_Stop):  # a push slot out of the captured stack: keep the register
                self.regs[reg] = self.word(entry - off)
        self.regs[RSP] = entry
        return self.callout_at_entry("dispatcher layout")

    def callout_at_entry(self, how: str) -> tuple[int, str, bool]:
        """KiUserCallbackDispatcher unwound to the RSP it was entered with (``self.regs``) with no
        machine frame on the way: the UCALLOUT_FRAME is there ("stack" convention) or right above a
        slot holding no return address ("registers"); see the module notes. The walk goes on
        from its MachineFrame, at the RIP after the system call the callback interrupted."""
        entry = self.regs[RSP]
        slot = self.word(entry)
        called = is_return_address(self.view, slot)  # a real return address: not the kernel's entry
        order = (entry + 8, entry) if self.convention() == "registers" else (entry, entry + 8)
        for frame in order:
            if frame == entry + 8 and called:
                continue
            found = callout_frame(self.view, frame, self.frame_rsp - 8)
            if found is not None:
                self.dispatchers.append(found)
                self.regs[RSP] = self.word(frame + UCALLOUT_MF_RSP)
                convention = "registers" if frame == entry + 8 else "stack"
                return self.word(frame + UCALLOUT_MF_RIP), f"{how} to a UCALLOUT_FRAME ({convention} convention)", True
        if called:
            self.regs[RSP] = entry + 8
            return slot, how, False
        raise _Stop(f"no plausible UCALLOUT_FRAME at or right above KiUserCallbackDispatcher's entry RSP {entry:#x}")

    def convention(self) -> str:
        """How ntdll's KiUserCallbackDispatcher reads its arguments, from its code (read once)."""
        ntdll = self.ntdll
        if ntdll is None:
            return "unknown"
        if "convention" not in ntdll.memo:
            ntdll.memo["convention"] = guess_dispatcher_convention(ntdll.image).convention
        return str(ntdll.memo["convention"])

    def record(self, frame: int) -> None:
        """A KiUserCallbackDispatcher frame; its return slot is where the callback's return address
        into the dispatcher goes, just below the dispatcher frame's RSP."""
        slot = self.frame_rsp - 8
        try:
            buffer = self.word(frame + UCALLOUT_BUFFER)
            both = self.word(frame + UCALLOUT_LENGTH)  # Length (+0x28) and ApiNumber (+0x2C)
        except _Stop:
            buffer = both = 0
        self.dispatchers.append(DispatcherFrame(slot, frame, both >> 32, buffer, both & 0xFFFF_FFFF))


def _jumps_inside(insn: Insn, entry: RuntimeFunction) -> bool:
    ops = insn.operands
    if len(ops) == 1 and ops[0].type == "imm":
        return bool(entry.begin <= ops[0].imm < entry.end)
    return False  # an indirect jmp in an epilog is a tail call (MS docs "Epilog code")


def walk(view: ThreadView) -> StackWalk:
    """Unwind the thread's user stack from its context; never raises (a broken walk has a ``problem``)."""
    return _Walker(view).run()
