"""``emu debug FILE --gdb HOST:PORT`` against a real GDB client, and a client sending garbage.

Each test starts ``emu debug`` in a subprocess on a free port (``:0``; the command names the
port it got) and drives it with ``gdb -batch``. The expected places come from the sources:
KeUserModeCallback enters user mode at ntdll!KiUserCallbackDispatcher (WRK
ke/amd64/callout.asm, ReactOS ntoskrnl/ke/amd64/usercall.c), which calls
KernelCallbackTable[api] with RSP pointing at its own return address; NtCallbackReturn
hands the callback's status to the service that called back, whose own ``syscall`` then
returns with RAX = that status (WRK ke/amd64/callout.asm NtCallbackReturn).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import asm_scenario
from emu.api import build
from emu.debug.target import DebugTarget

ROOT = Path(__file__).resolve().parent.parent
ROUNDTRIP = ROOT / "scenarios" / "callback_roundtrip.toml"
GDB = shutil.which("gdb")
# CI installs gdb: there a missing client fails the tests instead of skipping them.
needs_gdb = pytest.mark.skipif(
    GDB is None and not os.environ.get("CI"), reason="needs the gdb client (Debian package gdb)"
)
WAIT = 120  # seconds: a safety net against a hang, never an assertion


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    first_line: str

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=WAIT)
        return self.proc.returncode, out, self.first_line + err


@contextmanager
def emu_debug(scenario: Path, *extra: str) -> Iterator[Server]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "emu.cli", "debug", str(scenario), "--gdb", "127.0.0.1:0", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], WAIT)
        line = proc.stderr.readline() if ready else ""
        found = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+)$", line.strip())
        assert found, f"emu debug did not start listening: {line!r}"
        yield Server(proc, int(found.group(1)), line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=WAIT)


def gdb(port: int, *commands: str) -> str:
    args = [
        GDB or "gdb",
        "-batch",
        "-nx",
        "-ex",
        "set architecture i386:x86-64",
        "-ex",
        f"target remote 127.0.0.1:{port}",
    ]
    for c in commands:
        args += ["-ex", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=WAIT, check=False)
    return done.stdout + done.stderr


def register(output: str, name: str) -> list[int]:
    """Every value ``info registers NAME`` printed, in order."""
    return [int(v, 16) for v in re.findall(rf"^{name}\s+(0x[0-9a-f]+)", output, re.M)]


def addresses() -> dict[str, int]:
    p = build(ROUNDTRIP)
    return {
        "on_message": p.resolve("app!on_message", ()),
        "dispatcher": p.resolve("ntdll!KiUserCallbackDispatcher", ()),
        "message_call": p.resolve("win32u!NtUserMessageCall", ()),
        "callback_return": p.resolve("ntdll!ZwCallbackReturn", ()),
    }


def syscall_in(stub: int, scenario: Path = ROUNDTRIP) -> int:
    """The `syscall` instruction of a system-call stub, found by disassembling it (capstone)."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    p = build(scenario)
    code = p.machine.read(stub, 0x20)
    return next(int(i.address) for i in Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, stub) if i.mnemonic == "syscall")


def callout_frame() -> tuple[int, int]:
    """Where the kernel model puts the UCALLOUT_FRAME in callback_roundtrip, and the dispatcher."""
    process = build(ROUNDTRIP)
    target = DebugTarget(process)
    target.add_breakpoint(process.resolve("app!on_message", ()))
    target.resume()
    return target.kernel.threads[0].callback_stack[0].user_frame, process.resolve("ntdll!KiUserCallbackDispatcher", ())


@needs_gdb
def test_gdb_breaks_in_a_callback_steps_across_syscalls_and_reads_the_stack() -> None:
    a = addresses()
    enter, leave = syscall_in(a["message_call"]), syscall_in(a["callback_return"])
    with emu_debug(ROUNDTRIP) as server:
        out = gdb(
            server.port,
            f"break *{a['on_message']:#x}", "continue", "info registers rip", "x/2gx $rsp", "monitor callbacks",
            "delete", f"break *{leave:#x}", "continue", "info registers rip", "stepi", "info registers rip rax",
            "continue",
        )  # fmt: skip
        code, stdout, stderr = server.finish()
    rips = register(out, "rip")
    assert rips[:2] == [a["on_message"], leave], out
    # [rsp] at the callback's first instruction: the dispatcher's own return address, inside ntdll.
    ret = int(re.search(r"^0x[0-9a-f]+:\s+(0x[0-9a-f]+)", out, re.M).group(1), 16)  # type: ignore[union-attr]
    assert a["dispatcher"] < ret < a["dispatcher"] + 0x100, out
    assert "depth 1: api 2 for NtUserMessageCall" in out
    # stepi over ZwCallbackReturn's syscall: the kernel model completes the callback and the
    # service returns, so the thread is back after NtUserMessageCall's own syscall, RAX = 0x1234.
    assert rips[2] == enter + 2, out
    assert register(out, "rax")[-1] == 0x1234
    assert "callback_return NtUserMessageCall" in out and "sysret NtUserMessageCall" in out
    # The process ends: GDB hears the exit (W) and emu prints the run as `emu run` does.
    assert "exited with code 064" in out, out  # 0x1234's low byte, as the protocol's W carries it
    assert "thread0 exited with 0x00001234" in out
    assert code == 0, stderr
    assert "ZwCallbackReturn+0x14" in stdout and "callback_return" in stdout


@needs_gdb
def test_stepping_into_the_callback_lands_in_the_dispatcher() -> None:
    a = addresses()
    enter = syscall_in(a["message_call"])
    with emu_debug(ROUNDTRIP) as server:
        out = gdb(server.port, f"break *{enter:#x}", "continue", "info registers rsp", "stepi",
                  "info registers rip rsp", "monitor trace 2", "kill")  # fmt: skip
        code, _, stderr = server.finish()
    assert register(out, "rip") == [a["dispatcher"]], out
    before, after = register(out, "rsp")
    assert after < before, "the callout frame goes below the syscall's stack"
    assert "syscall NtUserMessageCall" in out and "callback NtUserMessageCall at ntdll!KiUserCallbackDispatcher" in out
    assert code == 0 and "killed by gdb" in stderr, stderr


THREADS = ROOT / "scenarios" / "callback_waits_on_event.toml"


@needs_gdb
def test_threads_are_gdb_threads() -> None:
    # ui waits on an event inside its callback; worker then runs (scenario comment). At
    # worker's entry, ui is off the CPU: GDB reads ui's registers from the kernel model's
    # saved user context, RIP just after the syscall of ZwWaitForSingleObject.
    p = build(THREADS)
    worker = p.resolve("app!worker_main", ())
    wait = syscall_in(p.resolve("ntdll!ZwWaitForSingleObject", ()), THREADS)
    with emu_debug(THREADS) as server:
        out = gdb(server.port, "info threads", f"break *{worker:#x}", "continue", "info threads",
                  "info registers rip", "thread 1", "info registers rip", "kill")  # fmt: skip
        server.finish()
    assert re.search(r"\* 1\s+Thread 1 \(ui, on the CPU\)", out), out
    assert "Switching to Thread 2" in out
    assert re.search(r"\* 2\s+Thread 2 \(worker, on the CPU\)", out), out
    assert re.search(r"  1\s+Thread 1 \(ui, waiting, 1 callback\(s\) deep\)", out), out
    assert register(out, "rip") == [worker, wait + 2]


@needs_gdb
def test_a_fault_stops_with_sigsegv_then_terminates(tmp_path: Path) -> None:
    # With [machine] exceptions = "stop" a fault ends the run (no Windows exception): GDB sees
    # the thread stop with SIGSEGV at the faulting instruction, then the process terminate.
    scenario = tmp_path / "fault.toml"
    scenario.write_text(asm_scenario("main:\n    xor eax, eax\n    mov dword ptr [rax], 1\n    ret",
                                     extra='[machine]\nexceptions = "stop"'))  # fmt: skip
    with emu_debug(scenario) as server:
        out = gdb(server.port, "continue", "info registers rip", "continue")
        code, _, stderr = server.finish()
    assert "Program received signal SIGSEGV" in out, out
    assert "memory fault: write of 4 byte(s) at 0x0" in out
    assert "Program terminated with signal SIGSEGV" in out
    assert code == 3 and "stopped by fault" in stderr, stderr


def _packet(payload: bytes) -> bytes:
    return b"$" + payload + b"#" + f"{sum(payload) & 0xFF:02x}".encode()


def _read_reply(conn: socket.socket) -> bytes:
    """One reply packet's payload (acks skipped)."""
    buf = b""
    while True:
        chunk = conn.recv(4096)
        assert chunk, f"the stub closed the connection after {buf!r}"
        buf += chunk
        start = buf.find(b"$")
        end = buf.find(b"#", start)
        if start >= 0 and end >= 0 and len(buf) >= end + 3:
            return buf[start + 1 : end]


@needs_gdb
def test_garbage_gets_protocol_answers_and_emu_keeps_serving() -> None:
    with emu_debug(ROUNDTRIP) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as conn:
            conn.sendall(b"$g#00")  # wrong checksum: the protocol asks again with '-'
            assert conn.recv(1) == b"-"
            conn.sendall(b"\xff\xfe noise \x00 ## + - ")  # bytes between packets are skipped
            answers = {}
            for payload in (b"m zz,qq", b"Xdead", b"p999", b"Hq1", b"Z0,nothex,1", b"vFoo", b"qNothing", b"Mzz", b"?"):
                conn.sendall(_packet(payload))
                answers[payload] = _read_reply(conn)
        assert answers[b"m zz,qq"] == b"E01"
        assert answers[b"Xdead"] == b"E01"
        assert answers[b"p999"] == b"E00"
        assert answers[b"Z0,nothex,1"] == b"E01"
        assert answers[b"vFoo"] == b"" and answers[b"qNothing"] == b""  # unknown: the empty reply
        assert answers[b"?"] == b"T05thread:1;"
        # The same process goes on serving a real client.
        out = gdb(server.port, "continue")
        code, _, stderr = server.finish()
    assert "exited with code 064" in out, out
    assert code == 0, stderr


def test_a_malformed_address_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "emu.cli", "debug", str(ROUNDTRIP), "--gdb", "localhost"],
        cwd=ROOT, capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "emu debug: --gdb 'localhost': expected [HOST]:PORT with PORT 0..65535 (e.g. :1234)"
    ]


@needs_gdb
def test_detach_runs_the_rest_and_checks_the_expectations() -> None:
    a = addresses()
    with emu_debug(ROUNDTRIP) as server:
        out = gdb(server.port, f"break *{a['on_message']:#x}", "continue", "detach")
        code, stdout, stderr = server.finish()
    assert "[Inferior 1 (Remote target) detached]" in out, out
    assert "expectations: 4 of 4 hold" in stdout, stdout + stderr
    assert code == 0


@needs_gdb
def test_gdb_watch_sees_the_kernel_model_write_the_callout_frame() -> None:
    # The UCALLOUT_FRAME's ApiNumber (ULONG at +0x2C, WRK/ReactOS) is written by the kernel
    # model while it serves NtUserMessageCall: GDB's watchpoint stops in the dispatcher.
    frame_at, dispatcher = callout_frame()
    with emu_debug(ROUNDTRIP) as server:
        out = gdb(server.port, f"watch *(int*){frame_at + 0x2C:#x}", "continue", "info registers rip", "kill")
        server.finish()
    assert "Hardware watchpoint 1" in out, out
    assert re.search(r"Old value = 0\s+New value = 2\b", out), out
    assert register(out, "rip") == [dispatcher]


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "emu.cli", "debug", str(ROUNDTRIP), "--gdb", f"127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=WAIT, check=False,
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"emu debug: cannot listen on 127.0.0.1:{port}: Address already in use"]
