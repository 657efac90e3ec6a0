"""Assembled bytes kept on disk, by content, so a run whose text was assembled before needs no keystone.

What keystone makes of a text depends only on the text and the address it is assembled at
(and on keystone itself), so the bytes are stored under a hash of the three: emu's own
ntdll, win32u and kernel32, and a scenario's ``[[module]]`` code, are assembled once per
machine instead of at every ``emu run``, and keystone is not even imported on later runs.
Only successful assemblies are stored; an error is found again by assembling.

The folder is ``$EMU_CACHE_DIR`` if set (an empty value turns the cache off), else
``$XDG_CACHE_HOME/emu/asm`` or ``~/.cache/emu/asm``. An entry that cannot be read, or whose
check digest does not match its bytes, counts as missing; one that cannot be written is
skipped: the cache only ever saves time, never changes an answer. It holds at most
:data:`KEEP` entries of a few KiB each.
"""

from __future__ import annotations

import contextlib
import os
from importlib.util import find_spec
from pathlib import Path

from emu.errors import OutputError

try:
    from _blake2 import blake2b as blake2b  # hashlib's own blake2b, without loading OpenSSL's hashes
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import blake2b as blake2b

FORMAT = b"emu-asm-1\n"  # bump when what is stored (or how the key is made) changes
_CHECK = 16  # bytes of the blake2b digest of the stored bytes, kept in front of them
KEEP = 512  # entries kept; past that, storing one removes the oldest (a scenario edited many times)

_libraries: dict[str, bytes] = {}  # library_identity's answers, per package


def cache_dir() -> Path | None:
    """Where entries live; None when ``EMU_CACHE_DIR`` is set to the empty string."""
    chosen = os.environ.get("EMU_CACHE_DIR")
    if chosen is not None:
        return Path(chosen) if chosen else None
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "emu" / "asm"


def library_identity(package: str) -> bytes:
    """An installed package's native libraries (name, size, modification time), found without
    importing it, once per process: an upgrade of the library makes new cache keys."""
    ident = _libraries.get(package)
    if ident is None:
        ident = f"{package}?".encode()
        try:
            spec = find_spec(package)
            if spec is not None and spec.origin is not None:
                folder = Path(spec.origin).parent
                libs = sorted([*folder.glob("*.so*"), *folder.glob("lib/*.so*"), *folder.glob("lib/*.dylib")])
                parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in libs]
                ident = ";".join(parts or [str(folder)]).encode()
        except (OSError, ImportError, ValueError):
            pass
        _libraries[package] = ident
    return ident


def key(text: str, base: int) -> str:
    """The entry's name: a hash of the format, keystone's identity, the address and the text."""
    h = blake2b(FORMAT, digest_size=20)
    h.update(library_identity("keystone"))
    h.update(base.to_bytes(8, "little"))
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def load(text: str, base: int) -> bytes | None:
    """The bytes stored for ``text`` at ``base``, or None (no cache, no entry, or a damaged one)."""
    folder = cache_dir()
    return None if folder is None else read_checked(folder / key(text, base), FORMAT)


def read_checked(path: Path, fmt: bytes) -> bytes | None:
    """What :func:`write_checked` stored at ``path`` in format ``fmt``; None when the file is
    missing, of another format, or fails its check digest."""
    try:
        stored = path.read_bytes()
    except OSError:
        return None
    head, check, blob = stored[: len(fmt)], stored[len(fmt) : len(fmt) + _CHECK], stored[len(fmt) + _CHECK :]
    if head != fmt or blake2b(blob, digest_size=_CHECK).digest() != check:
        return None
    return blob


def write_checked(path: Path, fmt: bytes, blob: bytes) -> bool:
    """Store ``blob`` behind ``fmt`` and its check digest, written whole then renamed (so a reader
    never sees half of it); False when it cannot be written (a cache that cannot be written is
    only a slower next run)."""
    from emu.writing import write_atomic  # (whole, then renamed: emu's one way to replace a file)

    try:
        write_atomic(path, fmt + blake2b(blob, digest_size=_CHECK).digest() + blob)
    except OutputError:
        return False
    return True


def store(text: str, base: int, blob: bytes) -> None:
    """Keep ``blob`` for ``text`` at ``base``; written whole then renamed, so a reader never sees half of it."""
    folder = cache_dir()
    if folder is None:
        return
    if write_checked(folder / key(text, base), FORMAT, blob):
        _prune(folder)


def _prune(folder: Path) -> None:
    """Remove the oldest entries past :data:`KEEP` (runs only after keystone ran, so its cost is hidden)."""
    try:
        entries = [(e.stat().st_mtime_ns, e.name) for e in os.scandir(folder) if e.is_file()]
    except OSError:
        return
    for _, name in sorted(entries)[: max(0, len(entries) - KEEP)]:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
