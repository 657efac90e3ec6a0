"""Words a scenario file shares with the model: transition kinds, observers, ground truths.

They live at the bottom of the layers so that the scenario reader can check a file's
``[[expect]]`` keys against them without importing the trace or the detectors that give
them meaning (:mod:`emu.trace`, :mod:`emu.detection.observers`).
"""

from __future__ import annotations

from typing import Literal, get_args

TransitionKind = Literal[
    "syscall", "sysret", "callback", "callback_return", "fault", "exit", "block", "exception", "continue", "unwind"
]
KINDS: tuple[str, ...] = get_args(TransitionKind)

# Who looks at a thread (emu.detection.observers says what each one can see).
KERNEL_DEBUGGER = "kernel-debugger"
USER_CONTEXT = "user-context"
OBSERVERS: dict[str, str] = {
    KERNEL_DEBUGGER: "stops the machine anywhere: every state, the trap frame's user context",
    USER_CONTEXT: "GetThreadContext, a suspend or a minidump: threads in user mode or off the CPU, "
    "the base trap frame's context",
}

# What the kernel model knows to be true of a state (emu.detection.observers.is_true).
SEED = "seed"
WAITING_IN_CALLBACK = "waiting-in-callback"
TRUTHS: dict[str, str] = {
    SEED: "the seed's instant: in NtCallbackReturn, user RIP after ZwCallbackReturn's syscall, depth >= 1",
    WAITING_IN_CALLBACK: "blocked in the kernel at a nested system call inside a callback (depth >= 1)",
}
