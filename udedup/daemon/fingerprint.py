"""Sampled confirmation of an estimate: is a process's memory still what the last full estimate
read? What crc32c is for: change detection, never equality.

After a full estimate the daemon takes a fingerprint of each estimated process: ``confirm_pages``
of its present anonymous pages (eligible mappings, the zero page left out), drawn uniformly, with
their crc32c. When the process is due for a re-estimate, the same addresses are looked at again:
a page no longer present counts as changed, a page now on the zero page has the zero page's
crc32c, the others are read (only present pages are read, so nothing is faulted in) and their
crc32c compared. When at most :data:`CHANGED_FRACTION` of the sample changed and the process's
RssAnon grew by no more than the idle watch's RssAnon slack (1 % or 4 MiB; merging shrinks it, as
THP splits hand zero subpages back, and freed pages show in the sample), the last estimate stands and the full re-read (all of
the process's memory, twice) is skipped.

With 1024 sampled pages, a change of 5 % of the memory shows about 51 changed pages against the
threshold of 20 (the chance that it shows 20 or fewer is below 1e-6). A change smaller than the
threshold (it moves the prediction by about as much) waits until
``estimate.confirm_max_seconds`` forces a full estimate again. Memory is only read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import ProcessNotFoundError, UdedupError
from ..host.fs import ProcFs, as_procfs
from ..host.pagemap import open_pagemap, present_offsets, read_pagemap, zero_page_pfns
from ..host.remote import RemoteReader
from ..native import kernels, lib
from .idlewatch import RSS_SLACK_BYTES, RSS_SLACK_FRACTION

#: The share of a sample that may change while the last estimate still stands: a guest's kernel
#: rewrites ~1 % of an idle TCG guest's RAM between two re-estimates (measured: 9 of 1024 sampled
#: pages in 600 s), which moves its prediction by about as much, not worth a full re-read.
CHANGED_FRACTION = 0.02


@dataclass(frozen=True)
class Fingerprint:
    """``addrs`` (sorted uint64) and their ``crcs`` (uint32) at ``taken_at``; ``anon_rss`` then."""

    pid: int
    start_time: int
    taken_at: float
    anon_rss: int
    addrs: np.ndarray
    crcs: np.ndarray

    @property
    def pages(self) -> int:
        return int(self.addrs.size)


def _zero_crc(ps: int) -> int:
    return int(kernels.crc32c_pages(np.zeros(ps, dtype=np.uint8), ps)[0])


def take(info, pages: int, now: float, procfs: ProcFs | str = "/proc", mappings=None,
         seed: int = 0) -> Fingerprint | None:
    """A fingerprint of process ``info`` (ProcessInfo) read now: up to ``pages`` sampled present
    pages. None if it exited or cannot be read. The daemon takes its fingerprints from the
    estimate itself (``estimate(fingerprint_pages=...)``, no extra read); this is for an estimate
    made elsewhere (an estimator given to the daemon, tests)."""
    from ..estimate.screen import present_addresses

    fs = as_procfs(procfs)
    try:
        addrs = present_addresses(info.pid, fs, mappings)
    except UdedupError:
        return None
    rng = np.random.default_rng([seed, info.pid])
    if addrs.size > pages:
        addrs = np.sort(rng.choice(addrs, size=pages, replace=False))
    crcs, ok = _read_crcs(info.pid, addrs)
    if ok is None:
        return None
    return Fingerprint(info.pid, info.start_time, now, info.anon_rss, addrs[ok], crcs[ok])


def _read_crcs(pid: int, addrs: np.ndarray, batch: int = 256):
    """(crc32c per address, read ok) for present pages; (None, None) if the process exited."""
    ps = lib.PAGE_SIZE
    crcs = np.zeros(addrs.size, dtype=np.uint32)
    ok = np.zeros(addrs.size, dtype=bool)
    with RemoteReader(buffer_bytes=batch * ps) as reader:
        for lo in range(0, addrs.size, reader.capacity):
            part = addrs[lo:lo + reader.capacity]
            try:
                got = reader.read(part, pid=pid)
            except UdedupError:
                return None, None
            if pid in reader.exited:
                return None, None
            n = part.size
            crcs[lo:lo + n] = kernels.crc32c_pages(reader.buffer[: n * ps], ps)
            ok[lo:lo + n] = got
    return crcs, ok


def changed(fp: Fingerprint, info, procfs: ProcFs | str = "/proc") -> str | None:
    """Why the last estimate of ``info`` no longer stands (a short phrase), or None: its memory
    reads back as the fingerprint says."""
    if info.pid != fp.pid or info.start_time != fp.start_time:
        return "another process"
    # only growth: merging itself shrinks RssAnon (THP splits hand zero subpages to the zero
    # page), and memory freed shows in the sample as pages no longer present
    if info.anon_rss - fp.anon_rss > max(RSS_SLACK_BYTES, RSS_SLACK_FRACTION * fp.anon_rss):
        return f"RssAnon grew ({fp.anon_rss >> 20} -> {info.anon_rss >> 20} MiB)"
    if fp.pages == 0:
        return None
    fs = as_procfs(procfs)
    ps = lib.PAGE_SIZE
    try:
        fd = open_pagemap(fp.pid, fs)
    except (ProcessNotFoundError, UdedupError):
        return "exited"
    try:
        entries = np.empty(fp.pages, dtype=np.uint64)
        one = np.empty(1, dtype=np.uint64)
        for i, a in enumerate(fp.addrs):
            entries[i] = read_pagemap(fd, int(a), int(a) + ps, out=one, pid=fp.pid)[0]
    except UdedupError:
        return "exited"
    finally:
        os.close(fd)
    present = np.zeros(fp.pages, dtype=bool)
    present[present_offsets(entries)] = True            # present anonymous pages
    read = np.zeros(fp.pages, dtype=bool)
    read[present_offsets(entries, zero_pfns=zero_page_pfns(fs))] = True   # ... not the zero page
    now = np.full(fp.pages, _zero_crc(ps), dtype=np.uint32)
    crcs, ok = _read_crcs(fp.pid, fp.addrs[read])
    if crcs is None:
        return "exited"
    now[read] = crcs
    same = present.copy()
    same[read] &= ok
    same &= now == fp.crcs
    moved = fp.pages - int(np.count_nonzero(same))
    if moved > CHANGED_FRACTION * fp.pages:
        return f"{moved} of {fp.pages} sampled pages changed"
    return None
