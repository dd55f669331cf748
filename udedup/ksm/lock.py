"""The machine-wide experiment lock: udedup's KSM tests and experiment scripts hold it while they
change knobs or register memory, so that none of them runs under another's settings."""
from __future__ import annotations

import contextlib
import fcntl
from typing import Iterator

LOCK_PATH = "/tmp/udedup-ksm.lock"


@contextlib.contextmanager
def experiment_lock(path: str = LOCK_PATH, enabled: bool = True) -> Iterator[None]:
    """Hold ``path`` (flock, exclusive) for the block; ``enabled=False`` when the caller holds it.

    The descriptor is close-on-exec (Python's default, PEP 446): a child started inside the block
    does not inherit the lock, so it neither keeps it after the parent lets go nor deadlocks a
    later holder.
    """
    if not enabled:
        yield
        return
    with open(path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
