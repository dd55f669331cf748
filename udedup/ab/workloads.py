"""Workloads for the A/B harness: what gets merged while a knob is compared.

Four kinds, one interface (``preflight()``, ``describe()``, ``start(seed) -> Running``):

- :class:`SyntheticWorkload`: a child process (:mod:`udedup.ab.child`, ``synthetic``) that fills a
  :class:`~udedup.ksm.memory.MergeableBuffer` with a known mix of zero, duplicate, unique and
  volatile pages (:mod:`udedup.ab.synthetic`), tells the parent it is ready, keeps rewriting the
  volatile pages, and on request times the copy-on-write breaks of a sample of its merged pages. It
  knows its own layout, so :meth:`SyntheticWorkload.expected` says what KSM should report.
- :class:`CommandWorkload`: any program, started through the child's ``exec`` mode, which sets
  ``PR_SET_MEMORY_MERGE`` (every VMA mergeable, inherited by exec) and a parent-death signal before
  exec, like ``udedup run``; optional readiness wait (a file appearing, or a delay).
- :class:`PidWorkload`: processes that already run with mergeable memory (running VMs: QEMU
  registers guest RAM itself). Never written to, never stopped: every trial unmerges (run=2), sets
  the arm, merges and measures them as they are. Their trials are not independent: a THP that KSM
  split in one trial stays split after the unmerge (its zero subpages keep mapping the zero page),
  unless khugepaged collapses it again meanwhile, so the first trial gets most of that saving.
- :class:`~udedup.ab.vms.VmWorkload` (:mod:`udedup.ab.vms`): the VM lab, N QEMU guests from an image
  built on first use (:mod:`udedup.ab.vmlab`).

Every child runs in its own session (process group): stopping kills the whole group, and
``PR_SET_PDEATHSIG`` kills the direct child if the harness itself is killed (:mod:`.running`).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from typing import Sequence

from ..errors import UsageError, WorkloadError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..ksm.process import process_ksm
from .running import Running, child_argv, spawn
from .synthetic import KIND_NAMES, PAGE_SIZE, SyntheticSpec, expected_counters, make_layout
from .vms import VmSpec, VmWorkload  # noqa: F401  (one of the workloads, chosen here by kind)


class SyntheticWorkload:
    """The built-in workload: a child process filling a mergeable buffer per ``spec``."""

    kind = "synthetic"

    def __init__(self, spec: SyntheticSpec, ready_timeout: float = 120.0,
                 procfs: str | ProcFs = DEFAULT_PROCFS):
        self.spec = spec.validate()
        self.ready_timeout = ready_timeout
        self.procfs = as_procfs(procfs)
        self.name = f"{spec.name} {spec.size >> 20} MiB"
        self.layout = make_layout(spec)

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "spec": self.spec.as_dict(),
                "pages": {n: self.layout.count(k) for k, n in enumerate(KIND_NAMES)},
                "duplicate_groups": int(self.layout.group_sizes.size)}

    def expected(self, use_zero_pages: bool, max_page_sharing: int = 256) -> dict:
        return expected_counters(self.layout, use_zero_pages, max_page_sharing)

    def preflight(self) -> None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * PAGE_SIZE
        except (ValueError, OSError):  # pragma: no cover
            return
        if self.spec.size > avail * 0.8:
            raise WorkloadError(f"the {self.name} workload needs {self.spec.size >> 20} MiB but only "
                                f"{avail >> 20} MiB are free: choose a smaller --size")

    def start(self, seed: int = 0) -> Running:
        argv = child_argv("synthetic", "--spec", json.dumps(self.spec.as_dict()),
                          "--procfs", self.procfs.root)
        proc, err = spawn(argv, stdin_pipe=True)
        run = Running(proc, self.name, stderr_file=err, procfs=self.procfs)
        try:
            msg = run.channel.read(self.ready_timeout)
        except (ValueError, OSError):
            msg = None
        except BaseException:          # Ctrl-C while it starts: it is not the caller's to stop yet
            run.stop(grace=0)
            raise
        if msg is None or msg.get("event") != "ready":
            why = run.exit_description() or f"not ready after {self.ready_timeout:g} s"
            if msg is not None and msg.get("event") == "error":
                why = msg.get("message", why)
            run.stop()
            raise WorkloadError(f"the synthetic workload did not start: {why}")
        run.info = msg
        return run


class CommandWorkload:
    """Any command, with process-wide merging, ``argv`` or a string split like a shell would."""

    kind = "command"

    def __init__(self, command: str | Sequence[str], ready_file: str | None = None,
                 ready_delay: float = 0.0, ready_timeout: float = 120.0, merge: bool = True,
                 procfs: str | ProcFs = DEFAULT_PROCFS):
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise UsageError("--cmd is empty: give the command to run, e.g. --cmd 'myapp --flag'")
        if ready_delay < 0 or ready_timeout <= 0:
            raise UsageError("readiness delay must be >= 0 and its timeout > 0 seconds")
        self.argv = argv
        self.ready_file = ready_file
        self.ready_delay = float(ready_delay)
        self.ready_timeout = float(ready_timeout)
        self.merge = merge
        self.procfs = as_procfs(procfs)
        self.name = shlex.join(argv)

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "argv": self.argv, "ready_file": self.ready_file,
                "ready_delay": self.ready_delay, "merge": self.merge}

    def preflight(self) -> None:
        if shutil.which(self.argv[0]) is None:
            raise WorkloadError(f"command {self.argv[0]!r} not found (not an executable on PATH)")
        if self.ready_file and not os.path.isdir(os.path.dirname(os.path.abspath(self.ready_file))):
            raise UsageError(f"the folder of --ready-file {self.ready_file!r} does not exist")

    def start(self, seed: int = 0) -> Running:
        if self.ready_file:
            try:
                os.unlink(self.ready_file)  # a stale file from the last trial is no signal
            except FileNotFoundError:
                pass
        argv = child_argv("exec")
        argv += [] if self.merge else ["--no-merge"]
        proc, err = spawn(argv + ["--"] + self.argv, stdin_pipe=False)
        run = Running(proc, self.name, stderr_file=err, procfs=self.procfs)
        deadline = time.monotonic() + self.ready_timeout
        try:
            if self.ready_file:
                while not os.path.exists(self.ready_file):
                    self._check(run)
                    if time.monotonic() > deadline:
                        raise WorkloadError(f"{self.name}: {self.ready_file} did not appear within "
                                            f"{self.ready_timeout:g} s")
                    time.sleep(0.05)
            end = time.monotonic() + self.ready_delay
            while time.monotonic() < end:
                self._check(run)
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
            self._check(run)
        except BaseException:
            run.stop()
            raise
        return run

    def _check(self, run: Running) -> None:
        if not run.alive():
            raise WorkloadError(f"workload {self.name!r} {run.exit_description()} before it was ready")


class PidWorkload:
    """Processes already running with mergeable memory: observed, never written to or stopped."""

    kind = "pids"

    def __init__(self, pids: Sequence[int], procfs: str | ProcFs = DEFAULT_PROCFS):
        if not pids:
            raise UsageError("no PID given")
        self.pids = [int(p) for p in pids]
        self.procfs = as_procfs(procfs)
        self.name = "pid " + ",".join(map(str, self.pids))

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "pids": self.pids,
                "comms": [self.procfs.comm(p, default="?") for p in self.pids]}

    def preflight(self) -> None:
        for pid in self.pids:
            # ProcessNotFoundError for a PID that does not exist
            if not process_ksm(pid, procfs=self.procfs).registered:
                qemu = (self.procfs.comm(pid, default="") or "").startswith("qemu")
                hint = (" (QEMU registers guest RAM unless started with -machine mem-merge=off)"
                        if qemu else "")
                raise WorkloadError(f"process {pid} has no mergeable memory (no 'mg' VMA and no "
                                    f"process-wide merging){hint}: start it with 'udedup run' or "
                                    "enable KSM in it first", pid=pid)

    def start(self, seed: int = 0) -> Running:
        for pid in self.pids:
            if not self.procfs.exists(pid):
                raise WorkloadError(f"process {pid} is gone", pid=pid)
        return Running(None, self.name, pids=self.pids, owned=False, procfs=self.procfs)


#: Every workload kind, by the ``kind`` its ``describe()`` records.
KINDS = {cls.kind: cls for cls in (SyntheticWorkload, CommandWorkload, PidWorkload, VmWorkload)}
