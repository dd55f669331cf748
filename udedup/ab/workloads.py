"""Workloads for the A/B harness: what gets merged while a knob is compared.

Three kinds, one interface (``preflight()``, ``describe()``, ``start(seed) -> Running``):

- :class:`SyntheticWorkload`: a child process (``python -m udedup.ab.workloads synthetic``) that fills a
  :class:`~udedup.memory.MergeableBuffer` with a known mix of zero, duplicate, unique and volatile
  pages, tells the parent it is ready over its stdout pipe, keeps rewriting the volatile pages, and on
  request writes to a sample of its merged pages and times the copy-on-write breaks. It knows its own
  layout, so :func:`expected_counters` says what KSM should report.
- :class:`CommandWorkload`: any program, started through ``python -m udedup.ab.workloads exec`` which
  sets ``PR_SET_MEMORY_MERGE`` (every VMA mergeable, inherited by exec) and a parent-death signal
  before exec, like ``udedup run``; optional readiness wait (a file appearing, or a delay).
- :class:`PidWorkload`: processes that already run with mergeable memory. Never written to, never
  stopped.

Every child runs in its own session (process group): stopping kills the whole group, and
``PR_SET_PDEATHSIG`` kills the direct child if the harness itself is killed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import mmap
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ProcessError, UsageError, WorkloadError
from ..ksm.accounting import ksm_pages
from ..ksm.process import process_ksm

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

PR_SET_PDEATHSIG = 1

ZERO, DUPLICATE, UNIQUE, VOLATILE = 0, 1, 2, 3
KIND_NAMES = ("zero", "duplicate", "unique", "volatile")

_PARENT_ENV = "UDEDUP_AB_PARENT"


# --- the synthetic workload's description --------------------------------------------------------
@dataclass(frozen=True)
class SyntheticSpec:
    """A buffer of ``size`` bytes made of four kinds of pages, placed at random (seeded).

    - zero: all-zero pages, really allocated (written once), as freed guest memory is;
    - duplicate: groups of identical random pages, group sizes drawn from ``group_sizes``;
    - unique: random pages, never equal to another;
    - volatile: random pages whose first word is rewritten ``volatile_hz`` times a second, so ksmd
      sees their checksum change and never merges them.
    """

    size: int
    zero: float
    duplicate: float
    unique: float
    volatile: float
    group_sizes: tuple[int, ...] = (2, 4, 16, 64)
    volatile_hz: float = 2.0
    seed: int = 0
    name: str = "custom"

    def validate(self, page_size: int = PAGE_SIZE) -> "SyntheticSpec":
        fractions = {"zero": self.zero, "duplicate": self.duplicate, "unique": self.unique,
                     "volatile": self.volatile}
        for key, value in fractions.items():
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise UsageError(f"workload fraction {key}={value!r} must be between 0 and 1")
        total = sum(fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise UsageError(f"workload fractions add up to {total:g}, not 1 (zero {self.zero:g} + "
                             f"duplicate {self.duplicate:g} + unique {self.unique:g} + volatile "
                             f"{self.volatile:g}); adjust them")
        if self.size < page_size or self.size % page_size:
            raise UsageError(f"workload size {self.size} must be a positive multiple of the page "
                             f"size ({page_size} bytes)")
        if not self.group_sizes or any(int(g) != g or g < 2 for g in self.group_sizes):
            raise UsageError(f"duplicate group sizes {list(self.group_sizes)} must be integers >= 2")
        if not (self.volatile_hz > 0 and math.isfinite(self.volatile_hz)):
            raise UsageError(f"volatile rewrite rate {self.volatile_hz!r} Hz must be a positive number")
        return self

    def pages(self, page_size: int = PAGE_SIZE) -> int:
        return self.size // page_size

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["group_sizes"] = list(self.group_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SyntheticSpec":
        d = dict(d)
        d["group_sizes"] = tuple(int(g) for g in d.get("group_sizes", (2,)))
        return cls(**d)


#: Named mixes. Sizes come from the caller; these are the proportions and group sizes.
PRESETS: dict[str, dict] = {
    # a bit of everything: the quick default
    "mixed": dict(zero=0.20, duplicate=0.40, unique=0.30, volatile=0.10,
                  group_sizes=(2, 4, 16, 64), volatile_hz=2.0),
    # mostly zero pages, as a freshly booted or idle-after-free heap
    "zero-heavy": dict(zero=0.70, duplicate=0.10, unique=0.15, volatile=0.05,
                       group_sizes=(2, 8), volatile_hz=2.0),
    # several guests of one image: free guest RAM is zero, OS and library pages repeat once per
    # guest (groups of 4-8), application data is unique
    "vm-like": dict(zero=0.35, duplicate=0.35, unique=0.25, volatile=0.05,
                    group_sizes=(4, 4, 4, 8), volatile_hz=1.0),
    # the control: no zero pages at all, so use_zero_pages should change nothing
    "no-zero": dict(zero=0.0, duplicate=0.60, unique=0.30, volatile=0.10,
                    group_sizes=(2, 4, 16, 64), volatile_hz=2.0),
}


def preset(name: str, size: int, seed: int = 0) -> SyntheticSpec:
    """The preset ``name`` at ``size`` bytes."""
    if name not in PRESETS:
        raise UsageError(f"unknown workload preset {name!r}; choose one of {', '.join(PRESETS)}")
    return SyntheticSpec(size=int(size), seed=int(seed), name=name, **PRESETS[name]).validate()


def parse_size(text: str, page_size: int = PAGE_SIZE) -> int:
    """``"256M"``, ``"1G"``, ``"64MiB"``, ``"4096"`` -> bytes, rounded down to whole pages."""
    from ..units import parse_size as parse_bytes
    raw = str(text).strip()
    try:
        nbytes = parse_bytes(raw) // page_size * page_size
    except ValueError:
        raise UsageError(f"size {raw!r} is not a size; write e.g. 256M, 1G or 65536") from None
    if nbytes < page_size:
        raise UsageError(f"size {raw!r} is smaller than one page ({page_size} bytes)")
    return nbytes


# --- layout: pure, shared by the child and the expectations ---------------------------------------
@dataclass(frozen=True)
class Layout:
    kinds: np.ndarray        # uint8 per page: ZERO, DUPLICATE, UNIQUE, VOLATILE
    group: np.ndarray        # int32 per page: duplicate group id, -1 elsewhere
    group_sizes: np.ndarray  # int64 per group id

    def count(self, kind: int) -> int:
        return int(np.count_nonzero(self.kinds == kind))


def make_layout(spec: SyntheticSpec, page_size: int = PAGE_SIZE) -> Layout:
    """Which page is which kind, and which duplicate group each duplicate page belongs to."""
    n = spec.pages(page_size)
    rng = np.random.default_rng(spec.seed)
    n_zero = int(round(n * spec.zero))
    n_dup = int(round(n * spec.duplicate))
    n_vol = int(round(n * spec.volatile))
    n_dup = min(n_dup, n - n_zero)
    n_vol = min(n_vol, n - n_zero - n_dup)
    sizes: list[int] = []
    left = n_dup
    choices = np.asarray(spec.group_sizes, dtype=np.int64)
    while left > 0:
        g = int(rng.choice(choices))
        if left - g == 1 or g > left:   # never leave a lone page: it would be unique
            g = left
        sizes.append(g)
        left -= g
    if sizes and sizes[-1] < 2:         # a duplicate "group" of one page is just a unique page
        n_dup -= sizes.pop()
    n_unique = n - n_zero - n_dup - n_vol
    kinds = np.concatenate([np.full(n_zero, ZERO, np.uint8), np.full(n_dup, DUPLICATE, np.uint8),
                            np.full(n_unique, UNIQUE, np.uint8), np.full(n_vol, VOLATILE, np.uint8)])
    group_of_dup = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    group = np.concatenate([np.full(n_zero, -1, np.int32), group_of_dup,
                            np.full(n_unique + n_vol, -1, np.int32)])
    order = rng.permutation(n)
    return Layout(kinds=kinds[order], group=group[order],
                  group_sizes=np.asarray(sizes, dtype=np.int64))


def expected_counters(layout: Layout, use_zero_pages: bool, max_page_sharing: int = 256,
                      page_size: int = PAGE_SIZE) -> dict[str, int]:
    """What KSM reports once this layout has fully merged (the workload alone, volatile never)."""
    sizes = layout.group_sizes
    n_zero = layout.count(ZERO)
    if not use_zero_pages and n_zero >= 2:
        sizes = np.append(sizes, n_zero)
    pages_shared, pages_sharing, _ = ksm_pages(sizes, max_page_sharing)
    zero = n_zero if use_zero_pages else 0
    return {"pages_shared": pages_shared, "pages_sharing": pages_sharing, "ksm_zero_pages": zero,
            "saved_pages": pages_sharing + zero,
            "saved_bytes_before_rmap": (pages_sharing + zero) * page_size}


# --- the child process (runs in `python -m udedup.ab.workloads synthetic`) ---------------------------
def _set_parent_death_signal() -> None:
    """Die with the harness: PR_SET_PDEATHSIG, then check the parent did not die first."""
    from ..native import pages
    pages.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    expected = os.environ.get(_PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(0)


def _emit(obj: dict) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


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


KPF_KSM = 21


def classify_pages(address: int, n: int, page_size: int = PAGE_SIZE):
    """Per page of our own buffer: (merged into a KSM page, mapped to the zero page, present).

    PFNs in /proc/self/pagemap need CAP_SYS_ADMIN (we run as root for KSM anyway). A KSM page is
    recognised by /proc/kpageflags' KPF_KSM bit, or, without it, by the same PFN appearing twice in
    the buffer (private anonymous pages share a frame only through KSM)."""
    from ..host.procmem import PM_PFN_MASK, PM_PRESENT, read_pagemap, zero_page_pfns
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        entries = read_pagemap(fd, address, address + n * page_size, page_size=page_size)
    finally:
        os.close(fd)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    pfn = entries & np.uint64(PM_PFN_MASK)
    if not present.any() or not pfn[present].any():
        raise PermissionError("pagemap hides page frame numbers (needs CAP_SYS_ADMIN)")
    zero = np.zeros(n, dtype=bool)
    for first, stop in zero_page_pfns():
        zero |= (pfn >= np.uint64(first)) & (pfn < np.uint64(stop))
    zero &= present
    candidates = present & ~zero
    uniq, inverse, counts = np.unique(pfn[candidates], return_inverse=True, return_counts=True)
    try:
        with open("/proc/kpageflags", "rb", buffering=0) as f:
            fd = f.fileno()
            flags = np.array([int.from_bytes(os.pread(fd, 8, int(p) * 8), "little") for p in uniq],
                             dtype=np.uint64)
        ksm_frame = (flags >> np.uint64(KPF_KSM)) & np.uint64(1) == 1
    except OSError:
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
    from ..ksm.memory import MADV_NOHUGEPAGE
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
                page_size: int = PAGE_SIZE) -> dict:
    """Write one byte into ``sample`` merged pages drawn uniformly (KSM pages and zero-page-mapped
    pages alike), timing each class; and, as the baseline, into as many unmerged unique pages."""
    n = layout.kinds.size
    rng = np.random.default_rng(seed)
    method = "pagemap"
    try:
        ksm, zero, present = classify_pages(address, n, page_size)
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


def synthetic_main(spec: SyntheticSpec) -> int:
    """The child: populate, report ready, rewrite volatile pages, serve commands on stdin."""
    from ..ksm.memory import MergeableBuffer

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
    pending = b""
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
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
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
                                     int(cmd.get("seed", 0)), page_size)
                _emit({"event": "cow", **result})
            elif cmd.get("cmd") == "ping":
                _emit({"event": "pong"})
            else:
                _emit({"event": "error", "message": f"unknown command {cmd.get('cmd')!r}"})


def exec_main(argv: Sequence[str], merge: bool = True) -> int:
    """The launcher: parent-death signal, process-wide merging, then exec the command."""
    from ..errors import UdedupError
    from ..ksm.memory import enable_process_merge

    _set_parent_death_signal()
    if merge:
        try:
            enable_process_merge()
        except UdedupError as err:
            print(f"udedup: error: {err}", file=sys.stderr)
            return 126
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec: give the command the defaults
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    sys.stderr.flush()
    try:
        os.execvp(argv[0], list(argv))
    except OSError as err:
        print(f"udedup: error: cannot run {argv[0]!r}: {err.strerror}", file=sys.stderr)
        return 127


# --- the parent side ------------------------------------------------------------------------------
class _Channel:
    """JSON lines from a child's stdout, read with a timeout (select), never blocking forever."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._buf = b""

    def read(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None            # EOF: the child exited
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, obj: dict) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()


def _child_env() -> dict:
    env = dict(os.environ)
    env[_PARENT_ENV] = str(os.getpid())
    return env


# The child must import this very copy of udedup. `python -m` would put the working directory
# first on sys.path, where a source checkout without the built extension would shadow an
# installed copy; so the child puts our package's parent directory first itself.
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CHILD_MAIN = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
               "from udedup.ab.workloads import main; sys.exit(main(sys.argv[1:]))")


def _child_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", _CHILD_MAIN, _PKG_PARENT, *args]


class Running:
    """A started workload. ``stop()`` is idempotent and kills the whole process group."""

    def __init__(self, proc: subprocess.Popen | None, name: str, pids: Sequence[int] = (),
                 stderr_file=None, owned: bool = True):
        self.proc = proc
        self.name = name
        self._pids = list(pids) if pids else ([proc.pid] if proc else [])
        self._stderr = stderr_file
        self.owned = owned
        self.channel = _Channel(proc) if proc is not None and proc.stdout is not None else None
        self.info: dict = {}
        self.stopped = False

    @property
    def pid(self) -> int | None:
        return self._pids[0] if self._pids else None

    def pids(self) -> list[int]:
        """The workload's processes now (the child and its descendants, or the given PIDs)."""
        if not self.owned:
            return [p for p in self._pids if os.path.exists(f"/proc/{p}")]
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            import psutil
            root = psutil.Process(self.proc.pid)
            return [self.proc.pid] + [c.pid for c in root.children(recursive=True)]
        except Exception:  # psutil missing or the process just went: the child alone
            return [self.proc.pid]

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return any(os.path.exists(f"/proc/{p}") for p in self._pids)

    def exit_description(self) -> str | None:
        """None while running; else how it ended, in words, with its last stderr line."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        how = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        tail = self.stderr_tail()
        return how + (f": {tail}" if tail else "")

    def stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines()
                     if ln.strip()]
        except (OSError, ValueError):
            return ""
        return lines[-1][:200] if lines else ""

    def cow(self, sample: int, seed: int, timeout: float = 30.0) -> dict | None:
        """Ask the synthetic child to time COW writes; None for other workloads."""
        if self.channel is None or not self.alive():
            return None
        self.channel.send({"cmd": "cow", "sample": int(sample), "seed": int(seed)})
        reply = self.channel.read(timeout)
        if reply is None or reply.get("event") != "cow":
            raise WorkloadError(f"workload {self.name} did not answer the COW measurement"
                                + (f" ({self.exit_description()})" if not self.alive() else ""))
        reply.pop("event", None)
        return reply

    def stop(self, grace: float = 2.0) -> None:
        """Ask politely, then SIGTERM, then SIGKILL the whole group. Safe to call again (after an
        interrupted call too): the group kill and the reaping always run."""
        self.stopped = True
        if self.proc is None or not self.owned:
            return
        try:
            if self.proc.poll() is None and self.channel is not None and grace > 0:
                try:
                    self.channel.send({"cmd": "stop"})
                    self.proc.wait(timeout=grace)
                except (OSError, subprocess.TimeoutExpired, ValueError):
                    pass
            if self.proc.poll() is None and grace > 0:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout=grace)
                except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                    pass
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group, reap the child, close the pipes. Idempotent."""
        if self.proc is None or not self.owned:
            return
        self._kill_group()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None and not stream.closed:
                    stream.close()
            except OSError:
                pass

    def _kill_group(self) -> None:
        # the leader may be gone while its children live on: the group id stays usable
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - uninterruptible sleep
            pass


def _spawn(argv: list[str], stdin_pipe: bool) -> tuple[subprocess.Popen, object]:
    stderr_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                            stdout=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                            stderr=stderr_file, env=_child_env(), start_new_session=True,
                            close_fds=True)
    return proc, stderr_file


class SyntheticWorkload:
    """The built-in workload: a child process filling a mergeable buffer per ``spec``."""

    kind = "synthetic"

    def __init__(self, spec: SyntheticSpec, ready_timeout: float = 120.0):
        self.spec = spec.validate()
        self.ready_timeout = ready_timeout
        self.name = f"{spec.name} {spec.size >> 20} MiB"
        self.layout = make_layout(spec)

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "spec": self.spec.as_dict(),
                "pages": {n: self.layout.count(k) for k, n in enumerate(KIND_NAMES)},
                "duplicate_groups": int(self.layout.group_sizes.size)}

    def expected(self, use_zero_pages: bool, max_page_sharing: int = 256) -> dict:
        return expected_counters(self.layout, use_zero_pages, max_page_sharing)

    def preflight(self) -> None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * PAGE_SIZE
        except (ValueError, OSError):  # pragma: no cover
            return
        if self.spec.size > avail * 0.8:
            raise WorkloadError(f"the {self.name} workload needs {self.spec.size >> 20} MiB but only "
                                f"{avail >> 20} MiB are free: choose a smaller --size")

    def start(self, seed: int = 0) -> Running:
        argv = _child_argv("synthetic", "--spec", json.dumps(self.spec.as_dict()))
        proc, err = _spawn(argv, stdin_pipe=True)
        run = Running(proc, self.name, stderr_file=err)
        try:
            msg = run.channel.read(self.ready_timeout)
        except (ValueError, OSError):
            msg = None
        except BaseException:          # Ctrl-C while it starts: it is not the caller's to stop yet
            run.stop(grace=0)
            raise
        if msg is None or msg.get("event") != "ready":
            why = run.exit_description() or f"not ready after {self.ready_timeout:g} s"
            if msg is not None and msg.get("event") == "error":
                why = msg.get("message", why)
            run.stop()
            raise WorkloadError(f"the synthetic workload did not start: {why}")
        run.info = msg
        return run


class CommandWorkload:
    """Any command, with process-wide merging, ``argv`` or a string split like a shell would."""

    kind = "command"

    def __init__(self, command: str | Sequence[str], ready_file: str | None = None,
                 ready_delay: float = 0.0, ready_timeout: float = 120.0, merge: bool = True):
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise UsageError("--cmd is empty: give the command to run, e.g. --cmd 'myapp --flag'")
        if ready_delay < 0 or ready_timeout <= 0:
            raise UsageError("readiness delay must be >= 0 and its timeout > 0 seconds")
        self.argv = argv
        self.ready_file = ready_file
        self.ready_delay = float(ready_delay)
        self.ready_timeout = float(ready_timeout)
        self.merge = merge
        self.name = shlex.join(argv)

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "argv": self.argv, "ready_file": self.ready_file,
                "ready_delay": self.ready_delay, "merge": self.merge}

    def preflight(self) -> None:
        if shutil.which(self.argv[0]) is None:
            raise WorkloadError(f"command {self.argv[0]!r} not found (not an executable on PATH)")
        if self.ready_file and not os.path.isdir(os.path.dirname(os.path.abspath(self.ready_file))):
            raise UsageError(f"the folder of --ready-file {self.ready_file!r} does not exist")

    def start(self, seed: int = 0) -> Running:
        if self.ready_file:
            try:
                os.unlink(self.ready_file)  # a stale file from the last trial is no signal
            except FileNotFoundError:
                pass
        argv = _child_argv("exec")
        argv += [] if self.merge else ["--no-merge"]
        proc, err = _spawn(argv + ["--"] + self.argv, stdin_pipe=False)
        run = Running(proc, self.name, stderr_file=err)
        deadline = time.monotonic() + self.ready_timeout
        try:
            if self.ready_file:
                while not os.path.exists(self.ready_file):
                    self._check(run)
                    if time.monotonic() > deadline:
                        raise WorkloadError(f"{self.name}: {self.ready_file} did not appear within "
                                            f"{self.ready_timeout:g} s")
                    time.sleep(0.05)
            end = time.monotonic() + self.ready_delay
            while time.monotonic() < end:
                self._check(run)
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
            self._check(run)
        except BaseException:
            run.stop()
            raise
        return run

    def _check(self, run: Running) -> None:
        if not run.alive():
            raise WorkloadError(f"workload {self.name!r} {run.exit_description()} before it was ready")


class PidWorkload:
    """Processes already running with mergeable memory: observed, never written to or stopped."""

    kind = "pids"

    def __init__(self, pids: Sequence[int], procfs: str = "/proc"):
        if not pids:
            raise UsageError("no PID given")
        self.pids = [int(p) for p in pids]
        self.procfs = procfs
        self.name = "pid " + ",".join(map(str, self.pids))

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "pids": self.pids}

    def preflight(self) -> None:
        for pid in self.pids:
            # ProcessNotFoundError for a PID that does not exist
            if not process_ksm(pid, procfs=self.procfs).registered:
                raise WorkloadError(f"process {pid} has no mergeable memory (no 'mg' VMA and no "
                                    "process-wide merging): start it with 'udedup run' or enable KSM "
                                    "in it first", pid=pid)

    def start(self, seed: int = 0) -> Running:
        for pid in self.pids:
            if not os.path.isdir(os.path.join(self.procfs, str(pid))):
                raise WorkloadError(f"process {pid} is gone", pid=pid)
        return Running(None, self.name, pids=self.pids, owned=False)


# --- entry point of the child processes ------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udedup.ab.workloads",
                                     description="Workload processes of the udedup A/B harness.")
    sub = parser.add_subparsers(dest="mode", required=True)
    syn = sub.add_parser("synthetic", help="the built-in workload (speaks JSON lines on stdin/stdout)")
    syn.add_argument("--spec", help="SyntheticSpec as JSON")
    syn.add_argument("--preset", choices=sorted(PRESETS))
    syn.add_argument("--size", default="64M")
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
        return synthetic_main(spec)
    except Exception as err:  # tell the parent in one line, then fail
        _emit({"event": "error", "message": f"{type(err).__name__}: {err}"})
        raise


if __name__ == "__main__":
    sys.exit(main())
