"""The machine-wide experiment lock: udedup's KSM tests and experiment scripts (and ``udedup ab``)
hold it while they change knobs or register memory, so that none of them runs under another's
settings."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Callable, Iterator

from ..errors import KsmBusyError
from ..host.fs import ProcFs, as_procfs

LOCK_PATH = "/tmp/udedup-ksm.lock"


@contextlib.contextmanager
def experiment_lock(path: str = LOCK_PATH, enabled: bool = True, timeout: float | None = None,
                    on_wait: Callable[[str], None] | None = None,
                    procfs: ProcFs | str | None = None) -> Iterator[None]:
    """Hold ``path`` (flock, exclusive) for the block; ``enabled=False`` when the caller holds it.

    When another holder has it: ``on_wait`` (if given) gets one line saying so (with the holder's
    PID and name where /proc/locks tells them), then the call waits; ``timeout`` (seconds; None:
    for ever, 0: not at all) ends the wait with :class:`KsmBusyError`.

    The descriptor is close-on-exec (Python's default, PEP 446): a child started inside the block
    does not inherit the lock, so it neither keeps it after the parent lets go nor deadlocks a
    later holder.
    """
    if not enabled:
        yield
        return
    with open(path, "a+") as lock:
        _acquire(lock.fileno(), path, timeout, on_wait, procfs)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _acquire(fd: int, path: str, timeout, on_wait, procfs) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    who = describe_holders(lock_holders(fd, procfs), procfs)
    if on_wait is not None:
        on_wait(f"waiting for the KSM experiment lock {path}, held by {who} (another KSM test "
                "or experiment is running)")
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)      # Ctrl-C still ends the wait (PEP 475)
        return
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise KsmBusyError(
                    f"the KSM experiment lock {path} is still held by {who} after {timeout:g} s: "
                    "wait for that KSM test or experiment to end", path=path) from None
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def lock_holders(fd: int, procfs: ProcFs | str | None = None) -> list[int]:
    """PIDs that hold an flock on the file open as ``fd``, from /proc/locks (empty if unreadable).

    A line reads ``1: FLOCK  ADVISORY  WRITE 4242 00:1f:7311 0 EOF`` (``->`` marks a waiter)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    text = as_procfs(procfs).global_text("locks") or ""
    pids = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
            try:
                pids.append(int(fields[4]))
            except ValueError:
                continue
    return pids


def describe_holders(pids: list[int], procfs: ProcFs | str | None = None) -> str:
    """``"PID 4242 (pytest)"``, or ``"another process"`` when /proc/locks did not tell."""
    if not pids:
        return "another process"
    fs = as_procfs(procfs)
    return ", ".join(f"PID {pid} ({fs.comm(pid, default='?')})" for pid in pids)
