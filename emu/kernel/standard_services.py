"""The services every run has, registered by name (NtCallbackReturn is the kernel's own), and
NtUserGetMessage as win32k serves sent messages; see :mod:`emu.kernel.services` for how a
service is written.
"""

from __future__ import annotations

from emu.kernel.objects import Message, ReceiveMessage, ReleaseMutant, ReplyMessage, SetEvent, Wait
from emu.kernel.services import (
    HANDLE,
    NTSTATUS,
    ULONG,
    CallbackResult,
    Ptr,
    ServiceContext,
    ServiceGen,
    ServiceRegistry,
    TerminateThread,
    UserCallback,
)
from emu.kernel.services import Request as Request  # resolves ServiceGen's "Request" in these signatures
from emu.winnt import STATUS_INVALID_HANDLE


def builtin_services(registry: ServiceRegistry) -> ServiceRegistry:
    """Register the services every run has (NtCallbackReturn is the kernel's own)."""

    @registry.syscall("NtWaitForSingleObject")
    def wait_for_single_object(ctx: ServiceContext, Handle: HANDLE, Alertable: ULONG, Timeout: Ptr) -> ServiceGen:
        """Wait until the object is signalled; with a Timeout, the wait may also expire (a choice)."""
        # MS docs ZwWaitForSingleObject: a NULL Timeout waits forever.
        result = yield Wait(Handle, timeout=Timeout != 0)
        return result.status if isinstance(result, CallbackResult) else 0

    @registry.syscall("NtSetEvent")
    def set_event(ctx: ServiceContext, EventHandle: HANDLE, PreviousState: Ptr) -> ServiceGen:
        """Signal an event (MS docs ZwSetEvent)."""
        result = yield SetEvent(EventHandle)
        return result.status if isinstance(result, CallbackResult) else 0

    @registry.syscall("NtReleaseMutant")
    def release_mutant(ctx: ServiceContext, MutantHandle: HANDLE, PreviousCount: Ptr) -> ServiceGen:
        """Release a mutant the caller owns (ReactOS ntoskrnl/ex/mutant.c)."""
        result = yield ReleaseMutant(MutantHandle)
        return result.status if isinstance(result, CallbackResult) else 0

    @registry.syscall("NtTerminateThread")
    def terminate_thread(ctx: ServiceContext, ThreadHandle: HANDLE, ExitStatus: NTSTATUS) -> ServiceGen:
        """End the calling thread (only NtCurrentThread(), handle -2, is modelled)."""
        # MS docs ZwTerminateThread; NtCurrentThread() is (HANDLE)-2 (wdm.h).
        if ThreadHandle not in (0xFFFF_FFFF_FFFF_FFFE, 0):
            return STATUS_INVALID_HANDLE  # other threads arrive with several threads
        yield TerminateThread(ExitStatus)
        return 0

    return registry


def get_message_service(registry: ServiceRegistry) -> ServiceRegistry:
    """NtUserGetMessage as win32k handles sent messages: deliver one by a callback, then reply."""

    @registry.syscall("NtUserGetMessage")
    def get_message(ctx: ServiceContext, Msg: Ptr, Hwnd: HANDLE, MinFilter: ULONG, MaxFilter: ULONG) -> ServiceGen:
        """Wait for a message sent by another thread, call it back (its api), reply with the status."""
        # win32k delivers a sent message to the receiving thread through a user-mode callback
        # and releases the sender when the callback returns (MS docs "About Messages": SendMessage).
        msg = yield ReceiveMessage()
        if not isinstance(msg, Message):
            return 0
        result = yield UserCallback(msg.api, msg.data, message=msg.id)
        status = result.status if isinstance(result, CallbackResult) else 0
        yield ReplyMessage(msg, status)
        return 1

    return registry
