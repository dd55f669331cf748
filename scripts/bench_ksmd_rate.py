#!/usr/bin/env python3
"""What ksmd itself costs to merge the daemon benchmark's two "VMs", by what is registered and how
fast ksmd scans. The figures behind the daemon's choices (register ranges, big batches, bursts).

The two 512 MiB processes of scripts/bench_daemon_peers.py (75 % shared image, 10 % zero pages,
15 % private) are started unregistered, afresh for each case; everything is unmerged, the case's
memory is registered by injection, ksmd runs at the case's pages_to_scan / sleep_millisecs, and
ksmd's CPU is read the moment the saving reaches 95 % of the achievable (polled every 2 ms).

  registration  whole    PR_SET_MEMORY_MERGE: every anonymous mapping of the process
                buffer   madvise of the 512 MiB buffer only
                ranges   madvise of the zero and image pages only (what the estimator's saving
                         ranges hold)
  use_zero_pages 0 unless the case says uzp

  python scripts/bench_ksmd_rate.py [--size MIB] [--cases whole:10000:0,ranges:500:20,...] [--out FILE]

Every knob is restored at the end, also on Ctrl-C; the children are killed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import bench_daemon_peers as peers  # noqa: E402

DEFAULT_CASES = ("whole:10000:0,buffer:10000:0,ranges:10000:0,ranges-uzp:10000:0,"
                 "ranges:500:20,ranges:2000:20,ranges:5000:200,ranges:20000:800")


def run_case(ksm, inject, kids, registration, pages_to_scan, sleep_ms, target_pages):
    peers.fresh_start(ksm, {"use_zero_pages": 1 if registration.endswith("-uzp") else 0,
                            "pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_ms,
                            "smart_scan": 1})
    for k in kids:
        start, n = k.info["address"], k.info["pages"]
        kind = registration.split("-")[0]
        if kind == "whole":
            inject.enable(k.pid, mode="prctl")
        elif kind == "buffer":
            inject.enable(k.pid, mode="madvise", ranges=[(start, start + n * peers.PAGE)])
        else:   # the zero pages then the image pages lead the buffer (see bench_daemon_peers)
            keep = int(n * peers.VM_ZERO) + int(n * peers.VM_IMAGE)
            inject.enable(k.pid, mode="madvise", ranges=[(start, start + keep * peers.PAGE)])
    cpu0, t0 = ksm.ksmd_cpu_seconds(), time.monotonic()
    ksm.set("run", 1)
    pass1 = None
    try:
        while time.monotonic() - t0 < 120:
            s = ksm.stats()
            if pass1 is None and s.full_scans >= 1:
                pass1 = ksm.ksmd_cpu_seconds() - cpu0
            if s.saved_pages >= target_pages:
                return time.monotonic() - t0, ksm.ksmd_cpu_seconds() - cpu0, pass1
            time.sleep(0.002)
    finally:
        ksm.set("run", 2)
    return None, ksm.ksmd_cpu_seconds() - cpu0, pass1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="registration:pages_to_scan:sleep_millisecs, comma separated")
    parser.add_argument("--size", type=int, default=512, help="MiB per VM (default 512)")
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--no-lock", action="store_true",
                        help="do not take the KSM experiment lock (the caller holds it already)")
    args = parser.parse_args(argv)
    cases = []
    for item in args.cases.split(","):
        try:
            reg, pts, sleep = item.split(":")
            cases.append((reg, int(pts), int(sleep)))
        except ValueError:
            parser.error(f"bad case {item!r}: use registration:pages_to_scan:sleep_millisecs")
        if reg.split("-")[0] not in ("whole", "buffer", "ranges"):
            parser.error(f"bad registration {reg!r}: whole, buffer or ranges (optionally -uzp)")

    from udedup import inject
    from udedup.ksm import Ksm, experiment_lock
    ksm = Ksm()
    snap = ksm.snapshot()
    lines = [f"ksmd CPU to 95 % of the saving of two {args.size} MiB VMs — {os.uname().release}, "
             f"{os.cpu_count()} CPUs", "",
             f"{'registration':<12} {'pages':>6} {'sleep':>6} {'t95':>7} {'ksmd CPU@95':>12} "
             f"{'pass 1':>7}"]
    try:
        with experiment_lock(enabled=not args.no_lock):
            try:
                for reg, pts, sleep in cases:
                    # fresh processes per case: a registration (PR_SET_MEMORY_MERGE above all)
                    # outlives the case that made it
                    kids = peers.vm_pair(args.size << 20)
                    try:
                        for k in kids:
                            k.wait_ready()
                        # achievable: the image once, the zero pages but one per 256-page group
                        n = kids[0].info["pages"]
                        zero = 2 * int(n * peers.VM_ZERO)
                        achievable = int(n * peers.VM_IMAGE) + zero - -(-zero // 256)
                        t95, cpu, pass1 = run_case(ksm, inject, kids, reg, pts, sleep,
                                                   int(0.95 * achievable))
                    finally:
                        for k in kids:
                            k.stop()
                    line = (f"{reg:<12} {pts:>6} {sleep:>6} "
                            f"{(f'{t95:.2f}s' if t95 is not None else '-'):>7} {cpu:>11.2f}s "
                            f"{(f'{pass1:.2f}s' if pass1 is not None else '-'):>7}")
                    print(line, file=sys.stderr, flush=True)
                    lines.append(line)
            finally:
                # still under the lock: nobody may see this run's knobs
                ksm.set("run", 2)
                ksm.restore(snap)
    finally:
        ksm.set("run", 2)
        ksm.restore(snap)
    lines += ["", "t95: seconds from run=1 to 95 % of the saving; pass 1: ksmd CPU of the first "
              "full scan (a page merges on its second visit)"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
