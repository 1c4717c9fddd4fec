"""Python's garbage collector tuned for the app's long-lived UI process.

A full collection walks every object (a Textual app holds hundreds of thousands) and pauses
the UI for about 100 ms. Once start-up has settled, :class:`GcTuning` freezes what start-up
made (it lives as long as the app: never walked again) and raises the thresholds
(:data:`GC_THRESHOLDS`): young garbage is still collected often and cheaply, and full
collections run in quiet moments instead (no key or click for :data:`QUIET_S`), or anyway
every few minutes. See bench/bench_dashboard.py.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from textual.app import App

GC_THRESHOLDS = (20_000, 50, 1_000)
"""Python's cyclic collector, tuned for a long-lived UI: with these thresholds young garbage
is still collected often and cheaply, and full collections run in quiet moments instead
(:meth:`GcTuning.collect_when_quiet`)."""
GC_TUNE_AFTER_S = 1.0  # after the first frame, once the start-up work has settled
GC_FULL_EVERY_S = 60.0
GC_FORCE_AFTER_S = 300.0
QUIET_S = 2.0  # no key or click for this long


class GcTuning:
    """The collector's tuning for one app: started once (:meth:`start`), told of every key
    or click (:meth:`input_seen`)."""

    def __init__(self) -> None:
        self.last_input = 0.0
        self.last_full_gc = 0.0

    def input_seen(self) -> None:
        """A key or a click: not a quiet moment."""
        self.last_input = time.monotonic()

    def start(self, app: App[Any]) -> None:
        """Tune the collector :data:`GC_TUNE_AFTER_S` from now (after the first frame, once
        start-up has settled), then look for a quiet moment every :data:`GC_FULL_EVERY_S`."""
        app.set_timer(GC_TUNE_AFTER_S, lambda: self.tune(app))

    def tune(self, app: App[Any]) -> None:
        gc.collect()
        gc.freeze()  # what start-up made lives as long as the app: never walked again
        gc.set_threshold(*GC_THRESHOLDS)
        self.last_full_gc = time.monotonic()
        app.set_interval(GC_FULL_EVERY_S, self.collect_when_quiet)

    def collect_when_quiet(self) -> None:
        """A full collection when nobody typed for a moment, or anyway after a few minutes."""
        now = time.monotonic()
        if now - self.last_input >= QUIET_S or now - self.last_full_gc >= GC_FORCE_AFTER_S:
            gc.collect()
            self.last_full_gc = now
