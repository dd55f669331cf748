"""Syscalls the C side makes for us: ``process_vm_readv`` of many ranges in one call, and prctl(2)
with errno returned instead of lost behind ctypes."""
from __future__ import annotations

import numpy as np

from ..errors import PageBufferError
from .lib import c_array, check_buffer, check_writable, errno_error, ffi, lib


def remote_readv(pid: int, addrs: np.ndarray, lens: np.ndarray, out) -> tuple[int, int]:
    """process_vm_readv of ranges (addrs[k], lens[k]) of ``pid`` into ``out``, back to back.

    Returns ``(bytes_read, errno)``; errno is 0 when everything was read, else why it stopped
    (EFAULT: a range vanished, ESRCH: the process exited, EPERM: no ptrace access)."""
    a = np.ascontiguousarray(addrs, dtype=np.uint64)
    ln = np.ascontiguousarray(lens, dtype=np.uint64)
    if a.shape != ln.shape or a.ndim != 1:
        raise PageBufferError("addrs and lens must be 1-D arrays of the same length")
    ptr, nbytes = check_buffer(out, "out")
    check_writable(out, "out")
    if a.size == 0:
        return 0, 0
    err = ffi.new("int *")
    got = lib.ud_remote_readv(int(pid), c_array(a, "uint64_t[]"), c_array(ln, "uint64_t[]"),
                              a.size, ptr, nbytes, err)
    return int(got), int(err[0])


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) for the calling process; raises NativeError carrying errno on failure."""
    err = ffi.new("int *")
    rc = lib.ud_prctl(option, arg2, arg3, arg4, arg5, err)
    if rc < 0:
        raise errno_error("prctl", err[0], what=f"prctl({option})", option=option)
    return int(rc)


__all__ = ["remote_readv", "prctl"]
