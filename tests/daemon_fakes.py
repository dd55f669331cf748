"""Fake /proc trees for the daemon's unit tests (fake_sysfs.py has the KSM side), and the
daemon configuration they start from."""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

from udedup.daemon.config import Config
from udedup.host.fs import SysFs

from fake_sysfs import MINIMAL_COUNTERS, MINIMAL_KNOBS, make_fake_ksm


def cfg(**sections) -> Config:
    """Config() with ``section={key: value}`` changes. The rate tests read the knobs at the
    configured sleeps: the batch rule (ksmd.min_batch_pages) and bursts on unspent budget
    (ksmd.cpu_budget_window) are off unless a test sets them."""
    c = Config()
    c.ksmd.min_batch_pages = 1
    c.ksmd.cpu_budget_window = 0.0
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(c, section), key, value)
    return c


SMAPS_ENTRY = """{start:x}-{end:x} rw-p 00000000 00:00 0 {path}
Size:           {kb} kB
Rss:            {kb} kB
Anonymous:      {kb} kB
KSM:            0 kB
AnonHugePages:  0 kB
Swap:           0 kB
VmFlags: rd wr mr mw me ac{mg}
"""


def fake_proc(root, pid, comm, cmdline, anon_kb, merge_any=False, mappings=(), uid=0,
              kthread=False, cgroup="/machine.slice/vm.scope"):
    d = root / str(pid)
    d.mkdir(parents=True)
    flags = 0x00200000 if kthread else 0x400000
    (d / "stat").write_text(f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 {flags} 0 0 0 0 1 2 0 0 20 0 1 0 "
                            f"{pid * 7} 0 0\n")
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                              f"VmRSS:\t{anon_kb + 100} kB\nRssAnon:\t{anon_kb} kB\n")
    (d / "cgroup").write_text(f"0::{cgroup}\n")
    yes = "yes" if merge_any else "no"
    (d / "ksm_stat").write_text(f"ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\n"
                                f"ksm_process_profit 0\nksm_merge_any: {yes}\nksm_mergeable: {yes}\n")
    text = ""
    start = 0x7F0000000000
    for kb, mg in mappings:
        end = start + kb * 1024
        text += SMAPS_ENTRY.format(start=start, end=end, path="", kb=kb, mg=" mg" if mg else "")
        start = end + 0x1000
    (d / "smaps").write_text(text)


def fake_sysfs(root, **knobs):
    return make_fake_ksm(root, {**MINIMAL_KNOBS, "run": "0"}, MINIMAL_COUNTERS, **knobs)


class RecordingSysFs(SysFs):
    """The fake kernel's side of the knob files: every write, in order, as (knob file, text)."""

    def __init__(self, root):
        super().__init__(root)
        self.writes: list = []

    def write(self, path, text, knob, shown=None):
        self.writes.append((os.path.basename(path), text))
        super().write(path, text, knob, shown)


def add_mapping(procfs, pid, kb=4, start=0x7E0000000000):
    """Append an eligible ``kb`` kB mapping to the fake smaps of ``pid``: a daemon that reads the
    smaps again sees its eligible bytes grow by that much."""
    smaps = procfs / str(pid) / "smaps"
    smaps.write_text(smaps.read_text() + SMAPS_ENTRY.format(start=start, end=start + kb * 1024,
                                                            path="", kb=kb, mg=""))


# --- trust domains: what udedup.ksm.audit.AuditReport gives the daemon (its offenders' mappings
# as (domain, pid, comm, address)), and an estimate target with the domain fields
class FakeOffender(NamedTuple):
    pfn: int
    zero: bool
    mappings: tuple


@dataclass(frozen=True)
class FakeAudit:
    offenders: tuple = ()
    ksm_frames: int = 0
    read_seconds: float = 0.001

    @property
    def offender_frames(self) -> int:
        return len(self.offenders)


def domain_target(pid, domain, ranges=(), conflicts=(), saved=(0.0, 0.0), scanned=1000, zero=0,
                  foreign=0, page_size=4096):
    """An estimate TargetReport's fields as the daemon reads them (estimate(domains=...))."""
    return SimpleNamespace(pid=pid, kind="process", exited=False, scanned_pages=scanned,
                           unreadable_pages=0, zero_pages=zero, domain=domain,
                           domain_ranges=list(ranges), conflict_ranges=list(conflicts),
                           domain_range_pages=sum(e - s for s, e in ranges) // page_size,
                           domain_saved_pages={0: saved[0], 1: saved[1]}, foreign_pages=foreign)
