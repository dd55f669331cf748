"""The A/B engine: run one workload under two (or more) KSM settings, fairly and repeatedly, and say
what changed and how sure we are.

A run is ``trials`` blocks; every block runs each arm once, in an order drawn from the seed, so slow
drift on the machine spreads over all arms. One trial:

1. ``run=2``: every merged page on the machine is unmerged, nothing is left from the last trial;
2. the arm's knobs and the fixed knobs are applied with ksmd stopped (``run=0``);
3. the workload starts and reports ready; then ``run=1`` and the clock and ksmd's CPU meter start;
4. a sampler thread records the counters and ksmd CPU time while :meth:`Ksm.wait_settled` waits
   for a plateau: no trend beyond ``settle_tolerance`` over the last ``stable_scans`` full scans
   (:mod:`udedup.ksm.settle`: live memory jitters forever); the trial's counters are the plateau's
   median read (a timeout is recorded as such, not raised);
5. ksmd is stopped again and the synthetic workload writes into a sample of its merged pages, timing
   the copy-on-write breaks (KSM pages and zero-page mappings alike);
6. the workload is stopped (its process group killed) and every knob is put back.

Whatever happens (an error, Ctrl-C, SIGTERM) every workload process is killed, every knob restored,
and the trials finished so far are kept: :class:`ABInterrupted` carries them. Records are in
:mod:`.records`, the statistics in :mod:`.stats`, the sampler in :mod:`.sampler`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Callable, ContextManager, Mapping, Sequence

from ..errors import KsmPermissionError, KsmTimeout, UsageError, WorkloadError
from ..ksm.settle import DEFAULT_TOLERANCE
from ..signals import held, sigterm_raises
from .records import ABInterrupted, ABResult, TrialRecord
from .sampler import Sampler, other_mergeable_processes, process_totals, true_baseline
from .stats import t99, trial_order

log = logging.getLogger(__name__)

DEFAULT_ARMS: dict[str, dict[str, object]] = {"off": {"use_zero_pages": 0}, "on": {"use_zero_pages": 1}}

#: Pinned in every arm unless the arms vary them. Fast enough that a 256 MiB trial settles in about
#: a second, slow enough (a sleep between batches) that ksmd does not take a whole core.
DEFAULT_FIXED: dict[str, object] = {"advisor_mode": "none", "pages_to_scan": 4000,
                                    "sleep_millisecs": 10, "smart_scan": 0}

#: The harness drives ``run`` itself (unmerge, stop during setup and COW timing, start).
HARNESS_KNOBS = ("run",)


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
        path = ksm.path(name)
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
           on_trial: Callable[[TrialRecord, ABResult], None] | None = None,
           settle_tolerance: float = DEFAULT_TOLERANCE,
           lock: ContextManager | None = None) -> ABResult:
    """Run ``workload`` under every arm, ``trials`` times each; return every record and a summary.

    ``arms``: ``{name: {knob: value}}``; the first arm is the baseline the others are compared to
    (default: use_zero_pages off vs on). ``fixed``: knobs pinned in every arm (default
    :data:`DEFAULT_FIXED`, minus what the arms vary or the kernel lacks; pass ``{}`` to pin
    nothing). ``seed`` (random if None, recorded) draws the arm order and the COW samples.
    ``settle_tolerance``: how much the saving may still move per full scan, as a fraction of it
    (plus a 32-page floor), for a trial to count as settled; 0 waits for exactly equal counters.
    ``lock``: a context manager held from the baseline snapshot to the end of the restore, after
    every check (``udedup ab`` passes :func:`udedup.ksm.experiment_lock`).
    Raises :class:`ABInterrupted` (a KeyboardInterrupt) with the finished trials on Ctrl-C/SIGTERM,
    after cleaning up; other errors propagate after the same cleanup.
    """
    from ..ksm import Ksm

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise UsageError(f"trials must be a positive integer (per arm), got {trials!r}")
    if not settle_timeout > 0 or not sample_interval > 0:
        raise UsageError("settle_timeout and sample_interval must be positive seconds")
    if cow_sample < 0:
        raise UsageError("cow_sample must be >= 0 pages")
    if isinstance(settle_tolerance, bool) or not 0 <= settle_tolerance < 1:
        raise UsageError(f"settle_tolerance must be a fraction in [0, 1) of the saving per full "
                         f"scan (default {DEFAULT_TOLERANCE}), got {settle_tolerance!r}")
    ksm = ksm if ksm is not None else Ksm()
    arms, fixed = _check_arms(DEFAULT_ARMS if arms is None else arms, fixed, ksm.knob_names())
    arms, fixed = _preflight(ksm, arms, fixed)
    if len({tuple(sorted(v.items())) for v in arms.values()}) < len(arms):
        raise UsageError("two arms have identical knobs once parsed (e.g. 1 and y are the same "
                         "boolean): they would measure the same thing")
    workload.preflight()
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    # the lock (udedup ab: the machine's experiment lock) from the first knob read to the restore
    with lock if lock is not None else contextlib.nullcontext():
        before = ksm.snapshot()
        others = other_mergeable_processes(
            exclude=getattr(workload, "pids", ()) if getattr(workload, "kind", "") == "pids" else (),
            procfs=ksm.procfs)
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
            "settle_tolerance": settle_tolerance,
            "page_size": ksm.page_size, "kernel": os.uname().release, "cpus": os.cpu_count(),
            "other_mergeable_processes": others, "knobs_before": before.as_dict(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        result = ABResult(config=config)
        order = trial_order(list(arms), trials, seed)
        state = _Run()
        interrupted: str | None = None      # the signal that stopped the run
        with sigterm_raises():
            try:
                try:
                    for index, (block, arm) in enumerate(order):
                        label = f"trial {index + 1}/{len(order)} {arm}"
                        if progress:
                            progress(f"{label}: starting the workload")
                        record = _run_trial(ksm, workload, state, index, block, arm,
                                            {**fixed, **arms[arm]}, seed=seed + 1000 * (index + 1),
                                            settle_timeout=settle_timeout,
                                            sample_interval=sample_interval, cow_sample=cow_sample,
                                            stable_scans=stable_scans, settle_tolerance=settle_tolerance,
                                            progress=progress, label=label)
                        if record.status == "workload-failed" and not result.trials:
                            raise WorkloadError(f"the workload failed to start: {record.error}")
                        result.trials.append(record)
                        log.info("%s: %s, saved %s bytes in %s s", label, record.status,
                                 record.saved_bytes, record.settle_seconds)
                        if on_trial is not None:
                            on_trial(record, result)
                except KeyboardInterrupt as err:
                    interrupted = str(err) or "SIGINT"
            finally:
                late = _clean_up(ksm, state, before)
        with held() as pending:     # a Ctrl-C while the summary is computed keeps it, and counts
            result.config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            result.summarize()
        late += [signal.Signals(sig).name for sig in pending]
        if late and interrupted is None:
            interrupted = late[0]
        if interrupted is not None:
            result.interrupted = True
            raise ABInterrupted(result, interrupted) from None
        return result


def _clean_up(ksm, state: _Run, before) -> list[str]:
    """Stop the workload of the trial in progress, unmerge, restore every knob; with SIGINT and
    SIGTERM held, so that a Ctrl-C cannot cut the restore short. Returns the names of the signals
    that came meanwhile: the run ends as interrupted, never as if they had not come.

    A KeyboardInterrupt can still land here before the hold is in place (a second Ctrl-C right
    after the first, or SIGTERM's handler firing while the hold installs itself): then the cleanup
    starts over instead of being skipped. Every step is idempotent."""
    arrived: list[str] = []
    while True:
        try:
            with held() as pending:
                if state.running is not None:
                    state.running.stop(grace=0)
                    state.running = None
                try:
                    ksm.unmerge_all()       # leave no merged page of ours behind
                finally:
                    ksm.restore(before, allow_unmerge=True)
            return arrived + [signal.Signals(sig).name for sig in pending]
        except KeyboardInterrupt as err:
            arrived.append(str(err) or "SIGINT")


def _run_trial(ksm, workload, state: _Run, index: int, block: int, arm: str, knobs: dict, *,
               seed: int, settle_timeout: float, sample_interval: float, cow_sample: int,
               stable_scans: int, progress, label: str,
               settle_tolerance: float = DEFAULT_TOLERANCE) -> TrialRecord:
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
            baseline = true_baseline(ksm)   # ksmd still stopped: the trial's saving counts from here
            cpu0 = ksm.ksmd_cpu_seconds()
            t0 = time.monotonic()
            ksm.set("run", 1)
            applied = ksm.snapshot()
            sampler = Sampler(ksm, t0, cpu0, sample_interval, progress, label, pids=running.pids,
                              procfs=ksm.procfs, baseline=baseline)
            sampler.start()
            try:
                stats, record.timed_out, record.plateau = _wait_settled(
                    ksm, running, settle_timeout, stable_scans, settle_tolerance)
                t_end = time.monotonic()
                cpu = ksm.ksmd_cpu_seconds() - cpu0
            finally:
                record.series = sampler.finish()
            pids = running.pids()
            process = process_totals(pids, ksm.procfs) if pids else None
            _fill_counters(record, stats, t_end - t0, cpu, process)
            record.take_true_saving()       # saved_bytes: the true saving's change (records.py)
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


def _wait_settled(ksm, running, timeout: float, stable_scans: int, tolerance: float):
    """:meth:`Ksm.wait_settled`, given up early if the workload dies: ``(stats, timed_out,
    plateau)``, the plateau as a dict (:class:`udedup.ksm.settle.Plateau`) or None.

    The wait runs in a thread so that the main thread can watch the workload (and take Ctrl-C). A
    wait given up on ends by itself at its timeout; it only reads counters."""
    box: dict = {}
    trackers: list = []

    def wait():
        try:
            box["stats"] = ksm.wait_settled(timeout=timeout, stable_scans=stable_scans,
                                            tolerance=tolerance, tracker_out=trackers)
        except KsmTimeout as err:
            box["stats"], box["timed_out"] = err.stats, True
        except BaseException as err:  # handed to the main thread
            box["error"] = err

    waiter = threading.Thread(target=wait, name="udedup-ab-settle", daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(0.05)
        if waiter.is_alive() and not running.alive():
            return ksm.stats(), False, None     # the caller reports the death
    if "error" in box:
        raise box["error"]
    plateau = trackers[0].plateau if trackers and not box.get("timed_out") else None
    return box["stats"], box.get("timed_out", False), plateau and plateau.as_dict()


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

