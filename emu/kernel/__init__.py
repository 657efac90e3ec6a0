"""The kernel model: service registry, system call dispatch and callback stacks."""

from emu.context import KTrapFrame
from emu.kernel.core import Kernel
from emu.kernel.hooks import KernelHooks
from emu.kernel.record import Recorder
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
)
from emu.kernel.standard_services import builtin_services
from emu.kernel.thread import CallbackFrame, KThread

__all__ = [
    "HANDLE", "NTSTATUS", "ULONG", "ULONG_PTR", "Activation", "CallbackFrame", "CallbackResult",
    "KThread", "KTrapFrame", "Kernel", "KernelHooks", "Ptr", "Recorder", "ServiceRegistry", "TerminateThread", "UserCallback",
    "builtin_services",
]  # fmt: skip
