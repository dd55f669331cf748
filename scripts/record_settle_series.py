#!/usr/bin/env python3
"""Record KSM's counters while live memory merges: the series ``tests/test_settle.py`` checks the
settle detector on (``tests/data/settle_live.csv``).

Two child processes hold ``--dup-mib`` of identical content (every page distinct within a process,
so each page saves one), ``--unique-mib`` of their own, and ``--volatile-mib`` they rewrite with new
content every 10 ms (never mergeable); each also rewrites ``--churn`` random pages of the duplicate
part per second with the bytes they already hold: the write breaks copy-on-write, and ksmd merges
the page again two visits later. That is how live memory (a guest's page cache, stacks, heaps)
looks to ksmd: a plateau that moves by a few pages per full scan forever, never equal twice.

Under the experiment lock, with the knobs pinned as ``udedup ab`` pins them (and restored after):
unmerge, start the children, ``run=1``, sample every ``--interval`` s for ``--seconds`` s.

    python scripts/record_settle_series.py --out tests/data/settle_live.csv
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from udedup.ab.sampler import other_mergeable_processes
from udedup.ksm import Ksm, experiment_lock

CHILD = r"""
import mmap, random, sys, time
dup_mib, unique_mib, volatile_mib, churn, seed = map(int, sys.argv[1:6])
PS = mmap.PAGESIZE
def region(mib):
    m = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    return m
dup, uniq, vol = region(dup_mib), region(unique_mib), region(volatile_mib)
dup[:] = random.Random(1).randbytes(len(dup))          # the same in both children
uniq[:] = random.Random(1000 + seed).randbytes(len(uniq))
for m in (dup, uniq, vol):
    m.madvise(mmap.MADV_MERGEABLE)
rng, pages, n, due = random.Random(seed), len(dup) // PS, 0, 0.0
print("ready", flush=True)
while True:
    n += 1
    for off in range(0, len(vol), PS):
        vol[off:off + 8] = n.to_bytes(8, "little")
    due += churn / 100                                  # one round per 10 ms
    while due >= 1:
        due -= 1
        off = rng.randrange(pages) * PS
        dup[off:off + 8] = dup[off:off + 8]             # same bytes: only the COW break
    time.sleep(0.01)
"""

KNOBS = {"advisor_mode": "none", "pages_to_scan": 4000, "sleep_millisecs": 10, "smart_scan": 0,
         "use_zero_pages": 0}
COLUMNS = ("t", "full_scans", "pages_shared", "pages_sharing", "ksm_zero_pages")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dup-mib", type=int, default=200)
    ap.add_argument("--unique-mib", type=int, default=16)
    ap.add_argument("--volatile-mib", type=int, default=4)
    ap.add_argument("--churn", type=int, default=30, help="pages rewritten per second per child")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=0.1)
    args = ap.parse_args(argv)
    ksm = Ksm()
    knobs = {k: v for k, v in KNOBS.items() if k in ksm.knob_names()}
    rows, children = [], []
    with experiment_lock():
        others = other_mergeable_processes()
        try:
            with ksm.settings(allow_unmerge=True, run=0, **knobs):
                ksm.unmerge_all()
                for seed in (1, 2):
                    children.append(subprocess.Popen(
                        [sys.executable, "-c", CHILD, str(args.dup_mib), str(args.unique_mib),
                         str(args.volatile_mib), str(args.churn), str(seed)],
                        stdout=subprocess.PIPE, text=True))
                for child in children:
                    if child.stdout.readline().strip() != "ready":
                        raise SystemExit("a child failed to start")
                t0 = time.monotonic()
                ksm.set("run", 1)
                while time.monotonic() - t0 < args.seconds:
                    st = ksm.stats()
                    rows.append((round(st.timestamp - t0, 3), st.full_scans, st.pages_shared,
                                 st.pages_sharing, st.ksm_zero_pages))
                    time.sleep(args.interval)
                ksm.set("run", 0)
        finally:
            for child in children:
                child.kill()
                child.wait()
            ksm.unmerge_all()
    with open(args.out, "w") as f:
        f.write(f"# scripts/record_settle_series.py {' '.join(argv or sys.argv[1:])}; knobs {knobs}; "
                f"other KSM-registered processes: {[o['comm'] for o in others] or 'none'}\n")
        f.write(",".join(COLUMNS) + "\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")
    print(f"{len(rows)} samples, full_scans {rows[0][1]}..{rows[-1][1]}, pages_sharing "
          f"{min(r[3] for r in rows)}..{max(r[3] for r in rows)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
