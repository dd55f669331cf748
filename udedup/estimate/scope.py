"""The scope of an estimate: which pages are scanned, where they are, and the per-page state the
passes fill in. Pure data; :mod:`.passes` reads /proc to build it.

Every scanned page has an ordinal (0 .. total-1, in target, mapping and address order). Per page
the scope keeps 4 bytes of crc32c, 8 of hash64 (then of sort key), 4 of group head (``rep``) and
1 of flags, plus where the page is: a :class:`PageSet` per mapping, 8 bytes per run of contiguous
pages or 4 per scattered page, whichever is smaller.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..native import lib
from .model import MappingReport, TargetReport
from .thp import ThpLayout

#: Whole-array steps work this many pages at a time: the memory budget is per scanned page, so
#: temporaries must stay bounded whatever the size.
STEP = 1 << 14
#: ``rep`` of a page in no candidate group (also the limit of ordinals one estimate can index)
NONE = np.uint32(0xFFFFFFFF)

# per-page flag bits
ZERO = np.uint8(1)
VOLATILE = np.uint8(2)
UNREADABLE = np.uint8(4)


@dataclass
class Target:
    """A process, or a buffer [lo, hi) of this process."""

    pid: int
    name: str
    kind: str                      # "process" or "buffer"
    lo: int = 0
    hi: int = 2 ** 64


def buffer_range(buf) -> tuple[int, int]:
    """[start, end) addresses of a buffer of this process (MergeableBuffer, mmap, numpy array)."""
    if hasattr(buf, "address") and hasattr(buf, "nbytes") and not isinstance(buf, np.ndarray):
        return int(buf.address), int(buf.address) + int(buf.nbytes)
    try:
        arr = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        if isinstance(buf, np.ndarray) and buf.flags.c_contiguous:
            arr = buf.reshape(-1).view(np.uint8)
        else:
            raise UsageError(f"cannot estimate a {type(buf).__name__}: pass PIDs or contiguous "
                             "buffers (MergeableBuffer, mmap, numpy array)") from None
    return int(arr.ctypes.data), int(arr.ctypes.data) + arr.nbytes


def buffer_targets(ranges, pid: int, page_size: int) -> list:
    """Targets for buffer ranges of process ``pid``, widened to whole pages; overlapping ones are
    joined so that each page counts once (adjacent buffers stay two targets)."""
    merged: list = []
    ps = page_size
    for lo, hi in sorted((lo // ps * ps, -(-hi // ps) * ps) for lo, hi in ranges):
        if merged and lo < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [Target(pid, f"buffer {lo:#x}+{hi - lo}", "buffer", lo, hi) for lo, hi in merged]


class PageSet:
    """Sorted page offsets within one mapping, stored as runs (8 bytes per run) where pages come
    in runs, as plain uint32 offsets (4 bytes per page) where they are scattered: whichever is
    smaller. Indexes are positions in the set."""

    def __init__(self, offsets: np.ndarray):
        offsets = np.asarray(offsets, dtype=np.uint32)
        self.size = int(offsets.size)
        breaks = np.flatnonzero(np.diff(offsets) != 1) + 1 if offsets.size else offsets
        if (breaks.size + 1) * 8 < offsets.size * 4:
            self.run_first = np.concatenate(([0], breaks)).astype(np.uint32)   # set position
            self.run_start = offsets[self.run_first]                           # page offset
            self.offsets = None
        else:
            self.run_first = self.run_start = None
            self.offsets = offsets

    @property
    def nbytes(self) -> int:
        if self.offsets is not None:
            return self.offsets.nbytes
        return self.run_first.nbytes + self.run_start.nbytes

    def runs(self, lo: int, hi: int):
        """(first page offset, page count) of the runs covering set positions [lo, hi)."""
        if self.offsets is not None:
            off = self.offsets[lo:hi]
            breaks = np.flatnonzero(np.diff(off) != 1) + 1
            bounds = np.concatenate(([0], breaks, [off.size]))
            return off[bounds[:-1]].astype(np.uint64), np.diff(bounds).astype(np.uint64)
        rf = self.run_first
        r0 = int(np.searchsorted(rf, lo, side="right")) - 1
        r1 = int(np.searchsorted(rf, hi, side="left"))
        first = rf[r0:r1].astype(np.int64)
        ends = np.append(rf[r0 + 1:r1], hi).astype(np.int64)
        begin = np.maximum(first, lo)
        ends = np.minimum(ends, hi)
        starts = self.run_start[r0:r1].astype(np.int64) + (begin - first)
        return starts.astype(np.uint64), (ends - begin).astype(np.uint64)

    def pages(self, index) -> np.ndarray:
        """Page offsets (uint64) of the set positions ``index`` (an array, or a slice)."""
        if isinstance(index, slice):
            if self.offsets is not None:
                return self.offsets[index].astype(np.uint64)
            index = np.arange(*index.indices(self.size), dtype=np.int64)
        if self.offsets is not None:
            return self.offsets[index].astype(np.uint64)
        run = np.searchsorted(self.run_first, index, side="right") - 1
        return (self.run_start[run].astype(np.int64) + (index - self.run_first[run])).astype(
            np.uint64)


@dataclass
class Segment:
    """The pages in scope of one mapping (of one target): ordinals base .. base + size - 1."""

    pid: int
    target: int                    # index of the target
    report: MappingReport
    start: int                     # address of page offset 0
    pageset: PageSet               # the pages in scope
    base: int = 0                  # first ordinal

    @property
    def size(self) -> int:
        return self.pageset.size

    def addresses(self, index) -> np.ndarray:
        return np.uint64(self.start) + self.pageset.pages(index) * np.uint64(lib.PAGE_SIZE)

    def iov(self, lo: int, hi: int):
        """(start addresses, byte lengths) of the runs of set positions [lo, hi)."""
        first, count = self.pageset.runs(lo, hi)
        ps = np.uint64(lib.PAGE_SIZE)
        return np.uint64(self.start) + first * ps, count * ps


class Scope:
    """Targets, a report per mapping seen, the segments to scan, and the per-page arrays
    (``crc``, ``hsh``, ``flags``, ``rep``, indexed by ordinal) once :meth:`allocate` made them."""

    def __init__(self, targets: list):
        self.targets = targets
        self.page_size = lib.PAGE_SIZE
        self.target_reports = [TargetReport(t.pid, t.name, t.kind) for t in targets]
        self.reports: list = []        # MappingReport of every mapping inside a target
        self.segments: list = []
        self.notes: list = []
        self.total = 0
        self.seg_base = np.empty(0, dtype=np.int64)
        self.crc = self.hsh = self.flags = self.rep = None
        self.index_bytes = 0
        # THPs among the scanned pages: (first ordinal, subpages, in an mlocked mapping) each
        self.thp_runs: list = []
        self.thp_known = True          # False: some mapping has THPs the scan could not find

    def add_segment(self, target: int, report: MappingReport, start: int, pageset: PageSet,
                    thp_runs=()):
        """``thp_runs``: [(first set position, length)] of the THPs among the pageset's pages."""
        locked = "lo" in report.mapping.vmflags
        self.thp_runs.extend((self.total + a, n, locked) for a, n in thp_runs)
        report.thp_pages = sum(n for _, n in thp_runs)
        report.thps = len(thp_runs)
        self.segments.append(Segment(report.pid, target, report, start, pageset, self.total))
        self.total += pageset.size

    def thp_layout(self) -> ThpLayout:
        if not self.thp_runs:
            return ThpLayout.empty()
        a, n, lo = zip(*self.thp_runs)
        return ThpLayout(np.array(a, dtype=np.int64), np.array(n, dtype=np.int64),
                         locked=np.array(lo, dtype=bool))

    def seal(self) -> None:
        """No more segments: check the ordinals fit the per-page arrays."""
        if self.total >= int(NONE):
            raise UsageError(f"{self.total} pages are more than one estimate can index "
                             "(2**32 - 1); estimate fewer processes at a time")
        self.seg_base = np.array([s.base for s in self.segments], dtype=np.int64)

    def allocate(self) -> None:
        n = self.total
        self.crc = np.empty(n, dtype=np.uint32)
        self.hsh = np.empty(n, dtype=np.uint64)
        self.flags = np.zeros(n, dtype=np.uint8)
        self.rep = np.full(n, NONE, dtype=np.uint32)
        offsets = sum(s.pageset.nbytes for s in self.segments)
        self.index_bytes = offsets + self.crc.nbytes + self.hsh.nbytes + self.flags.nbytes + \
            self.rep.nbytes

    def addresses(self, ords: np.ndarray):
        """(pid, address) of arbitrary ordinals."""
        si = np.searchsorted(self.seg_base, ords, side="right") - 1
        addrs = np.empty(ords.size, dtype=np.uint64)
        pids = np.empty(ords.size, dtype=np.int64)
        for s in np.unique(si):
            seg = self.segments[s]
            m = si == s
            addrs[m] = seg.addresses(ords[m] - seg.base)
            pids[m] = seg.pid
        return pids, addrs

    def fingerprints(self, crc: np.ndarray, pages: int, seed: int = 0) -> dict:
        """{pid: (sorted addresses, their crc32c)} of up to ``pages`` pages per process drawn
        uniformly from its scanned pages that read the same in every pass (neither volatile nor
        unreadable): what the daemon re-reads later to tell whether its memory changed."""
        out: dict = {}
        bad = VOLATILE | UNREADABLE
        for pid in sorted({s.pid for s in self.segments}):
            ords = np.concatenate([np.arange(s.base, s.base + s.size, dtype=np.int64)
                                   for s in self.segments if s.pid == pid])
            ords = ords[(self.flags[ords] & bad) == 0]
            if ords.size > pages:
                rng = np.random.default_rng([seed, pid])
                ords = np.sort(rng.choice(ords, size=pages, replace=False))
            _pids, addrs = self.addresses(ords)
            order = np.argsort(addrs, kind="stable")
            out[pid] = (addrs[order], crc[ords][order])
        return out

    def pages_of(self, pid: int) -> int:
        """Pages in scope of process ``pid``."""
        return sum(s.size for s in self.segments if s.pid == pid)
