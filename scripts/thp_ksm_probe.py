#!/usr/bin/env python3
"""What KSM does to THP-backed memory, measured: which 2 MiB THPs ksmd splits, how many of their
subpages end up on the shared zero page, and the counters, for use_zero_pages 0 and 1.

One anonymous private mapping of this process (MADV_HUGEPAGE, THP ``enabled=madvise``), 2 MiB
aligned, whose THPs hold known mixes of subpages (see KINDS). Per phase (use_zero_pages 0, then 1;
fresh memory each time: a split THP stays split) it estimates the buffer with ``udedup.estimate``
(the prediction, THP part included when the estimator has one), registers it (MADV_MERGEABLE),
lets ksmd merge with pinned fast knobs until settled, stops ksmd and reads: per THP kind the THPs
still huge (kpageflags KPF_THP), the subpages mapping the zero page (pagemap vs the zero page
PFNs), the KSM subpages; the global counters (nothing else may be registered: checked) and
/proc/vmstat thp_split_page / thp_split_page_failed deltas. One subpage of each ``pinned`` THP is
held by a pipe (vmsplice without SPLICE_F_GIFT takes a page reference), so its split must fail.

Run as root, holding the experiment lock (it takes it): ``python scripts/thp_ksm_probe.py
[--thps 8] [--json out.json]``. Every KSM knob it touches is restored (``Ksm.settings``).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time

import numpy as np

from udedup.estimate import estimate as run_estimate
from udedup.host.fs import ProcFs
from udedup.host.maps import read_mappings
from udedup.host.pagemap import (KPF_KSM, KPF_THP, PM_PFN_MASK, PM_PRESENT, open_pagemap,
                                 read_kpageflags, read_pagemap, zero_page_pfns)
from udedup.ksm import Ksm, experiment_lock

PROCFS = ProcFs()
PS = 4096
SUB = 512
THP = SUB * PS

# kind -> list of (subpage class, count) in subpage order; classes: zero, dup (twin in every THP
# of the kind), unique, inside (twin inside the same THP only)
KINDS = {
    "zero": [("zero", 512)],
    "dup_zero": [("dup", 256), ("zero", 256)],
    "unique_zero": [("unique", 256), ("zero", 256)],
    "unique": [("unique", 512)],
    "dup": [("dup", 512)],
    "one_dup": [("dup", 1), ("unique", 511)],
    "one_zero": [("zero", 1), ("unique", 511)],
    "inside": [("inside", 2), ("unique", 510)],
    "pinned": [("dup", 256), ("zero", 256)],
}


def fill(arr: np.ndarray, kinds: list, nthp: int, rng) -> list:
    """Write every THP's subpages; the per-THP class list (for the report)."""
    pages = arr.reshape(-1, PS // 8)
    layout = []
    t = 0
    for ki, kind in enumerate(kinds):
        for copy in range(nthp):
            base = t * SUB
            pos = 0
            for cls, n in KINDS[kind]:
                blk = pages[base + pos: base + pos + n]
                if cls == "zero":
                    blk[:] = 1          # fault in, then zero: a real THP, zero-filled
                    blk[:] = 0
                elif cls == "dup":
                    blk[:] = (np.arange(n, dtype=np.uint64)[:, None] + (ki << 20) + pos + 7) * \
                        np.uint64(0x9E3779B97F4A7C15)
                elif cls == "inside":
                    blk[:] = np.uint64((t << 24) + 0xABCDEF)
                else:
                    blk[:] = rng.integers(0, 2 ** 63, size=blk.shape, dtype=np.uint64)
                pos += n
            layout.append(kind)
            t += 1
    return layout


def page_state(pid: int, lo: int, hi: int):
    fd = open_pagemap(pid)
    try:
        e = read_pagemap(fd, lo, hi)
    finally:
        os.close(fd)
    present = (e & np.uint64(PM_PRESENT)) != 0
    pfn = e & np.uint64(PM_PFN_MASK)
    zero = np.zeros(e.size, dtype=bool)
    for a, b in zero_page_pfns():
        zero |= (pfn >= a) & (pfn < b)
    flags = np.zeros(e.size, dtype=np.uint64)
    real = present & ~zero
    flags[real] = read_kpageflags(pfn[real])
    thp = ((flags >> np.uint64(KPF_THP)) & np.uint64(1)) != 0
    ksm = ((flags >> np.uint64(KPF_KSM)) & np.uint64(1)) != 0
    return present, zero, thp, ksm


def vmstat(procfs: ProcFs = PROCFS) -> dict:
    """The THP split counters of /proc/vmstat (read through ProcFs; its ``name value`` lines split
    here: host.parse has no vmstat parser)."""
    pairs = (line.split() for line in (procfs.global_text("vmstat") or "").splitlines())
    return {k: int(v) for k, v in (p for p in pairs if len(p) == 2)
            if k.startswith(("thp_split", "thp_underused"))}


def anon_huge_kb(lo: int, procfs: ProcFs = PROCFS, pid: int | None = None) -> int:
    """AnonHugePages (KiB) of the mapping of ``pid`` (default: this process) holding ``lo``."""
    for m in read_mappings(os.getpid() if pid is None else pid, procfs):
        if m.start <= lo < m.end:
            return m.anon_huge // 1024
    return 0


def ksm_stat(procfs: ProcFs = PROCFS, pid: int | None = None) -> dict:
    """/proc/PID/ksm_stat of ``pid`` (default: this process), by host.parse.parse_ksm_stat."""
    return procfs.ksm_stat(os.getpid() if pid is None else pid)


def pin(addr: int, pipes: list):
    """Hold a reference on the page at ``addr`` in a pipe (vmsplice, no gift)."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    r, w = os.pipe()
    iov = Iovec(addr, PS)
    n = libc.vmsplice(w, ctypes.byref(iov), 1, 0)
    if n != PS:
        raise OSError(ctypes.get_errno(), "vmsplice")
    pipes.append((r, w))


def settle(ksm: Ksm, min_scans: int = 8, stable: int = 5, timeout: float = 300) -> list:
    """Poll once per full scan until the THP splits, the zero-page mappings and the counters
    stayed the same for ``stable`` scans (at least ``min_scans``); the per-scan trace."""
    start = ksm.stats().full_scans
    last, same, trace = None, 0, []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        scans = ksm.stats().full_scans
        if scans == (trace[-1][0] if trace else None):
            time.sleep(0.02)
            continue
        st = ksm.stats()
        mark = (vmstat().get("thp_split_page"), st.pages_sharing, st.pages_shared,
                st.ksm_zero_pages, st.pages_unshared)
        trace.append((scans,) + mark)
        same = same + 1 if mark == last else 0
        last = mark
        if scans - start >= min_scans and same >= stable:
            break
    return trace


def phase(uzp: int, kinds: list, nthp: int, ksm: Ksm) -> dict:
    rng = np.random.default_rng(uzp + 1)
    n = len(kinds) * nthp
    mm = mmap.mmap(-1, (n + 1) * THP, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    lo = -(-base // THP) * THP
    off = lo - base
    mm.madvise(mmap.MADV_HUGEPAGE, off, n * THP)
    arr = np.frombuffer(mm, dtype=np.uint64, count=n * THP // 8, offset=off)
    layout = fill(arr, kinds, nthp, rng)
    pipes: list = []
    out: dict = {"use_zero_pages": uzp}
    try:
        for t, kind in enumerate(layout):
            if kind == "pinned":
                pin(lo + t * THP + 300 * PS, pipes)      # a zero subpage of the THP
        present, zero, thp, ksm_bit = page_state(os.getpid(), lo, lo + n * THP)
        out["before"] = {"anon_huge_kb": anon_huge_kb(lo), "thp_pages": int(thp.sum()),
                         "zero_mapped": int(zero.sum()), "present": int(present.sum())}
        est = run_estimate([memoryview(arr)],
                                all_eligible=True, passes=2, interval=0.2)
        out["estimate"] = {str(p.use_zero_pages): p.as_dict() for p in est.predictions}
        thp_est = getattr(est, "thp", None)
        if thp_est is not None:
            out["estimate_thp"] = thp_est.as_dict(est.page_size)
        v0 = vmstat()
        mm.madvise(mmap.MADV_MERGEABLE, off, n * THP)
        t0 = time.monotonic()
        with ksm.settings(use_zero_pages=uzp, pages_to_scan=20000, sleep_millisecs=0,
                          smart_scan=0, run=1):
            out["trace"] = settle(ksm)
            ksm.set("run", 0)
            stats = ksm.stats().counters
            out["settle_seconds"] = round(time.monotonic() - t0, 2)
            out["counters"] = {k: stats.get(k) for k in (
                "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "ksm_zero_pages", "general_profit", "full_scans")}
            out["ksm_stat"] = ksm_stat()
            present, zero, thp, ksm_bit = page_state(os.getpid(), lo, lo + n * THP)
            v1 = vmstat()
            out["vmstat_delta"] = {k: v1[k] - v0.get(k, 0) for k in v1}
            out["after"] = {"anon_huge_kb": anon_huge_kb(lo), "thp_pages": int(thp.sum()),
                            "zero_mapped": int(zero.sum()), "ksm_pages": int(ksm_bit.sum()),
                            "present": int(present.sum())}
            per = {}
            for t, kind in enumerate(layout):
                s = slice(t * SUB, (t + 1) * SUB)
                d = per.setdefault(kind, {"thps": 0, "still_huge": 0, "zero_mapped": 0, "ksm": 0})
                d["thps"] += 1
                d["still_huge"] += int(thp[s].all())
                d["zero_mapped"] += int(zero[s].sum())
                d["ksm"] += int(ksm_bit[s].sum())
            out["per_kind"] = per
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        del arr
        mm.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thps", type=int, default=8, help="THPs per kind (default 8)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds")
    ap.add_argument("--uzp", default="0,1", help="use_zero_pages values to run (default 0,1)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    kinds = a.kinds.split(",")
    ksm = Ksm()
    results = []
    with experiment_lock():
        if ksm.stats().as_dict().get("pages_shared"):
            print("other KSM pages exist: the global counters would mix them", file=sys.stderr)
        for uzp in (int(x) for x in a.uzp.split(",")):
            r = phase(uzp, kinds, a.thps, ksm)
            results.append(r)
            print(json.dumps(r, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"thps_per_kind": a.thps, "kinds": {k: KINDS[k] for k in kinds},
                       "phases": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
