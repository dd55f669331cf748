"""True savings: the memory the host really gets back from KSM, counters and all.

KSM's counters (``pages_sharing + ksm_zero_pages``) miss memory. When ksmd merges a subpage of a
transparent huge page it splits the THP first, and the split maps the THP's zero-filled subpages
to the shared zero page (mm/huge_memory.c, remap of zero-filled subpages on split): those pages are
freed, yet no KSM counter sees them. On two QEMU guests the host's AnonPages fell 284.5 MiB while
the counters said 203.4 MiB.

So the true saving is::

    (pages_sharing + ksm_zero_pages + zero-mapped pages outside KSM) * page size

where *zero-mapped pages outside KSM* are the pages of mergeable (VM_MERGEABLE, smaps ``mg``)
mappings whose pagemap entry points at the shared zero page or the huge zero page, less those the
process's ``ksm_stat`` already counts as its ``ksm_zero_pages`` (use_zero_pages=1 maps the zero
page too). Pages a program read but never wrote map the zero page as well: they never cost memory,
so an absolute figure can include them; the change from a baseline taken before KSM ran (an A/B
trial's start) is exact.

One read walks /proc once (``ksm_stat`` of every process; ``smaps`` only of those with mergeable
memory) and reads the pagemap of their ``mg`` ranges in large blocks, counted with numpy
(:func:`udedup.host.pagemap.count_zero_mapped`). :class:`TrueSavingsReader` keeps each process's
``mg`` ranges between reads (smaps walks every page table entry; re-read only when the process's
maps or its ksm_stat flags change), so sampling every 0.1 s stays cheap.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable

from ..errors import UdedupError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..host.pagemap import count_zero_mapped, scan_zero_mapped, zero_page_pfns
from .mgranges import MergeableRanges, visit_mergeable
from .stats import KsmStats

#: What ``breakdown()`` says about the zero-page part, in the words a report needs.
NEVER_WRITTEN_NOTE = (
    "includes zero-page mappings this KSM run did not make: pages read but never written (they "
    "never cost memory), zero subpages the THP shrinker (shrink_underused) or an earlier KSM run "
    "handed back; the change from a baseline taken before ksmd ran is exact")


@dataclass(frozen=True)
class ProcessZeroPages:
    """One process with mergeable memory: its pages on the zero page, KSM's and the others."""

    pid: int
    comm: str
    mergeable_bytes: int        # size of its mg mappings (address space, not resident)
    zero_mapped_pages: int      # pages of mg mappings on the (huge) zero page, from pagemap
    ksm_zero_pages: int         # of them, those KSM put there (ksm_stat, use_zero_pages=1)

    @property
    def outside_ksm_pages(self) -> int:
        return max(0, self.zero_mapped_pages - self.ksm_zero_pages)

    def as_dict(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "mergeable_bytes": self.mergeable_bytes,
                "zero_mapped_pages": self.zero_mapped_pages, "ksm_zero_pages": self.ksm_zero_pages,
                "outside_ksm_pages": self.outside_ksm_pages}


@dataclass(frozen=True)
class TrueSavings:
    """One read of the true saving. Pages are ``page_size`` bytes (read from the system)."""

    stats: KsmStats                     # the KSM counters read with it
    page_size: int
    zero_mapped_pages: int              # mergeable pages on the zero page outside KSM (all of them)
    processes: tuple[ProcessZeroPages, ...]
    method: str | None                  # how zero pages were found: "pagemap_scan" (the ioctl),
                                        # "pfn" (pagemap PFNs), None: they cannot be (0 counted)
    unreadable_processes: int           # mergeable processes whose pagemap we could not read
    read_seconds: float                 # how long the read took (counters, /proc walk, pagemaps)
    age_seconds: float = 0.0            # 0: zero_mapped_pages walked in this read; > 0: a reused
                                        # walk this old (nothing it depends on moved since)

    @property
    def ksm_counter_pages(self) -> int:
        return self.stats.pages_sharing + self.stats.ksm_zero_pages

    @property
    def ksm_counter_bytes(self) -> int:
        return self.ksm_counter_pages * self.page_size

    @property
    def zero_mapped_bytes(self) -> int:
        return self.zero_mapped_pages * self.page_size

    @property
    def saved_pages(self) -> int:
        return self.ksm_counter_pages + self.zero_mapped_pages

    @property
    def saved_bytes(self) -> int:
        return self.saved_pages * self.page_size

    def breakdown(self) -> dict:
        """The parts of ``saved_bytes``, for JSON reports."""
        return {
            "ksm_counters": {"pages_sharing": self.stats.pages_sharing,
                             "ksm_zero_pages": self.stats.ksm_zero_pages,
                             "pages": self.ksm_counter_pages, "bytes": self.ksm_counter_bytes},
            "zero_page_mappings": {
                "pages": self.zero_mapped_pages, "bytes": self.zero_mapped_bytes,
                "what": "pages of mergeable (mg) anonymous mappings on the shared or huge zero "
                        "page, not counted as ksm_zero_pages (zero subpages of THPs KSM split)",
                "method": self.method, "note": NEVER_WRITTEN_NOTE,
                "unreadable_processes": self.unreadable_processes},
            "read_seconds": round(self.read_seconds, 6),
            **({"age_seconds": round(self.age_seconds, 3)} if self.age_seconds else {})}

    def as_dict(self, processes: bool = True) -> dict:
        out = {"saved_bytes": self.saved_bytes, "saved_pages": self.saved_pages,
               "page_size": self.page_size, "breakdown": self.breakdown()}
        if processes:
            out["processes"] = [p.as_dict() for p in self.processes]
        return out

    _asdict = as_dict


def read_counters(reader) -> KsmStats:
    """The KSM counters now, from ``reader.ksm`` (a Ksm on ``reader.procfs``, made on first use):
    what the readers of the true saving and of the attribution read before their walk."""
    if reader.ksm is None:
        from .controller import Ksm
        reader.ksm = Ksm(procfs=reader.procfs)
    return reader.ksm.stats()


class TrueSavingsReader:
    """Reads :class:`TrueSavings` again and again (a sampler, the daemon), keeping each process's
    ``mg`` ranges between reads: smaps is re-read only when ``/proc/PID/maps`` or the process's
    ksm_stat flags change (a madvise that registers a whole mapping changes neither the maps text
    nor, after the first, the flags: ``refresh_seconds`` bounds how stale the ranges get).

    ``pids``: only these processes, or a callable returning them (None: every process, the scope
    of the global counters). Zero pages are found by the PAGEMAP_SCAN ioctl where the kernel has
    it (6.7+; no privilege beyond reading the pagemap), else by the pagemap's PFNs against the zero
    pages' (root only: without it they stay uncounted and ``method`` is None); ``zero_pfns``
    gives those PFN ranges instead of probing for them (tests on fake trees)."""

    def __init__(self, ksm=None, procfs: ProcFs | str | None = None,
                 pids=None, refresh_seconds: float = 5.0, zero_pfns: tuple | None = None,
                 clock=time.monotonic):
        self.ksm = ksm
        root = procfs if procfs is not None else (ksm.procfs if ksm is not None else DEFAULT_PROCFS)
        self.procfs = as_procfs(root)
        self.pids = pids if pids is None or callable(pids) else tuple(int(p) for p in pids)
        self.ranges_cache = MergeableRanges(self.procfs, refresh_seconds, clock)
        self._scan_works: bool | None = None    # PAGEMAP_SCAN answered (None: not tried yet)
        self._zero_pfns = zero_pfns             # None: found on first use (host.pagemap)

    def read(self, stats: KsmStats | None = None) -> TrueSavings:
        """One read. ``stats``: counters already read (else read here, first)."""
        t0 = time.perf_counter()
        if stats is None:
            stats = read_counters(self)
        page_size = stats.page_size or os.sysconf("SC_PAGE_SIZE")
        procs, unreadable = visit_mergeable(
            self.procfs, self.pids, lambda pid, stat: self._process(pid, stat, page_size))
        self.ranges_cache.forget_others()
        outside = sum(p.outside_ksm_pages for p in procs)
        method = "pagemap_scan" if self._scan_works else ("pfn" if self._zero() else None)
        return TrueSavings(stats=stats, page_size=page_size, zero_mapped_pages=outside,
                           processes=tuple(procs), method=method, unreadable_processes=unreadable,
                           read_seconds=time.perf_counter() - t0)

    def _zero(self) -> tuple:
        if self._zero_pfns is None:
            try:
                self._zero_pfns = zero_page_pfns(self.procfs)
            except UdedupError:     # a /proc without self/pagemap (a fake tree): none known
                self._zero_pfns = ()
        return self._zero_pfns

    def _process(self, pid: int, stat: dict, page_size: int) -> ProcessZeroPages | None:
        ranges = self.ranges_cache.ranges(pid, stat)
        if not ranges:
            return None
        comm = self.procfs.comm(pid, default="?")
        fd = self.procfs.open(pid, "pagemap")
        try:
            hits = None
            if self._scan_works is not False:
                hits = scan_zero_mapped(fd, ranges, page_size, pid)
                self._scan_works = hits is not None
            if hits is None:
                hits = count_zero_mapped(fd, pid, ranges, self._zero(), page_size=page_size)
        finally:
            os.close(fd)
        return ProcessZeroPages(pid=pid, comm=comm,
                                mergeable_bytes=sum(end - start for start, end in ranges),
                                zero_mapped_pages=hits,
                                ksm_zero_pages=int(stat.get("ksm_zero_pages", 0) or 0))


def true_savings(ksm=None, procfs: ProcFs | str | None = None, pids: Iterable[int] | None = None,
                 stats: KsmStats | None = None) -> TrueSavings:
    """The true saving now (one read, nothing kept): KSM's counters of ``ksm`` (default
    ``Ksm()``) plus the zero-page mappings of every process with mergeable memory under
    ``procfs`` (or only ``pids``). Where zero pages cannot be found (no PAGEMAP_SCAN and no root to
    see PFNs) ``method`` is None and only the counters count."""
    return TrueSavingsReader(ksm, procfs, pids).read(stats)
