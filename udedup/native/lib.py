"""The native boundary: the only module that imports ``udedup._native``.

Everything else in :mod:`udedup.native` takes ``ffi`` and ``lib`` from here, after the ABI check
below has passed. Here too: the page size, the checks every wrapper makes on its buffers (any
contiguous buffer, never copied), and the tables that turn C status codes and errno into
:mod:`udedup.errors` exceptions.
"""
from __future__ import annotations

import errno as errno_mod
import os
import signal as signal_mod

import numpy as np

from ..errors import (BufferTypeError, InjectError, InjectRefusedError, NativeBuildError,
                      NativeError, PageBufferError, ProcessNotFoundError, UnsupportedArchError)

try:
    from .._native import ffi, lib
except ImportError as err:  # pragma: no cover - depends on how the package was installed
    raise NativeBuildError(
        f"udedup's native extension is not built ({err}); reinstall with 'pip install .'"
    ) from err

#: Bumped with csrc/udedup.cdef.h's UD_ABI_VERSION: a stale build fails here, loudly.
ABI_VERSION = 4
if lib.ud_abi_version() != ABI_VERSION:  # pragma: no cover
    raise NativeBuildError(
        f"udedup._native has ABI {lib.ud_abi_version()}, the Python code expects {ABI_VERSION}: "
        "rebuild with 'pip install .'"
    )

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")


# --- argument checking --------------------------------------------------------------------------
def check_buffer(buf, what="buffer"):
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


def check_writable(buf, what="out") -> None:
    if isinstance(buf, bytes) or memoryview(buf).readonly:
        raise BufferTypeError(f"{what} is read-only; pass a writable buffer")


def check_page_size(page_size) -> int:
    ps = PAGE_SIZE if page_size is None else int(page_size)
    if ps <= 0 or ps % 64:
        raise PageBufferError(f"page size {ps} is not a positive multiple of 64 bytes")
    return ps


def check_pages(buf, page_size, what="buffer"):
    """(cdata, page size, number of pages) of a buffer that must hold whole pages."""
    ps = check_page_size(page_size)
    ptr, nbytes = check_buffer(buf, what)
    if nbytes % ps:
        raise PageBufferError(
            f"{what} is {nbytes} bytes, not a whole number of {ps}-byte pages; "
            f"trim or pad it to a multiple of {ps}")
    return ptr, ps, nbytes // ps


def check_output(out, n, dtype, name):
    """``out`` checked as a writable contiguous 1-D array of ``n`` ``dtype``, or a new one."""
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


def c_array(array, ctype):
    """``array``'s memory as the C array type ``ctype``, e.g. ``"uint32_t[]"``."""
    # from_buffer costs ~0.15 us, array.ctypes.data ~1 us: this runs for every chunk of a scan
    return ffi.from_buffer(ctype, array) if array.size else ffi.NULL


# --- status codes and errno -> exceptions ---------------------------------------------------------
def errno_error(call: str, err: int, what: str | None = None, **fields) -> NativeError:
    """The NativeError for a failed call that set errno ``err`` (the caller raises it)."""
    return NativeError(f"{what or call} failed: {os.strerror(err)}", errno=err, call=call, **fields)


def wait_status_text(status: int) -> str:
    """A wait(2) status in words: "killed by SIGKILL", "exited with status 1"."""
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


PTRACE_REQUESTS = {0x4206: "PTRACE_SEIZE", 0x4207: "PTRACE_INTERRUPT", 0x4204: "PTRACE_GETREGSET",
                   0x4205: "PTRACE_SETREGSET", 7: "PTRACE_CONT", 24: "PTRACE_SYSCALL",
                   17: "PTRACE_DETACH", 0x4202: "PTRACE_GETSIGINFO", 1: "PTRACE_PEEKTEXT"}


def inject_error(rc: int, info, tid: int, outcome) -> Exception:
    """The exception for a ``ud_inject_syscalls`` status other than UD_INJECT_OK; ``info`` is the
    C side's ``ud_inject_info``, ``outcome`` the partial results (kept on the exception)."""
    err = int(info.err)
    request = PTRACE_REQUESTS.get(int(info.request), f"ptrace request {int(info.request)}")
    fields = dict(pid=tid, tid=tid, status=int(rc), errno=err, outcome=outcome)
    if rc == lib.UD_INJECT_E_ARCH:
        return UnsupportedArchError(
            f"injecting a syscall is not implemented for {os.uname().machine} (x86_64 only)",
            **fields)
    if rc == lib.UD_INJECT_E_SEIZE:
        if err == errno_mod.ESRCH:
            return ProcessNotFoundError(f"thread {tid} does not exist (or exited)", **fields)
        return InjectRefusedError(
            f"not allowed to ptrace thread {tid} ({os.strerror(err)}): it is another user's, not "
            "dumpable, already traced, or kernel.yama.ptrace_scope forbids it; run as root or with "
            "CAP_SYS_PTRACE (the target was not touched)", reason="ptrace", **fields)
    if rc == lib.UD_INJECT_E_COMPAT:
        return UnsupportedArchError(f"thread {tid} runs 32-bit code: only 64-bit processes can be "
                                    "injected (the target was not changed)", **fields)
    if rc == lib.UD_INJECT_E_GONE:
        status = int(info.wait_status)
        what = wait_status_text(status)
        if os.WIFEXITED(status):
            return ProcessNotFoundError(f"thread {tid} {what} during the injection", **fields)
        return InjectError(f"thread {tid} was {what} during the injection", **fields)
    reasons = {
        lib.UD_INJECT_E_INSN: "the syscall instruction chosen in its code is gone (the mapping "
                              "changed); retry",
        lib.UD_INJECT_E_BUSY: "it was interrupted by signals on every attempt (or stopped inside "
                              "an rseq critical section with a bad signature); retry later",
        lib.UD_INJECT_E_FAULT: "executing the syscall instruction faulted (its code page was "
                               "unmapped); retry",
        lib.UD_INJECT_E_STATE: "it stopped unexpectedly "
                               f"({wait_status_text(int(info.wait_status))})",
        lib.UD_INJECT_E_PTRACE: f"{request} failed: {os.strerror(err) if err else 'unknown error'}",
    }
    return InjectError(f"injection into thread {tid} failed: "
                       f"{reasons.get(rc, f'status {rc}')}; its registers were restored", **fields)


__all__ = ["ffi", "lib", "ABI_VERSION", "PAGE_SIZE", "check_buffer", "check_writable",
           "check_page_size", "check_pages", "check_output", "c_array", "errno_error",
           "wait_status_text", "PTRACE_REQUESTS", "inject_error"]
