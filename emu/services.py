"""Python kernel services: system services written as Python functions, with typed arguments.

A service is registered by its ``Nt`` name in a :class:`ServiceRegistry`. Its parameters
after the context are annotated with an argument type (:class:`Ptr`, :class:`HANDLE`,
:class:`ULONG`, :class:`ULONG_PTR`, :class:`NTSTATUS`); the kernel model decodes them from
the system call's registers (RCX as R10, RDX, R8, R9) and the user stack (arguments 5 and
on, above the return address and the 0x20 bytes of home space), masked to the type's width::

    from emu.services import HANDLE, Ptr, ServiceRegistry, UserCallback

    registry = ServiceRegistry()

    @registry.syscall("NtQueryValue")
    def query_value(ctx, Handle: HANDLE, Out: Ptr) -> int:
        ctx.write(Out, (42).to_bytes(4, "little"))
        return 0  # STATUS_SUCCESS

A service returns an NTSTATUS, or is a generator that yields requests first
(:class:`UserCallback` to call back into user mode, :class:`Choice` to let an explorer
follow every option, :class:`TerminateThread`) and then returns one. ``ctx`` reads and
writes the calling thread's user memory; ``ctx.thread_id`` names the thread.

What a service keeps between calls must live in guest memory or in the generator's own
locals: an explorer forks the machine (memory, kernel model) at each choice and rebuilds a
suspended generator by replaying what it was sent and read, so module globals would be
shared between the branches.

Giving services to a run: ``emu.run(scenario, services=registry)``, ``emu.explore(...,
services=registry)``, ``emu run FILE --services package.module:registry --allow-python``,
or a scenario's ``[python] services = "package.module:registry"`` (run only with
``--allow-python`` / ``allow_python=True``: a scenario is data unless its reader allows
more). A Python service replaces a built-in one of the same name, and the scenario's own
``[services.*]`` script of that name (the run's notes say so). One whose name has no
service number in the loaded ntdll/win32u (or, with the built-in ntdll, the profile) is
refused: one line, at build.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from emu.errors import ExtensionError, ScenarioError
from emu.kernel.services import (
    HANDLE,
    NTSTATUS,
    ULONG,
    ULONG_PTR,
    ArgType,
    CallbackResult,
    Choice,
    Ptr,
    ServiceContext,
    ServiceGen,
    ServiceRegistry,
    TerminateThread,
    UserCallback,
)
from emu.scenario import Scenario

__all__ = [
    "HANDLE", "NTSTATUS", "ULONG", "ULONG_PTR", "ArgType", "CallbackResult", "Choice", "Ptr", "ServiceContext",
    "ServiceGen", "ServiceRegistry", "TerminateThread", "UserCallback", "bind", "load", "reference", "services_for",
]  # fmt: skip

Services = ServiceRegistry | str  # a registry, or "package.module:name" naming one


def load(ref: str, folders: Sequence[str | Path] = ()) -> ServiceRegistry:
    """Import ``"package.module:name"`` and return that ServiceRegistry.

    ``folders`` (a scenario's own, the working folder) are searched first for the module.
    Raises ExtensionError, one line, when the module cannot be imported or the name is not
    a registry.
    """
    module_name, colon, attr = ref.partition(":")
    if not colon or not module_name or not attr:
        raise ExtensionError("service", f"services {ref!r}: expected 'package.module:name'")
    added = [str(Path(f).resolve()) for f in folders]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ExtensionError("service", f"services {ref!r}: cannot import {module_name}: {e}") from None
    except Exception as e:  # the module's own code failed while importing
        raise ExtensionError(
            "service", f"services {ref!r}: importing {module_name} raised {type(e).__name__}: {e}"
        ) from None
    finally:
        if sys.path[: len(added)] == added:
            del sys.path[: len(added)]
    registry = getattr(module, attr, None)
    if not isinstance(registry, ServiceRegistry):
        got = "nothing" if registry is None else type(registry).__name__
        raise ExtensionError("service", f"services {ref!r}: {module_name}.{attr} is {got}, expected a ServiceRegistry")
    return registry


def reference(services: Services) -> str:
    """``"package.module:name"`` for services to send to worker processes (``emu.explore(...,
    workers=N)``): a string as given; a registry by the module attribute that holds it, found
    in the modules its services are defined in. Each worker imports that module again.

    Raises ExtensionError, one line, for a registry no importable module holds (one built in
    a function, or in ``__main__``): it cannot be sent to a fresh Python process.
    """
    if isinstance(services, str):
        return services
    for module_name in dict.fromkeys(getattr(s.func, "__module__", "") for s in services.specs()):
        module = sys.modules.get(module_name or "")
        if module is None or module_name == "__main__" or not getattr(module, "__file__", None):
            continue
        for attr, value in vars(module).items():
            if value is services:
                return f"{module_name}:{attr}"
    names = ", ".join(services.names()) or "no services"
    raise ExtensionError(
        "service",
        f"services ({names}): worker processes import services by name, and no module holds this "
        f'registry: define it at module level in an importable module and pass "package.module:name", '
        f"or explore with one worker",
    )


def services_for(scenario: Scenario, given: Services | None = None) -> ServiceRegistry | None:
    """The Python services of a run: the scenario's ``[python] services`` (when its reader
    allowed Python) and ``given``, in one registry; None when there are none."""
    parts: list[ServiceRegistry] = []
    for ref in scenario.python_services:
        if not scenario.allow_python:
            raise ScenarioError(
                scenario.path, "python.services",
                f"{ref!r} is Python code; scenarios are data unless you pass --allow-python (allow_python=True)",
                scenario.line_of("python", "services"),
            )  # fmt: skip
        try:
            parts.append(load(ref, (Path(scenario.path).parent, Path.cwd())))
        except ExtensionError as e:
            raise ScenarioError(
                scenario.path, "python.services", str(e), scenario.line_of("python", "services")
            ) from None
    if isinstance(given, str):
        parts.append(load(given))
    elif given is not None:
        parts.append(given)
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    merged = ServiceRegistry()
    for reg in parts:
        for spec in reg.specs():
            if spec.name in merged:
                raise ExtensionError("service", f"service {spec.name} is registered by two of the run's registries")
            merged.put(spec)
    return merged


def bind(
    registry: ServiceRegistry, shared: frozenset[str], python: ServiceRegistry | None, scenario: Scenario,
    numbers: Mapping[str, int], table: str, notes: list[str],
) -> frozenset[str]:  # fmt: skip
    """Add the run's Python services to the kernel's ``registry``; the services an explorer
    may interleave threads at, with them (a Python service may touch anything).

    ``numbers`` is the run's service table and ``table`` says where it comes from (for the
    error): a name with no number there could never be called, so it is refused. A Python
    service replaces the scenario's script of the same name, said in ``notes``.
    """
    if python is None:
        return shared
    for spec in python.specs():
        if spec.name in scenario.services:
            notes.append(f"the Python service {spec.name} replaces the scenario's [services.{spec.name}] script")
        if spec.name not in numbers:
            raise ExtensionError(
                "service",
                f"service {spec.name} has no system service number in {table}: "
                f"add [profile] ssn = {{ {spec.name} = 0x... }} to the scenario, or load an image whose stub has it",
            )
        registry.put(spec)
    return shared | frozenset(python.names())
