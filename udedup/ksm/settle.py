"""When KSM merging has settled: a pure tracker fed one :class:`KsmStats` at a time
(:class:`SettleTracker`, :func:`settle_index` over a sequence), and the polling loop around it
(:func:`wait_settled`) that :meth:`udedup.ksm.Ksm.wait_settled` runs.

Settled means both:
- ``full_scans`` advanced by at least ``min_scans`` since the start: a page needs two visits before
  ksmd tries to merge it, and the scan in progress at the start may already have passed it, so 3
  scans guarantee two full visits of every page registered before the start;
- the saved pages (``pages_sharing + ksm_zero_pages``) and ``pages_shared`` did not change across
  ``stable_scans`` consecutive full scans.
``run=2`` resets ``full_scans`` to 0: a drop is counted as a restart, not as going backwards.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from ..errors import KsmError, KsmNotRunningError, KsmTimeout, KsmValueError
from .stats import KsmStats


class SettleTracker:
    """The settle test over successive reads of the counters; no I/O, no clock."""

    def __init__(self, start: KsmStats, stable_scans: int = 2, min_scans: int = 3):
        check_scans(stable_scans, min_scans)
        self.stable_scans = stable_scans
        self.min_scans = min_scans
        self.offset = 0                 # scans counted before the last reset
        self.last_raw = start.full_scans
        self.base = start.full_scans
        self.mark = (start.saved_pages, start.pages_shared)
        self.mark_scan = self.base
        self.scans = self.base
        self.last = start

    def observe(self, stats: KsmStats) -> bool:
        """Take the next read; True once merging has settled."""
        raw = stats.full_scans
        if raw < self.last_raw:         # run=2 happened: full_scans restarted at 0
            self.offset += self.last_raw
        self.last_raw = raw
        self.scans = self.offset + raw
        self.last = stats
        now_mark = (stats.saved_pages, stats.pages_shared)
        if now_mark != self.mark:
            # the change may belong to the scan still in progress (number scans + 1): count clean
            # scans only after that one
            self.mark, self.mark_scan = now_mark, self.scans + 1
        return self.settled

    @property
    def scans_done(self) -> int:
        return self.scans - self.base

    @property
    def stable_for(self) -> int:
        return self.scans - self.mark_scan

    @property
    def settled(self) -> bool:
        return self.scans_done >= self.min_scans and self.stable_for >= self.stable_scans

    def progress(self) -> str:
        return (f"full_scans advanced by {self.scans_done} (need {self.min_scans}), saved pages "
                f"stable for {self.stable_for} scans (need {self.stable_scans})")


def settle_index(reads: Iterable[KsmStats], stable_scans: int = 2, min_scans: int = 3) -> int | None:
    """Index in ``reads`` of the first read at which merging counts as settled, the first read
    being the start; None if it never does."""
    tracker = None
    for i, stats in enumerate(reads):
        if tracker is None:
            tracker = SettleTracker(stats, stable_scans, min_scans)
        elif tracker.observe(stats):
            return i
    return None


def check_scans(stable_scans: int, min_scans: int) -> None:
    if stable_scans < 1 or min_scans < 1:
        raise KsmValueError("wait_settled: stable_scans and min_scans must be >= 1")


def check_running(run, stats: KsmStats | None = None) -> None:
    """KsmNotRunningError unless ``run`` is 1: with ksmd stopped nothing merges or settles."""
    if run != 1:
        why = {0: "stopped (run=0)", 2: "stopped and unmerging (run=2)"}.get(run, f"run={run}")
        raise KsmNotRunningError(
            f"ksmd is {why}: nothing will merge or settle; set run=1 (ksm.settings(run=1) or "
            "'udedup set run=1')", knob="run", value=run, stats=stats)


def wait_settled(read_stats: Callable[[], KsmStats], read_knob: Callable[[str], object],
                 timeout: float = 60.0, poll: float = 0.05, stable_scans: int = 2,
                 min_scans: int = 3) -> KsmStats:
    """Poll ``read_stats`` every ``poll`` seconds until :class:`SettleTracker` says settled; return
    the final stats. ``read_knob`` reads ``run`` (and, for the timeout message, the scan rate).

    Raises :class:`KsmNotRunningError` at once if ksmd is not running, and :class:`KsmTimeout`
    (``.stats`` = last counters) after ``timeout`` seconds.
    """
    check_scans(stable_scans, min_scans)
    start = read_stats()
    tracker = SettleTracker(start, stable_scans, min_scans)
    check_running(read_knob("run"), start)
    deadline = time.monotonic() + timeout
    while True:
        if tracker.observe(read_stats()):
            return tracker.last
        if time.monotonic() >= deadline:
            def maybe(name):
                try:
                    return read_knob(name)
                except KsmError:
                    return "?"
            raise KsmTimeout(
                f"KSM did not settle within {timeout:g} s: {tracker.progress()}; "
                f"run={read_knob('run')}, pages_to_scan={maybe('pages_to_scan')}, "
                f"sleep_millisecs={maybe('sleep_millisecs')}: raise pages_to_scan or the timeout",
                stats=tracker.last)
        time.sleep(poll)
