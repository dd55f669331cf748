"""A child process with memory of known content, for estimator tests.

Run as ``python tests/estimate_targets.py SPEC_JSON``. SPEC is a list of regions, each
``{"kind": K, "pages": N, ...}`` laid out in one anonymous private mapping (MADV_NOHUGEPAGE):

- ``zero``: N written all-zero pages (present, not the shared zero page);
- ``dup``: N pages drawn from ``contents`` distinct contents; content c of ``seed`` s is the same in
  every process, so duplicates also exist across processes; ``sizes`` instead of ``contents`` gives
  the exact group sizes;
- ``unique``: N pages of random bytes;
- ``absent``: N pages never touched (not present);
- ``readzero``: N pages only read (they map the kernel's zero page);
- ``volatile``: N pages rewritten all the time by a thread.

``{"regions": SPEC, "options": {...}}`` takes options: ``"register": false`` leaves the mapping
unregistered, ``"thp": true`` asks for transparent huge pages (MADV_HUGEPAGE). The child prints one
JSON line ``{"pid", "start", "pages", "regions": [[kind, first_page, count], ...]}`` and exits when
stdin closes or reads "exit".
"""
from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_MERGEABLE = 12
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15


def content(seed: int, index: int) -> np.ndarray:
    """The bytes of shared content ``index`` (same in every process)."""
    rng = np.random.default_rng([seed, index])
    return rng.integers(0, 256, PAGE, dtype=np.uint8)


def fill(arr: np.ndarray, spec: list, rng) -> list:
    regions, at = [], 0
    for region in spec:
        kind, n = region["kind"], int(region["pages"])
        block = arr[at:at + n]
        if kind == "zero":
            block[:] = 1
            block[:] = 0
        elif kind == "dup":
            seed = int(region.get("seed", 1))
            if "sizes" in region:
                labels = np.repeat(np.arange(len(region["sizes"])), region["sizes"])
            else:
                labels = np.arange(n) % int(region["contents"])
            labels = labels[rng.permutation(labels.size)] if region.get("shuffle", True) else labels
            table = np.stack([content(seed, int(c)) for c in range(int(labels.max()) + 1)])
            for lo in range(0, n, 4096):
                block[lo:lo + 4096] = table[labels[lo:lo + 4096]]
        elif kind in ("unique", "volatile"):
            for lo in range(0, n, 4096):
                k = min(4096, n - lo)
                block[lo:lo + k] = rng.integers(0, 256, (k, PAGE), dtype=np.uint8)
        elif kind == "readzero":
            int(block[:, 0].sum())
        elif kind != "absent":
            raise SystemExit(f"unknown region kind {kind}")
        regions.append([kind, at, n])
        at += n
    return regions


def main() -> None:
    spec = json.loads(sys.argv[1])
    options = spec.get("options", {}) if isinstance(spec, dict) else {}
    spec = spec["regions"] if isinstance(spec, dict) else spec
    total = sum(int(r["pages"]) for r in spec)
    mem = mmap.mmap(-1, total * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(MADV_HUGEPAGE if options.get("thp") else MADV_NOHUGEPAGE)
    if options.get("register", True):
        mem.madvise(MADV_MERGEABLE)
    arr = np.frombuffer(mem, dtype=np.uint8).reshape(total, PAGE)
    regions = fill(arr, spec, np.random.default_rng(int(options.get("seed", os.getpid()))))
    stop = threading.Event()
    for kind, first, n in regions:
        if kind == "volatile":
            def churn(block=arr[first:first + n]):
                while not stop.is_set():
                    block[:, 8:16] += 1
                    time.sleep(0.001)
            threading.Thread(target=churn, daemon=True).start()
    print(json.dumps({"pid": os.getpid(), "start": int(arr.ctypes.data), "pages": total,
                      "regions": regions}), flush=True)
    for line in sys.stdin:
        if line.strip() == "exit":
            break
    stop.set()


if __name__ == "__main__":
    main()
