"""Each process's mergeable (VM_MERGEABLE, smaps ``mg``) address ranges, kept between reads.

smaps walks every page table entry of the process (tens of ms for a few GiB, more for a Python
process with hundreds of mappings), while ``/proc/PID/maps`` is cheap: the ranges are re-read from
smaps only when the maps text or the process's ksm_stat flags change, or after ``refresh_seconds``
(a madvise that registers a whole mapping changes neither the maps text nor, after the first, the
flags)."""
from __future__ import annotations

import time
from typing import Callable

from ..errors import UdedupError
from ..host.fs import ProcFs
from ..host.maps import parse_smaps


def has_mergeable(stat: dict) -> bool:
    """A parsed ksm_stat says the process has mergeable memory (kernels before 6.6 have no
    flags: then a process KSM tracks pages of has some)."""
    if "ksm_mergeable" in stat or "ksm_merge_any" in stat:
        return stat.get("ksm_mergeable") is True or stat.get("ksm_merge_any") is True
    return int(stat.get("ksm_rmap_items", 0) or 0) > 0


class MergeableRanges:
    """``ranges(pid, stat)``: the ``[(start, end)]`` of the process's mg mappings, cached."""

    def __init__(self, procfs: ProcFs, refresh_seconds: float = 5.0, clock=time.monotonic):
        self.procfs = procfs
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._kept: dict = {}       # pid -> (key, when, ranges)
        self._seen: dict = {}

    def ranges(self, pid: int, stat: dict) -> tuple:
        key = (self.procfs.read_bytes(pid, "maps"), stat.get("ksm_mergeable"),
               stat.get("ksm_merge_any"))
        now = self.clock()
        kept = self._kept.get(pid)
        if kept is None or kept[0] != key or now - kept[1] >= self.refresh_seconds:
            smaps = parse_smaps(self.procfs.read_text(pid, "smaps"))
            kept = (key, now, tuple((m.start, m.end) for m in smaps if m.registered))
        self._seen[pid] = kept
        return kept[2]

    def put(self, pid: int, maps_text: bytes, stat: dict, mappings) -> None:
        """Take the mg ranges from ``mappings`` (smaps parsed by someone else this round, e.g.
        the daemon's candidates) so that :meth:`ranges` needs no smaps read of its own.
        ``maps_text``: ``/proc/PID/maps`` read *before* that smaps (a change after it then shows
        as a different key and the next :meth:`ranges` reads smaps again)."""
        key = (maps_text, stat.get("ksm_mergeable"), stat.get("ksm_merge_any"))
        self._kept[pid] = (key, self.clock(), tuple((m.start, m.end) for m in mappings
                                                    if m.registered))

    def forget_others(self) -> None:
        """Drop the processes not asked about since the last call (they exited or left KSM)."""
        self._kept, self._seen = self._seen, {}


def visit_mergeable(procfs: ProcFs, pids, visit: Callable[[int, dict], object]) -> tuple[list, int]:
    """``visit(pid, ksm_stat)`` for every process with mergeable memory among ``pids`` (None:
    all, or a callable returning them): ``(the results that are not None, how many processes
    could not be read)``. A process that exits meanwhile saves nothing and is not counted."""
    pids = pids() if callable(pids) else pids
    results, unreadable = [], 0
    for pid in (pids if pids is not None else procfs.pids()):
        stat = procfs.maybe_ksm_stat(pid)
        if not stat or not has_mergeable(stat):
            continue
        try:
            got = visit(int(pid), stat)
        except UdedupError:     # exited, or we may not read it
            if procfs.exists(pid):
                unreadable += 1
            continue
        if got is not None:
            results.append(got)
    return results, unreadable
