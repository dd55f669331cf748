"""Which process and thread to inject into, and every refusal that can be decided without touching
it: not a PID, kernel thread, ourselves, zombie, 32-bit program, Yama ``ptrace_scope``, another
user, the /proc/PID/mem attach probe, already traced, seccomp; and, just before attaching, a thread
in uninterruptible sleep.

Everything is read through :class:`~udedup.host.fs.ProcFs` under the caller's root, so the checks
run on fake trees. Refusals raise :class:`~udedup.errors.InjectRefusedError` (exit code 9) with
``.reason`` set.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import (InjectRefusedError, KernelThreadError, ProcessAccessError, ProcessError,
                      ProcessNotFoundError, UnsupportedArchError, UsageError)
from ..host.fs import ProcFs, as_procfs
from ..host.parse import parse_status, status_has_cap, status_ids
from ..native import ptrace

CAP_SYS_PTRACE = 19
CAP_SYS_RESOURCE = 24

#: How long to wait for a thread in uninterruptible sleep (D) before refusing: PTRACE_INTERRUPT
#: cannot stop it until the sleep ends, and we could not let go of it meanwhile.
D_STATE_WAIT = 0.2

_YAMA_HINT = "see kernel.yama.ptrace_scope in Documentation/admin-guide/LSM/Yama.rst"


@dataclass(frozen=True)
class Target:
    """A process checked for injection, and the thread chosen to run the calls."""

    pid: int
    tid: int
    name: str
    own_child: bool           # we started it (its exit status belongs to our other waiter)
    has_cap_sys_resource: bool
    seccomp: int              # 0 none, 2 filter (forced)


@contextlib.contextmanager
def _access_refused(pid: int) -> Iterator[None]:
    # The one place where a /proc file we may not read becomes a refusal: for injection, not being
    # allowed to read the target's files means ptrace would be refused too (exit 9, reason ptrace).
    try:
        yield
    except ProcessAccessError as err:
        cause = err.__cause__
        path = getattr(cause, "filename", None) or f"/proc/{pid}"
        why = getattr(cause, "strerror", None) or "permission denied"
        raise InjectRefusedError(f"cannot read {path}: {why}; run as root",
                                 pid=pid, reason="ptrace") from err


def _as_pid(pid) -> int:
    if isinstance(pid, bool) or not isinstance(pid, (int, np.integer)):
        try:
            pid = int(str(pid), 10)
        except ValueError:
            raise UsageError(f"{pid!r} is not a PID: pass a process ID number") from None
    pid = int(pid)
    if pid <= 0:
        raise UsageError(f"{pid} is not a PID: process IDs are positive")
    return pid


def _yama_scope(fs: ProcFs) -> int:
    try:
        return int((fs.global_text("sys", "kernel", "yama", "ptrace_scope") or "0").strip())
    except ValueError:
        return 0  # no Yama


def _is_descendant(pid: int, ancestor: int, fs: ProcFs) -> bool:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        status = fs.maybe_status(pid)
        try:
            ppid = int(status.get("PPid", "0")) if status is not None else 0
        except ValueError:
            return False
        if ppid == ancestor:
            return True
        pid = ppid
    return False


def _check_ptrace_allowed(pid: int, status: dict, fs: ProcFs) -> None:
    # our own status is never unreadable in practice; if it were, assuming no capability only
    # refuses more, and the attach probe and PTRACE_SEIZE still have the last word
    me = parse_status(fs.global_text("self", "status") or "")
    capable = status_has_cap(me, CAP_SYS_PTRACE)
    scope = _yama_scope(fs)
    if scope >= 3:
        raise InjectRefusedError(
            f"kernel.yama.ptrace_scope=3 forbids ptrace on this machine until reboot: PID {pid} "
            f"cannot be injected ({_YAMA_HINT})", pid=pid, reason="ptrace")
    if scope == 2 and not capable:
        raise InjectRefusedError(
            f"kernel.yama.ptrace_scope=2 allows ptrace only with CAP_SYS_PTRACE: run as root "
            f"({_YAMA_HINT})", pid=pid, reason="ptrace")
    if scope == 1 and not capable and not _is_descendant(pid, os.getpid(), fs):
        raise InjectRefusedError(
            f"kernel.yama.ptrace_scope=1 allows ptrace only of our own descendants: PID {pid} is "
            f"not one; run as root or with CAP_SYS_PTRACE ({_YAMA_HINT})", pid=pid,
            reason="ptrace")
    my_uid, my_gid = os.getuid(), os.getgid()
    uids, gids = status_ids(status, "Uid")[:3], status_ids(status, "Gid")[:3]
    if not capable and (any(u != my_uid for u in uids) or any(g != my_gid for g in gids)):
        raise InjectRefusedError(
            f"PID {pid} belongs to another user (uids {uids}, gids {gids}): ptrace needs the same "
            "user or CAP_SYS_PTRACE; run as root", pid=pid, reason="ptrace")


def _probe_attach(pid: int, comm: str, fs: ProcFs) -> None:
    # Opening /proc/PID/mem takes the same ptrace access check as attaching (PTRACE_MODE_ATTACH),
    # and touches nothing: it catches what the checks above cannot see (a non-dumpable process,
    # another user namespace, an LSM).
    try:
        fd = fs.open(pid, "mem")
    except ProcessAccessError:
        raise InjectRefusedError(
            f"not allowed to ptrace PID {pid} ({comm}): it is not dumpable, lives in a user "
            "namespace we have no CAP_SYS_PTRACE in, or a security module forbids it",
            pid=pid, reason="ptrace") from None
    except ProcessNotFoundError:
        raise
    except ProcessError:
        return  # any other failure proves nothing either way: PTRACE_SEIZE decides
    os.close(fd)


def _elf_class(pid: int, fs: ProcFs) -> int | None:
    # the first five bytes of the executable only (EI_CLASS), not the whole file
    try:
        fd = fs.open(pid, "exe")
    except ProcessError:
        return None
    try:
        head = os.read(fd, 5)
    except OSError:
        return None
    finally:
        os.close(fd)
    return head[4] if len(head) == 5 and head[:4] == b"\x7fELF" else None


def _live_threads(tgid: int, fs: ProcFs) -> list[int]:
    live = []
    for tid in fs.tids(tgid):
        try:
            state = fs.stat(tgid, tid).state
        except ProcessNotFoundError:
            continue
        if state not in ("Z", "X"):
            live.append(tid)
    # the leader first: it is the natural choice when it is alive
    return sorted(live, key=lambda t: t != tgid)


def _thread_status(fs: ProcFs, tgid: int, tid: int) -> dict | None:
    try:
        return fs.status(tgid, tid)
    except ProcessNotFoundError:
        return None


def check_target(pid, force: bool = False, procfs: ProcFs | str = "/proc") -> Target:
    """Every refusal that can be decided without touching the process; returns the thread to use.

    ``pid`` may be a process or one of its thread IDs (that thread then runs the calls)."""
    pid = _as_pid(pid)
    if not ptrace.INJECT_SUPPORTED:
        raise UnsupportedArchError(f"injecting a syscall is not implemented for "
                                   f"{os.uname().machine} (x86_64 only)", pid=pid)
    fs = as_procfs(procfs)
    with _access_refused(pid):
        return _check(pid, force, fs)


def _check(pid: int, force: bool, fs: ProcFs) -> Target:
    st = fs.stat(pid)
    comm, state = st.comm, st.state
    if st.kernel_thread:
        raise KernelThreadError(f"PID {pid} ({comm}) is a kernel thread: it has no user memory "
                                "for KSM", pid=pid)
    status = fs.status(pid)
    tgid = int(status.get("Tgid", pid))
    if tgid == os.getpid():
        raise InjectRefusedError(
            f"PID {pid} is this process: use udedup.enable_process_merge() or "
            "MergeableBuffer instead of injecting into ourselves", pid=pid, reason="self")
    if state in ("Z", "X") and tgid == pid and not _live_threads(pid, fs):
        raise InjectRefusedError(f"PID {pid} ({comm}) is a zombie: it has exited and has no "
                                 "memory left", pid=pid, reason="zombie")
    if _elf_class(tgid, fs) == 1:
        raise UnsupportedArchError(f"PID {pid} ({comm}) is a 32-bit program: only 64-bit "
                                   "processes can be injected", pid=pid)
    _check_ptrace_allowed(pid, status, fs)
    _probe_attach(tgid, comm, fs)

    if tgid != pid and state in ("Z", "X"):
        raise InjectRefusedError(f"thread {pid} of PID {tgid} ({comm}) has exited: pass a live "
                                 "thread or the process ID", pid=pid, reason="zombie")
    statuses = {}
    for tid in _live_threads(tgid, fs):
        tstatus = _thread_status(fs, tgid, tid)
        if tstatus is None:  # the thread exited meanwhile
            continue
        statuses[tid] = tstatus
        tracer = int(tstatus.get("TracerPid", "0"))
        if tracer:
            tracer_comm = fs.comm(tracer, "?")
            raise InjectRefusedError(
                f"PID {pid} ({comm}) is already traced by PID {tracer} ({tracer_comm}), a debugger "
                "or another tracer: detach it first", pid=pid, reason="traced", tracer=tracer)
    threads = [pid] if tgid != pid else list(statuses)
    candidates = [(tid, statuses[tid]) for tid in threads if tid in statuses]
    if not candidates:
        raise InjectRefusedError(f"PID {pid} ({comm}) has no live thread left (exiting)",
                                 pid=pid, reason="zombie")
    # a thread without a seccomp filter is as good as any: prefer it, then the leader
    candidates.sort(key=lambda c: (int(c[1].get("Seccomp", "0")) != 0, c[0] != pid))
    tid, tstatus = candidates[0]
    seccomp = int(tstatus.get("Seccomp", "0"))
    if seccomp == 1:
        raise InjectRefusedError(
            f"PID {pid} ({comm}) runs in seccomp strict mode: any injected call kills it "
            "(--force cannot help)", pid=pid, reason="seccomp")
    if seccomp and not force:
        raise InjectRefusedError(
            f"PID {pid} ({comm}) runs under a seccomp filter: an injected prctl/madvise could "
            "kill it or be refused; pass --force (force=True) to try anyway", pid=pid,
            reason="seccomp")
    return Target(pid=tgid, tid=tid, name=comm,
                  own_child=(tid == tgid and int(status.get("PPid", "0")) == os.getpid()),
                  has_cap_sys_resource=status_has_cap(tstatus, CAP_SYS_RESOURCE), seccomp=seccomp)


def wait_not_d_state(target: Target, procfs: ProcFs | str = "/proc") -> None:
    """Return once the target's thread is out of uninterruptible sleep; refuse (reason ``busy``)
    after :data:`D_STATE_WAIT` seconds."""
    fs = as_procfs(procfs)
    deadline = time.monotonic() + D_STATE_WAIT
    with _access_refused(target.pid):
        while fs.stat(target.pid, target.tid).state == "D":
            if time.monotonic() >= deadline:
                raise InjectRefusedError(
                    f"thread {target.tid} of PID {target.pid} ({target.name}) is in "
                    "uninterruptible sleep (D): ptrace could not stop it until the sleep ends; "
                    "retry later", pid=target.pid, reason="busy")
            time.sleep(0.01)
