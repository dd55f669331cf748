#!/usr/bin/env python3
"""Benchmark the remote read path per instruction-set level, against a plain read loop of the same run.

A child process holds SIZE of random pages (anonymous, MADV_NOHUGEPAGE). Per repetition, in turn:

1. ``readv``: process_vm_readv of every page into one reusable buffer (udedup.host.remote
   RemoteReader, ``--buffer`` bytes per call), nothing else: the baseline;
2. per level this CPU runs (``--levels``): ``readv+scan`` the same reads, each followed by the
   fused scan (crc32c, hash64, is-zero) of the buffer in the same thread;
3. per level: ``read_ahead+scan`` with two readers, the reads in udedup's read-ahead thread while
   this thread scans the previous buffer.

Repetitions are interleaved so drift hits every row alike; each figure is the median and is
printed beside its ratio to ``readv`` (1.0 means the scan costs nothing on top of the reads).
Reading needs ptrace access to the child (root, or ptrace_scope 0). Touches no KSM knob.

    python scripts/bench_remote.py                        # 1 GiB, every level, 7 runs
    python scripts/bench_remote.py --size 64M --runs 3 --levels avx2,sse4.2 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from udedup import pages  # noqa: E402
from udedup.bench import levels  # noqa: E402
from udedup.errors import UsageError  # noqa: E402
from udedup.host.remote import DEFAULT_BUFFER_BYTES, RemoteReader, read_ahead  # noqa: E402
from udedup.units import parse_size  # noqa: E402

# The child maps and fills SIZE bytes, prints the address, then waits for its stdin to close.
_CHILD = """
import mmap, sys
import numpy as np
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
a = np.frombuffer(m, dtype=np.uint64)
rng = np.random.default_rng(7)
for lo in range(0, a.size, 1 << 22):
    a[lo:lo + (1 << 22)] = rng.integers(0, 2**64, min(1 << 22, a.size - lo), dtype=np.uint64)
import ctypes
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


class Child:
    """The target process; killed on exit whatever happens."""

    def __init__(self, nbytes: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(nbytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip():
            self.close()
            raise RuntimeError("the target process did not start")
        self.addr = int(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _chunks(pid, addrs, per):
    for lo in range(0, addrs.size, per):
        yield pid, addrs[lo:lo + per], lo


def readv_only(pid, addrs, readers):
    r = readers[0]
    for lo in range(0, addrs.size, r.capacity):
        r.read(addrs[lo:lo + r.capacity], pid)


def readv_scan(pid, addrs, readers):
    r, ps = readers[0], readers[0].page_size
    for lo in range(0, addrs.size, r.capacity):
        ok = r.read(addrs[lo:lo + r.capacity], pid)
        pages.scan_pages(r.buffer[: ok.size * ps], ps)


def ahead_scan(pid, addrs, readers):
    ps = readers[0].page_size
    for _tag, reader, ok in read_ahead(_chunks(pid, addrs, readers[0].capacity), readers):
        pages.scan_pages(reader.buffer[: ok.size * ps], ps)


def _at(isa, fn):
    def call(*args):
        with pages.implementation(isa=isa):
            return fn(*args)
    return call


def measure(size: int, runs: int, isas: list[str], buffer_bytes: int = DEFAULT_BUFFER_BYTES,
            progress=None) -> list[dict]:
    """One row per method (and level); ``ratio_to_readv`` is readv's median time over the row's."""
    ps = pages.PAGE_SIZE
    size = max(ps, size - size % ps)
    methods = [("readv", None, readv_only)]
    for isa in isas:
        methods += [("readv+scan", isa, _at(isa, readv_scan)),
                    ("read_ahead+scan", isa, _at(isa, ahead_scan))]
    with Child(size) as child:
        addrs = np.arange(child.addr, child.addr + size, ps, dtype=np.uint64)
        readers = [RemoteReader(child.proc.pid, buffer_bytes) for _ in range(2)]
        try:
            times = {(name, isa): [] for name, isa, _ in methods}
            for _name, _isa, fn in methods:   # warm up: code, page tables, caches
                fn(child.proc.pid, addrs, readers)
            for rep in range(runs):
                for name, isa, fn in methods:
                    if progress:
                        progress(f"run {rep + 1}/{runs} {name} {isa or ''}")
                    t0 = time.perf_counter()
                    fn(child.proc.pid, addrs, readers)
                    times[(name, isa)].append(time.perf_counter() - t0)
        finally:
            for r in readers:
                r.close()
    base = statistics.median(times[("readv", None)])
    rows = []
    for (name, isa), samples in times.items():
        secs = statistics.median(samples)
        impl = None
        if isa:
            with pages.implementation(isa=isa):
                impl = pages.crc32c_impl()
        rows.append({"method": name, "isa": isa, "crc32c_impl": impl, "bytes": size,
                     "runs": runs, "buffer_bytes": buffer_bytes, "seconds": secs,
                     "gbps": size / secs / 1e9, "ratio_to_readv": base / secs})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'method':<18}{'level':<10}{'crc32c':<15}{'GB/s':>8}{'x readv':>10}"]
    for r in rows:
        lines.append(f"{r['method']:<18}{r['isa'] or '-':<10}{r['crc32c_impl'] or '-':<15}"
                     f"{r['gbps']:>8.2f}{r['ratio_to_readv']:>10.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="bytes the target holds (default 1G)")
    ap.add_argument("--runs", type=int, default=7, help="repetitions (median; default 7)")
    ap.add_argument("--levels", default=None,
                    help="comma-separated levels (default: every level this CPU runs, up to "
                         "UDEDUP_ISA's cap)")
    ap.add_argument("--buffer", default=str(DEFAULT_BUFFER_BYTES),
                    help=f"read buffer bytes per reader (default {DEFAULT_BUFFER_BYTES})")
    ap.add_argument("--json", action="store_true", help="print a JSON list of rows")
    args = ap.parse_args(argv)
    try:
        size, buffer_bytes = parse_size(args.size), parse_size(args.buffer)
    except ValueError as err:
        print(f"bench_remote: error: {err}", file=sys.stderr)
        return 2
    here = pages.isa()
    runnable = [lv for lv in levels() if levels().index(lv) <= levels().index(here)]
    isas = runnable if args.levels is None else args.levels.split(",")
    bad = [lv for lv in isas if lv not in runnable]
    if bad or args.runs < 1 or size < pages.PAGE_SIZE or buffer_bytes < pages.PAGE_SIZE:
        why = (f"level {bad[0]!r} is not one this CPU runs here ({', '.join(runnable)})" if bad
               else "--runs must be >= 1, --size and --buffer at least one page")
        print(f"bench_remote: error: {why}", file=sys.stderr)
        return 2
    try:
        rows = measure(size, args.runs, isas, buffer_bytes)
    except (UsageError, RuntimeError) as err:
        print(f"bench_remote: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"remote read path: {size / 2**20:.0f} MiB in another process, {buffer_bytes // 1024} KiB "
          f"per read, median of {args.runs} runs (load: {os.getloadavg()[0]:.2f})")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
