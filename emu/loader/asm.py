"""Assembly with keystone: bytes plus every label's address, and one-line errors.

Two keystone pitfalls shape this module (keystone-engine 0.9.2):

* Setting ``Ks.sym_resolver`` switches the number radix to 16 for that object and
  later ones (keystone issues #481, #538), so ``mov edx, 64`` would load 0x64; and
  ``call NAME`` through the resolver lands 4 bytes late. emu never sets a resolver:
  names from other modules become ``.set NAME, address`` lines.
* Keystone returns no symbol table, so label addresses are read back from a table of
  ``.quad label`` appended after the source; it leaves the layout above it untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from emu.errors import ImageError
from emu.loader import asm_cache

if TYPE_CHECKING:  # keystone loads when a text is assembled, not when its bytes come from the cache
    from keystone import KsError

Resolver = Callable[[str], int | None]
# A label at the address the text is assembled at: ``[rip + ORIGIN + 0x...]`` is an exact
# RIP-relative operand to any address in reach (keystone encodes ``[rip + constant]`` as a
# plain displacement, and ``[constant]`` sometimes as a truncated absolute one).
ORIGIN = "__emu_origin__"

_TOKEN = re.compile(r"[A-Za-z_.$?][\w.$?@]*")
_LABEL = re.compile(r"^\s*([A-Za-z_.$?][\w.$?@]*)\s*:")
_LEADING_LABELS = re.compile(r"^\s*(?:[A-Za-z_.$?][\w.$?@]*\s*:\s*)*")
_COMMENT = re.compile(r"""^((?:[^;#"']|"[^"]*"|'[^']*')*)[;#].*$""")
_REGISTER = re.compile(
    r"^(r[a-d]x|e[a-d]x|[a-d][xlh]|r[sd]i|e[sd]i|[sd]il?|r[sb]p|e[sb]p|[sb]pl?|r(?:[89]|1[0-5])[dwb]?"
    r"|[re]?ip|[c-gs]s|[xyz]mm\d+|cr\d+|dr\d+|st\d?|k[0-7])$",
    re.IGNORECASE,
)
_KEYWORDS = {
    "byte",
    "word",
    "dword",
    "qword",
    "tbyte",
    "xmmword",
    "ymmword",
    "zmmword",
    "ptr",
    "offset",
    "rel",
    "short",
    "near",
    "far",
}


def strip_comments(source: str) -> str:
    """Drop ``;`` and ``#`` comments (keystone reads ``;`` as a statement separator)."""
    return "\n".join(_COMMENT.sub(r"\1", line) if ";" in line or "#" in line else line for line in source.splitlines())


def labels_in(source: str) -> list[str]:
    """Labels defined in an assembly text, in order.

    >>> labels_in("main: nop ; start\\nloop:\\n  jmp loop")
    ['main', 'loop']
    """
    seen: dict[str, None] = {}
    for line in strip_comments(source).splitlines():
        rest = line
        while (m := _LABEL.match(rest)) is not None:
            seen.setdefault(m.group(1), None)
            rest = rest[m.end() :]
    return list(seen)


class AssemblyError(ImageError):
    """Assembly failed; ``line`` is 1-based within the source that failed, ``section`` code or data."""

    def __init__(self, message: str, line: int | None = None, text: str = "", section: str = "code") -> None:
        self.line = line
        self.text = text.strip()
        self.detail = message
        self.section = section
        where = f"line {line}: " if line is not None else ""
        shown = f" in {self.text!r}" if self.text else ""
        super().__init__(f"{where}{message}{shown}")


def assemble(source: str, base: int, resolve: Resolver | None = None) -> tuple[bytes, dict[str, int]]:
    """Assemble Intel-syntax x86-64 at ``base``; return the bytes and every label's address.

    Names the source does not define are looked up with ``resolve`` (e.g. exports of
    other modules). Numbers are decimal unless written ``0x...``.

    >>> code, labels = assemble("start: mov edx, 64\\nend: ret", 0x1000)
    >>> code.hex(), labels
    ('ba40000000c3', {'start': 4096, 'end': 4101})
    """
    source = strip_comments(source)
    names = labels_in(source)
    external = _externals(source, set(names), resolve)
    prefix = f"{ORIGIN}:\n" + "".join(f".set {n}, {a:#x}\n" for n, a in external.items())
    table = "\n__emu_label_table__:\n" + "".join(f".quad {n}\n" for n in names)
    text = prefix + source + table
    blob = asm_cache.load(text, base)  # keystone's answer depends on the text and the address only
    if blob is None:
        _refuse_hangs(source)
        blob = _assemble_text(text, base, source, set(names) | set(external) | {ORIGIN})
        asm_cache.store(text, base, blob)
    n = len(names)
    code = blob[: len(blob) - 8 * n] if n else blob
    tail = blob[len(code) :]
    return code, {name: int.from_bytes(tail[8 * i : 8 * i + 8], "little") for i, name in enumerate(names)}


def _assemble_text(text: str, base: int, source: str, known: set[str]) -> bytes:
    """keystone's bytes for ``text`` (``source`` with its prelude and label table); its errors explained."""
    from keystone import KsError

    try:
        return bytes(_ks_asm(text, base))
    except KsError as e:
        raise _explain(source, e, known) from None


def _refuse_hangs(source: str) -> None:
    """Refuse, before keystone sees them, inputs it cannot handle: non-ASCII text (its binding
    encodes ASCII), statements starting with ``[`` (it never returns), and ``.skip``-style
    directives bigger than a module may be (it builds them in memory, byte by byte)."""
    for i, line in enumerate(source.splitlines(), 1):
        bad = next((c for c in line if ord(c) > 0x7E or (ord(c) < 0x20 and c != "\t")), None)
        if bad is not None:
            raise AssemblyError(f"character {bad!r} is not printable ASCII (keystone reads ASCII only)", i, line)
        body = _LEADING_LABELS.sub("", line).lstrip()
        if body.startswith("["):
            raise AssemblyError("a statement cannot start with '[' (expected a mnemonic or a directive)", i, line)
        m = _FILL.match(body)
        if m:
            size = int(m.group(2), 0) * (int(m.group(3), 0) if m.group(3) else 1)
            if size > MAX_FILL:
                raise AssemblyError(
                    f"{m.group(1)} of {size:#x} bytes is more than a module may hold ({MAX_FILL:#x}); map big areas with [[memory]]",
                    i, line,
                )  # fmt: skip


# Keystone can loop forever on some malformed statements (keystone issues #494, #537, #551),
# and no guess at them is complete: it runs in a forked child with a deadline.
KS_DEADLINE = 5.0
MAX_FILL = 16 << 20
_FILL = re.compile(
    r"^(\.(?:skip|space|zero|fill))\s+((?:0x[0-9a-fA-F]+)|\d+)(?:\s*,\s*((?:0x[0-9a-fA-F]+)|\d+))?", re.I
)


_OWN_TEXT: contextvars.ContextVar[bool] = contextvars.ContextVar("emu_own_assembly", default=False)


@contextlib.contextmanager
def own_text() -> Iterator[None]:
    """Assemble emu's own runtime in this process: the forked child and its deadline guard
    against text a user wrote, and a fork costs more than assembling emu's ntdll."""
    token = _OWN_TEXT.set(True)
    try:
        yield
    finally:
        _OWN_TEXT.reset(token)


def _ks_asm(text: str, base: int) -> list[int]:
    """keystone's asm, in a forked child with a deadline; KsError comes back as KsError."""
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError

    if not hasattr(os, "fork") or _OWN_TEXT.get():  # non-POSIX hosts: no guard; emu's own text needs none
        return list(Ks(KS_ARCH_X86, KS_MODE_64).asm(text, base)[0] or [])
    import pickle  # the child's answer comes back pickled

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: assemble, send the outcome, leave without cleanup handlers
        os.close(read_fd)
        try:
            out: object = ("ok", bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(text, base)[0] or b""))
        except KsError as e:
            out = ("ks", e.errno)
        except BaseException as e:
            out = ("error", f"{type(e).__name__}: {e}")
        with os.fdopen(write_fd, "wb") as f:
            f.write(pickle.dumps(out))
        os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + KS_DEADLINE
    with os.fdopen(read_fd, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([f], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssemblyError(f"keystone did not finish within {KS_DEADLINE:g} s (a statement it cannot parse?)")
            chunk = os.read(f.fileno(), 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    kind, value = pickle.loads(b"".join(chunks)) if chunks else ("error", "keystone's process died")
    if kind == "ks":
        raise KsError(int(value))
    if kind == "error":
        raise AssemblyError(f"keystone failed: {value}")
    return list(value)


def _externals(source: str, local: set[str], resolve: Resolver | None) -> dict[str, int]:
    out: dict[str, int] = {}
    if resolve is None:
        return out
    for token in sorted(set(_TOKEN.findall(source)) - local):
        addr = resolve(token)
        if addr is not None:
            out[token] = addr
    return out


def _explain(source: str, error: KsError, known: set[str]) -> AssemblyError:
    """Find the first line keystone rejects on its own (every known name defined), for a one-line message."""
    from keystone import KS_ERR_ASM_SYMBOL_MISSING, KsError

    for i, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        own = set(labels_in(text))
        prefix = "".join(f".set {n}, 0\n" for n in sorted(known - own))
        try:
            _ks_asm(prefix + text, 0)
        except KsError as e:
            if e.errno == KS_ERR_ASM_SYMBOL_MISSING:
                body = _LEADING_LABELS.sub("", text)
                tokens = _TOKEN.findall(body)[1:]  # skip the mnemonic or directive
                unknown = [
                    t for t in tokens if t not in known and not _REGISTER.match(t) and t.lower() not in _KEYWORDS
                ]
                if unknown:
                    return AssemblyError(f"undefined symbol '{unknown[0]}'", i, line)
            return AssemblyError(_ks_message(e), i, line)
    return AssemblyError(_ks_message(error))


def _ks_message(e: KsError) -> str:
    return re.sub(r"\s*\(KS_ERR_\w+\)", "", str(e)).strip() or "does not assemble"


def assemble_parts(
    parts: list[tuple[str, str]], base: int, page: int, resolve: Resolver | None = None
) -> tuple[list[tuple[int, bytes]], dict[str, int]]:
    """Assemble named texts in one keystone run, each non-empty one after the first on a new page.

    Returns each part's (offset from ``base``, bytes) and every label. An error names the
    part (``AssemblyError.section``) and the line within it.
    """
    texts = [(name, strip_comments(text)) for name, text in parts]
    lines: list[str] = []
    starts: list[int] = []  # first line of each part's own text, 1-based
    for k, (_, text) in enumerate(texts):
        if k:
            lines.append(f"__emu_end{k - 1}__:")
            lines.append(f".balign {page}" if text.strip() else "")
        lines.append(f"__emu_part{k}__:")
        starts.append(len(lines) + 1)
        lines.extend(text.splitlines() or [""])
    lines.append(f"__emu_end{len(texts) - 1}__:")
    try:
        blob, labels = assemble("\n".join(lines), base, resolve)
    except AssemblyError as e:
        raise _in_part(e, texts, starts) from None
    out: list[tuple[int, bytes]] = []
    for k, (_, text) in enumerate(texts):
        begin, end = labels.pop(f"__emu_part{k}__") - base, labels.pop(f"__emu_end{k}__") - base
        if k and text.strip() and begin % page:  # the parts' offsets are the sections' layout
            raise AssemblyError(f"the {texts[k][0]} does not start on a page boundary ({begin:#x})")
        out.append((begin, blob[begin:end]))
    return out, labels


def _in_part(e: AssemblyError, texts: list[tuple[str, str]], starts: list[int]) -> AssemblyError:
    """The error with its line counted within the part it is in."""
    if e.line is None:
        return e
    k = max(j for j, s in enumerate(starts) if s <= e.line or j == 0)
    if e.line < starts[k]:
        return e
    e.line -= starts[k] - 1
    e.section = texts[k][0]
    e.args = (f"line {e.line}: {e.detail}" + (f" in {e.text!r}" if e.text else ""),)
    return e
