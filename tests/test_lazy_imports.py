"""`emu run` loads only what the scenario needs: no LIEF without a PE, no networkx without a graph.

Each check runs a fresh interpreter (an import made by an earlier test would hide a regression)
and looks at ``sys.modules`` after the work is done: what was imported, not how long it took.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("lief", "networkx", "matplotlib", "ray")


def _loaded_after(code: str, watch: tuple[str, ...] = HEAVY) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it leaves its answer in ``out``: the answer and the watched modules loaded."""
    program = (
        "import io, sys, contextlib\n"
        f"out = None\n{code}\n"
        f"loaded = [m for m in {watch!r} if m in sys.modules]\n"
        "import json\n"  # after the look: json is watched too
        "print(json.dumps({'out': out, 'loaded': loaded}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_emu_run_without_pe_or_graph_loads_no_lief_and_no_networkx() -> None:
    got = _loaded_after(
        "from emu.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    code = main(['run', 'scenarios/callback_roundtrip.toml'])\n"
        "out = [code, 'detections (1)' in buf.getvalue()]\n"
    )
    assert got["out"] == [0, True]  # the run really happened, detection included
    assert got["loaded"] == []


# What `emu run` does not need for a scenario that asks for no debugger, snapshot or dump.
NOT_FOR_RUN = (
    "keystone", "capstone", "emu.debug.gdbstub", "emu.session", "emu.session_snapshot", "emu.dump", "socket",
    "emu.loader.pe",  # the PE reader: the scenario's modules are assembled
    "json",  # only --json writes JSON
    "html",  # only notebooks render HTML
    "emu.kernel.rtl",  # the built-in ntdll's exception routines: this run raises no exception
)  # fmt: skip


def test_emu_run_a_second_time_assembles_and_disassembles_nothing_and_loads_no_other_command(tmp_path: Path) -> None:
    run_it = (
        "import os\n"
        f"os.environ['EMU_CACHE_DIR'] = {str(tmp_path)!r}\n"
        "from emu.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    code = main(['run', 'scenarios/callback_roundtrip.toml'])\n"
        "out = [code, buf.getvalue()]\n"
    )
    first = _loaded_after(run_it, NOT_FOR_RUN)
    # an empty cache: the runtime and the module are assembled, the detector's code decoded
    assert first["loaded"] == ["keystone", "capstone"]
    again = _loaded_after(run_it, NOT_FOR_RUN)
    assert again["loaded"] == []  # bytes and instructions come from the cache; no other command's modules
    assert again["out"] == first["out"]  # the same report, byte for byte
    assert isinstance(again["out"], list) and "detections (1)" in again["out"][1]


def test_import_emu_loads_nothing_heavy_until_a_name_is_used() -> None:
    got = _loaded_after("import emu\nout = sorted(emu.__all__)\n")
    assert "run" in got["out"] and "StateGraph" in got["out"]  # type: ignore[operator]
    assert got["loaded"] == []
    got = _loaded_after("import emu\nout = emu.StateGraph.__name__\n")
    assert got["out"] == "StateGraph"
    assert got["loaded"] == ["networkx"]  # the graph brings networkx with it, when asked for


def test_emu_graph_still_builds_the_graph() -> None:
    got = _loaded_after(
        "from emu.api import run\n"
        "r = run('scenarios/callback_roundtrip.toml')\n"
        "out = [len(r.graph), r.graph.lean.number_of_edges()]\n"
    )
    counts = got["out"]
    assert isinstance(counts, list) and len(counts) == 2 and min(counts) > 0  # states, transitions
    assert got["loaded"] == ["networkx"]


def test_unknown_attribute_of_emu_is_an_attribute_error() -> None:
    got = _loaded_after(
        "import emu\ntry:\n    emu.no_such_name\n    out = 'found'\nexcept AttributeError as e:\n    out = str(e)\n"
    )
    assert got["out"] == "module 'emu' has no attribute 'no_such_name'"


def test_the_builtin_exception_routines_load_when_the_guest_first_reaches_a_trap() -> None:
    got = _loaded_after(
        "from emu.api import run\nr = run('scenarios/exception_handled_av.toml')\nout = r.ok\n",
        ("emu.kernel.rtl",),
    )
    assert got["out"] is True  # the handler ran and every expectation holds
    assert got["loaded"] == ["emu.kernel.rtl"]  # the handler search went through RtlLookupFunctionEntry
