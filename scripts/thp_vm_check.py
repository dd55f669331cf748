#!/usr/bin/env python3
"""``udedup scan`` against what ksmd then does, on live QEMU guests (THP-backed RAM).

Per use_zero_pages value (fresh guests each time: a split THP stays split): boot N TCG guests from
the VM lab image (udedup.ab.vmlab: Debian kernel, busybox initramfs with shared files, unique data,
zero memory and a little volatile memory), wait until ready and a few seconds more, then under the
experiment lock: read the baseline (host AnonPages, the guests' zero-page mappings), estimate the
guests (what ``udedup scan PID PID`` does), let ksmd merge flat out (pinned knobs) until settled
(live-memory settle detection), stop ksmd, and compare the prediction with the counters, the true
saving (counters plus zero-page mappings outside KSM) and the AnonPages drop. Every guest is
killed at the end.

Run as root: ``python scripts/thp_vm_check.py [--guests 2] [--uzp 0,1] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from udedup.ab import vmlab
from udedup.ab.vms import VmSpec, qemu_argv
from udedup.estimate import estimate
from udedup.host.maps import read_mappings
from udedup.host.parse import parse_meminfo
from udedup.ksm import Ksm, experiment_lock
from udedup.ksm.truth import true_savings

MIB = 1 << 20


def anon_pages_bytes() -> int:
    with open("/proc/meminfo") as f:
        return parse_meminfo(f.read()).get("AnonPages", 0)


def boot(spec: VmSpec, image, tmp: str, timeout: float = 300) -> list:
    qemu = shutil.which("qemu-system-x86_64")
    procs = []
    for i in range(spec.guests):
        serial = os.path.join(tmp, f"guest{i}.log")
        append = vmlab.guest_cmdline(i, spec.unique // MIB, spec.zero // MIB, spec.volatile // 1024)
        # mem-merge=off: guest RAM is registered only under the lock, after the estimate (ksmd may
        # run for someone else meanwhile: it must not touch these guests before)
        argv = qemu_argv(qemu, "tcg", spec.memory, image.kernel, image.initrd, append, serial,
                         name=f"udedup-thpcheck-{i}") + ["-machine", "mem-merge=off"]
        procs.append((subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL), serial))
    end = time.monotonic() + timeout
    waiting = {p.pid for p, _ in procs}
    while waiting and time.monotonic() < end:
        for p, serial in procs:
            if p.pid in waiting:
                try:
                    with open(serial, "rb") as f:
                        if vmlab.READY_MARKER.encode() in f.read():
                            waiting.discard(p.pid)
                except OSError:
                    pass
                if p.poll() is not None:
                    raise RuntimeError(f"guest {p.pid} exited ({p.returncode})")
        time.sleep(0.5)
    if waiting:
        raise RuntimeError(f"guests {sorted(waiting)} not ready after {timeout} s")
    return [p for p, _ in procs]


def phase(uzp: int, spec: VmSpec, image, settle_wait: float, ksm: Ksm) -> dict:
    out: dict = {"use_zero_pages": uzp}
    with tempfile.TemporaryDirectory(prefix="udedup-thpcheck-") as tmp:
        t0 = time.monotonic()
        guests = boot(spec, image, tmp)
        out["boot_seconds"] = round(time.monotonic() - t0, 1)
        try:
            time.sleep(settle_wait)
            pids = [p.pid for p in guests]
            with experiment_lock():
                with ksm.settings(run=0, use_zero_pages=uzp, pages_to_scan=10000,
                                  sleep_millisecs=0, smart_scan=0):
                    ksm.unmerge_all()
                    anon0 = anon_pages_bytes()
                    base = true_savings(ksm, pids=pids)
                    out["before"] = per_process(pids)
                    est = estimate(pids, passes=2, interval=1.0, all_eligible=True)
                    out["others_registered"] = others(pids)
                    pred = est.predicted(bool(uzp))
                    out["prediction"] = pred.as_dict()
                    out["thp"] = est.thp.as_dict(est.page_size) if est.thp else None
                    out["notes"] = est.notes
                    out["scanned_pages"] = est.pages_scanned
                    t1 = time.monotonic()
                    subprocess.run([sys.executable, "-m", "udedup", "enable", "-q", "--mode",
                                    "madvise", *map(str, pids)], check=True)
                    ksm.set("run", 1)
                    ksm.wait_settled(timeout=600, stable_scans=4, min_scans=6)
                    ksm.set("run", 0)
                    out["merge_seconds"] = round(time.monotonic() - t1, 1)
                    st = ksm.stats()
                    after = true_savings(ksm, pids=pids, stats=st)
                    anon1 = anon_pages_bytes()
                    out["after"] = per_process(pids)
                    out["others_registered_after"] = others(pids)
                    ps = est.page_size
                    out["measured"] = {
                        "pages_shared": st.pages_shared, "pages_sharing": st.pages_sharing,
                        "pages_unshared": st.pages_unshared, "ksm_zero_pages": st.ksm_zero_pages,
                        "general_profit": st.general_profit, "rmap_items": st.rmap_items,
                        "zero_mapped_outside_ksm": after.zero_mapped_pages - base.zero_mapped_pages,
                        "true_saved_bytes": after.saved_bytes - base.saved_bytes,
                        "anon_pages_drop_bytes": anon0 - anon1}
                    m = out["measured"]
                    mine = out["after"]
                    m["guests_merging_pages"] = sum(g["ksm_merging_pages"] for g in mine)
                    m["guests_ksm_zero_pages"] = sum(g["ksm_zero_pages"] for g in mine)
                    m["guests_rmap_items"] = sum(g["ksm_rmap_items"] for g in mine)
                    m["guests_huge_pages_lost"] = (sum(g["anon_huge_pages"] for g in out["before"])
                                                   - sum(g["anon_huge_pages"] for g in mine)) // 512
                    out["error_percent_per_process"] = {
                        "merging_pages": _err(pred.pages_shared + pred.pages_sharing,
                                              m["guests_merging_pages"]),
                        "ksm_zero_pages": _err(pred.ksm_zero_pages, m["guests_ksm_zero_pages"]),
                        "rmap_items": _err(pred.rmap_items, m["guests_rmap_items"]),
                        "huge_pages_lost": _err(pred.thps_split, m["guests_huge_pages_lost"])}
                    out["error_percent"] = {
                        "real_saved_vs_true": _err(pred.real_saved_bytes, m["true_saved_bytes"]),
                        "real_saved_vs_anon_drop": _err(pred.real_saved_bytes,
                                                        m["anon_pages_drop_bytes"]),
                        "thp_zero_pages": _err(pred.thp_zero_pages,
                                               m["zero_mapped_outside_ksm"]),
                        "pages_shared": _err(pred.pages_shared, m["pages_shared"]),
                        "pages_sharing": _err(pred.pages_sharing, m["pages_sharing"]),
                        "ksm_zero_pages": _err(pred.ksm_zero_pages, m["ksm_zero_pages"]),
                        "general_profit": _err(pred.general_profit, m["general_profit"])}
                    del ps
                    ksm.unmerge_all()
        finally:
            for p in guests:
                p.kill()
            for p in guests:
                p.wait()
    return out


def per_process(pids) -> list:
    out = []
    for pid in pids:
        st = {}
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                k, _, v = line.replace(":", " ").partition(" ")
                st[k] = v.strip()
        huge = sum(m.anon_huge for m in read_mappings(pid))
        out.append({"pid": pid, "ksm_rmap_items": int(st["ksm_rmap_items"]),
                    "ksm_merging_pages": int(st["ksm_merging_pages"]),
                    "ksm_zero_pages": int(st["ksm_zero_pages"]), "anon_huge_pages": huge // 4096})
    return out


def others(pids) -> list:
    """Other processes KSM tracks pages of (their pages mix into the global counters)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in pids:
            continue
        try:
            with open(f"/proc/{d}/ksm_stat") as f:
                text = f.read()
            with open(f"/proc/{d}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("ksm_rmap_items") and int(line.split()[-1]):
                found.append({"pid": int(d), "comm": comm, "rmap_items": int(line.split()[-1])})
    return found


def _err(pred, real):
    if real in (None, 0):
        return None if pred else 0.0
    return round(100.0 * (pred - real) / abs(real), 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=2)
    ap.add_argument("--uzp", default="0,1")
    ap.add_argument("--wait", type=float, default=10.0, help="seconds after ready (default 10)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    spec = VmSpec(guests=a.guests).validate()
    image = vmlab.ensure_image(spec.shared, spec.shared_seed)
    ksm = Ksm()
    results = []
    for uzp in (int(x) for x in a.uzp.split(",")):
        r = phase(uzp, spec, image, a.wait, ksm)
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"spec": spec.as_dict(), "image": image.as_dict(), "phases": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
