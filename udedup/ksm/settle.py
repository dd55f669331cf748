"""When KSM merging has settled: a pure tracker fed one read of the counters at a time
(:class:`SettleTracker`), the same test over a recorded series (:func:`settle_point`,
:func:`settle_index`), and the polling loop around it (:func:`wait_settled`) that
:meth:`udedup.ksm.Ksm.wait_settled` runs.

Settled means both:

- ``full_scans`` advanced by at least ``min_scans`` since the start: a page needs two visits before
  ksmd tries to merge it, and the scan in progress at the start may already have passed it, so 3
  scans guarantee two full visits of every page registered before the start;
- over the *plateau window* -- the reads since the last one taken at least ``stable_scans + 1``
  full-scan advances ago, so that ``stable_scans`` whole scans lie inside it even though the change
  seen in a read may belong to the scan still in progress -- the saved pages (``pages_sharing +
  ksm_zero_pages``) show no trend, only jitter:

  * ``tolerance=0``: exact equality; the saved pages and ``pages_shared`` are the same in every read
    of the window (static memory, synthetic workloads);
  * ``tolerance>0`` (default :data:`DEFAULT_TOLERANCE`): the window's per-scan levels (the median of
    the reads taken while ``full_scans`` had one value) have a Theil-Sen slope -- the median of
    the slopes between every two levels, in pages per full scan -- within the *band*
    ``tolerance * plateau + floor_pages`` pages per scan, and the newest level is within one band
    of the plateau. Live memory (virtual machines, programs that keep writing) never repeats its
    counters exactly: a copy-on-write break takes a page out, ksmd merges it back two visits
    later, and the saving moves by a few pages per scan forever.

The plateau's figure is the median of the window's saved pages, and the read that carries it (the
newest read whose saved pages are that median: one real read, so its counters agree with each
other) is what :func:`wait_settled` returns. With ``tolerance=0`` every read of the window has the
same saving and the newest read is returned, as before.

``run=2`` resets ``full_scans`` to 0: a drop is counted as a restart, not as going backwards.

Why the default band: measured on live memory here (``tests/data/settle_live.csv``, two processes
of 200 MiB of identical pages rewriting 50 random pages a second each), the saving moves by up to
±12 pages per full scan around 51,190 pages, and the Theil-Sen slope of a 3-scan window stays
within ±11 pages per scan; a merge still progressing at 1 % per scan (512 pages per scan there) is
5 times the band (0.2 % of 51,190 + 32 = 134 pages per scan), jitter a twelfth of it.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

from ..errors import KsmError, KsmNotRunningError, KsmTimeout, KsmValueError
from .stats import KsmStats

#: Relative part of the band: a plateau may still move by this fraction of its saving per full scan.
DEFAULT_TOLERANCE = 0.002
#: Absolute part of the band, in pages per full scan: jitter of small savings.
DEFAULT_FLOOR_PAGES = 32
#: A window holding more reads (ksmd stopped or scanning slowly, a long-running daemon) keeps every
#: other one between its first and its last: memory stays bounded, the medians barely move.
MAX_WINDOW_READS = 4096


@dataclass(frozen=True)
class Plateau:
    """Where a series settled, and its robust figure."""

    index: int                  # the read at which it counted as settled (0 = the start)
    start_index: int            # the first read of the plateau window
    median_index: int           # the newest read whose saved pages are the plateau's median
    scans: int                  # full scans advanced since the start
    seconds: float | None       # since the start (None without timestamps)
    saved_pages: int            # median of the saved pages over the window
    trend: float                # pages per full scan (Theil-Sen over the per-scan levels)
    band: float                 # the allowed |trend| (0 for exact equality)
    reads: int                  # reads in the window
    scan_span: int              # full-scan advances the window spans

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Read:
    index: int
    x: int                      # full scans (with resets counted); the start read counts one less
    saved: int
    exact: object               # what tolerance=0 compares
    t: float | None
    item: object                # the KsmStats, when there is one


def theil_sen(points: Sequence[tuple[float, float]]) -> float:
    """Median of the slopes between every two points with different x (0.0 if there is none)."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
              for x2, y2 in points[i + 1:] if x2 != x1]
    return statistics.median(slopes) if slopes else 0.0


class SettleTracker:
    """The settle test over successive reads (module docstring); no I/O, no clock.

    Feed it :class:`KsmStats` with :meth:`observe`, or bare figures with :meth:`add`. ``settled``
    and ``plateau`` are judged when ``full_scans`` advances; a read in between can only take a
    settled verdict back (a change with ``tolerance=0``; a level outside the band otherwise).
    """

    def __init__(self, start: KsmStats | None = None, stable_scans: int = 2, min_scans: int = 3,
                 tolerance: float = DEFAULT_TOLERANCE, floor_pages: int = DEFAULT_FLOOR_PAGES):
        check_settle(stable_scans, min_scans, tolerance, floor_pages)
        self.stable_scans, self.min_scans = stable_scans, min_scans
        self.tolerance, self.floor_pages = float(tolerance), floor_pages
        self.span = stable_scans + 1
        self.offset = 0                 # scans counted before the last reset
        self.last_raw: int | None = None
        self.base = self.scans = 0
        self.t0: float | None = None
        self.count = 0                  # reads taken
        self.window: deque[_Read] = deque()
        self.plateau: Plateau | None = None
        self.trend: float | None = None     # of the last judgement, for progress()
        self.band: float | None = None
        self.last = start
        if start is not None:
            self.observe(start)

    def observe(self, stats: KsmStats) -> bool:
        """Take the next read; True while merging counts as settled."""
        return self.add(stats.full_scans, stats.saved_pages, t=stats.timestamp,
                        exact=(stats.saved_pages, stats.pages_shared), item=stats)

    def add(self, full_scans: int, saved_pages: int, t: float | None = None, exact=None,
            item=None) -> bool:
        """Take the next read as figures (``exact``: what must stay equal with ``tolerance=0``,
        default the saved pages); True while merging counts as settled."""
        raw = int(full_scans)
        if self.last_raw is not None and raw < self.last_raw:   # run=2: full_scans restarted at 0
            self.offset += self.last_raw
        self.last_raw = raw
        first = self.count == 0
        advanced = not first and self.offset + raw > self.scans
        self.scans = self.offset + raw
        if first:
            self.base, self.t0 = self.scans, t
        read = _Read(self.count, self.scans - 1 if first else self.scans, int(saved_pages),
                     int(saved_pages) if exact is None else exact, t, item)
        self.count += 1
        self.last = item if item is not None else self.last
        self.window.append(read)
        limit = self.scans - self.span
        while len(self.window) >= 2 and self.window[1].x <= limit:
            self.window.popleft()
        if len(self.window) > MAX_WINDOW_READS:
            reads = list(self.window)
            self.window = deque([reads[0], *reads[1:-1:2], reads[-1]])
        if advanced:
            self.plateau = self._judge()
        elif self.plateau is not None and not self._still(read):
            self.plateau = None
        return self.plateau is not None

    @property
    def scans_done(self) -> int:
        return self.scans - self.base

    @property
    def settled(self) -> bool:
        return self.plateau is not None

    @property
    def covered(self) -> bool:
        """The window spans ``stable_scans + 1`` full-scan advances."""
        return bool(self.window) and self.window[0].x <= self.scans - self.span

    def _band(self, level: float) -> float:
        return self.tolerance * abs(level) + self.floor_pages if self.tolerance > 0 else 0.0

    def _still(self, read: _Read) -> bool:
        if self.tolerance == 0:
            return read.exact == self.window[0].exact
        return abs(read.saved - self.plateau.saved_pages) <= self.plateau.band

    def _judge(self) -> Plateau | None:
        reads = list(self.window)
        saved = [r.saved for r in reads]
        if self.tolerance == 0:
            self.trend, self.band = float(saved[-1] - saved[0]), 0.0
            flat = all(r.exact == reads[0].exact for r in reads)
            median, median_read = saved[-1], reads[-1]
        else:
            levels: dict[int, list[int]] = {}
            for r in reads:
                levels.setdefault(r.x, []).append(r.saved)
            points = [(x, statistics.median(v)) for x, v in levels.items()]
            median = sorted(saved)[(len(saved) - 1) // 2]       # the lower median: a real read
            median_read = next(r for r in reversed(reads) if r.saved == median)
            self.trend, self.band = theil_sen(points), self._band(median)
            flat = abs(self.trend) <= self.band and abs(points[-1][1] - median) <= self.band
        if not (flat and self.covered and self.scans_done >= self.min_scans):
            return None
        now = reads[-1].t
        return Plateau(index=reads[-1].index, start_index=reads[0].index,
                       median_index=median_read.index, scans=self.scans_done,
                       seconds=None if now is None or self.t0 is None else now - self.t0,
                       saved_pages=int(median), trend=self.trend, band=self.band,
                       reads=len(reads), scan_span=self.scans - reads[0].x)

    @property
    def result(self) -> KsmStats | None:
        """The read that carries the plateau's figure (the last read while not settled)."""
        if self.plateau is None:
            return self.last
        for r in self.window:
            if r.index == self.plateau.median_index and r.item is not None:
                return r.item
        return self.last

    def progress(self) -> str:
        text = f"full_scans advanced by {self.scans_done} (need {self.min_scans})"
        if self.trend is None:
            return text + ", no full scan judged yet"
        if self.tolerance == 0:
            return (text + f", saved pages changed by {self.trend:+.0f} over the last "
                    f"{self.span} full scans (need none: tolerance 0)")
        return (text + f", saved pages trend {self.trend:+.1f} pages per full scan over the last "
                f"{self.span} full scans (allowed ±{self.band:.0f})")


def settle_point(times: Sequence[float] | None, full_scans: Sequence[int],
                 saved_pages: Sequence[int], stable_scans: int = 2, min_scans: int = 3,
                 tolerance: float = DEFAULT_TOLERANCE,
                 floor_pages: int = DEFAULT_FLOOR_PAGES) -> Plateau | None:
    """The settle test over a recorded series (the first read is the start): the first
    :class:`Plateau`, or None if it never settles. ``times`` may be None."""
    if len(full_scans) != len(saved_pages) or (times is not None and len(times) != len(full_scans)):
        raise KsmValueError("settle_point: times, full_scans and saved_pages differ in length")
    tracker = SettleTracker(None, stable_scans, min_scans, tolerance, floor_pages)
    for i, (scans, saved) in enumerate(zip(full_scans, saved_pages)):
        if tracker.add(scans, saved, t=None if times is None else times[i]):
            return tracker.plateau
    return None


def settle_index(reads: Iterable[KsmStats], stable_scans: int = 2, min_scans: int = 3,
                 tolerance: float = DEFAULT_TOLERANCE,
                 floor_pages: int = DEFAULT_FLOOR_PAGES) -> int | None:
    """Index in ``reads`` of the first read at which merging counts as settled, the first read
    being the start; None if it never does."""
    tracker = SettleTracker(None, stable_scans, min_scans, tolerance, floor_pages)
    for i, stats in enumerate(reads):
        if tracker.observe(stats):
            return i
    return None


def check_settle(stable_scans: int, min_scans: int, tolerance: float = 0.0,
                 floor_pages: int = 0) -> None:
    if stable_scans < 1 or min_scans < 1:
        raise KsmValueError("wait_settled: stable_scans and min_scans must be >= 1")
    if not 0 <= tolerance < 1:
        raise KsmValueError(f"settle tolerance must be a fraction in [0, 1) (e.g. "
                            f"{DEFAULT_TOLERANCE}: 0.2 % of the saving per full scan), got {tolerance!r}")
    if floor_pages < 0:
        raise KsmValueError(f"settle floor_pages must be >= 0, got {floor_pages!r}")


def check_running(run, stats: KsmStats | None = None) -> None:
    """KsmNotRunningError unless ``run`` is 1: with ksmd stopped nothing merges or settles."""
    if run != 1:
        why = {0: "stopped (run=0)", 2: "stopped and unmerging (run=2)"}.get(run, f"run={run}")
        raise KsmNotRunningError(
            f"ksmd is {why}: nothing will merge or settle; set run=1 (ksm.settings(run=1) or "
            "'udedup set run=1')", knob="run", value=run, stats=stats)


def wait_settled(read_stats: Callable[[], KsmStats], read_knob: Callable[[str], object],
                 timeout: float = 60.0, poll: float = 0.05, stable_scans: int = 2,
                 min_scans: int = 3, tolerance: float = DEFAULT_TOLERANCE,
                 floor_pages: int = DEFAULT_FLOOR_PAGES,
                 tracker_out: list | None = None) -> KsmStats:
    """Poll ``read_stats`` every ``poll`` seconds until :class:`SettleTracker` says settled; return
    the plateau's read (:attr:`SettleTracker.result`). ``read_knob`` reads ``run`` (and, for the
    timeout message, the scan rate). ``tracker_out``, a list, receives the tracker (its
    ``plateau`` says where and how it settled).

    Raises :class:`KsmNotRunningError` at once if ksmd is not running, and :class:`KsmTimeout`
    (``.stats`` = last counters) after ``timeout`` seconds.
    """
    check_settle(stable_scans, min_scans, tolerance, floor_pages)
    start = read_stats()
    tracker = SettleTracker(start, stable_scans, min_scans, tolerance, floor_pages)
    if tracker_out is not None:
        tracker_out.append(tracker)
    check_running(read_knob("run"), start)
    deadline = time.monotonic() + timeout
    while True:
        if tracker.observe(read_stats()):
            return tracker.result
        if time.monotonic() >= deadline:
            def maybe(name):
                try:
                    return read_knob(name)
                except KsmError:
                    return "?"
            raise KsmTimeout(
                f"KSM did not settle within {timeout:g} s: {tracker.progress()}; "
                f"run={read_knob('run')}, pages_to_scan={maybe('pages_to_scan')}, "
                f"sleep_millisecs={maybe('sleep_millisecs')}: raise pages_to_scan, the timeout "
                "or the settle tolerance", stats=tracker.last)
        time.sleep(poll)
