"""The A/B engine: run one workload under two (or more) KSM settings, fairly and repeatedly, and say
what changed and how sure we are.

A run is ``trials`` blocks; every block runs each arm once, in an order drawn from the seed, so slow
drift on the machine spreads over all arms. One trial:

1. ``run=2``: every merged page on the machine is unmerged, nothing is left from the last trial;
2. the arm's knobs and the fixed knobs are applied with ksmd stopped (``run=0``);
3. the workload starts and reports ready; then ``run=1`` and the clock and ksmd's CPU meter start;
4. a sampler thread records the counters and ksmd CPU time while :meth:`Ksm.wait_settled` waits
   (a timeout is recorded as such, not raised);
5. ksmd is stopped again and the synthetic workload writes into a sample of its merged pages, timing
   the copy-on-write breaks (KSM pages and zero-page mappings alike);
6. the workload is stopped (its process group killed) and every knob is put back.

Whatever happens (an error, Ctrl-C, SIGTERM) every workload process is killed, every knob restored,
and the trials finished so far are kept: :class:`ABInterrupted` carries them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import KsmError, KsmPermissionError, KsmTimeout, UdedupError, UsageError, WorkloadError

log = logging.getLogger(__name__)

DEFAULT_ARMS: dict[str, dict[str, object]] = {"off": {"use_zero_pages": 0}, "on": {"use_zero_pages": 1}}

#: Pinned in every arm unless the arms vary them. Fast enough that a 256 MiB trial settles in about
#: a second, slow enough (a sleep between batches) that ksmd does not take a whole core.
DEFAULT_FIXED: dict[str, object] = {"advisor_mode": "none", "pages_to_scan": 4000,
                                    "sleep_millisecs": 10, "smart_scan": 0}

#: The harness drives ``run`` itself (unmerge, stop during setup and COW timing, start).
HARNESS_KNOBS = ("run",)

#: Metrics summarised per arm and compared between arms, in report order.
METRICS = ("saved_bytes", "saved_pages", "pages_shared", "pages_sharing", "ksm_zero_pages",
           "general_profit", "rmap_items", "settle_seconds", "t99_seconds", "ksmd_cpu_seconds",
           "cpu_t99_seconds", "saved_mib_per_cpu_second", "cow_ns_per_page", "cow_ns_ksm_page",
           "cow_ns_zero_page", "write_ns_per_page")

#: Trials whose numbers enter the summary. A timed-out trial is left out: its counters are a moment
#: of an unfinished merge (it is counted and reported, and its series is plotted).
SUMMARISED_STATUS = ("ok",)


# --- records --------------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """One trial: one arm, one run of the workload."""

    index: int
    block: int
    arm: str
    knobs: dict
    status: str = "running"            # ok | timeout | workload-died | workload-failed | disturbed
    timed_out: bool = False
    error: str | None = None
    started_at: float = 0.0            # wall clock (time.time())
    populate_seconds: float | None = None
    settle_seconds: float | None = None
    t99_seconds: float | None = None   # first sample with 99 % of the final saved pages
    cpu_t99_seconds: float | None = None   # ksmd CPU spent until then
    full_scans: int | None = None
    pages_shared: int | None = None
    pages_sharing: int | None = None
    pages_unshared: int | None = None
    pages_volatile: int | None = None
    ksm_zero_pages: int | None = None
    general_profit: int | None = None
    rmap_items: int | None = None
    saved_pages: int | None = None
    saved_bytes: int | None = None
    ksmd_cpu_seconds: float | None = None
    saved_mib_per_cpu_second: float | None = None
    process: dict | None = None        # ksm_stat summed over the workload's processes
    foreign_pages: int | None = None   # merged pages of other processes in the global counters
    foreign_rmap_items: int | None = None   # pages of other processes ksmd tracked (and scanned)
    outside_changes: dict | None = None     # knobs someone else changed during the trial
    cow: dict | None = None            # the workload's COW measurement, all of it
    cow_ns_per_page: float | None = None
    cow_ns_ksm_page: float | None = None
    cow_ns_zero_page: float | None = None
    write_ns_per_page: float | None = None
    series: dict = field(default_factory=dict)   # columns: t, saved_bytes, ... (see _Sampler)

    def as_dict(self, series: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if not series:
            d.pop("series")
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ABResult:
    """Every trial and the summary. ``to_dict()`` is the JSON report."""

    config: dict
    trials: list[TrialRecord] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    interrupted: bool = False

    @property
    def arm_names(self) -> list[str]:
        return list(self.config["arms"])

    @property
    def verdict(self) -> str:
        return self.summary.get("verdict", "")

    def summarize(self) -> dict:
        self.summary = summarize(self.trials, self.config["arms"], seed=self.config.get("seed", 0))
        return self.summary

    def to_dict(self, series: bool = True) -> dict:
        from .. import __version__
        return {"kind": "udedup-ab", "udedup_version": __version__, "config": self.config,
                "arms": self.summary.get("arms", {}), "differences": self.summary.get("differences", []),
                "verdict": self.verdict, "interrupted": self.interrupted,
                "trials": [t.as_dict(series=series) for t in self.trials]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ABResult":
        result = cls(config=dict(d["config"]), trials=[TrialRecord.from_dict(t) for t in d["trials"]],
                     interrupted=bool(d.get("interrupted", False)))
        result.summarize()
        return result


class ABInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; everything was cleaned up; ``.result`` holds the trials
    finished before it (summarised)."""

    def __init__(self, result: ABResult, signame: str = "SIGINT"):
        super().__init__(f"A/B run interrupted by {signame} after {len(result.trials)} trials")
        self.result = result
        self.signame = signame


# --- statistics (pure) ----------------------------------------------------------------------------
def trial_order(arm_names: Sequence[str], trials: int, seed: int) -> list[tuple[int, str]]:
    """``(block, arm)`` in run order: each block has every arm once, order shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    order = []
    for block in range(trials):
        for k in rng.permutation(len(arm_names)):
            order.append((block, arm_names[int(k)]))
    return order


def _clean(values) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def median_iqr(values) -> dict:
    """Median, quartiles (numpy's linear interpolation), min, max and n of the finite values."""
    arr = _clean(values)
    if arr.size == 0:
        return {"n": 0, "median": None, "q1": None, "q3": None, "min": None, "max": None}
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {"n": int(arr.size), "median": float(med), "q1": float(q1), "q3": float(q3),
            "min": float(arr.min()), "max": float(arr.max())}


def bootstrap_diff(a, b, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0,
                   statistic: Callable = np.median, min_n: int = 3) -> dict:
    """``statistic(b) - statistic(a)`` with a percentile bootstrap interval (each sample resampled
    with replacement on its own), and the same for the relative change against ``statistic(a)``.

    With fewer than ``min_n`` values on a side there is no interval (None): resampling two values
    gives an interval that looks sure and is not."""
    a, b = _clean(a), _clean(b)
    out = {"n_a": int(a.size), "n_b": int(b.size), "diff": None, "ci_low": None, "ci_high": None,
           "relative": None, "rel_ci_low": None, "rel_ci_high": None, "clear": False}
    if a.size == 0 or b.size == 0:
        return out
    sa, sb = float(statistic(a)), float(statistic(b))
    out["diff"] = sb - sa
    if sa != 0:
        out["relative"] = (sb - sa) / abs(sa)
    if a.size < max(2, min_n) or b.size < max(2, min_n):
        return out
    rng = np.random.default_rng(seed)
    ra = statistic(a[rng.integers(0, a.size, size=(n_boot, a.size))], axis=1)
    rb = statistic(b[rng.integers(0, b.size, size=(n_boot, b.size))], axis=1)
    diffs = rb - ra
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    out["ci_low"], out["ci_high"] = float(lo), float(hi)
    if sa != 0:
        rel = diffs / np.abs(ra) if np.all(ra != 0) else diffs / abs(sa)
        rlo, rhi = np.percentile(rel, [tail, 100 - tail])
        out["rel_ci_low"], out["rel_ci_high"] = float(rlo), float(rhi)
    # "clear": the whole interval is on one side of zero
    out["clear"] = bool(lo > 0 or hi < 0)
    return out


def summarize(trials: Sequence[TrialRecord], arms: Mapping[str, Mapping], seed: int = 0,
              n_boot: int = 10000) -> dict:
    """Per arm median and IQR of every metric; every other arm minus the first, with 95 % CIs."""
    names = list(arms)
    per_arm: dict[str, dict] = {}
    values: dict[str, dict[str, list]] = {}
    for name in names:
        mine = [t for t in trials if t.arm == name]
        used = [t for t in mine if t.status in SUMMARISED_STATUS]
        values[name] = {m: [getattr(t, m) for t in used] for m in METRICS}
        per_arm[name] = {
            "knobs": dict(arms[name]), "trials": len(mine), "n": len(used),
            "timed_out": sum(t.timed_out for t in mine),
            "died": sum(t.status == "workload-died" for t in mine),
            "failed": sum(t.status == "workload-failed" for t in mine),
            "disturbed": sum(t.status == "disturbed" for t in mine),
            "metrics": {m: median_iqr(values[name][m]) for m in METRICS}}
    differences = []
    if names:
        base = names[0]
        for k, other in enumerate(names[1:], start=1):
            diffs = {m: bootstrap_diff(values[base][m], values[other][m], n_boot=n_boot,
                                       seed=(seed or 0) + 7919 * k + i)
                     for i, m in enumerate(METRICS)}
            differences.append({"arm": other, "baseline": base, "metrics": diffs})
    summary = {"arms": per_arm, "differences": differences}
    summary["verdict"] = verdict(summary)
    return summary


def arm_label(name: str, knobs: Mapping) -> str:
    return f"{name} ({', '.join(f'{k}={_fmt_knob(v)}' for k, v in knobs.items())})" if knobs else name


def _fmt_knob(v) -> str:  # booleans as the kernel prints them
    return str(int(v)) if isinstance(v, bool) else str(v)


def _words(d: dict, what: str, up: str, down: str, unit_fmt: Callable[[float], str],
           lower_is_better: bool = False) -> str | None:
    if d["diff"] is None:
        return None
    rel = d["relative"]
    rel_txt = f" ({rel * 100:+.1f} %)" if rel is not None else ""
    if d["ci_low"] is None:
        return f"{what} {unit_fmt(d['diff'])}{rel_txt} (too few trials for an interval)"
    ci = f"95 % CI {unit_fmt(d['ci_low'])} to {unit_fmt(d['ci_high'])}"
    if not d["clear"]:
        return f"{what}: no clear difference ({ci})"
    word = up if d["diff"] > 0 else down
    size = abs(rel) * 100 if rel is not None else None
    amount = f"{size:.1f} % " if size is not None else f"{unit_fmt(abs(d['diff']))} "
    return f"{amount}{word} {what} ({ci})"


def verdict(summary: dict) -> str:
    """One line in plain words: what the second arm changed against the first."""
    if not summary.get("differences"):
        return "only one arm: nothing to compare"
    d = summary["differences"][0]
    arms = summary["arms"]
    a, b = d["baseline"], d["arm"]
    if arms[a]["n"] == 0 or arms[b]["n"] == 0:
        return f"no finished trial in arm {a if arms[a]['n'] == 0 else b}: no verdict"
    m = d["metrics"]
    mib = lambda x: f"{x / 2**20:+.2f} MiB"  # noqa: E731
    parts = [
        _words(m["saved_bytes"], "saved memory", "more", "less", mib),
        _words(m["ksmd_cpu_seconds"], "ksmd CPU", "more", "less", lambda x: f"{x:+.3f} s"),
        _words(m["settle_seconds"], "time to settle", "longer", "shorter", lambda x: f"{x:+.2f} s"),
        _words(m["cow_ns_per_page"], "COW cost per merged page", "higher", "lower",
               lambda x: f"{x:+.0f} ns"),
    ]
    head = f"{arm_label(b, arms[b]['knobs'])} vs {arm_label(a, arms[a]['knobs'])}"
    zero = m["ksm_zero_pages"]
    tail = ""
    if zero["diff"]:
        tail = (f"; ksm_zero_pages {zero['diff']:+.0f}, pages_sharing "
                f"{m['pages_sharing']['diff']:+.0f}")
    return f"{head}: " + "; ".join(p for p in parts if p) + tail


# --- signals --------------------------------------------------------------------------------------
def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_raises() -> None:
    """SIGTERM behaves like Ctrl-C for the duration (so every ``finally`` runs)."""
    if not _main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM during cleanup; the caller gets the list of those that arrived."""
    if not _main_thread():
        yield []
        return
    pending: list[int] = []
    note = lambda signum, frame: pending.append(signum)  # noqa: E731
    prev_int = signal.signal(signal.SIGINT, note)
    prev_term = signal.signal(signal.SIGTERM, note)
    try:
        yield pending
    finally:
        signal.signal(signal.SIGINT, prev_int)
        signal.signal(signal.SIGTERM, prev_term)


# --- sampling -------------------------------------------------------------------------------------
SERIES_COLUMNS = ("t", "saved_bytes", "saved_pages", "pages_shared", "pages_sharing", "ksm_zero_pages",
                  "full_scans", "ksmd_cpu_seconds", "foreign_rmap_items")


class _Sampler(threading.Thread):
    """Counters and ksmd CPU every ``interval`` seconds, from the moment ksmd starts.

    With the workload's pids it also follows ``foreign_rmap_items``: pages ksmd tracks that are not
    the workload's (the global rmap items minus the workload's ``ksm_rmap_items``). Another process
    registering memory mid-trial shows there, even if it is gone by the end."""

    def __init__(self, ksm, t0: float, cpu0: float, interval: float, progress=None, label="",
                 pids: Callable[[], Sequence[int]] | None = None):
        super().__init__(name="udedup-ab-sampler", daemon=True)
        self.ksm, self.t0, self.cpu0, self.interval = ksm, t0, cpu0, interval
        self.progress, self.label, self.pids = progress, label, pids
        self.series = {c: [] for c in SERIES_COLUMNS}
        self._halt = threading.Event()
        self.error: Exception | None = None

    def sample(self) -> None:
        stats = self.ksm.stats()
        cpu = self.ksm.ksmd_cpu_seconds()
        foreign = None
        if self.pids is not None:
            own = _process_totals(self.pids(), getattr(self.ksm, "procfs", "/proc"))
            if own is not None:
                foreign = max(0, stats.rmap_items - own["rmap_items"])
        row = {"t": round(stats.timestamp - self.t0, 4), "saved_bytes": stats.saved_bytes,
               "saved_pages": stats.saved_pages, "pages_shared": stats.pages_shared,
               "pages_sharing": stats.pages_sharing, "ksm_zero_pages": stats.ksm_zero_pages,
               "full_scans": stats.full_scans, "ksmd_cpu_seconds": round(cpu - self.cpu0, 3),
               "foreign_rmap_items": foreign}
        for c in SERIES_COLUMNS:
            self.series[c].append(row[c])
        if self.progress is not None:
            self.progress(f"{self.label}: {row['t']:5.1f} s, scan {row['full_scans']}, saved "
                          f"{row['saved_bytes'] / 2**20:7.1f} MiB, ksmd {row['ksmd_cpu_seconds']:.2f} CPU-s")

    def run(self) -> None:
        try:
            self.sample()
            while not self._halt.wait(self.interval):
                self.sample()
        except (KsmError, OSError) as err:  # pragma: no cover - sysfs vanished mid-run
            self.error = err

    def finish(self) -> dict:
        self._halt.set()
        self.join(timeout=5)
        try:
            self.sample()               # the last point is the final state
        except (KsmError, OSError):    # pragma: no cover
            pass
        return self.series


def t99(series: Mapping[str, list], final_saved_pages: int) -> tuple[float | None, float | None]:
    """(seconds, ksmd CPU-seconds) until saved pages first reached 99 % of their final value."""
    if not final_saved_pages or final_saved_pages <= 0:
        return None, None
    target = 0.99 * final_saved_pages
    for t, saved, cpu in zip(series.get("t", []), series.get("saved_pages", []),
                             series.get("ksmd_cpu_seconds", [])):
        if saved >= target:
            return float(t), float(cpu)
    return None, None


def other_mergeable_processes(exclude=(), procfs: str = "/proc") -> list[dict]:
    """Processes with memory registered for KSM, other than ours: ksmd scans them in every trial,
    so their pages show in the global counters and their cost in ksmd's CPU time."""
    from ..ksm.process import process_ksm
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir(procfs):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            p = process_ksm(int(entry), procfs, smaps=False)
        except UdedupError:         # gone, unreadable, or a kernel thread
            continue
        if p.registered:
            found.append({"pid": p.pid, "comm": p.comm, "rmap_items": p.rmap_items})
    return found


def _process_totals(pids: Sequence[int], procfs: str = "/proc") -> dict | None:
    from ..ksm.process import process_ksm
    totals = {"pids": [], "rmap_items": 0, "zero_pages": 0, "merging_pages": 0, "process_profit": 0}
    for pid in pids:
        try:
            p = process_ksm(pid, procfs=procfs, smaps=False)
        except UdedupError:
            continue
        totals["pids"].append(pid)
        for key in ("rmap_items", "zero_pages", "merging_pages", "process_profit"):
            totals[key] += getattr(p, key)
    return totals if totals["pids"] else None


# --- the engine -----------------------------------------------------------------------------------
class _Run:
    """State of one ``run_ab`` call, so cleanup knows what to undo."""

    def __init__(self):
        self.running = None             # the workload of the trial in progress


def default_fixed(varied, knob_names: Sequence[str]) -> dict[str, object]:
    """:data:`DEFAULT_FIXED` minus the knobs the arms vary and those this kernel lacks."""
    return {k: v for k, v in DEFAULT_FIXED.items() if k not in set(varied) and k in knob_names}


def _check_arms(arms, fixed, knob_names: Sequence[str]) -> tuple[dict, dict]:
    if not arms or len(arms) < 2:
        raise UsageError("an A/B run needs at least two arms, e.g. --arm off:use_zero_pages=0 "
                         "--arm on:use_zero_pages=1")
    arms = {str(k): dict(v) for k, v in arms.items()}
    keys = [tuple(sorted(v)) for v in arms.values()]
    if any(k != keys[0] for k in keys):
        raise UsageError("every arm must set the same knobs (got "
                         + "; ".join(f"{n}: {', '.join(sorted(v)) or 'none'}" for n, v in arms.items())
                         + "): an arm that leaves a knob unset would inherit whatever the machine has")
    if not keys[0]:
        raise UsageError("the arms set no knob: give each arm the knob it varies, e.g. "
                         "on:use_zero_pages=1")
    if len({tuple(sorted(v.items(), key=lambda kv: kv[0])) for v in arms.values()}) < len(arms):
        raise UsageError("two arms have identical knobs: they would measure the same thing")
    varied = set(keys[0])
    user_fixed = dict(fixed) if fixed is not None else {}
    both = varied & set(user_fixed)
    if both:
        raise UsageError(f"{', '.join(sorted(both))} is both varied by the arms and fixed: choose one")
    if fixed is None:
        user_fixed = default_fixed(varied, knob_names)
    for name in list(varied) + list(user_fixed):
        if name in HARNESS_KNOBS:
            raise UsageError(f"{name} is driven by the harness (unmerge, stop, start) and cannot be "
                             "an arm or fixed knob")
    return arms, user_fixed


def _preflight(ksm, arms: Mapping[str, dict], fixed: Mapping[str, object]) -> tuple[dict, dict]:
    """Refuse before anything changes: knobs unknown or invalid, or no right to write them.

    Returns ``(arms, fixed)`` typed as the kernel takes them ("1", 1, "y" -> True for a boolean
    knob), so that records compare equal. Each arm is validated together with the fixed knobs, as
    a trial applies them: an arm's pages_to_scan is valid when the fixed advisor_mode is none."""
    typed = {name: ksm.validate({**fixed, **knobs}) for name, knobs in arms.items()}
    knobs = set(fixed) | {k for v in arms.values() for k in v}
    for name in list(HARNESS_KNOBS) + sorted(knobs - set(HARNESS_KNOBS)):
        path = os.path.join(ksm.root, name)
        if not os.access(path, os.W_OK):
            raise KsmPermissionError(f"cannot write {path}: 'udedup ab' changes KSM knobs and needs "
                                     "root; run it as root or with sudo", knob=name, path=path)
    first = next(iter(typed.values()))
    return ({name: {k: typed[name][k] for k in arms[name]} for name in arms},
            {k: first[k] for k in fixed})


def run_ab(workload, arms: Mapping[str, Mapping[str, object]] | None = None,
           fixed: Mapping[str, object] | None = None, trials: int = 3, seed: int | None = None,
           settle_timeout: float = 60.0, sample_interval: float = 0.1, cow_sample: int = 4096,
           stable_scans: int = 2, ksm=None, progress: Callable[[str], None] | None = None,
           on_trial: Callable[[TrialRecord, ABResult], None] | None = None) -> ABResult:
    """Run ``workload`` under every arm, ``trials`` times each; return every record and a summary.

    ``arms``: ``{name: {knob: value}}``; the first arm is the baseline the others are compared to
    (default: use_zero_pages off vs on). ``fixed``: knobs pinned in every arm (default
    :data:`DEFAULT_FIXED`, minus what the arms vary or the kernel lacks; pass ``{}`` to pin
    nothing). ``seed`` (random if None, recorded) draws the arm order and the COW samples.
    Raises :class:`ABInterrupted` (a KeyboardInterrupt) with the finished trials on Ctrl-C/SIGTERM,
    after cleaning up; other errors propagate after the same cleanup.
    """
    from ..ksm.controller import Ksm

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise UsageError(f"trials must be a positive integer (per arm), got {trials!r}")
    if not settle_timeout > 0 or not sample_interval > 0:
        raise UsageError("settle_timeout and sample_interval must be positive seconds")
    if cow_sample < 0:
        raise UsageError("cow_sample must be >= 0 pages")
    ksm = ksm if ksm is not None else Ksm()
    arms, fixed = _check_arms(DEFAULT_ARMS if arms is None else arms, fixed, ksm.knob_names())
    arms, fixed = _preflight(ksm, arms, fixed)
    if len({tuple(sorted(v.items())) for v in arms.values()}) < len(arms):
        raise UsageError("two arms have identical knobs once parsed (e.g. 1 and y are the same "
                         "boolean): they would measure the same thing")
    workload.preflight()
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    before = ksm.snapshot()
    others = other_mergeable_processes(
        exclude=getattr(workload, "pids", ()) if getattr(workload, "kind", "") == "pids" else (),
        procfs=getattr(ksm, "procfs", "/proc"))
    if others:
        log.warning("other processes have KSM-registered memory; ksmd scans it in every trial, so "
                    "it adds to the counters and to ksmd's CPU time: %s",
                    ", ".join(f"{o['comm']}[{o['pid']}]" for o in others[:8]))
    config = {
        "workload": workload.describe(), "arms": arms, "fixed": fixed,
        "machine_knobs": {k: v for k, v in before.items() if k not in fixed and k not in arms[
            next(iter(arms))] and k not in HARNESS_KNOBS},
        "trials_per_arm": trials, "seed": seed, "settle_timeout": settle_timeout,
        "sample_interval": sample_interval, "cow_sample": cow_sample, "stable_scans": stable_scans,
        "page_size": ksm.page_size, "kernel": os.uname().release, "cpus": os.cpu_count(),
        "other_mergeable_processes": others, "knobs_before": before.as_dict(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result = ABResult(config=config)
    order = trial_order(list(arms), trials, seed)
    state = _Run()
    interrupted: BaseException | None = None
    with _sigterm_raises():
        try:
            for index, (block, arm) in enumerate(order):
                label = f"trial {index + 1}/{len(order)} {arm}"
                if progress:
                    progress(f"{label}: starting the workload")
                record = _run_trial(ksm, workload, state, index, block, arm, {**fixed, **arms[arm]},
                                    seed=seed + 1000 * (index + 1), settle_timeout=settle_timeout,
                                    sample_interval=sample_interval, cow_sample=cow_sample,
                                    stable_scans=stable_scans, progress=progress, label=label)
                if record.status == "workload-failed" and not result.trials:
                    raise WorkloadError(f"the workload failed to start: {record.error}")
                result.trials.append(record)
                log.info("%s: %s, saved %s bytes in %s s", label, record.status, record.saved_bytes,
                         record.settle_seconds)
                if on_trial is not None:
                    on_trial(record, result)
        except KeyboardInterrupt as err:
            interrupted = err
        finally:
            with _signals_held() as pending:
                if state.running is not None:
                    state.running.stop(grace=0)
                    state.running = None
                try:
                    ksm.unmerge_all()       # leave no merged page of ours behind
                finally:
                    ksm.restore(before, allow_unmerge=True)
            if pending and interrupted is None:
                interrupted = KeyboardInterrupt(signal.Signals(pending[0]).name)
    result.config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result.summarize()
    if interrupted is not None:
        result.interrupted = True
        raise ABInterrupted(result, str(interrupted) or "SIGINT") from None
    return result


def _run_trial(ksm, workload, state: _Run, index: int, block: int, arm: str, knobs: dict, *,
               seed: int, settle_timeout: float, sample_interval: float, cow_sample: int,
               stable_scans: int, progress, label: str) -> TrialRecord:
    record = TrialRecord(index=index, block=block, arm=arm, knobs=dict(knobs), started_at=time.time())
    ksm.unmerge_all()
    with ksm.settings(allow_unmerge=True, run=0, **knobs):
        t_start = time.monotonic()
        try:
            running = workload.start(seed)
        except WorkloadError as err:
            record.status, record.error = "workload-failed", str(err)
            return record
        state.running = running
        try:
            record.populate_seconds = round(time.monotonic() - t_start, 4)
            cpu0 = ksm.ksmd_cpu_seconds()
            t0 = time.monotonic()
            ksm.set("run", 1)
            applied = ksm.snapshot()
            sampler = _Sampler(ksm, t0, cpu0, sample_interval, progress, label, pids=running.pids)
            sampler.start()
            try:
                stats, record.timed_out = _wait_settled(ksm, running, settle_timeout, stable_scans)
                t_end = time.monotonic()
                cpu = ksm.ksmd_cpu_seconds() - cpu0
            finally:
                record.series = sampler.finish()
            pids = running.pids()
            process = _process_totals(pids, getattr(ksm, "procfs", "/proc")) if pids else None
            _fill_counters(record, stats, t_end - t0, cpu, process)
            outside = {k: [a, b] for k, (a, b) in ksm.changed_since(applied).items()}
            if outside:
                # another tool wrote KSM knobs mid-trial: its numbers measure something else
                record.outside_changes = outside
                record.status = "disturbed"
                record.error = "knobs changed by someone else during the trial: " + ", ".join(
                    f"{k} {a!r}->{b!r}" for k, (a, b) in outside.items())
                log.warning("trial %d (%s): %s; left out of the summary", index + 1, arm, record.error)
                return record
            died = running.exit_description()
            if died is not None and running.owned:
                record.status, record.error = "workload-died", died
                return record
            if not running.alive():
                record.status, record.error = "workload-died", "the workload's processes are gone"
                return record
            if cow_sample:
                ksm.set("run", 0)       # hold the merged pages still while timing their COW breaks
                try:
                    cow = running.cow(cow_sample, seed)
                except WorkloadError as err:
                    record.status, record.error = "workload-died", str(err)
                    return record
                if cow is not None:
                    record.cow = cow
                    for key in ("cow_ns_per_page", "cow_ns_ksm_page", "cow_ns_zero_page",
                                "write_ns_per_page"):
                        setattr(record, key, cow.get(key))
            record.status = "timeout" if record.timed_out else "ok"
        finally:
            running.stop()
            state.running = None
    return record


def _wait_settled(ksm, running, timeout: float, stable_scans: int):
    """:meth:`Ksm.wait_settled`, given up early if the workload dies: ``(stats, timed_out)``.

    The wait runs in a thread so that the main thread can watch the workload (and take Ctrl-C). A
    wait given up on ends by itself at its timeout; it only reads counters."""
    box: dict = {}

    def wait():
        try:
            box["stats"] = ksm.wait_settled(timeout=timeout, stable_scans=stable_scans)
        except KsmTimeout as err:
            box["stats"], box["timed_out"] = err.stats, True
        except BaseException as err:  # handed to the main thread
            box["error"] = err

    waiter = threading.Thread(target=wait, name="udedup-ab-settle", daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(0.05)
        if waiter.is_alive() and not running.alive():
            return ksm.stats(), False      # the caller reports the death
    if "error" in box:
        raise box["error"]
    return box["stats"], box.get("timed_out", False)


def _fill_counters(record: TrialRecord, stats, settle: float, cpu: float, process: dict | None):
    record.settle_seconds = round(settle, 4)
    record.full_scans = stats.full_scans
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "ksm_zero_pages", "general_profit", "rmap_items", "saved_pages", "saved_bytes"):
        setattr(record, name, getattr(stats, name))
    record.ksmd_cpu_seconds = round(cpu, 3)
    record.saved_mib_per_cpu_second = (round(stats.saved_bytes / 2**20 / cpu, 2) if cpu > 0 else None)
    record.t99_seconds, record.cpu_t99_seconds = t99(record.series, stats.saved_pages)
    record.process = process
    if process is not None:
        mine = process["merging_pages"] + process["zero_pages"]
        record.foreign_pages = max(0, stats.pages_shared + stats.saved_pages - mine)
        seen = [v for v in record.series.get("foreign_rmap_items", []) if v is not None]
        record.foreign_rmap_items = max([max(0, stats.rmap_items - process["rmap_items"])] + seen)

