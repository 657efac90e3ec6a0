"""Minidumps of emu states: write them (:mod:`emu.dump.write`), read them back (:mod:`emu.dump.read`).

The format is MS ``minidumpapiset.h`` (tables in :mod:`emu.dump.format`); emu's own
streams are described in :mod:`emu.dump.modules` (module names) and
:mod:`emu.dump.kernel_stream` (the kernel model's side). A written dump opens in
independent readers (the PyPI packages ``minidump``, ``udmp-parser`` and dumpulator), and
the detectors give the same verdicts on it as on the live state. :mod:`emu.dump.live`
captures the process at a state (its memory then and its kernel model) so that
:mod:`emu.dump.start` can run on from the dump; :mod:`emu.dump.corpus` writes a dump per
state with the ground truth for each.

Example::

    r = emu.run("scenarios/callback_roundtrip.toml")
    state = r.trace.state(r.detections[0].state)
    write_minidump(r, state, "s3.dmp")
    [detect_callback_return_pending(v) for v in read_minidump("s3.dmp").threads()]
"""

from __future__ import annotations

from emu.dump.read import DumpThread, DumpView, MemoryRegion, SystemInfo, read_minidump
from emu.dump.write import thread_id, write_minidump

__all__ = ["DumpThread", "DumpView", "MemoryRegion", "SystemInfo", "read_minidump", "thread_id", "write_minidump"]
