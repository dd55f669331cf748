#!/usr/bin/env python3
"""Benchmark the estimator against KSM itself, every figure beside its baseline from the same run.

A child process holds SIZE of mixed content, registered with KSM (MADV_MERGEABLE, no THP):
20 % zero pages, 30 % pages drawn from 1024 contents, 10 % pairs, 40 % unique random pages,
interleaved at random.
Then, in this order:

1. plain read loop: process_vm_readv of every present page, chunk by chunk, nothing else;
2. read + fused scan loop: the same reads plus pages.scan_pages (crc32c, hash64, is-zero) per chunk;
3. the estimate (udedup.estimate, default passes and interval) in a fresh Python process, so its
   peak RSS (VmHWM) minus its RSS before scanning, less the fixed read buffer, gives the scanner's
   bytes per scanned page;
4. KSM fast: run=1 pages_to_scan=10000 sleep_millisecs=0 smart_scan=0 until settled: wall time and
   ksmd CPU-seconds until the savings first reached their final value, and those final counters
   against the prediction;
5. KSM at its default rate (pages_to_scan=100 sleep_millisecs=20): one full scan is timed and
   the time to settle extrapolated from the number of pages ksmd needed in step 4.

Every KSM knob is restored and everything unmerged at the end. Needs root and a writable
/sys/kernel/mm/ksm for steps 4-5 (``--no-ksm`` skips them).

    python scripts/bench_estimate.py                 # 4 GiB
    python scripts/bench_estimate.py --size 64M --default-scan sample --json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from udedup import pages

from udedup.host.fs import ProcFs  # noqa: E402
from udedup.host.parse import parse_status, status_kib  # noqa: E402
from udedup.host.pagemap import present_pages, zero_page_pfns  # noqa: E402
from udedup.host.remote import RemoteReader, page_runs, read_ahead  # noqa: E402
from udedup.units import parse_size  # noqa: E402
from udedup.estimate import DEFAULT_CHUNK_BYTES  # noqa: E402
from udedup.ksm import experiment_lock  # noqa: E402

MIX = (("zero", 0.20), ("many", 0.30), ("pairs", 0.10), ("unique", 0.40))


# --- the child ------------------------------------------------------------------------------------
def child(size: int) -> None:
    import mmap
    ps = pages.PAGE_SIZE
    n = size // ps
    mem = mmap.mmap(-1, n * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(getattr(mmap, "MADV_NOHUGEPAGE", 15))
    mem.madvise(getattr(mmap, "MADV_MERGEABLE", 12))
    arr = np.frombuffer(mem, dtype=np.uint8).reshape(n, ps)
    rng = np.random.default_rng(12345)
    # content kinds interleaved at random, as in real memory (ksmd meets them in any order)
    kinds = rng.choice(len(MIX), n, p=[share for _, share in MIX]).astype(np.int8)
    pair_slots = np.flatnonzero(kinds == 2)
    if pair_slots.size % 2:
        kinds[pair_slots[-1]] = 3
        pair_slots = pair_slots[:-1]
    partner = np.zeros(n, dtype=np.int64)
    partner[rng.permutation(pair_slots)] = np.repeat(np.arange(pair_slots.size // 2), 2)
    table = rng.integers(0, 256, (1024, ps), dtype=np.uint8)
    # a pair's content is a window of a random pool shifted by 8 bytes per pair: distinct pages
    pool = rng.integers(0, 256, pair_slots.size * 4 + 2 * ps, dtype=np.uint8)
    windows = np.lib.stride_tricks.sliding_window_view(pool, ps)
    step = 8192
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block, kind = arr[lo:hi], kinds[lo:hi]
        block[kind == 0] = 0
        many = kind == 1
        block[many] = table[rng.integers(0, 1024, int(many.sum()))]
        pairs = np.flatnonzero(kind == 2)
        block[pairs] = windows[partner[lo + pairs] * 8]
        uniq = kind == 3
        block[uniq] = rng.integers(0, 256, (int(uniq.sum()), ps), dtype=np.uint8)
    print(json.dumps({"pid": os.getpid(), "start": int(arr.ctypes.data), "pages": n}), flush=True)
    sys.stdin.read()


def estimate_child(pid: int, max_page_sharing: int | None, threads: int | None) -> None:
    """Run one estimate in this fresh process and report its memory high-water mark."""
    from udedup.estimate import default_threads, estimate
    zero_page_pfns()          # one-time probes, not part of the scan's memory
    with open("/proc/self/status") as f:
        before = status_kib(parse_status(f.read()), "VmRSS")
    est = estimate(pid, max_page_sharing=max_page_sharing, threads=threads)
    with open("/proc/self/status") as f:
        peak = status_kib(parse_status(f.read()), "VmHWM")
    print(json.dumps({"rss_before": before, "peak": peak, "estimate": est.as_dict(),
                      "threads": threads or default_threads()}))


# --- measurements ---------------------------------------------------------------------------------
def read_loop(pid: int, addrs: np.ndarray, chunk_bytes: int, scan: bool,
              ahead: bool = False) -> dict:
    """Read every page chunk by chunk (one iovec per run of pages); optionally scan each chunk;
    optionally read the next chunk in a thread meanwhile (the estimator's read-ahead)."""
    ps = pages.PAGE_SIZE
    cap = max(1, chunk_bytes // ps)
    readers = [RemoteReader(pid, buffer_bytes=cap * ps) for _ in range(2 if ahead else 1)]
    chunks = [(pid, page_runs(addrs[lo:lo + cap], ps), lo) for lo in range(0, addrs.size, cap)]
    crc = np.empty(cap, np.uint32)
    hsh = np.empty(cap, np.uint64)
    zero = np.empty(cap, np.bool_)
    t, c = time.perf_counter(), time.process_time()
    for _, reader, ok in read_ahead(iter(chunks), readers):
        if scan:
            k = ok.size
            pages.scan_pages(reader.buffer[: k * ps], ps, crc_out=crc[:k], hash_out=hsh[:k],
                             zero_out=zero[:k])
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    for r in readers:
        r.close()
    return {"wall": wall, "cpu": cpu, "gbps": addrs.size * ps / wall / 1e9,
            "chunk_bytes": cap * ps, "read_ahead": ahead}


def best_of(n: int, fn, *args) -> dict:
    """The fastest of n runs: the machine is shared, noise only ever adds time."""
    return min((fn(*args) for _ in range(n)), key=lambda r: r["wall"])


def ksm_fast(ksm, pid: int, timeout: float, use_zero_pages: int | None = None) -> dict:
    """Time ksmd from start to the moment its savings reached their final value."""
    ksm.unmerge_all()
    cpu0 = ksm.ksmd_cpu_seconds()
    scanned0 = ksm.stats().pages_scanned
    history = []
    extra = {} if use_zero_pages is None else {"use_zero_pages": use_zero_pages}
    with ksm.settings(run=1, pages_to_scan=10000, sleep_millisecs=0, smart_scan=0, **extra):
        t0 = time.monotonic()
        while True:
            st = ksm.stats()
            now = time.monotonic()
            history.append((now - t0, st.saved_pages, st.pages_shared, ksm.ksmd_cpu_seconds() - cpu0,
                            st.full_scans, st.pages_scanned - scanned0, st))
            final = history[-1][1:3]
            changed_at = max((i for i, h in enumerate(history) if h[1:3] != final), default=-1)
            stable_scans = st.full_scans - history[changed_at + 1][4] if changed_at + 1 < len(
                history) else 0
            if st.full_scans >= 4 and stable_scans >= 3 and st.saved_pages:
                break
            if now - t0 > timeout:
                raise SystemExit(f"KSM did not settle in {timeout} s")
            time.sleep(0.01)
        first = history[changed_at + 1]
        end = history[-1][6]
        per_proc = ProcFs().ksm_stat(pid)
    ksm.unmerge_all()
    return {"wall": first[0], "ksmd_cpu": first[3], "pages_scanned": first[5],
            "full_scans_at_final": first[4], "counters": end.counters, "ksm_stat": per_proc}


def ksm_default_scan(ksm, mode: str, sample_seconds: float) -> dict:
    """One full scan at the default rate (or a sample of it): seconds per page visited."""
    ksm.unmerge_all()
    cpu0 = ksm.ksmd_cpu_seconds()
    with ksm.settings(run=1, pages_to_scan=100, sleep_millisecs=20, smart_scan=0):
        s0 = ksm.stats()
        t0 = time.monotonic()
        while True:
            time.sleep(0.05)
            st = ksm.stats()
            elapsed = time.monotonic() - t0
            if mode == "full" and st.full_scans >= 1:
                break
            if mode == "sample" and elapsed >= sample_seconds:
                break
        cpu = ksm.ksmd_cpu_seconds() - cpu0
    ksm.unmerge_all()
    visited = st.pages_scanned - s0.pages_scanned
    return {"mode": mode, "wall": elapsed, "ksmd_cpu": cpu, "pages_scanned": visited,
            "seconds_per_page": elapsed / max(1, visited)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="4G", help="memory of the child process (default 4G)")
    ap.add_argument("--chunk-bytes", type=parse_size, default=DEFAULT_CHUNK_BYTES,
                    help="chunk of the plain and fused read loops (default: the estimator's)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each read loop, the fastest counts (default 3)")
    ap.add_argument("--threads", type=int, help="estimator threads (default: its own choice)")
    ap.add_argument("--use-zero-pages", type=int, choices=(0, 1),
                    help="use_zero_pages while timing ksmd (default: leave it as it is)")
    ap.add_argument("--no-ksm", action="store_true", help="skip the KSM comparisons")
    ap.add_argument("--default-scan", choices=("full", "sample"), default="full",
                    help="time a whole default-rate full scan, or sample it (--sample-seconds)")
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-lock", action="store_true",
                    help="do not take the KSM test lock (the caller holds it)")
    ap.add_argument("--child", type=parse_size, help=argparse.SUPPRESS)
    ap.add_argument("--estimate-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.estimate_pid:
        estimate_child(args.estimate_pid, args.mps, args.threads)
        return 0

    size = parse_size(args.size)
    results: dict = {"size_bytes": size, "page_size": pages.PAGE_SIZE, "isa": pages.isa(),
                     "cpus": len(os.sched_getaffinity(0))}
    ksm, proc = None, None
    stack = contextlib.ExitStack()
    try:
        if not args.no_ksm:
            from udedup.ksm import Ksm
            ksm = Ksm()
            stack.enter_context(experiment_lock(enabled=not args.no_lock))
            # ksmd stays off until we time it: it must not merge the child before the estimate
            stack.enter_context(ksm.settings(run=0))
            ksm.unmerge_all()
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(size)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = json.loads(proc.stdout.readline())
        pid = info["pid"]
        addrs = present_pages(pid, info["start"], info["start"] + info["pages"] * pages.PAGE_SIZE)
        results["pages"] = int(addrs.size)
        mps = ksm.get("max_page_sharing") if ksm else None

        chunk = args.chunk_bytes
        results["plain_read"] = best_of(args.repeat, read_loop, pid, addrs, chunk, False)
        results["read_scan"] = best_of(args.repeat, read_loop, pid, addrs, chunk, True)
        results["read_scan_ahead"] = best_of(args.repeat, read_loop, pid, addrs, chunk, True,
                                             True)
        cmd = [sys.executable, __file__, "--estimate-pid", str(pid)]
        if mps:
            cmd += ["--mps", str(mps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        est = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        e = est["estimate"]
        scanner_bytes = est["peak"] - est["rss_before"] - e["buffer_bytes"]
        results["estimate"] = {
            "wall": e["elapsed_seconds"], "cpu": e["cpu_seconds"], "threads": est["threads"],
            "timings": e["timings"], "bytes_read": e["bytes_read"],
            "pages_scanned": e["pages_scanned"], "zero_mapped_pages": e["zero_mapped_pages"],
            "peak_rss": est["peak"],
            "rss_before": est["rss_before"], "buffer_bytes": e["buffer_bytes"],
            "index_bytes_per_page": e["bytes_per_page"],
            "peak_bytes_per_page": scanner_bytes / max(1, e["pages_scanned"]),
            "predictions": e["predictions"]}
        if ksm:
            fast = ksm_fast(ksm, pid, args.timeout, args.use_zero_pages)
            default = ksm_default_scan(ksm, args.default_scan, args.sample_seconds)
            results["ksm_fast"] = fast
            default["extrapolated_wall"] = default["seconds_per_page"] * fast["pages_scanned"]
            results["ksm_default"] = default
            uzp = args.use_zero_pages
            if uzp is None:
                uzp = int(ksm.get("use_zero_pages"))
            results["use_zero_pages"] = uzp
            results["accuracy"] = _accuracy(e["predictions"][uzp], fast)
    finally:
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=60)
        stack.close()
    results["ratios"] = _ratios(results)
    results["bench_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        _print(results)
    return 0


def _accuracy(pred: dict, fast: dict) -> dict:
    """Prediction against the settled kernel: the child's own ksm_stat always, the global
    counters when the child is the only registered memory."""
    own, glob = fast["ksm_stat"], fast["counters"]
    pairs = {"ksm_pages_mapped": (pred["pages_shared"] + pred["pages_sharing"],
                                  own.get("ksm_merging_pages")),
             "ksm_zero_pages": (pred["ksm_zero_pages"], own.get("ksm_zero_pages")),
             "rmap_items": (pred["rmap_items"], own.get("ksm_rmap_items"))}
    rmap_global = sum(glob.get(k, 0) for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                               "pages_volatile"))
    if rmap_global == own.get("ksm_rmap_items"):
        for key in ("pages_shared", "pages_sharing", "general_profit"):
            pairs[key] = (pred[key], glob.get(key))
    return {key: {"predicted": p, "kernel": g, "error_percent": _err(p, g)}
            for key, (p, g) in pairs.items()}


def _err(pred, got):
    if got is None:
        return None
    if got == pred:
        return 0.0
    return round(100.0 * abs(pred - got) / max(1, abs(got)), 4)


def _ratios(r: dict) -> dict:
    out = {"read_scan_vs_plain_read": r["plain_read"]["wall"] / r["read_scan"]["wall"],
           "read_scan_ahead_vs_plain_read": r["plain_read"]["wall"] / r["read_scan_ahead"]["wall"],
           "bytes_per_scanned_page": r["estimate"]["peak_bytes_per_page"]}
    if "ksm_fast" in r:
        e, f, d = r["estimate"], r["ksm_fast"], r["ksm_default"]
        out["speedup_vs_ksm_fast"] = f["wall"] / e["wall"]
        out["cpu_fraction_of_ksm_fast"] = e["cpu"] / f["ksmd_cpu"] if f["ksmd_cpu"] else None
        out["speedup_vs_ksm_default"] = d["extrapolated_wall"] / e["wall"]
    return out


def _print(r: dict) -> None:
    gib = r["size_bytes"] / (1 << 30)
    print(f"memory: {gib:.3g} GiB, {r['pages']} present pages of {r['page_size']} B, isa "
          f"{r['isa']}, {r['cpus']} CPUs")
    for key, label in (("plain_read", "plain process_vm_readv loop"),
                       ("read_scan", "read + fused scan loop"),
                       ("read_scan_ahead", "read + fused scan, read-ahead")):
        x = r[key]
        print(f"{label:<31} {x['wall']:.3f} s ({x['gbps']:.2f} GB/s), CPU {x['cpu']:.3f} s, "
              f"chunk {x['chunk_bytes'] >> 10} KiB")
    e = r["estimate"]
    print(f"estimate ({e['threads']} thread(s)): {e['wall']:.3f} s wall, {e['cpu']:.3f} CPU-s, "
          f"{e['pages_scanned']} pages, {e['bytes_read'] / max(1, e['pages_scanned']) / r['page_size']:.2f}"
          f" page reads per page; phases " +
          ", ".join(f"{k} {v:.3f}" for k, v in e["timings"].items()))
    print(f"scanner peak RSS {e['peak_rss'] / 2**20:.1f} MiB (before scan "
          f"{e['rss_before'] / 2**20:.1f} MiB, fixed buffers {e['buffer_bytes'] >> 10} KiB): "
          f"{e['peak_bytes_per_page']:.1f} B per scanned page (index arrays "
          f"{e['index_bytes_per_page']:.1f})")
    if "ksm_fast" in r:
        f, d = r["ksm_fast"], r["ksm_default"]
        print(f"KSM pages_to_scan=10000 sleep=0: final savings after {f['wall']:.3f} s, ksmd "
              f"{f['ksmd_cpu']:.2f} CPU-s, {f['pages_scanned']} pages visited "
              f"(full_scans {f['full_scans_at_final']})")
        print(f"KSM default rate: {d['mode']} scan of {d['pages_scanned']} pages in "
              f"{d['wall']:.1f} s ({d['ksmd_cpu']:.2f} ksmd CPU-s) -> {d['extrapolated_wall']:.1f}"
              " s to final savings (extrapolated)")
        print(f"prediction vs settled kernel (use_zero_pages={r['use_zero_pages']}):")
        for key, a in r["accuracy"].items():
            print(f"  {key}: predicted {a['predicted']}, kernel {a['kernel']} "
                  f"(error {a['error_percent']} %)")
    print("ratios:")
    for key, value in r["ratios"].items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
