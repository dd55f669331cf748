"""Another process's memory: ``process_vm_readv`` of page lists into one reusable, page-aligned
buffer small enough to stay in L2, surviving mappings that vanish (EFAULT) and a process that exits
(ESRCH) mid-read, and a read-ahead thread that overlaps reading with scanning. Reading never writes
to the target, and never unshares its pages.

Why the last point needs care: ``process_vm_readv`` pins the pages it reads (``FOLL_PIN``), and
since Linux 5.19 the kernel unshares an anonymous page that is pinned while it is shared
(``gup_must_unshare``): a KSM page, or a page still shared with a parent or child since fork, gets a
private copy. Measured here (6.18): reading 1000 merged pages with process_vm_readv left 0 of them
KSM pages; reading them through ``/proc/PID/mem`` (a plain reference, ``FOLL_GET``) left all 1000.
So a scan of merged memory would undo the merging and allocate a page per page read. The reader
therefore looks at pagemap first (8 bytes per page, one read per batch): a batch holding a page
that is present but not mapped exclusively (``PM_MMAP_EXCLUSIVE`` clear: KSM, fork-shared, the zero
page) is read through /proc/PID/mem instead, about half as fast; the common batch of private pages
keeps process_vm_readv. A page ksmd merges between the pagemap read and the copy is still
unshared: one page, merged again by ksmd's next pass."""
from __future__ import annotations

import errno as errno_mod
import mmap
import os
import queue
import threading

import numpy as np

from ..errors import ProcessAccessError, ProcessError
from ..native import lib, syscalls
from .pagemap import PM_MMAP_EXCLUSIVE, PM_PRESENT

#: Default size of the read buffer: half of a typical 1-2 MiB L2, so the scan that follows each
#: read finds the bytes still in cache.
DEFAULT_BUFFER_BYTES = 1 << 20


def aligned_buffer(nbytes: int):
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
                 buffer=None, page_size: int | None = None, keep_shared: bool = True):
        self.pid = pid
        #: read batches holding shared pages through /proc/PID/mem (see the module's doc)
        self.keep_shared = keep_shared
        self._fds: tuple | None = None      # (pid, pagemap fd, mem fd) of the last process read
        self.shared_batches = 0             # batches read through /proc/PID/mem
        self.page_size = ps = page_size or lib.PAGE_SIZE
        if buffer is None:
            nbytes = max(ps, buffer_bytes // ps * ps)
            self._owned = aligned_buffer(nbytes)
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
        self._close_fds()
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
        starts, lens = page_runs(addrs, self.page_size) if addrs.size else (addrs, addrs)
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
        if self.keep_shared and self._holds_shared(pid, starts, lens, n):
            self.shared_batches += 1
            return self._read_mem(pid, starts, lens, slot, ok)
        got, err = syscalls.remote_readv(pid, starts, lens,
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
            rs, rl = page_runs(addrs[first:], ps)
            got, err = syscalls.remote_readv(pid, rs, rl,
                                          self.buffer[(slot + first) * ps: (slot + n) * ps])
            self.bytes_read += got
            if err == 0:
                return ok
            first += got // ps

    # --- pages shared with others: read through /proc/PID/mem ----------------------------------
    def _open(self, pid: int):
        """(pagemap fd, mem fd) of ``pid``, kept while the reader reads the same process; None
        when the process is gone (process_vm_readv then says ESRCH)."""
        if self._fds is not None and self._fds[0] == pid:
            return self._fds[1:]
        self._close_fds()
        try:
            pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except PermissionError:
            self._check(errno_mod.EPERM, pid)
        try:
            mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            os.close(pm)
            return None
        except PermissionError:
            os.close(pm)
            self._check(errno_mod.EPERM, pid)
        self._fds = (pid, pm, mem)
        return pm, mem

    def _close_fds(self) -> None:
        if self._fds is not None:
            for fd in self._fds[1:]:
                os.close(fd)
            self._fds = None

    def _holds_shared(self, pid: int, starts: np.ndarray, lens: np.ndarray, n: int) -> bool:
        """Does the batch hold a present page not mapped exclusively (pagemap)?"""
        fds = self._open(pid)
        if fds is None:
            return False
        ps = self.page_size
        first = int(starts.min())
        span = (int((starts + lens).max()) - first) // ps
        entries = np.empty(span if span <= 4 * n + 64 else 0, dtype=np.uint64)
        try:
            if entries.size:            # dense: one read over the batch's span
                got = os.preadv(fds[0], [memoryview(entries).cast("B")], first // ps * 8)
                entries = entries[: got // 8]
            else:                       # scattered: one read per run
                parts = []
                for a, b in zip(starts.tolist(), lens.tolist()):
                    e = np.empty(b // ps, dtype=np.uint64)
                    got = os.preadv(fds[0], [memoryview(e).cast("B")], a // ps * 8)
                    parts.append(e[: got // 8])
                entries = np.concatenate(parts)
        except OSError:
            return False            # gone or unreadable: process_vm_readv reports why
        flag = np.uint64(PM_PRESENT | PM_MMAP_EXCLUSIVE)
        return bool(np.any((entries & flag) == np.uint64(PM_PRESENT)))

    def _read_mem(self, pid: int, starts: np.ndarray, lens: np.ndarray, slot: int,
                  ok: np.ndarray) -> np.ndarray:
        """The batch through /proc/PID/mem, run by run; a page that cannot be read (unmapped
        now: EIO or a short read) is skipped, as EFAULT is for process_vm_readv."""
        fds = self._open(pid)
        ps, at = self.page_size, 0
        for a, b in zip(starts.tolist(), lens.tolist()):
            pages, done = b // ps, 0
            while done < pages:
                if fds is None:
                    self.exited.add(pid)
                    ok[at + done:] = False
                    self.pages_failed += ok.size - (at + done)
                    return ok
                lo = (slot + at + done) * ps
                view = memoryview(self.buffer[lo: (slot + at + pages) * ps])
                try:
                    got = os.preadv(fds[1], [view], a + done * ps)
                except OSError as err:
                    if err.errno in (errno_mod.EPERM, errno_mod.EACCES):
                        self._check(err.errno, pid)
                    got = -1
                if got > 0:
                    self.bytes_read += got // ps * ps
                    done += got // ps
                    continue
                if got == 0 and not os.path.exists(f"/proc/{pid}/mem"):
                    fds = None          # the process exited (its mm is gone)
                    continue
                ok[at + done] = False   # this page cannot be read now: skip it
                self.pages_failed += 1
                done += 1
            at += pages
        return ok

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


def page_runs(addrs: np.ndarray, page_size: int):
    """Coalesce page addresses into (start, length) iovecs: one per contiguous run."""
    if addrs.size == 1:
        return addrs, np.array([page_size], dtype=np.uint64)
    breaks = np.flatnonzero(np.diff(addrs) != np.uint64(page_size)) + 1
    first = np.concatenate(([0], breaks))
    stop = np.concatenate((breaks, [addrs.size]))
    return addrs[first], (stop - first).astype(np.uint64) * np.uint64(page_size)
