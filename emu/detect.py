"""Detection, by its short name: ``import emu.detect as d`` gives the thread views and detectors.

``emu.detect(run)`` (the module called) is :func:`detect`: the detections of a run, or the
built-in detector on one :class:`ThreadView`. The code lives in :mod:`emu.detection`.

>>> import emu
>>> import emu.detect as d
>>> r = emu.run("scenarios/callback_roundtrip.toml")
>>> view = d.view_of(r, r.trace.state(r.detections[0].state))
>>> d.detect_callback_return_pending(view).rip
'ntdll!ZwCallbackReturn+0x14'
>>> [x.state for x in emu.detect(r)] == [x.state for x in d.detect(r)]
True
"""

from __future__ import annotations

from emu.callable_module import make_callable
from emu.detection.view import (
    Detection,
    DispatcherFrame,
    ModuleInfo,
    ThreadView,
    detect,
    detect_callback_return_pending,
    detect_run,
    dispatcher_frames,
    modules_of,
    view_from,
    view_of,
)

__all__ = [
    "Detection", "DispatcherFrame", "ModuleInfo", "ThreadView", "detect", "detect_callback_return_pending",
    "detect_run", "dispatcher_frames", "modules_of", "view_from", "view_of",
]  # fmt: skip

make_callable(__name__)
