"""``emu run FILE --from-snapshot SNAP``: a run that goes on from a session's snapshot file."""

from __future__ import annotations

from pathlib import Path

from emu.api import Run
from emu.scenario import Scenario
from emu.session import Session
from emu.session_snapshot import Snapshot


def from_snapshot(scenario: Scenario, path: str | Path) -> Run:
    """The run of ``scenario`` with everything up to the snapshot taken from the file, the rest run now.

    Raises SnapshotError (one line, exit 2) for a file of another scenario or emu version."""
    snap = Snapshot.load(path)
    session = Session(scenario)
    session.restore(snap)
    return session.finish()
