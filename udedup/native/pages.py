"""The native boundary: the only module that imports ``udedup._native``.

Typed wrappers over the C hot path. Inputs are any contiguous buffer (bytes, bytearray, memoryview,
mmap, C-contiguous numpy array) and are never copied; results are numpy arrays, or fill arrays the
caller passes. One native call covers a whole run of pages: the per-call cost (~100 ns) must be paid
per batch, never per page. Status codes and errno become :mod:`udedup.errors` exceptions here.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import numpy as np

from ..errors import BufferTypeError, NativeBuildError, NativeError, PageBufferError, UsageError

try:
    from .._native import ffi, lib
except ImportError as err:  # pragma: no cover - depends on how the package was installed
    raise NativeBuildError(
        f"udedup's native extension is not built ({err}); reinstall with 'pip install .'"
    ) from err

# Bumped with csrc/udedup.cdef.h's UD_ABI_VERSION: a stale build fails here, loudly.
_ABI_VERSION = 3
if lib.ud_abi_version() != _ABI_VERSION:  # pragma: no cover
    raise NativeBuildError(
        f"udedup._native has ABI {lib.ud_abi_version()}, the Python code expects {_ABI_VERSION}: "
        "rebuild with 'pip install .'"
    )

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")

ISA_NAMES = {lib.UD_ISA_PORTABLE: "portable", lib.UD_ISA_SSE42: "sse4.2",
             lib.UD_ISA_AVX2: "avx2", lib.UD_ISA_AVX512: "avx512"}
_ISA_LEVELS = {name: level for level, name in ISA_NAMES.items()}

#: Best instruction set this CPU runs ("portable", "sse4.2", "avx2", "avx512").
ISA_SUPPORTED: str = ISA_NAMES[lib.ud_isa_supported()]
#: The CPU has the SSE4.2 crc32 instruction.
HAS_HW_CRC32C: bool = lib.ud_isa_supported() >= lib.UD_ISA_SSE42


class ScanResult(NamedTuple):
    crc: np.ndarray   # uint32 per page: crc32c, for change detection only
    hash: np.ndarray  # uint64 per page: equality candidates, to be confirmed by compare_pages
    zero: np.ndarray  # bool per page: every byte is zero (exact)


def isa() -> str:
    """Instruction set of the kernels in use."""
    return ISA_NAMES[lib.ud_isa_active()]


def crc32c_impl() -> str:
    """Which CRC-32C path the page kernels use: ``"vpclmulqdq"`` (carry-less-multiply folding, the
    avx512 level), ``"sse4.2"`` (crc32 instruction) or ``"sw"`` (portable tables)."""
    if not lib.ud_crc32c_hw_active():
        return "sw"
    return "vpclmulqdq" if lib.ud_isa_active() == lib.UD_ISA_AVX512 else "sse4.2"


@contextlib.contextmanager
def implementation(isa: str | None = None, crc32c: str | None = None):
    """Temporarily switch kernels: ``isa`` in ISA_NAMES values, ``crc32c`` "hw" or "sw".

    Process-wide (the benchmark and the tests use it to measure and check every path)."""
    old_level, old_hw = lib.ud_isa_active(), lib.ud_crc32c_hw_active()
    try:
        if isa is not None:
            if isa not in _ISA_LEVELS:
                raise UsageError(f"unknown instruction set {isa!r}; use one of {sorted(_ISA_LEVELS)}")
            if lib.ud_isa_select(_ISA_LEVELS[isa]) != 0:
                raise UsageError(f"this CPU cannot run {isa!r} kernels (best: {ISA_SUPPORTED})")
        if crc32c is not None:
            if crc32c not in ("hw", "sw"):
                raise UsageError(f"unknown crc32c path {crc32c!r}; use 'hw' or 'sw'")
            if lib.ud_crc32c_select_hw(int(crc32c == "hw")) != 0:
                raise UsageError("hardware crc32c needs SSE4.2 kernels, not available here")
        yield
    finally:
        lib.ud_isa_select(old_level)
        lib.ud_crc32c_select_hw(old_hw)


# --- argument checking --------------------------------------------------------------------------
def _input(buf, what="buffer"):
    """(cdata, nbytes) over ``buf`` without copying."""
    if isinstance(buf, np.ndarray) and not buf.flags.c_contiguous:
        raise BufferTypeError(f"{what} is a non-contiguous numpy array; pass np.ascontiguousarray(...)")
    try:
        view = memoryview(buf)
    except TypeError:
        raise BufferTypeError(
            f"{what} of type {type(buf).__name__} is not a buffer; pass bytes, bytearray, "
            "memoryview, mmap or a numpy array") from None
    if not view.c_contiguous:
        raise BufferTypeError(f"{what} is not C-contiguous; copy it into a contiguous buffer first")
    nbytes = view.nbytes
    view.release()
    if nbytes == 0:
        return ffi.NULL, 0
    return ffi.from_buffer(buf), nbytes


def _page_size(page_size):
    ps = PAGE_SIZE if page_size is None else int(page_size)
    if ps <= 0 or ps % 64:
        raise PageBufferError(f"page size {ps} is not a positive multiple of 64 bytes")
    return ps


def _pages(buf, page_size, what="buffer"):
    ps = _page_size(page_size)
    ptr, nbytes = _input(buf, what)
    if nbytes % ps:
        raise PageBufferError(
            f"{what} is {nbytes} bytes, not a whole number of {ps}-byte pages; "
            f"trim or pad it to a multiple of {ps}")
    return ptr, ps, nbytes // ps


def _output(out, n, dtype, name):
    if out is None:
        return np.empty(n, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise BufferTypeError(f"{name} must be a numpy array of {np.dtype(dtype).name}, "
                              f"not {type(out).__name__}")
    if out.dtype != np.dtype(dtype):
        raise BufferTypeError(f"{name} has dtype {out.dtype}, expected {np.dtype(dtype).name}")
    if not out.flags.writeable:
        raise BufferTypeError(f"{name} is read-only; pass a writable array")
    if not out.flags.c_contiguous:
        raise BufferTypeError(f"{name} is not C-contiguous; pass a contiguous array")
    if out.shape != (n,):
        raise PageBufferError(f"{name} has shape {out.shape}, expected ({n},) for {n} pages")
    return out


def _ptr(array, ctype):
    """``ctype`` is the C array type, e.g. ``"uint32_t[]"``."""
    # from_buffer costs ~0.15 us, array.ctypes.data ~1 us: this runs for every chunk of a scan
    return ffi.from_buffer(ctype, array) if array.size else ffi.NULL


# --- page kernels -------------------------------------------------------------------------------
def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``crc`` (0 to start), as the crc32c package computes it."""
    ptr, nbytes = _input(data, "data")
    return int(lib.ud_crc32c(crc & 0xFFFFFFFF, ptr, nbytes))


def _per_page(kernel, buf, page_size, out, dtype, ctype) -> np.ndarray:
    ptr, ps, n = _pages(buf, page_size)
    out = _output(out, n, dtype, "out")
    if n:
        kernel(ptr, ps, n, _ptr(out, ctype))
    return out


def crc32c_pages(buf, page_size=None, out=None) -> np.ndarray:
    """crc32c of every page: a change detector, never an equality test."""
    return _per_page(lib.ud_crc32c_pages, buf, page_size, out, np.uint32, "uint32_t[]")


def hash64_pages(buf, page_size=None, out=None) -> np.ndarray:
    """64-bit hash of every byte of every page: equal pages hash equal; confirm matches by bytes."""
    return _per_page(lib.ud_hash64_pages, buf, page_size, out, np.uint64, "uint64_t[]")


def zero_pages(buf, page_size=None, out=None) -> np.ndarray:
    """Exact per-page "all bytes are zero" (bool), leaving each page at its first non-zero word."""
    return _per_page(lib.ud_zero_pages, buf, page_size, out, np.bool_, "uint8_t[]")


def scan_pages(buf, page_size=None, crc_out=None, hash_out=None, zero_out=None) -> ScanResult:
    """One pass per page giving crc32c, hash64 and is_zero together."""
    ptr, ps, n = _pages(buf, page_size)
    crc = _output(crc_out, n, np.uint32, "crc_out")
    hsh = _output(hash_out, n, np.uint64, "hash_out")
    zero = _output(zero_out, n, np.bool_, "zero_out")
    if n:
        lib.ud_scan_pages(ptr, ps, n, _ptr(crc, "uint32_t[]"), _ptr(hsh, "uint64_t[]"),
                          _ptr(zero, "uint8_t[]"))
    return ScanResult(crc, hsh, zero)


def compare_pages(a, index_a, index_b, b=None, page_size=None, out=None) -> np.ndarray:
    """Byte-compare page ``index_a[k]`` of ``a`` with page ``index_b[k]`` of ``b`` (default ``a``).

    Returns a bool array: True where the two pages are identical."""
    pa, ps, na = _pages(a, page_size, "a")
    pb, _, nb = (pa, ps, na) if b is None else _pages(b, ps, "b")
    ia = np.ascontiguousarray(index_a, dtype=np.int64)
    ib = np.ascontiguousarray(index_b, dtype=np.int64)
    if ia.ndim != 1 or ia.shape != ib.shape:
        raise PageBufferError(f"index arrays must be 1-D and the same length, got {ia.shape} "
                              f"and {ib.shape}")
    out = _output(out, ia.size, np.bool_, "out")
    if ia.size == 0:
        return out
    rc = lib.ud_compare_pages(pa, na, pb, nb, ps, _ptr(ia, "int64_t[]"), _ptr(ib, "int64_t[]"),
                              ia.size, _ptr(out, "uint8_t[]"))
    if rc != 0:
        raise PageBufferError(f"a page index is out of range (a has {na} pages, b has {nb})")
    return out


def sum64(buf) -> int:
    """Sum of the buffer's 64-bit words (mod 2**64): the plain memory-read baseline."""
    ptr, nbytes = _input(buf)
    return int(lib.ud_sum64(ptr, nbytes))


# --- syscalls -----------------------------------------------------------------------------------
def remote_readv(pid: int, addrs: np.ndarray, lens: np.ndarray, out) -> tuple[int, int]:
    """process_vm_readv of ranges (addrs[k], lens[k]) of ``pid`` into ``out``, back to back.

    Returns ``(bytes_read, errno)``; errno is 0 when everything was read, else why it stopped
    (EFAULT: a range vanished, ESRCH: the process exited, EPERM: no ptrace access)."""
    a = np.ascontiguousarray(addrs, dtype=np.uint64)
    ln = np.ascontiguousarray(lens, dtype=np.uint64)
    if a.shape != ln.shape or a.ndim != 1:
        raise PageBufferError("addrs and lens must be 1-D arrays of the same length")
    ptr, nbytes = _input(out, "out")
    if isinstance(out, (bytes,)) or memoryview(out).readonly:
        raise BufferTypeError("out is read-only; pass a writable buffer")
    if a.size == 0:
        return 0, 0
    err = ffi.new("int *")
    got = lib.ud_remote_readv(int(pid), _ptr(a, "uint64_t[]"), _ptr(ln, "uint64_t[]"), a.size,
                              ptr, nbytes, err)
    return int(got), int(err[0])


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) for the calling process; raises NativeError carrying errno on failure."""
    err = ffi.new("int *")
    rc = lib.ud_prctl(option, arg2, arg3, arg4, arg5, err)
    if rc < 0:
        raise NativeError(f"prctl({option}) failed: {os.strerror(err[0])}", errno=err[0],
                          call="prctl", option=option)
    return int(rc)


# --- injection
# Thin wrappers over csrc/inject.c (running a syscall inside another thread through ptrace). The
# policy (refusals, modes, ranges) lives in udedup/inject.py; here only status codes become errors.
import errno as errno_mod  # noqa: E402
import signal as signal_mod  # noqa: E402

from ..errors import (InjectError, InjectRefusedError, ProcessNotFoundError,  # noqa: E402
                     UnsupportedArchError)

#: The injector works on this machine's architecture (x86_64 only).
INJECT_SUPPORTED: bool = bool(lib.ud_inject_supported())

_PTRACE_REQUESTS = {0x4206: "PTRACE_SEIZE", 0x4207: "PTRACE_INTERRUPT", 0x4204: "PTRACE_GETREGSET",
                    0x4205: "PTRACE_SETREGSET", 7: "PTRACE_CONT", 24: "PTRACE_SYSCALL",
                    17: "PTRACE_DETACH", 0x4202: "PTRACE_GETSIGINFO", 1: "PTRACE_PEEKTEXT"}


class InjectOutcome(NamedTuple):
    results: list      # raw return value per call: >= 0, or -errno
    restarts: list     # per call: times it was cut short by a signal and run again
    info: dict         # the C side's ud_inject_info, by field name


def find_syscall_insn(buf) -> int:
    """Offset of the first ``syscall`` instruction in ``buf`` (machine code), or -1."""
    ptr, nbytes = _input(buf, "buf")
    return int(lib.ud_inject_find_insn(ptr, nbytes)) if nbytes else -1


def _info_dict(info) -> dict:
    return {name: int(getattr(info, name)) for name, _ in ffi.typeof("ud_inject_info").fields}


def _wait_status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal_mod.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"wait status {status:#x}"


def inject_syscalls(tid: int, syscall_ip: int, calls, *, own_child: bool = False,
                    keep_eintr: bool = False, rseq_check: bool = True) -> InjectOutcome:
    """Run ``calls`` (``(nr, (args...))`` pairs, up to 6 args) inside thread ``tid``, one attach.

    ``syscall_ip`` is the address of a ``syscall`` instruction in the target. ``own_child``: the
    thread leads a process we started, so its exit status is left for our other waiter. The other
    two switches exist for tests only. Raises UnsupportedArchError, InjectRefusedError (ptrace not
    allowed: the target was not touched), ProcessNotFoundError, InjectError (``.outcome`` holds
    the partial results)."""
    calls = list(calls)
    n = len(calls)
    arr = ffi.new("ud_syscall[]", max(n, 1))
    for i, (nr, args) in enumerate(calls):
        args = tuple(int(a) for a in args)
        if len(args) > 6:
            raise UsageError(f"a syscall takes at most 6 arguments, got {len(args)}")
        arr[i].nr = int(nr)
        for k, a in enumerate(args):
            arr[i].args[k] = a & 0xFFFFFFFFFFFFFFFF
    info = ffi.new("ud_inject_info *")
    flags = ((lib.UD_INJECT_F_KEEP_ZOMBIE if own_child else 0)
             | (lib.UD_INJECT_F_KEEP_EINTR if keep_eintr else 0)
             | (0 if rseq_check else lib.UD_INJECT_F_NO_RSEQ))
    rc = lib.ud_inject_syscalls(int(tid), int(syscall_ip), arr, n, flags, info)
    outcome = InjectOutcome([int(arr[i].result) if arr[i].done else None for i in range(n)],
                            [int(arr[i].restarts) for i in range(n)], _info_dict(info))
    if rc == lib.UD_INJECT_OK:
        return outcome
    err = int(info.err)
    request = _PTRACE_REQUESTS.get(int(info.request), f"ptrace request {int(info.request)}")
    fields = dict(pid=tid, tid=tid, status=int(rc), errno=err, outcome=outcome)
    if rc == lib.UD_INJECT_E_ARCH:
        raise UnsupportedArchError(
            f"injecting a syscall is not implemented for {os.uname().machine} (x86_64 only)",
            **fields)
    if rc == lib.UD_INJECT_E_SEIZE:
        if err == errno_mod.ESRCH:
            raise ProcessNotFoundError(f"thread {tid} does not exist (or exited)", **fields)
        raise InjectRefusedError(
            f"not allowed to ptrace thread {tid} ({os.strerror(err)}): it is another user's, not "
            "dumpable, already traced, or kernel.yama.ptrace_scope forbids it; run as root or with "
            "CAP_SYS_PTRACE (the target was not touched)", reason="ptrace", **fields)
    if rc == lib.UD_INJECT_E_COMPAT:
        raise UnsupportedArchError(f"thread {tid} runs 32-bit code: only 64-bit processes can be "
                                   "injected (the target was not changed)", **fields)
    if rc == lib.UD_INJECT_E_GONE:
        status = int(info.wait_status)
        what = _wait_status_text(status)
        if os.WIFEXITED(status):
            raise ProcessNotFoundError(f"thread {tid} {what} during the injection", **fields)
        raise InjectError(f"thread {tid} was {what} during the injection", **fields)
    reasons = {
        lib.UD_INJECT_E_INSN: "the syscall instruction chosen in its code is gone (the mapping "
                              "changed); retry",
        lib.UD_INJECT_E_BUSY: "it was interrupted by signals on every attempt (or stopped inside "
                              "an rseq critical section with a bad signature); retry later",
        lib.UD_INJECT_E_FAULT: "executing the syscall instruction faulted (its code page was "
                               "unmapped); retry",
        lib.UD_INJECT_E_STATE: "it stopped unexpectedly "
                               f"({_wait_status_text(int(info.wait_status))})",
        lib.UD_INJECT_E_PTRACE: f"{request} failed: {os.strerror(err) if err else 'unknown error'}",
    }
    raise InjectError(f"injection into thread {tid} failed: "
                      f"{reasons.get(rc, f'status {rc}')}; its registers were restored", **fields)


__all__ = ["PAGE_SIZE", "ISA_NAMES", "ISA_SUPPORTED", "HAS_HW_CRC32C", "ScanResult", "isa",
           "crc32c_impl", "implementation", "crc32c", "crc32c_pages", "hash64_pages", "zero_pages",
           "scan_pages", "compare_pages", "sum64", "remote_readv", "prctl", "INJECT_SUPPORTED",
           "InjectOutcome", "find_syscall_insn", "inject_syscalls"]
