"""Mergeable memory for the calling process: :class:`MergeableBuffer`, :func:`mergeable_array`,
and the whole-process switch ``PR_SET_MEMORY_MERGE``.

Why not ``mmap.mmap(-1, n)``: Python maps anonymous memory MAP_SHARED by default, and KSM ignores
shared mappings (madvise succeeds, nothing merges, no ``mg`` flag). These buffers are MAP_PRIVATE.
THP is switched off on them by default: a huge page must be split before KSM can merge it, and the
huge zero page / THP shrinker put zero pages outside KSM's counters, which makes tests flaky.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import logging
import math
import mmap
import os
import weakref

import numpy as np

from ..native import lib, syscalls
from ..errors import (BufferInUseError, KsmPermissionError, KsmUnavailableError, NativeError,
                     PageBufferError, UdedupError)

log = logging.getLogger(__name__)

PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68

MADV_MERGEABLE = getattr(mmap, "MADV_MERGEABLE", 12)
MADV_UNMERGEABLE = getattr(mmap, "MADV_UNMERGEABLE", 13)
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)


def _madvise(mm: mmap.mmap, advice: int, what: str) -> None:
    try:
        mm.madvise(advice)
    except OSError as err:
        hint = {_errno.EINVAL: "this kernel lacks the advice (KSM or THP not built in?)",
                _errno.ENOMEM: "not enough memory to break the sharing",
                _errno.EAGAIN: "the kernel ran out of resources; retry"}.get(err.errno, "")
        raise NativeError(f"madvise({what}) failed: {os.strerror(err.errno)}"
                          + (f": {hint}" if hint else ""), errno=err.errno, call="madvise") from err


class MergeableBuffer:
    """Anonymous private memory registered with KSM (``MADV_MERGEABLE``).

    ``nbytes`` is rounded up to whole pages. ``hugepages=False`` (default) sets MADV_NOHUGEPAGE;
    ``True`` sets MADV_HUGEPAGE. ``merge=False`` maps without registering (call :meth:`merge`).
    Views from :meth:`array` share the memory; :meth:`close` refuses while any view is alive
    (unmapping under a live numpy array would crash the interpreter).
    """

    def __init__(self, nbytes: int, hugepages: bool = False, merge: bool = True):
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise PageBufferError(f"MergeableBuffer needs a positive byte count, got {nbytes!r}")
        page = lib.PAGE_SIZE
        self.nbytes: int = -(-nbytes // page) * page
        self.page_size: int = page
        self.hugepages = bool(hugepages)
        self.mmap: mmap.mmap = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._views: list[weakref.ref] = []  # numpy arrays are unhashable: no WeakSet
        self.merged = False
        try:
            anchor = ctypes.c_char.from_buffer(self.mmap)
            self.address: int = ctypes.addressof(anchor)
            del anchor  # drop the export at once, or close() could never succeed
            if hugepages:
                _madvise(self.mmap, MADV_HUGEPAGE, "MADV_HUGEPAGE")
            else:
                _madvise(self.mmap, MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")
            if merge:
                self.merge()
        except BaseException:
            self.mmap.close()
            raise

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("mergeable" if self.merged else "not mergeable")
        return f"<MergeableBuffer {self.nbytes} bytes at {self.address:#x}, {state}>"

    @property
    def closed(self) -> bool:
        return self.mmap.closed

    @property
    def npages(self) -> int:
        return self.nbytes // self.page_size

    def _check_open(self) -> None:
        if self.mmap.closed:
            raise UdedupError("MergeableBuffer is closed")

    def array(self, dtype="u1", shape=None) -> np.ndarray:
        """A numpy view (no copy) of the buffer; ``shape`` may cover less than the whole buffer."""
        self._check_open()
        dtype = np.dtype(dtype)
        if shape is None:
            count = self.nbytes // dtype.itemsize
            shape = (count,)
        else:
            shape = tuple(shape) if np.iterable(shape) else (int(shape),)
            count = math.prod(shape)
            if count * dtype.itemsize > self.nbytes:
                raise PageBufferError(f"shape {shape} of {dtype} needs {count * dtype.itemsize} "
                                      f"bytes, the buffer has {self.nbytes}")
        view = np.frombuffer(self.mmap, dtype=dtype, count=count).reshape(shape)
        self._views = [ref for ref in self._views if ref() is not None]
        self._views.append(weakref.ref(view))
        return view

    def merge(self) -> None:
        """MADV_MERGEABLE on the whole buffer (no privilege needed)."""
        self._check_open()
        _madvise(self.mmap, MADV_MERGEABLE, "MADV_MERGEABLE")
        self.merged = True

    def unmerge(self) -> None:
        """MADV_UNMERGEABLE: breaks every merge of this buffer now (needs a page per merged page)."""
        self._check_open()
        _madvise(self.mmap, MADV_UNMERGEABLE, "MADV_UNMERGEABLE")
        self.merged = False

    def close(self) -> None:
        """Unmap the buffer. Idempotent. :class:`BufferInUseError` while views are alive."""
        if self.mmap.closed:
            return
        try:
            self.mmap.close()
        except BufferError as err:
            alive = sum(1 for ref in self._views if ref() is not None)
            # numpy points slices at the mmap itself, so only direct views can be counted
            what = (f"{alive} numpy view(s) from .array()" if alive
                    else "an array or memoryview of its memory (a slice of .array()?)")
            raise BufferInUseError(
                f"cannot close MergeableBuffer: {what} still alive; delete them first "
                "(del arr), or drop the buffer and let garbage collection unmap it when the last "
                "view goes") from err

    def __enter__(self) -> "MergeableBuffer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except BufferInUseError:
            if exc_type is None:
                raise
            # do not hide the exception that is already propagating: the memory is unmapped when
            # the last view is garbage collected
            log.debug("MergeableBuffer left mapped: views still alive while an exception propagates")


def mergeable_array(shape, dtype="u1", hugepages: bool = False) -> np.ndarray:
    """A zero-filled numpy array in its own mergeable mapping.

    The array keeps the mapping alive (``arr.base`` holds the mmap); it is unmapped when the array
    and every view of it are garbage collected.
    """
    dtype = np.dtype(dtype)
    shape = tuple(shape) if np.iterable(shape) else (int(shape),)
    nbytes = max(1, math.prod(shape) * dtype.itemsize)
    buf = MergeableBuffer(nbytes, hugepages=hugepages)
    return buf.array(dtype, shape)


# --- the whole calling process ------------------------------------------------------------------
def _prctl_error(err: NativeError, what: str) -> UdedupError:
    code = err.errno
    release = os.uname().release
    if code == _errno.EPERM:
        # 6.18 lets any process set it on itself (measured with no capabilities); early patch
        # versions, some distribution kernels and security modules ask for CAP_SYS_RESOURCE
        return KsmPermissionError(f"{what} was refused (EPERM): this kernel or a security policy "
                                  "wants privilege; run as root or grant CAP_SYS_RESOURCE",
                                  errno=code)
    if code == _errno.EINVAL:
        return KsmUnavailableError(f"{what}: kernel {release} has no PR_SET_MEMORY_MERGE (needs "
                                   "Linux 6.4+ built with CONFIG_KSM)", errno=code)
    return err


def enable_process_merge() -> None:
    """prctl(PR_SET_MEMORY_MERGE, 1): every compatible mapping of this process, now and later,
    becomes mergeable; children inherit it (across exec from Linux 6.7). No privilege is needed on
    6.18 (a process may opt itself in); EPERM is still mapped for kernels that ask for one."""
    try:
        syscalls.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)
    except NativeError as err:
        raise _prctl_error(err, "enabling KSM for the whole process") from err


def disable_process_merge() -> None:
    """prctl(PR_SET_MEMORY_MERGE, 0): unmerges and clears ``mg`` on every mapping of this process,
    including ranges registered with madvise."""
    try:
        syscalls.prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0)
    except NativeError as err:
        raise _prctl_error(err, "disabling KSM for the whole process") from err


def process_merge_enabled() -> bool:
    """prctl(PR_GET_MEMORY_MERGE): whether the calling process has KSM merge-any on."""
    try:
        return bool(syscalls.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0))
    except NativeError as err:
        raise _prctl_error(err, "reading the process KSM setting") from err


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of the running kernel (``os.uname().release``); (0, 0) if unparsable."""
    release = release or os.uname().release
    parts = []
    for piece in release.split(".")[:2]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            return (0, 0)
        parts.append(int(digits))
    return (parts + [0, 0])[0], (parts + [0, 0])[1]
