"""The ksmd kernel thread: its PID and CPU time, read through :class:`udedup.host.fs.ProcFs`."""
from __future__ import annotations

import os

from ..errors import KsmUnavailableError, ProcessError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..host.parse import ProcStat


class Ksmd:
    """ksmd under ``procfs``; its PID is found once and kept while it still names ksmd."""

    def __init__(self, procfs: str | ProcFs = DEFAULT_PROCFS):
        self.procfs = as_procfs(procfs)
        self._pid: int | None = None

    def pid(self) -> int:
        """PID of the ksmd kernel thread."""
        fs = self.procfs
        if self._pid is not None and fs.comm(self._pid) == "ksmd":
            return self._pid
        self._pid = None
        try:
            pids = fs.pids()
        except ProcessError as err:
            raise KsmUnavailableError(str(err), path=fs.root) from err
        for pid in pids:
            if fs.comm(pid) == "ksmd":
                self._pid = pid
                return pid
        raise KsmUnavailableError(f"no ksmd kernel thread in {fs.root} (kernel without KSM, or "
                                  "procfs hides kernel threads)", path=fs.root)

    def stat(self) -> ProcStat:
        pid = self.pid()
        try:
            return self.procfs.stat(pid)
        except ProcessError as err:
            self._pid = None
            path = self.procfs.path(pid, "stat")
            raise KsmUnavailableError(f"cannot read {path}: {err}", path=path) from err

    def cpu_seconds(self) -> float:
        """utime + stime of ksmd, in seconds (resolution 1/SC_CLK_TCK)."""
        st = self.stat()
        return (st.utime + st.stime) / os.sysconf("SC_CLK_TCK")

    def start_seconds(self) -> float:
        """When ksmd started, in seconds since boot."""
        return self.stat().start_time / os.sysconf("SC_CLK_TCK")
