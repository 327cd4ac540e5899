"""The garbage collector's settings of a long-running process (`tgops serve`).

What start-up made (settings, drivers, modules) lives as long as the process: it is left
out of the collector's later passes (``gc.freeze``), and the youngest generation is
collected after ``GC_YOUNG`` new objects instead of CPython's 700, so that what a run's
step or a batch of e-mails makes mostly dies before it is promoted and full passes over
the whole heap, each one stalling the event loop, become rare.
"""

from __future__ import annotations

import gc

GC_YOUNG = 20_000
"""New objects after which the youngest generation is collected. 10,000 nodes at one
update time took 76 full passes (16 s, up to 0.59 s each) with CPython's 700 and 4 (0.8 s)
with 20,000 (bench/RESULTS.md)."""


def settle_start_up() -> tuple[int, int, int]:
    """Collect once, freeze what is left and collect the youngest generation less often;
    returns the thresholds before (``restore``)."""
    gc.collect()
    gc.freeze()
    before = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, *before[1:])
    return before


def restore(thresholds: tuple[int, int, int]) -> None:
    """The thresholds as they were (frozen objects stay frozen: they live on)."""
    gc.set_threshold(*thresholds)
