"""``emu explain``: how did the thread get to a state? Transitions, code, registers, callback stack."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import capstone

from emu.context import REGISTER_NAMES
from emu.exploration.result import Exploration
from emu.loader.image import Image, Symbolizer

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@dataclass(frozen=True)
class Step:
    """One transition on the way to the state, with what a reader needs to follow it."""

    src: str
    dst: str
    kind: str
    service: str | None
    status: str | None
    code: list[str]  # disassembly around the user RIP after the transition, `=>` at RIP
    changed: list[tuple[str, str, str]]  # (register, before, after)
    callbacks: str
    thread: str = ""  # the thread that moved, when there are several


def state_number(spec: str) -> int | None:
    """The number in a state id: ``n4``, ``s4`` and ``4`` all give 4; anything else None.

    ``sN`` is how ``emu run`` and ``emu dump`` print a state of one run, ``nN`` how
    ``emu explore`` prints a node of the explored graph; every command accepts both spellings.
    """
    digits = spec[1:] if spec[:1] in ("s", "S", "n", "N") else spec
    return int(digits) if digits.isdigit() and digits.isascii() else None


def find_node(exp: Exploration, name: str) -> str:
    """A node by id (``n4``, ``s4`` or ``4``), digest prefix, ``pending`` or ``deadlock``.

    Raises KeyError with a one-line reason: an id out of range, no match, or a digest
    prefix that matches several nodes (they are listed).
    """
    g = exp.graph.lean
    if name == "pending":
        pending = exp.pending
        if not pending:
            raise KeyError("no state is callback-return pending")
        return pending[0]
    if name == "deadlock":
        if not exp.deadlocks:
            raise KeyError("no state is deadlocked")
        return exp.deadlocks[0]
    number = state_number(name)
    if number is not None:
        if f"n{number}" in g:
            return f"n{number}"
        raise KeyError(f"no state {name!r}: the explored graph has {len(g)} states (n0..n{len(g) - 1})")
    hits = sorted(
        (str(n) for n, a in g.nodes(data=True) if name and str(a.get("digest", "")).startswith(name.lower())),
        key=lambda n: int(n[1:]),
    )
    if len(hits) == 1:
        return hits[0]
    if hits:
        shown = ", ".join(f"{n} ({g.nodes[n]['digest'][:12]})" for n in hits[:8])
        more = f" and {len(hits) - 8} more" if len(hits) > 8 else ""
        raise KeyError(f"digest prefix {name!r} matches {len(hits)} states: {shown}{more}; give more digits")
    raise KeyError(f"no state {name!r} (use a node id n0..n{len(g) - 1}, a digest prefix, or 'pending')")


def disassemble_around(
    images: list[Image], symbolize: Symbolizer, rip: int, before: int = 3, after: int = 2
) -> list[str]:
    """Instructions around ``rip`` from the enclosing symbol, ``=>`` marking RIP."""
    img = symbolize.image_at(rip)
    if img is None:
        return [f"   {rip:#x}: (not in a loaded image)"]
    start = max(img.base, rip - 0x80)
    sym = symbolize(rip)
    name = sym.split("+")[0]
    addr = symbolize.address(name) if "!" in name else None
    if addr is not None and rip - 0x400 <= addr <= rip:
        start = addr
    code = img.read(start, rip - start + 32) or b""
    insns = list(_md.disasm(code, start))
    at = next((i for i, ins in enumerate(insns) if ins.address == rip), None)
    if at is None:
        return [f"   {symbolize(rip)}: (RIP is not on an instruction boundary from {name})"]
    lines = []
    for ins in insns[max(0, at - before) : at + after + 1]:
        mark = "=>" if ins.address == rip else "  "
        lines.append(f"{mark} {symbolize(ins.address):<40} {ins.mnemonic} {ins.op_str}".rstrip())
    return lines


def explain(
    exp: Exploration, node: str, images: list[Image], symbolize: Symbolizer, names: dict[int, str] | None = None
) -> list[Step]:
    """The shortest path from the start to ``node``, one Step per transition.

    With several threads, registers are compared with the same thread's previous state.
    """
    g = exp.graph.nx
    path = exp.graph.path_to(node, "n0")
    steps = []
    last_of: dict[object, str] = {}
    for u, v in itertools.pairwise(path):
        data = g.get_edge_data(u, v)
        b = g.nodes[v]
        a = g.nodes[last_of.get(b["thread"], u)]
        last_of[b["thread"]] = v
        changed = [
            (r, str(a[f"reg_{r}"]), str(b[f"reg_{r}"])) for r in REGISTER_NAMES if a[f"reg_{r}"] != b[f"reg_{r}"]
        ]
        steps.append(
            Step(
                u, v, str(data["kind"]), data.get("service"), data.get("status"),
                disassemble_around(images, symbolize, int(str(b["rip"]), 16)),
                changed, str(b.get("callbacks", "")),
                (names or {}).get(int(str(b["thread"])), f"thread {b['thread']}") if names and len(names) > 1 else "",
            )
        )  # fmt: skip
    return steps


def render(exp: Exploration, node: str, steps: list[Step], starts: list[str] | None = None) -> str:
    """The path as text; ``starts`` (the trace's ``thread_starts``) says how each thread began."""
    g = exp.graph.nx
    out = [f"{node}: {g.nodes[node]['label']}", f"reached from n0 in {len(steps)} transition(s)"]
    if "path_condition" in g.nodes[node]:  # symbolic values (emu.symbolic)
        out.append(f"reached when {g.nodes[node]['path_condition']}")
        out.append(f"witness: {g.nodes[node].get('witness', '') or '(no symbolic value yet)'}")
    out += [f"thread start: {line}" for line in starts or ()]
    out.append("")
    for i, s in enumerate(steps, 1):
        what = s.kind + (f" {s.service}" if s.service else "") + (f" -> {s.status}" if s.status else "")
        who = f" ({s.thread})" if s.thread else ""
        out.append(f"[{i}] {s.src} -> {s.dst}{who}  {what}")
        out.append(f"    now: {g.nodes[s.dst]['label']}")
        out.append("    user code:")
        out.extend(f"      {line}" for line in s.code)
        if s.changed:
            out.append("    registers changed:")
            out.extend(f"      {r:<6} {old} -> {new}" for r, old, new in s.changed)
        out.append(f"    callback stack: {s.callbacks or '(empty)'}")
        out.append("")
    attrs = g.nodes[node]
    for key in ("deadlock", "wait_chains"):
        if key in attrs:
            out.append(f"{key.replace('_', ' ')}: {attrs[key]}")
    return "\n".join(out)
