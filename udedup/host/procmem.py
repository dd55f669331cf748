"""Another process's memory, read without changing it.

- :func:`read_mappings`: ``/proc/PID/smaps`` (addresses, VmFlags, sizes), each mapping classified the
  way ``vma_ksm_compatible()`` in mm/ksm.c does: KSM-compatible or not, and why not, in words;
- :func:`present_pages`: the pages of a range that are in RAM, from ``/proc/PID/pagemap`` read in
  large blocks, so pages that are not present or are swapped out are skipped and never faulted in;
- :class:`RemoteReader`: ``process_vm_readv`` of page lists into one reusable, page-aligned buffer
  small enough to stay in L2, surviving mappings that vanish (EFAULT) and a process that exits
  (ESRCH) mid-read.

errno from /proc becomes a :mod:`udedup.errors` exception here and nowhere else.
"""
from __future__ import annotations

import contextlib
import errno as errno_mod
import mmap
import os
import queue
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..native import pages
from ..errors import KernelThreadError, ProcessAccessError, ProcessError, ProcessNotFoundError

PF_KTHREAD = 0x00200000

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = (1 << 55) - 1
PM_FILE = 1 << 61        # page cache or shared anonymous: never a KSM candidate
PM_SWAPPED = 1 << 62
PM_PRESENT = 1 << 63

#: Default size of the read buffer: half of a typical 1-2 MiB L2, so the scan that follows each
#: read finds the bytes still in cache.
DEFAULT_BUFFER_BYTES = 1 << 20
#: pagemap entries per read(): 64 Ki entries = 512 KiB, covering 256 MiB of address space.
PAGEMAP_BLOCK = 64 << 10

# VmFlags mnemonics that make a VMA incompatible with KSM (vma_ksm_compatible), with the words
# an operator needs. Order matters: the first match is the reason given.
_INCOMPATIBLE = (
    ("ht", "hugetlb", "hugetlbfs pages are never merged by KSM"),
    ("pf", "pfnmap", "raw PFN mapping (device or driver memory): KSM cannot merge it"),
    ("io", "io", "memory-mapped I/O: KSM cannot merge it"),
    ("mm", "mixedmap", "mixed PFN/page mapping (driver memory): KSM cannot merge it"),
    ("dp", "droppable", "droppable mapping (MAP_DROPPABLE): KSM ignores it"),
    ("de", "special", "special kernel-installed mapping (VM_DONTEXPAND): KSM ignores it"),
    ("sh", "shared", "shared mapping (MAP_SHARED): KSM merges only private anonymous pages"),
    ("ms", "shared", "shared mapping (MAP_SHARED): KSM merges only private anonymous pages"),
)
_SPECIAL_PATHS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]", "[sigpage]",
                  "[vectors]")


@dataclass(frozen=True)
class Mapping:
    """One VMA of a process, from smaps. Sizes are bytes."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str
    vmflags: frozenset
    rss: int = 0
    anonymous: int = 0
    ksm: int = 0
    anon_huge: int = 0
    swap: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def registered(self) -> bool:
        """VM_MERGEABLE is set: ksmd scans this mapping (madvise or PR_SET_MEMORY_MERGE)."""
        return "mg" in self.vmflags

    @property
    def kind(self) -> str:
        """anon, file (private file mapping), shared, hugetlb, pfnmap, io, mixedmap, droppable or
        special."""
        for flag, kind, _ in _INCOMPATIBLE:
            if flag in self.vmflags:
                return kind
        if self.path in _SPECIAL_PATHS:
            return "special"
        if self.inode:
            return "file"
        return "anon"

    @property
    def eligible(self) -> bool:
        """KSM can register this mapping. A private file mapping is compatible too, but only its
        copy-on-write (anonymous) pages are candidates; its page-cache pages never merge."""
        return self.kind in ("anon", "file")

    @property
    def reason(self) -> str | None:
        """Why KSM cannot use this mapping at all, in words; None when it is eligible."""
        for flag, _, why in _INCOMPATIBLE:
            if flag in self.vmflags:
                return why
        if self.path in _SPECIAL_PATHS:
            return f"special kernel mapping {self.path}: KSM ignores it"
        return None

    @property
    def name(self) -> str:
        return self.path or "[anon]"


# --- /proc access --------------------------------------------------------------------------------
def _proc_path(pid: int, name: str, procfs: str) -> str:
    return os.path.join(procfs, str(int(pid)), name)


def _translate(err: OSError, pid: int, what: str) -> ProcessError:
    if isinstance(err, (FileNotFoundError, ProcessLookupError)) or err.errno == errno_mod.ESRCH:
        return ProcessNotFoundError(f"no process with PID {pid} (it does not exist or has exited)",
                                    pid=pid)
    if isinstance(err, PermissionError):
        return ProcessAccessError(
            f"not allowed to read {what} of PID {pid}: run as root or as the process's owner "
            "(ptrace access check; see kernel.yama.ptrace_scope)", pid=pid)
    return ProcessError(f"cannot read {what} of PID {pid}: {os.strerror(err.errno or 0)}",
                        pid=pid, errno=err.errno)


def check_process(pid: int, procfs: str = "/proc") -> None:
    """Raise unless ``pid`` is a live user process (not a kernel thread, not a zombie)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        raise ProcessNotFoundError(f"{pid!r} is not a PID: pass a process ID number",
                                   pid=pid) from None
    if pid <= 0:
        raise ProcessNotFoundError(f"{pid} is not a PID: process IDs are positive", pid=pid)
    try:
        with open(_proc_path(pid, "stat", procfs), "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError as err:
        raise _translate(err, pid, "stat") from err
    fields = stat.rsplit(")", 1)[-1].split()
    state, flags = fields[0], int(fields[6])
    if flags & PF_KTHREAD:
        comm = stat.split("(", 1)[-1].rsplit(")", 1)[0]
        raise KernelThreadError(f"PID {pid} ({comm}) is a kernel thread: it has no user memory "
                                "to scan or merge", pid=pid)
    if state in ("Z", "X"):
        raise ProcessNotFoundError(f"PID {pid} has exited (zombie): its memory is gone", pid=pid)


def comm(pid: int, procfs: str = "/proc", default: str | None = None) -> str | None:
    """The command name of ``pid`` (/proc/PID/comm), or ``default`` when it cannot be read."""
    try:
        with open(_proc_path(pid, "comm", procfs)) as f:
            return f.read().strip()
    except OSError:
        return default


def _size_kb(value: str) -> int:
    return int(value.split()[0]) * 1024


_SIZE_FIELDS = {"Rss": "rss", "Anonymous": "anonymous", "KSM": "ksm", "AnonHugePages": "anon_huge",
                "Swap": "swap"}


def parse_smaps(text: str) -> list[Mapping]:
    """Mappings from the text of /proc/PID/smaps (also accepts /proc/PID/maps: no flags, no sizes)."""
    mappings: list[Mapping] = []
    head = None
    sizes: dict[str, int] = {}
    flags: frozenset = frozenset()

    def flush():
        if head is not None:
            mappings.append(Mapping(*head, vmflags=flags, **sizes))

    for line in text.splitlines():
        if not line:
            continue
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            flush()
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            head = (start, end, parts[1], int(parts[2], 16), parts[3], int(parts[4]), path)
            sizes, flags = {}, frozenset()
        elif first == "VmFlags:":
            flags = frozenset(line.split()[1:])
        elif first[:-1] in _SIZE_FIELDS and first.endswith(":"):
            sizes[_SIZE_FIELDS[first[:-1]]] = _size_kb(line.split(None, 1)[1])
    flush()
    return mappings


def read_mappings(pid: int, procfs: str = "/proc") -> list[Mapping]:
    """Every mapping of ``pid`` with its VmFlags and smaps sizes, in address order.

    Raises ProcessNotFoundError, ProcessAccessError or KernelThreadError, each one line."""
    check_process(pid, procfs)
    try:
        with open(_proc_path(pid, "smaps", procfs), "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as err:
        raise _translate(err, pid, "smaps") from err
    mappings = parse_smaps(text)
    if not mappings:
        # smaps of a live user process is never empty; empty means the mm is being torn down
        check_process(pid, procfs)
        raise ProcessNotFoundError(f"PID {pid} is exiting: it has no memory left to read", pid=pid)
    return mappings


# --- pagemap -------------------------------------------------------------------------------------
def open_pagemap(pid: int, procfs: str = "/proc") -> int:
    """An fd on /proc/PID/pagemap (close it with os.close)."""
    try:
        return os.open(_proc_path(pid, "pagemap", procfs), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise _translate(err, pid, "pagemap") from err


def read_pagemap(fd: int, start: int, end: int, out: np.ndarray | None = None,
                 page_size: int | None = None, pid: int | None = None) -> np.ndarray:
    """Raw pagemap entries (uint64) of the pages in [start, end), one pread per call."""
    ps = page_size or pages.PAGE_SIZE
    n = (end - start) // ps
    if out is None:
        out = np.empty(n, dtype=np.uint64)
    view = memoryview(out[:n]).cast("B")
    got = 0
    offset = start // ps * 8
    while got < n * 8:
        try:
            k = os.preadv(fd, [view[got:]], offset + got)
        except OSError as err:
            raise _translate(err, pid if pid is not None else -1, "pagemap") from err
        if k <= 0:  # the process exited: its pagemap reads as empty
            raise ProcessNotFoundError(f"PID {pid} exited while its page map was being read",
                                       pid=pid)
        got += k
    return out[:n]


@lru_cache(maxsize=1)
def zero_page_pfns() -> tuple:
    """PFN ranges [(first, last+1)] of the kernel's shared zero page and huge zero page, found by
    mapping them in this process. Empty when PFNs are hidden (pagemap shows 0 without
    CAP_SYS_ADMIN): then pages that map the zero page cannot be told apart and are scanned."""
    ps = pages.PAGE_SIZE
    ranges = []
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
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
    pmd = 512 * pages.PAGE_SIZE
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
    ps = pages.PAGE_SIZE
    out = np.empty(min(block, max(1, (end - start) // ps)), dtype=np.uint64)
    for lo in range(start, end, block * ps):
        entries = read_pagemap(fd, lo, min(end, lo + block * ps), out=out, pid=pid)
        yield lo, present_offsets(entries, anon_only, zero_pfns, counts)


def present_pages(pid: int, start: int, end: int, procfs: str = "/proc", anon_only: bool = False,
                  skip_zero_page: bool = False, fd: int | None = None) -> np.ndarray:
    """Page-aligned addresses (uint64) of the pages of [start, end) that are in RAM.

    Pages not present or swapped out are left out, so reading the result never faults anything in.
    ``anon_only`` keeps only anonymous pages; ``skip_zero_page`` also drops pages that map the
    kernel's shared zero page (a read-faulted page, or one KSM already replaced). ``fd``: the
    process's pagemap already open (it stays open), for callers that look at many ranges."""
    ps = pages.PAGE_SIZE
    start, end = start // ps * ps, -(-end // ps) * ps
    zero = zero_page_pfns() if skip_zero_page else ()
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


# --- remote reads --------------------------------------------------------------------------------
def _aligned_buffer(nbytes: int):
    # mmap gives page alignment, so native kernels see whole aligned pages
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class RemoteReader:
    """Reads lists of pages of a process into one reusable buffer with ``process_vm_readv``.

    One buffer serves every read, sized (``buffer_bytes``) to stay in L2 while the caller scans it.
    A page whose mapping vanished (EFAULT) is reported as not read and the rest of the batch is still
    read; a process that exits (ESRCH) stops the reader (``exited``) and the batch reports what it
    got. Reading never writes to the target.
    """

    def __init__(self, pid: int | None = None, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 buffer=None, page_size: int | None = None):
        self.pid = pid
        self.page_size = ps = page_size or pages.PAGE_SIZE
        if buffer is None:
            nbytes = max(ps, buffer_bytes // ps * ps)
            self._owned = _aligned_buffer(nbytes)
            buffer = self._owned
        else:
            self._owned = None
        self.buffer = np.frombuffer(buffer, dtype=np.uint8)
        self.capacity = self.buffer.size // ps
        if self.capacity == 0:
            raise ValueError(f"read buffer is smaller than one {ps}-byte page")
        self.buffer = self.buffer[: self.capacity * ps]
        self.exited: set = set()
        self.bytes_read = 0
        self.pages_failed = 0

    def close(self) -> None:
        self.buffer = None
        if self._owned is not None:
            try:
                self._owned.close()
            except BufferError:
                pass   # a caller still holds a view: unmapped when the last one goes
            self._owned = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, addrs: np.ndarray, pid: int | None = None, slot: int = 0) -> np.ndarray:
        """Read the pages at ``addrs`` (uint64) into ``buffer`` back to back from page ``slot``.

        Returns a bool array: True where the page was read. Slots of pages not read hold stale
        bytes. Raises ProcessAccessError when the kernel refuses (EPERM)."""
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        starts, lens = _runs(addrs, self.page_size) if addrs.size else (addrs, addrs)
        return self.read_runs(starts, lens, pid, slot, addrs)

    def read_runs(self, starts: np.ndarray, lens: np.ndarray, pid: int | None = None,
                  slot: int = 0, addrs: np.ndarray | None = None) -> np.ndarray:
        """Like :meth:`read` for runs of pages: ``starts`` (addresses) and ``lens`` (bytes, whole
        pages), one iovec each. The common case is one system call for the whole batch."""
        pid = self.pid if pid is None else pid
        ps = self.page_size
        n = int(lens.sum()) // ps if lens.size else 0
        if slot < 0 or slot + n > self.capacity:
            raise ValueError(f"{n} pages from slot {slot} do not fit the {self.capacity}-page "
                             "read buffer")
        ok = np.ones(n, dtype=bool)
        if pid in self.exited:
            ok[:] = False
            return ok
        if not n:
            return ok
        got, err = pages.remote_readv(pid, starts, lens,
                                      self.buffer[slot * ps: (slot + n) * ps])
        self.bytes_read += got
        if err == 0:
            return ok
        if addrs is None:
            addrs = np.concatenate([np.arange(int(a), int(a) + int(b), ps, dtype=np.uint64)
                                    for a, b in zip(starts, lens)])
        first = got // ps
        while True:
            self._check(err, pid)
            if err == errno_mod.ESRCH:
                self.exited.add(pid)
                ok[first:] = False
                self.pages_failed += n - first
                return ok
            # EFAULT: the page at `first` is unmapped now: skip it, read the rest
            ok[first] = False
            self.pages_failed += 1
            first += 1
            if first >= n:
                return ok
            rs, rl = _runs(addrs[first:], ps)
            got, err = pages.remote_readv(pid, rs, rl,
                                          self.buffer[(slot + first) * ps: (slot + n) * ps])
            self.bytes_read += got
            if err == 0:
                return ok
            first += got // ps

    @staticmethod
    def _check(err: int, pid: int) -> None:
        if err in (errno_mod.EFAULT, errno_mod.ESRCH):
            return
        if err in (errno_mod.EPERM, errno_mod.EACCES):
            raise ProcessAccessError(
                f"not allowed to read the memory of PID {pid}: run as root or as the "
                "process's owner (ptrace access check; see kernel.yama.ptrace_scope)", pid=pid)
        raise ProcessError(f"reading the memory of PID {pid} failed: {os.strerror(err)}",
                           pid=pid, errno=err)


def read_ahead(chunks, readers: list):
    """Read chunks in a background thread while the caller works on the previous one.

    ``chunks`` yields ``(pid, addrs, tag)``, ``addrs`` being page addresses or a ``(starts, lens)``
    pair of runs; this yields ``(tag, reader, ok)`` in the same order,
    the pages being in ``reader.buffer``. Each reader is reused once the caller asks for the next
    chunk, so with two readers one chunk is read while the other is scanned: reading runs in the
    kernel and scanning in native code, both without the GIL, so on two cores the pair costs about
    as much wall time as the reads alone. With one reader it is a plain loop in the caller's
    thread. Exceptions in the reader thread are raised here."""
    if len(readers) < 2:
        reader = readers[0]
        for pid, addrs, tag in chunks:
            yield tag, reader, _read_any(reader, addrs, pid)
        return
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for r in readers:
        free.put(r)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for pid, addrs, tag in chunks:
                reader = free.get()
                if stop.is_set():
                    return
                full.put((tag, reader, _read_any(reader, addrs, pid)))
        except BaseException as err:  # handed to the caller's thread
            full.put(err)
        finally:
            full.put(done)

    thread = threading.Thread(target=work, name="udedup-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = full.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
            free.put(item[1])
    finally:
        stop.set()
        for _ in readers:
            free.put(None)
        thread.join()


def _read_any(reader: RemoteReader, what, pid):
    # chunks give page addresses, or (starts, lens) runs when the caller has them already
    if isinstance(what, tuple):
        return reader.read_runs(what[0], what[1], pid)
    return reader.read(what, pid)


def _runs(addrs: np.ndarray, page_size: int):
    """Coalesce page addresses into (start, length) iovecs: one per contiguous run."""
    if addrs.size == 1:
        return addrs, np.array([page_size], dtype=np.uint64)
    breaks = np.flatnonzero(np.diff(addrs) != np.uint64(page_size)) + 1
    first = np.concatenate(([0], breaks))
    stop = np.concatenate((breaks, [addrs.size]))
    return addrs[first], (stop - first).astype(np.uint64) * np.uint64(page_size)


def ksm_stat(pid: int, procfs: str = "/proc") -> dict[str, object]:
    """/proc/PID/ksm_stat as a dict (empty where the kernel has no such file)."""
    try:
        with open(_proc_path(pid, "ksm_stat", procfs)) as f:
            text = f.read()
    except FileNotFoundError:
        if not os.path.isdir(os.path.join(procfs, str(int(pid)))):
            raise ProcessNotFoundError(f"no process with PID {pid}", pid=pid) from None
        return {}
    except OSError as err:
        raise _translate(err, pid, "ksm_stat") from err
    out: dict[str, object] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        key, value = key.rstrip(":"), value.strip()
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out
