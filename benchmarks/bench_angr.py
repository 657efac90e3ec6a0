"""Paths found and time: emu's symbolic exploration beside angr's, on the same x86-64 function.

The function is a window procedure's switch on its message number (Buffer[0:4]), five ways out,
no calls (angr knows no Windows system calls or callbacks, so the comparison is on plain code)::

    mov eax, dword ptr [rcx]
    cmp eax, 0x0F / je / cmp eax, 0x10 / je / cmp eax, 0x02 / je / cmp eax, 0x12 / je
    ... each case returns its own value

``emu``
    The bytes are the callback (api 2) of a scenario whose service passes a 16-byte symbolic
    input; ``Explorer.run()`` is timed (the build is not); paths are the exploration's.
``angr`` (when ``import angr`` works; it is not a dependency of emu)
    ``angr.Project`` over the same bytes as a blob, a Microsoft x64 call state with RCX pointing
    at a 16-byte symbolic buffer, ``simulation_manager.run()`` timed; paths are the deadended
    states.

Run::

    python benchmarks/bench_angr.py [--runs R]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import measuring  # noqa: F401  (puts the repository first on sys.path)

FUNCTION = """
wndproc:
    mov eax, dword ptr [rcx]
    cmp eax, 0x0F
    je paint
    cmp eax, 0x10
    je close
    cmp eax, 0x02
    je destroy
    cmp eax, 0x12
    je quit
    xor eax, eax
    ret
paint:
    mov eax, 1
    ret
close:
    mov eax, 2
    ret
destroy:
    mov eax, 3
    ret
quit:
    mov eax, 4
    ret
"""
BASE = 0x40_0000


def emu_once() -> tuple[float, int]:
    from emu.exploration.explorer import Explorer
    from emu.scenario import parse_scenario

    code = "main:\n    sub rsp, 0x28\n    call NtUserMessageCall\n    add rsp, 0x28\n    ret\n" + FUNCTION
    text = f'''
[scenario]
name = "bench_angr"

[[module]]
name = "app"
code = """
{code}
"""

[thread]
entry = "app!main"

[kernel_callback_table]
2 = "app!wndproc"

[services.NtUserMessageCall]
steps = [{{ kind = "callback", api = 2, data = {{ symbolic = 16, name = "Buffer" }} }}, {{ kind = "return", status = "callback" }}]
'''
    explorer = Explorer(parse_scenario(text, "bench_angr"))
    t0 = time.perf_counter()
    exp = explorer.run()
    return time.perf_counter() - t0, exp.paths


def angr_once() -> tuple[float, int] | str:
    try:
        import angr
        import claripy
    except ImportError as e:
        return f"skipped: angr is not importable ({e})"
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks

    encoding, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(FUNCTION, BASE)
    blob = bytes(encoding or [])
    project = angr.Project(
        io.BytesIO(blob),
        main_opts={"backend": "blob", "arch": "amd64", "base_addr": BASE, "entry_point": BASE},
        auto_load_libs=False,
    )
    buffer_address = 0x80_0000
    cc = angr.calling_conventions.SimCCMicrosoftAMD64(project.arch)
    state = project.factory.call_state(BASE, buffer_address, 16, cc=cc, ret_addr=0x1000)
    state.memory.store(buffer_address, claripy.BVS("Buffer", 16 * 8))
    t0 = time.perf_counter()
    simgr = project.factory.simulation_manager(state)
    simgr.run()
    return time.perf_counter() - t0, len(simgr.deadended)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    emu_times, angr_times = [], []
    emu_paths = angr_paths = 0
    skipped = ""
    for _ in range(args.runs):
        dt, emu_paths = emu_once()
        emu_times.append(dt)
        got = angr_once()
        if isinstance(got, str):
            skipped = got
        else:
            angr_times.append(got[0])
            angr_paths = got[1]
    print(f"one switch on a 16-byte symbolic input, five ways out; median of {args.runs} runs")
    print(f"emu    {emu_paths} paths  {statistics.median(emu_times) * 1e3:8.1f} ms")
    if skipped:
        print(f"angr   {skipped}")
    else:
        print(f"angr   {angr_paths} paths  {statistics.median(angr_times) * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
