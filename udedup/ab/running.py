"""A started workload and how children are started: each in its own session (process group), so
stopping kills the whole group; with the parent's PID in the environment, so a child whose harness
died before it set ``PR_SET_PDEATHSIG`` exits; importing this very copy of udedup."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

from ..errors import WorkloadError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from .channel import PARENT_ENV, Channel

# The child must import this very copy of udedup. `python -m` would put the working directory
# first on sys.path, where a source checkout without the built extension would shadow an
# installed copy; so the child puts our package's parent directory first itself.
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The module every workload child runs (tests find the children by it in their command line).
CHILD_MODULE = "udedup.ab.child"
_CHILD_MAIN = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
               f"from {CHILD_MODULE} import main; sys.exit(main(sys.argv[1:]))")


def child_argv(*args: str) -> list[str]:
    """The command line of a workload child running ``main(args)`` of :mod:`udedup.ab.child`."""
    return [sys.executable, "-c", _CHILD_MAIN, _PKG_PARENT, *args]


def spawn(argv: list[str], stdin_pipe: bool) -> tuple[subprocess.Popen, object]:
    """Start ``argv`` in a new session, stderr kept in a temporary file (for the last line of an
    error); with ``stdin_pipe``, stdin and stdout are the :class:`Channel`'s pipes."""
    stderr_file = tempfile.TemporaryFile()
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                            stdout=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                            stderr=stderr_file, env=env, start_new_session=True, close_fds=True)
    return proc, stderr_file


class Running:
    """A started workload. ``stop()`` is idempotent and kills the whole process group."""

    def __init__(self, proc: subprocess.Popen | None, name: str, pids: Sequence[int] = (),
                 stderr_file=None, owned: bool = True, procfs: str | ProcFs = DEFAULT_PROCFS):
        self.proc = proc
        self.name = name
        self._pids = list(pids) if pids else ([proc.pid] if proc else [])
        self._stderr = stderr_file
        self.owned = owned
        self.procfs = as_procfs(procfs)
        self.channel = Channel(proc) if proc is not None and proc.stdout is not None else None
        self.info: dict = {}
        self.stopped = False

    @property
    def pid(self) -> int | None:
        return self._pids[0] if self._pids else None

    def pids(self) -> list[int]:
        """The workload's processes now (the child and its descendants, or the given PIDs)."""
        if not self.owned:
            return [p for p in self._pids if self.procfs.exists(p)]
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return [self.proc.pid] + self.procfs.descendants(self.proc.pid)
        except OSError:   # /proc unlistable: the child alone
            return [self.proc.pid]

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return any(self.procfs.exists(p) for p in self._pids)

    def exit_description(self) -> str | None:
        """None while running; else how it ended, in words, with its last stderr line."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        how = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        tail = self.stderr_tail()
        return how + (f": {tail}" if tail else "")

    def stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines()
                     if ln.strip()]
        except (OSError, ValueError):
            return ""
        return lines[-1][:200] if lines else ""

    def cow(self, sample: int, seed: int, timeout: float = 30.0) -> dict | None:
        """Ask the synthetic child to time COW writes; None for other workloads."""
        if self.channel is None or not self.alive():
            return None
        self.channel.send({"cmd": "cow", "sample": int(sample), "seed": int(seed)})
        reply = self.channel.read(timeout)
        if reply is None or reply.get("event") != "cow":
            raise WorkloadError(f"workload {self.name} did not answer the COW measurement"
                                + (f" ({self.exit_description()})" if not self.alive() else ""))
        reply.pop("event", None)
        return reply

    def stop(self, grace: float = 2.0) -> None:
        """Ask politely, then SIGTERM, then SIGKILL the whole group. Safe to call again (after an
        interrupted call too): the group kill and the reaping always run."""
        self.stopped = True
        if self.proc is None or not self.owned:
            return
        try:
            if self.proc.poll() is None and self.channel is not None and grace > 0:
                try:
                    self.channel.send({"cmd": "stop"})
                    self.proc.wait(timeout=grace)
                except (OSError, subprocess.TimeoutExpired, ValueError):
                    pass
            if self.proc.poll() is None and grace > 0:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout=grace)
                except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                    pass
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group, reap the child, close the pipes. Idempotent."""
        if self.proc is None or not self.owned:
            return
        self._kill_group()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None and not stream.closed:
                    stream.close()
            except OSError:
                pass

    def _kill_group(self) -> None:
        # the leader may be gone while its children live on: the group id stays usable
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - uninterruptible sleep
            pass
