"""The estimator's reads of /proc and of memory, all of them: the targets and their scope (maps
and smaps flags, ksm_stat, pagemap), then the targets' pages, pass after pass, into one fixed
buffer. (The KSM knobs the prediction is for come from :mod:`.kernel`.)

Pass 1 reads every page in scope (``process_vm_readv``, chunk by chunk, the next chunk read ahead
in a second thread where there are two CPUs) and scans it once for crc32c, hash64 and an exact
is-zero check. Later passes read again: a page whose crc32c changed is volatile (as ksmd does);
the last pass also hands every candidate to :class:`~.confirm.Confirmer`. With ``sparse`` they
re-read only the zero pages and the candidate group members (runs of them still in large reads).
The targets' memory is only ever read, and only pages pagemap shows present.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import ProcessError, ProcessNotFoundError, UsageError
from ..host.fs import ProcFs
from ..host.maps import read_mappings
from ..host.pagemap import (KPF_COMPOUND_HEAD, KPF_THP, PM_PFN_MASK, open_pagemap,
                            present_offsets, read_kpageflags, read_pagemap, zero_page_pfns)
from ..host.remote import RemoteReader, aligned_buffer, read_ahead
from ..native import kernels, lib
from .model import MappingReport
from .scope import NONE, STEP, UNREADABLE, VOLATILE, ZERO, PageSet, Scope, Target, \
    buffer_range, buffer_targets


# --- the scope -----------------------------------------------------------------------------------
def read_targets(targets, procfs: ProcFs) -> list:
    """Processes first, then buffers of this process; each page once (a PID given twice,
    overlapping buffers, buffers of a process also given whole). Each PID must be a live user
    process (one-line errors otherwise)."""
    if isinstance(targets, (int, np.integer, str)) or not isinstance(targets, (list, tuple)):
        targets = [targets]
    if not targets:
        raise UsageError("nothing to estimate: pass at least one PID or buffer")
    processes, buffers = [], []
    for t in targets:
        if isinstance(t, str) and t.strip().isdigit():
            t = int(t)
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            pid = int(t)
            if all(p.pid != pid for p in processes):
                procfs.check_process(pid)
                processes.append(Target(pid, procfs.comm(pid, "?"), "process"))
        else:
            buffers.append(buffer_range(t))
    me = os.getpid()
    if any(p.pid == me for p in processes):
        buffers = []
    return processes + buffer_targets(buffers, me, lib.PAGE_SIZE)


def read_scope(targets: list, all_eligible: bool, procfs: ProcFs) -> Scope:
    """The mappings KSM scans today (``mg``), or every KSM-compatible one (``all_eligible``);
    within them the present anonymous pages, minus pages already mapping the kernel's zero page
    (ksmd skips those, they cost nothing)."""
    scope = Scope(targets)
    zero_pfns = zero_page_pfns(procfs)
    if not zero_pfns:
        scope.notes.append("page frame numbers are hidden (not root): pages already mapping the "
                           "kernel's zero page are scanned and counted as zero pages")
    for ti, t in enumerate(targets):
        tr = scope.target_reports[ti]
        maps = read_mappings(t.pid, procfs)
        if t.kind == "process":
            stat = procfs.ksm_stat(t.pid)
            tr.existing_ksm_zero_pages = int(stat.get("ksm_zero_pages", 0) or 0)
        fd = open_pagemap(t.pid, procfs)
        try:
            for m in maps:
                lo, hi = max(m.start, t.lo), min(m.end, t.hi)
                if lo >= hi:
                    continue
                in_scope = m.eligible and (m.registered or all_eligible)
                rep = MappingReport(t.pid, m, in_scope)
                scope.reports.append(rep)
                if not in_scope or (m.rss == 0 and m.anonymous == 0):
                    continue   # nothing resident: no need to read its page map
                # THP subpages: only where smaps shows huge pages and PFNs are visible
                thp = bool(m.anon_huge) and bool(zero_pfns)
                pageset, runs = _present(fd, t.pid, lo, hi, zero_pfns, rep, thp, procfs)
                if pageset.size:
                    scope.add_segment(ti, rep, lo, pageset, runs or ())
                if m.anon_huge and (not zero_pfns or runs is None):
                    scope.thp_known = False
        finally:
            os.close(fd)
    if not scope.thp_known:
        scope.notes.append("THP part unknown: page frame numbers are hidden (not root) or "
                           "/proc/kpageflags is unreadable, so the subpages of transparent huge "
                           "pages cannot be found; they are predicted as small pages (no split, no "
                           "zero subpages handed back)")
    scope.seal()
    return scope


def _present(fd, pid, lo, hi, zero_pfns, rep, thp: bool, procfs):
    """The present pages of [lo, hi) as a PageSet, and the THP runs among them (see
    :func:`thp_runs`; found with /proc/kpageflags, only when ``thp``)."""
    ps = lib.PAGE_SIZE
    counts: dict = {}
    parts, pfns = [], []
    out = np.empty(min(STEP, max(1, (hi - lo) // ps)), dtype=np.uint64)
    # STEP pagemap entries per read: small temporaries, 64 MiB of address space
    for a in range(lo, hi, STEP * ps):
        entries = read_pagemap(fd, a, min(hi, a + STEP * ps), out=out, pid=pid)
        idx = present_offsets(entries, True, zero_pfns, counts)
        parts.append((idx + (a - lo) // ps).astype(np.uint32))
        if thp:
            pfns.append(entries[idx] & np.uint64(PM_PFN_MASK))
    offsets = np.concatenate(parts) if len(parts) > 1 else parts[0]
    pageset = PageSet(offsets)
    runs = []
    if thp and offsets.size:
        pfn = np.concatenate(pfns)
        try:
            flags = read_kpageflags(pfn, procfs)
        except ProcessError:      # no /proc/kpageflags, or not readable: THPs unknown
            runs = None
        else:
            runs = thp_runs(offsets, pfn, flags)
    rep.zero_mapped_pages = counts.get("zero_page", 0)
    rep.swapped_pages = counts.get("swapped", 0)
    rep.present_pages = pageset.size + rep.zero_mapped_pages
    rep.scanned_pages = pageset.size
    return pageset, runs


def thp_runs(offsets: np.ndarray, pfns: np.ndarray, flags: np.ndarray) -> list:
    """[(first position, length)] of each THP's subpages among present pages (page offsets in
    address order, their PFNs and kpageflags): a huge page starts at its head page, or wherever
    the page offsets or the PFNs stop being consecutive."""
    thp = ((flags >> np.uint64(KPF_THP)) & np.uint64(1)) != 0
    if not thp.any():
        return []
    head = ((flags >> np.uint64(KPF_COMPOUND_HEAD)) & np.uint64(1)) != 0
    brk = np.ones(offsets.size, dtype=bool)
    brk[1:] = (np.diff(offsets.astype(np.int64)) != 1) | (np.diff(pfns.astype(np.int64)) != 1) | \
        (thp[1:] != thp[:-1]) | head[1:]
    firsts = np.flatnonzero(brk)
    lengths = np.diff(np.append(firsts, offsets.size))
    keep = thp[firsts]
    return list(zip(firsts[keep].tolist(), lengths[keep].tolist()))


# --- the pages -----------------------------------------------------------------------------------
class Fetcher:
    """Reads pages by ordinal into one reader's buffer (slots 0..n-1, at most ``capacity``)."""

    def __init__(self, scope: Scope, reader: RemoteReader):
        self.scope = scope
        self.reader = reader

    @property
    def capacity(self) -> int:
        return self.reader.capacity

    @property
    def buffer(self) -> np.ndarray:
        return self.reader.buffer

    def fetch(self, ords: np.ndarray) -> np.ndarray:
        """True where the page of that ordinal was read."""
        pids, addrs = self.scope.addresses(ords)
        ok = np.zeros(ords.size, dtype=bool)
        for pid in np.unique(pids):
            m = np.flatnonzero(pids == pid)
            # slots follow the order of ords: read each contiguous slot run of this pid
            brk = np.flatnonzero(np.diff(m) != 1) + 1
            for part in np.split(m, brk):
                ok[part] = self.reader.read(addrs[part], int(pid), slot=int(part[0]))
        return ok


class Passes:
    """The passes over a scope, in one fixed allocation: the read buffer for sequential chunks
    (two with read-ahead: one being read, one being scanned), a quarter of that for group heads
    re-read from earlier chunks, and the head cache (``cache``) that keeps the heads of the
    largest groups (their members are everywhere: re-reading the head for each would double the
    reads). ``progress(pass_no, passes, pages_done, pages_total)`` is called per chunk."""

    def __init__(self, scope: Scope, procfs: ProcFs, buffer_bytes: int, cache_bytes: int,
                 threads: int, progress=None):
        self.scope = scope
        self.procfs = procfs
        self.progress = progress
        self.ps = ps = scope.page_size
        chunk_pages = max(8, buffer_bytes // ps)
        head_pages = max(8, chunk_pages // 4)
        self.cache_slots = max(8, cache_bytes // ps)
        nread = 2 if threads >= 2 else 1
        self._buf = aligned_buffer((nread * chunk_pages + head_pages + self.cache_slots) * ps)
        view = memoryview(self._buf)
        self.readers = [RemoteReader(buffer=view[i * chunk_pages * ps: (i + 1) * chunk_pages * ps])
                        for i in range(nread)]
        at = nread * chunk_pages * ps
        self._heads = RemoteReader(buffer=view[at: at + head_pages * ps])
        self.exited = self.readers[0].exited
        for r in self.readers[1:] + [self._heads]:
            r.exited = self.exited     # one process exit stops every reader
        self.exited_in: dict = {}      # pid: the pass in which it exited
        self.cache = np.frombuffer(self._buf, dtype=np.uint8, offset=at + head_pages * ps)
        self.heads = Fetcher(scope, self._heads)
        self.members = Fetcher(scope, self.readers[0])
        self.cap = chunk_pages
        self._ctmp = np.empty(chunk_pages, dtype=np.uint32)
        self._htmp = np.empty(chunk_pages, dtype=np.uint64)
        self._ztmp = np.empty(chunk_pages, dtype=np.bool_)

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers) + self._heads.bytes_read

    @property
    def buffer_bytes(self) -> int:
        return len(self._buf)

    def close(self):
        """Unmap the buffer (the caller dropped every view of ``cache`` first)."""
        for r in self.readers:
            r.close()
        self._heads.close()
        self.cache = None
        self._buf.close()

    # chunk iteration -------------------------------------------------------------------------------
    def _chunks(self):
        """(pid, (starts, lens), first ordinal) per chunk, in ordinal order, never mixing
        processes: the iovecs of the chunk's runs of pages."""
        cap = self.cap
        segs = self.scope.segments
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
                    if pid in self.exited:
                        break
                    take = min(cap - count, n - pos)
                    pieces.append(s.iov(pos, pos + take))
                    count += take
                    pos += take
                    if count == cap:
                        yield pid, _join(pieces), first
                        first += count
                        pieces, count = [], 0
            if count and pid not in self.exited:
                yield pid, _join(pieces), first
            if pid in self.exited:
                end = segs[j - 1].base + segs[j - 1].size
                self.scope.flags[first:end] |= UNREADABLE
            i = j

    def _candidate_chunks(self):
        """Like :meth:`_chunks`, over the re-check candidates only: pages zero in pass 1 and
        members of candidate duplicate groups, the only pages whose change can alter the
        prediction. Yields (pid, page addresses, ordinals); the reader coalesces contiguous pages
        into one iovec each, so runs of candidates are still read in large pieces.

        Runs in the read-ahead thread while the caller updates ``rep`` of earlier chunks: each
        window of ordinals is classified before any of its pages is handed out, so the set read
        is the one grouping left, whatever the timing."""
        cap, exited = self.cap, self.exited
        flags, rep = self.scope.flags, self.scope.rep
        addrs, ords, count, pid = [], [], 0, None
        for seg in self.scope.segments:
            if seg.pid != pid:
                if count and pid not in exited:
                    yield pid, np.concatenate(addrs), np.concatenate(ords)
                addrs, ords, count, pid = [], [], 0, seg.pid
            for lo in range(seg.base, seg.base + seg.size, STEP):
                if pid in exited:
                    break
                hi = min(seg.base + seg.size, lo + STEP)
                pos = np.flatnonzero(((flags[lo:hi] & ZERO) != 0) | (rep[lo:hi] != NONE))
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

    def _report(self, pass_no, passes, done):
        if self.progress:
            self.progress(pass_no, passes, done, self.scope.total)

    # passes ----------------------------------------------------------------------------------------
    def _pass(self, sparse: bool = False):
        """(chunk, ordinals, buffer, ok) per chunk, read ahead where there are cores. ``chunk``
        indexes the per-page arrays: a slice when the chunk is every page in an ordinal range, the
        ordinals themselves when ``sparse`` (re-check candidates only); ``ordinals`` (int64) are
        the ordinals of the pages in the buffer, in order."""
        ps = self.ps
        chunks = self._candidate_chunks() if sparse else self._chunks()
        for tag, reader, ok in read_ahead(chunks, self.readers):
            n = ok.size
            if sparse:
                yield tag, tag, reader.buffer[: n * ps], ok
            else:
                yield slice(tag, tag + n), np.arange(tag, tag + n, dtype=np.int64), \
                    reader.buffer[: n * ps], ok

    def first(self, passes: int):
        """Pass 1: crc32c, hash64 and the zero check of every page in scope."""
        sc = self.scope
        for sl, _ords, buf, ok in self._pass():
            z = self._ztmp[:ok.size]
            kernels.scan_pages(buf, self.ps, crc_out=sc.crc[sl], hash_out=sc.hsh[sl], zero_out=z)
            f = sc.flags[sl]
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
            f = self.scope.flags[idx]
            if not ok.all():
                f[~ok] |= UNREADABLE
            yield idx, ords, buf, ok, f
            if sparse:      # fancy indexing gave a copy
                self.scope.flags[idx] = f
            self._report(pass_no, passes, int(ords[-1]) + 1)
        if sparse:
            self._check_alive()
            self._report(pass_no, passes, self.scope.total)
        self._note_exits(pass_no)

    def middle(self, pass_no: int, passes: int, sparse: bool = False):
        """A pass between the first and the last: crc32c changed -> volatile."""
        crc = self.scope.crc
        for idx, _ords, buf, ok, f in self._recheck(pass_no, passes, sparse):
            c = self._ctmp[:ok.size]
            kernels.crc32c_pages(buf, self.ps, out=c)
            f[c != crc[idx]] |= VOLATILE
            crc[idx] = c

    def last(self, passes: int, confirmer, sparse: bool = False):
        """The last pass: crc32c or zero-ness changed -> volatile; every candidate of each chunk
        goes to ``confirmer.confirm``."""
        sc = self.scope
        for idx, ords, buf, ok, f in self._recheck(passes, passes, sparse):
            n = ok.size
            c, h, z = self._ctmp[:n], self._htmp[:n], self._ztmp[:n]
            kernels.scan_pages(buf, self.ps, crc_out=c, hash_out=h, zero_out=z)
            changed = (c != sc.crc[idx]) | (z != ((f & ZERO) != 0))
            f[changed] |= VOLATILE
            r = sc.rep[idx]
            cand = np.flatnonzero(r != NONE)
            if cand.size:
                confirmer.confirm(ords, buf, cand, r, f, h)
            if sparse:      # fancy indexing gave a copy
                sc.rep[idx] = r
        # the crc32c each page had when last read, for the caller's fingerprints (api.estimate)
        self.final_crc, sc.crc = sc.crc, None

    def _check_alive(self):
        """A sparse pass reads nothing of a process without candidates, so it would not notice
        that process exiting: ask /proc instead."""
        for t in self.scope.targets:
            if t.kind == "process" and t.pid not in self.exited:
                try:
                    self.procfs.check_process(t.pid)
                except ProcessNotFoundError:
                    self.exited.add(t.pid)

    def _note_exits(self, pass_no):
        for pid in self.exited:
            self.exited_in.setdefault(pid, pass_no)


def _join(iovs: list):
    if len(iovs) == 1:
        return iovs[0]
    return np.concatenate([a for a, _ in iovs]), np.concatenate([b for _, b in iovs])
