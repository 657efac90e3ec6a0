"""The x64 unwinder: .pdata/.xdata parsing (against LIEF and objdump), RtlVirtualUnwind's cases on
real mingw-built unwind data, and walks from garbage that must end with a reason instead of an
exception (the built-in ntdll's own table: test_unwind_builtin.py)."""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import capstone
import lief
import pytest
from pe_fixtures import CC, COMMON, DLLTOOL, PeFixtures, pe_fixtures_or_fail

from emu.api import Run, run
from emu.context import UserContext
from emu.detection.signals import combined
from emu.detection.unwind import walk
from emu.detection.unwind_data import function_table, lookup, read_unwind_info
from emu.detection.view import ModuleInfo, ThreadView, view_of
from emu.loader.image import PAGE, Image, Section
from emu.loader.pe import load_pe
from emu.runtime.unwind import UWOP_ALLOC_SMALL
from emu.scenario import parse_scenario
from emu.winnt import (
    UNW_FLAG_CHAININFO,
    UWOP_ALLOC_LARGE,
    UWOP_PUSH_NONVOL,
    UWOP_SAVE_NONVOL_FAR,
    UWOP_SET_FPREG,
)

# --- a PE ntdll and a module with real unwind data, from GNU as .seh directives -------------
NTDLL_SEH = r"""
        .intel_syntax noprefix
        .text
        .macro STUB name, ssn, alias
        .globl \name
        .p2align 5
        .ifnb \alias
        .globl \alias
\alias:
        .endif
\name:
        .byte 0x4c, 0x8b, 0xd1, 0xb8
        .long \ssn
        .byte 0xf6, 0x04, 0x25, 0x08, 0x03, 0xfe, 0x7f, 0x01, 0x75, 0x03, 0x0f, 0x05, 0xc3, 0xcd, 0x2e, 0xc3
        .endm
        STUB NtCallbackReturn, 0x05, ZwCallbackReturn
        STUB NtTerminateThread, 0x53
        STUB NtUserMessageCall, 0x1007

/* Wine dlls/ntdll/signal_x86_64.c writes its dispatcher's unwind this way. */
        .globl KiUserCallbackDispatcher
        .p2align 4
        .seh_proc KiUserCallbackDispatcher
KiUserCallbackDispatcher:
        .seh_pushframe
        .seh_stackalloc 0x30
        .seh_endprologue
        mov rcx, qword ptr [rsp + 0x20]
        mov edx, dword ptr [rsp + 0x28]
        mov r8d, dword ptr [rsp + 0x2c]
        mov rax, qword ptr gs:[0x60]
        mov rax, qword ptr [rax + 0x58]
        call qword ptr [rax + r8 * 8]
        .globl KiUserCallbackDispatcherReturn
KiUserCallbackDispatcherReturn:
        xor ecx, ecx
        xor edx, edx
        mov r8d, eax
        call ZwCallbackReturn
        int3
        .seh_endproc

        .globl RtlUserThreadStart
        .p2align 4
        .seh_proc RtlUserThreadStart
RtlUserThreadStart:
        sub rsp, 0x28
        .seh_stackalloc 0x28
        .seh_endprologue
        mov rax, rcx
        mov rcx, rdx
        call rax
        mov edx, eax
        mov rcx, -2
        call NtTerminateThread
        int3
        .seh_endproc

        .globl DllEntry
        .p2align 4
DllEntry:
        mov eax, 1
        ret
"""
NTDLL_DEF = """LIBRARY ntdll.dll
EXPORTS
    KiUserCallbackDispatcher
    KiUserCallbackDispatcherReturn
    NtCallbackReturn
    ZwCallbackReturn
    NtTerminateThread
    NtUserMessageCall
    RtlUserThreadStart
"""
FRAMES = r"""
        .intel_syntax noprefix
        .text
/* PUSH_NONVOL rbx, ALLOC_LARGE 0x1000; RBP and RSI get values the callback must save. */
        .globl ProgramMain
        .p2align 4
        .seh_proc ProgramMain
ProgramMain:
        push rbx
        .seh_pushreg rbx
        sub rsp, 0x1000
        .seh_stackalloc 0x1000
        .seh_endprologue
        mov rbx, 0x1111
        mov rbp, 0x6161
        mov rsi, 0x5151
        xor ecx, ecx
        mov edx, 0xf
        call qword ptr [rip + __imp_NtUserMessageCall]
        add rsp, 0x1000
        pop rbx
        ret
        .seh_endproc

/* PUSH_NONVOL rbp, ALLOC_SMALL 0x50, SET_FPREG rbp = rsp + 0x20, SAVE_NONVOL rsi at +0x40;
 * then RSP moves below the fixed frame (like alloca), so only RBP finds the frame. */
        .globl OnMessage
        .p2align 4
        .seh_proc OnMessage
OnMessage:
        push rbp
        .seh_pushreg rbp
        sub rsp, 0x50
        .seh_stackalloc 0x50
        lea rbp, [rsp + 0x20]
        .seh_setframe rbp, 0x20
        mov qword ptr [rsp + 0x40], rsi
        .seh_savereg rsi, 0x40
        .seh_endprologue
        mov rsi, 0x2222
        sub rsp, 0x40
        mov ecx, 0x22
        call Finish
        int3
        .seh_endproc

/* ALLOC_LARGE 0x2008, then NtCallbackReturn through the import table. */
        .globl Finish
        .p2align 4
        .seh_proc Finish
Finish:
        sub rsp, 0x2008
        .seh_stackalloc 0x2008
        .seh_endprologue
        mov r8d, ecx
        xor ecx, ecx
        xor edx, edx
        call qword ptr [rip + __imp_NtCallbackReturn]
        int3
        .seh_endproc

        .globl DllEntry
        .p2align 4
DllEntry:
        mov eax, 1
        ret
"""
FRAMES_DEF = "LIBRARY frames.dll\nEXPORTS\n    ProgramMain\n    OnMessage\n    Finish\n"
SCENARIO = """
[scenario]
name = "seh_frames"

[ntdll]
path = "ntdll.dll"

[[pe]]
path = "frames.dll"

[thread]
entry = "frames!ProgramMain"

[kernel_callback_table]
2 = "frames!OnMessage"

[services.NtUserMessageCall]
steps = [{ kind = "callback", api = 2 }, { kind = "return", status = "callback" }]

[[expect]]
exit_status = 0x22

[[expect]]
detections = 1
"""


@pytest.fixture(scope="session")
def seh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pe_fixtures_or_fail()  # fails (never skips) with the install line when mingw-w64 is missing
    out = tmp_path_factory.mktemp("seh")
    for name, text in (
        ("ntdll.S", NTDLL_SEH),
        ("ntdll.def", NTDLL_DEF),
        ("frames.S", FRAMES),
        ("frames.def", FRAMES_DEF),
    ):
        (out / name).write_text(text)
    flags = [f for f in COMMON if f not in ("-O2", "-Wextra", "-Werror")]
    steps = [
        [DLLTOOL, "-d", "ntdll.def", "-l", "libntdll.a", "-D", "ntdll.dll"],
        [CC, *flags, "-Wl,--image-base,0x7ffb00000000", "-o", "ntdll.dll", "ntdll.S", "ntdll.def"],
        [CC, *flags, "-Wl,--image-base,0x7ffa00000000", "-o", "frames.dll", "frames.S", "frames.def", "libntdll.a"],
    ]
    for args in steps:
        done = subprocess.run(args, cwd=out, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    (out / "seh.toml").write_text(SCENARIO)
    return out


@pytest.fixture(scope="session")
def pe_files() -> PeFixtures:
    return pe_fixtures_or_fail()


def _lief(path: Path) -> lief.PE.Binary:
    cfg = lief.PE.ParserConfig()
    cfg.parse_exceptions = True
    binary = lief.PE.parse(str(path), cfg)
    assert binary is not None
    return binary


# --- parsing ------------------------------------------------------------------------------------
def test_function_tables_match_lief_and_objdump(pe_files: PeFixtures, seh_dir: Path) -> None:
    for path in (pe_files.callbacks, pe_files.program, seh_dir / "frames.dll", seh_dir / "ntdll.dll"):
        image = load_pe(path)
        table = function_table(image)
        binary = _lief(path)  # kept alive: LIEF's entries point into it
        theirs: list[Any] = list(binary.exceptions)  # LIEF's stubs lag its runtime attributes
        assert [(f.begin - image.base, f.end - image.base, f.unwind - image.base) for f in table] == [
            (e.rva_start, e.rva_end, e.unwind_rva) for e in theirs
        ]
        objdump = subprocess.run(
            [shutil.which("x86_64-w64-mingw32-objdump") or "objdump", "-x", str(path)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        offsets = [int(m, 16) for m in re.findall(r"Frame offset: (0x[0-9a-f]+)", objdump)]
        for f, e, frame_offset in zip(table, theirs, offsets, strict=True):
            info = read_unwind_info(image.read, f.unwind, image.base)
            u = e.unwind_info
            assert (info.version, info.flags, info.prolog_size, info.frame_register) == (
                u.version, u.flags, u.sizeof_prologue, u.frame_reg,
            )  # fmt: skip
            # LIEF 1.0 reports frame_reg_offset 0 for a FrameOffset of 2; objdump reads the byte.
            assert info.frame_offset == frame_offset
            assert len(info.codes) == len(u.opcodes)
            for mine, op in zip(info.codes, u.opcodes):
                assert (mine.offset, mine.op) == (op.position, int(op.opcode))
                if hasattr(op, "size"):
                    assert mine.value == op.size
                if hasattr(op, "reg"):  # SET_FPREG: LIEF shows UNWIND_INFO's FrameRegister
                    assert (info.frame_register if mine.op == UWOP_SET_FPREG else mine.info) == int(op.reg)
                if hasattr(op, "offset"):
                    assert mine.value == op.offset


def test_function_table_from_mapped_headers_when_the_loader_kept_none(seh_dir: Path) -> None:
    image = load_pe(seh_dir / "frames.dll")
    assert function_table(dataclasses.replace(image, pdata=b"")) == function_table(image) != ()


def test_unwind_codes_decode_every_documented_size(seh_dir: Path) -> None:
    image = load_pe(seh_dir / "frames.dll")
    codes = {
        name: [
            (str(c), c.value) for c in read_unwind_info(image.read, lookup_entry(image, name).unwind, image.base).codes
        ]
        for name in ("ProgramMain", "OnMessage", "Finish")
    }
    assert codes["ProgramMain"] == [("+0x8 ALLOC_LARGE 0x1000", 0x1000), ("+0x1 PUSH_NONVOL rbx", 0)]
    assert codes["OnMessage"] == [
        ("+0xf SAVE_NONVOL rsi 0x40", 0x40), ("+0xa SET_FPREG", 0), ("+0x5 ALLOC_SMALL 0x50", 0x50),
        ("+0x1 PUSH_NONVOL rbp", 0),
    ]  # fmt: skip
    assert codes["Finish"] == [("+0x7 ALLOC_LARGE 0x2008", 0x2008)]
    # The 32-bit forms (ALLOC_LARGE with OpInfo 1, SAVE_NONVOL_FAR): more than 512 KiB, so written by hand.
    raw = bytes([1, 9, 6, 0, 9, UWOP_ALLOC_LARGE | 1 << 4]) + struct.pack("<I", 0x123458)
    raw += bytes([4, UWOP_SAVE_NONVOL_FAR | 3 << 4]) + struct.pack("<I", 0x80010)
    info = read_unwind_info(lambda a, n: raw[a : a + n], 0, 0)
    assert [(c.op, c.info, c.value) for c in info.codes] == [
        (UWOP_ALLOC_LARGE, 1, 0x123458),
        (UWOP_SAVE_NONVOL_FAR, 3, 0x80010),
    ]


def lookup_entry(image: Image, name: str):  # type: ignore[no-untyped-def]
    module = ModuleInfo(image.name, image.base, image.size, dict(image.exports), image)
    entry = lookup(module, image.exports[name])
    assert entry is not None and entry.begin == image.exports[name]
    return entry


_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


# --- every shipped run ---------------------------------------------------------------------------
def test_every_walk_of_a_shipped_run_ends_at_the_threads_first_frame(shipped_runs: dict[str, Run]) -> None:
    for name, r in shipped_runs.items():
        for s in r.trace.states:
            w = walk(view_of(r, s))
            if name == "hard_corrupt_rsp" and w.problem and "RSP" in w.problem:
                continue
            if name == "exception_stack_overflow" and s.id in (1, 2, 3):
                continue  # in the middle of ~4,000 frames of unbounded recursion (emu.detection.unwind.MAX_FRAMES)
            assert w.complete, (name, s.id, w.problem)
            assert "stack scan" not in {f.how for f in w.frames}, (name, s.id)


# --- a real-PE run ----------------------------------------------------------------------------------
def test_walk_on_real_unwind_data_restores_frames_and_registers(seh_dir: Path) -> None:
    text = (seh_dir / "seh.toml").read_text()
    r = run(parse_scenario(text, str(seh_dir / "seh.toml")))
    assert r.error is None and r.ok, [o.message for o in r.outcomes if not o.passed]
    for s in r.trace.states:
        v = combined(view_of(r, s))
        assert bool(v) == s.pending and (v.stack.depth == s.depth or s.mode == "exited")
        hows = {f.how for f in v.stack.walk.frames[1:]}  # type: ignore[union-attr]
        assert hows <= {"unwind data", "unwind data (epilogue)", "machine frame", "leaf stub"}, hows
    pending = next(s for s in r.trace.states if s.pending)
    frames = walk(view_of(r, pending)).frames
    frames_dll = next(i for i in r.images if i.name == "frames")
    names = [r.symbolize(f.rip) for f in frames]
    assert names[:4] == [
        "ntdll!ZwCallbackReturn+0x14", "frames!Finish+0x14", "frames!OnMessage+0x24",
        "ntdll!KiUserCallbackDispatcherReturn",
    ]  # fmt: skip
    on_message = frames[2]
    assert (on_message.regs[3], on_message.regs[6]) == (0x1111, 0x2222)  # RBX, RSI in OnMessage
    dispatcher = frames[3]
    # Unwinding OnMessage: SAVE_NONVOL gives back RSI, PUSH_NONVOL gives back RBP, both ProgramMain's.
    assert (dispatcher.regs[5], dispatcher.regs[6]) == (0x6161, 0x5151)
    assert dispatcher.how == "unwind data" and frames[4].how == "machine frame"
    assert frames_dll.contains(frames[5].rip) and r.symbolize(frames[5].rip).startswith("frames!ProgramMain+")
    assert r.symbolize(frames[6].rip).startswith("ntdll!RtlUserThreadStart+") and frames[-1].rip == 0


def _synthetic_view(r_images: list[Image], rip: int, rsp: int, stack: bytes, **regs: int) -> ThreadView:
    ctx = UserContext(*([0] * 18))._replace(rip=rip, rsp=rsp, **regs)
    modules = tuple(ModuleInfo(i.name, i.base, i.size, dict(i.exports), i) for i in r_images)
    return ThreadView(0, ctx, ((rsp, stack),), modules, True)


def test_prologue_and_epilogue_positions(seh_dir: Path) -> None:
    frames = load_pe(seh_dir / "frames.dll")
    ntdll = load_pe(seh_dir / "ntdll.dll")
    ret = ntdll.exports["KiUserCallbackDispatcherReturn"]
    main = frames.exports["ProgramMain"]
    rsp = 0x10000
    # In the prologue, after `push rbx` (offset 1) only PUSH_NONVOL has run.
    view = _synthetic_view([frames, ntdll], main + 1, rsp, struct.pack("<QQ", 0xB0B, ret))
    second = walk(view).frames[1]
    assert (second.rip, second.rsp, second.regs[3]) == (ret, rsp + 0x10, 0xB0B)
    # At offset 0 nothing has run: the return address is at [RSP].
    second = walk(_synthetic_view([frames, ntdll], main, rsp, struct.pack("<Q", ret))).frames[1]
    assert (second.rip, second.rsp) == (ret, rsp + 8)
    # In the epilogue (`add rsp, 0x1000; pop rbx; ret`): the rest of the epilogue is simulated.
    code = frames.read(main, 0x40) or b""
    epilog = next(i.address for i in _md.disasm(code, main) if i.mnemonic == "add" and i.op_str == "rsp, 0x1000")
    stack = bytes(0x1000) + struct.pack("<QQ", 0xB0B, ret)
    second = walk(_synthetic_view([frames, ntdll], epilog, rsp, stack)).frames[1]
    assert (second.rip, second.rsp, second.regs[3], second.how) == (ret, rsp + 0x1010, 0xB0B, "unwind data (epilogue)")
    pop = next(i.address for i in _md.disasm(code, main) if i.mnemonic == "pop")
    second = walk(_synthetic_view([frames, ntdll], pop, rsp, struct.pack("<QQ", 0xB0B, ret))).frames[1]
    assert (second.rip, second.rsp, second.regs[3]) == (ret, rsp + 0x10, 0xB0B)
    # On the final `ret` everything is undone already: the return address is at [RSP].
    second = walk(_synthetic_view([frames, ntdll], pop + 1, rsp, struct.pack("<Q", ret))).frames[1]
    assert (second.rip, second.rsp, second.how) == (ret, rsp + 8, "unwind data (epilogue)")


def test_chained_unwind_info() -> None:
    # Function 0x1000..0x1020; its second part 0x1020..0x1040 chains to the first's UNWIND_INFO
    # (UNW_FLAG_CHAININFO: the part's own codes, then the primary's, all applied).
    base = 0x7FF0_0000_0000
    primary = bytes([1, 1, 1, 0, 1, UWOP_PUSH_NONVOL | 3 << 4])  # push rbx at +1
    chained = bytes([1 | UNW_FLAG_CHAININFO << 3, 0, 1, 0, 0, UWOP_ALLOC_SMALL | 3 << 4, 0, 0])  # 0x20 bytes
    chained += struct.pack("<III", 0x1000, 0x1020, 0x3000)  # after the codes, padded to an even count
    pdata = struct.pack("<III", 0x1000, 0x1020, 0x3000) + struct.pack("<III", 0x1020, 0x1040, 0x3010)
    xdata = primary.ljust(0x10, b"\0") + chained
    text = Section(".text", PAGE, b"\x90" * 0x40 + b"\xe8\0\0\0\0" + b"\xc3", "rx", PAGE)
    image = Image(
        "chain", base, [text, Section(".xdata", 3 * PAGE, xdata, "r", PAGE)], exports={"f": base + 0x1000}, pdata=pdata
    )
    ret = base + 0x1045  # just after the `call` at +0x40: a return address
    rsp = 0x20000
    view = _synthetic_view([image], base + 0x1030, rsp, bytes(0x20) + struct.pack("<QQ", 0xB0B, ret))
    second = walk(view).frames[1]
    assert (second.rip, second.rsp, second.regs[3], second.how) == (ret, rsp + 0x30, 0xB0B, "unwind data")


# --- garbage in, a reason out ------------------------------------------------------------------------
def test_walks_from_garbage_never_raise(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["nested_callbacks"]
    pending = next(s for s in r.trace.states if s.pending)
    base = view_of(r, pending)
    rng = random.Random(6)
    rsp = base.context.rsp
    stack = base.memory[0][1]
    images = [m.image for m in base.modules]
    addresses = [
        0,
        8,
        0x13370,
        rsp - 3,
        0xDEADBEEFDEADBEE8,
        (1 << 64) - 8,
        images[0].base,
        *(m.base + 0x1010 for m in base.modules),
    ]
    for i in range(400):
        noise = bytearray(stack)
        for _ in range(rng.randrange(1, 40)):
            at = rng.randrange(0, len(noise) - 8) & ~7
            noise[at : at + 8] = rng.choice(
                [rng.getrandbits(64), rng.choice(addresses), *(m.base + rng.randrange(0x2000) for m in base.modules)]
            ).to_bytes(8, "little")
        ctx = base.context._replace(
            rip=rng.choice([base.context.rip, rng.getrandbits(64), rng.choice(addresses)]),
            rsp=rng.choice([rsp, rsp + 8 * rng.randrange(64), rng.choice(addresses)]),
            rbp=rng.getrandbits(64),
        )
        view = ThreadView(
            0, ctx, ((rsp, bytes(noise)),) if i % 7 else (), base.modules, rng.choice([True, False, None])
        )
        w = walk(view)
        assert w.complete or w.problem, i
        verdict = combined(view)
        assert verdict.stack.value in ("yes", "no", "unknown")
        if verdict.stack.value == "unknown":
            assert any("stopped:" in e for e in verdict.stack.evidence)
