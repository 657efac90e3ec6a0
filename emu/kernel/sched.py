"""Several threads: blocking on kernel objects, waking, and choosing who runs next.

Threads switch only inside the kernel: when the running thread blocks or exits, and
(for exploration) at the entry of a visible system call or callback return, where an
explorer may let another thread go first. A thread that is not on the CPU is always
either not started yet or suspended in the kernel, with the user context to put back
(its trap frame). A single run is deterministic: the running thread keeps the CPU until
it blocks or exits, then the first runnable thread (in declaration order) takes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.context import KTrapFrame, UserContext
from emu.errors import KernelError, ModelBug
from emu.kernel.objects import (
    Event,
    Message,
    Mutant,
    ObjectRequest,
    ReceiveMessage,
    ReleaseMutant,
    ReplyMessage,
    SendMessage,
    SetEvent,
    Wait,
)
from emu.kernel.services import Activation, CallbackResult, Choice, ScriptActivation, Sent
from emu.kernel.thread import KThread, PendingChoice, Suspended
from emu.winnt import STATUS_INVALID_HANDLE, STATUS_MUTANT_NOT_OWNED, STATUS_SUCCESS, STATUS_TIMEOUT

if TYPE_CHECKING:
    from emu.kernel.core import Kernel

__all__ = ["SCHEDULE", "TIMES_OUT", "Suspended", "block", "reschedule", "wait_chains", "yield_at_entry"]

SCHEDULE = "schedule"  # the name of a scheduling Choice
TIMES_OUT = " times out"  # suffix of the option that lets a waiting thread's timeout expire


def runnable(kernel: Kernel) -> list[KThread]:
    """Threads that can take the CPU now, in declaration order."""
    out = []
    for t in kernel.threads.values():
        if t.terminated:
            continue
        s = t.suspended
        if not t.started or s is None or s.kind == "entry" or s.woken:
            out.append(t)
    return out


def can_time_out(kernel: Kernel) -> list[KThread]:
    return [
        t for t in kernel.threads.values() if t.suspended is not None and t.suspended.timeout and not t.suspended.woken
    ]


def wake(kernel: Kernel, thread: KThread, value: Sent | Message) -> None:
    """Satisfy a thread's wait: it is Ready from here on (the next transition records the wake)."""
    s = thread.suspended
    if s is None or s.kind != "blocked":
        raise ModelBug(f"thread {thread.name} is not waiting")
    s.wake, s.woken = value, True
    kernel.recorder.wakes_pending = True


def handle_request(kernel: Kernel, thread: KThread, req: ObjectRequest) -> tuple[bool, Sent | Message]:
    """Carry out an object request: (True, value to resume with) or (False, None) if the thread must wait."""
    table = kernel.objects
    if isinstance(req, Wait):
        if req.handle not in table.objects:
            return True, CallbackResult(STATUS_INVALID_HANDLE)
        if table.try_acquire(req.handle, thread.tid):
            return True, CallbackResult(STATUS_SUCCESS)
        table.waiters.setdefault(req.handle, []).append(thread.tid)
        return False, None
    if isinstance(req, SetEvent):
        o = table.objects.get(req.handle)
        if not isinstance(o, Event):
            return True, CallbackResult(STATUS_INVALID_HANDLE)
        o.signaled = True
        satisfy_waiters(kernel, req.handle)
        return True, CallbackResult(STATUS_SUCCESS)
    if isinstance(req, ReleaseMutant):
        m = table.objects.get(req.handle)
        if m is None or isinstance(m, Event):
            return True, CallbackResult(STATUS_INVALID_HANDLE)
        if m.owner != thread.tid:
            return True, CallbackResult(STATUS_MUTANT_NOT_OWNED)
        m.count -= 1
        if m.count == 0:
            m.owner = None
            satisfy_waiters(kernel, req.handle)
        return True, CallbackResult(STATUS_SUCCESS)
    if isinstance(req, SendMessage):
        if req.to not in kernel.threads or kernel.threads[req.to].terminated:
            return True, CallbackResult(STATUS_INVALID_HANDLE)
        msg = Message(table.next_message, thread.tid, req.to, req.api, req.data)
        table.next_message += 1
        receiver = kernel.threads[req.to]
        rs = receiver.suspended
        if rs is not None and rs.kind == "blocked" and rs.on == ("message",) and not rs.woken:
            wake(kernel, receiver, msg)
        else:
            table.queues.setdefault(req.to, []).append(msg)
        return False, None  # the sender waits for the reply
    if isinstance(req, ReceiveMessage):
        queue = table.queues.get(thread.tid, [])
        if queue:
            return True, queue.pop(0)
        return False, None
    if isinstance(req, ReplyMessage):
        sender = kernel.threads.get(req.message.sender)
        if sender is not None and sender.suspended is not None and sender.suspended.on == ("reply", req.message.id):
            wake(kernel, sender, CallbackResult(req.status))
        return True, CallbackResult(STATUS_SUCCESS)
    raise ModelBug(f"unknown object request {req!r}")


def waits_on(thread: KThread, req: ObjectRequest, kernel: Kernel) -> tuple[object, ...]:
    if isinstance(req, Wait):
        return ("object", req.handle)
    if isinstance(req, SendMessage):
        return ("reply", kernel.objects.next_message - 1)
    return ("message",)


def abandon(kernel: Kernel, thread: KThread) -> None:
    """A thread ended: mutants it owned are abandoned and pass on (MS docs, "Mutex Objects";
    Windows reports STATUS_ABANDONED_WAIT_0 to the next owner, the model success)."""
    for handle, m in kernel.objects.objects.items():
        if isinstance(m, Mutant) and m.owner == thread.tid:
            m.owner, m.count = None, 0
            satisfy_waiters(kernel, handle)


def satisfy_waiters(kernel: Kernel, handle: int) -> None:
    """Hand a signalled object to its waiters in arrival order, as far as it goes."""
    table = kernel.objects
    queue = table.waiters.get(handle, [])
    while queue:
        tid = queue[0]
        if not table.try_acquire(handle, tid):
            break
        queue.pop(0)
        wake(kernel, kernel.threads[tid], CallbackResult(STATUS_SUCCESS))


def time_out(kernel: Kernel, thread: KThread) -> None:
    """Let a timed wait expire: the waiter leaves the object's queue and gets STATUS_TIMEOUT."""
    s = thread.suspended
    if s is None or not s.timeout:
        raise ModelBug(f"thread {thread.name} has no wait that can time out")
    if s.on and s.on[0] == "object":
        queue = kernel.objects.waiters.get(int(str(s.on[1])), [])
        if thread.tid in queue:
            queue.remove(thread.tid)
    wake(kernel, thread, CallbackResult(STATUS_TIMEOUT))


def schedule_choice(kernel: Kernel, current: KThread | None, at_entry: bool) -> Choice | None:
    """Who may run next: the runnable threads (and timed waits that may expire), or None if only one way."""
    names = [t.name for t in runnable(kernel)]
    names += [t.name + TIMES_OUT for t in can_time_out(kernel)]
    if len(names) < (2 if at_entry else 1):
        return None
    default = current.name if current is not None and current.name in names else names[0]
    return Choice(SCHEDULE, tuple(names), default)


def block(
    kernel: Kernel, thread: KThread, act: Activation | ScriptActivation, trap: KTrapFrame, resumed: bool,
    note: str, req: ObjectRequest,
) -> None:  # fmt: skip
    """The thread waits for ``req``: off the CPU until an object, a message or a reply wakes it."""
    on = waits_on(thread, req, kernel)
    timeout = isinstance(req, Wait) and req.timeout
    thread.suspended = Suspended("blocked", trap, act, resumed, note, on, timeout)
    kernel.recorder.block(thread, tuple(trap.ctx), act.spec.name, _describe_wait(kernel, on))
    reschedule(kernel, thread)


def reschedule(kernel: Kernel, stopped: KThread) -> None:
    """The running thread stopped (blocked or exited): choose who runs next, or note a deadlock."""
    kernel.machine.request_stop()
    kernel.next_thread = None
    if stopped.terminated and len(kernel.threads) == 1:
        return  # the only thread ended: nobody runs next, nobody waits (the run is over)
    choice = schedule_choice(kernel, None, at_entry=False)
    if choice is None:
        if any(t.suspended is not None and not t.terminated for t in kernel.threads.values()):
            kernel.deadlock = wait_chains(kernel)
        return
    option = kernel.hooks.choose(stopped, choice)
    if option is None:
        kernel.pending_choice = PendingChoice(stopped.tid, None, None, False, "", choice)
        return
    take(kernel, option)


def yield_at_entry(kernel: Kernel, thread: KThread, regs: tuple[int, ...], via: str, name: str | None) -> bool:
    """At a visible system call entry another thread may go first (exploration); True if this one yields."""
    if len(kernel.threads) < 2 or not kernel.visible(name):
        return False
    choice = schedule_choice(kernel, thread, at_entry=True)
    if choice is None:
        return False
    trap = KTrapFrame(UserContext._make(regs), via)
    option = kernel.hooks.choose(thread, choice)
    if option is None:
        kernel.pending_choice = PendingChoice(thread.tid, None, trap, False, "", choice, at_entry=True)
        kernel.machine.request_stop()
        return True
    if option == thread.name:
        return False
    thread.suspended = Suspended("entry", trap)
    kernel.machine.request_stop()
    take(kernel, option)
    return True


def take(kernel: Kernel, option: str) -> None:
    """Make the thread an option names the next to run (``name times out``: its wait expires first)."""
    name = option.removesuffix(TIMES_OUT)
    target = next((t for t in kernel.threads.values() if t.name == name), None)
    if target is None:
        raise KernelError(f"no thread named {name!r} to schedule")
    if option.endswith(TIMES_OUT):
        time_out(kernel, target)
    kernel.next_thread = target


def _describe_wait(kernel: Kernel, on: tuple[object, ...]) -> str:
    if on and on[0] == "object":
        return f"waits on {kernel.objects.name(int(str(on[1])))}"
    if on and on[0] == "reply":
        return "waits for the reply to a sent message"
    return "waits for a sent message"


def wait_chains(kernel: Kernel) -> list[str]:
    """For each waiting thread, in the spirit of Wait Chain Traversal: what it waits on, who
    holds or must signal that, what that thread is doing, and on down; a cycle is a deadlock.

    >>> # e.g. "thread ui waits on mutant 'B' owned by thread worker, which waits on
    >>> #       mutant 'A' owned by thread ui (a cycle: deadlock)"
    """
    out = []
    for t in kernel.threads.values():
        if t.suspended is None or t.suspended.kind != "blocked" or t.suspended.woken:
            continue
        seen = [t.tid]
        text = f"thread {t.name}"
        cur: KThread | None = t
        first = True
        while (
            cur is not None
            and cur.suspended is not None
            and cur.suspended.kind == "blocked"
            and not cur.suspended.woken
        ):
            what, nxt = _blocker(kernel, cur)
            text += (" " if first else ", which ") + what
            first = False
            if nxt is None:
                break
            text += f" thread {nxt.name}"
            if nxt.tid in seen:
                text += " (a cycle: deadlock)"
                break
            text += _where(kernel, nxt)
            seen.append(nxt.tid)
            cur = nxt
        out.append(text)
    return out


def _blocker(kernel: Kernel, t: KThread) -> tuple[str, KThread | None]:
    s = t.suspended
    if s is None:
        return "nothing", None
    kind = s.on[0] if s.on else ""
    if kind == "object":
        h = int(str(s.on[1]))
        o = kernel.objects.objects.get(h)
        if o is not None and not isinstance(o, Event) and o.owner is not None:
            return f"waits on {kernel.objects.name(h)} owned by", kernel.threads.get(o.owner)
        return f"waits on {kernel.objects.name(h)} (no owner: someone must signal it)", None
    if kind == "reply":
        for q in kernel.objects.queues.values():
            for m in q:
                if m.id == s.on[1]:
                    return f"waits for the reply to a message (api {m.api}) not yet received by", kernel.threads.get(
                        m.receiver
                    )
        for other in kernel.threads.values():
            if other.callback_stack and other.callback_stack[-1].message_id == s.on[1]:
                return f"waits for the reply to a message (api {other.callback_stack[-1].api}) being handled by", other
        return "waits for a reply", None
    return "waits for a sent message", None


def _where(kernel: Kernel, t: KThread) -> str:
    if t.callback_stack:
        top = t.callback_stack[-1]
        if kernel.recorder.pending_at(t.state_id):  # at ZwCallbackReturn, the kernel completing the callback
            return f", at ZwCallbackReturn (preempted, Ready) in a callback for api {top.api}"
        return f", in a callback for api {top.api}"
    return ""
