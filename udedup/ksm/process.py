"""Per-process KSM view: ``/proc/PID/ksm_stat``, ``ksm_merging_pages``, smaps ``KSM:`` and ``mg``.

A caution the numbers need: ``ksm_merging_pages`` counts *every* mapping of a KSM page, including
the one that "owns" it. Process profits (``ksm_process_profit``) are therefore each a little too
high, and their sum over all processes exceeds the machine's real saving (``general_profit``) by
``pages_shared * page_size``. :func:`udedup.ksm.accounting.profit_overcount_bytes` gives that
figure so reports can show it instead of hiding it.

Every file is read through :class:`udedup.host.fs.ProcFs` and parsed by :mod:`udedup.host.parse` /
:mod:`udedup.host.maps`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import KernelThreadError, ProcessAccessError, ProcessNotFoundError, UsageError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs, check_pid
from ..host.maps import Mapping, parse_smaps
from ..host.parse import parse_ksm_stat


@dataclass(frozen=True)
class MergeableMapping:
    """One mapping with the ``mg`` (VM_MERGEABLE) flag."""

    start: int
    end: int
    perms: str
    path: str
    ksm_bytes: int        # smaps "KSM:" of this mapping

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ProcessKsm:
    """KSM figures of one process, as the kernel reports them."""

    pid: int
    comm: str
    page_size: int
    rmap_items: int             # pages of this process KSM tracks (64 bytes of kernel memory each)
    zero_pages: int             # pages replaced by the zero page (use_zero_pages=1)
    merging_pages: int          # mappings of KSM pages, the owning one included (see module doc)
    process_profit: int         # bytes, the kernel's ksm_process_profit (can be negative)
    merge_any: bool | None      # PR_SET_MEMORY_MERGE is on (None: kernel does not say)
    mergeable: bool | None      # any mapping registered (None: kernel does not say)
    smaps_ksm_bytes: int | None = None    # sum of smaps "KSM:" (None if smaps was not read)
    mappings: tuple[MergeableMapping, ...] | None = None   # mappings with mg (None if not read)
    extra: dict = field(default_factory=dict)  # ksm_stat lines this module does not know

    @property
    def merging_bytes(self) -> int:
        return self.merging_pages * self.page_size

    @property
    def registered(self) -> bool:
        return bool(self.merge_any or self.mergeable or self.rmap_items or self.mappings)

    def as_dict(self) -> dict:
        out = {"pid": self.pid, "comm": self.comm, "rmap_items": self.rmap_items,
               "zero_pages": self.zero_pages, "merging_pages": self.merging_pages,
               "process_profit": self.process_profit, "merge_any": self.merge_any,
               "mergeable": self.mergeable}
        if self.smaps_ksm_bytes is not None:
            out["smaps_ksm_bytes"] = self.smaps_ksm_bytes
        if self.mappings is not None:
            out["mergeable_mappings"] = [
                {"start": hex(m.start), "end": hex(m.end), "perms": m.perms, "path": m.path,
                 "ksm_bytes": m.ksm_bytes} for m in self.mappings]
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    _asdict = as_dict


def _pid_argument(pid) -> int:
    # a bad PID given to this API is the caller's mistake (UsageError, exit 2), not a missing process
    try:
        return check_pid(pid)
    except ProcessNotFoundError:
        raise UsageError(f"bad pid {pid!r}: expected a positive integer") from None


def mergeable_mappings(mappings: Iterable[Mapping]) -> tuple[int, tuple[MergeableMapping, ...]]:
    """Parsed smaps -> (sum of ``KSM:`` bytes, mappings whose VmFlags include ``mg``)."""
    mappings = list(mappings)
    return sum(m.ksm for m in mappings), tuple(
        MergeableMapping(m.start, m.end, m.perms, m.path, m.ksm) for m in mappings if m.registered)


def _ksm_stat(fs: ProcFs, pid: int) -> dict[str, object]:
    try:
        text = fs.read_text(pid, "ksm_stat")
    except ProcessNotFoundError as err:
        if not fs.exists(pid):
            raise
        raise ProcessNotFoundError(f"{fs.path(pid, 'ksm_stat')} does not exist: kernel without KSM "
                                   "per-process stats (needs 6.1+ and CONFIG_KSM)", pid=pid) from err
    return parse_ksm_stat(text)


def process_ksm(pid, procfs: str | ProcFs = DEFAULT_PROCFS, smaps: bool = True) -> ProcessKsm:
    """KSM figures of process ``pid``; ``smaps=False`` skips the (slower) per-mapping part."""
    pid = _pid_argument(pid)
    fs = as_procfs(procfs)
    stat = _ksm_stat(fs, pid)
    if not stat:
        raise KernelThreadError(f"process {pid} is a kernel thread: it has no user memory for KSM",
                                pid=pid)
    comm = fs.read_text(pid, "comm").strip()
    merging = stat.pop("ksm_merging_pages", None)
    if merging is None:
        merging = int(fs.read_text(pid, "ksm_merging_pages").strip() or 0)
    smaps_total = mappings = None
    if smaps:
        smaps_total, mappings = mergeable_mappings(parse_smaps(fs.read_text(pid, "smaps")))

    def flag(name):
        value = stat.pop(name, None)
        return value if isinstance(value, bool) else None

    return ProcessKsm(
        pid=pid, comm=comm, page_size=os.sysconf("SC_PAGE_SIZE"),
        rmap_items=int(stat.pop("ksm_rmap_items", 0)), zero_pages=int(stat.pop("ksm_zero_pages", 0)),
        merging_pages=int(merging), process_profit=int(stat.pop("ksm_process_profit", 0)),
        merge_any=flag("ksm_merge_any"), mergeable=flag("ksm_mergeable"),
        smaps_ksm_bytes=smaps_total, mappings=mappings, extra=stat)


def top_processes(n: int = 10, procfs: str | ProcFs = DEFAULT_PROCFS,
                  smaps: bool = False) -> list[ProcessKsm]:
    """The ``n`` processes with the largest ``ksm_process_profit`` among those KSM tracks.

    Processes that exit or are not readable during the walk are skipped. The profits over-count;
    see :func:`udedup.ksm.accounting.profit_overcount_bytes`.
    """
    fs = as_procfs(procfs)
    skipped = (ProcessNotFoundError, ProcessAccessError, KernelThreadError)
    found = []
    for pid in fs.pids():
        try:
            info = process_ksm(pid, fs, smaps=False)
        except skipped:
            continue
        if info.registered or info.merging_pages or info.zero_pages:
            found.append(info)
    found.sort(key=lambda p: (-p.process_profit, -p.merging_pages, p.pid))
    top = found[:max(0, int(n))]
    if smaps:
        detailed = []
        for info in top:
            try:
                detailed.append(process_ksm(info.pid, fs, smaps=True))
            except skipped:
                continue
        top = detailed
    return top
