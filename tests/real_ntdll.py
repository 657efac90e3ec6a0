"""A real third-party ntdll for the tests: Wine's 64-bit PE ntdll.dll and win32u.dll.

The DLLs come from Debian's ``libwine`` package (``apt-get download libwine``), unpacked
with ``dpkg-deb`` and cached under ``$XDG_CACHE_HOME/emu/real-ntdll/`` (default
``~/.cache``), so a machine downloads them once. ``EMU_REAL_NTDLL_DIR`` may name a folder
that already holds ``ntdll.dll`` and ``win32u.dll`` (another Wine build, say) instead.

A failure to fetch them is a test failure, not a skip: CI runs these tests (it has run
``apt-get update``). :func:`install_real_scenarios` copies the DLLs, and the compiled
callbacks DLL of ``tests/fixtures/real/real_callbacks.c``, into ``scenarios/real/bin/``,
where the shipped scenarios in ``scenarios/real/`` load them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAL_BIN = ROOT / "scenarios" / "real" / "bin"
REAL_SOURCES = Path(__file__).resolve().parent / "fixtures" / "real"
PACKAGE = "libwine"
MEMBER_DIR = "usr/lib/x86_64-linux-gnu/wine/x86_64-windows/"
DLLS = ("ntdll.dll", "win32u.dll")


class RealNtdllError(RuntimeError):
    """The real ntdll cannot be had (no apt, no network, an unexpected package layout)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emu" / "real-ntdll"


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RealNtdllError(f"{' '.join(cmd)}: {e}") from None
    if done.returncode != 0:
        raise RealNtdllError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return done.stdout


@cache
def wine_dlls() -> Path:
    """A folder holding Wine's ntdll.dll and win32u.dll (x86-64 PE builds)."""
    given = os.environ.get("EMU_REAL_NTDLL_DIR")
    if given:
        folder = Path(given)
        missing = [d for d in DLLS if not (folder / d).is_file()]
        if missing:
            raise RealNtdllError(f"EMU_REAL_NTDLL_DIR={given} has no {', '.join(missing)}")
        return folder
    dest = cache_dir() / PACKAGE
    if all((dest / d).is_file() for d in DLLS) and (dest / "SOURCE").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", PACKAGE], work)
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise RealNtdllError(f"apt-get download {PACKAGE} left no .deb")
        deb = debs[0]
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        staging = work / "out"
        staging.mkdir()
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isfile() and name.startswith(MEMBER_DIR) and name[len(MEMBER_DIR) :] in DLLS:
                        src = tar.extractfile(member)
                        if src is not None:
                            (staging / name[len(MEMBER_DIR) :]).write_bytes(src.read())
        missing = [d for d in DLLS if not (staging / d).is_file()]
        if missing:
            raise RealNtdllError(f"{deb.name} holds no {MEMBER_DIR}{', '.join(missing)}")
        (staging / "SOURCE").write_text(f"{deb.name} sha256 {digest}\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(staging, dest)
    return dest


@cache
def build_real_callbacks() -> Path:
    """real_callbacks.dll from ``tests/fixtures/real/``, linked against mingw-w64's libntdll.a
    and a dlltool import library for win32u.dll; cached by sources and compiler version."""
    from pe_fixtures import CACHE, CC, COMMON, DLLTOOL, _run, _tool_version

    h = hashlib.sha256()
    for tool in (CC, DLLTOOL):
        h.update(_tool_version(tool).encode())
    h.update(repr(COMMON).encode())
    for f in sorted(REAL_SOURCES.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    target = CACHE / f"real-{h.hexdigest()[:16]}"
    dll = target / "real_callbacks.dll"
    if not dll.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".build-"))
        try:
            _run([DLLTOOL, "-d", str(REAL_SOURCES / "win32u.def"), "-l", "libwin32u.a", "-D", "win32u.dll"], tmp)
            src = [str(REAL_SOURCES / n) for n in ("real_callbacks.c", "real_callbacks.def")]
            _run([CC, *COMMON, "-Wl,--image-base,0x7ffa00000000", "-o", dll.name, *src, "libwin32u.a", "-lntdll"], tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # built by another session first
                if not dll.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dll


@cache
def build_exceptions_dll() -> Path:
    """exceptions.dll from ``tests/fixtures/real/exceptions.c``: a vectored handler and a
    frame-based (__try1) handler, linked against libntdll.a and an import library for
    ntdll's __C_specific_handler; cached by sources and compiler version."""
    from pe_fixtures import CACHE, CC, COMMON, DLLTOOL, _run, _tool_version

    h = hashlib.sha256()
    for tool in (CC, DLLTOOL):
        h.update(_tool_version(tool).encode())
    h.update(repr(COMMON).encode())
    for name in ("exceptions.c", "exceptions.def", "ntdll_seh.def"):
        h.update(name.encode() + b"\0" + (REAL_SOURCES / name).read_bytes())
    target = CACHE / f"exceptions-{h.hexdigest()[:16]}"
    dll = target / "exceptions.dll"
    if not dll.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".build-"))
        try:
            _run([DLLTOOL, "-d", str(REAL_SOURCES / "ntdll_seh.def"), "-l", "libntdll_seh.a", "-D", "ntdll.dll"], tmp)
            src = [str(REAL_SOURCES / n) for n in ("exceptions.c", "exceptions.def")]
            _run(
                [CC, *COMMON, "-Wl,--image-base,0x7ffa00000000", "-o", dll.name, *src, "libntdll_seh.a", "-lntdll"], tmp
            )
            try:
                os.replace(tmp, target)
            except OSError:  # built by another session first
                if not dll.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dll


def install_real_scenarios() -> Path:
    """Put the real DLLs and the compiled callbacks DLL where ``scenarios/real/*.toml`` expect them."""
    src = wine_dlls()
    callbacks = build_real_callbacks()
    REAL_BIN.mkdir(parents=True, exist_ok=True)
    for name in DLLS:
        _copy_if_changed(src / name, REAL_BIN / name)
    _copy_if_changed(callbacks, REAL_BIN / "real_callbacks.dll")
    _copy_if_changed(build_exceptions_dll(), REAL_BIN / "exceptions.dll")
    return REAL_BIN


def _copy_if_changed(src: Path, dst: Path) -> None:
    if not dst.is_file() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)
