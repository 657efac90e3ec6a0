"""Ctrl-C while guest code runs: stop Unicorn so the interrupt reaches Python within milliseconds.

Python runs its SIGINT handler (which raises KeyboardInterrupt) only between bytecodes of
the main thread. While the main thread sits inside ``uc.emu_start`` running guest code
with no hook firing (``jmp $``), no bytecode runs, so Ctrl-C would wait for the wall-time
budget. The C-level part of Python's handler does run at once, and it writes the signal
number to the *wakeup fd* (``signal.set_wakeup_fd``). :func:`install` points that fd at a
pipe watched by one daemon thread; when a byte arrives the thread calls ``emu_stop`` on every
machine that is running (the watchdog's way of stopping Unicorn), ``emu_start`` returns, and
the main thread raises KeyboardInterrupt at its next bytecode.

Only the ``emu`` command installs this (it owns the process); a library user's process keeps
its own signal setup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Protocol


class Stoppable(Protocol):
    def stop_for_interrupt(self) -> None: ...


running: set[Stoppable] = set()  # machines inside emu_start; Machine.run adds and removes itself
_installed = False
REPEAT = 0.02  # seconds between repeated stops: a stop that lands just before emu_start is lost
REPEAT_FOR = 0.5  # seconds to keep stopping after one Ctrl-C


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT not in data:
            continue
        until = time.monotonic() + REPEAT_FOR
        while time.monotonic() < until:
            for m in list(running):
                m.stop_for_interrupt()
            time.sleep(REPEAT)


def install() -> bool:
    """Let Ctrl-C stop running guest code (main thread only; once per process). True if installed."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # pragma: no cover - not the main interpreter
        os.close(r)
        os.close(w)
        return False
    threading.Thread(target=_watch, args=(r,), name="emu-interrupt", daemon=True).start()
    _installed = True
    return True


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C back until the block is done, then raise it (main thread only).

    For imports of native extensions (LIEF): a KeyboardInterrupt raised in Python code that
    their initialisation calls back into crosses C++ frames and aborts the process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt
