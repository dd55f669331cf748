"""Per-process KSM view: ``/proc/PID/ksm_stat``, ``ksm_merging_pages``, smaps ``KSM:`` and ``mg``.

A caution the numbers need: ``ksm_merging_pages`` counts *every* mapping of a KSM page, including
the one that "owns" it. Process profits (``ksm_process_profit``) are therefore each a little too
high, and their sum over all processes exceeds the machine's real saving (``general_profit``) by
``pages_shared * page_size``. :func:`profit_overcount_bytes` gives that figure so reports can show it
instead of hiding it.
"""
from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass, field

from ..errors import KernelThreadError, ProcessAccessError, ProcessNotFoundError, UsageError

DEFAULT_PROCFS = "/proc"


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


def _check_pid(pid) -> int:
    if isinstance(pid, bool):
        raise UsageError(f"bad pid {pid!r}: expected a positive integer")
    try:
        value = int(str(pid).strip()) if not isinstance(pid, int) else pid
    except ValueError:
        raise UsageError(f"bad pid {pid!r}: expected a positive integer") from None
    if value <= 0:
        raise UsageError(f"bad pid {pid!r}: expected a positive integer")
    return value


def _read(procfs: str, pid: int, name: str) -> str:
    path = os.path.join(procfs, str(pid), name)
    try:
        with open(path) as f:
            return f.read()
    except OSError as err:
        if err.errno in (_errno.ENOENT, _errno.ESRCH):
            if not os.path.isdir(os.path.join(procfs, str(pid))):
                raise ProcessNotFoundError(f"no process {pid} (it does not exist or exited)",
                                           pid=pid) from err
            raise ProcessNotFoundError(f"{path} does not exist: kernel without KSM per-process "
                                       "stats (needs 6.1+ and CONFIG_KSM)", pid=pid) from err
        if err.errno in (_errno.EACCES, _errno.EPERM):
            raise ProcessAccessError(f"not allowed to read {path}: run as root or as the process's "
                                     "owner", pid=pid) from err
        raise ProcessAccessError(f"cannot read {path}: {err.strerror}", pid=pid) from err


def _yes(text: str) -> bool | None:
    text = text.strip().lower()
    return {"yes": True, "no": False}.get(text)


def parse_ksm_stat(text: str) -> dict[str, object]:
    """``/proc/PID/ksm_stat`` -> ``{name: int | bool}`` ("ksm_merge_any: yes" style lines too)."""
    values: dict[str, object] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if ":" in line:
            name, _, rest = line.partition(":")
        else:
            name, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.lstrip("-").isdigit():
            values[name.strip()] = int(rest)
        else:
            flag = _yes(rest)
            values[name.strip()] = flag if flag is not None else rest
    return values


def parse_smaps(text: str) -> tuple[int, tuple[MergeableMapping, ...]]:
    """smaps -> (sum of ``KSM:`` bytes, mappings whose VmFlags include ``mg``)."""
    # imported here: procmem loads numpy and the native module, which the ksm_stat-only callers
    # (status, top_processes, the daemon's walk) do not need
    from ..host import procmem
    mappings = procmem.parse_smaps(text)
    return sum(m.ksm for m in mappings), tuple(
        MergeableMapping(m.start, m.end, m.perms, m.path, m.ksm) for m in mappings if m.registered)


def process_ksm(pid, procfs: str = DEFAULT_PROCFS, smaps: bool = True) -> ProcessKsm:
    """KSM figures of process ``pid``; ``smaps=False`` skips the (slower) per-mapping part."""
    pid = _check_pid(pid)
    stat = parse_ksm_stat(_read(procfs, pid, "ksm_stat"))
    if not stat:
        raise KernelThreadError(f"process {pid} is a kernel thread: it has no user memory for KSM",
                                pid=pid)
    comm = _read(procfs, pid, "comm").strip()
    merging = stat.pop("ksm_merging_pages", None)
    if merging is None:
        merging = int(_read(procfs, pid, "ksm_merging_pages").strip() or 0)
    smaps_total = mappings = None
    if smaps:
        smaps_total, mappings = parse_smaps(_read(procfs, pid, "smaps"))

    def flag(name):
        value = stat.pop(name, None)
        return value if isinstance(value, bool) else None

    return ProcessKsm(
        pid=pid, comm=comm, page_size=os.sysconf("SC_PAGE_SIZE"),
        rmap_items=int(stat.pop("ksm_rmap_items", 0)), zero_pages=int(stat.pop("ksm_zero_pages", 0)),
        merging_pages=int(merging), process_profit=int(stat.pop("ksm_process_profit", 0)),
        merge_any=flag("ksm_merge_any"), mergeable=flag("ksm_mergeable"),
        smaps_ksm_bytes=smaps_total, mappings=mappings, extra=stat)


def top_processes(n: int = 10, procfs: str = DEFAULT_PROCFS, smaps: bool = False) -> list[ProcessKsm]:
    """The ``n`` processes with the largest ``ksm_process_profit`` among those KSM tracks.

    Processes that exit or are not readable during the walk are skipped. The profits over-count;
    see :func:`profit_overcount_bytes`.
    """
    found = []
    try:
        entries = os.listdir(procfs)
    except OSError as err:
        raise ProcessAccessError(f"cannot list {procfs}: {err.strerror}") from err
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            info = process_ksm(int(entry), procfs, smaps=False)
        except (ProcessNotFoundError, ProcessAccessError, KernelThreadError):
            continue
        if info.registered or info.merging_pages or info.zero_pages:
            found.append(info)
    found.sort(key=lambda p: (-p.process_profit, -p.merging_pages, p.pid))
    top = found[:max(0, int(n))]
    if smaps:
        detailed = []
        for info in top:
            try:
                detailed.append(process_ksm(info.pid, procfs, smaps=True))
            except (ProcessNotFoundError, ProcessAccessError, KernelThreadError):
                continue
        top = detailed
    return top


def profit_overcount_bytes(pages_shared: int, page_size: int | None = None) -> int:
    """How much the sum of all process profits exceeds the real saving: every KSM page's own
    mapping is counted in ``ksm_merging_pages`` although it saves nothing."""
    return int(pages_shared) * (page_size or os.sysconf("SC_PAGE_SIZE"))
