"""The one filesystem layer: every read of /proc goes through :class:`ProcFs`, every sysfs knob
read and write through :class:`SysFs`, and errno becomes a :mod:`udedup.errors` exception in the two
tables here and nowhere else.

Roots are parameters (``ProcFs("/tmp/fake/proc")``), so unit tests run on fake trees (psutil's
``PROCFS_PATH``, oomd's ``util/Fs``). Readers that walk many processes use the ``maybe_*`` methods,
which answer None for a process that exited or cannot be read: a walk skips those and goes on.
"""
from __future__ import annotations

import errno as _errno
import os

from ..errors import (KernelThreadError, KsmBusyError, KsmError, KsmPermissionError,
                      KsmUnavailableError, KsmValueError, ProcessAccessError, ProcessError,
                      ProcessNotFoundError)
from . import parse

DEFAULT_PROCFS = "/proc"
DEFAULT_SYSFS = "/sys"


# --- the errno tables -----------------------------------------------------------------------------
def process_error(err: OSError, pid, what: str) -> ProcessError:
    """The matching :class:`ProcessError` for an OSError reading ``what`` of ``pid`` (the caller
    does ``raise ... from err``). ``pid=None``: ``what`` is a machine-wide file such as
    ``kpageflags`` (no process to be missing: a missing file is a kernel without it)."""
    if pid is None:
        return _machine_file_error(err, what)
    if isinstance(err, (FileNotFoundError, ProcessLookupError)) or err.errno == _errno.ESRCH:
        return ProcessNotFoundError(f"no process with PID {pid} (it does not exist or has exited)",
                                    pid=pid)
    if isinstance(err, PermissionError):
        return ProcessAccessError(
            f"not allowed to read {what} of PID {pid}: run as root or as the process's owner "
            "(ptrace access check; see kernel.yama.ptrace_scope)", pid=pid)
    return ProcessError(f"cannot read {what} of PID {pid}: {os.strerror(err.errno or 0)}",
                        pid=pid, errno=err.errno)


def _machine_file_error(err: OSError, what: str) -> ProcessError:
    if isinstance(err, PermissionError):
        return ProcessAccessError(f"not allowed to read /proc/{what}: it needs root "
                                  "(CAP_SYS_ADMIN)", pid=None, errno=err.errno)
    if isinstance(err, FileNotFoundError):
        return ProcessError(f"/proc/{what} does not exist: this kernel was built without it "
                            "(CONFIG_PROC_PAGE_MONITOR)", pid=None, errno=err.errno)
    return ProcessError(f"cannot read /proc/{what}: {os.strerror(err.errno or 0)}",
                        pid=None, errno=err.errno)


def knob_error(err: OSError, *, knob: str, path: str, value=None, action: str = "write") -> KsmError:
    """The matching :class:`KsmError` for an OSError on a sysfs knob (caller does ``raise ... from``);
    a ``thp.*`` knob is named a THP knob in the message."""
    code = err.errno
    shown = "" if value is None else f"={value}"
    family = "THP" if str(knob).startswith("thp.") else "KSM"
    if code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        if code == _errno.EROFS:
            why = "sysfs is mounted read-only here (a container?)"
        else:
            why = (f"writing {family} knobs needs root (the files are root-owned, mode 0644); run "
                   "as root or with sudo")
        return KsmPermissionError(f"cannot {action} {knob}{shown} ({path}): {why}",
                                  knob=knob, path=path, value=value, errno=code)
    if code == _errno.EBUSY:
        return KsmBusyError(
            f"the kernel refused {knob}{shown} (busy): it can change only while no page is merged; "
            "unmerge first ('udedup unmerge', or allow_unmerge=True / --allow-unmerge)",
            knob=knob, path=path, value=value, errno=code)
    if code in (_errno.EINVAL, _errno.ERANGE):
        return KsmValueError(f"the kernel rejected {knob}{shown}: invalid value"
                             + (" (pages_to_scan cannot be set while advisor_mode is scan-time)"
                                if knob == "pages_to_scan" else ""),
                             knob=knob, path=path, value=value, errno=code)
    if code in (_errno.ENOENT, _errno.ENOTDIR):
        return KsmUnavailableError(f"{path} does not exist: this kernel has no {family} knob {knob!r}",
                                   knob=knob, path=path, value=value, errno=code)
    if code == _errno.ENOMEM:
        return KsmError(f"{action} {knob}{shown} failed: out of memory (unmerging needs a free page "
                        "for every merged mapping)", knob=knob, path=path, value=value, errno=code)
    return KsmError(f"cannot {action} {knob}{shown} ({path}): {os.strerror(code or 0)}",
                    knob=knob, path=path, value=value, errno=code)


def check_pid(pid) -> int:
    """``pid`` as a positive int, or ProcessNotFoundError saying what was wrong with it."""
    if isinstance(pid, bool):
        raise ProcessNotFoundError(f"{pid!r} is not a PID: pass a process ID number", pid=pid)
    try:
        value = int(pid)
    except (TypeError, ValueError):
        raise ProcessNotFoundError(f"{pid!r} is not a PID: pass a process ID number",
                                   pid=pid) from None
    if value <= 0:
        raise ProcessNotFoundError(f"{value} is not a PID: process IDs are positive", pid=value)
    return value


# --- /proc ----------------------------------------------------------------------------------------
class ProcFs:
    """/proc under ``root``. Methods taking ``pid`` read /proc/PID/...; ``tid`` reads that thread's
    /proc/PID/task/TID/... file instead."""

    def __init__(self, root: str = DEFAULT_PROCFS):
        self.root = root

    def __repr__(self) -> str:
        return f"ProcFs({self.root!r})"

    def path(self, pid=None, *names, tid=None) -> str:
        parts = [self.root]
        if pid is not None:
            parts.append(str(int(pid)))
            if tid is not None:
                parts += ["task", str(int(tid))]
        return os.path.join(*parts, *names)

    # raw reads
    def read_bytes(self, pid, name: str, tid=None, what: str | None = None) -> bytes:
        try:
            with open(self.path(pid, name, tid=tid), "rb") as f:
                return f.read()
        except OSError as err:
            raise process_error(err, pid, what or name) from err

    def read_text(self, pid, name: str, tid=None, what: str | None = None) -> str:
        return self.read_bytes(pid, name, tid, what).decode("utf-8", "replace")

    def maybe_bytes(self, pid, name: str, tid=None) -> bytes | None:
        """The file's bytes, or None when it cannot be read (the process exited, no permission)."""
        try:
            with open(self.path(pid, name, tid=tid), "rb") as f:
                return f.read()
        except OSError:
            return None

    def maybe_text(self, pid, name: str, tid=None) -> str | None:
        raw = self.maybe_bytes(pid, name, tid)
        return None if raw is None else raw.decode("utf-8", "replace")

    def open(self, pid, name: str, flags: int = os.O_RDONLY) -> int:
        """A file descriptor (close-on-exec) on /proc/PID/NAME, e.g. pagemap."""
        try:
            return os.open(self.path(pid, name), flags | os.O_CLOEXEC)
        except OSError as err:
            raise process_error(err, pid, name) from err

    def open_global(self, *names: str) -> int:
        """A file descriptor (close-on-exec) on a file that is not under a PID: the machine-wide
        ``kpageflags``/``kpagecount``, or ``self``/``pagemap`` for this process's own probes."""
        try:
            return os.open(os.path.join(self.root, *names), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise process_error(err, None, "/".join(names)) from err

    def readlink(self, pid, name: str) -> str | None:
        try:
            return os.readlink(self.path(pid, name))
        except OSError:
            return None

    def exists(self, pid) -> bool:
        return os.path.isdir(self.path(pid))

    def global_text(self, *names: str) -> str | None:
        """A machine-wide file such as ``meminfo`` or ``pressure/memory``; None if unreadable."""
        try:
            with open(os.path.join(self.root, *names), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return None

    # listings
    def pids(self) -> list[int]:
        """Every process ID under the root, in directory order."""
        try:
            entries = os.listdir(self.root)
        except OSError as err:
            raise ProcessAccessError(f"cannot list {self.root}: {err.strerror}") from err
        return [int(e) for e in entries if e.isdigit()]

    def tids(self, pid) -> list[int]:
        """Thread IDs of ``pid``, sorted ([] once it has exited)."""
        try:
            return sorted(int(t) for t in os.listdir(self.path(pid, "task")))
        except OSError:
            return []

    def descendants(self, pid) -> list[int]:
        """Every process below ``pid`` (children, their children...), from each one's ppid."""
        children: dict[int, list[int]] = {}
        for p in self.pids():
            st = self.maybe_stat(p)
            if st is not None:
                children.setdefault(st.ppid, []).append(p)
        found, todo = [], list(children.get(int(pid), ()))
        while todo:
            p = todo.pop()
            found.append(p)
            todo.extend(children.get(p, ()))
        return found

    # parsed files
    def stat(self, pid, tid=None) -> parse.ProcStat:
        text = self.read_text(pid, "stat", tid)
        try:
            return parse.parse_stat(text)
        except ValueError:   # empty or truncated: the task is being torn down
            raise ProcessNotFoundError(f"PID {pid} is exiting: its stat is gone", pid=pid) from None

    def maybe_stat(self, pid, tid=None) -> parse.ProcStat | None:
        text = self.maybe_text(pid, "stat", tid)
        try:
            return parse.parse_stat(text) if text else None
        except ValueError:
            return None

    def status(self, pid, tid=None) -> dict[str, str]:
        return parse.parse_status(self.read_text(pid, "status", tid))

    def maybe_status(self, pid, tid=None) -> dict[str, str] | None:
        text = self.maybe_text(pid, "status", tid)
        return None if text is None else parse.parse_status(text)

    def comm(self, pid, default: str | None = None) -> str | None:
        """The command name of ``pid``, or ``default`` when it cannot be read."""
        text = self.maybe_text(pid, "comm")
        return default if text is None else text.strip()

    def cmdline(self, pid) -> str:
        return parse.parse_cmdline(self.maybe_bytes(pid, "cmdline") or b"")

    def cgroup(self, pid) -> str:
        return parse.parse_cgroup(self.maybe_text(pid, "cgroup") or "")

    def ksm_stat(self, pid) -> dict[str, object]:
        """/proc/PID/ksm_stat parsed (:func:`parse.parse_ksm_stat`); ``{}`` where the kernel has no
        such file (before 6.1, or without CONFIG_KSM). ProcessNotFoundError once ``pid`` is gone."""
        try:
            with open(self.path(pid, "ksm_stat"), "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            if not self.exists(pid):
                raise ProcessNotFoundError(f"no process with PID {pid} (it does not exist or has "
                                           "exited)", pid=pid) from None
            return {}
        except OSError as err:
            raise process_error(err, pid, "ksm_stat") from err
        return parse.parse_ksm_stat(text)

    def maybe_ksm_stat(self, pid) -> dict[str, object]:
        return parse.parse_ksm_stat(self.maybe_text(pid, "ksm_stat") or "")

    def meminfo(self) -> dict[str, int]:
        return parse.parse_meminfo(self.global_text("meminfo") or "")

    def pressure(self, resource: str = "memory") -> dict[str, dict[str, float]] | None:
        text = self.global_text("pressure", resource)
        return None if text is None else parse.parse_psi(text)

    def check_process(self, pid) -> parse.ProcStat:
        """The stat of ``pid`` if it is a live user process; else ProcessNotFoundError (no such
        process, a zombie) or KernelThreadError, each one line."""
        pid = check_pid(pid)
        st = self.stat(pid)
        if st.kernel_thread:
            raise KernelThreadError(f"PID {pid} ({st.comm}) is a kernel thread: it has no user "
                                    "memory to scan or merge", pid=pid)
        if st.exited:
            raise ProcessNotFoundError(f"PID {pid} has exited (zombie): its memory is gone", pid=pid)
        return st


# --- sysfs ----------------------------------------------------------------------------------------
class SysFs:
    """Knob files under ``root``: one ``read`` and one ``write(2)`` per value, errno through
    :func:`knob_error`. ``knob`` names the value in messages (``run``, ``thp.enabled``)."""

    def __init__(self, root: str = DEFAULT_SYSFS):
        self.root = root

    def __repr__(self) -> str:
        return f"SysFs({self.root!r})"

    def path(self, *names: str) -> str:
        return os.path.join(self.root, *names)

    def read(self, path: str, knob: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as err:
            raise knob_error(err, knob=knob, path=path, action="read") from err

    def write(self, path: str, text: str, knob: str, shown=None) -> None:
        """One write(2) of ``text``: sysfs parses the value from a single call and returns the
        kernel's error from it."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC: no-op on sysfs, right on fakes
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise knob_error(err, knob=knob, path=path, value=shown or text) from err

    def listdir(self, path: str, knob: str = "(directory)") -> list[tuple[str, bool]]:
        """``(name, writable)`` of the regular files in ``path``."""
        try:
            with os.scandir(path) as it:
                return [(e.name, bool(e.stat().st_mode & 0o222)) for e in it if e.is_file()]
        except OSError as err:
            raise knob_error(err, knob=knob, path=path, action="list") from err


def as_procfs(procfs: "ProcFs | str | None") -> ProcFs:
    """Callers pass a root path (the public API's ``procfs="/proc"``) or a :class:`ProcFs`."""
    if isinstance(procfs, ProcFs):
        return procfs
    return ProcFs(procfs or DEFAULT_PROCFS)
