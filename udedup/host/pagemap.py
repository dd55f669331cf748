"""/proc/PID/pagemap read in large blocks: which pages of a range are in RAM (pages not present or
swapped out are skipped and never faulted in), the PFNs of the kernel's zero pages, and what
/proc/kpageflags and /proc/kpagecount say about page frames (KSM, zero page, THP; how many map it)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from functools import lru_cache

import numpy as np

from ..errors import ProcessNotFoundError, UdedupError
from ..native import lib
from .fs import ProcFs, as_procfs, process_error

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = (1 << 55) - 1
PM_MMAP_EXCLUSIVE = 1 << 56   # mapped exactly once (a KSM page mapped k >= 2 times never is)
PM_FILE = 1 << 61        # page cache or shared anonymous: never a KSM candidate
PM_SWAPPED = 1 << 62
PM_PRESENT = 1 << 63
#: pagemap entries per read(): 64 Ki entries = 512 KiB, covering 256 MiB of address space.
PAGEMAP_BLOCK = 64 << 10

# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_COMPOUND_HEAD = 15
KPF_KSM = 21
KPF_THP = 22
KPF_ZERO_PAGE = 24


def open_pagemap(pid: int, procfs: ProcFs | str = "/proc") -> int:
    """An fd on /proc/PID/pagemap (close it with os.close)."""
    return as_procfs(procfs).open(pid, "pagemap")


def pread_full(fd: int, view: memoryview, offset: int, pid, what: str) -> int:
    """pread into all of ``view`` from ``offset``, looping on short reads; the bytes read (fewer
    only at end of file). Errors through :func:`fs.process_error` (``pid=None``: a machine-wide
    file)."""
    got = 0
    while got < len(view):
        try:
            k = os.preadv(fd, [view[got:]], offset + got)
        except OSError as err:
            raise process_error(err, pid, what) from err
        if k <= 0:
            break
        got += k
    return got


def read_pagemap(fd: int, start: int, end: int, out: np.ndarray | None = None,
                 page_size: int | None = None, pid: int | None = None) -> np.ndarray:
    """Raw pagemap entries (uint64) of the pages in [start, end), one pread per call."""
    ps = page_size or lib.PAGE_SIZE
    n = (end - start) // ps
    if out is None:
        out = np.empty(n, dtype=np.uint64)
    got = pread_full(fd, memoryview(out[:n]).cast("B"), start // ps * 8, pid, "pagemap")
    if got < n * 8:   # the process exited: its pagemap reads as empty
        raise ProcessNotFoundError(f"PID {pid} exited while its page map was being read",
                                   pid=pid)
    return out[:n]


def read_kpageflags(pfns, procfs: ProcFs | str = "/proc") -> np.ndarray:
    """/proc/kpageflags entries (uint64, one per PFN of ``pfns``, in that order): test a bit with
    ``(flags >> KPF_KSM) & 1``. Needs CAP_SYS_ADMIN (ProcessAccessError without it); ProcessError
    on a kernel without the file. A PFN past the last frame reads as 0 (no flags)."""
    return read_pfn_tables(pfns, ("kpageflags",), procfs)[0]


def read_kpagecount(pfns, procfs: ProcFs | str = "/proc") -> np.ndarray:
    """/proc/kpagecount entries (uint64): how many times each frame of ``pfns`` is mapped (a KSM
    page: by how many pages; the zero page reads 0 or the kernel's own count). Errors as
    :func:`read_kpageflags`."""
    return read_pfn_tables(pfns, ("kpagecount",), procfs)[0]


#: frames between two wanted PFNs up to which :func:`read_pfn_tables` reads the gap too (one pread
#: instead of two); 8 to 128 cost about the same on 2 GiB of merged pairs, 256 costs more
PFN_GAP = 64


def read_pfn_tables(pfns, names=("kpageflags", "kpagecount"), procfs: ProcFs | str = "/proc",
                    gap: int = PFN_GAP) -> tuple:
    """Entries (uint64) of several PFN-indexed tables (``/proc/kpageflags``, ``kpagecount``) for
    the same ``pfns``, one array per name, in the order of ``pfns``. Each table is read in spans
    that cover PFNs at most ``gap`` frames apart, one pread per span (at most PAGEMAP_BLOCK
    frames). The kernel's cost is per frame read (~0.3 us per KSM frame and table here) and per
    call (~3 us): 64 is near the best ``gap`` measured. Errors as :func:`read_kpageflags`."""
    pfns = np.asarray(pfns, dtype=np.uint64).ravel()
    uniq, inverse = _unique(pfns)
    if uniq.size == 0:
        return tuple(np.zeros(0, dtype=np.uint64) for _ in names)
    # spans: cut where the next wanted frame is more than ``gap`` away, and at every
    # PAGEMAP_BLOCK boundary (no span is wider than a block)
    block = np.uint64(PAGEMAP_BLOCK)
    cut = np.flatnonzero((np.diff(uniq) > np.uint64(gap))
                         | (uniq[1:] // block != uniq[:-1] // block)) + 1
    first = uniq[np.concatenate(([0], cut))]
    width = uniq[np.concatenate((cut - 1, [uniq.size - 1]))] - first + np.uint64(1)
    # the spans' entries are read one after another into a buffer of at most ~2 blocks, then
    # picked out in one gather per buffer: per span only a pread is paid in Python
    where = np.concatenate(([0], np.cumsum(width.astype(np.int64))))   # span -> buffer offset
    span_of = np.repeat(np.arange(first.size),
                        np.diff(np.concatenate((cut, [uniq.size])), prepend=0))
    pos = where[span_of] + (uniq - first[span_of]).astype(np.int64)   # frame -> offset in all
    limit = 2 * PAGEMAP_BLOCK
    batches = []                # (first span, end span): buffer-sized runs of spans
    i = 0
    while i < first.size:
        j = max(i + 1, int(np.searchsorted(where, where[i] + limit, side="right")) - 1)
        batches.append((i, min(j, first.size)))
        i = batches[-1][1]
    procfs = as_procfs(procfs)
    buf = np.empty(min(limit, int(where[-1])), dtype=np.uint64)
    lo_frame, offs = first.tolist(), where.tolist()
    out = []
    for name in names:
        values = np.zeros(uniq.size, dtype=np.uint64)
        fd = procfs.open_global(name)
        try:
            for i, j in batches:
                base = offs[i]
                room = buf[:offs[j] - base] if offs[j] - base <= buf.size else \
                    np.empty(offs[j] - base, dtype=np.uint64)
                room[:] = 0     # frames past the table's end read short: they stay 0
                view = memoryview(room).cast("B")
                for k in range(i, j):
                    pread_full(fd, view[(offs[k] - base) * 8:(offs[k + 1] - base) * 8],
                               lo_frame[k] * 8, None, name)
                lo, hi = np.searchsorted(span_of, [i, j])
                values[lo:hi] = room[pos[lo:hi] - base]
        finally:
            os.close(fd)
        out.append(values if inverse is None else values[inverse])
    return tuple(out)


def _unique(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``np.unique(pfns, return_inverse=True)``, without its sort when ``pfns`` is sorted already
    (a walk of mappings in address order often yields them so): one comparison pass instead.
    The inverse is None when every PFN is distinct and in order (``uniq`` is ``pfns``)."""
    if pfns.size < 2:
        return pfns, None
    step = pfns[1:] != pfns[:-1]
    if not (pfns[1:] >= pfns[:-1]).all():
        uniq, inverse = np.unique(pfns, return_inverse=True)
        return uniq, inverse.ravel()
    if step.all():
        return pfns, None
    new = np.concatenate(([True], step))
    return pfns[new], np.cumsum(new) - 1


def zero_page_pfns(procfs: ProcFs | str = "/proc") -> tuple:
    """PFN ranges [(first, last+1)] of the kernel's shared zero page and huge zero page, found by
    mapping them in this process and reading ``procfs``/self/pagemap (once per root: the zero
    pages do not move). Empty when PFNs are hidden (pagemap shows 0 without CAP_SYS_ADMIN): then
    pages that map the zero page cannot be told apart and are scanned."""
    return _zero_page_pfns(as_procfs(procfs).root)


@lru_cache(maxsize=4)
def zero_page_pfns_or_none(procfs: ProcFs | str = "/proc") -> tuple:
    """:func:`zero_page_pfns`, or ``()`` where they cannot be found (no self/pagemap: a fake
    tree): the readers that only tell zero-page mappings apart then see none."""
    try:
        return zero_page_pfns(procfs)
    except UdedupError:
        return ()


def _zero_page_pfns(root: str) -> tuple:
    ps = lib.PAGE_SIZE
    ranges = []
    fd = ProcFs(root).open_global("self", "pagemap")
    try:
        # a read fault on untouched private anonymous memory maps the shared zero page
        probe = mmap.mmap(-1, ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.closing(probe):
            probe[0]
            addr = _buffer_address(probe)
            pfn = int(read_pagemap(fd, addr, addr + ps)[0]) & PM_PFN_MASK
            if pfn:
                ranges.append((pfn, pfn + 1))
        huge = _huge_zero_pfns(fd)
        if huge:
            ranges.append(huge)
    finally:
        os.close(fd)
    return tuple(ranges)


def _huge_zero_pfns(fd: int):
    # With THP on, a read fault in a MADV_HUGEPAGE region maps the huge zero page (one PMD).
    pmd = 512 * lib.PAGE_SIZE
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    region = mmap.mmap(-1, 2 * pmd, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.closing(region):
        base = _buffer_address(region)
        aligned = (base + pmd - 1) // pmd * pmd
        try:
            region.madvise(mmap.MADV_HUGEPAGE, aligned - base, pmd)
        except OSError:
            return None
        region[aligned - base]
        entries = read_pagemap(fd, aligned, aligned + pmd)
        first = int(entries[0]) & PM_PFN_MASK
        last = int(entries[-1]) & PM_PFN_MASK
        if first and last == first + 511:
            return (first, first + 512)
    return None


def _buffer_address(buf) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def present_offsets(entries: np.ndarray, anon_only: bool = True, zero_pfns: tuple = (),
                    counts: dict | None = None) -> np.ndarray:
    """Indexes of the entries that are present pages (not swapped), optionally only anonymous
    ones (what ksmd can merge) and not mapping the kernel's zero page (ksmd skips those).

    ``counts`` (a dict) gets ``swapped``, ``file`` (page cache / shared anonymous) and
    ``zero_page`` (mapping the shared zero page) added to it."""
    e = entries
    present = (e & np.uint64(PM_PRESENT)) != 0
    keep = present.copy()
    if counts is not None:
        counts["swapped"] = counts.get("swapped", 0) + int(
            np.count_nonzero((e & np.uint64(PM_SWAPPED)) != 0))
    if anon_only:
        anon = (e & np.uint64(PM_FILE)) == 0
        if counts is not None:
            counts["file"] = counts.get("file", 0) + int(np.count_nonzero(keep & ~anon))
        keep &= anon
    if zero_pfns:
        pfn = e & np.uint64(PM_PFN_MASK)
        on_zero = np.zeros(e.shape, dtype=bool)
        for first, stop in zero_pfns:
            on_zero |= (pfn >= np.uint64(first)) & (pfn < np.uint64(stop))
        on_zero &= keep
        if counts is not None:
            counts["zero_page"] = counts.get("zero_page", 0) + int(np.count_nonzero(on_zero))
        keep &= ~on_zero
    return np.flatnonzero(keep)


def present_blocks(fd: int, pid: int, start: int, end: int, anon_only: bool = True,
                   zero_pfns: tuple = (), counts: dict | None = None, block: int = PAGEMAP_BLOCK):
    """``(block start, present_offsets of the block)`` per ``block`` pagemap entries of the
    page-aligned range [start, end), read from ``fd`` (see :func:`open_pagemap`)."""
    ps = lib.PAGE_SIZE
    out = np.empty(min(block, max(1, (end - start) // ps)), dtype=np.uint64)
    for lo in range(start, end, block * ps):
        entries = read_pagemap(fd, lo, min(end, lo + block * ps), out=out, pid=pid)
        yield lo, present_offsets(entries, anon_only, zero_pfns, counts)


def present_pages(pid: int, start: int, end: int, procfs: ProcFs | str = "/proc", anon_only: bool = False,
                  skip_zero_page: bool = False, fd: int | None = None) -> np.ndarray:
    """Page-aligned addresses (uint64) of the pages of [start, end) that are in RAM.

    Pages not present or swapped out are left out, so reading the result never faults anything in.
    ``anon_only`` keeps only anonymous pages; ``skip_zero_page`` also drops pages that map the
    kernel's shared zero page (a read-faulted page, or one KSM already replaced). ``fd``: the
    process's pagemap already open (it stays open), for callers that look at many ranges."""
    ps = lib.PAGE_SIZE
    start, end = start // ps * ps, -(-end // ps) * ps
    zero = zero_page_pfns(procfs) if skip_zero_page else ()
    own = fd is None
    if own:
        fd = open_pagemap(pid, procfs)
    try:
        parts = [np.uint64(lo) + idx.astype(np.uint64) * np.uint64(ps)
                 for lo, idx in present_blocks(fd, pid, start, end, anon_only, zero)]
    finally:
        if own:
            os.close(fd)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def zero_page_entries(entries: np.ndarray, zero_pfns: tuple,
                      scratch: np.ndarray | None = None) -> int:
    """How many of ``entries`` (raw pagemap u64) are present pages on one of the ``zero_pfns``
    ranges (:func:`zero_page_pfns`): the shared zero page or the huge zero page.

    Vectorized, one mask and one compare per range: the present bit, the swap bit and the PFN are
    masked together, so a swap entry (whose low bits are not a PFN) never matches. ``scratch``
    (uint64, twice as long as ``entries``) avoids allocating per call."""
    n = entries.shape[0]
    if not n or not zero_pfns:
        return 0
    if scratch is None or scratch.shape[0] < 2 * n:
        scratch = np.empty(2 * n, dtype=np.uint64)
    masked, shifted = scratch[:n], scratch[n:2 * n]
    np.bitwise_and(entries, np.uint64(PM_PRESENT | PM_SWAPPED | PM_PFN_MASK), out=masked)
    hits = 0
    for first, stop in zero_pfns:
        key = np.uint64(PM_PRESENT | first)
        if stop - first == 1:
            hits += int(np.count_nonzero(masked == key))
            continue
        # uint64 wrap-around: (v - (PRESENT|first)) < width  <=>  present, not swapped, PFN in range
        np.subtract(masked, key, out=shifted)
        hits += int(np.count_nonzero(shifted < np.uint64(stop - first)))
    return hits


def shared_anon_pfns(entries: np.ndarray, zero_pfns: tuple = ()) -> np.ndarray:
    """PFNs (uint64) of the ``entries`` (raw pagemap u64) that are present, anonymous, mapped more
    than once (PM_MMAP_EXCLUSIVE clear) and not on a ``zero_pfns`` range: the only pages that can
    be KSM pages saving anything (a KSM page mapped once saves nothing). Needs the PFNs (root)."""
    keep = (entries & np.uint64(PM_PRESENT | PM_SWAPPED | PM_FILE | PM_MMAP_EXCLUSIVE)) == \
        np.uint64(PM_PRESENT)
    pfn = entries[keep] & np.uint64(PM_PFN_MASK)
    for first, stop in zero_pfns:
        pfn = pfn[(pfn < np.uint64(first)) | (pfn >= np.uint64(stop))]
    return pfn


def count_zero_mapped(fd: int, pid: int, ranges, zero_pfns: tuple, block: int = PAGEMAP_BLOCK,
                      page_size: int | None = None) -> int:
    """Pages of the page-aligned ``ranges`` (``[(start, end)]``) of ``pid`` that map the kernel's
    zero page or huge zero page, from the pagemap ``fd`` read ``block`` entries per pread (never
    faulting anything in). 0 when ``zero_pfns`` is empty (PFNs hidden: nothing can be told)."""
    if not zero_pfns:
        return 0
    ps = page_size or lib.PAGE_SIZE
    longest = max(((end - start) // ps for start, end in ranges), default=0)
    if longest <= 0:
        return 0
    size = min(block, longest)
    out = np.empty(size, dtype=np.uint64)
    scratch = np.empty(2 * size, dtype=np.uint64)
    hits = 0
    for start, end in ranges:
        for lo in range(start, end, block * ps):
            entries = read_pagemap(fd, lo, min(end, lo + block * ps), out=out, page_size=ps,
                                   pid=pid)
            hits += zero_page_entries(entries, zero_pfns, scratch)
    return hits


# PAGEMAP_SCAN (Linux 6.7+, fs/proc/task_mmu.c): the kernel walks the page tables and returns only
# ranges of pages in the asked categories. For "which pages map the zero page" it is several times
# cheaper than reading 8 bytes per page (4 GiB of written 4 KiB pages: ~4 ms against ~25 ms for
# pread + numpy on this machine), and it needs no CAP_SYS_ADMIN (no PFN leaves the kernel).
PAGEMAP_SCAN = 0xC0606610        # _IOWR('f', 16, struct pm_scan_arg), 96 bytes
PAGE_IS_PFNZERO = 1 << 5         # the (huge) zero page, include/uapi/linux/fs.h
_SCAN_VEC = 4096                 # page_region entries (24 bytes each) per ioctl


def scan_zero_mapped(fd: int, ranges, page_size: int | None = None, pid: int = 0) -> int | None:
    """Pages of ``ranges`` (``[(start, end)]``, page-aligned) on the (huge) zero page, by the
    PAGEMAP_SCAN ioctl on the pagemap ``fd`` of ``pid``; None where the kernel (or a fake file)
    has no such ioctl: then use :func:`count_zero_mapped`."""
    ps = page_size or lib.PAGE_SIZE
    vec = np.zeros((_SCAN_VEC, 3), dtype=np.uint64)  # struct page_region {start, end, categories}
    arg = np.zeros(12, dtype=np.uint64)                  # struct pm_scan_arg
    raw = memoryview(arg).cast("B")
    pages = 0
    for start, end in ranges:
        while start < end:
            arg[:] = (96, 0, start, end, 0, vec.ctypes.data, _SCAN_VEC, 0, 0, PAGE_IS_PFNZERO, 0,
                      PAGE_IS_PFNZERO)
            try:
                n = fcntl.ioctl(fd, PAGEMAP_SCAN, raw)
            except OSError as err:
                if err.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    return None
                raise process_error(err, pid, "pagemap") from err
            if n:
                pages += int((vec[:n, 1] - vec[:n, 0]).sum()) // ps
            if n < _SCAN_VEC:
                break           # the walk reached ``end``
            # vec full: go on after the last region. walk_end alone is not enough: when the
            # walk's last chunk ends exactly as the vec fills, 6.18 was seen to leave walk_end at
            # the chunk before, and that chunk's regions would be counted twice.
            start = max(int(arg[4]), int(vec[n - 1, 1]))
    return pages
