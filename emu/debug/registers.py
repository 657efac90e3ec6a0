"""The x86-64 register file as GDB numbers it, and the target description that says so.

GDB's remote protocol moves registers by number, in the order of the target description
the stub sends (GDB manual, "Target Descriptions" and "i386 Features"): the
``org.gnu.gdb.i386.core`` feature (general registers, RIP, EFLAGS, the segment selectors,
the x87 stack and its control registers), ``org.gnu.gdb.i386.sse`` (XMM0-15, MXCSR) and
``org.gnu.gdb.i386.segments`` (FS and GS bases: on Windows x64 user mode GS holds the TEB).
Values travel as little-endian bytes of the register's size (GDB manual, "Packets", ``g``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reg:
    """One register as GDB sees it: its name, its size in bits and its type in the description."""

    name: str
    bits: int
    type: str
    group: str = ""

    @property
    def size(self) -> int:
        return self.bits // 8


_GENERAL = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{n}" for n in range(8, 16)))
_POINTERS = {"rbp": "data_ptr", "rsp": "data_ptr"}

CORE: tuple[Reg, ...] = (
    *(Reg(n, 64, _POINTERS.get(n, "int64")) for n in _GENERAL),
    Reg("rip", 64, "code_ptr"),
    Reg("eflags", 32, "i386_eflags"),
    *(Reg(n, 32, "int32") for n in ("cs", "ss", "ds", "es", "fs", "gs")),
    *(Reg(f"st{n}", 80, "i387_ext") for n in range(8)),
    *(Reg(n, 32, "int", "float") for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")),
)
SSE: tuple[Reg, ...] = (*(Reg(f"xmm{n}", 128, "vec128") for n in range(16)), Reg("mxcsr", 32, "int", "vector"))
SEGMENTS: tuple[Reg, ...] = (Reg("fs_base", 64, "int"), Reg("gs_base", 64, "int"))

REGISTERS: tuple[Reg, ...] = (*CORE, *SSE, *SEGMENTS)
NUMBER: dict[str, int] = {r.name: i for i, r in enumerate(REGISTERS)}
G_SIZE = sum(r.size for r in REGISTERS)  # bytes in a `g` reply

# EFLAGS bits by name (Intel SDM vol. 1, 3.4.3 "EFLAGS Register").
_EFLAGS = (
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
    ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21),
)  # fmt: skip


def _feature(name: str, regs: tuple[Reg, ...], first: int, types: str = "") -> str:
    lines = [f'  <feature name="{name}">']
    if types:
        lines.append(types)
    for i, r in enumerate(regs):
        group = f' group="{r.group}"' if r.group else ""
        lines.append(f'    <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{first + i}"{group}/>')
    lines.append("  </feature>")
    return "\n".join(lines)


def target_xml() -> str:
    """The target description GDB reads with ``qXfer:features:read:target.xml``."""
    flags = "\n".join(f'      <field name="{n}" start="{b}" end="{b}"/>' for n, b in _EFLAGS)
    eflags = f'    <flags id="i386_eflags" size="4">\n{flags}\n    </flags>'
    vec = "\n".join((
        '    <vector id="v4f" type="ieee_single" count="4"/>',
        '    <vector id="v2d" type="ieee_double" count="2"/>',
        '    <vector id="v16i8" type="int8" count="16"/>',
        '    <vector id="v8i16" type="int16" count="8"/>',
        '    <vector id="v4i32" type="int32" count="4"/>',
        '    <vector id="v2i64" type="int64" count="2"/>',
        '    <union id="vec128">',
        '      <field name="v4_float" type="v4f"/>',
        '      <field name="v2_double" type="v2d"/>',
        '      <field name="v16_int8" type="v16i8"/>',
        '      <field name="v8_int16" type="v8i16"/>',
        '      <field name="v4_int32" type="v4i32"/>',
        '      <field name="v2_int64" type="v2i64"/>',
        '      <field name="uint128" type="uint128"/>',
        "    </union>",
    ))  # fmt: skip
    return "\n".join((
        '<?xml version="1.0"?>',
        '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
        '<target version="1.0">',
        "  <architecture>i386:x86-64</architecture>",
        _feature("org.gnu.gdb.i386.core", CORE, 0, eflags),
        _feature("org.gnu.gdb.i386.sse", SSE, len(CORE), vec),
        _feature("org.gnu.gdb.i386.segments", SEGMENTS, len(CORE) + len(SSE)),
        "</target>",
        "",
    ))  # fmt: skip
