"""Writing output files safely: a temporary file in the same folder, then an atomic rename.

The file gets the mode a plain ``open(path, "w")`` would give it (0666 less the umask), not
the 0600 of the temporary file. A path that cannot be written (a missing or read-only
folder, a directory in the way) is one :class:`~emu.errors.OutputError` line naming it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from emu.errors import OutputError, OutputExists


def refuse_overwrite(path: str | Path, force: bool) -> None:
    """An existing output is kept unless the user said --force; a directory is never replaced."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file name")
    if p.exists() and not force:
        raise OutputExists(f"{path} exists: pass --force to overwrite it")


def _umask() -> int:
    """The process's umask (POSIX has no call that only reads it: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    write_atomic_with(path, lambda f: f.write(payload))


def write_atomic_with(path: str | Path, fill: Callable[[BinaryIO], object]) -> None:
    """Like :func:`write_atomic`, with ``fill(file)`` writing the contents (a figure, a stream)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file name")
    tmp: str | None = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; a new file gets the umask's mode
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the file ({e.strerror or type(e).__name__})") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
