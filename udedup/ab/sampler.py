"""What the harness watches while a trial merges: a thread sampling the KSM counters, the true
saving (:mod:`udedup.ksm.truth`: the counters plus the zero-page mappings of mergeable memory that
THP splits hand back outside them) as its change from the trial's start, and ksmd's CPU time; the
workload's own ``ksm_stat`` summed over its processes, and the other processes whose registered
memory ksmd scans too. Reads only; every /proc read goes through ``procfs``."""
from __future__ import annotations

import os
import threading
from typing import Callable, Sequence

from ..errors import KsmError, UdedupError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..ksm.process import process_ksm
from ..ksm.truth import TrueSavings, TrueSavingsReader

#: The columns of a trial's time series, in the order of series.csv. ``true_saved_bytes`` and
#: ``zero_mapped_pages`` (mergeable pages on the zero page outside KSM) are changes from the
#: trial's start: pages read but never written before it cancel out, so they are exact.
SERIES_COLUMNS = ("t", "saved_bytes", "saved_pages", "pages_shared", "pages_sharing", "ksm_zero_pages",
                  "full_scans", "ksmd_cpu_seconds", "foreign_rmap_items", "true_saved_bytes",
                  "zero_mapped_pages")

_TOTALS = ("rmap_items", "zero_pages", "merging_pages", "process_profit")


def process_totals(pids: Sequence[int], procfs: str | ProcFs = DEFAULT_PROCFS) -> dict | None:
    """``ksm_stat`` figures summed over ``pids`` (those that are gone are left out); None when
    none could be read."""
    fs = as_procfs(procfs)
    totals = {"pids": [], **{key: 0 for key in _TOTALS}}
    for pid in pids:
        try:
            p = process_ksm(pid, procfs=fs, smaps=False)
        except UdedupError:
            continue
        totals["pids"].append(pid)
        for key in _TOTALS:
            totals[key] += getattr(p, key)
    return totals if totals["pids"] else None


def other_mergeable_processes(exclude=(), procfs: str | ProcFs = DEFAULT_PROCFS) -> list[dict]:
    """Processes with memory registered for KSM, other than ours: ksmd scans them in every trial,
    so their pages show in the global counters and their cost in ksmd's CPU time."""
    fs = as_procfs(procfs)
    skip = {os.getpid(), *exclude}
    found = []
    for pid in fs.pids():
        if pid in skip:
            continue
        try:
            p = process_ksm(pid, fs, smaps=False)
        except UdedupError:         # gone, unreadable, or a kernel thread
            continue
        if p.registered:
            found.append({"pid": p.pid, "comm": p.comm, "rmap_items": p.rmap_items})
    return found


def true_baseline(ksm, procfs: str | ProcFs | None = None) -> TrueSavings | None:
    """The true saving before a trial's ksmd starts (what its samples count from); None if it
    cannot be read (then the first sample is the baseline)."""
    try:
        return TrueSavingsReader(ksm, procfs).read()
    except (UdedupError, OSError):
        return None


class Sampler(threading.Thread):
    """Counters, the true saving and ksmd CPU every ``interval`` seconds, from the moment ksmd
    starts. ``baseline`` (:func:`true_baseline`, read before ``run=1``) is what the true saving's
    change is counted from; without one, the first sample is.

    With the workload's pids it also follows ``foreign_rmap_items``: pages ksmd tracks that are not
    the workload's (the global rmap items minus the workload's ``ksm_rmap_items``). Another process
    registering memory mid-trial shows there, even if it is gone by the end."""

    def __init__(self, ksm, t0: float, cpu0: float, interval: float, progress=None, label="",
                 pids: Callable[[], Sequence[int]] | None = None,
                 procfs: str | ProcFs = DEFAULT_PROCFS, baseline: TrueSavings | None = None):
        super().__init__(name="udedup-ab-sampler", daemon=True)
        self.ksm, self.t0, self.cpu0, self.interval = ksm, t0, cpu0, interval
        self.progress, self.label, self.pids = progress, label, pids
        self.procfs = as_procfs(procfs)
        self.series = {c: [] for c in SERIES_COLUMNS}
        # the same scope as the global counters (every process): a foreign process's zero pages
        # that do not move cancel out of the change
        self.truth = TrueSavingsReader(ksm, self.procfs)
        self.baseline = baseline
        self._halt = threading.Event()
        self.error: Exception | None = None

    def sample(self) -> None:
        stats = self.ksm.stats()
        cpu = self.ksm.ksmd_cpu_seconds()
        foreign = None
        if self.pids is not None:
            own = process_totals(self.pids(), self.procfs)
            if own is not None:
                foreign = max(0, stats.rmap_items - own["rmap_items"])
        true_saved = zero_mapped = None
        try:
            truth = self.truth.read(stats)
        except (UdedupError, OSError):  # /proc unlistable: the counters still count
            truth = None
        if truth is not None:
            if self.baseline is None:
                self.baseline = truth
            true_saved = truth.saved_bytes - self.baseline.saved_bytes
            zero_mapped = truth.zero_mapped_pages - self.baseline.zero_mapped_pages
        row = {"t": round(stats.timestamp - self.t0, 4), "saved_bytes": stats.saved_bytes,
               "saved_pages": stats.saved_pages, "pages_shared": stats.pages_shared,
               "pages_sharing": stats.pages_sharing, "ksm_zero_pages": stats.ksm_zero_pages,
               "full_scans": stats.full_scans, "ksmd_cpu_seconds": round(cpu - self.cpu0, 3),
               "foreign_rmap_items": foreign, "true_saved_bytes": true_saved,
               "zero_mapped_pages": zero_mapped}
        for c in SERIES_COLUMNS:
            self.series[c].append(row[c])
        if self.progress is not None:
            shown = true_saved if true_saved is not None else stats.saved_pages * stats.page_size
            self.progress(f"{self.label}: {row['t']:5.1f} s, scan {row['full_scans']}, saved "
                          f"{shown / 2**20:7.1f} MiB, ksmd {row['ksmd_cpu_seconds']:.2f} CPU-s")

    def run(self) -> None:
        try:
            self.sample()
            while not self._halt.wait(self.interval):
                self.sample()
        except (KsmError, OSError) as err:  # pragma: no cover - sysfs vanished mid-run
            self.error = err

    def finish(self) -> dict:
        self._halt.set()
        self.join(timeout=5)
        try:
            self.sample()               # the last point is the final state
        except (KsmError, OSError):    # pragma: no cover
            pass
        return self.series
