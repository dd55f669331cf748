"""What runs in a workload's child process (``python -c ... from udedup.ab.child import main``):

- ``synthetic``: fill a :class:`~udedup.ksm.memory.MergeableBuffer` per a
  :class:`~udedup.ab.synthetic.SyntheticSpec`, say ready over stdout, keep rewriting the volatile
  pages, and on request write into a sample of the merged pages, timing the copy-on-write breaks;
- ``exec``: set process-wide merging (``PR_SET_MEMORY_MERGE``, inherited by exec) and a parent-death
  signal, then exec the command, like ``udedup run``.

Both die with the harness (``PR_SET_PDEATHSIG``). Messages follow :mod:`udedup.ab.channel`.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import select
import signal
import sys
import time
from typing import Sequence

import numpy as np

from ..errors import ProcessError, UdedupError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..host.pagemap import KPF_KSM, PM_PFN_MASK, PM_PRESENT, read_kpageflags, read_pagemap, zero_page_pfns
from ..ksm.memory import MADV_NOHUGEPAGE, MergeableBuffer, enable_process_merge
from ..native import syscalls
from ..signals import exec_defaults
from .channel import PARENT_ENV, LineBuffer, write_message
from .synthetic import (DUPLICATE, KIND_NAMES, PAGE_SIZE, PRESETS, UNIQUE, VOLATILE, ZERO, Layout,
                        SyntheticSpec, make_layout, parse_size, preset)

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    """Die with the harness: PR_SET_PDEATHSIG, then check the parent did not die first."""
    syscalls.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    expected = os.environ.get(PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(0)


def _emit(obj: dict) -> None:
    write_message(1, obj)


def _populate(arr: np.ndarray, layout: Layout, seed: int) -> None:
    """Write every page once, per the layout (chunked, so no temporary is as large as the buffer)."""
    rng = np.random.default_rng(seed ^ 0x5EED)
    chunk = 2048
    zero_idx = np.flatnonzero(layout.kinds == ZERO)
    arr[zero_idx, 0] = 0        # a write fault: a real zero-filled page, not the shared zero page
    randomish = np.flatnonzero((layout.kinds == UNIQUE) | (layout.kinds == VOLATILE))
    for i in range(0, randomish.size, chunk):
        idx = randomish[i:i + chunk]
        arr[idx] = rng.integers(0, 256, size=(idx.size, arr.shape[1]), dtype=np.uint8)
    n_groups = layout.group_sizes.size
    if n_groups:
        dup_idx = np.flatnonzero(layout.kinds == DUPLICATE)
        for g0 in range(0, n_groups, chunk):
            templates = rng.integers(0, 256, size=(min(chunk, n_groups - g0), arr.shape[1]),
                                     dtype=np.uint8)
            gid = layout.group[dup_idx]
            sel = dup_idx[(gid >= g0) & (gid < g0 + templates.shape[0])]
            for i in range(0, sel.size, chunk):
                idx = sel[i:i + chunk]
                arr[idx] = templates[layout.group[idx] - g0]


def classify_pages(address: int, n: int, page_size: int = PAGE_SIZE,
                   procfs: str | ProcFs = DEFAULT_PROCFS):
    """Per page of our own buffer: (merged into a KSM page, mapped to the zero page, present).

    PFNs in pagemap need CAP_SYS_ADMIN (we run as root for KSM anyway). A KSM page is recognised
    by kpageflags' KPF_KSM bit, or, without that file, by the same PFN appearing twice in the
    buffer (private anonymous pages share a frame only through KSM)."""
    fs = as_procfs(procfs)
    fd = fs.open_global("self", "pagemap")
    try:
        entries = read_pagemap(fd, address, address + n * page_size, page_size=page_size)
    finally:
        os.close(fd)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    pfn = entries & np.uint64(PM_PFN_MASK)
    if not present.any() or not pfn[present].any():
        raise PermissionError("pagemap hides page frame numbers (needs CAP_SYS_ADMIN)")
    zero = np.zeros(n, dtype=bool)
    for first, stop in zero_page_pfns(fs):
        zero |= (pfn >= np.uint64(first)) & (pfn < np.uint64(stop))
    zero &= present
    candidates = present & ~zero
    uniq, inverse, counts = np.unique(pfn[candidates], return_inverse=True, return_counts=True)
    try:
        flags = read_kpageflags(uniq, fs)
        ksm_frame = (flags >> np.uint64(KPF_KSM)) & np.uint64(1) == 1
    except (OSError, ProcessError):
        ksm_frame = counts >= 2
    ksm = np.zeros(n, dtype=bool)
    ksm[np.flatnonzero(candidates)] = ksm_frame[inverse]
    return ksm, zero, present


def _time_writes(flat: np.ndarray, groups: Sequence[np.ndarray], page_size: int,
                 rounds: int = 8) -> list[tuple[int, float]]:
    """Write one byte into each page of every group; (pages, ns per page) per group.

    The groups take turns in ``rounds`` slices, so a drift (caches, frequency, the allocator
    warming up) spreads over all of them instead of favouring whichever goes first."""
    offsets = [g.astype(np.int64) * page_size + (page_size // 2) for g in groups]
    slices = [np.array_split(o, rounds) for o in offsets]
    elapsed = [0] * len(groups)
    for r in range(rounds):
        for k, parts in enumerate(slices):
            part = parts[r]
            if part.size == 0:
                continue
            t0 = time.perf_counter_ns()
            flat[part] = 0xA5
            elapsed[k] += time.perf_counter_ns() - t0
    return [(int(o.size), elapsed[k] / o.size if o.size else float("nan"))
            for k, o in enumerate(offsets)]


def _warm_allocator(n_pages: int, page_size: int) -> None:
    """Fault in and free as many pages as the COW breaks will allocate.

    A COW break allocates a page. In a VM with free page reporting, a page the host took back costs
    ~5x more to fault in (10.6 vs 2.2 us here), so trials would differ by what the allocator hands
    out. Recently freed pages come first: this makes every trial start from warm free pages."""
    if n_pages <= 0:
        return
    m = mmap.mmap(-1, n_pages * page_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(MADV_NOHUGEPAGE)   # small pages, as the COW breaks take
        view = np.frombuffer(m, dtype=np.uint8)
        view[::page_size] = 1
        del view
    finally:
        m.close()


def measure_cow(flat: np.ndarray, address: int, layout: Layout, sample: int, seed: int,
                page_size: int = PAGE_SIZE, procfs: str | ProcFs = DEFAULT_PROCFS) -> dict:
    """Write one byte into ``sample`` merged pages drawn uniformly (KSM pages and zero-page-mapped
    pages alike), timing each class; and, as the baseline, into as many unmerged unique pages."""
    n = layout.kinds.size
    rng = np.random.default_rng(seed)
    method = "pagemap"
    try:
        ksm, zero, present = classify_pages(address, n, page_size, procfs)
    except (OSError, ProcessError):
        # no PFNs: trust the layout (pages meant to merge), and say so
        method = "layout"
        ksm = (layout.kinds == DUPLICATE) | (layout.kinds == ZERO)
        zero = np.zeros(n, dtype=bool)
        present = np.ones(n, dtype=bool)
    merged = np.flatnonzero(ksm | zero)
    chosen = rng.choice(merged, size=min(sample, merged.size), replace=False) if merged.size else merged
    ksm_sel, zero_sel = chosen[ksm[chosen]], chosen[zero[chosen]]
    plain = np.flatnonzero((layout.kinds == UNIQUE) & present & ~ksm & ~zero)
    plain_sel = rng.choice(plain, size=min(max(sample, 1), plain.size), replace=False) \
        if plain.size else plain
    _warm_allocator(chosen.size, page_size)
    (n_plain, plain_ns), (n_ksm, ksm_ns), (n_zero, zero_ns) = _time_writes(
        flat, [plain_sel, ksm_sel, zero_sel], page_size)
    total = n_ksm + n_zero
    cow_ns = ((0 if n_ksm == 0 else ksm_ns * n_ksm) + (0 if n_zero == 0 else zero_ns * n_zero)) \
        / total if total else float("nan")
    return {"method": method, "merged_pages_seen": int(merged.size),
            "ksm_pages_seen": int(np.count_nonzero(ksm)), "zero_pages_seen": int(np.count_nonzero(zero)),
            "cow_pages": total, "cow_ns_per_page": _num(cow_ns),
            "cow_ksm_pages": n_ksm, "cow_ns_ksm_page": _num(ksm_ns),
            "cow_zero_pages": n_zero, "cow_ns_zero_page": _num(zero_ns),
            "write_pages": n_plain, "write_ns_per_page": _num(plain_ns)}


def _num(x: float):
    return None if x is None or not math.isfinite(x) else round(float(x), 1)


def synthetic_main(spec: SyntheticSpec, procfs: str | ProcFs = DEFAULT_PROCFS) -> int:
    """The child: populate, report ready, rewrite volatile pages, serve commands on stdin."""
    _set_parent_death_signal()
    page_size = PAGE_SIZE
    spec.validate(page_size)
    t0 = time.monotonic()
    layout = make_layout(spec, page_size)
    buf = MergeableBuffer(spec.size)
    arr = buf.array("u1", (spec.pages(page_size), page_size))
    flat = buf.array("u1")
    _populate(arr, layout, spec.seed)
    words = buf.array("u8")
    vol_words = np.flatnonzero(layout.kinds == VOLATILE).astype(np.int64) * (page_size // 8)
    _emit({"event": "ready", "pid": os.getpid(), "address": buf.address, "pages": int(layout.kinds.size),
           "kinds": {name: layout.count(k) for k, name in enumerate(KIND_NAMES)},
           "groups": int(layout.group_sizes.size), "populate_seconds": time.monotonic() - t0})
    period = 1.0 / spec.volatile_hz
    next_write = time.monotonic() + period
    counter = 0
    commands = LineBuffer()
    while True:
        timeout = max(0.0, next_write - time.monotonic()) if vol_words.size else None
        ready, _, _ = select.select([0], [], [], timeout)
        if vol_words.size and time.monotonic() >= next_write:
            counter += 1
            words[vol_words] = np.uint64(counter)   # checksum changes: ksmd skips these pages
            next_write += period
            if next_write < time.monotonic():       # fell behind (stopped, or a slow COW run)
                next_write = time.monotonic() + period
        if not ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:                  # the harness closed our stdin: it is gone, so are we
            return 0
        commands.feed(chunk)
        while (line := commands.next()) is not None:
            try:
                cmd = json.loads(line)
            except ValueError:
                _emit({"event": "error", "message": f"bad command {line[:80]!r}"})
                continue
            if cmd.get("cmd") == "stop":
                _emit({"event": "stopped"})
                return 0
            if cmd.get("cmd") == "cow":
                result = measure_cow(flat, buf.address, layout, int(cmd.get("sample", 4096)),
                                     int(cmd.get("seed", 0)), page_size, procfs)
                _emit({"event": "cow", **result})
            elif cmd.get("cmd") == "ping":
                _emit({"event": "pong"})
            else:
                _emit({"event": "error", "message": f"unknown command {cmd.get('cmd')!r}"})


def exec_main(argv: Sequence[str], merge: bool = True) -> int:
    """The launcher: parent-death signal, process-wide merging, then exec the command."""
    _set_parent_death_signal()
    if merge:
        try:
            enable_process_merge()
        except UdedupError as err:
            print(f"udedup: error: {err}", file=sys.stderr)
            return 126
    exec_defaults()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], list(argv))
    except OSError as err:
        print(f"udedup: error: cannot run {argv[0]!r}: {err.strerror}", file=sys.stderr)
        return 127


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udedup.ab.child",
                                     description="Workload processes of the udedup A/B harness.")
    sub = parser.add_subparsers(dest="mode", required=True)
    syn = sub.add_parser("synthetic", help="the built-in workload (speaks JSON lines on stdin/stdout)")
    syn.add_argument("--spec", help="SyntheticSpec as JSON")
    syn.add_argument("--preset", choices=sorted(PRESETS))
    syn.add_argument("--size", default="64M")
    syn.add_argument("--procfs", default=DEFAULT_PROCFS, help="where /proc is (default /proc)")
    ex = sub.add_parser("exec", help="exec a command with process-wide merging and a parent-death signal")
    ex.add_argument("--no-merge", action="store_true")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.mode == "exec":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not cmd:
            parser.error("exec needs a command after --")
        return exec_main(cmd, merge=not args.no_merge)
    if args.spec:
        spec = SyntheticSpec.from_dict(json.loads(args.spec))
    else:
        spec = preset(args.preset or "mixed", parse_size(args.size))
    try:
        return synthetic_main(spec, args.procfs)
    except Exception as err:  # tell the parent in one line, then fail
        _emit({"event": "error", "message": f"{type(err).__name__}: {err}"})
        raise


if __name__ == "__main__":
    sys.exit(main())
