"""``emu image FILE.dll``: what emu sees in a PE file.

Sections (VA range, size, protections), exports (address, name, ordinal, the SSN and
stub shape recovered from the code), forwarders, imports, and a guess at the
KiUserCallbackDispatcher entry convention. ``--json`` gives the same as one object.
Errors (a missing or malformed file) are one ``ImageError`` line; ``emu``'s ``main``
prints it and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, TextIO

from emu.cli.exit_codes import EXIT_OK
from emu.profile import get_profile, profile_names

if TYPE_CHECKING:
    from emu.loader.image import Image


def address(text: str) -> int:
    """An argparse type: an address such as 0x180000000 (or decimal)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an address such as 0x180000000, got {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"expected an address in 0..0xffffffffffffffff, got {text}")
    return value


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``image`` command to ``emu``'s subparsers (``argparse._SubParsersAction``)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "image", help="sections, exports with recovered SSNs, imports and the dispatcher convention of a PE file"
    )
    p.add_argument("file", help="a PE32+ x64 file (.dll, .exe)")
    p.add_argument("--base", type=address, default=None, help="load at this base (relocations applied)")
    p.add_argument("--profile", choices=profile_names(), default=None, help="compare recovered SSNs with a profile")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_image)
    return p


def describe(image: Image, profile: str | None = None) -> dict[str, Any]:
    """The report ``emu image`` prints, as plain data (addresses as hex strings)."""
    from emu.loader.stubs import compare_with_profile, guess_dispatcher_convention, recover_stubs, service_table

    stubs = {s.name: s for s in recover_stubs(image)}
    ordinal_of = image.export_ordinals
    exports: list[dict[str, Any]] = []
    named_ordinals = set(ordinal_of.values())
    rows: list[tuple[int, str | None, int | None]] = [(a, n, ordinal_of.get(n)) for n, a in image.exports.items()]
    rows += [(a, None, o) for o, a in image.ordinals.items() if o not in named_ordinals]
    for address, name, ordinal in sorted(rows, key=lambda r: (r[0], r[1] or "")):
        stub = stubs.get(name or "")
        exports.append({
            "address": f"{address:#x}",
            "name": name,
            "ordinal": ordinal,
            "ssn": None if stub is None or stub.ssn is None else f"{stub.ssn:#x}",
            "shape": None if stub is None else stub.shape,
            "syscall_offset": None if stub is None or stub.syscall_offset is None else f"{stub.syscall_offset:#x}",
        })  # fmt: skip
    guess = guess_dispatcher_convention(image)
    report: dict[str, Any] = {
        "name": image.name,
        "path": image.path,
        "base": f"{image.base:#x}",
        "preferred_base": None if image.preferred_base is None else f"{image.preferred_base:#x}",
        "entry": None if image.entry is None else f"{image.entry:#x}",
        "sections": [
            {
                "name": s.name,
                "start": f"{image.base + s.rva:#x}",
                "end": f"{image.base + s.rva + s.size:#x}",
                "size": f"{s.size:#x}",
                "perms": s.perms or "-",
            }
            for s in image.sections
        ],
        "exports": exports,
        "forwarders": [{"name": f.name, "ordinal": f.ordinal, "target": f.target} for f in image.forwarders],
        "imports": [
            {"dll": i.dll, "name": i.name, "ordinal": i.ordinal, "slot": f"{i.slot:#x}"} for i in image.imports
        ],
        "dispatcher_guess": {"convention": guess.convention, "evidence": guess.evidence},
    }
    if profile is not None:
        found = compare_with_profile(service_table(image), get_profile(profile))
        report["profile"] = profile
        report["ssn_disagreements"] = [
            {"service": d.service, "in_code": f"{d.in_code:#x}", "in_profile": f"{d.in_profile:#x}"} for d in found
        ]
    return report


def _print(report: dict[str, Any], out: TextIO) -> None:
    moved = report["base"] != report["preferred_base"]
    rebased = f" (relocated from {report['preferred_base']})" if moved else ""
    out.write(f"{report['name']} at {report['base']}{rebased}, entry {report['entry'] or '-'}\n")
    out.write(f"\nsections ({len(report['sections'])}):\n")
    for s in report["sections"]:
        out.write(f"  {s['name']:<10} {s['start']}..{s['end']}  {s['size']:>9}  {s['perms']}\n")
    out.write(f"\nexports ({len(report['exports'])}):\n")
    for e in report["exports"]:
        ordinal = "-" if e["ordinal"] is None else str(e["ordinal"])
        stub = f"  ssn {e['ssn']} ({e['shape']}, syscall at +{e['syscall_offset'] or '-'})" if e["ssn"] else ""
        out.write(f"  {e['address']}  {ordinal:>5}  {e['name'] or '(by ordinal)'}{stub}\n")
    out.write(f"\nforwarders ({len(report['forwarders'])}):\n")
    for f in report["forwarders"]:
        out.write(f"  {f['ordinal']:>5}  {f['name'] or '(by ordinal)'} -> {f['target']}\n")
    out.write(f"\nimports ({len(report['imports'])}):\n")
    for i in report["imports"]:
        what = i["name"] if i["name"] is not None else f"#{i['ordinal']}"
        out.write(f"  {i['slot']}  {i['dll']}!{what}\n")
    g = report["dispatcher_guess"]
    out.write(f"\nKiUserCallbackDispatcher convention: {g['convention']} (guess: {g['evidence']})\n")
    if "ssn_disagreements" in report:
        found = report["ssn_disagreements"]
        out.write(f"\nSSNs that differ from profile {report['profile']} ({len(found)}):\n")
        for d in found:
            out.write(f"  {d['service']}: {d['in_code']} in the code, {d['in_profile']} in the profile\n")


def cmd_image(args: argparse.Namespace) -> int:
    """Print the report for ``args.file``; ImageError propagates to ``emu``'s main (exit 2)."""
    from emu.loader.pe import load_pe

    report = describe(load_pe(args.file, base=args.base), args.profile)
    if args.json:
        import json  # here: only --json needs it

        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print(report, sys.stdout)
    return EXIT_OK
