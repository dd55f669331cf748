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

Everything that can be checked is checked before the target is touched: it exists, is not a
kernel thread or a zombie or ourselves, is 64-bit, is not traced, has no seccomp filter (an
injected call could kill it; ``force=True`` overrides a filter, never strict mode), and ptrace is
permitted (Yama ``ptrace_scope``, same user or CAP_SYS_PTRACE). Refusals raise
:class:`~udedup.errors.InjectRefusedError` (exit code 9) with ``.reason`` set.
"""
from __future__ import annotations

import errno as errno_mod
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..native import pages
from ..host import procmem
from ..errors import (InjectError, InjectRefusedError, KernelThreadError, KsmUnavailableError,
                     NativeError, ProcessNotFoundError, UdedupError, UnsupportedArchError,
                     UsageError)
from ..ksm.memory import MADV_MERGEABLE, MADV_UNMERGEABLE, PR_GET_MEMORY_MERGE, PR_SET_MEMORY_MERGE

log = logging.getLogger(__name__)

MODES = ("auto", "prctl", "madvise")

# x86_64 syscall numbers (the only architecture the injector supports)
NR_MADVISE = 28
NR_PRCTL = 157

CAP_SYS_PTRACE = 19
CAP_SYS_RESOURCE = 24
KSM_SYSFS = "/sys/kernel/mm/ksm"

#: How long to wait for a thread in uninterruptible sleep (D) before refusing: PTRACE_INTERRUPT
#: cannot stop it until the sleep ends, and we could not let go of it meanwhile.
D_STATE_WAIT = 0.2

# Syscall names for the report of what the thread was doing when it was stopped (x86_64).
_SYSCALL_NAMES = {0: "read", 1: "write", 7: "poll", 23: "select", 34: "pause", 35: "nanosleep",
                  61: "wait4", 202: "futex", 230: "clock_nanosleep", 232: "epoll_wait",
                  270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 441: "epoll_pwait2",
                  43: "accept", 288: "accept4", 45: "recvfrom", 47: "recvmsg", 128:
                  "rt_sigtimedwait", 130: "rt_sigsuspend", 219: "restart_syscall"}


@dataclass(frozen=True)
class SyscallRecord:
    """One syscall run inside the target."""

    call: str                 # as a C call, e.g. "madvise(0x7f0000000000, 4194304, MADV_MERGEABLE)"
    result: int               # return value; -1 on failure
    errno: int = 0            # 0 on success
    error: str | None = None  # strerror of errno
    restarts: int = 0         # cut short by a signal in the target and run again

    @property
    def ok(self) -> bool:
        return self.errno == 0


@dataclass(frozen=True)
class InjectResult:
    """What :func:`enable` / :func:`disable` did in one process."""

    pid: int
    tid: int                            # the thread that ran the calls
    name: str                           # the process's comm
    action: str                         # "enable" | "disable"
    mode: str                           # "prctl" | "madvise": what was done in the end
    requested_mode: str                 # what was asked ("auto" included)
    ranges: tuple = ()                  # madvise ranges, (start, end) pairs
    calls: tuple = ()                   # SyscallRecord per call, in order (all attempts)
    fallback: str | None = None         # why auto mode left prctl for madvise
    note: str | None = None             # something the operator should know
    was_in_syscall: str | None = None   # what the thread was blocked in when stopped
    group_stopped: bool = False         # the process was stopped (SIGSTOP) and still is
    stops: int = 0                      # ptrace stops, all attaches together
    signals_forwarded: int = 0          # signals that arrived meanwhile, passed on unchanged
    retries: int = 0
    rseq_aborts: int = 0
    eintr_fixup: bool = False
    elapsed_s: float = 0.0              # the target was held this long (sum over attaches)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def bytes(self) -> int:
        return sum(end - start for start, end in self.ranges)

    @property
    def ok(self) -> bool:
        """The last step succeeded (prctl), or every madvise did except ranges that vanished."""
        mine = [c for c in self.calls if c.call.startswith(self.mode)]
        if not mine:
            return self.mode == "madvise"  # nothing eligible to register
        if self.mode == "prctl":
            return mine[-1].ok
        return all(c.ok or c.errno == errno_mod.ENOMEM for c in mine)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["ranges"] = [[hex(s), hex(e)] for s, e in self.ranges]
        d["bytes"] = self.bytes
        d["ok"] = self.ok
        return d

    _asdict = as_dict  # commands._util.print_json


# --- /proc ---------------------------------------------------------------------------------------
def _read_text(path: str, pid: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessNotFoundError(f"no process with PID {pid} (it does not exist or has exited)",
                                   pid=pid) from None
    except PermissionError as err:
        raise InjectRefusedError(f"cannot read {path}: {err.strerror}; run as root",
                                 pid=pid, reason="ptrace") from err


def parse_status(text: str) -> dict[str, str]:
    """/proc/PID/status as {field: value}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _ids(status: dict, key: str) -> list[int]:
    return [int(x) for x in status.get(key, "").split()]


def _has_cap(status: dict, cap: int) -> bool:
    try:
        return bool(int(status.get("CapEff", "0"), 16) >> cap & 1)
    except ValueError:
        return False


@dataclass(frozen=True)
class Target:
    """A process checked for injection, and the thread chosen to run the calls."""

    pid: int
    tid: int
    name: str
    own_child: bool           # we started it (its exit status belongs to our other waiter)
    has_cap_sys_resource: bool
    seccomp: int              # 0 none, 2 filter (forced)


def _stat_fields(procfs: str, pid: int, tid: int | None = None) -> tuple[str, str, list[str]]:
    path = os.path.join(procfs, str(pid), "stat") if tid is None else \
        os.path.join(procfs, str(pid), "task", str(tid), "stat")
    text = _read_text(path, pid)
    comm = text.split("(", 1)[-1].rsplit(")", 1)[0]
    rest = text.rsplit(")", 1)[-1].split()
    return comm, rest[0], rest


def _yama_scope(procfs: str) -> int:
    try:
        with open(os.path.join(procfs, "sys/kernel/yama/ptrace_scope")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0  # no Yama


def _is_descendant(pid: int, ancestor: int, procfs: str) -> bool:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            ppid = int(parse_status(_read_text(os.path.join(procfs, str(pid), "status"),
                                               pid)).get("PPid", "0"))
        except (UdedupError, ValueError):
            return False
        if ppid == ancestor:
            return True
        pid = ppid
    return False


def _check_ptrace_allowed(pid: int, status: dict, procfs: str) -> None:
    me = parse_status(_read_text(os.path.join(procfs, "self", "status"), os.getpid()))
    capable = _has_cap(me, CAP_SYS_PTRACE)
    scope = _yama_scope(procfs)
    hint = "see kernel.yama.ptrace_scope in Documentation/admin-guide/LSM/Yama.rst"
    if scope >= 3:
        raise InjectRefusedError(
            f"kernel.yama.ptrace_scope=3 forbids ptrace on this machine until reboot: PID {pid} "
            f"cannot be injected ({hint})", pid=pid, reason="ptrace")
    if scope == 2 and not capable:
        raise InjectRefusedError(
            f"kernel.yama.ptrace_scope=2 allows ptrace only with CAP_SYS_PTRACE: run as root "
            f"({hint})", pid=pid, reason="ptrace")
    if scope == 1 and not capable and not _is_descendant(pid, os.getpid(), procfs):
        raise InjectRefusedError(
            f"kernel.yama.ptrace_scope=1 allows ptrace only of our own descendants: PID {pid} is "
            f"not one; run as root or with CAP_SYS_PTRACE ({hint})", pid=pid, reason="ptrace")
    my_uid, my_gid = os.getuid(), os.getgid()
    uids, gids = _ids(status, "Uid")[:3], _ids(status, "Gid")[:3]
    if not capable and (any(u != my_uid for u in uids) or any(g != my_gid for g in gids)):
        raise InjectRefusedError(
            f"PID {pid} belongs to another user (uids {uids}, gids {gids}): ptrace needs the same "
            "user or CAP_SYS_PTRACE; run as root", pid=pid, reason="ptrace")


def _probe_attach(pid: int, comm: str, procfs: str) -> None:
    # Opening /proc/PID/mem takes the same ptrace access check as attaching (PTRACE_MODE_ATTACH),
    # and touches nothing: it catches what the checks above cannot see (a non-dumpable process,
    # another user namespace, an LSM).
    try:
        fd = os.open(os.path.join(procfs, str(pid), "mem"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessNotFoundError(f"no process with PID {pid} (it has exited)", pid=pid) from None
    except PermissionError:
        raise InjectRefusedError(
            f"not allowed to ptrace PID {pid} ({comm}): it is not dumpable, lives in a user "
            "namespace we have no CAP_SYS_PTRACE in, or a security module forbids it",
            pid=pid, reason="ptrace") from None
    except OSError:
        return
    os.close(fd)


def _elf_class(pid: int, procfs: str) -> int | None:
    try:
        with open(os.path.join(procfs, str(pid), "exe"), "rb") as f:
            head = f.read(5)
    except OSError:
        return None
    return head[4] if len(head) == 5 and head[:4] == b"\x7fELF" else None


def check_target(pid, force: bool = False, procfs: str = "/proc") -> Target:
    """Every refusal that can be decided without touching the process; returns the thread to use.

    ``pid`` may be a process or one of its thread IDs (that thread then runs the calls)."""
    if isinstance(pid, bool) or not isinstance(pid, (int, np.integer)):
        try:
            pid = int(str(pid), 10)
        except ValueError:
            raise UsageError(f"{pid!r} is not a PID: pass a process ID number") from None
    pid = int(pid)
    if pid <= 0:
        raise UsageError(f"{pid} is not a PID: process IDs are positive")
    if not pages.INJECT_SUPPORTED:
        raise UnsupportedArchError(f"injecting a syscall is not implemented for "
                                   f"{os.uname().machine} (x86_64 only)", pid=pid)
    comm, state, fields = _stat_fields(procfs, pid)
    if int(fields[6]) & procmem.PF_KTHREAD:
        raise KernelThreadError(f"PID {pid} ({comm}) is a kernel thread: it has no user memory "
                                "for KSM", pid=pid)
    status = parse_status(_read_text(os.path.join(procfs, str(pid), "status"), pid))
    tgid = int(status.get("Tgid", pid))
    if tgid == os.getpid():
        raise InjectRefusedError(
            f"PID {pid} is this process: use udedup.enable_process_merge() or "
            "MergeableBuffer instead of injecting into ourselves", pid=pid, reason="self")
    if state in ("Z", "X") and tgid == pid and not _live_threads(pid, procfs):
        raise InjectRefusedError(f"PID {pid} ({comm}) is a zombie: it has exited and has no "
                                 "memory left", pid=pid, reason="zombie")
    if _elf_class(tgid, procfs) == 1:
        raise UnsupportedArchError(f"PID {pid} ({comm}) is a 32-bit program: only 64-bit "
                                   "processes can be injected", pid=pid)
    _check_ptrace_allowed(pid, status, procfs)
    _probe_attach(tgid, comm, procfs)

    if tgid != pid and state in ("Z", "X"):
        raise InjectRefusedError(f"thread {pid} of PID {tgid} ({comm}) has exited: pass a live "
                                 "thread or the process ID", pid=pid, reason="zombie")
    statuses = {}
    for tid in _live_threads(tgid, procfs):
        tstatus = _thread_status(procfs, tgid, tid)
        if tstatus is None:  # the thread exited meanwhile
            continue
        statuses[tid] = tstatus
        tracer = int(tstatus.get("TracerPid", "0"))
        if tracer:
            tracer_comm = procmem.comm(tracer, procfs, "?")
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
                  has_cap_sys_resource=_has_cap(tstatus, CAP_SYS_RESOURCE), seccomp=seccomp)


def _live_threads(tgid: int, procfs: str) -> list[int]:
    try:
        tids = sorted(int(t) for t in os.listdir(os.path.join(procfs, str(tgid), "task")))
    except FileNotFoundError:
        return []
    live = []
    for tid in tids:
        try:
            _, state, _ = _stat_fields(procfs, tgid, tid)
        except ProcessNotFoundError:
            continue
        if state not in ("Z", "X"):
            live.append(tid)
    # the leader first: it is the natural choice when it is alive
    return sorted(live, key=lambda t: t != tgid)


def _thread_status(procfs: str, tgid: int, tid: int) -> dict | None:
    try:
        return parse_status(_read_text(os.path.join(procfs, str(tgid), "task", str(tid), "status"),
                                       tgid))
    except ProcessNotFoundError:
        return None


def _wait_not_d_state(target: Target, procfs: str) -> None:
    deadline = time.monotonic() + D_STATE_WAIT
    while True:
        _, state, _ = _stat_fields(procfs, target.pid, target.tid)
        if state != "D":
            return
        if time.monotonic() >= deadline:
            raise InjectRefusedError(
                f"thread {target.tid} of PID {target.pid} ({target.name}) is in uninterruptible "
                "sleep (D): ptrace could not stop it until the sleep ends; retry later",
                pid=target.pid, reason="busy")
        time.sleep(0.01)


# --- what to run ----------------------------------------------------------------------------------
def _prctl_supported() -> bool:
    try:
        pages.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0)
        return True
    except NativeError as err:
        return err.errno != errno_mod.EINVAL


def _merge_ranges(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def _eligible_ranges(pid: int, registered_only: bool) -> list[tuple[int, int]]:
    maps = procmem.read_mappings(pid)
    if registered_only:
        chosen = [(m.start, m.end) for m in maps if m.registered]
    else:
        chosen = [(m.start, m.end) for m in maps if m.eligible and m.kind == "anon"]
    return _merge_ranges(chosen)


def _check_ranges(pid: int, ranges) -> list[tuple[int, int]]:
    ps = pages.PAGE_SIZE
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
    clean = _merge_ranges(clean)
    maps = procmem.read_mappings(pid)
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


def find_syscall_address(pid: int) -> int:
    """Address of an existing ``syscall`` instruction in the process's executable mappings.

    The vdso first (always there, never unmapped by ordinary programs), then libc, then any other
    executable file mapping."""
    try:  # maps, not smaps: only addresses and permissions are needed, and it is much cheaper
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = procmem.parse_smaps(f.read().decode("utf-8", "replace"))
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessNotFoundError(f"no process with PID {pid} (it has exited)", pid=pid) from None
    execs = [m for m in maps if "x" in m.perms and m.path not in ("[vsyscall]", "[uprobes]")]
    execs.sort(key=lambda m: (m.path != "[vdso]", "libc" not in m.path, m.start))
    for m in execs:
        chunk = 1 << 20
        for base in range(m.start, m.end, chunk):
            size = min(chunk, m.end - base)
            buf = bytearray(size)
            got, err = pages.remote_readv(pid, np.array([base], dtype=np.uint64),
                                          np.array([size], dtype=np.uint64), buf)
            if err == errno_mod.ESRCH:
                raise ProcessNotFoundError(f"PID {pid} exited", pid=pid)
            if err == errno_mod.EPERM:
                raise InjectRefusedError(f"not allowed to read the memory of PID {pid}: run as "
                                         "root", pid=pid, reason="ptrace")
            off = pages.find_syscall_insn(memoryview(buf)[:got])
            if off >= 0:
                return base + off
    raise InjectError(f"found no syscall instruction in the executable mappings of PID {pid}",
                      pid=pid)


def _record(call: str, raw: int | None, restarts: int) -> SyscallRecord:
    if raw is None:
        return SyscallRecord(call, -1, errno_mod.EINTR, "not run", restarts)
    if raw < 0 and raw > -4096:
        return SyscallRecord(call, -1, -raw, os.strerror(-raw), restarts)
    return SyscallRecord(call, raw, 0, None, restarts)


class _Session:
    """Accumulates what the attaches into one process did."""

    def __init__(self, target: Target, keep_eintr: bool, rseq_check: bool):
        self.target = target
        self.keep_eintr = keep_eintr
        self.rseq_check = rseq_check
        self.calls: list[SyscallRecord] = []
        self.infos: list[dict] = []
        self.syscall_ip: int | None = None

    def run(self, calls: list[tuple[str, int, tuple]]) -> list[SyscallRecord]:
        if self.syscall_ip is None:
            self.syscall_ip = find_syscall_address(self.target.pid)
        try:
            out = pages.inject_syscalls(self.target.tid, self.syscall_ip,
                                        [(nr, args) for _, nr, args in calls],
                                        own_child=self.target.own_child,
                                        keep_eintr=self.keep_eintr, rseq_check=self.rseq_check)
        except UdedupError as err:
            outcome = getattr(err, "outcome", None)
            if outcome is not None:
                self.infos.append(outcome.info)
            err.pid = self.target.pid
            err.message = f"PID {self.target.pid} ({self.target.name}): {err.message}"
            raise
        self.infos.append(out.info)
        records = [_record(text, raw, rs) for (text, _, _), raw, rs in
                   zip(calls, out.results, out.restarts)]
        self.calls.extend(records)
        return records

    def result(self, action: str, mode: str, requested: str, ranges=(), fallback=None,
               note=None) -> InjectResult:
        first = self.infos[0] if self.infos else {}
        was = None
        if first and first.get("saved_orig_rax", -1) >= 0:
            nr = first["saved_orig_rax"]
            was = _SYSCALL_NAMES.get(nr, f"syscall {nr}")
        return InjectResult(
            pid=self.target.pid, tid=self.target.tid, name=self.target.name, action=action,
            mode=mode,
            requested_mode=requested, ranges=tuple(ranges), calls=tuple(self.calls),
            fallback=fallback, note=note, was_in_syscall=was,
            group_stopped=bool(first.get("group_stop", 0)),
            stops=sum(i["stops"] for i in self.infos),
            signals_forwarded=sum(i["signals_forwarded"] for i in self.infos),
            retries=sum(i["retries"] for i in self.infos),
            rseq_aborts=sum(i["rseq_aborts"] for i in self.infos),
            eintr_fixup=any(i["eintr_fixup"] for i in self.infos),
            elapsed_s=sum(i["elapsed_ns"] for i in self.infos) / 1e9,
            extra={"infos": list(self.infos), "syscall_ip": self.syscall_ip})


def _madvise_calls(ranges, advice: int) -> list[tuple[str, int, tuple]]:
    name = "MADV_MERGEABLE" if advice == MADV_MERGEABLE else "MADV_UNMERGEABLE"
    return [(f"madvise({s:#x}, {e - s}, {name})", NR_MADVISE, (s, e - s, advice))
            for s, e in ranges]


def _prctl_call(on: int) -> list[tuple[str, int, tuple]]:
    return [(f"prctl(PR_SET_MEMORY_MERGE, {on})", NR_PRCTL, (PR_SET_MEMORY_MERGE, on, 0, 0, 0))]


def _apply(pid, action: str, mode: str, ranges, force: bool, keep_eintr: bool = False,
           rseq_check: bool = True) -> InjectResult:
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if ranges is not None and mode == "prctl":
        raise UsageError("ranges apply to madvise only: prctl acts on the whole process; drop "
                         "the ranges or use mode='madvise'")
    if not os.path.isdir(KSM_SYSFS):
        raise KsmUnavailableError(f"{KSM_SYSFS} does not exist: this kernel has no KSM "
                                  "(CONFIG_KSM), nothing to enable")
    target = check_target(pid, force=force)
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
        merge_any = _merge_any(target.pid)
    if ranges is not None:
        ranges = _check_ranges(target.pid, ranges)
    _wait_not_d_state(target, "/proc")
    session = _Session(target, keep_eintr, rseq_check)
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
        ranges = _eligible_ranges(target.pid, registered_only=(action == "disable"))
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


def _merge_any(pid: int) -> bool | None:
    try:
        value = procmem.ksm_stat(pid).get("ksm_merge_any")
    except UdedupError:
        return None
    return None if value is None else value == "yes"


def enable(pid, mode: str = "auto", ranges=None, force: bool = False) -> InjectResult:
    """Register ``pid``'s memory with KSM from inside the process (see the module docstring).

    ``ranges``: (start, end) address pairs, page-aligned, for madvise (default: every eligible
    anonymous private mapping). ``force``: inject even under a seccomp filter."""
    return _apply(pid, "enable", mode, ranges, force)


def disable(pid, mode: str = "auto", ranges=None, force: bool = False) -> InjectResult:
    """Undo :func:`enable`: ``prctl(PR_SET_MEMORY_MERGE, 0)`` or ``MADV_UNMERGEABLE`` over the
    registered ranges (or ``ranges``). Unmerging copies merged pages back: it needs memory."""
    return _apply(pid, "disable", mode, ranges, force)
