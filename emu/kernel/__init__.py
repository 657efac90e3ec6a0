"""The kernel model: service registry, system call dispatch and callback stacks."""

from emu.context import KTrapFrame
from emu.kernel.core import CallbackFrame, Kernel, KThread
from emu.kernel.services import (
    HANDLE,
    NTSTATUS,
    ULONG,
    ULONG_PTR,
    Activation,
    CallbackResult,
    Ptr,
    ServiceRegistry,
    TerminateThread,
    UserCallback,
    builtin_services,
)

__all__ = [
    "HANDLE", "NTSTATUS", "ULONG", "ULONG_PTR", "Activation", "CallbackFrame", "CallbackResult",
    "KThread", "KTrapFrame", "Kernel", "Ptr", "ServiceRegistry", "TerminateThread", "UserCallback",
    "builtin_services",
]  # fmt: skip
