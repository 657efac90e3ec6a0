"""The cyclic garbage collector paused around a run, and what the run allocated aged at once.

A run allocates many small records (states, transitions, register tuples) and no cycles.
With the collector on, it would rescan the growing trace again and again; with it merely
off, the first collection after the run still walks every record made during it (all of
them sit in the youngest generation): about 5 µs per callback round trip. Moving them to
the oldest generation without a walk (``gc.freeze`` then ``gc.unfreeze``) leaves them to
the next full collection, which Python starts only when the old generation has grown by
a quarter through ordinary promotions.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection inside; afterwards what was allocated counts as old (nothing is lost:
    any cycle made inside is still found by the next full collection)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if gc.get_freeze_count() == 0:  # someone else's frozen objects stay frozen
                gc.freeze()
                gc.unfreeze()
            gc.enable()
