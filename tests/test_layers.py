"""The package's layers: no module imports from a layer above its own.

Every ``import`` in every module counts — at the top, inside functions, under
``TYPE_CHECKING`` — because each one is a dependency a reader (and a refactoring) has to
respect. The order below is the README's "Architecture" drawing, top to bottom; a module
may import from its own layer and any layer below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "emu"

# Top to bottom, as the README draws it. A name covers the module or package and everything in it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("emu", "emu.cli", "emu.testing"),
    ("emu.api",),
    ("emu.views", "emu.dump", "emu.expect", "emu.debug"),
    ("emu.detection",),
    ("emu.exploration", "emu.symbolic", "emu.graph"),
    ("emu.engine", "emu.process_start", "emu.process_services", "emu.services", "emu.hooks"),
    ("emu.kernel", "emu.machine", "emu.cpu_state", "emu.registers", "emu.regions", "emu.trap", "emu.watchdog", "emu.collector", "emu.snapshot",
     "emu.trace"),
    ("emu.loader", "emu.runtime", "emu.scenario", "emu.address_space"),
    ("emu.winnt", "emu.profile", "emu.data", "emu.context", "emu.errors", "emu.writing", "emu.interrupts",
     "emu.vocabulary", "emu.ntcontext", "emu.records"),
)  # fmt: skip


def layer_of(module: str) -> int | None:
    """The index of the layer a dotted module name belongs to (the longest matching entry wins)."""
    best: tuple[int, int] | None = None
    for index, names in enumerate(LAYERS):
        for name in names:
            covers = module == name or module.startswith(name + ".")
            if covers and (best is None or len(name) > best[1]):
                best = (index, len(name))
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def imported(path: Path) -> list[tuple[int, str]]:
    """Every emu module ``path`` imports, anywhere in the file: (line, dotted name)."""
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def imports_in(text: str, name: str, is_package: bool) -> list[tuple[int, str]]:
    """Every emu module the source ``text`` of module ``name`` imports: (line, dotted name)."""
    package = name if is_package else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "emu"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "emu":
                continue
            for alias in node.names:
                # `from emu import interrupts` imports the submodule, not the package's __init__.
                sub = f"{source}.{alias.name}"
                out.append((node.lineno, sub if is_module(sub) else source))
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_walk_sees_every_kind_of_import() -> None:
    # The checker itself: lazy, type-only and relative imports count like top-level ones.
    text = (
        "from typing import TYPE_CHECKING\nimport emu.trace\n"
        "if TYPE_CHECKING:\n    from emu.engine import Process\n"
        "def f():\n    from emu.views import text\n    from ..kernel import core\n    from . import record\n"
    )
    found = [m for _, m in imports_in(text, "emu.kernel.sched", False)]
    assert found == ["emu.trace", "emu.engine", "emu.views.text", "emu.kernel.core", "emu.kernel.record"]
    assert (layer_of("emu.views.text") or 0) < (layer_of("emu.engine") or 0) < (layer_of("emu.kernel.sched") or 0)


def test_every_module_has_a_layer() -> None:
    missing = [module_name(p) for p in MODULES if layer_of(module_name(p)) is None]
    assert not missing, f"modules not in tests/test_layers.py LAYERS (and the README drawing): {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_runs_up_the_layers(path: Path) -> None:
    here = module_name(path)
    mine = layer_of(here)
    assert mine is not None
    upward = [
        f"{path.relative_to(ROOT)}:{line}: {here} (layer {mine}) imports {target} (layer {layer_of(target)})"
        for line, target in sorted(set(imported(path)))
        if (layer_of(target) or 0) < mine
    ]
    assert not upward, "\n".join(upward)
