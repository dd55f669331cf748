"""What one exact attribution read costs (udedup.ksm.attribution), to run it every daemon round.

Maps SIZE of mergeable memory in this process (MADV_NOHUGEPAGE): the first half random pages, the
second half a copy of it, so that once merged every page maps a KSM page mapped twice (the worst
case for the kpageflags/kpagecount reads: one KSM frame per two pages, scattered). Times a
cached ``AttributionReader.read()`` (a daemon round) before merging (no frame is mapped twice:
only the pagemap), then merges
(pinned knobs, the experiment lock; --no-lock when the caller holds it), stops ksmd and times it
again, for this process alone and for every process, and checks the total against the counters.

    python scripts/bench_attribution.py --size 4G
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from udedup.bench import median_ms as _ms
from udedup.ksm import Ksm, experiment_lock
from udedup.ksm.attribution import AttributionReader, attribute
from udedup.ksm.memory import MergeableBuffer
from udedup.units import parse_size


def measure(size: int, repeat: int, timeout: float) -> dict:
    ksm = Ksm()
    me = [os.getpid()]
    buf = MergeableBuffer(size)
    try:
        pages = buf.array("u1").reshape(-1, buf.page_size)
        half = pages.shape[0] // 2
        rng = np.random.default_rng(1)
        for lo in range(0, half, 16384):    # 64 MiB of random pages at a time
            pages[lo:min(half, lo + 16384)] = rng.integers(
                0, 256, (min(half, lo + 16384) - lo, buf.page_size), dtype=np.uint8)
        pages[half:2 * half] = pages[:half]
        del pages
        reader = AttributionReader(ksm, pids=me)   # what a daemon round pays: smaps kept
        reader.read()
        out = {"size": size, "unmerged_ms": _ms(reader.read, repeat)[0]}
        with ksm.settings(use_zero_pages=0, pages_to_scan=20000, sleep_millisecs=0,
                          smart_scan=0, run=1):
            try:
                t0 = time.monotonic()
                ksm.wait_settled(timeout=timeout)
                out["merge_seconds"] = time.monotonic() - t0
                ksm.set("run", 0)
                out["merged_ms"], mine = _ms(reader.read, repeat)
                out["one_shot_ms"] = _ms(lambda: attribute(ksm, pids=me), repeat)[0]
                everyone = AttributionReader(ksm)
                everyone.read()
                out["all_processes_ms"], everyone = _ms(everyone.read, repeat)
            finally:
                ksm.set("run", 2)
        out["ksm_mappings"] = mine.processes[0].ksm_mappings if mine.processes else 0
        out["check"] = everyone.check()
        return out
    finally:
        buf.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G", help="mergeable memory to map (default 2G)")
    ap.add_argument("--repeat", type=int, default=5, help="reads per figure (median)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for merging")
    ap.add_argument("--no-lock", action="store_true", help="the caller holds the experiment lock")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    with experiment_lock(enabled=not args.no_lock):
        r = measure(size, args.repeat, args.timeout)
    c = r["check"]
    print(f"{size >> 20} MiB mergeable, cached read (a daemon round): {r['unmerged_ms']:.1f} ms "
          f"unmerged, {r['merged_ms']:.1f} ms merged ({r['ksm_mappings']} KSM mappings), every "
          f"process {r['all_processes_ms']:.1f} ms; one-shot attribute() {r['one_shot_ms']:.1f} "
          f"ms; merged in {r['merge_seconds']:.1f} s; check: "
          f"{c['attributed_pages']:.0f} attributed vs {c['true_saved_pages']} true "
          f"({c['difference_pages']:+.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
