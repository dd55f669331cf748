"""A cheap sampled look at candidate processes, before the full estimate reads all their memory.

The daemon uses it to rule out processes that cannot clear its registration threshold: reading a
page costs about 0.5 us whatever is done with it (``process_vm_readv`` pins every page), so a
768 MiB cache of unique pages costs ~0.1 CPU-s to estimate in full, for nothing.

A uniform sample, at rate ``p``, of every process's present anonymous pages is read, zero-checked
byte by byte and hashed. A page that KSM could save is a zero page or has a twin; a twin shows up
only when both copies were drawn (probability p^2 for a pair), so

    bound = sampled zero pages / p + sampled pages with a sampled twin / p^2

leans high: it is unbiased for zero pages and for the pages of duplicate pairs, and larger groups
are counted in full. The saving attributed to a process is at most its duplicate pages (half of
them for pairs), so a process whose bound is below half of the threshold is screened out.
:func:`rate_for` picks ``p`` so that a process saving exactly the threshold shows
``EXPECTED_TWINS`` sampled twins on average; the chance that it shows fewer than a quarter of
that, and is screened out wrongly, is below 1e-4 (Poisson tail).

Hash equality only chooses what to look at closer: nothing is decided equal here. Every process
the screen lets through is estimated in full, where duplicates are confirmed byte by byte. Pages
not in RAM are never touched, and the memory is only read.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ProcessNotFoundError, UdedupError, UsageError
from ..host.fs import ProcFs, as_procfs
from ..host.maps import read_mappings
from ..host.pagemap import open_pagemap, present_pages
from ..host.remote import RemoteReader
from ..native import kernels, lib

#: Sampled twins expected from a process whose saving equals the threshold.
EXPECTED_TWINS = 16
#: Pages per remote read (one buffer, reused).
BATCH_PAGES = 1024


@dataclass(frozen=True)
class ScreenResult:
    """One process's sample. Counts are pages."""

    pid: int
    rate: float
    present_pages: int          # present anonymous pages in eligible mappings (sampled from)
    sampled_pages: int          # read
    zero_pages: int             # sampled pages that are all zeros (byte check)
    twin_pages: int             # sampled non-zero pages whose hash64 another sampled page shares

    @property
    def bound_pages(self) -> int:
        """The high-leaning estimate of the pages KSM could save (see the module docstring)."""
        if self.rate <= 0:
            return self.present_pages
        est = self.zero_pages / self.rate + self.twin_pages / (self.rate * self.rate)
        return int(min(self.present_pages, math.ceil(est)))

    def as_dict(self) -> dict:
        return {"pid": self.pid, "rate": self.rate, "present_pages": self.present_pages,
                "sampled_pages": self.sampled_pages, "zero_pages": self.zero_pages,
                "twin_pages": self.twin_pages, "bound_pages": self.bound_pages}


def rate_for(threshold_bytes: int, page_size: int | None = None,
             expected: float = EXPECTED_TWINS) -> float:
    """Sampling rate at which a process saving ``threshold_bytes`` in duplicate pairs shows
    ``expected`` sampled twins on average (its 2T duplicate pages x p^2)."""
    ps = page_size or lib.PAGE_SIZE
    t_pages = threshold_bytes / ps
    if t_pages <= 0:
        return 1.0
    return min(1.0, math.sqrt(expected / (2.0 * t_pages)))


def present_addresses(pid: int, procfs: ProcFs, maps=None) -> np.ndarray:
    """Page addresses (sorted uint64) of the present anonymous pages of the eligible mappings of
    ``pid``, the zero page left out: what the screen samples from. ``maps``: its mappings, if read."""
    if maps is None:
        maps = read_mappings(pid, procfs)
    fd = open_pagemap(pid, procfs)    # once per process, not once per mapping
    try:
        parts = [present_pages(pid, m.start, m.end, procfs, anon_only=True, skip_zero_page=True,
                               fd=fd)
                 for m in maps if m.eligible and m.anonymous]
    finally:
        os.close(fd)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def screen(pids, rate: float, seed: int = 0, procfs: str | ProcFs = "/proc",
           mappings=None) -> dict:
    """Sample ``pids`` jointly at ``rate`` -> {pid: ScreenResult, or a one-line error string}.

    Jointly: twins are looked for across all the processes, as KSM merges across processes.
    ``mappings``: {pid: [host.maps.Mapping]} already read (smaps walks every page table
    entry); the others are read here, from ``procfs`` (a path or a ProcFs). Presence always comes
    from a fresh pagemap read."""
    if not 0.0 < rate <= 1.0:
        raise UsageError(f"screen rate must be in (0, 1], got {rate}")
    procfs = as_procfs(procfs)
    ps = lib.PAGE_SIZE
    rng = np.random.default_rng(seed)
    out: dict = {}
    sampled: dict = {}
    for pid in pids:
        try:
            addrs = present_addresses(pid, procfs, (mappings or {}).get(pid))
        except ProcessNotFoundError:
            out[pid] = "exited during the screen"
            continue
        except UdedupError as err:
            out[pid] = str(err)
            continue
        pick = addrs[rng.random(addrs.size) < rate] if rate < 1.0 else addrs
        sampled[pid] = (addrs.size, pick)

    hashes, zero_count, owners = [], {}, []
    with RemoteReader(buffer_bytes=BATCH_PAGES * ps) as reader:
        for i, (pid, (_present, pick)) in enumerate(sampled.items()):
            zero_count[pid] = 0
            read_total = 0
            for lo in range(0, pick.size, reader.capacity):
                batch = pick[lo:lo + reader.capacity]
                try:
                    ok = reader.read(batch, pid=pid)
                except UdedupError as err:
                    out[pid] = str(err)
                    break
                n = int(ok.size)
                res = kernels.scan_pages(reader.buffer[: n * ps], ps)
                good = ok & ~res.zero
                zero_count[pid] += int(np.count_nonzero(ok & res.zero))
                hashes.append(res.hash[good])
                owners.append(np.full(int(np.count_nonzero(good)), i, dtype=np.int64))
                read_total += int(np.count_nonzero(ok))
            if pid in reader.exited:
                out[pid] = "exited during the screen"
            sampled[pid] = (sampled[pid][0], read_total)

    if hashes:
        h = np.concatenate(hashes)
        who = np.concatenate(owners)
        _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
        # sampled twins per process (by its index in ``sampled``), in one pass over the sample
        twins = np.bincount(who[counts[inverse] >= 2], minlength=len(sampled))
    else:
        twins = np.zeros(len(sampled), dtype=np.int64)
    for i, (pid, (present, read_total)) in enumerate(sampled.items()):
        if pid in out:
            continue
        out[pid] = ScreenResult(pid=pid, rate=rate, present_pages=int(present),
                                sampled_pages=int(read_total), zero_pages=zero_count[pid],
                                twin_pages=int(twins[i]))
    return out
