"""True savings on live QEMU guests: the host's AnonPages drop against udedup's true saving and KSM's
counters, per use_zero_pages.

Boots N guests from the VM lab's image (udedup.ab.vmlab: Debian kernel, busybox initramfs with
shared files, unique data and volatile memory; TCG; QEMU registers guest RAM and asks for THP),
then, holding the experiment lock and with no other process registered with KSM: unmerges, reads
the true saving and AnonPages, runs ksmd flat out until it settles, stops it and reads them again.
An independent check counts the distinct physical frames (pagemap PFNs, the zero page excluded)
behind the guests' mergeable memory before and after. Every knob is restored and every guest
killed, also on failure. Results: docs/results/true_savings_vms.txt.

    python scripts/truth_vms.py --use-zero-pages 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

from udedup.ab import vmlab, vms
from udedup.host import pagemap as pm
from udedup.host.fs import ProcFs
from udedup.host.maps import read_mappings
from udedup.ksm import Ksm, experiment_lock
from udedup.ksm.truth import TrueSavingsReader

MIB = 1 << 20


def mergeable_pids(fs: ProcFs) -> list[int]:
    out = []
    for pid in fs.pids():
        st = fs.maybe_ksm_stat(pid)
        if st and (st.get("ksm_mergeable") is True or st.get("ksm_merge_any") is True):
            out.append(pid)
    return out


def distinct_frames(pids) -> int:
    """Distinct physical frames (not the zero pages) behind the mergeable memory of ``pids``."""
    zero = pm.zero_page_pfns()
    parts = []
    for pid in pids:
        fd = pm.open_pagemap(pid)
        try:
            for m in read_mappings(pid):
                if not m.registered:
                    continue
                e = pm.read_pagemap(fd, m.start, m.end)
                pfn = e[(e & np.uint64(pm.PM_PRESENT)) != 0] & np.uint64(pm.PM_PFN_MASK)
                for first, stop in zero:
                    pfn = pfn[(pfn < first) | (pfn >= stop)]
                parts.append(pfn)
        finally:
            os.close(fd)
    return int(np.unique(np.concatenate(parts)).size) if parts else 0


def boot(n: int, memory: int, folder: str) -> list[subprocess.Popen]:
    img = vmlab.ensure_image(96 * MIB)
    guests = []
    for g in range(n):
        serial = os.path.join(folder, f"serial{g}.txt")
        open(serial, "w").close()
        argv = vms.qemu_argv("qemu-system-x86_64", "tcg", memory, img.kernel, img.initrd,
                             vmlab.guest_cmdline(g, 48, 32, 1024), serial, name=f"truth-vm{g}")
        guests.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True))
    t0 = time.monotonic()
    while not all(vmlab.READY_MARKER in open(os.path.join(folder, f"serial{g}.txt"),
                                             errors="replace").read() for g in range(n)):
        if time.monotonic() - t0 > 240 or any(p.poll() is not None for p in guests):
            raise SystemExit("the guests did not boot")
        time.sleep(0.5)
    return guests


def trial(uzp: int, guests: int, memory: int, folder: str) -> dict:
    fs = ProcFs()
    procs = boot(guests, memory, folder)
    try:
        time.sleep(15)                  # let the guests' boot-time churn pass
        pids = [p.pid for p in procs]
        ksm = Ksm()
        with ksm.settings(allow_unmerge=True, use_zero_pages=uzp, pages_to_scan=20000,
                          sleep_millisecs=0, smart_scan=0, advisor_mode="none", run=2):
            ksm.set("run", 0)
            reader = TrueSavingsReader(ksm)
            a0 = fs.meminfo()["AnonPages"]
            time.sleep(5)
            drift = fs.meminfo()["AnonPages"] - a0
            frames0 = distinct_frames(pids)
            base, anon0 = reader.read(), fs.meminfo()["AnonPages"]
            ksm.set("run", 1)
            t1 = time.monotonic()
            ksm.wait_settled(timeout=120)
            settle = time.monotonic() - t1
            ksm.set("run", 0)
            time.sleep(0.5)
            anon1, truth = fs.meminfo()["AnonPages"], reader.read()
            frames1 = distinct_frames(pids)
            reads = [reader.read().read_seconds for _ in range(20)]
            others = sorted(set(mergeable_pids(fs)) - set(pids))
            status = subprocess.run([sys.executable, "-m", "udedup", "status", "--json", "--top", "0",
                                     "--interval", "0"], capture_output=True, text=True, check=True)
            shown = json.loads(status.stdout)
            ksm.set("run", 2)
        return {"use_zero_pages": uzp, "guests": guests, "memory_mib": memory // MIB,
                "settle_seconds": round(settle, 1),
                "anonpages_drift_5s_before_mib": round(drift / MIB, 2),
                "anonpages_drop_mib": round((anon0 - anon1) / MIB, 2),
                "true_saving_change_mib": round((truth.saved_bytes - base.saved_bytes) / MIB, 2),
                "status_saved_mib": round(shown["saved_bytes"] / MIB, 2),
                "status_general_profit_mib": round(shown["general_profit_bytes"] / MIB, 2),
                "ksm_counters_mib": round(truth.ksm_counter_bytes / MIB, 2),
                "zero_mapped_pages_before": base.zero_mapped_pages,
                "zero_mapped_pages_after": truth.zero_mapped_pages,
                "distinct_frames_drop_mib": round((frames0 - frames1) * ksm.page_size / MIB, 2),
                "true_read_ms_median": round(statistics.median(reads) * 1e3, 2),
                "true_read_ms_max": round(max(reads) * 1e3, 2), "method": truth.method,
                "other_mergeable_processes": others}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--use-zero-pages", type=int, nargs="+", default=[0, 1], choices=(0, 1))
    ap.add_argument("--guests", type=int, default=2)
    ap.add_argument("--memory", type=int, default=384, help="MiB per guest (default 384)")
    ap.add_argument("--folder", default="/tmp/udedup-truth-vms", help="serial console logs")
    ap.add_argument("--no-lock", action="store_true", help="the caller holds the experiment lock")
    ap.add_argument("--wait", type=float, default=400.0,
                    help="seconds to wait for other KSM-registered processes to go (default 400)")
    args = ap.parse_args(argv)
    os.makedirs(args.folder, exist_ok=True)
    fs = ProcFs()
    with experiment_lock(enabled=not args.no_lock):
        for uzp in args.use_zero_pages:
            t0 = time.monotonic()
            while mergeable_pids(fs):       # their pages would be in the global counters
                if time.monotonic() - t0 > args.wait:
                    raise SystemExit(f"other processes stay registered with KSM: {mergeable_pids(fs)}")
                time.sleep(2)
            print(json.dumps(trial(uzp, args.guests, args.memory * MIB, args.folder)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
