"""What reading the true saving costs (udedup.ksm.truth), so it can be sampled every 0.1 s.

Maps SIZE of mergeable memory in this process (written, so every page is present), once with
MADV_NOHUGEPAGE and once with MADV_HUGEPAGE, and times TrueSavingsReader.read() with the mg ranges
cached (what a sampler pays every sample), a one-shot read (smaps each time), and the pagemap walk
by PAGEMAP_SCAN against pread + numpy over the PFNs, in the same run. Registers memory without
starting ksmd; holds the experiment lock (--no-lock when the caller holds it).

    python scripts/bench_truth.py --size 4G
"""
from __future__ import annotations

import argparse
import os

from udedup.bench import median_ms
from udedup.host import pagemap as pm
from udedup.ksm import Ksm, experiment_lock
from udedup.ksm.memory import MergeableBuffer
from udedup.ksm.truth import TrueSavingsReader, true_savings
from udedup.units import parse_size


def _ms(fn, repeat: int) -> float:
    return median_ms(fn, repeat)[0]


def measure(size: int, hugepages: bool, repeat: int) -> dict:
    buf = MergeableBuffer(size, hugepages=hugepages)
    try:
        pages = buf.array("u1").reshape(-1, buf.page_size)
        pages[:, 0] = 1                 # every page present and written
        del pages
        ksm = Ksm()
        reader = TrueSavingsReader(ksm, pids=[os.getpid()])
        reader.read()
        ranges = [(buf.address, buf.address + buf.nbytes)]
        fd = pm.open_pagemap(os.getpid())
        zero = pm.zero_page_pfns()
        try:
            out = {"size": size, "hugepages": hugepages,
                   "cached_read_ms": _ms(reader.read, repeat),
                   "one_shot_read_ms": _ms(lambda: true_savings(ksm, pids=[os.getpid()]),
                                           max(1, repeat // 4)),
                   "pagemap_scan_ms": _ms(lambda: pm.scan_zero_mapped(fd, ranges), repeat),
                   "pread_numpy_ms": (_ms(lambda: pm.count_zero_mapped(fd, os.getpid(), ranges,
                                                                       zero), repeat)
                                      if zero else None),
                   "all_processes_cached_ms": None}
            everyone = TrueSavingsReader(ksm)
            everyone.read()
            out["all_processes_cached_ms"] = _ms(everyone.read, repeat)
        finally:
            os.close(fd)
        return out
    finally:
        buf.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G", help="mergeable memory to map (default 4G)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-lock", action="store_true", help="the caller holds the experiment lock")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    with experiment_lock(enabled=not args.no_lock):
        for huge in (False, True):
            r = measure(size, huge, args.repeat)
            fmt = lambda v: "n/a" if v is None else f"{v:.2f} ms"  # noqa: E731
            print(f"{size / 2**30:.2f} GiB {'THP' if huge else '4 KiB pages'}: cached read "
                  f"{fmt(r['cached_read_ms'])} (every process: {fmt(r['all_processes_cached_ms'])}), "
                  f"one-shot {fmt(r['one_shot_read_ms'])}; pagemap walk: PAGEMAP_SCAN "
                  f"{fmt(r['pagemap_scan_ms'])}, pread + numpy {fmt(r['pread_numpy_ms'])}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
