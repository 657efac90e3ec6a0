"""dumpulator (PyPI) opens emu's dumps and runs the dumped thread from its CONTEXT to its next system call.

dumpulator pins unicorn 2.0 and does not run on the unicorn 2.1 emu needs, so it lives in its own
virtual environment (``.venv-dumpulator``, made by ``.ci/run``; or set EMU_DUMPULATOR_PYTHON to
a Python that has it) and runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import emu
from emu.dump import write_minidump

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(os.environ.get("EMU_DUMPULATOR_PYTHON", ROOT / ".venv-dumpulator" / "bin" / "python"))
pytestmark = pytest.mark.skipif(
    not PYTHON.exists(), reason=f"no dumpulator environment at {PYTHON}: .ci/run makes it (see README)"
)


# Run by the dumpulator environment's Python: open a dump, step its first thread from its CONTEXT
# until the next system call instruction, print where it stopped and the exports dumpulator read.
STEP = r"""
import json
import sys

from dumpulator import Dumpulator
from unicorn import UC_HOOK_CODE

dp = Dumpulator(sys.argv[1], quiet=True)
start = dp.regs.rip
hit: list[int] = []


def stop_at_system_call(uc, address, size, user_data):  # type: ignore[no-untyped-def]
    if bytes(uc.mem_read(address, 2)) in (b"\x0f\x05", b"\xcd\x2e"):  # syscall, int 2Eh
        hit.append(address)
        uc.emu_stop()


dp._uc.hook_add(UC_HOOK_CODE, stop_at_system_call)
dp.start(start, count=int(sys.argv[2]) if len(sys.argv) > 2 else 10000)
exports = {m.name.lower(): sorted(e.name for e in m.exports if e.name) for m in dp.modules}
print(json.dumps({"start": start, "stop": hit[0] if hit else None, "rax": dp.regs.rax, "exports": exports}))
"""


def step(dump: Path) -> dict[str, object]:
    out = subprocess.run(
        [str(PYTHON), "-c", STEP, str(dump)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "rror" not in out.stderr, out.stderr[-2000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    "scenario", ["callback_roundtrip", "nested_callbacks", "threads_no_deadlock", "walk_loader_list"]
)
def test_dumpulator_runs_each_thread_start_to_the_system_call_emu_recorded_next(scenario: str, tmp_path: Path) -> None:
    r = emu.run(ROOT / "scenarios" / f"{scenario}.toml")
    first = r.trace.states[0]
    nxt = next(s for s in r.trace.states[1:] if s.thread == first.thread)
    assert nxt.mode == "kernel"  # the thread's next state is a system call entry: RIP after its `syscall`
    dump = tmp_path / "s0.dmp"
    write_minidump(r, first, dump)
    got = step(dump)
    assert got["start"] == first.rip
    assert got["stop"] == nxt.rip - 2, (r.symbolize(int(got["stop"] or 0)), r.symbolize(nxt.rip))  # type: ignore[call-overload]
    assert got["rax"] == nxt.context.rax  # the SSN the stub loaded
    exports = got["exports"]
    assert isinstance(exports, dict)
    assert "ZwCallbackReturn" in exports["ntdll.dll"] and "KiUserCallbackDispatcher" in exports["ntdll.dll"]


@pytest.mark.parametrize("scenario", ["threads_no_deadlock", "callback_waits_on_event"])
def test_dumpulator_runs_a_dump_emu_dump_writes_with_object_information(scenario: str, tmp_path: Path) -> None:
    """What `emu dump` writes (the process's bytes then, HandleData with object state, emu's kernel stream)."""
    from emu.dump.live import capture_state

    r = emu.run(ROOT / "scenarios" / f"{scenario}.toml")
    first = r.trace.states[0]
    nxt = next(s for s in r.trace.states[1:] if s.thread == first.thread)
    again, live = capture_state(r.scenario, first.id)
    dump = tmp_path / "s0.dmp"
    write_minidump(again, again.trace.state(first.id), dump, live=live)
    got = step(dump)
    assert (got["start"], got["stop"], got["rax"]) == (first.rip, nxt.rip - 2, nxt.context.rax)


def test_dumpulator_opens_a_dump_at_the_pending_state(tmp_path: Path) -> None:
    r = emu.run(ROOT / "scenarios" / "callback_roundtrip.toml")
    pending = next(s for s in r.trace.states if s.pending)
    dump = tmp_path / "pending.dmp"
    write_minidump(r, pending, dump, full=True)
    out = subprocess.run(
        [str(PYTHON), "-c", f"from dumpulator import Dumpulator; d = Dumpulator({str(dump)!r}, quiet=True); print(d.regs.rip)"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == pending.rip
    assert r.symbolize(pending.rip) == "ntdll!ZwCallbackReturn+0x14"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
