"""Enable KSM inside a process that is already running, on a stock kernel.

The kernel lets a process opt only *itself* into KSM: ``PR_SET_MEMORY_MERGE`` acts on the caller
and ``process_madvise`` refuses ``MADV_MERGEABLE`` for other processes. So we make the target
execute the call, through ptrace (``csrc/inject.c`` explains how it stays invisible to the
program: restarts of interrupted calls, signals, rseq, stopped processes).

Modes:

- ``prctl``: ``prctl(PR_SET_MEMORY_MERGE, 1)`` in the target: every compatible mapping, now and
  later. Some kernels want CAP_SYS_RESOURCE *in the target* (6.18 does not): the call decides.
- ``madvise``: ``madvise(MADV_MERGEABLE)`` over ranges (default: every eligible anonymous private
  mapping). No privilege needed in the target; mappings created later need another pass.
- ``auto``: prctl when the kernel has PR_SET_MEMORY_MERGE (6.4+), else madvise; a prctl refused
  inside the target (EPERM) falls back to madvise too.

``disable`` undoes it: ``prctl(.., 0)`` (which also unregisters ranges the program madvised itself)
or ``MADV_UNMERGEABLE`` over the registered ranges.

Everything that can be checked is checked before the target is touched (:mod:`.target`): it
exists, is not a kernel thread or a zombie or ourselves, is 64-bit, is not traced, has no seccomp
filter (an injected call could kill it; ``force=True`` overrides a filter, never strict mode), and
ptrace is permitted (Yama ``ptrace_scope``, same user or CAP_SYS_PTRACE). Refusals raise
:class:`~udedup.errors.InjectRefusedError` (exit code 9) with ``.reason`` set.

Every /proc read happens under ``procfs`` and the KSM check under ``ksm_root``, both parameters.
"""
from __future__ import annotations

import errno as errno_mod
import os

from ..errors import InjectError, InjectRefusedError, NativeError, UdedupError, UsageError
from ..host.fs import ProcFs, as_procfs
from ..ksm import DEFAULT_ROOT, Ksm
from ..ksm.memory import MADV_MERGEABLE, MADV_UNMERGEABLE, PR_GET_MEMORY_MERGE, PR_SET_MEMORY_MERGE
from ..native import syscalls
from .ranges import check_ranges, eligible_ranges
from .session import InjectResult, Session
from .target import check_target, wait_not_d_state

MODES = ("auto", "prctl", "madvise")

# x86_64 syscall numbers (the only architecture the injector supports)
NR_MADVISE = 28
NR_PRCTL = 157


def _prctl_supported() -> bool:
    # asked of our own process: the kernel, not the target, decides whether the option exists
    try:
        syscalls.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0)
        return True
    except NativeError as err:
        return err.errno != errno_mod.EINVAL


def _merge_any(pid: int, fs: ProcFs) -> bool | None:
    """PR_SET_MEMORY_MERGE is on in ``pid`` (``ksm_merge_any``); None where the kernel does not
    say (no ksm_stat, or no such line)."""
    try:
        value = fs.ksm_stat(pid).get("ksm_merge_any")
    except UdedupError:
        return None
    return value if isinstance(value, bool) else None


def _madvise_calls(ranges, advice: int) -> list[tuple[str, int, tuple]]:
    name = "MADV_MERGEABLE" if advice == MADV_MERGEABLE else "MADV_UNMERGEABLE"
    return [(f"madvise({s:#x}, {e - s}, {name})", NR_MADVISE, (s, e - s, advice))
            for s, e in ranges]


def _prctl_call(on: int) -> list[tuple[str, int, tuple]]:
    return [(f"prctl(PR_SET_MEMORY_MERGE, {on})", NR_PRCTL, (PR_SET_MEMORY_MERGE, on, 0, 0, 0))]


def _apply(pid, action: str, mode: str, ranges, force: bool, procfs: ProcFs | str,
           ksm_root: str) -> InjectResult:
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if ranges is not None and mode == "prctl":
        raise UsageError("ranges apply to madvise only: prctl acts on the whole process; drop "
                         "the ranges or use mode='madvise'")
    fs = as_procfs(procfs)
    Ksm(root=ksm_root, procfs=fs.root)  # KsmUnavailableError on a kernel without KSM
    target = check_target(pid, force=force, procfs=fs)
    want_prctl = mode == "prctl" or (mode == "auto" and ranges is None)
    fallback = None
    if want_prctl:
        # No capability pre-check: whether PR_SET_MEMORY_MERGE needs CAP_SYS_RESOURCE depends on
        # the kernel (6.18 asks for none, measured), so the target's own call decides and an
        # EPERM there falls back to madvise in auto mode.
        if not _prctl_supported():
            fallback = (f"kernel {os.uname().release} has no PR_SET_MEMORY_MERGE (Linux 6.4+)")
        if fallback and mode == "prctl":
            raise InjectRefusedError(f"PID {target.pid} ({target.name}): cannot use prctl: "
                                     f"{fallback}; use --mode madvise", pid=target.pid,
                                     reason="kernel")
    merge_any = None
    if action == "disable":
        merge_any = _merge_any(target.pid, fs)
    if ranges is not None:
        ranges = check_ranges(target.pid, ranges, fs)
    wait_not_d_state(target, fs)
    session = Session(target, procfs=fs)
    on = 1 if action == "enable" else 0
    # prctl(.., 0) does nothing unless merge-any is on: then only madvise undoes registrations
    if want_prctl and not fallback and (action == "enable" or merge_any is not False):
        rec = session.run(_prctl_call(on))[0]
        if not rec.ok and mode == "prctl":
            raise InjectError(f"PID {target.pid} ({target.name}): {rec.call} failed inside the "
                              f"target: {rec.error}" + (
                                  " (this kernel wants CAP_SYS_RESOURCE in the target; "
                                  "use --mode madvise)"
                                  if rec.errno == errno_mod.EPERM else ""),
                              pid=target.pid, errno=rec.errno, result=session.result(
                                  action, "prctl", mode))
        if rec.ok and (action == "enable" or mode == "prctl"):
            return session.result(action, "prctl", mode)
        if not rec.ok:
            fallback = f"{rec.call} failed in the target: {rec.error}"
    elif mode == "prctl":  # disable, merge-any already off
        return session.result(action, "prctl", mode, note="PR_SET_MEMORY_MERGE was already off")
    note = None
    if ranges is None:
        ranges = eligible_ranges(target.pid, registered_only=(action == "disable"), procfs=fs)
        if action == "disable" and merge_any and fallback:
            note = ("the process has PR_SET_MEMORY_MERGE on: its new mappings will be registered "
                    "again; only prctl turns that off")
    advice = MADV_MERGEABLE if action == "enable" else MADV_UNMERGEABLE
    if ranges:
        records = session.run(_madvise_calls(ranges, advice))
        if not any(r.ok for r in records):
            why = records[0].error
            raise InjectError(f"PID {target.pid} ({target.name}): every madvise failed inside "
                              f"the target ({why})", pid=target.pid, errno=records[0].errno,
                              result=session.result(action, "madvise", mode, ranges, fallback))
    elif session.calls:  # disable: prctl(.., 0) already cleared every registration
        return session.result(action, "prctl", mode)
    elif note is None:
        note = ("nothing to do: no registered mapping" if action == "disable"
                else "no eligible anonymous private mapping")
    return session.result(action, "madvise", mode, ranges, fallback, note)


def enable(pid, mode: str = "auto", ranges=None, force: bool = False,
           procfs: ProcFs | str = "/proc", ksm_root: str = DEFAULT_ROOT) -> InjectResult:
    """Register ``pid``'s memory with KSM from inside the process (see the module docstring).

    ``ranges``: (start, end) address pairs, page-aligned, for madvise (default: every eligible
    anonymous private mapping). ``force``: inject even under a seccomp filter. ``procfs``: the
    /proc every check and mapping read uses; ``ksm_root``: the KSM sysfs directory that must
    exist."""
    return _apply(pid, "enable", mode, ranges, force, procfs, ksm_root)


def disable(pid, mode: str = "auto", ranges=None, force: bool = False,
            procfs: ProcFs | str = "/proc", ksm_root: str = DEFAULT_ROOT) -> InjectResult:
    """Undo :func:`enable`: ``prctl(PR_SET_MEMORY_MERGE, 0)`` or ``MADV_UNMERGEABLE`` over the
    registered ranges (or ``ranges``). Unmerging copies merged pages back: it needs memory."""
    return _apply(pid, "disable", mode, ranges, force, procfs, ksm_root)
