"""Debugging a scenario from GDB: a remote stub over a built process (``emu debug FILE --gdb :1234``).

:class:`~emu.debug.target.DebugTarget` adapts a process (registers, memory, breakpoints,
stepping through the kernel model's transitions, threads); :class:`~emu.debug.gdbstub.GdbStub`
speaks GDB's remote serial protocol over it; :func:`~emu.debug.gdbstub.serve` listens on a
TCP address.
"""

from __future__ import annotations
