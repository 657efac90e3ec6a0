"""Driving a service: stepping its activation until it returns, exits, blocks, calls back
or waits for a choice; and carrying on with a thread's kernel work when it gets the CPU
again or the explorer picks an option.

Part of :class:`emu.kernel.core.Kernel`, kept in its own file: the kernel's syscall hook
calls :func:`drive` once a service does more than return a status at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.context import KTrapFrame
from emu.errors import ModelBug
from emu.kernel import sched
from emu.kernel.objects import ReceiveMessage, ReleaseMutant, ReplyMessage, SendMessage, SetEvent, Wait
from emu.kernel.services import Activation, CallbackResult, Choice, Request, ScriptActivation, Sent, TerminateThread
from emu.kernel.symbolic import Symbolic
from emu.kernel.thread import KThread, PendingChoice
from emu.winnt import status_name

if TYPE_CHECKING:
    from emu.kernel.core import Kernel

OBJECT_REQUESTS = (Wait, SetEvent, ReleaseMutant, SendMessage, ReceiveMessage, ReplyMessage)


def drive(
    kernel: Kernel, thread: KThread, act: Activation | ScriptActivation, trap: KTrapFrame,
    value: Sent, resumed: bool, first: Request | int | None = None, note: str = "",
) -> None:  # fmt: skip
    """Step ``act`` (from ``value``, or with ``first`` already in hand) until the service is done
    for now: returned (sysret), ended the thread, blocked, entered a callback or stopped at a
    choice the hooks left open. ``resumed``: the service called back before (its trap frame
    comes back at sysret)."""
    req = first if first is not None else act.step(value)
    while True:
        if isinstance(req, (Choice, Symbolic)):
            answer = kernel.hooks.choose(thread, req) if isinstance(req, Choice) else kernel.hooks.symbolic(thread, req)
            if answer is None:
                # Suspend here: the explorer forks the machine and resumes with each option (or value).
                kernel.pending_choice = PendingChoice(thread.tid, act, trap, resumed, note, req)
                kernel.machine.request_stop()
                return
            req = act.step(answer)
            continue
        if isinstance(req, int):
            if act.remark:
                note = (note + "; " if note else "") + act.remark
            if resumed:
                kernel._sysret_resumed(thread, trap, req, act.spec.name, note)
            else:
                kernel._sysret_now(thread, trap.ctx, trap.via, req, act.spec.name, note)
            return
        if isinstance(req, TerminateThread):
            kernel._exit(thread, req.status, act.spec.name)
            return
        if isinstance(req, OBJECT_REQUESTS):
            done, value = sched.handle_request(kernel, thread, req)
            if not done:
                sched.block(kernel, thread, act, trap, resumed, note, req)
                return
            req = act.step(value)
            continue
        refused = kernel._callback(thread, act, trap, req, note)
        if refused is None:
            return
        status, why = refused
        note = (note + "; " if note else "") + f"callback api {req.api} refused: {status_name(status)} ({why})"
        req = act.step(CallbackResult(status))


def continue_thread(kernel: Kernel, thread: KThread) -> None:
    """Put a thread on the CPU (outside any hook) and carry on with its kernel work, if any."""
    previous = kernel.current
    if kernel.on_switch is not None and previous is not None and previous is not thread:
        kernel.on_switch(previous, thread)
    kernel.current = thread
    kernel.next_thread = None
    kernel._entry_len = 0
    kernel.machine.set_gs_base(thread.teb)
    if not thread.started:
        thread.started = True
        kernel.machine.regs.set_context(thread.entry_context)
        return
    s = thread.suspended
    if s is None:
        return
    thread.suspended = None
    kernel.machine.regs.set_context(s.trap.ctx)
    if s.kind == "entry":
        kernel._dispatch(thread, tuple(s.trap.ctx), s.trap.via)
    elif s.activation is not None:
        drive(kernel, thread, s.activation, s.trap, s.wake, s.resumed, None, s.note)


def resume(kernel: Kernel, option: str | int) -> None:
    """Continue the suspended service with ``option`` (a symbolic request: a value) (outside any hook)."""
    pending = kernel.pending_choice
    if pending is None:
        raise ModelBug("no choice is pending")
    kernel.pending_choice = None
    thread = kernel.threads[pending.tid]
    kernel._entry_len = 0
    if pending.activation is None:  # a scheduling choice
        if pending.at_entry and pending.trap is not None:
            if option == thread.name:
                kernel.current = thread
                kernel._dispatch(thread, tuple(pending.trap.ctx), pending.trap.via)
                return
            thread.suspended = sched.Suspended("entry", pending.trap)
        sched.take(kernel, str(option))
        return
    kernel.current = thread
    if pending.trap is None:
        raise ModelBug("a suspended service lost its trap frame")
    drive(kernel, thread, pending.activation, pending.trap, option, pending.resumed, None, pending.note)
