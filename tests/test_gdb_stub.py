"""The GDB stub's packets, in process: framing, the target description, registers, memory, stepping.

Expected layouts come from the GDB manual ("Remote Protocol", "i386 Features"): the core
feature's registers in GDB's amd64 order, then XMM0-15 and MXCSR, then FS/GS bases; values
little-endian; the empty reply for a packet the stub does not support.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gdb_remote import callout_frame

from conftest import asm_scenario
from emu.api import build
from emu.debug.gdbstub import GdbStub
from emu.debug.registers import G_SIZE, NUMBER, REGISTERS, target_xml
from emu.debug.rsp import Reader, escape, frame, unescape
from emu.debug.target import DebugTarget

ROOT = Path(__file__).resolve().parent.parent
ROUNDTRIP = ROOT / "scenarios" / "callback_roundtrip.toml"

# GDB manual, "i386 Features": org.gnu.gdb.i386.core and org.gnu.gdb.i386.sse, in GDB's amd64 order.
GDB_AMD64 = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", *(f"st{i}" for i in range(8)),
    "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop", *(f"xmm{i}" for i in range(16)), "mxcsr",
]  # fmt: skip


# Packet heads with fields the stub parses; the tails are random.
PACKET_STARTS = [
    b"m", b"M", b"X", b"p", b"P", b"G", b"g", b"H", b"T", b"Z", b"z", b"q", b"Q", b"v", b"qXfer:features:read:target.xml:",
    b"qRcmd,", b"qThreadExtraInfo,", b"vCont;", b"C", b"S", b"?",
]  # fmt: skip


def _with_tail(head: bytes) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=24).map(lambda tail: head + tail)


@pytest.fixture
def stub() -> GdbStub:
    return GdbStub(DebugTarget(build(ROUNDTRIP)))


def test_the_reader_takes_packets_in_any_chunking_and_refuses_bad_checksums() -> None:
    wire = frame(b"qSupported:swbreak+") + b"+\x03" + b"$g#00" + b"junk-" + frame(b"?")
    whole = [(e.kind, e.payload) for e in Reader().feed(wire)]
    reader = Reader()
    bytewise = [(e.kind, e.payload) for i in range(len(wire)) for e in reader.feed(wire[i : i + 1])]
    assert whole == bytewise == [
        ("packet", b"qSupported:swbreak+"), ("ack", b""), ("interrupt", b""), ("bad", b""), ("nak", b""),
        ("packet", b"?"),
    ]  # fmt: skip


def test_a_packet_that_never_ends_is_dropped() -> None:
    reader = Reader()
    assert [e.kind for e in reader.feed(b"$" + b"a" * 100_000)] == ["bad"]
    assert [e.kind for e in reader.feed(frame(b"?"))] == ["packet"]


def test_binary_escapes_round_trip() -> None:
    data = bytes(range(256))
    escaped = escape(data)
    assert not any(b in escaped for b in b"#$*")
    assert unescape(escaped) == data


def test_the_target_description_numbers_registers_as_gdb_does() -> None:
    tree = ET.fromstring(target_xml())
    assert tree.findtext("architecture") == "i386:x86-64"
    regs = [(r.get("name"), int(r.get("regnum", "-1"))) for r in tree.iter("reg")]
    assert [n for n, _ in regs][: len(GDB_AMD64)] == GDB_AMD64
    assert [n for n, _ in regs][len(GDB_AMD64) :] == ["fs_base", "gs_base"]
    assert [i for _, i in regs] == list(range(len(regs)))
    features = [f.get("name") for f in tree.iter("feature")]
    assert features == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments"]


def test_qxfer_reads_the_description_in_pieces(stub: GdbStub) -> None:
    got, offset = b"", 0
    while True:
        reply = stub.handle(b"qXfer:features:read:target.xml:%x,%x" % (offset, 0x100))
        assert reply is not None and reply[:1] in (b"m", b"l")
        got += reply[1:]
        offset += 0x100
        if reply[:1] == b"l":
            break
    assert unescape(got).decode() == target_xml()
    assert stub.handle(b"qXfer:features:read:other.xml:0,10") == b"E00"


def test_registers_read_and_write(stub: GdbStub) -> None:
    target = stub.target
    g = stub.handle(b"g")
    assert g is not None and len(g) == 2 * G_SIZE
    rip_at = 2 * sum(r.size for r in REGISTERS[: NUMBER["rip"]])
    assert int.from_bytes(bytes.fromhex(g[rip_at : rip_at + 16].decode()), "little") == target.rip()
    assert stub.handle(b"P0=efbeadde00000000") == b"OK"  # rax, little-endian
    assert stub.handle(b"p0") == b"efbeadde00000000"
    # gs_base is the TEB on Windows x64 (MS docs, "x64 architecture": GS points to the TEB).
    teb = target.kernel.threads[0].teb
    assert stub.handle(b"p%x" % NUMBER["gs_base"]) == teb.to_bytes(8, "little").hex().encode()
    assert stub.handle(b"P%x=0000" % NUMBER["st0"]) == b"E01"  # x87 registers are read-only here
    assert stub.handle(b"p999") == b"E00"


def test_memory_reads_writes_and_partial_reads(stub: GdbStub) -> None:
    rsp = stub.target.kernel.threads[0].stack_base - 0x100
    assert stub.handle(b"M%x,4:11223344" % rsp) == b"OK"
    assert stub.handle(b"m%x,4" % rsp) == b"11223344"
    assert stub.handle(b"X%x,2:}\x03}\x04" % rsp) == b"OK"
    assert stub.handle(b"m%x,2" % rsp) == b"2324"
    # The stack's top page is mapped, the page above it is not: a read across returns the mapped part.
    top = stub.target.kernel.threads[0].stack_base
    assert stub.handle(b"m%x,8" % (top - 4)) == b"00000000"
    assert stub.handle(b"m0,4") == b"E01"
    assert stub.handle(b"mffffffffffffffff,10") == b"E01"
    assert stub.handle(b"M0,1:00") == b"E01"


def test_step_continue_breakpoint_and_unknown_packets(stub: GdbStub) -> None:
    target = stub.target
    start = target.rip()
    assert stub.handle(b"vCont?") == b"vCont;c;C;s;S"
    assert stub.handle(b"vCont;s:1;c") == b"T05thread:1;"
    assert target.rip() != start
    on_message = target.process.resolve("app!on_message", ())
    assert stub.handle(b"Z0,%x,1" % on_message) == b"OK"
    assert stub.handle(b"c") == b"T05thread:1;swbreak:;"
    assert target.rip() == on_message
    assert stub.handle(b"z0,%x,1" % on_message) == b"OK"
    assert stub.handle(b"Z9,%x,8" % on_message) == b""  # no such kind: not supported
    assert stub.handle(b"qRcmd," + b"sym app!on_message".hex().encode()) == (
        f"app!on_message = {on_message:#x}\n".encode().hex().encode()
    )
    assert stub.handle(b"qfThreadInfo") == b"m1" and stub.handle(b"qsThreadInfo") == b"l"
    assert stub.handle(b"Hg7") == b"E01"
    assert stub.handle(b"QStartNoAckMode") == b"OK" and stub.no_ack
    assert stub.handle(b"qSomethingNew") == b"" and stub.handle(b"vMustReplyEmpty") == b""
    assert stub.handle(b"c") == b"W34"  # the thread's exit status 0x1234: its low byte
    assert stub.handle(b"s") == b"W34"  # the process is over: every resume says so


LOOP = '[scenario]\nname = "spin"\n[[module]]\nname = "app"\ncode = "main: jmp main"\n[thread]\nentry = "app!main"\n'


def _recv_until(conn: socket.socket, end: bytes) -> bytes:
    got = b""
    while not got.endswith(end):
        chunk = conn.recv(64)
        assert chunk, f"the stub closed the connection after {got!r}"
        got += chunk
    return got


def test_ctrl_c_from_the_client_stops_a_spinning_guest(tmp_path: Path) -> None:
    scenario = tmp_path / "spin.toml"
    scenario.write_text(LOOP)
    proc = subprocess.Popen(
        [sys.executable, "-m", "emu.cli", "debug", str(scenario), "--gdb", ":0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        select.select([proc.stderr], [], [], 120)
        port = int(proc.stderr.readline().rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
            conn.sendall(frame(b"QStartNoAckMode"))
            _recv_until(conn, b"+" + frame(b"OK"))
            conn.sendall(frame(b"c"))
            conn.sendall(b"\x03")
            _recv_until(conn, frame(b"T02thread:1;"))
            conn.sendall(frame(b"vKill;1"))
            _recv_until(conn, frame(b"OK"))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "killed by gdb at app!main" in err


def test_detach_lets_the_run_finish_without_the_debugger(stub: GdbStub) -> None:
    on_message = stub.target.process.resolve("app!on_message", ())
    assert stub.handle(b"Z0,%x,1" % on_message) == b"OK"
    assert stub.handle(b"D;1") == b"OK" and stub.detached and stub.done


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40) | st.sampled_from(PACKET_STARTS).flatmap(_with_tail), max_size=6))
def test_any_packet_gets_a_reply_and_never_an_exception(stub: GdbStub, packets: list[bytes]) -> None:
    for p in packets:
        reply = stub.handle(p)
        assert reply is None or isinstance(reply, bytes)
    framable = [p for p in packets if b"#" not in p and b"$" not in p]  # GDB escapes these two in binary data
    events = Reader().feed(b"".join(frame(p) for p in framable))
    assert [(e.kind, e.payload) for e in events] == [("packet", p) for p in framable]


LOOP3 = """
main:
    mov ecx, 3
again:
    nop
second:
    nop
    dec ecx
    jnz again
    ret
"""


def test_breakpoints_set_on_code_that_already_ran_are_hit(tmp_path: Path) -> None:
    # Unicorn decides when it translates a block which instructions call code hooks; a
    # breakpoint on an instruction already translated must still stop the next time round.
    scenario = tmp_path / "loop.toml"
    scenario.write_text(asm_scenario(LOOP3))
    stub = GdbStub(DebugTarget(build(scenario)))
    target = stub.target
    again, second = (target.process.resolve(f"app!{n}", ()) for n in ("again", "second"))
    assert stub.handle(b"Z0,%x,1" % second) == b"OK"
    assert stub.handle(b"c") == b"T05thread:1;swbreak:;" and target.rip() == second
    assert stub.handle(b"Z0,%x,1" % again) == b"OK"
    assert stub.handle(b"c") == b"T05thread:1;swbreak:;" and target.rip() == again
    assert stub.handle(b"c") == b"T05thread:1;swbreak:;" and target.rip() == second
    assert stub.handle(b"z0,%x,1" % second) == b"OK"
    assert stub.handle(b"c") == b"T05thread:1;swbreak:;" and target.rip() == again  # the third round
    assert stub.handle(b"z0,%x,1" % again) == b"OK"
    assert stub.handle(b"c")[:1] == b"W"  # type: ignore[index]


def test_stepping_a_plain_syscall_returns_after_it_with_the_status() -> None:
    # syscall_basic: the scripted NtClose fails with STATUS_INVALID_HANDLE (0xC0000008,
    # MS-ERREF 2.3.1). SYSRET returns to the instruction after `syscall` with RAX = the status,
    # RCX = that RIP and R11 = RFLAGS as SYSCALL saved them (Intel SDM vol. 2B SYSCALL/SYSRET).
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    process = build(ROOT / "scenarios" / "syscall_basic.toml")
    stub = GdbStub(DebugTarget(process))
    close = process.resolve("ntdll!NtClose", ())
    code = process.machine.read(close, 0x20)
    syscall = next(int(i.address) for i in Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, close) if i.mnemonic == "syscall")
    assert stub.handle(b"Z0,%x,1" % syscall) == b"OK"
    assert stub.handle(b"c") == b"T05thread:1;swbreak:;"
    flags = stub.handle(b"p%x" % NUMBER["eflags"])
    assert flags is not None
    assert stub.handle(b"s") == b"T05thread:1;"
    assert stub.target.rip() == syscall + 2
    assert stub.handle(b"p0") == (0xC0000008).to_bytes(8, "little").hex().encode()
    assert stub.handle(b"p%x" % NUMBER["rcx"]) == (syscall + 2).to_bytes(8, "little").hex().encode()
    assert stub.handle(b"p%x" % NUMBER["r11"]) == flags + b"00000000"


def test_a_write_watchpoint_sees_the_kernel_model_write_the_callout_frame() -> None:
    # KeUserModeCallback copies the UCALLOUT_FRAME onto the user stack before it enters
    # KiUserCallbackDispatcher (WRK ke/amd64/callout.asm); its ApiNumber is the ULONG at
    # +0x2C (WRK/ReactOS UCALLOUT_FRAME: four home slots, Buffer, Length, ApiNumber).
    frame_at, dispatcher = callout_frame()
    stub = GdbStub(DebugTarget(build(ROUNDTRIP)))
    assert stub.handle(b"Z2,%x,4" % (frame_at + 0x2C)) == b"OK"
    assert stub.handle(b"c") == b"T05thread:1;watch:%x;" % (frame_at + 0x2C)
    assert stub.target.rip() == dispatcher
    assert stub.handle(b"m%x,4" % (frame_at + 0x2C)) == b"02000000"
    assert stub.handle(b"z2,%x,4" % (frame_at + 0x2C)) == b"OK"
    assert stub.handle(b"c")[:1] == b"W"  # type: ignore[index]


def test_a_read_watchpoint_stops_after_the_dispatcher_reads_the_api_number() -> None:
    frame_at, dispatcher = callout_frame()
    stub = GdbStub(DebugTarget(build(ROUNDTRIP)))
    assert stub.handle(b"Z3,%x,4" % (frame_at + 0x2C)) == b"OK"
    assert stub.handle(b"c") == b"T05thread:1;rwatch:%x;" % (frame_at + 0x2C)
    assert dispatcher < stub.target.rip() < dispatcher + 0x40  # inside KiUserCallbackDispatcher


def test_after_a_detach_a_spinning_guest_stops_on_its_wall_time_budget(tmp_path: Path) -> None:
    scenario = tmp_path / "spin.toml"
    scenario.write_text(LOOP.replace("[[module]]", "[budgets]\nwall_time = 0.2\n[[module]]"))
    target = DebugTarget(build(scenario))
    stop = target.finish()
    assert (stop.kind, stop.reason, target.stop) == ("signal", "budget", "budget")
    assert "budget 'wall_time' exceeded" in stop.message


def _monitor(stub: GdbStub, command: str) -> str:
    reply = stub.handle(b"qRcmd," + command.encode().hex().encode())
    assert reply is not None
    return bytes.fromhex(reply.decode()).decode()


def test_monitor_commands_show_the_kernel_model(stub: GdbStub) -> None:
    on_message = stub.target.process.resolve("app!on_message", ())
    assert "callbacks" in _monitor(stub, "help")
    assert _monitor(stub, "callbacks") == "thread0: no callback in progress\n"
    assert _monitor(stub, "trace") == "no transitions yet\n"
    stub.handle(b"Z0,%x,1" % on_message)
    stub.handle(b"c")
    assert _monitor(stub, "threads") == "* 1: thread0, on the CPU, 1 callback(s) deep\n"
    assert _monitor(stub, "trace 1").startswith("emu: step 1: thread 0 callback NtUserMessageCall")
    assert _monitor(stub, "where") == f"{on_message:#x} = app!on_message\n"
    assert _monitor(stub, "sym nowhere!nothing") == "nowhere!nothing: no such symbol\n"
    # STATUS_INVALID_HANDLE is 0xC0000008 (MS-ERREF 2.3.1).
    assert _monitor(stub, "status 0xc0000008") == "STATUS_INVALID_HANDLE\n"
    assert "KUSER_SHARED_DATA" in _monitor(stub, "regions")
    assert _monitor(stub, "frobnicate").startswith("unknown monitor command 'frobnicate'")
    assert _monitor(stub, "where zz") == "where: 'zz' is not an address\n"
