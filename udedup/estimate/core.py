"""The estimator: what KSM would save on some memory, predicted from userspace before ksmd runs.

How (each step is what ksmd would do, done faster):

1. scope — the mappings KSM scans today (``mg``), or every KSM-compatible one (``all_eligible``);
   within them the present anonymous pages from pagemap, minus pages already mapping the kernel's
   zero page (ksmd skips those, they cost nothing);
2. pass 1 — every page is read (``process_vm_readv``, chunk by chunk into one reused buffer, the
   next chunk read ahead in a second thread where there are two CPUs) and scanned once for crc32c,
   hash64 and an exact is-zero check;
3. grouping, while the interval runs — the hash array is turned, in place, into sort keys
   ``(top hash bits << b) | ordinal`` and sorted; runs of equal hash bits are candidate groups whose
   head is their lowest ordinal. Nothing is declared equal yet;
4. later passes — crc32c again: a page whose crc32c changed is volatile and excluded, as ksmd does.
   The last pass also byte-compares every candidate with its group head (re-read when it lies in an
   earlier chunk): only pages that compare equal count as duplicates; the rest are regrouped by their
   full hash64 and compared again. Zero pages come only from the byte check. With
   ``recheck="candidates"`` these passes re-read only the zero pages and candidate group members
   (runs of them still in large reads): a unique page saves nothing whether it changes or not;
5. predictions for use_zero_pages 0 and 1 under max_page_sharing, with the kernel's accounting
   (a group of n equal pages makes n // mps full KSM pages plus one for a remainder of 2 or more;
   a remainder of 1 stays unshared; every scanned page costs one 64-byte rmap item, except zero pages
   KSM maps to the zero page under use_zero_pages=1);
6. saving ranges per target: the address ranges, each inside one mapping, that hold every page
   predicted to save memory, joined across small gaps, so that registering only them spares ksmd
   (about 3 us per registered page over its first two scans, and a 64-byte rmap item for as long as
   it stays registered) the memory that would never merge.

Memory: per scanned page 4 (crc32c) + 8 (hash, then sort key) + 4 (group head) + 1 (flags) = 17
bytes, plus where the page is (8 bytes per run of contiguous pages, at most 4 per page), plus the
fixed buffers (read chunks, re-read heads, head cache): page copies are never kept, temporaries work
in bounded steps. The target's memory is only ever read.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import types
from dataclasses import dataclass, field

import numpy as np

from ..native import pages
from ..host import procmem
from ..errors import KsmError, ProcessNotFoundError, UsageError
from ..ksm.accounting import RMAP_ITEM_BYTES, ksm_pages, sharing_fraction
from ..ksm.controller import Ksm

log = logging.getLogger(__name__)

DEFAULT_MAX_PAGE_SHARING = 256
DEFAULT_CACHE_BYTES = 4 << 20  # heads of the largest duplicate groups, kept between chunks
# Read chunk. Larger than L2 on purpose: the bytes are scanned from L3 at >30 GB/s, far above the
# ~8 GB/s of process_vm_readv, while each chunk costs ~30 us of Python; measured on 1 GiB, 2 passes:
# 0.5 MiB 0.63 s, 1 MiB 0.49 s, 2 MiB 0.42 s, 4 MiB 0.36 s of CPU.
DEFAULT_CHUNK_BYTES = 4 << 20
# Whole-array steps work this many pages at a time: the memory budget is per scanned page, so
# temporaries must stay bounded whatever the size.
_STEP = 1 << 14
# Saving ranges: join runs closer than this, keep at most that many per target (each range
# becomes a mapping of its own once registered, and a mapping costs the kernel a VMA).
DEFAULT_RANGE_GAP = 2 << 20
DEFAULT_MAX_RANGES = 64
# Registering k ranges inside mappings can leave 2k + 1 VMAs; vm.max_map_count is 65530.
MAX_RANGES_LIMIT = 32768
RECHECK_MODES = ("all", "candidates")
NONE = np.uint32(0xFFFFFFFF)  # "in no candidate group"
_PENDING = -1

# per-page flag bits
ZERO = np.uint8(1)
VOLATILE = np.uint8(2)
UNREADABLE = np.uint8(4)


# --- results -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """KSM counters predicted for the scanned memory alone, once ksmd has settled."""

    use_zero_pages: bool
    max_page_sharing: int
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    ksm_zero_pages: int
    rmap_items: int
    page_size: int
    scanned_bytes: int

    @property
    def saved_pages(self) -> int:
        """Pages freed: pages_sharing + ksm_zero_pages (pages_shared are the KSM pages kept)."""
        return self.pages_sharing + self.ksm_zero_pages

    @property
    def general_profit(self) -> int:
        """The kernel's formula: saved pages minus 64 bytes of rmap item per scanned page."""
        return self.saved_pages * self.page_size - self.rmap_items * RMAP_ITEM_BYTES

    @property
    def saved_bytes(self) -> int:
        """Net bytes saved, as ``KsmStats.saved_bytes``: general_profit."""
        return self.general_profit

    @property
    def saved_percent(self) -> float:
        return 100.0 * self.general_profit / self.scanned_bytes if self.scanned_bytes else 0.0

    def as_dict(self) -> dict:
        return {"use_zero_pages": int(self.use_zero_pages), "max_page_sharing": self.max_page_sharing,
                "pages_shared": self.pages_shared, "pages_sharing": self.pages_sharing,
                "pages_unshared": self.pages_unshared, "ksm_zero_pages": self.ksm_zero_pages,
                "rmap_items": self.rmap_items, "saved_pages": self.saved_pages,
                "general_profit": self.general_profit, "saved_bytes": self.saved_bytes,
                "saved_percent": round(self.saved_percent, 3)}

    _asdict = as_dict


_COUNT_FIELDS = ("scanned_pages", "zero_pages", "duplicate_pages", "unique_pages", "volatile_pages",
                 "unreadable_pages")


@dataclass(kw_only=True)
class _PageCounts:
    """What the scanned pages of a mapping, or of a whole target, turned out to be."""

    scanned_pages: int = 0
    zero_pages: int = 0
    duplicate_pages: int = 0
    unique_pages: int = 0
    volatile_pages: int = 0
    unreadable_pages: int = 0
    saved_pages: dict = field(default_factory=lambda: {0: 0.0, 1: 0.0})

    def _counts_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _COUNT_FIELDS}
        d["saved_pages"] = {str(k): round(v, 1) for k, v in self.saved_pages.items()}
        return d


@dataclass
class MappingReport(_PageCounts):
    """One mapping of a target: its classification and, when scanned, what its pages are."""

    pid: int
    mapping: procmem.Mapping
    in_scope: bool
    present_pages: int = 0        # present anonymous pages, zero-page mappings included
    zero_mapped_pages: int = 0    # already map the kernel's zero page: free, ksmd skips them
    swapped_pages: int = 0

    def as_dict(self) -> dict:
        m = self.mapping
        return {"pid": self.pid, "start": hex(m.start), "end": hex(m.end), "path": m.path,
                "kind": m.kind, "registered": m.registered, "eligible": m.eligible,
                "reason": m.reason, "in_scope": self.in_scope, "anon_huge_bytes": m.anon_huge,
                "present_pages": self.present_pages, "zero_mapped_pages": self.zero_mapped_pages,
                "swapped_pages": self.swapped_pages, **self._counts_dict()}


@dataclass
class TargetReport(_PageCounts):
    """One target: a process, or a buffer of this process."""

    pid: int
    name: str
    kind: str                     # "process" or "buffer"
    exited: bool = False
    existing_ksm_zero_pages: int = 0
    # Page-aligned [start, end) addresses, each inside one mapping, in address order, covering
    # every page predicted to save memory (non-volatile zero pages, members of confirmed duplicate
    # groups): what to register so ksmd scans little else.
    saving_ranges: list = field(default_factory=list)
    range_pages: int = 0          # scanned, readable pages inside saving_ranges (rmap items)
    # saving pages outside saving_ranges: 0 unless more mappings hold savings than max_ranges
    # (then the ranges of the mappings saving least are left out)
    uncovered_pages: int = 0

    def as_dict(self) -> dict:
        d = {"pid": self.pid, "name": self.name, "kind": self.kind, "exited": self.exited}
        d.update(self._counts_dict())
        d["existing_ksm_zero_pages"] = self.existing_ksm_zero_pages
        d["saving_ranges"] = [[hex(a), hex(b)] for a, b in self.saving_ranges]
        d["range_pages"] = self.range_pages
        d["uncovered_pages"] = self.uncovered_pages
        return d


@dataclass
class Estimate:
    """What KSM would do with the scanned memory. Counts are pages of ``page_size`` bytes."""

    page_size: int
    passes: int
    interval: float
    all_eligible: bool
    max_page_sharing: int
    current_use_zero_pages: bool | None
    targets: list
    mappings: list
    pages_scanned: int = 0        # read in pass 1
    zero_pages: int = 0
    duplicate_pages: int = 0      # non-zero pages with at least one byte-identical twin
    duplicate_groups: int = 0
    largest_group: int = 0
    unique_pages: int = 0
    volatile_pages: int = 0
    unreadable_pages: int = 0     # vanished mid-scan (unmapped, process exited)
    zero_mapped_pages: int = 0
    unconfirmed_pages: int = 0    # hash matched but bytes differed on every retry: counted unique
    existing_ksm_zero_pages: int = 0
    group_sizes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    partial: bool = False
    notes: list = field(default_factory=list)
    elapsed_seconds: float = 0.0
    cpu_seconds: float = 0.0
    bytes_read: int = 0
    index_bytes: int = 0          # peak bytes of per-page bookkeeping
    buffer_bytes: int = 0         # the fixed read buffer
    timings: dict = field(default_factory=dict)   # seconds per phase
    # what later passes re-read: "all", or "candidates" (then volatile_pages counts only the
    # re-checked zero pages and duplicate candidates that changed)
    recheck: str = "all"

    @property
    def readable_pages(self) -> int:
        return self.pages_scanned - self.unreadable_pages

    def predicted(self, use_zero_pages: bool) -> Prediction:
        """Counters KSM reaches on this memory alone, settled, with ``use_zero_pages``."""
        mps = self.max_page_sharing
        shared, sharing, unshared = ksm_pages(self.group_sizes, mps)
        unshared += self.unique_pages
        rmap = self.readable_pages
        zero = self.existing_ksm_zero_pages
        if use_zero_pages:
            zero += self.zero_pages
            rmap -= self.zero_pages
        else:
            zs, zg, zu = ksm_pages(np.array([self.zero_pages]), mps)
            shared, sharing, unshared = shared + zs, sharing + zg, unshared + zu
        return Prediction(bool(use_zero_pages), mps, shared, sharing, unshared, zero, rmap,
                          self.page_size, self.readable_pages * self.page_size)

    @property
    def predictions(self) -> list:
        return [self.predicted(False), self.predicted(True)]

    def _uzp(self, use_zero_pages):
        if use_zero_pages is None:
            use_zero_pages = bool(self.current_use_zero_pages)
        return int(bool(use_zero_pages))

    def top_mappings(self, n: int = 10, use_zero_pages: bool | None = None) -> list:
        """Scanned mappings by predicted pages saved (under the current use_zero_pages)."""
        k = self._uzp(use_zero_pages)
        scanned = [m for m in self.mappings if m.scanned_pages]
        return sorted(scanned, key=lambda m: -m.saved_pages[k])[:n]

    def top_processes(self, n: int = 10, use_zero_pages: bool | None = None) -> list:
        k = self._uzp(use_zero_pages)
        return sorted(self.targets, key=lambda t: -t.saved_pages[k])[:n]

    @property
    def bytes_per_page(self) -> float:
        return self.index_bytes / self.pages_scanned if self.pages_scanned else 0.0

    def as_dict(self, top: int = 10) -> dict:
        return {
            "page_size": self.page_size, "passes": self.passes, "interval": self.interval,
            "recheck": self.recheck,
            "all_eligible": self.all_eligible, "max_page_sharing": self.max_page_sharing,
            "current_use_zero_pages": self.current_use_zero_pages,
            "partial": self.partial, "notes": list(self.notes),
            "pages_scanned": self.pages_scanned, "zero_pages": self.zero_pages,
            "duplicate_pages": self.duplicate_pages, "duplicate_groups": self.duplicate_groups,
            "largest_group": self.largest_group, "unique_pages": self.unique_pages,
            "volatile_pages": self.volatile_pages, "unreadable_pages": self.unreadable_pages,
            "zero_mapped_pages": self.zero_mapped_pages,
            "unconfirmed_pages": self.unconfirmed_pages,
            "existing_ksm_zero_pages": self.existing_ksm_zero_pages,
            "predictions": [p.as_dict() for p in self.predictions],
            "targets": [t.as_dict() for t in self.targets],
            "top_mappings": [m.as_dict() for m in self.top_mappings(top)],
            "elapsed_seconds": round(self.elapsed_seconds, 4),
            "cpu_seconds": round(self.cpu_seconds, 4), "bytes_read": self.bytes_read,
            "index_bytes": self.index_bytes, "bytes_per_page": round(self.bytes_per_page, 2),
            "buffer_bytes": self.buffer_bytes,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }

    _asdict = as_dict


# --- targets and scope ---------------------------------------------------------------------------
@dataclass
class _Target:
    pid: int
    name: str
    kind: str
    lo: int = 0
    hi: int = 2 ** 64


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
class _Segment:
    pid: int
    target: int
    report: MappingReport
    start: int                     # address of page offset 0
    pageset: PageSet               # the pages in scope
    base: int = 0                  # first ordinal

    @property
    def size(self) -> int:
        return self.pageset.size

    def addresses(self, index) -> np.ndarray:
        return np.uint64(self.start) + self.pageset.pages(index) * np.uint64(pages.PAGE_SIZE)

    def iov(self, lo: int, hi: int):
        """(start addresses, byte lengths) of the runs of set positions [lo, hi)."""
        first, count = self.pageset.runs(lo, hi)
        ps = np.uint64(pages.PAGE_SIZE)
        return np.uint64(self.start) + first * ps, count * ps


def _buffer_range(buf) -> tuple[int, int]:
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


def _normalize_targets(targets, procfs: str) -> list:
    """Processes first, then buffers of this process; each page once (a PID given twice,
    overlapping buffers, buffers of a process also given whole)."""
    if isinstance(targets, (int, np.integer, str)) or not isinstance(targets, (list, tuple)):
        targets = [targets]
    if not targets:
        raise UsageError("nothing to estimate: pass at least one PID or buffer")
    processes, buffers = [], []
    ps = pages.PAGE_SIZE
    for t in targets:
        if isinstance(t, str) and t.strip().isdigit():
            t = int(t)
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            pid = int(t)
            if all(p.pid != pid for p in processes):
                procmem.check_process(pid, procfs)
                processes.append(_Target(pid, procmem.comm(pid, procfs, "?"), "process"))
        else:
            lo, hi = _buffer_range(t)
            buffers.append((lo // ps * ps, -(-hi // ps) * ps))
    me = os.getpid()
    if any(p.pid == me for p in processes):
        buffers = []
    merged: list = []
    for lo, hi in sorted(buffers):
        if merged and lo < merged[-1][1]:   # overlapping only: adjacent buffers stay two targets
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return processes + [_Target(me, f"buffer {lo:#x}+{hi - lo}", "buffer", lo, hi)
                        for lo, hi in merged]


def _current_knobs(max_page_sharing):
    """(max_page_sharing, use_zero_pages or None) from the running kernel where readable."""
    uzp = None
    try:
        ksm = Ksm()
        uzp = bool(ksm.get("use_zero_pages"))
        if max_page_sharing is None:
            max_page_sharing = int(ksm.get("max_page_sharing"))
    except (KsmError, OSError) as err:
        log.debug("estimate: KSM knobs not readable (%s); using defaults", err)
    if max_page_sharing is None:
        max_page_sharing = DEFAULT_MAX_PAGE_SHARING
    if int(max_page_sharing) < 2:
        raise UsageError(f"max_page_sharing must be at least 2, got {max_page_sharing}")
    return int(max_page_sharing), uzp


def _join(iovs: list):
    if len(iovs) == 1:
        return iovs[0]
    return np.concatenate([a for a, _ in iovs]), np.concatenate([b for _, b in iovs])


class _TopRuns:
    """The heads of the ``k`` longest runs seen, in O(k) memory."""

    def __init__(self, k: int):
        self.k = k
        self.lengths = np.empty(0, dtype=np.int64)
        self._heads = np.empty(0, dtype=np.int64)

    def add(self, lengths, heads):
        if not len(lengths):
            return
        self.lengths = np.concatenate((self.lengths, np.asarray(lengths, dtype=np.int64)))
        self._heads = np.concatenate((self._heads, np.asarray(heads, dtype=np.int64)))
        if self.lengths.size > 4 * self.k:
            self._prune()

    def _prune(self):
        if self.lengths.size > self.k:
            keep = np.argpartition(-self.lengths, self.k - 1)[: self.k]
            self.lengths, self._heads = self.lengths[keep], self._heads[keep]

    def heads(self) -> np.ndarray:
        self._prune()
        return self._heads


# --- the scanner ---------------------------------------------------------------------------------
class _Scanner:
    def __init__(self, targets, all_eligible, procfs, buffer_bytes, cache_bytes, threads,
                 progress):
        self.targets = targets
        self.all_eligible = all_eligible
        self.procfs = procfs
        self.progress = progress
        self.ps = ps = pages.PAGE_SIZE
        self.notes: list = []
        self.segments: list = []
        self.reports: list = []
        self.target_reports: list = []
        # One fixed allocation: the read buffer for sequential chunks, a quarter of that for group
        # heads re-read from earlier chunks, and a cache keeping the heads of the largest groups
        # (their members are everywhere: re-reading the head for each would double the reads).
        # With read-ahead there are two chunk buffers: one being read, one being scanned.
        chunk_pages = max(8, buffer_bytes // ps)
        head_pages = max(8, chunk_pages // 4)
        self.cache_slots = max(8, cache_bytes // ps)
        nread = 2 if threads >= 2 else 1
        self._buf = procmem._aligned_buffer((nread * chunk_pages + head_pages + self.cache_slots)
                                            * ps)
        view = memoryview(self._buf)
        self.readers = [procmem.RemoteReader(buffer=view[i * chunk_pages * ps:
                                                         (i + 1) * chunk_pages * ps])
                        for i in range(nread)]
        at = nread * chunk_pages * ps
        self.heads = procmem.RemoteReader(buffer=view[at: at + head_pages * ps])
        self.reader = self.readers[0]
        for r in self.readers[1:] + [self.heads]:
            r.exited = self.reader.exited    # one process exit stops every reader
        self.cache_flat = np.frombuffer(self._buf, dtype=np.uint8, offset=at + head_pages * ps)
        self.cache = self.cache_flat.reshape(self.cache_slots, ps)
        self.cache_heads = np.empty(0, dtype=np.int64)
        self.cache_valid = np.empty(0, dtype=bool)
        self.cap = chunk_pages
        self._ctmp = np.empty(chunk_pages, dtype=np.uint32)
        self._htmp = np.empty(chunk_pages, dtype=np.uint64)
        self._ztmp = np.empty(chunk_pages, dtype=np.bool_)
        self.index_bytes = 0
        self._heads_over: dict = {}
        self._over_keys = np.empty(0, dtype=np.int64)
        self._over_vals = np.empty(0, dtype=np.int64)
        self.leftovers: list = []
        self.exited_in: dict = {}

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers) + self.heads.bytes_read

    def close(self):
        for r in self.readers:
            r.close()
        self.heads.close()
        self.cache = self.cache_flat = None
        self._buf.close()

    # scope ---------------------------------------------------------------------------------------
    def build_scope(self):
        zero_pfns = procmem.zero_page_pfns()
        if not zero_pfns:
            self.notes.append("page frame numbers are hidden (not root): pages already mapping the "
                              "kernel's zero page are scanned and counted as zero pages")
        ordinal = 0
        for ti, t in enumerate(self.targets):
            tr = TargetReport(t.pid, t.name, t.kind)
            self.target_reports.append(tr)
            maps = procmem.read_mappings(t.pid, self.procfs)
            if t.kind == "process":
                stat = procmem.ksm_stat(t.pid, self.procfs)
                tr.existing_ksm_zero_pages = int(stat.get("ksm_zero_pages", 0) or 0)
            fd = procmem.open_pagemap(t.pid, self.procfs)
            try:
                for m in maps:
                    lo, hi = max(m.start, t.lo), min(m.end, t.hi)
                    if lo >= hi:
                        continue
                    in_scope = m.eligible and (m.registered or self.all_eligible)
                    rep = MappingReport(t.pid, m, in_scope)
                    self.reports.append(rep)
                    if not in_scope or (m.rss == 0 and m.anonymous == 0):
                        continue   # nothing resident: no need to read its page map
                    pageset = self._present(fd, t.pid, lo, hi, zero_pfns, rep)
                    if pageset.size:
                        seg = _Segment(t.pid, ti, rep, lo, pageset, ordinal)
                        ordinal += pageset.size
                        self.segments.append(seg)
            finally:
                os.close(fd)
        if ordinal >= int(NONE):
            raise UsageError(f"{ordinal} pages are more than one estimate can index (2**32 - 1); "
                             "estimate fewer processes at a time")
        self.total = ordinal
        self.seg_base = np.array([s.base for s in self.segments], dtype=np.int64)

    def _present(self, fd, pid, lo, hi, zero_pfns, rep):
        ps = self.ps
        counts: dict = {}
        # _STEP pagemap entries per read: small temporaries, 64 MiB of address space
        parts = [(idx + (a - lo) // ps).astype(np.uint32)
                 for a, idx in procmem.present_blocks(fd, pid, lo, hi, True, zero_pfns, counts,
                                                      block=_STEP)]
        pageset = PageSet(np.concatenate(parts) if len(parts) > 1 else parts[0])
        rep.zero_mapped_pages = counts.get("zero_page", 0)
        rep.swapped_pages = counts.get("swapped", 0)
        rep.present_pages = pageset.size + rep.zero_mapped_pages
        rep.scanned_pages = pageset.size
        return pageset

    # chunk iteration -------------------------------------------------------------------------------
    def _chunks(self):
        """(pid, (starts, lens), first ordinal) per chunk, in ordinal order, never mixing
        processes: the iovecs of the chunk's runs of pages."""
        cap = self.cap
        segs = self.segments
        i = 0
        while i < len(segs):
            pid = segs[i].pid
            j = i
            while j < len(segs) and segs[j].pid == pid:
                j += 1
            pieces, count, first = [], 0, segs[i].base
            for s in segs[i:j]:
                pos, n = 0, s.size
                while pos < n:
                    if pid in self.reader.exited:
                        break
                    take = min(cap - count, n - pos)
                    pieces.append(s.iov(pos, pos + take))
                    count += take
                    pos += take
                    if count == cap:
                        yield pid, _join(pieces), first
                        first += count
                        pieces, count = [], 0
            if count and pid not in self.reader.exited:
                yield pid, _join(pieces), first
            if pid in self.reader.exited:
                end = segs[j - 1].base + segs[j - 1].size
                self.flags[first:end] |= UNREADABLE
            i = j

    def _candidate_chunks(self):
        """Like :meth:`_chunks`, over the re-check candidates only: pages zero in pass 1 and
        members of candidate duplicate groups, the only pages whose change can alter the
        prediction. Yields (pid, page addresses, ordinals); the reader coalesces contiguous pages
        into one iovec each, so runs of candidates are still read in large pieces.

        Runs in the read-ahead thread while the caller updates ``rep`` of earlier chunks: each
        window of ordinals is classified before any of its pages is handed out, so the set read
        is the one ``group()`` left, whatever the timing."""
        cap, exited = self.cap, self.reader.exited
        addrs, ords, count, pid = [], [], 0, None
        for seg in self.segments:
            if seg.pid != pid:
                if count and pid not in exited:
                    yield pid, np.concatenate(addrs), np.concatenate(ords)
                addrs, ords, count, pid = [], [], 0, seg.pid
            for lo in range(seg.base, seg.base + seg.size, _STEP):
                if pid in exited:
                    break
                hi = min(seg.base + seg.size, lo + _STEP)
                pos = np.flatnonzero(((self.flags[lo:hi] & ZERO) != 0) |
                                     (self.rep[lo:hi] != NONE))
                while pos.size:
                    take, pos = pos[:cap - count], pos[cap - count:]
                    ords.append(take.astype(np.int64) + lo)
                    addrs.append(seg.addresses(take + (lo - seg.base)))
                    count += take.size
                    if count == cap:
                        yield pid, np.concatenate(addrs), np.concatenate(ords)
                        addrs, ords, count = [], [], 0
        if count and pid not in exited:
            yield pid, np.concatenate(addrs), np.concatenate(ords)

    def _addresses(self, ords: np.ndarray):
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

    def _read_ordinals(self, reader, ords: np.ndarray) -> np.ndarray:
        """Read pages by ordinal (at most reader.capacity) into reader's slots 0..n-1."""
        pids, addrs = self._addresses(ords)
        ok = np.zeros(ords.size, dtype=bool)
        for pid in np.unique(pids):
            m = np.flatnonzero(pids == pid)
            # slots follow the order of ords: read each contiguous slot run of this pid
            brk = np.flatnonzero(np.diff(m) != 1) + 1
            for part in np.split(m, brk):
                ok[part] = reader.read(addrs[part], int(pid), slot=int(part[0]))
        return ok

    def _report(self, pass_no, passes, done):
        if self.progress:
            self.progress(pass_no, passes, done, self.total)

    # passes ----------------------------------------------------------------------------------------
    def allocate(self):
        n = self.total
        self.crc = np.empty(n, dtype=np.uint32)
        self.hsh = np.empty(n, dtype=np.uint64)
        self.flags = np.zeros(n, dtype=np.uint8)
        self.rep = np.full(n, NONE, dtype=np.uint32)
        offsets = sum(s.pageset.nbytes for s in self.segments)
        self.index_bytes = offsets + self.crc.nbytes + self.hsh.nbytes + self.flags.nbytes + \
            self.rep.nbytes

    def _pass(self, sparse: bool = False):
        """(chunk, ordinals, buffer, ok) per chunk, read ahead where there are cores. ``chunk``
        indexes the per-page arrays: a slice when the chunk is every page in an ordinal range, the
        ordinals themselves when ``sparse`` (re-check candidates only); ``ordinals`` (int64) are
        the ordinals of the pages in the buffer, in order."""
        ps = self.ps
        chunks = self._candidate_chunks() if sparse else self._chunks()
        for tag, reader, ok in procmem.read_ahead(chunks, self.readers):
            n = ok.size
            if sparse:
                yield tag, tag, reader.buffer[: n * ps], ok
            else:
                yield slice(tag, tag + n), np.arange(tag, tag + n, dtype=np.int64), \
                    reader.buffer[: n * ps], ok

    def pass_first(self, passes):
        ps = self.ps
        for sl, ords, buf, ok in self._pass():
            n = ok.size
            z = self._ztmp[:n]
            pages.scan_pages(buf, ps, crc_out=self.crc[sl], hash_out=self.hsh[sl], zero_out=z)
            f = self.flags[sl]
            f[z] = ZERO
            if not ok.all():
                f[~ok] |= UNREADABLE
            self._report(1, passes, sl.stop)
        self._note_exits(1)

    def _recheck(self, pass_no, passes, sparse):
        """The chunks of a pass after the first: (chunk, ordinals, buffer, ok, flags) as
        :meth:`_pass`, with pages not read already flagged unreadable. The caller marks what
        changed in ``flags``; they are stored back when it asks for the next chunk."""
        for idx, ords, buf, ok in self._pass(sparse):
            f = self.flags[idx]
            if not ok.all():
                f[~ok] |= UNREADABLE
            yield idx, ords, buf, ok, f
            if sparse:      # fancy indexing gave a copy
                self.flags[idx] = f
            self._report(pass_no, passes, int(ords[-1]) + 1)
        self._end_pass(pass_no, passes, sparse)

    def pass_middle(self, pass_no, passes, sparse=False):
        for idx, ords, buf, ok, f in self._recheck(pass_no, passes, sparse):
            c = self._ctmp[:ok.size]
            pages.crc32c_pages(buf, self.ps, out=c)
            f[c != self.crc[idx]] |= VOLATILE
            self.crc[idx] = c

    def _end_pass(self, pass_no, passes, sparse):
        if sparse:
            self._check_alive()
            self._report(pass_no, passes, self.total)
        self._note_exits(pass_no)

    def _check_alive(self):
        """A sparse pass reads nothing of a process without candidates, so it would not notice
        that process exiting: ask /proc instead."""
        for t in self.targets:
            if t.kind == "process" and t.pid not in self.reader.exited:
                try:
                    procmem.check_process(t.pid, self.procfs)
                except ProcessNotFoundError:
                    self.reader.exited.add(t.pid)

    def _note_exits(self, pass_no):
        for pid in self.reader.exited:
            self.exited_in.setdefault(pid, pass_no)

    def group(self):
        """Turn the hash array into sorted (hash bits | ordinal) keys; mark candidate groups.

        Keys sort by hash bits, then ordinal, so a run of equal hash bits is a candidate group and
        its first key holds its lowest ordinal: the head, which the last pass meets first. The
        largest runs' heads are remembered for the head cache."""
        n = self.total
        if n == 0:
            return
        obits = max(1, int(n).bit_length())
        shift = np.uint64(obits)
        keys = self.hsh
        step = _STEP
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            k = keys[lo:hi]
            k >>= shift
            k <<= shift
            k |= np.arange(lo, hi, dtype=np.uint64)
            k[self.flags[lo:hi] != 0] = np.uint64(2 ** 64 - 1)  # zero or unreadable: no group
        keys.sort()
        valid = int(np.searchsorted(keys, np.uint64(2 ** 64 - 1)))
        mask = np.uint64((1 << obits) - 1)
        rep = self.rep
        top = _TopRuns(self.cache_slots)
        carry_prefix, carry_head, carry_count = None, 0, 0
        for lo in range(0, valid, step):
            k = keys[lo:min(valid, lo + step)]
            pre = k >> shift
            ords = (k & mask).astype(np.uint32)
            m = k.size
            new = np.empty(m, dtype=bool)
            new[0] = carry_count == 0 or pre[0] != carry_prefix
            np.not_equal(pre[1:], pre[:-1], out=new[1:])
            starts = np.flatnonzero(new)
            s0 = int(starts[0]) if starts.size else m
            if s0:   # the run carried over from the previous piece continues
                if carry_count == 1:
                    rep[carry_head] = carry_head
                rep[ords[:s0]] = carry_head
                carry_count += s0
            if not starts.size:
                continue
            if carry_count >= 2:
                top.add(np.array([carry_count]), np.array([carry_head]))
            ends = np.append(starts[1:], m)
            lengths = ends - starts
            inner = lengths[:-1]
            if inner.size:
                heads = ords[starts[:-1]]
                sel = np.repeat(inner >= 2, inner)
                head_of = np.repeat(heads, inner)
                rep[ords[s0: starts[-1]][sel]] = head_of[sel]
                big = inner >= 2
                top.add(inner[big], heads[big])
            last = int(starts[-1])
            carry_prefix, carry_head, carry_count = pre[last], int(ords[last]), m - last
            if carry_count >= 2:
                rep[ords[last:]] = carry_head
        if carry_count >= 2:
            top.add(np.array([carry_count]), np.array([carry_head]))
        # the keys are the hash array, now sorted: nothing maps back to it any more
        self.hsh = None
        del keys
        self.cache_heads = np.sort(top.heads()).astype(np.int64)
        self.cache_valid = np.zeros(self.cache_heads.size, dtype=bool)

    def _current_heads(self, g: np.ndarray) -> np.ndarray:
        cur = g.astype(np.int64)
        if self._over_keys.size:
            pos = np.searchsorted(self._over_keys, cur)
            pos_c = np.minimum(pos, self._over_keys.size - 1)
            hit = self._over_keys[pos_c] == cur
            cur[hit] = self._over_vals[pos_c[hit]]
        return cur

    def _set_heads(self, updates: dict):
        self._heads_over.update(updates)
        keys = np.fromiter(self._heads_over.keys(), dtype=np.int64, count=len(self._heads_over))
        vals = np.fromiter(self._heads_over.values(), dtype=np.int64, count=len(self._heads_over))
        order = np.argsort(keys)
        self._over_keys, self._over_vals = keys[order], vals[order]

    def pass_last(self, passes, sparse=False):
        for idx, ords, buf, ok, f in self._recheck(passes, passes, sparse):
            n = ok.size
            c, h, z = self._ctmp[:n], self._htmp[:n], self._ztmp[:n]
            pages.scan_pages(buf, self.ps, crc_out=c, hash_out=h, zero_out=z)
            changed = (c != self.crc[idx]) | (z != ((f & ZERO) != 0))
            f[changed] |= VOLATILE
            r = self.rep[idx]
            cand = np.flatnonzero(r != NONE)
            if cand.size:
                self._confirm(ords, buf, cand, r, f, h)
            if sparse:      # fancy indexing gave a copy
                self.rep[idx] = r
        self.crc = None

    def _cache_lookup(self, heads: np.ndarray):
        """(slot, hit) of heads in the head cache."""
        ch = self.cache_heads
        if not ch.size:
            return np.zeros(heads.size, np.int64), np.zeros(heads.size, bool)
        slot = np.minimum(np.searchsorted(ch, heads), ch.size - 1)
        return slot, (ch[slot] == heads) & self.cache_valid[slot]

    def _confirm(self, chunk_ords, buf, cand, r, f, h):
        """Byte-compare each candidate of this chunk with its group's current head.

        ``chunk_ords``: the ordinal of each page of the chunk (sorted); ``cand``: positions in
        the chunk of the candidates; ``r``, ``f``, ``h``: rep, flags and hash64 of the chunk."""
        ps = self.ps
        g = r[cand].astype(np.int64)
        ords = chunk_ords[cand]
        bad = (f[cand] & (VOLATILE | UNREADABLE)) != 0
        if bad.any():
            r[cand[bad]] = NONE
            lost = ords[bad & (ords == g)]
            if lost.size:   # a head changed or vanished: its next good member takes over
                self._set_heads({int(x): _PENDING for x in lost})
            keep = ~bad
            cand, g, ords = cand[keep], g[keep], ords[keep]
            if not cand.size:
                return
        cur = self._current_heads(g)
        pending = cur == _PENDING
        if pending.any():
            updates = {}
            for pos in np.flatnonzero(pending):
                gg = int(g[pos])
                if gg not in updates:
                    updates[gg] = int(ords[pos])
                cur[pos] = updates[gg]
            self._set_heads(updates)
        need = cur != ords
        here = np.flatnonzero(~need)
        if here.size:   # heads, including members just promoted to head
            r[cand[here]] = ords[here].astype(np.uint32)
            if self.cache_heads.size:
                hords = ords[here]
                slot = np.minimum(np.searchsorted(self.cache_heads, hords),
                                  self.cache_heads.size - 1)
                hit = self.cache_heads[slot] == hords
                if hit.any():
                    pages2d = buf.reshape(-1, ps)
                    self.cache[slot[hit]] = pages2d[cand[here[hit]]]
                    self.cache_valid[slot[hit]] = True
        idx = np.flatnonzero(need)
        if not idx.size:
            return
        equal = np.zeros(idx.size, dtype=bool)
        heads = cur[idx]
        members = cand[idx]
        # a head is never after its members, so it is in this chunk or an earlier one
        at = np.minimum(np.searchsorted(chunk_ords, heads), chunk_ords.size - 1)
        inside = chunk_ords[at] == heads
        if inside.any():
            equal[inside] = pages.compare_pages(buf, members[inside], at[inside], page_size=ps)
        outside = np.flatnonzero(~inside)
        if outside.size:
            slot, hit = self._cache_lookup(heads[outside])
            if hit.any():
                which = outside[hit]
                equal[which] = pages.compare_pages(buf, members[which], slot[hit],
                                                   b=self.cache_flat, page_size=ps)
                outside = outside[~hit]
        if outside.size:
            uniq, inv = np.unique(heads[outside], return_inverse=True)
            cap = self.heads.capacity
            for lo in range(0, uniq.size, cap):
                batch = uniq[lo:lo + cap]
                got = self._read_ordinals(self.heads, batch)
                sel = (inv >= lo) & (inv < lo + batch.size)
                which = outside[sel]
                slots = inv[sel] - lo
                hb = self.heads.buffer[: batch.size * ps]
                equal[which] = pages.compare_pages(buf, members[which], slots, b=hb,
                                                   page_size=ps) & got[slots]
        r[members[equal]] = heads[equal].astype(np.uint32)
        if not equal.all():
            miss = members[~equal]
            r[miss] = NONE
            self.leftovers.append((chunk_ords[miss], h[miss].copy()))

    def regroup_leftovers(self, max_rounds: int = 64):
        """Candidates that did not match their head: group them by full hash64 and compare again,
        round after round (each round confirms one content of a run), so pages whose hash bits
        collided still find their true twins. Returns the pages left unconfirmed."""
        if not self.leftovers:
            return 0
        ords = np.concatenate([a for a, _ in self.leftovers])
        hashes = np.concatenate([b for _, b in self.leftovers])
        self.leftovers = []
        order = np.argsort(hashes, kind="stable")
        ords, hashes = ords[order], hashes[order]
        starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
        ends = np.r_[starts[1:], hashes.size]
        unconfirmed = 0
        for s, e in zip(starts, ends):
            pending = np.sort(ords[s:e])
            rounds = 0
            while pending.size >= 2 and rounds < max_rounds:
                rounds += 1
                head, rest = pending[:1], pending[1:]
                if not self._read_ordinals(self.heads, head)[0]:
                    pending = rest
                    continue
                eq = self._equal_to_head(rest)
                if eq.any():
                    self.rep[head] = np.uint32(head[0])
                    self.rep[rest[eq]] = np.uint32(head[0])
                else:
                    unconfirmed += 1
                pending = rest[~eq]
            unconfirmed += pending.size if pending.size >= 2 or rounds else 0
        return int(unconfirmed)

    def _equal_to_head(self, ords: np.ndarray) -> np.ndarray:
        """Pages (by ordinal) byte-equal to the page in head slot 0."""
        ps, cap = self.ps, self.reader.capacity
        hb = self.heads.buffer[:ps]
        eq = np.zeros(ords.size, dtype=bool)
        for lo in range(0, ords.size, cap):
            part = ords[lo:lo + cap]
            got = self._read_ordinals(self.reader, part)
            eq[lo:lo + part.size] = pages.compare_pages(
                self.reader.buffer[: part.size * ps], np.arange(part.size),
                np.zeros(part.size, np.int64), b=hb, page_size=ps) & got
        return eq


# --- the entry point ------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def default_threads() -> int:
    """2 (read ahead while scanning) where this process may use two CPUs, else 1."""
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 1


def estimate(targets, passes: int = 2, interval: float = 0.5, all_eligible: bool = False,
             max_page_sharing: int | None = None, procfs: str = "/proc",
             buffer_bytes: int = DEFAULT_CHUNK_BYTES,
             cache_bytes: int = DEFAULT_CACHE_BYTES, threads: int | None = None,
             progress=None, recheck: str = "all", range_gap: int = DEFAULT_RANGE_GAP,
             max_ranges: int = DEFAULT_MAX_RANGES) -> Estimate:
    """Predict what KSM would save on ``targets``: PIDs and/or buffers of this process (a list,
    or one of them). Pages merge across all targets together, as KSM merges across processes.

    ``passes`` (>= 2): pass 1 hashes every page, later passes re-check crc32c (a change makes the
    page volatile) and the last one confirms duplicates byte by byte. ``interval``: the least time
    between two visits of the same page, in seconds. ``all_eligible``: also scan KSM-compatible
    memory that is not registered yet ("if you registered it"). ``max_page_sharing``: default the
    kernel's current value. ``progress(pass_no, passes, pages_done, pages_total)`` is called per
    chunk. The targets' memory is only read, never written, and pages not in RAM are not touched.

    ``recheck``: what the passes after the first re-read. ``"all"``: every page. ``"candidates"``:
    only the pages whose change can alter the prediction, the pages zero in pass 1 and the members
    of candidate duplicate groups; a unique page saves nothing whether it changes or not. The
    prediction (saved pages, rmap items, general_profit, group sizes, the per-target and
    per-mapping savings and saving ranges) is the same as with "all"; ``volatile_pages`` then
    counts only re-checked pages that changed, so unique pages that change are counted in
    ``unique_pages`` (and in ``pages_unshared``) instead, and pages unmapped after pass 1 are
    noticed only among the re-read ones.

    ``range_gap`` (bytes) and ``max_ranges`` shape each target's ``saving_ranges``: saving runs
    closer than ``range_gap`` are joined, and at most ``max_ranges`` ranges are kept per target
    by joining across the smallest gaps (see :class:`TargetReport`).
    """
    if int(passes) < 2:
        raise UsageError(f"passes must be at least 2, got {passes}: the first pass hashes, a "
                         "later one re-reads to catch volatile pages and to confirm duplicates "
                         "byte by byte")
    if interval < 0:
        raise UsageError(f"interval must be >= 0 seconds, got {interval}")
    if recheck not in RECHECK_MODES:
        raise UsageError(f"recheck must be one of {', '.join(RECHECK_MODES)}, got {recheck!r}")
    if not _is_int(range_gap) or range_gap < 0:
        raise UsageError(f"range_gap must be a whole number of bytes >= 0, got {range_gap!r}")
    if not _is_int(max_ranges) or not 1 <= max_ranges <= MAX_RANGES_LIMIT:
        raise UsageError(f"max_ranges must be a whole number from 1 to {MAX_RANGES_LIMIT}, got "
                         f"{max_ranges!r}: every range may split its mapping in three and a "
                         "process may have only vm.max_map_count (65530) mappings")
    passes = int(passes)
    sparse = recheck == "candidates"
    t_wall, t_cpu = time.monotonic(), time.process_time()
    mps, uzp = _current_knobs(max_page_sharing)
    tlist = _normalize_targets(targets, procfs)
    if threads is None:
        threads = default_threads()
    scanner = _Scanner(tlist, all_eligible, procfs, buffer_bytes, cache_bytes, threads, progress)
    timings: dict = {}

    def timed(name, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return out

    try:
        timed("scope", scanner.build_scope)
        scanner.allocate()
        visit = time.monotonic()
        timed("pass_first", scanner.pass_first, passes)
        timed("group", scanner.group)
        for pass_no in range(2, passes + 1):
            # each page is revisited at least `interval` after its previous visit
            wait = visit + interval - time.monotonic()
            if wait > 0:
                timed("wait", time.sleep, wait)
            visit = time.monotonic()
            if pass_no < passes:
                timed("pass_middle", scanner.pass_middle, pass_no, passes, sparse)
            else:
                timed("pass_last", scanner.pass_last, passes, sparse)
        unconfirmed = timed("regroup", scanner.regroup_leftovers)
        est = timed("summarize", _summarize, scanner, passes, interval, all_eligible, mps, uzp,
                    unconfirmed, int(range_gap), int(max_ranges))
        est.recheck = recheck
        est.timings = timings
        est.bytes_read = scanner.bytes_read
        est.buffer_bytes = len(scanner._buf)
    finally:
        scanner.close()
    est.elapsed_seconds = time.monotonic() - t_wall
    est.cpu_seconds = time.process_time() - t_cpu
    return est


class _SavingRanges:
    """The saving ranges of one target, built segment by segment, chunk by chunk, in O(max_ranges)
    memory.

    A target's ranges are its saving pages cut at mapping boundaries and at the gaps kept as
    splits. Joining across the smallest gaps until ``max_ranges`` remain is keeping the largest
    gaps, so only the ``max_ranges - 1`` largest gaps of at least ``range_gap`` seen so far are
    remembered: a gap pushed out of that set can never come back into it. Readable pages are
    counted by rank (readable pages before a position in its segment), so the readable pages of a
    span or a gap between two saving pages are a difference of ranks."""

    # gap record columns
    _GAP, _SEQ, _SEG, _PREV, _NEXT, _INSIDE = range(6)

    def __init__(self, page_size: int, range_gap: int, max_ranges: int):
        self.ps = page_size
        self.range_gap = range_gap
        self.max_ranges = max_ranges
        self.keep = max_ranges - 1
        self.gaps = np.empty((0, 6), dtype=np.int64)
        self.seq = 0
        self.spans: list = []    # per segment with savings: [start, first, last, rank0, rank1, n]
        self._seg = None

    def start_segment(self, seg: _Segment):
        self._seg = seg
        self._readable_before = 0
        self._span = None

    def add(self, pos0: int, saving: np.ndarray, readable: np.ndarray):
        """Positions ``pos0 + i`` of the current segment: which save memory, which are readable."""
        rank = np.cumsum(readable, dtype=np.int64)
        rank += self._readable_before
        self._readable_before = int(rank[-1]) if rank.size else self._readable_before
        at = np.flatnonzero(saving)
        if not at.size:
            return
        offs = self._seg.pageset.pages(at + pos0).astype(np.int64)
        ranks = rank[at]
        span = self._span
        if span is None:
            span = self._span = [self._seg.start, int(offs[0]), 0, int(ranks[0]), 0, 0]
            self.spans.append(span)
        else:   # the gap from the previous chunk's last saving page
            offs = np.concatenate(([span[2]], offs))
            ranks = np.concatenate(([span[4]], ranks))
        span[2], span[4] = int(offs[-1]), int(ranks[-1])
        span[5] += int(at.size)
        if self.keep <= 0 or offs.size < 2:
            return
        gap_pages = offs[1:] - offs[:-1] - 1
        split = np.flatnonzero((gap_pages > 0) & (gap_pages * self.ps >= self.range_gap))
        if not split.size:
            return
        rec = np.empty((split.size, 6), dtype=np.int64)
        rec[:, self._GAP] = gap_pages[split]
        rec[:, self._SEQ] = np.arange(self.seq, self.seq + split.size)
        rec[:, self._SEG] = len(self.spans) - 1
        rec[:, self._PREV] = offs[split]
        rec[:, self._NEXT] = offs[split + 1]
        rec[:, self._INSIDE] = ranks[split + 1] - ranks[split] - 1
        self.seq += split.size
        self.gaps = np.concatenate((self.gaps, rec))
        if self.gaps.shape[0] > max(4 * self.keep, 1024):
            self.gaps = self._largest(self.gaps, self.keep)

    def _largest(self, gaps: np.ndarray, k: int) -> np.ndarray:
        # largest first; among equal gaps the earliest, so the result does not depend on chunking
        order = np.lexsort((gaps[:, self._SEQ], -gaps[:, self._GAP]))
        return gaps[order[:k]]

    def result(self) -> tuple[list, int, int]:
        """(ranges, readable pages inside them, saving pages outside them)."""
        spans, ps = self.spans, self.ps
        if not spans:
            return [], 0, 0
        if len(spans) > self.max_ranges:
            # one range per mapping is already too many: keep the mappings saving most
            best = sorted(range(len(spans)), key=lambda i: (-spans[i][5], i))[: self.max_ranges]
            kept = [spans[i] for i in sorted(best)]
            ranges = [(s[0] + s[1] * ps, s[0] + (s[2] + 1) * ps) for s in kept]
            covered = sum(s[5] for s in kept)
            return ranges, sum(s[4] - s[3] + 1 for s in kept), sum(s[5] for s in spans) - covered
        chosen = self._largest(self.gaps, self.max_ranges - len(spans))
        chosen = chosen[np.lexsort((chosen[:, self._PREV], chosen[:, self._SEG]))]
        ranges, readable, ci = [], 0, 0
        for si, (start, first, last, rank0, rank1, _) in enumerate(spans):
            readable += rank1 - rank0 + 1
            lo = first
            while ci < chosen.shape[0] and chosen[ci, self._SEG] == si:
                ranges.append((start + lo * ps, start + (int(chosen[ci, self._PREV]) + 1) * ps))
                readable -= int(chosen[ci, self._INSIDE])
                lo = int(chosen[ci, self._NEXT])
                ci += 1
            ranges.append((start + lo * ps, start + (last + 1) * ps))
        return ranges, readable, 0


def _summarize(sc: _Scanner, passes, interval, all_eligible, mps, uzp, unconfirmed,
               range_gap=DEFAULT_RANGE_GAP, max_ranges=DEFAULT_MAX_RANGES) -> Estimate:
    est = Estimate(page_size=sc.ps, passes=passes, interval=interval, all_eligible=all_eligible,
                   max_page_sharing=mps, current_use_zero_pages=uzp, targets=sc.target_reports,
                   mappings=sc.reports, notes=list(sc.notes), index_bytes=sc.index_bytes)
    flags, rep = sc.flags, sc.rep
    n = sc.total
    for seg in sc.segments:
        if seg.pid in sc.exited_in:   # gone: KSM will never see these pages
            flags[seg.base: seg.base + seg.size] |= UNREADABLE
            rep[seg.base: seg.base + seg.size] = NONE
    grouped = rep != NONE
    sizes_by_head = np.bincount(rep[grouped], minlength=n) if n else np.zeros(0, np.int64)
    del grouped
    group_sizes = sizes_by_head[sizes_by_head >= 2]
    est.group_sizes = group_sizes
    est.duplicate_groups = int(group_sizes.size)
    est.largest_group = int(group_sizes.max()) if group_sizes.size else 0
    est.unconfirmed_pages = int(unconfirmed)
    est.existing_ksm_zero_pages = sum(t.existing_ksm_zero_pages for t in sc.target_reports)

    # per mapping: classify pages chunk by chunk (bounded temporaries)
    zero_total = 0
    ranges = [_SavingRanges(sc.ps, range_gap, max_ranges) for _ in sc.target_reports]
    for seg in sc.segments:
        a, b = seg.base, seg.base + seg.size
        builder = ranges[seg.target]
        builder.start_segment(seg)
        for lo in range(a, b, _STEP):
            hi = min(b, lo + _STEP)
            f, r = flags[lo:hi], rep[lo:hi]
            unread = (f & UNREADABLE) != 0
            vol = ((f & VOLATILE) != 0) & ~unread
            zr = ((f & ZERO) != 0) & ~vol & ~unread
            g = r != NONE
            gs = sizes_by_head[r[g]]
            dup = gs >= 2
            saving = zr.copy()
            saving[np.flatnonzero(g)[dup]] = True
            builder.add(lo - a, saving, ~unread)
            rr = seg.report
            rr.unreadable_pages += int(unread.sum())
            rr.volatile_pages += int(vol.sum())
            rr.zero_pages += int(zr.sum())
            rr.duplicate_pages += int(dup.sum())
            saved = float(sharing_fraction(gs[dup], mps).sum())
            rr.saved_pages[0] += saved
            rr.saved_pages[1] += saved
        rr = seg.report
        rr.unique_pages = rr.scanned_pages - rr.unreadable_pages - rr.volatile_pages - \
            rr.zero_pages - rr.duplicate_pages
        zero_total += rr.zero_pages
    zero_fraction = float(sharing_fraction(np.array([zero_total]), mps)[0]) if zero_total else 0.0
    for rr in sc.reports:
        rr.saved_pages[0] += rr.zero_pages * zero_fraction
        rr.saved_pages[1] += rr.zero_pages
    for ti, tr in enumerate(sc.target_reports):
        tr.saving_ranges, tr.range_pages, tr.uncovered_pages = ranges[ti].result()
        if tr.uncovered_pages:
            est.notes.append(f"{tr.name} (PID {tr.pid}): more mappings save memory than "
                             f"max_ranges={max_ranges}; the saving ranges leave out "
                             f"{tr.uncovered_pages} saving pages of the mappings saving least")
        mine = [s.report for s in sc.segments if s.target == ti]
        for key in _COUNT_FIELDS:
            setattr(tr, key, sum(getattr(m, key) for m in mine))
        tr.saved_pages = {k: sum(m.saved_pages[k] for m in mine) for k in (0, 1)}
        tr.saved_pages[1] += tr.existing_ksm_zero_pages
        tr.saved_pages[0] += tr.existing_ksm_zero_pages
    for key in ("zero_pages", "duplicate_pages", "unique_pages", "volatile_pages",
                "unreadable_pages"):
        setattr(est, key, sum(getattr(t, key) for t in sc.target_reports))
    est.pages_scanned = n
    est.zero_mapped_pages = sum(r.zero_mapped_pages for r in sc.reports)
    for pid, pass_no in sorted(sc.exited_in.items()):
        tr = next((t for t in sc.target_reports if t.pid == pid), None)
        if tr is not None:
            tr.exited = True
        covered = sum(s.size for s in sc.segments if s.pid == pid)
        est.partial = True
        est.notes.append(f"partial: PID {pid} exited during pass {pass_no} of {passes}; its "
                         f"{covered} pages are left out of the prediction")
    lost = est.unreadable_pages - sum(s.size for s in sc.segments
                                      if s.pid in sc.exited_in)
    if lost > 0:
        est.partial = True
        est.notes.append(f"partial: {lost} pages were unmapped during the scan and are left out")
    if est.pages_scanned == 0:
        est.notes.append("nothing to scan: no present anonymous pages in scope" +
                         ("" if all_eligible else
                          " (only registered memory is scanned by default; --all-eligible "
                          "predicts for memory not registered yet)"))
    return est


__all__ = ["estimate", "Estimate", "Prediction", "MappingReport", "TargetReport", "ksm_pages",
           "RMAP_ITEM_BYTES"]
