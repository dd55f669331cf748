"""The trust-domain audit: page by page proof that no KSM page is mapped from two domains.

KSM merges identical pages of every registered process, across tenants; a KSM page mapped from
two trust domains (cgroups, uids: :mod:`udedup.host.domains`) is a copy-on-write timing channel
between them. The audit walks the mergeable (``mg``) memory of every process (or only ``pids``),
the same walk as :mod:`udedup.ksm.attribution`: its pagemap gives the PFN of every present
anonymous page mapped more than once (a frame mapped once is shared with nobody),
``/proc/kpageflags`` the KSM bit of those frames (one read for all processes, in spans). The
mappings (PFN, process, address) are kept as numpy arrays, sorted by frame and domain: a KSM frame
with mappings from two or more domains is mapped across domains.

Zero-filled KSM frames: with ``use_zero_pages=0`` KSM merges the zero-filled pages of everyone
into the same few KSM pages. Whether a cross-domain frame is zero-filled is decided by reading its
bytes (one mapping, through ``/proc/PID/mem``; never a checksum: process_vm_readv pins the page,
and the kernel unshares a KSM page pinned read-only, so it would break the merge it checks). Those frames are counted apart
(``zero_frames_across``) and are offenders only when ``zero_pages_across_domains`` is false (a
zero page carries nothing but the fact that a page is zero). A frame whose bytes cannot be read
(the process exited meanwhile) counts as not zero: an offender. With ``use_zero_pages=1`` zero
pages map the kernel's zero page, which is not a KSM frame: they are counted as
``zero_page_mappings``, never offenders.

Root only (PFNs and kpageflags need CAP_SYS_ADMIN): ProcessAccessError (exit code 4) without it.
The walk reads page tables while ksmd may merge and break pages: exact with ksmd stopped
(``run=0``). Cost: the pagemap (~15 ms per GiB), kpageflags of the shared frames, and one page
read per cross-domain frame.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UdedupError, UsageError
from ..host.domains import check_kind, process_domains
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..host.pagemap import (KPF_KSM, PAGEMAP_BLOCK, PM_FILE, PM_MMAP_EXCLUSIVE, PM_PFN_MASK,
                            PM_PRESENT, PM_SWAPPED, read_pfn_tables, zero_page_entries,
                            zero_page_pfns_or_none)
from ..host.remote import aligned_buffer, page_runs
from ..native.kernels import zero_pages
from .attribution import check_root, mergeable_pagemap
from .mgranges import MergeableRanges, visit_mergeable

NEEDS_ROOT = ("the audit needs root (CAP_SYS_ADMIN): it reads page frame numbers from "
              "/proc/PID/pagemap and the KSM bit from /proc/kpageflags")
#: addresses shown per process and group in the text output and the groups' JSON
SAMPLE_ADDRESSES = 3
_ROW_CODE_LIMIT = 1 << 62      # domain sets coded as one int64 below this (else rows sorted)
_MEM_CHUNK = 1 << 20           # bytes per /proc/PID/mem read (at most)
_SHARED = np.uint64(PM_PRESENT | PM_SWAPPED | PM_FILE | PM_MMAP_EXCLUSIVE)


@dataclass(frozen=True)
class Offender:
    """A KSM frame mapped from two or more domains: every mapping as (domain, pid, comm, address)."""

    pfn: int
    zero: bool                  # its bytes are all zero (read from one mapping)
    mappings: tuple

    @property
    def domains(self) -> tuple:
        return tuple(sorted({m[0] for m in self.mappings}))

    def as_dict(self) -> dict:
        return {"pfn": self.pfn, "zero": self.zero, "domains": list(self.domains),
                "mappings": [{"domain": d, "pid": p, "comm": c, "address": a}
                             for d, p, c, a in self.mappings]}


@dataclass(frozen=True)
class OffenderGroup:
    """The offender frames mapped from exactly these ``domains``: counts are complete."""

    domains: tuple
    frames: int
    pages: int                  # their mappings (pages of the processes below)
    zero_frames: int            # of the frames, zero-filled ones (offenders with strict zero)
    processes: tuple            # (pid, comm, domain, pages, (a few addresses)), largest first

    def as_dict(self) -> dict:
        return {"domains": list(self.domains), "frames": self.frames, "pages": self.pages,
                "zero_frames": self.zero_frames,
                "processes": [{"pid": p, "comm": c, "domain": d, "pages": n,
                               "addresses": list(a)} for p, c, d, n, a in self.processes]}


@dataclass(frozen=True)
class AuditReport:
    kind: str
    depth: int
    domains: dict               # key -> [pid, ...] of the processes walked
    ksm_frames: int             # distinct KSM frames mapped two or more times
    offenders: list             # Offender, pfn order; at most ``limit`` of them (see offender_frames)
    offender_frames: int        # every offender frame (complete even when the list is capped)
    offender_pages: int         # their mappings
    groups: list                # OffenderGroup, most frames first
    zero_frames_across: int     # zero-filled KSM frames mapped from two or more domains
    zero_pages_across_domains: bool
    zero_page_mappings: int     # mg pages on the kernel's (huge) zero page (use_zero_pages=1)
    unreadable_processes: int
    read_seconds: float
    processes: int = 0          # processes with mergeable memory walked
    limit: int | None = None
    comms: dict = field(default_factory=dict, repr=False)   # pid -> comm

    @property
    def ok(self) -> bool:
        return self.offender_frames == 0

    def as_dict(self) -> dict:
        return {"ok": self.ok, "kind": self.kind, "depth": self.depth,
                "domains": {k: list(v) for k, v in self.domains.items()},
                "processes": self.processes, "ksm_frames": self.ksm_frames,
                "offender_frames": self.offender_frames, "offender_pages": self.offender_pages,
                "zero_frames_across": self.zero_frames_across,
                "zero_pages_across_domains": self.zero_pages_across_domains,
                "zero_page_mappings": self.zero_page_mappings,
                "groups": [g.as_dict() for g in self.groups],
                "offenders": [o.as_dict() for o in self.offenders],
                "offenders_listed": len(self.offenders), "limit": self.limit,
                "unreadable_processes": self.unreadable_processes,
                "read_seconds": round(self.read_seconds, 6)}


def mem_zero_pages(pid: int, addrs: np.ndarray, page_size: int,
                   procfs: ProcFs | str | None = None) -> np.ndarray:
    """Whether each page at ``addrs`` of ``pid`` is all zero bytes (False: not, or not read),
    read through /proc/PID/mem: a plain reference to the page, while process_vm_readv pins it,
    and a read-only pin of a KSM page makes the kernel unshare it (the read would break the
    very merge it looks at)."""
    fs = as_procfs(procfs)
    addrs = np.asarray(addrs, dtype=np.uint64)
    out = np.zeros(addrs.size, dtype=bool)
    order = np.argsort(addrs, kind="stable")
    starts, lens = page_runs(addrs[order], page_size) if addrs.size else (addrs, addrs)
    try:
        fd = fs.open(pid, "mem")
    except UdedupError:         # exited, or we may not read it: nothing read, nothing zero
        return out
    buf = aligned_buffer(_MEM_CHUNK)
    view, pages = memoryview(buf), np.frombuffer(buf, dtype=np.uint8)
    try:
        done = 0
        for start, length in zip(starts.tolist(), lens.tolist()):
            for off in range(0, length, _MEM_CHUNK):
                n = min(_MEM_CHUNK, length - off)
                try:
                    got = os.preadv(fd, [view[:n]], start + off)
                except OSError:         # unmapped meanwhile (EIO), or the process exited
                    got = 0
                full = got // page_size
                if full:
                    out[order[done:done + full]] = zero_pages(pages[:full * page_size],
                                                              page_size)
                done += n // page_size
    finally:
        os.close(fd)
        del view, pages
        buf.close()
    return out


class AuditReader:
    """Audits again and again (the daemon, every round), keeping each process's ``mg`` ranges
    between reads. ``pids``: only these processes (or a callable returning them; None: all).
    ``zero_pfns``: the zero pages' PFN ranges (fake trees), else probed. ``zero_reader(pid, addrs,
    page_size) -> bool array``: the byte check of zero-filled frames (default
    :func:`mem_zero_pages`, through /proc/PID/mem)."""

    def __init__(self, kind: str = "cgroup", depth: int = 0, ksm=None,
                 procfs: ProcFs | str | None = None, pids=None,
                 zero_pages_across_domains: bool = True, zero_pfns: tuple | None = None,
                 zero_reader=None, refresh_seconds: float = 5.0):
        self.kind = check_kind(kind)
        if int(depth) < 0:
            raise UsageError(f"cgroup depth must be 0 (the whole path) or more, not {depth}")
        self.depth = int(depth)
        root = procfs if procfs is not None else (ksm.procfs if ksm is not None else DEFAULT_PROCFS)
        self.procfs = as_procfs(root)
        self.pids = pids if pids is None or callable(pids) else tuple(int(p) for p in pids)
        self.zero_across = bool(zero_pages_across_domains)
        self.zero_pfns = zero_pfns
        self.zero_reader = zero_reader or (lambda pid, addrs, ps: mem_zero_pages(
            pid, addrs, ps, self.procfs))
        self.mg = MergeableRanges(self.procfs, refresh_seconds)
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self._scratch = np.empty(3 * PAGEMAP_BLOCK, dtype=np.uint64)

    def read(self, limit: int | None = None) -> AuditReport:
        """One audit; ``limit``: list at most this many offenders (counts stay complete)."""
        t0 = time.perf_counter()
        if self.zero_pfns is None:
            self.zero_pfns = zero_page_pfns_or_none(self.procfs)
        check_root(self.procfs, self.zero_pfns, ("kpageflags",), NEEDS_ROOT)
        got, unreadable = visit_mergeable(self.procfs, self.pids, self._process)
        got.sort(key=lambda g: g[0])
        self.mg.forget_others()
        pids = [g[0] for g in got]
        comms = {g[0]: g[1] for g in got}
        keys = process_domains(pids, self.kind, self.depth, self.procfs)
        domains: dict = {}
        for pid in pids:
            domains.setdefault(keys[pid], []).append(pid)
        names = sorted(domains)
        frames = _frames(got, [names.index(keys[p]) for p in pids], self.procfs)
        report = dict(kind=self.kind, depth=self.depth, domains=dict(sorted(domains.items())),
                      zero_pages_across_domains=self.zero_across,
                      zero_page_mappings=sum(g[4] for g in got), unreadable_processes=unreadable,
                      processes=len(pids), limit=limit, comms=comms)
        report.update(self._offenders(frames, pids, comms, names, limit))
        return AuditReport(read_seconds=time.perf_counter() - t0, **report)

    def _process(self, pid: int, stat: dict):
        """``(pid, comm, PFNs, addresses, zero-page mappings)`` of its shared anonymous pages."""
        ranges = self.mg.ranges(pid, stat)
        if not ranges:
            return None
        ps, scratch, zero_pfns = self.page_size, self._scratch, self.zero_pfns
        zero, pfns, addrs = 0, [], []
        for lo, entries in mergeable_pagemap(self.procfs, pid, ranges, ps,
                                             scratch[:PAGEMAP_BLOCK]):
            zero += zero_page_entries(entries, zero_pfns, scratch[PAGEMAP_BLOCK:])
            keep = np.flatnonzero((entries & _SHARED) == np.uint64(PM_PRESENT))
            pfn = entries[keep] & np.uint64(PM_PFN_MASK)
            for first, stop in zero_pfns:
                out = (pfn < np.uint64(first)) | (pfn >= np.uint64(stop))
                keep, pfn = keep[out], pfn[out]
            pfns.append(pfn)
            addrs.append(np.uint64(lo) + keep.astype(np.uint64) * np.uint64(ps))
        empty = np.empty(0, dtype=np.uint64)
        return (pid, self.procfs.comm(pid, default="?"),
                np.concatenate(pfns) if pfns else empty,
                np.concatenate(addrs) if addrs else empty, zero)

    def _offenders(self, f: dict, pids: list, comms: dict, names: list, limit) -> dict:
        pfn, owner, dom, addr, start = f["pfn"], f["owner"], f["dom"], f["addr"], f["start"]
        nframes = start.size - 1
        # distinct (frame, domain) pairs: the mappings are sorted by frame, then domain
        frame_of = np.repeat(np.arange(nframes), np.diff(start))
        new_pair = np.ones(pfn.size, dtype=bool)
        new_pair[1:] = (pfn[1:] != pfn[:-1]) | (dom[1:] != dom[:-1])
        ndom = np.bincount(frame_of[new_pair], minlength=nframes)
        across = np.flatnonzero(ndom >= 2)
        zero = np.zeros(across.size, dtype=bool)
        first = start[across]               # one mapping of each frame: read its bytes
        first_pid = np.asarray(pids, dtype=np.int64)[owner[first]] if first.size else first
        for pid in np.unique(first_pid).tolist():
            sel = np.flatnonzero(first_pid == pid)
            zero[sel] = self.zero_reader(int(pid), addr[first[sel]], self.page_size)
        bad = ~zero if self.zero_across else np.ones(across.size, dtype=bool)
        off, off_zero = across[bad], zero[bad]
        groups = _groups(off, off_zero, f, frame_of, new_pair, pids, comms, names)
        listed = off if limit is None else off[:max(0, int(limit))]
        offenders = []
        for k, fr in enumerate(listed.tolist()):
            lo, hi = int(start[fr]), int(start[fr + 1])
            offenders.append(Offender(int(pfn[lo]), bool(off_zero[k]), tuple(
                (names[d], pids[o], comms[pids[o]], a) for d, o, a in
                zip(dom[lo:hi].tolist(), owner[lo:hi].tolist(), addr[lo:hi].tolist()))))
        return dict(ksm_frames=int(nframes), offenders=offenders, offender_frames=int(off.size),
                    offender_pages=int(np.diff(start)[off].sum()) if off.size else 0,
                    groups=groups, zero_frames_across=int(zero.sum()))


def _frames(got: list, owner_domain: list, procfs: ProcFs) -> dict:
    """Every mapping of a KSM frame as arrays sorted by frame, then domain: ``pfn``, ``owner``
    (index into the processes), ``dom`` (index into the sorted domain keys), ``addr``, and
    ``start`` (each frame's first mapping, plus the end)."""
    sizes = [g[2].size for g in got]
    pfn = np.concatenate([g[2] for g in got]) if got else np.empty(0, dtype=np.uint64)
    addr = np.concatenate([g[3] for g in got]) if got else np.empty(0, dtype=np.uint64)
    owner = np.repeat(np.arange(len(got), dtype=np.int32), sizes)
    if pfn.size:
        flags = read_pfn_tables(pfn, ("kpageflags",), procfs)[0]
        ksm = ((flags >> np.uint64(KPF_KSM)) & np.uint64(1)) == 1
        pfn, addr, owner = pfn[ksm], addr[ksm], owner[ksm]
    dom = np.asarray(owner_domain, dtype=np.int32)[owner] if owner.size else owner
    order = np.lexsort((addr, dom, pfn))
    pfn, addr, owner, dom = pfn[order], addr[order], owner[order], dom[order]
    start = np.flatnonzero(np.concatenate(([True], pfn[1:] != pfn[:-1]))) if pfn.size else \
        np.empty(0, dtype=np.int64)
    return {"pfn": pfn, "addr": addr, "owner": owner, "dom": dom,
            "start": np.concatenate((start, [pfn.size])).astype(np.int64)}


def _groups(off, off_zero, f: dict, frame_of, new_pair, pids, comms, names) -> list:
    """The offender frames grouped by the exact set of domains mapping them (vectorized: each
    frame's set is one row of its (frame, domain) pairs, rows of equal length made unique)."""
    if not off.size:
        return []
    owner, dom, addr = f["owner"], f["dom"], f["addr"]
    nframes = f["start"].size - 1
    is_off = np.zeros(nframes, dtype=bool)
    is_off[off] = True
    pair = np.flatnonzero(new_pair & is_off[frame_of])      # consecutive per frame, in off order
    first = np.concatenate(([0], np.flatnonzero(np.diff(frame_of[pair])) + 1))
    width = np.diff(np.concatenate((first, [pair.size])))    # domains per offender frame
    gid = np.full(nframes, -1, dtype=np.int64)
    sets: list = []
    for k in np.unique(width).tolist():
        rows_at = first[width == k]
        rows = dom[pair[rows_at[:, None] + np.arange(k)]].astype(np.int64)
        base = len(names)
        if base ** k < _ROW_CODE_LIMIT:     # each row as one number: a plain sort, not rows as bytes
            uniq, inverse = np.unique(rows @ (base ** np.arange(k - 1, -1, -1, dtype=np.int64)),
                                      return_inverse=True)
            uniq = (uniq[:, None] // base ** np.arange(k - 1, -1, -1, dtype=np.int64)) % base
        else:
            uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        gid[off[width == k]] = len(sets) + inverse.ravel()
        sets.extend(tuple(r) for r in uniq.tolist())
    zero_frames = np.bincount(gid[off], weights=off_zero, minlength=len(sets))
    frames = np.bincount(gid[off], minlength=len(sets))
    mapping_gid = gid[frame_of]
    order = np.argsort(mapping_gid, kind="stable")
    bounds = np.searchsorted(mapping_gid[order], np.arange(len(sets) + 1))
    out = []
    for g, domains in enumerate(sets):
        sel = order[bounds[g]:bounds[g + 1]]
        counts = np.bincount(owner[sel], minlength=len(pids))
        procs = []
        for o in np.flatnonzero(counts).tolist():
            where = sel[owner[sel] == o][:SAMPLE_ADDRESSES]
            procs.append((pids[o], comms[pids[o]], names[int(dom[where[0]])], int(counts[o]),
                          tuple(addr[where].tolist())))
        procs.sort(key=lambda p: (-p[3], p[0]))
        out.append(OffenderGroup(tuple(names[d] for d in domains), int(frames[g]), int(sel.size),
                                 int(zero_frames[g]), tuple(procs)))
    return sorted(out, key=lambda g: (-g.frames, g.domains))


def audit(kind: str = "cgroup", depth: int = 0, ksm=None, procfs: ProcFs | str | None = None,
          pids=None, zero_pages_across_domains: bool = True, zero_pfns: tuple | None = None,
          zero_reader=None, limit: int | None = None) -> AuditReport:
    """One audit of every process with mergeable memory (or only ``pids``) by trust domain
    ``kind`` ("cgroup" cut at ``depth``, "uid", "none"): see the module's doc. Needs root:
    ProcessAccessError (exit code 4) without it; UsageError (2) for a bad kind or depth."""
    return AuditReader(kind, depth, ksm, procfs, pids, zero_pages_across_domains, zero_pfns,
                       zero_reader).read(limit)
