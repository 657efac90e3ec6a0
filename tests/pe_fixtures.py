"""PE fixtures compiled with mingw-w64 from ``tests/fixtures/pe/``, once, cached.

The DLLs are built into ``tests/.fixtures/pe-<hash>/``, where the hash covers the
sources, the build recipe and the compiler's version, so a change to any of them
rebuilds and an unchanged tree reuses the cache. A missing compiler is a test
failure, not a skip: CI installs it (``apt-get install -y gcc-mingw-w64-x86-64``).

Usage in a test module (the build itself is cached per process, so every module's
session fixture shares one build)::

    from pe_fixtures import PeFixtures, pe_fixtures_or_fail

    @pytest.fixture(scope="session")
    def pe_files() -> PeFixtures:
        return pe_fixtures_or_fail()

    def test_something(pe_files: PeFixtures) -> None:
        image = load_pe(pe_files.ntdll)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SOURCES = Path(__file__).resolve().parent / "fixtures" / "pe"
CACHE = Path(__file__).resolve().parent / ".fixtures"
CC = "x86_64-w64-mingw32-gcc"
DLLTOOL = "x86_64-w64-mingw32-dlltool"
INSTALL = "apt-get update && apt-get install -y gcc-mingw-w64-x86-64"

# -fno-optimize-sibling-calls keeps `call NtCallbackReturn` a call (not a tail jump), so the
# return address at [RSP] inside NtCallbackReturn is in callbacks.dll. --no-insert-timestamp
# makes the builds reproducible.
COMMON = [
    "-nostdlib",
    "-shared",
    "-O2",
    "-fno-optimize-sibling-calls",
    "-ffreestanding",
    "-fno-stack-protector",
    "-mno-stack-arg-probe",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,-e,DllEntry",
    "-Wl,--no-insert-timestamp",
]
# (output, preferred base, sources and extra compiler flags, link against the fixture ntdll's
# import library). The two ntdll variants differ only in KiUserCallbackDispatcher: a C function
# (registers convention) and a "stack"-convention one, both with unwind data that has no machine
# frame (see ntdll_like.S).
RECIPE = [
    ("ntdll.dll", 0x7FFB_0000_0000, ["ntdll_like.S", "ntdll_like.def"], False),
    (
        "ntdll_c_dispatcher.dll",
        0x7FFB_0000_0000,
        ["-DC_DISPATCHER", "ntdll_like.S", "c_dispatcher.c", "ntdll_like.def"],
        False,
    ),
    ("ntdll_seh_stack.dll", 0x7FFB_0000_0000, ["-DSEH_STACK_DISPATCHER", "ntdll_like.S", "ntdll_like.def"], False),
    ("callbacks.dll", 0x7FFA_0000_0000, ["callbacks.c", "callbacks.def"], True),
    ("program.dll", 0x1_4000_0000, ["program.c", "program.def"], True),
    ("tables.dll", 0x7FFA_1000_0000, ["tables.c", "tables.def"], False),
]


class FixtureBuildError(RuntimeError):
    """The fixtures cannot be built (no compiler, or a compile error)."""


@dataclass(frozen=True)
class PeFixtures:
    dir: Path
    ntdll: Path  # ntdll_like: every stub shape, registers-convention dispatcher, NtCallbackReturn only
    callbacks: Path  # callbacks.dll: imports from ntdll.dll by name and by ordinal
    program: Path  # program.dll: ProgramMain makes the first syscall (NtUserMessageCall)
    import_lib: Path  # libntdll.a, made from ntdll_like.def by dlltool
    ntdll_c_dispatcher: Path  # ntdll_like with a C KiUserCallbackDispatcher (registers convention)
    ntdll_seh_stack: Path  # ntdll_like with a stack-convention dispatcher whose unwind has no machine frame
    tables: Path  # tables.dll: exports a KernelCallbackTable as data (CallbackTable), and non-tables

    @property
    def dlls(self) -> tuple[Path, ...]:
        """Every DLL of the build (what the scenarios in scenarios/pe/ load from their bin/)."""
        return (self.ntdll, self.ntdll_c_dispatcher, self.ntdll_seh_stack, self.callbacks, self.program)


def _tool_version(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FixtureBuildError(f"{tool} not found: the PE fixtures need Debian's gcc-mingw-w64-x86-64 ({INSTALL})")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else path


def _key() -> str:
    h = hashlib.sha256()
    for tool in (CC, DLLTOOL):
        h.update(_tool_version(tool).encode())
    h.update(repr((COMMON, RECIPE)).encode())
    for f in sorted(SOURCES.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _run(args: list[str], cwd: Path) -> None:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        msg = " ".join((out.stderr or out.stdout).split())
        raise FixtureBuildError(f"building the PE fixtures failed: {' '.join(args)}: {msg}")


def _build(into: Path) -> None:
    _run([DLLTOOL, "-d", str(SOURCES / "ntdll_like.def"), "-l", "libntdll.a", "-D", "ntdll.dll"], into)
    for output, base, sources, links in RECIPE:
        files = [s if s.startswith("-") else str(SOURCES / s) for s in sources]
        args = [CC, *COMMON, f"-Wl,--image-base,{base:#x}", "-o", output, *files]
        _run([*args, "libntdll.a"] if links else args, into)


@cache
def build_pe_fixtures(cache_dir: Path = CACHE) -> PeFixtures:
    """Build (or reuse) the fixtures; raises FixtureBuildError with a one-line reason."""
    target = cache_dir / f"pe-{_key()}"
    if not (target / "tables.dll").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".build-"))
        try:
            _build(tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another session built it first
                if not (target / "tables.dll").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PeFixtures(
        target,
        target / "ntdll.dll",
        target / "callbacks.dll",
        target / "program.dll",
        target / "libntdll.a",
        target / "ntdll_c_dispatcher.dll",
        target / "ntdll_seh_stack.dll",
        target / "tables.dll",
    )


def pe_fixtures_or_fail() -> PeFixtures:
    """The fixtures, or a failed test (never a skip) saying what is missing."""
    try:
        return build_pe_fixtures()
    except FixtureBuildError as e:
        pytest.fail(str(e), pytrace=False)
