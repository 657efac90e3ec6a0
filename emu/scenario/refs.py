"""References to labels ("module!label") and the [kernel_callback_table] that is made of them."""

from __future__ import annotations

from typing import Any

from emu.loader.asm import labels_in
from emu.scenario.layout import CALLBACK_TABLE_SIZE, MAX_TABLE
from emu.scenario.model import ModuleSpec
from emu.scenario.reader import _ID, _kind, _Reader


def _labels(m: ModuleSpec) -> list[str]:
    return labels_in(m.data) + labels_in(m.code)


def _check_ref(
    r: _Reader,
    ref: str,
    path: tuple[str | int, ...],
    modules: tuple[ModuleSpec, ...],
    labels: set[tuple[str, str]],
    external: tuple[str, ...] = (),
) -> None:
    if not _ID.match(ref):
        raise r.fail(path, f'expected "module!label" or "label", got {ref!r}')
    mod, bang, lab = ref.partition("!")
    if bang:
        if mod.lower() in ("ntdll", "win32u") or mod in external:
            return  # checked against the loaded images when the run is built
        if not any(m.name == mod for m in modules):
            declared = ", ".join([m.name for m in modules] + list(external))
            raise r.fail(path, f"no module named {mod!r} (declared: {declared})")
        if (mod, lab) not in labels:
            raise r.fail(path, f"module {mod!r} has no label {lab!r}")
    else:
        owners = [mod for (mod, lab) in labels if lab == ref]
        if not owners and external:
            return  # may be an export of a PE module: checked when the run is built
        if not owners:
            raise r.fail(path, f"no module defines label {ref!r}")
        if len(owners) > 1:
            raise r.fail(
                path, f'label {ref!r} is defined in several modules ({", ".join(sorted(owners))}); write "module!{ref}"'
            )


def _callback_table(
    r: _Reader,
    obj: Any,
    modules: tuple[ModuleSpec, ...],
    labels: set[tuple[str, str]],
    external: tuple[str, ...] = (),
) -> tuple[dict[int, str], int, str | None]:
    """(entries by index, size, ``from``): size 0 means "as many as the exported table holds"."""
    path: tuple[str | int, ...] = ("kernel_callback_table",)
    if not isinstance(obj, dict):
        raise r.fail(path, f"expected a table, got {_kind(obj)}")
    entries: dict[int, str] = {}
    for key, val in obj.items():
        if key in ("size", "from"):
            continue
        if not key.isdigit():
            raise r.fail(path + (key,), f"unknown key '{key}' (expected 'size', 'from' or an api number such as 2)")
        if not isinstance(val, str):
            raise r.fail(path + (key,), f'expected "module!label", got {_kind(val)}')
        _check_ref(r, val, path + (key,), modules, labels, external)
        entries[int(key)] = val
    source = None
    if "from" in obj:
        source = r.str_(obj, "from", path)
        if "!" not in source:
            raise r.fail(path + ("from",), f'expected "module!export" (a table exported as data), got {source!r}')
        _check_ref(r, source, path + ("from",), modules, labels, external)
    need = max(entries, default=-1) + 1
    size = CALLBACK_TABLE_SIZE.read(r, obj, "size", path, 0 if source else max(need, 1))
    for idx in entries:
        if idx >= (size or MAX_TABLE):
            raise r.fail(path + (str(idx),), f"callback index {idx} is out of range (table size {size or MAX_TABLE})")
    return dict(sorted(entries.items())), size, source
