"""Address ranges for injected calls: the caller's ranges checked (page-aligned, mapped) and
merged, the eligible or registered mappings of a process, and where an existing ``syscall``
instruction lies in the target for the injector to jump to.

Mappings come from :func:`udedup.host.maps.read_mappings` under the caller's /proc root.
"""
from __future__ import annotations

import errno as errno_mod

import numpy as np

from ..errors import InjectError, InjectRefusedError, ProcessNotFoundError, UsageError
from ..host.fs import ProcFs
from ..host.maps import read_mappings
from ..native import lib, ptrace, syscalls

# Executable mappings the kernel keeps out of reach or that hold no ordinary code to borrow.
_NOT_CODE = ("[vsyscall]", "[uprobes]")

#: Bytes of code read at a time while looking for a ``syscall`` instruction.
_CODE_CHUNK = 1 << 20


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """``(start, end)`` pairs sorted, overlapping or touching ones merged."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def eligible_ranges(pid: int, registered_only: bool,
                    procfs: ProcFs | str = "/proc") -> list[tuple[int, int]]:
    """The ranges to madvise: every KSM-eligible anonymous private mapping, or (for disable,
    ``registered_only``) every mapping that is registered now."""
    maps = read_mappings(pid, procfs)
    if registered_only:
        chosen = [(m.start, m.end) for m in maps if m.registered]
    else:
        chosen = [(m.start, m.end) for m in maps if m.eligible and m.kind == "anon"]
    return merge_ranges(chosen)


def check_ranges(pid: int, ranges, procfs: ProcFs | str = "/proc") -> list[tuple[int, int]]:
    """The caller's ranges as merged ``(start, end)`` ints; UsageError for a range that is not a
    pair, empty or reversed, not page-aligned, or not fully mapped in ``pid``."""
    ps = lib.PAGE_SIZE
    clean = []
    for item in ranges:
        try:
            start, end = (int(x) for x in item)
        except (TypeError, ValueError):
            raise UsageError(f"range {item!r} is not a (start, end) pair of addresses") from None
        if start < 0 or end <= start:
            raise UsageError(f"range {start:#x}-{end:#x} is empty or reversed: pass (start, end) "
                             "with start < end")
        if start % ps or end % ps:
            raise UsageError(f"range {start:#x}-{end:#x} is not page-aligned (page size {ps})")
        clean.append((start, end))
    clean = merge_ranges(clean)
    maps = read_mappings(pid, procfs)
    for start, end in clean:
        pos = start
        for m in maps:
            if m.start <= pos < m.end:
                pos = m.end
            if pos >= end:
                break
        if pos < end:
            raise UsageError(f"range {start:#x}-{end:#x} is not fully mapped in PID {pid} "
                             f"(hole at {pos:#x}): check /proc/{pid}/maps")
    return clean


def find_syscall_address(pid: int, procfs: ProcFs | str = "/proc") -> int:
    """Address of an existing ``syscall`` instruction in the process's executable mappings.

    The vdso first (always there, never unmapped by ordinary programs), then libc, then any other
    executable file mapping."""
    # maps, not smaps: only addresses and permissions are needed, and it is much cheaper
    maps = read_mappings(pid, procfs, name="maps")
    execs = [m for m in maps if "x" in m.perms and m.path not in _NOT_CODE]
    execs.sort(key=lambda m: (m.path != "[vdso]", "libc" not in m.path, m.start))
    for m in execs:
        for base in range(m.start, m.end, _CODE_CHUNK):
            size = min(_CODE_CHUNK, m.end - base)
            buf = bytearray(size)
            got, err = syscalls.remote_readv(pid, np.array([base], dtype=np.uint64),
                                          np.array([size], dtype=np.uint64), buf)
            if err == errno_mod.ESRCH:
                raise ProcessNotFoundError(f"PID {pid} exited", pid=pid)
            if err == errno_mod.EPERM:
                raise InjectRefusedError(f"not allowed to read the memory of PID {pid}: run as "
                                         "root", pid=pid, reason="ptrace")
            off = ptrace.find_syscall_insn(memoryview(buf)[:got])
            if off >= 0:
                return base + off
    raise InjectError(f"found no syscall instruction in the executable mappings of PID {pid}",
                      pid=pid)
