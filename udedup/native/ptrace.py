"""Thin wrappers over csrc/inject.c: running syscalls inside another thread through ptrace. The
policy (refusals, modes, ranges) lives in :mod:`udedup.inject`; here calls are marshalled to C and
the result back, and a failure becomes an exception through :func:`.lib.inject_error`."""
from __future__ import annotations

from typing import NamedTuple

from ..errors import UsageError
from .lib import check_buffer, ffi, inject_error, lib

#: The injector works on this machine's architecture (x86_64 only).
INJECT_SUPPORTED: bool = bool(lib.ud_inject_supported())


class InjectOutcome(NamedTuple):
    results: list      # raw return value per call: >= 0, or -errno
    restarts: list     # per call: times it was cut short by a signal and run again
    info: dict         # the C side's ud_inject_info, by field name


def find_syscall_insn(buf) -> int:
    """Offset of the first ``syscall`` instruction in ``buf`` (machine code), or -1."""
    ptr, nbytes = check_buffer(buf, "buf")
    return int(lib.ud_inject_find_insn(ptr, nbytes)) if nbytes else -1


def _info_dict(info) -> dict:
    return {name: int(getattr(info, name)) for name, _ in ffi.typeof("ud_inject_info").fields}


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
    raise inject_error(rc, info, tid, outcome)


__all__ = ["INJECT_SUPPORTED", "InjectOutcome", "find_syscall_insn", "inject_syscalls"]
