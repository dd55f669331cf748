"""The one exception tree of udedup, rooted at :class:`UdedupError`.

Each class also inherits the matching builtin, so callers may catch either, and carries the exit
code the CLI returns for it (the table in README.md). errno is translated in one place per boundary
(``native/lib.py`` for native calls; ``host/fs.py`` for /proc and for sysfs knobs) with
``raise ... from err``.
"""
from __future__ import annotations


class UdedupError(Exception):
    """Root of every error udedup raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.message = message
        for key, value in fields.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message


class UsageError(UdedupError, ValueError):
    """A command line or API call that cannot be carried out as written."""

    exit_code = 2


# --- buffers and the native boundary -------------------------------------------------------------
class PageBufferError(UdedupError, ValueError):
    """A buffer whose length or page size does not fit (not a whole number of pages...)."""

    exit_code = 2


class BufferTypeError(UdedupError, TypeError):
    """An object that is not a usable buffer: not contiguous, read-only where written, wrong dtype."""

    exit_code = 2


class NativeError(UdedupError, OSError):
    """A native call failed with an errno (fields: call, errno)."""

    def __init__(self, message: str, errno: int = 0, **fields):
        UdedupError.__init__(self, message, **fields)
        self.errno = errno

    def __str__(self) -> str:
        return self.message


class NativeBuildError(UdedupError, ImportError):
    """The compiled extension is missing or was built from other sources (ABI mismatch)."""


# --- KSM sysfs ----------------------------------------------------------------------------------
class KsmError(UdedupError):
    """Something about /sys/kernel/mm/ksm (fields: knob, path, value where known)."""


class KsmUnavailableError(KsmError, FileNotFoundError):
    """The kernel has no KSM (no sysfs directory) or a knob does not exist on this kernel."""

    exit_code = 3


class KsmPermissionError(KsmError, PermissionError):
    """Writing a knob needs root (CAP_SYS_ADMIN over sysfs)."""

    exit_code = 4


class KsmBusyError(KsmError, BlockingIOError):
    """The kernel refused with EBUSY (max_page_sharing / merge_across_nodes while pages are shared)."""

    exit_code = 5


class KsmValueError(KsmError, ValueError):
    """A knob value the kernel or our validation rejects."""

    exit_code = 6


class KsmTimeout(KsmError, TimeoutError):
    """Merging did not settle in time; ``.stats`` holds the last counters seen."""

    exit_code = 7


# --- processes ----------------------------------------------------------------------------------
class ProcessError(UdedupError):
    """Something about a target process (field: pid)."""

    exit_code = 8


class ProcessNotFoundError(ProcessError, ProcessLookupError):
    """No such process, or it exited."""

    exit_code = 8


class ProcessAccessError(ProcessError, PermissionError):
    """Not allowed to read or act on the process (ptrace access mode check)."""

    exit_code = 4


class KernelThreadError(ProcessError, ValueError):
    """The target is a kernel thread: it has no user memory."""

    exit_code = 8


# --- injection ----------------------------------------------------------------------------------
class InjectError(UdedupError):
    """Running a syscall inside another process failed or was refused before touching it."""

    exit_code = 9


class InjectRefusedError(InjectError, PermissionError):
    """Refused before touching the target: traced, seccomp, zombie, ptrace not permitted..."""

    exit_code = 9


class UnsupportedArchError(InjectError, NotImplementedError):
    """Injection is not implemented for this CPU architecture."""

    exit_code = 9


# --- configuration, workloads -------------------------------------------------------------------
class ConfigError(UdedupError, ValueError):
    """A bad configuration file, key or value (fields: path, key)."""

    exit_code = 10


class WorkloadError(UdedupError):
    """A workload failed to start, died, or never became ready."""

    exit_code = 11


class KsmNotRunningError(KsmError, RuntimeError):
    """ksmd is not running (run is 0 or 2): waiting for merging to settle would never end."""

    exit_code = 7


class BufferInUseError(UdedupError, BufferError):
    """A buffer cannot be closed while views of it (numpy arrays, memoryviews) are alive."""

    exit_code = 2


class DaemonError(UdedupError, RuntimeError):
    """The daemon cannot start or go on: another instance runs, its state file is unusable..."""

    exit_code = 12


#: ``udedup audit`` exits with this code when it finds KSM pages mapped from two trust domains (a
#: finding, not an error: the audit itself worked). Listed in README.md's exit code table.
AUDIT_FINDINGS_EXIT = 13
