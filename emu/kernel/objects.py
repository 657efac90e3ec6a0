"""Kernel objects threads wait on: events, mutants and per-thread queues of sent messages.

Semantics follow the documented behaviour (MS docs "Event Objects", "Mutex Objects",
ZwWaitForSingleObject, ZwSetEvent, ZwReleaseMutant; ReactOS ntoskrnl/ke/wait.c and
ntoskrnl/ex/event.c): a synchronization (auto-reset) event satisfies one waiter and
resets; a notification (manual-reset) event satisfies every waiter and stays set; a
mutant is owned by one thread, recursively, and passes to the first waiter when
released. A cross-thread send (win32k's SendMessage to another thread) queues a
message on the receiver and blocks the sender until the receiver's callback returns.
"""

from __future__ import annotations

from dataclasses import field

from emu.records import record


@record
class Event:
    """A named event object (KEVENT): notification (manual reset) or synchronization."""

    name: str
    manual_reset: bool = False
    signaled: bool = False

    def key(self) -> tuple[object, ...]:
        return ("event", self.name, self.manual_reset, self.signaled)


@record
class Mutant:
    """A named mutant (KMUTANT): its owning thread and recursion count."""

    name: str
    owner: int | None = None  # thread id
    count: int = 0

    def key(self) -> tuple[object, ...]:
        return ("mutant", self.name, self.owner, self.count)


KObject = Event | Mutant


@record(frozen=True)
class Message:
    """A message sent to another thread's queue; the sender waits for its reply."""

    id: int
    sender: int
    receiver: int
    api: int
    data: bytes = b""


# --- what services yield to use them ---------------------------------------------------
@record(frozen=True)
class Wait:
    """NtWaitForSingleObject: returns 0 when satisfied, STATUS_TIMEOUT if ``timeout`` and it times out."""

    handle: int
    timeout: bool = False


@record(frozen=True)
class SetEvent:
    """Signal the event behind ``handle``."""

    handle: int


@record(frozen=True)
class ReleaseMutant:
    """Release the mutant behind ``handle`` once."""

    handle: int


@record(frozen=True)
class SendMessage:
    """Queue a message on thread ``to`` and wait for the reply (the receiver's callback status)."""

    to: int
    api: int
    data: bytes = b""


@record(frozen=True)
class ReceiveMessage:
    """Wait until a sent message is queued on the calling thread; the service gets the Message."""


@record(frozen=True)
class ReplyMessage:
    """Wake the sender of ``message`` with ``status`` (the end of processing a sent message)."""

    message: Message
    status: int


ObjectRequest = Wait | SetEvent | ReleaseMutant | SendMessage | ReceiveMessage | ReplyMessage


@record
class ObjectTable:
    """Handles to objects, message queues, and who waits for what (FIFO per object)."""

    objects: dict[int, KObject] = field(default_factory=dict)
    queues: dict[int, list[Message]] = field(default_factory=dict)
    waiters: dict[int, list[int]] = field(default_factory=dict)  # handle -> thread ids, in arrival order
    next_message: int = 1

    def copy(self) -> ObjectTable:
        objects: dict[int, KObject] = {
            h: Event(o.name, o.manual_reset, o.signaled) if isinstance(o, Event) else Mutant(o.name, o.owner, o.count)
            for h, o in self.objects.items()
        }
        return ObjectTable(
            objects,
            {t: list(q) for t, q in self.queues.items()},
            {h: list(w) for h, w in self.waiters.items()},
            self.next_message,
        )

    def key(self) -> tuple[object, ...]:
        return (
            tuple((h, o.key()) for h, o in sorted(self.objects.items())),
            tuple((t, tuple(q)) for t, q in sorted(self.queues.items()) if q),
            tuple((h, tuple(w)) for h, w in sorted(self.waiters.items()) if w),
        )

    def name(self, handle: int) -> str:
        o = self.objects.get(handle)
        return f"{type(o).__name__.lower()} '{o.name}'" if o else f"handle {handle:#x}"

    def try_acquire(self, handle: int, tid: int) -> bool:
        """Satisfy a wait now if the object allows it (and take what the wait takes)."""
        o = self.objects[handle]
        if isinstance(o, Event):
            if not o.signaled:
                return False
            if not o.manual_reset:
                o.signaled = False  # a synchronization event satisfies one wait and resets
            return True
        if o.owner is None or o.owner == tid:
            o.owner, o.count = tid, o.count + 1  # mutants are acquired recursively by their owner
            return True
        return False
