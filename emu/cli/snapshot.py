"""``emu run FILE --from-snapshot SNAP``: a run that goes on from a session's snapshot file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the session and its dump machinery load when a snapshot is read, not on every `emu run`
    from emu.api import Run
    from emu.scenario import Scenario


def from_snapshot(scenario: Scenario, path: str | Path) -> Run:
    """The run of ``scenario`` with everything up to the snapshot taken from the file, the rest run now.

    Raises SnapshotError (one line, exit 2) for a file of another scenario or emu version."""
    from emu.session import Session
    from emu.session_snapshot import Snapshot

    snap = Snapshot.load(path)
    session = Session(scenario)
    session.restore(snap)
    return session.finish()
