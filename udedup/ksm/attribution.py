"""Who saves what: the true saving of KSM split exactly over processes, cgroups and users.

A KSM page mapped ``k`` times replaces ``k`` pages by one, so each of its present mappings saves
``1 - 1/k`` pages (summing ``ksm_process_profit`` over a cgroup counts the page's own mapping too
and over-counts). Each mapping of the shared or huge zero page in mergeable (``mg``) memory saves
one page: KSM's zero pages (``use_zero_pages=1``) and the zero subpages of THPs KSM split. Summed
over every process this is the machine's true saving (:mod:`udedup.ksm.truth`)::

    pages_sharing + ksm_zero_pages + zero-page mappings of mergeable memory outside KSM

One read: the KSM counters; per process with mergeable memory, its ``mg`` ranges (smaps, kept
between reads by :class:`AttributionReader`), its pagemap over them (8 bytes per page, read in
large blocks), then once for all processes
``/proc/kpageflags`` (the KSM bit) and ``/proc/kpagecount`` (mappings per frame) of the frames that
are mapped more than once (``PM_MMAP_EXCLUSIVE`` clear: a frame mapped once saves nothing), read in
spans of nearby frames. PFNs, kpageflags and kpagecount are root's only (CAP_SYS_ADMIN): without
them :func:`attribute` raises :class:`~udedup.errors.ProcessAccessError` (exit code 4) saying so.
Cost (scripts/bench_attribution.py): the pagemap, ~15 ms per GiB, and the two tables, ~0.3 us per
KSM frame each (kernel time): a round on 2 GiB merged in pairs (262144 KSM frames) ~0.3 s.

The total is checked against the counters read in the same call. The counters are global files
read apart from the page tables: while ksmd runs it merges and breaks pages between the reads
(and a page being merged is briefly in neither place), so the two differ by a few pages; with
ksmd stopped (``run=0``) and every mergeable process readable they match to the page.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ProcessAccessError, UsageError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..host.pagemap import (KPF_KSM, PAGEMAP_BLOCK, read_pagemap, read_pfn_tables,
                            shared_anon_pfns, zero_page_entries, zero_page_pfns_or_none)
from ..host.parse import status_ids
from .mgranges import MergeableRanges, visit_mergeable
from .stats import KsmStats
from .truth import ProcessZeroPages, TrueSavings, read_counters

#: the groupings of :meth:`Attribution.groups` and the JSON key naming each group
GROUPINGS = {"cgroup": "cgroup", "uid": "uid", "process": "pid"}
NEEDS_ROOT = ("savings per cgroup, uid or process need root (CAP_SYS_ADMIN): they read page "
              "frame numbers from /proc/PID/pagemap and /proc/kpageflags, /proc/kpagecount")
#: why the attributed total and the counters can differ (the check's ``why``)
RACE_NOTE = ("the counters are read apart from the page tables: while ksmd runs it merges and "
             "breaks pages between the reads, so a few pages apart is expected; with ksmd "
             "stopped (run=0) they match to the page. Processes that could not be read, or exited "
             "during the walk, are missing from the attributed figure")


@dataclass(frozen=True)
class ProcessSaving:
    """What one process with mergeable memory saves. Pages are the system's page size."""

    pid: int
    comm: str
    uid: int | None             # effective uid (/proc/PID/status); None: unreadable
    cgroup: str                 # cgroup v2 path (the ``0::`` line of /proc/PID/cgroup), "" if none
    mergeable_bytes: int        # size of its mg mappings (address space, not resident)
    ksm_mappings: int           # its present mappings of KSM pages mapped twice or more
    ksm_saved_pages: float      # sum over them of 1 - 1/k (k: the page's kpagecount)
    zero_mapped_pages: int      # its mg pages on the (huge) zero page: one page saved each
    ksm_zero_pages: int         # of those, KSM's own (ksm_stat, use_zero_pages=1)

    @property
    def saved_pages(self) -> float:
        return self.ksm_saved_pages + self.zero_mapped_pages

    def as_dict(self, page_size: int) -> dict:
        return {"pid": self.pid, "comm": self.comm, "uid": self.uid,
                "cgroup": self.cgroup or None, "saved_bytes": round(self.saved_pages * page_size),
                "saved_pages": round(self.saved_pages, 3),
                "ksm_saved_pages": round(self.ksm_saved_pages, 3),
                "ksm_mappings": self.ksm_mappings, "zero_mapped_pages": self.zero_mapped_pages,
                "ksm_zero_pages": self.ksm_zero_pages, "mergeable_bytes": self.mergeable_bytes}


@dataclass(frozen=True)
class SavingGroup:
    """The processes of one cgroup, uid or process (``by``), and what they save together."""

    by: str
    key: object                 # the cgroup path, the uid or the pid
    processes: tuple[ProcessSaving, ...]

    @property
    def saved_pages(self) -> float:
        return sum(p.saved_pages for p in self.processes)

    @property
    def ksm_saved_pages(self) -> float:
        return sum(p.ksm_saved_pages for p in self.processes)

    @property
    def zero_mapped_pages(self) -> int:
        return sum(p.zero_mapped_pages for p in self.processes)

    def as_dict(self, page_size: int) -> dict:
        key = self.key if self.key != "" else None
        out = {GROUPINGS[self.by]: key}
        if self.by == "process":
            out["comm"] = self.processes[0].comm
        out.update({"saved_bytes": round(self.saved_pages * page_size),
                    "saved_pages": round(self.saved_pages, 3),
                    "ksm_saved_pages": round(self.ksm_saved_pages, 3),
                    "zero_mapped_pages": self.zero_mapped_pages,
                    "processes": [p.as_dict(page_size) for p in self.processes]})
        return out


@dataclass(frozen=True)
class Attribution:
    """One read: every process's saving, and the machine's true saving read with it."""

    page_size: int
    processes: tuple[ProcessSaving, ...]    # largest saving first
    truth: TrueSavings          # counters + zero-page mappings outside KSM, from the same read
    unreadable_processes: int   # processes with mergeable memory that could not be read
    read_seconds: float
    moved_pages: int | None = None  # pages_sharing + ksm_zero_pages change over the read (None:
                                    # not read again, the caller passed ``stats``)

    @property
    def saved_pages(self) -> float:
        return sum(p.saved_pages for p in self.processes)

    @property
    def saved_bytes(self) -> int:
        return round(self.saved_pages * self.page_size)

    def groups(self, by: str = "cgroup") -> list[SavingGroup]:
        """Processes grouped ``by`` "cgroup", "uid" or "process", largest saving first."""
        if by not in GROUPINGS:
            raise UsageError(f"cannot group savings by {by!r}: use one of {', '.join(GROUPINGS)}")
        members: dict = {}
        for p in self.processes:
            key = {"cgroup": p.cgroup, "uid": p.uid, "process": p.pid}[by]
            members.setdefault(key, []).append(p)
        groups = [SavingGroup(by, key, tuple(ps)) for key, ps in members.items()]
        return sorted(groups, key=lambda g: (-g.saved_pages, str(g.key)))

    def check(self) -> dict:
        """The attributed total against the counters: KSM pages against ``pages_sharing``, zero
        pages against ``ksm_zero_pages`` + the zero-page mappings outside KSM."""
        stats = self.truth.stats
        ksm = sum(p.ksm_saved_pages for p in self.processes)
        zero = sum(p.zero_mapped_pages for p in self.processes)
        zero_expected = stats.ksm_zero_pages + self.truth.zero_mapped_pages
        diff = self.saved_pages - self.truth.saved_pages
        return {"attributed_pages": round(self.saved_pages, 3),
                "true_saved_pages": self.truth.saved_pages,
                "difference_pages": round(diff, 3),
                "matches": abs(diff) < 0.5,
                "ksm_pages": {"attributed": round(ksm, 3), "pages_sharing": stats.pages_sharing,
                              "difference": round(ksm - stats.pages_sharing, 3)},
                "zero_pages": {"attributed": zero, "counted": zero_expected,
                               "difference": zero - zero_expected},
                "unreadable_processes": self.unreadable_processes,
                "counters_moved_pages": self.moved_pages,
                "why": None if abs(diff) < 0.5 else RACE_NOTE}

    def as_dict(self, by: str = "cgroup") -> dict:
        return {"by": by, "groups": [g.as_dict(self.page_size) for g in self.groups(by)],
                "saved_bytes": self.saved_bytes, "saved_pages": round(self.saved_pages, 3),
                "page_size": self.page_size, "check": self.check(),
                "read_seconds": round(self.read_seconds, 6)}


def check_root(procfs: ProcFs, zero_pfns: tuple, tables=("kpageflags", "kpagecount"),
               message: str = NEEDS_ROOT) -> None:
    """ProcessAccessError(``message``) unless the PFN ``tables`` open and pagemap shows PFNs."""
    for name in tables:
        try:
            os.close(procfs.open_global(name))
        except ProcessAccessError:
            raise ProcessAccessError(message) from None
    if not zero_pfns:           # pagemap shows PFN 0: PFNs are hidden from us
        raise ProcessAccessError(message)


def mergeable_pagemap(procfs: ProcFs, pid: int, ranges, page_size: int, out: np.ndarray):
    """The page walk of attribution and the audit: ``(address, entries)`` for each block of at
    most ``out.size`` pages of ``ranges`` (one open of the pagemap, one pread per block; the
    entries live in ``out``, overwritten by the next block). ProcessError if the process exits."""
    fd = procfs.open(pid, "pagemap")
    step = out.size * page_size
    try:
        for start, end in ranges:
            for lo in range(start, end, step):
                yield lo, read_pagemap(fd, lo, min(end, lo + step), out=out,
                                       page_size=page_size, pid=pid)
    finally:
        os.close(fd)


class AttributionReader:
    """Reads :class:`Attribution` again and again (the daemon, every round), keeping each
    process's ``mg`` ranges between reads (:class:`~udedup.ksm.mgranges.MergeableRanges`).

    ``pids``: only these processes, or a callable returning them (None: every process, the scope
    of the global counters). ``zero_pfns``: the zero pages' PFN ranges (fake trees), else probed.
    Needs root: :meth:`read` raises ProcessAccessError (exit code 4) without it."""

    def __init__(self, ksm=None, procfs: ProcFs | str | None = None, pids=None,
                 zero_pfns: tuple | None = None, refresh_seconds: float = 5.0):
        self.ksm = ksm
        root = procfs if procfs is not None else (ksm.procfs if ksm is not None else DEFAULT_PROCFS)
        self.procfs = as_procfs(root)
        self.pids = pids if pids is None or callable(pids) else tuple(int(p) for p in pids)
        self.zero_pfns = zero_pfns
        self.mg = MergeableRanges(self.procfs, refresh_seconds)
        self._scratch = np.empty(3 * PAGEMAP_BLOCK, dtype=np.uint64)

    def read(self, stats: KsmStats | None = None) -> Attribution:
        """One read. ``stats``: counters already read (else read here, first and again last, to
        say how far ksmd moved them during the walk)."""
        t0 = time.perf_counter()
        if self.zero_pfns is None:
            self.zero_pfns = zero_page_pfns_or_none(self.procfs)
        check_root(self.procfs, self.zero_pfns)
        reread = stats is None
        if reread:
            stats = read_counters(self)
        page_size = stats.page_size or os.sysconf("SC_PAGE_SIZE")
        got, unreadable = visit_mergeable(
            self.procfs, self.pids, lambda pid, stat: self._process(pid, stat, page_size))
        found, parts = [g[0] for g in got], [g[1] for g in got]
        self.mg.forget_others()
        procs = _with_ksm_part(found, parts, self.procfs)
        zero = tuple(ProcessZeroPages(p.pid, p.comm, p.mergeable_bytes, p.zero_mapped_pages,
                                      p.ksm_zero_pages) for p in procs)
        truth = TrueSavings(stats=stats, page_size=page_size,
                            zero_mapped_pages=sum(z.outside_ksm_pages for z in zero),
                            processes=zero, method="pfn", unreadable_processes=unreadable,
                            read_seconds=time.perf_counter() - t0)
        procs.sort(key=lambda p: (-p.saved_pages, p.pid))
        moved = None
        if reread:                  # how far ksmd moved the counters while we walked
            after = self.ksm.stats()
            moved = (after.pages_sharing + after.ksm_zero_pages
                     - stats.pages_sharing - stats.ksm_zero_pages)
        return Attribution(page_size=page_size, processes=tuple(procs), truth=truth,
                           unreadable_processes=unreadable,
                           read_seconds=time.perf_counter() - t0, moved_pages=moved)

    def _process(self, pid: int, stat: dict, ps: int):
        """``(ProcessSaving without its KSM part, its PFNs mapped more than once)``, or None."""
        ranges = self.mg.ranges(pid, stat)
        if not ranges:
            return None
        procfs, scratch, zero_pfns = self.procfs, self._scratch, self.zero_pfns
        zero, pfns = 0, []
        for _, entries in mergeable_pagemap(procfs, pid, ranges, ps, scratch[:PAGEMAP_BLOCK]):
            zero += zero_page_entries(entries, zero_pfns, scratch[PAGEMAP_BLOCK:])
            pfns.append(shared_anon_pfns(entries, zero_pfns))
        uids = status_ids(procfs.maybe_status(pid) or {}, "Uid")
        proc = ProcessSaving(pid=pid, comm=procfs.comm(pid, default="?"),
                             uid=uids[1] if len(uids) > 1 else None, cgroup=procfs.cgroup(pid),
                             mergeable_bytes=sum(end - start for start, end in ranges),
                             ksm_mappings=0, ksm_saved_pages=0.0, zero_mapped_pages=zero,
                             ksm_zero_pages=int(stat.get("ksm_zero_pages", 0) or 0))
        return proc, (np.concatenate(pfns) if pfns else np.empty(0, dtype=np.uint64))


def attribute(ksm=None, procfs: ProcFs | str | None = None, pids=None,
              stats: KsmStats | None = None, zero_pfns: tuple | None = None) -> Attribution:
    """Each process's share of the true saving now (one read, nothing kept; see the module's
    doc): every process with mergeable memory under ``procfs`` (or only ``pids``), KSM counters
    from ``ksm`` (default ``Ksm()``) or ``stats``. Needs root: ProcessAccessError (exit code 4)
    without it."""
    return AttributionReader(ksm, procfs, pids, zero_pfns).read(stats)


def _with_ksm_part(found: list, parts: list, procfs: ProcFs) -> list[ProcessSaving]:
    # one read of kpageflags and kpagecount for every process's frames mapped more than once
    if not found:
        return []
    owner = np.repeat(np.arange(len(parts)), [p.size for p in parts])
    pfns = np.concatenate(parts)
    flags, counts = read_pfn_tables(pfns, ("kpageflags", "kpagecount"), procfs)
    ksm = (((flags >> np.uint64(KPF_KSM)) & np.uint64(1)) == 1) & (counts > 0)
    share = 1.0 - 1.0 / counts[ksm].astype(np.float64)
    saved = np.bincount(owner[ksm], weights=share, minlength=len(found))
    mapped = np.bincount(owner[ksm], minlength=len(found))
    return [ProcessSaving(**{**p.__dict__, "ksm_mappings": int(mapped[i]),
                             "ksm_saved_pages": float(saved[i])})
            for i, p in enumerate(found)]
