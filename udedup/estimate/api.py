"""``estimate()``: the entry point, from parameters to an :class:`~.model.Estimate`.

Each step is what ksmd would do, done faster, in its own module:

1. :mod:`.passes` reads the scope — the mappings KSM scans today (``mg``), or every KSM-compatible
   one (``all_eligible``); within them the present anonymous pages from pagemap, minus pages
   already mapping the kernel's zero page — into a :class:`~.scope.Scope`;
2. pass 1 (:mod:`.passes`) reads every page and scans it once for crc32c, hash64 and is-zero;
3. :mod:`.group` turns the hashes, while the interval runs, into candidate groups;
4. later passes re-check crc32c (changed: volatile, as ksmd does); the last one has
   :mod:`.confirm` byte-compare every candidate with its group head. With ``recheck="candidates"``
   they re-read only zero pages and candidate group members;
5. :mod:`.summary` counts what the pages are and predicts the counters for use_zero_pages 0 and 1
   under max_page_sharing with :mod:`udedup.ksm.accounting`, and :mod:`.ranges` the saving ranges.

Memory: per scanned page 4 (crc32c) + 8 (hash, then sort key) + 4 (group head) + 1 (flags) = 17
bytes, plus where the page is (8 bytes per run of contiguous pages, at most 4 per page), plus the
fixed buffers (read chunks, re-read heads, head cache): page copies are never kept, temporaries work
in bounded steps. The target's memory is only ever read.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import UsageError
from ..host.fs import ProcFs, as_procfs
from .confirm import Confirmer
from .group import group
from .kernel import current_knobs
from .model import Estimate
from .passes import Passes, read_scope, read_targets
from .ranges import DEFAULT_MAX_RANGES, DEFAULT_RANGE_GAP, MAX_RANGES_LIMIT
from .summary import summarize

DEFAULT_CACHE_BYTES = 4 << 20  # heads of the largest duplicate groups, kept between chunks
# Read chunk. Larger than L2 on purpose: the bytes are scanned from L3 at >30 GB/s, far above the
# ~8 GB/s of process_vm_readv, while each chunk costs ~30 us of Python; measured on 1 GiB, 2 passes:
# 0.5 MiB 0.63 s, 1 MiB 0.49 s, 2 MiB 0.42 s, 4 MiB 0.36 s of CPU.
DEFAULT_CHUNK_BYTES = 4 << 20
RECHECK_MODES = ("all", "candidates")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def default_threads() -> int:
    """2 (read ahead while scanning) where this process may use two CPUs, else 1."""
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 1


def _check_options(passes, interval, recheck, range_gap, max_ranges) -> None:
    if int(passes) < 2:
        raise UsageError(f"passes must be at least 2, got {passes}: the first pass hashes, a "
                         "later one re-reads to catch volatile pages and to confirm duplicates "
                         "byte by byte")
    if interval < 0:
        raise UsageError(f"interval must be >= 0 seconds, got {interval}")
    if recheck not in RECHECK_MODES:
        raise UsageError(f"recheck must be one of {', '.join(RECHECK_MODES)}, got {recheck!r}")
    if not _is_int(range_gap) or range_gap < 0:
        raise UsageError(f"range_gap must be a whole number of bytes >= 0, got {range_gap!r}")
    if not _is_int(max_ranges) or not 1 <= max_ranges <= MAX_RANGES_LIMIT:
        raise UsageError(f"max_ranges must be a whole number from 1 to {MAX_RANGES_LIMIT}, got "
                         f"{max_ranges!r}: every range may split its mapping in three and a "
                         "process may have only vm.max_map_count (65530) mappings")


def estimate(targets, passes: int = 2, interval: float = 0.5, all_eligible: bool = False,
             max_page_sharing: int | None = None, procfs: str | ProcFs = "/proc",
             buffer_bytes: int = DEFAULT_CHUNK_BYTES,
             cache_bytes: int = DEFAULT_CACHE_BYTES, threads: int | None = None,
             progress=None, recheck: str = "all", range_gap: int = DEFAULT_RANGE_GAP,
             max_ranges: int = DEFAULT_MAX_RANGES, ksm=None, domains=None,
             zero_pages_across_domains: bool = True, fingerprint_pages: int = 0) -> Estimate:
    """Predict what KSM would save on ``targets``: PIDs and/or buffers of this process (a list,
    or one of them). Pages merge across all targets together, as KSM merges across processes.

    ``passes`` (>= 2): pass 1 hashes every page, later passes re-check crc32c (a change makes the
    page volatile) and the last one confirms duplicates byte by byte. ``interval``: the least time
    between two visits of the same page, in seconds. ``all_eligible``: also scan KSM-compatible
    memory that is not registered yet ("if you registered it"). ``max_page_sharing``: default the
    kernel's current value. ``progress(pass_no, passes, pages_done, pages_total)`` is called per
    chunk. The targets' memory is only read, never written, and pages not in RAM are not touched.

    ``procfs``: the /proc to read (a path or a :class:`~udedup.host.fs.ProcFs`). ``ksm``: where
    the current max_page_sharing and use_zero_pages are read — a :class:`~udedup.ksm.Ksm`, the
    path of a KSM sysfs directory, or None for ``/sys/kernel/mm/ksm``; unreadable knobs give
    the kernel's defaults (and ``current_use_zero_pages`` None).

    ``recheck``: what the passes after the first re-read. ``"all"``: every page. ``"candidates"``:
    only the pages whose change can alter the prediction, the pages zero in pass 1 and the members
    of candidate duplicate groups; a unique page saves nothing whether it changes or not. The
    prediction (saved pages, rmap items, general_profit, group sizes, the per-target and
    per-mapping savings and saving ranges) is the same as with "all"; ``volatile_pages`` then
    counts only re-checked pages that changed, so unique pages that change are counted in
    ``unique_pages`` (and in ``pages_unshared``) instead, and pages unmapped after pass 1 are
    noticed only among the re-read ones.

    ``range_gap`` (bytes) and ``max_ranges`` shape each target's ``saving_ranges``: saving runs
    closer than ``range_gap`` are joined, and at most ``max_ranges`` ranges are kept per target
    by joining across the smallest gaps (see :class:`~.model.TargetReport`).

    ``domains`` ({pid: trust-domain key}, see :mod:`udedup.host.domains`): also split the saving
    by trust domain (:mod:`.domains`): a content found in several domains is registrable in one
    only, and each target gets ``domain_ranges`` (never containing a page whose content is
    registered elsewhere), ``conflict_ranges`` and ``domain_saved_pages``; ``Estimate.domains``
    sums it up. A target missing from ``domains`` is a domain of its own. With
    ``zero_pages_across_domains`` zero pages are registrable in every domain, else they are one
    content like any other. None (the default): no domain step, the output is unchanged.

    ``fingerprint_pages``: also return, in ``Estimate.fingerprints`` ({pid: (addresses,
    crc32c)}), up to that many pages per process that read the same in every pass, with the
    crc32c they had (no extra read: see :mod:`udedup.daemon.fingerprint`).
    """
    _check_options(passes, interval, recheck, range_gap, max_ranges)
    if domains is not None and not hasattr(domains, "get"):
        raise UsageError(f"domains must map PIDs to domain keys (a dict), got "
                         f"{type(domains).__name__}")
    passes = int(passes)
    sparse = recheck == "candidates"
    procfs = as_procfs(procfs)
    t_wall, t_cpu = time.monotonic(), time.process_time()
    mps, uzp = current_knobs(ksm, procfs, max_page_sharing)
    tlist = read_targets(targets, procfs)
    if threads is None:
        threads = default_threads()
    timings: dict = {}

    def timed(name, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return out

    scope = timed("scope", read_scope, tlist, all_eligible, procfs)
    scope.allocate()
    reads = Passes(scope, procfs, buffer_bytes, cache_bytes, threads, progress)
    confirmer = Confirmer(scope.rep, scope.page_size, reads.cache, reads.heads, reads.members)

    def grouping():
        heads = group(scope.hsh, scope.flags, scope.rep, reads.cache_slots)
        scope.hsh = None     # the keys are the hash array, now sorted: nothing maps back to it
        confirmer.cache_groups(heads)

    try:
        visit = time.monotonic()
        timed("pass_first", reads.first, passes)
        timed("group", grouping)
        for pass_no in range(2, passes + 1):
            # each page is revisited at least `interval` after its previous visit
            wait = visit + interval - time.monotonic()
            if wait > 0:
                timed("wait", time.sleep, wait)
            visit = time.monotonic()
            if pass_no < passes:
                timed("pass_middle", reads.middle, pass_no, passes, sparse)
            else:
                timed("pass_last", reads.last, passes, confirmer, sparse)
        unconfirmed = timed("regroup", confirmer.regroup_leftovers)
        est = timed("summarize", lambda: summarize(
            scope, passes=passes, interval=interval, all_eligible=all_eligible,
            max_page_sharing=mps, use_zero_pages=uzp, unconfirmed=unconfirmed,
            range_gap=int(range_gap), max_ranges=int(max_ranges), exited_in=reads.exited_in,
            domains=domains, zero_pages_across_domains=zero_pages_across_domains))
        est.recheck = recheck
        if fingerprint_pages > 0 and getattr(reads, "final_crc", None) is not None:
            est.fingerprints = timed("fingerprints", scope.fingerprints, reads.final_crc,
                                     int(fingerprint_pages))
        if est.domains is not None:
            timings["domains"] = est.domains.seconds
        est.timings = timings
        est.bytes_read = reads.bytes_read
        est.buffer_bytes = reads.buffer_bytes
    finally:
        confirmer.close()
        reads.close()
    est.elapsed_seconds = time.monotonic() - t_wall
    est.cpu_seconds = time.process_time() - t_cpu
    return est
