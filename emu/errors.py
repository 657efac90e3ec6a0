"""One error base for emu, one subclass per area.

Every error carries enough context to be printed as a single line: the file and
key path for scenario errors, the RIP as ``module!symbol+0xoff`` for machine
faults, the service name for kernel errors. The CLI prints ``str(error)`` and
nothing else.
"""

from __future__ import annotations


class EmuError(Exception):
    """Base class of every error emu raises on purpose."""


class ModelBug(Exception):
    """The model broke one of its own invariants: a bug in emu, never the guest's doing.

    Deliberately not an :class:`EmuError`: nothing that reports guest faults or budgets
    catches it, so it surfaces as the bug it is (with a traceback) instead of as a fault
    recorded in the trace.
    """


class ScenarioError(EmuError):
    """A scenario file is malformed: names the file, the key path and what was expected."""

    def __init__(self, file: str, where: str, message: str, line: int | None = None) -> None:
        self.file = file
        self.where = where
        self.message = message
        self.line = line
        place = f"{file}:{line}" if line is not None else file
        at = f" [{where}]" if where else ""
        super().__init__(f"{place}{at}: {message}")


class ImageError(EmuError):
    """An image (assembly or PE) cannot be built or loaded."""


class UnimplementedImport(ImageError):
    """User code called an import the loader could not bind, so it was bound to a trap."""

    def __init__(self, label: str, importer: str = "", reason: str = "") -> None:
        self.label = label
        self.importer = importer
        self.reason = reason
        by = f" (imported by {importer})" if importer else ""
        why = f": {reason}" if reason else ""
        super().__init__(f"call to unbound import {label}{by}{why}")


class MachineFault(EmuError):
    """User code faulted: names the access, the address and the RIP as a symbol."""

    def __init__(self, message: str, rip: int = 0, rip_symbol: str = "") -> None:
        self.rip = rip
        self.rip_symbol = rip_symbol
        super().__init__(message)


class KernelError(EmuError):
    """The kernel model was asked for something it cannot do (an unimplemented service, a
    Python service that yields or returns the wrong thing, a choice option that does not
    exist). Its own broken invariants raise :class:`ModelBug` instead."""


class UnimplementedService(KernelError):
    """A system service is in the profile's table but has no implementation in this run."""

    def __init__(self, ssn: int, name: str) -> None:
        self.ssn = ssn
        self.name = name
        super().__init__(
            f"system service {name} (SSN {ssn:#x}) is not implemented: give it steps in the "
            f"scenario ([services.{name}]) or register a Python service with "
            f"@registry.syscall({name!r})"
        )


class ExtensionError(EmuError):
    """A Python service or hook given to a run raised, or cannot be loaded or bound.

    ``kind`` is "service" or "hook"; a run it stops has ``stop == kind`` and keeps its trace.
    The message names the service or hook and the cause, on one line.
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class BudgetExceeded(EmuError):
    """A run hit one of its budgets: names the budget, the limit and where it stopped."""

    def __init__(self, budget: str, limit: float | int | str, where: str = "", unit: str = "") -> None:
        self.budget = budget
        self.limit = limit
        self.where = where
        at = f" at {where}" if where else ""
        units = f" {unit}" if unit else ""
        super().__init__(f"budget '{budget}' exceeded (limit {limit}{units}){at}")


class OutputExists(EmuError):
    """An output file is already there and --force was not given."""


class OutputError(EmuError):
    """An output file cannot be written: names the path and the reason."""


class SnapshotError(EmuError):
    """A snapshot file cannot be loaded here: not emu's, another emu version, another scenario."""


class DumpError(EmuError):
    """A minidump cannot be written or read."""
