"""Each Windows fact and each shared check has one home in the source, so copies cannot drift.

The checks read the source with ``ast``: literals and names as written, not values at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {
    p.relative_to(ROOT).as_posix(): ast.parse(p.read_text(encoding="utf-8")) for p in (ROOT / "emu").rglob("*.py")
}


def _where(path: str, node: ast.AST) -> str:
    return f"{path}:{getattr(node, 'lineno', '?')}"


def _int_literals(tree: ast.AST) -> list[tuple[ast.Constant, int]]:
    return [(n, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is int]


def test_error_statuses_are_written_only_in_winnt() -> None:
    # An NTSTATUS with severity "error" is 0xC0000000 | facility | code (MS-ERREF 2.3.1), and
    # KUSER_SHARED_DATA is the page at 0x7FFE0000 (MS docs): emu.winnt names both.
    found = [
        f"{_where(path, n)}: {value:#x}"
        for path, tree in SOURCES.items()
        if path != "emu/winnt.py"
        for n, value in _int_literals(tree)
        if 0xC000_0000 <= value <= 0xCFFF_FFFF or 0x7FFE_0000 <= value < 0x7FFE_1000
    ]
    assert not found, "write these as emu.winnt names:\n" + "\n".join(found)


def test_the_literal_scan_sees_a_status() -> None:
    assert [v for _, v in _int_literals(ast.parse("x = 0xC0000008 if y else 0x102"))] == [0xC0000008, 0x102]


def test_register_order_is_written_once() -> None:
    # The x64 general registers in encoding order (rax, rcx, rdx, rbx, ...; Intel SDM vol. 2, 2.1.5)
    # is emu.context.REGISTER_NAMES; everyone else slices or iterates it.
    found = []
    for path, tree in SOURCES.items():
        for n in ast.walk(tree):
            if isinstance(n, ast.Tuple | ast.List) and len(n.elts) >= 4:
                words = [e.value for e in n.elts[:4] if isinstance(e, ast.Constant)]
                if words == ["rax", "rcx", "rdx", "rbx"]:
                    found.append(_where(path, n))
    assert len(found) == 1 and found[0].startswith("emu/context.py:"), found


@pytest.mark.parametrize(
    ("name", "homes"),
    [
        # The UCALLOUT_FRAME is laid out by the kernel model and judged plausible by one check.
        ("UCALLOUT_FRAME_SIZE", {"emu/winnt.py", "emu/kernel/callout.py", "emu/detection/view.py"}),
        # How far a stub's syscall lies from its start.
        ("STUB_WINDOW", {"emu/loader/stubs.py", "emu/detection/prologue.py", "emu/detection/signals.py"}),
    ],
)
def test_a_shared_fact_is_used_only_where_it_belongs(name: str, homes: set[str]) -> None:
    users = {
        path
        for path, tree in SOURCES.items()
        for n in ast.walk(tree)
        if (isinstance(n, ast.Name) and n.id == name) or (isinstance(n, ast.alias) and n.name == name)
    }
    assert users <= homes, f"{name} is used outside its homes: {sorted(users - homes)}"


def test_exit_codes_are_named() -> None:
    # Every subcommand returns a name from emu.cli.exit_codes, never a bare number.
    found = [
        f"{_where(path, n)}: return {n.value.value}"
        for path, tree in SOURCES.items()
        if path.startswith("emu/cli/") and path != "emu/cli/exit_codes.py"
        for n in ast.walk(tree)
        if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant) and type(n.value.value) is int
    ]
    assert not found, found


def test_files_are_replaced_atomically_in_one_place() -> None:
    found = [
        _where(path, n)
        for path, tree in SOURCES.items()
        if path != "emu/writing.py"
        for n in ast.walk(tree)
        if (isinstance(n, ast.Attribute) and n.attr in ("replace", "rename") and getattr(n.value, "id", "") == "os")
        or (isinstance(n, ast.alias) and n.name == "tempfile")
    ]
    assert not found, found


def test_where_a_function_ends_is_decided_once() -> None:
    # emu.loader.pdata.function_end: the .pdata entry, else the next export.
    defs = [
        _where(path, n)
        for path, tree in SOURCES.items()
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.name in ("function_end", "export_end", "_function_end")
    ]
    assert sorted(d.split(":")[0] for d in defs) == [
        "emu/detection/view.py",  # ModuleInfo.function_end, calling the one below
        "emu/detection/view.py",  # ModuleInfo.export_end, its older name
        "emu/loader/pdata.py",
    ], defs
