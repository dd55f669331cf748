"""Running injected calls in one target and what came of them: each attach goes through
:func:`udedup.native.ptrace.inject_syscalls` (``csrc/inject.c``: restarts of interrupted calls,
signals, rseq, stopped processes), each call becomes a :class:`SyscallRecord`, and the attaches of
one ``enable``/``disable`` add up to one :class:`InjectResult`.
"""
from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import asdict, dataclass, field

from ..errors import UdedupError
from ..host.fs import ProcFs
from ..native import ptrace
from .ranges import find_syscall_address
from .target import Target

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
    """What :func:`~udedup.inject.enable` / :func:`~udedup.inject.disable` did in one process."""

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

    _asdict = as_dict  # console.print_json


def _record(call: str, raw: int | None, restarts: int) -> SyscallRecord:
    if raw is None:
        return SyscallRecord(call, -1, errno_mod.EINTR, "not run", restarts)
    if raw < 0 and raw > -4096:
        return SyscallRecord(call, -1, -raw, os.strerror(-raw), restarts)
    return SyscallRecord(call, raw, 0, None, restarts)


class Session:
    """Accumulates what the attaches into one process did.

    ``calls`` passed to :meth:`run` are ``(text, nr, args)``: the call as the report shows it,
    the syscall number and its arguments."""

    def __init__(self, target: Target, keep_eintr: bool = False, rseq_check: bool = True,
                 procfs: ProcFs | str = "/proc"):
        self.target = target
        self.keep_eintr = keep_eintr
        self.rseq_check = rseq_check
        self.procfs = procfs
        self.calls: list[SyscallRecord] = []
        self.infos: list[dict] = []
        self.syscall_ip: int | None = None

    def run(self, calls: list[tuple[str, int, tuple]]) -> list[SyscallRecord]:
        """One attach running ``calls`` in order; their records (also kept for the result)."""
        if self.syscall_ip is None:
            self.syscall_ip = find_syscall_address(self.target.pid, self.procfs)
        try:
            out = ptrace.inject_syscalls(self.target.tid, self.syscall_ip,
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
        """Every attach so far as one :class:`InjectResult`."""
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
