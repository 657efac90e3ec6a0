"""Run by the dumpulator environment's Python (tests/test_dumpulator.py): open a dump, step its
first thread from its CONTEXT until the next system call instruction, print where it stopped."""

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
