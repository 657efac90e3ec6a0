"""Every notebook executes top to bottom (nbclient), as a student would run it.

Each notebook is a lesson: prose, code, at least one picture, and an exercise whose
``answer`` cell (tag ``answer``) is checked by the next cell (tag ``check``). The notebooks
ship unanswered (``answer = None``): run as stored, the check says "not answered yet". The
test runs each notebook once with the answer cell replaced by the solution below (the check
must print a line starting with ``correct``) and then, in the same kernel, the cell as
shipped and the check again. They are stored with outputs stripped.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LESSONS = [
    "01_anatomy_of_a_system_call",
    "02_kernel_callback_round_trip",
    "03_nested_callbacks",
    "04_the_seed_rule",
    "05_exploring_kernel_choices",
    "06_write_and_score_a_detector",
    "07_what_a_debugger_sees",
    "08_exceptions_and_callbacks",
    "09_which_inputs_reach_the_seed_state",
    "10_stepping_through_a_callback",
]

# The answer cells as a learner who solved the exercise would write them.
SOLUTIONS = {
    "01_anatomy_of_a_system_call": 'answer = "r10"  # your answer here',
    "02_kernel_callback_round_trip": "answer = 0x2C  # your answer here",
    "03_nested_callbacks": "answer = [4, 3, 2]  # your answer here",
    "04_the_seed_rule": 'def rule(view):\n    ntdll = view.module("ntdll")\n    stub = ntdll.export("ZwCallbackReturn")\n    rip = view.context.rip\n    registers = view.kernel_mode is not False and stub < rip < ntdll.export_end(stub)\n    code = view.read(rip - 2, 2) in (b"\\x0f\\x05", b"\\xcd\\x2e")\n    stack = len(dispatcher_frames(view)) > 0\n    return registers and code and stack\n\n\nanswer = rule  # your answer here',
    "05_exploring_kernel_choices": "answer = (18, 3)  # your answer here: (distinct states, callback-return pending)",
    "06_write_and_score_a_detector": "answer = 3  # your answer here: false positives of `naive` on hard_after_callback_return",
    "07_what_a_debugger_sees": 'answer = "s13"  # your answer here',
    "08_exceptions_and_callbacks": "answer = (1, 0x20)  # your answer here: ExceptionInformation as a tuple",
    "09_which_inputs_reach_the_seed_state": 'answer = "st < 0"  # your answer here: the deadlocks\' path condition',
    "10_stepping_through_a_callback": 'answer = "r8"  # your answer here: a register name',
}


def tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def test_the_lessons_are_there() -> None:
    assert [p.stem for p in NOTEBOOKS][: len(LESSONS)] == LESSONS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store notebooks with outputs stripped"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    (answer,) = tagged(nb, "answer")
    (check,) = tagged(nb, "check")
    assert nb.cells.index(check) == nb.cells.index(answer) + 1
    assert "answer = None  # your answer here" in answer.source, "ship the exercise unanswered"
    assert check.source.startswith("if answer is None:")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_its_answer_is_correct(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    (answer,) = tagged(nb, "answer")
    (check,) = tagged(nb, "check")
    shipped = [nbformat.v4.new_code_cell(answer.source), nbformat.v4.new_code_cell(check.source)]
    answer.source = SOLUTIONS[path.stem]
    nb.cells.extend(shipped)
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert stdout(check).startswith("correct"), stdout(check)
    assert stdout(shipped[1]).startswith("not answered yet"), stdout(shipped[1])
    pictures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert pictures, "each lesson shows at least one picture"
