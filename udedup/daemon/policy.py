"""The daemon's decisions, as pure functions of what it observed: no I/O, no clock of its own.

Each round the daemon hands :meth:`Policy.decide` an :class:`Observation` (candidate processes with
their KSM state, KSM counters and knobs, ksmd and daemon CPU time, memory pressure, the time) and
gets back a :class:`Plan`: which processes to estimate now, which to register, which knobs to write,
and every decision with its reason. Estimation and registration results come back through
:meth:`Policy.record_estimate` / :meth:`Policy.record_registration`, knob writes through
:meth:`Policy.record_written`. Tests drive it with hand-made observations and a fake clock.

How ksmd's speed is chosen:

- *fast* while registered, worthwhile memory holds predicted saving that is not realized yet: one full
  scan of the registered pages in ``fast_scan_seconds``;
- *slow* once realized savings reach ``realized_percent`` of the prediction, or merging has settled
  (``settle_scans`` full scans since the last registration without saving growth): the remaining
  gap is then the prediction's error, and scanning faster would not close it;
- *stopped* (``run=0``: merged pages stay merged) when nothing is worth merging;
- memory pressure multiplies the rate by ``pressure.speedup``;
- always within the CPU budget: ksmd's cost per scanned page is measured (CPU-seconds over
  ``pages_scanned``), the daemon's own CPU share is subtracted, and the rate is clamped to what fits;
- the budget is an average over ``cpu_budget_window``: while unspent budget remains, a fast scan
  bursts at ``burst_percent`` (flat out by default: seconds instead of tens of seconds, for the
  CPU of large slow batches, measured), and the daemon watches the counters closely so that the
  burst ends when the saving is realized.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from .config import Config, glob_match, regex_search

#: ksmd CPU per scanned page before we have measured it (KSM.md: 1-2 us per page on first passes).
PRIOR_SECONDS_PER_PAGE = 2e-6
#: Knob writes within this relative distance of the current value are skipped (no flapping).
HYSTERESIS = 0.2
#: Saving growth below this fraction over one full scan counts as "not growing".
SETTLE_TOLERANCE = 0.01
#: ksmd keeps at least this share of the CPU budget, whatever the daemon itself used.
KSMD_BUDGET_FLOOR = 0.25
#: One joint estimate may read up to this many seconds of the estimator budget in advance (it is
#: paid back before the next one starts): joint, because KSM merges across processes.
JOINT_ESTIMATE_SECONDS = 60.0
#: Weight of the newest sample in the moving averages of per-page cost and daemon CPU.
EWMA = 0.5


@dataclass(frozen=True)
class ProcessInfo:
    """One process as the daemon saw it this round. Sizes are bytes."""

    pid: int
    start_time: int                 # /proc/PID/stat starttime: with pid, names one process for good
    name: str
    cmdline: str = ""
    exe: str = ""
    uid: int = 0
    cgroup: str = ""
    anon_rss: int = 0
    merge_any: bool = False         # PR_SET_MEMORY_MERGE (udedup run, or injected prctl)
    mergeable: bool = False         # ksm_stat ksm_mergeable: the mm entered KSM at some point
    registered_bytes: int = 0       # resident bytes in mappings with VmFlags mg
    eligible_bytes: int = 0         # resident bytes in mappings KSM could register
    ksm_merging_pages: int = 0
    ksm_profit: int = 0             # ksm_process_profit (counts the KSM page itself: an upper bound)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_time)

    @property
    def registered(self) -> bool:
        """ksmd scans some of its memory now."""
        return self.merge_any or self.registered_bytes > 0


@dataclass(frozen=True)
class EstimateResult:
    """What the estimator predicted for one process (scope: all eligible memory).

    ``ranges``: the page-aligned (start, end) address ranges holding every page predicted to save
    (registration.granularity = "ranges" registers only these); ``range_bytes``: resident bytes in
    them, which ksmd would scan. ``saved_bytes`` pays KSM's 64-byte rmap item for each page that
    would be registered: the ranges' pages, or all scanned pages for whole-process registration."""

    at: float
    saved_bytes: int
    scanned_bytes: int
    saved_percent: float
    ranges: tuple = ()
    range_bytes: int = 0
    screened: str = ""          # set when a sample ruled the process out: how (no full estimate)


class Register(NamedTuple):
    """One registration to do by injection: the whole process (``ranges`` None) or ``ranges``."""

    info: "ProcessInfo"
    mode: str                   # inject mode: auto, prctl, madvise
    ranges: tuple | None = None


@dataclass(frozen=True)
class Memory:
    total: int
    available: int
    psi_some_avg10: float | None = None     # None: no PSI on this kernel


@dataclass(frozen=True)
class Observation:
    now: float                          # monotonic seconds
    processes: tuple                    # candidate ProcessInfo, already matched
    counters: dict                      # KSM read-only counters
    knobs: dict                         # KSM knobs, typed
    saved_bytes: int                    # kernel's saved bytes (general_profit)
    page_size: int
    ksmd_cpu_seconds: float
    daemon_cpu_seconds: float
    memory: Memory | None = None


@dataclass(frozen=True)
class Decision:
    kind: str           # candidate, estimate, register, knobs, mode, external
    action: str         # short verb: estimate, register, would-register, skip, set, yield, ...
    reason: str
    pid: int | None = None

    def __str__(self) -> str:
        who = f"pid {self.pid}: " if self.pid is not None else ""
        return f"{who}{self.action}: {self.reason}"


@dataclass
class Plan:
    estimate: list = field(default_factory=list)        # ProcessInfo to estimate together, now
    register: list = field(default_factory=list)        # Register actions, by injection
    knobs: dict = field(default_factory=dict)           # knob -> value to write
    mode: str = "hold"                                  # fast, slow, stopped, hold
    decisions: list = field(default_factory=list)       # new or changed decisions only
    pressure: bool = False
    predicted_bytes: int = 0
    realized_bytes: int = 0
    unrealized_bytes: int = 0
    scan_pages: int = 0                                 # registered pages a full scan covers
    target_pages_per_second: float = 0.0
    budget_pages_per_second: float = 0.0
    ksmd_cpu_percent: float | None = None
    daemon_cpu_percent: float | None = None
    seconds_per_page: float = PRIOR_SECONDS_PER_PAGE
    bursting: bool = False                              # fast scan above the average budget


# --- candidate matching ---------------------------------------------------------------------------
def match_process(cfg: Config, proc: ProcessInfo) -> tuple[bool, str]:
    """Is ``proc`` a candidate, and why (deny lists win; size is checked last)."""
    c = cfg.candidates
    denied = (("exclude_names", glob_match(c.exclude_names, proc.name)),
              ("exclude_cmdline", regex_search(c.exclude_cmdline, proc.cmdline)),
              ("exclude_exe", glob_match(c.exclude_exe, proc.exe)),
              ("exclude_cgroups", glob_match(c.exclude_cgroups, proc.cgroup)),
              ("exclude_uids", proc.uid in c.exclude_uids))
    for key, hit in denied:
        if hit:
            return False, f"denied by candidates.{key}"
    if c.uids and proc.uid not in c.uids:
        return False, f"uid {proc.uid} not in candidates.uids"
    hits = [key for key, hit in (("names", glob_match(c.names, proc.name)),
                                 ("cmdline", regex_search(c.cmdline, proc.cmdline)),
                                 ("exe", glob_match(c.exe, proc.exe)),
                                 ("cgroups", glob_match(c.cgroups, proc.cgroup))) if hit]
    if not hits:
        if c.include_registered and (proc.registered or proc.mergeable):
            hits = ["include_registered"]
        else:
            return False, "matches no candidates pattern"
    if proc.anon_rss < c.min_anon_rss:
        return False, (f"{_mib(proc.anon_rss)} anonymous resident, below candidates.min_anon_rss "
                       f"({_mib(c.min_anon_rss)})")
    return True, "matched candidates." + ", ".join(hits)


def pressure_state(cfg: Config, mem: Memory | None) -> tuple[bool, str]:
    if mem is None or mem.total <= 0:
        return False, "no memory figures"
    p = cfg.pressure
    avail_pct = 100.0 * mem.available / mem.total
    if avail_pct < p.mem_available_percent:
        return True, (f"MemAvailable {avail_pct:.1f}% of MemTotal < pressure.mem_available_percent "
                      f"{p.mem_available_percent:g}")
    if p.psi_some_avg10 > 0 and mem.psi_some_avg10 is not None and mem.psi_some_avg10 > p.psi_some_avg10:
        return True, (f"memory PSI some avg10 {mem.psi_some_avg10:.1f} > pressure.psi_some_avg10 "
                      f"{p.psi_some_avg10:g}")
    return False, f"MemAvailable {avail_pct:.1f}%"


def knobs_for_rate(pages_per_second: float, sleep_ms: int, seconds_per_page: float,
                   max_pages: int) -> int:
    """pages_to_scan such that batches of it, separated by ``sleep_ms``, scan ``pages_per_second``.

    One cycle lasts sleep + pages * cost, so rate = p / (s + p c), i.e. p = R s / (1 - R c).
    """
    s = max(sleep_ms, 1) / 1000.0
    busy = pages_per_second * seconds_per_page
    if busy >= 1.0:
        return max_pages
    return int(min(max_pages, max(1, math.ceil(pages_per_second * s / (1.0 - busy)))))


def sleep_for_batch(pages_per_second: float, sleep_ms: int, seconds_per_page: float,
                    min_batch: int, max_sleep_ms: int = 60000) -> int:
    """The least sleep_millisecs >= ``sleep_ms`` at which ``pages_per_second`` comes in batches of
    at least ``min_batch`` pages (the inverse of :func:`knobs_for_rate`).

    ksmd pays for every wake-up: merging the same memory took 2.39 CPU-s at 500 pages per 20 ms
    and 1.73 at 5000 per 200 ms, the same rate (docs/results/bench_ksmd_rate.txt)."""
    if pages_per_second <= 0 or min_batch <= 1:
        return sleep_ms
    busy = pages_per_second * seconds_per_page
    if busy >= 1.0:
        return sleep_ms
    need = math.ceil(1000.0 * min_batch * (1.0 - busy) / pages_per_second)
    return int(min(max_sleep_ms, max(sleep_ms, need)))


def _covers(outer, inner) -> bool:
    """Does the union of ``outer`` ranges contain every range of ``inner``?"""
    return all(any(a <= s and e <= b for a, b in outer) for s, e in inner)


def _ranges_text(ranges, est: EstimateResult) -> str:
    n = len(ranges)
    return (f"{n} range{'s' if n != 1 else ''} holding the predicted saving "
            f"({_mib(est.range_bytes)} of {_mib(est.scanned_bytes)} resident)")


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# --- the policy -----------------------------------------------------------------------------------
@dataclass
class _Proc:
    info: ProcessInfo
    estimate: EstimateResult | None = None
    estimate_failed: str | None = None
    estimate_failed_at: float = 0.0
    registration_failed: str | None = None
    registered_at: float | None = None
    registered_ranges: tuple | None = None  # what our last range registration covered
    last_reason: str | None = None          # last decision reported for this process
    worthwhile: bool = False


class Policy:
    """Keeps the memory of past rounds (estimates, scan tracking, knob ownership) and decides."""

    def __init__(self, cfg: Config, now: float = 0.0):
        self.cfg = cfg
        self.procs: dict[tuple[int, int], _Proc] = {}
        self.written: dict[str, object] = {}        # what we last wrote and still own
        self.yielded: dict[str, object] = {}        # knobs someone else took: never written again
        self.tokens = 0.0                           # estimator budget (bytes); negative = in debt
        self.tokens_at = now
        self.estimated_bytes_total = 0
        self.decision_counts: dict[str, int] = {}
        self.seconds_per_page = PRIOR_SECONDS_PER_PAGE
        self.daemon_cpu_share = 0.0
        # the CPU budget as a bucket of CPU-seconds: it fills at the budget rate up to one window's
        # worth, ksmd and the daemon drain it; it starts full, so the first merge may burst
        self.cpu_credit = self._credit_cap()
        self.mode = "hold"
        self._mode_reason = ""
        self._mode_tag = ""
        self._prev: Observation | None = None
        self._change_scan = 0                       # full_scans when the registered set last grew
        self._scan_saved: dict[int, int] = {}       # full_scans value -> saved pages then
        self._managed_keys: set = set()
        self._knob_mode = None                      # mode the current knob values were chosen for
        self._advisor_logged = False

    # --- feedback from the daemon
    def _credit_cap(self) -> float:
        k = self.cfg.ksmd
        return k.cpu_budget_percent / 100.0 * k.cpu_budget_window

    def reconfigure(self, cfg: Config) -> None:
        """SIGHUP: new settings; estimates stay, yielded knobs are ours again to decide about."""
        self.cfg = cfg
        self.cpu_credit = min(self.cpu_credit, self._credit_cap())
        self.yielded.clear()
        for p in self.procs.values():
            p.last_reason = None
            p.registration_failed = None
        self._knob_mode = None

    def record_estimate(self, key, result: EstimateResult | None, error: str | None = None,
                        now: float = 0.0) -> None:
        p = self.procs.get(key)
        if p is None:
            return
        if result is None:
            p.estimate_failed, p.estimate_failed_at = error or "estimate failed", now
            return
        p.estimate, p.estimate_failed = result, None

    def record_registration(self, key, ok: bool, detail: str, now: float) -> None:
        p = self.procs.get(key)
        if p is None:
            return
        if ok:
            p.registered_at, p.registration_failed = now, None
        else:
            p.registered_at, p.registration_failed = None, detail
            p.registered_ranges = None

    def record_written(self, knobs: dict) -> None:
        self.written.update(knobs)

    # --- the round
    def decide(self, obs: Observation) -> Plan:
        cfg = self.cfg
        plan = Plan()
        self._external_changes(obs, plan)
        self._sync_processes(obs, plan)
        self._measure(obs, plan)
        plan.pressure, pressure_reason = pressure_state(cfg, obs.memory)
        self._choose_estimates(obs, plan)
        self._classify(obs, plan)
        self._choose_mode(obs, plan, pressure_reason)
        self._prev = obs
        for d in plan.decisions:
            self.decision_counts[d.kind] = self.decision_counts.get(d.kind, 0) + 1
        return plan

    def _note(self, plan: Plan, p: _Proc, kind: str, action: str, reason: str) -> None:
        # a process's decision is reported when it changes, not every round
        text = f"{action}: {reason}"
        if p.last_reason != text:
            p.last_reason = text
            plan.decisions.append(Decision(kind, action, reason, p.info.pid))

    def _external_changes(self, obs: Observation, plan: Plan) -> None:
        for name, ours in list(self.written.items()):
            now = obs.knobs.get(name)
            if now is not None and now != ours:
                del self.written[name]
                self.yielded[name] = now
                plan.decisions.append(Decision(
                    "external", "yield", f"{name} was changed by someone else ({ours!r} -> {now!r}): "
                    "leaving it to them until reload (SIGHUP), and not restoring it on exit"))

    def _sync_processes(self, obs: Observation, plan: Plan) -> None:
        seen = set()
        for info in obs.processes:
            seen.add(info.key)
            p = self.procs.get(info.key)
            if p is None:
                self.procs[info.key] = _Proc(info)
                plan.decisions.append(Decision("candidate", "track", f"{info.name}: new candidate, "
                                               f"{_mib(info.anon_rss)} anonymous", info.pid))
            else:
                p.info = info
        for key in [k for k in self.procs if k not in seen]:
            gone = self.procs.pop(key)
            plan.decisions.append(Decision("candidate", "forget", f"{gone.info.name}: exited or no "
                                           "longer a candidate", gone.info.pid))

    def _measure(self, obs: Observation, plan: Plan) -> None:
        prev = self._prev
        scans = int(obs.counters.get("full_scans", 0))
        saved_pages = int(obs.counters.get("pages_sharing", 0)) + int(obs.counters.get("ksm_zero_pages", 0))
        if prev is not None and scans < int(prev.counters.get("full_scans", 0)):
            # run=2 resets full_scans: start the settle tracking over
            self._scan_saved.clear()
            self._change_scan = 0
        # the last value seen while full_scans had this count: the saving at the end of that scan
        self._scan_saved[scans] = saved_pages
        for old in [k for k in self._scan_saved if k < scans - 8]:
            del self._scan_saved[old]
        if prev is None:
            return
        dt = obs.now - prev.now
        if dt <= 0:
            return
        d_ksmd = max(0.0, obs.ksmd_cpu_seconds - prev.ksmd_cpu_seconds)
        d_daemon = max(0.0, obs.daemon_cpu_seconds - prev.daemon_cpu_seconds)
        d_pages = int(obs.counters.get("pages_scanned", 0)) - int(prev.counters.get("pages_scanned", 0))
        plan.ksmd_cpu_percent = 100.0 * d_ksmd / dt
        plan.daemon_cpu_percent = 100.0 * d_daemon / dt
        budget = self.cfg.ksmd.cpu_budget_percent / 100.0
        self.cpu_credit = min(self._credit_cap(), self.cpu_credit + budget * dt - d_ksmd - d_daemon)
        # CPU time has 10 ms resolution: only trust the per-page cost over enough work
        if d_pages >= 20000 and d_ksmd >= 0.05:
            sample = d_ksmd / d_pages
            self.seconds_per_page = EWMA * sample + (1 - EWMA) * self.seconds_per_page
        self.daemon_cpu_share = EWMA * (d_daemon / dt) + (1 - EWMA) * self.daemon_cpu_share
        plan.seconds_per_page = self.seconds_per_page

    def _choose_estimates(self, obs: Observation, plan: Plan) -> None:
        """Token bucket with debt: an estimate may start whenever the bucket is not in debt, and
        pays for what it reads afterwards. Due processes go into one joint estimate (up to
        JOINT_ESTIMATE_SECONDS of budget), so duplicates across processes are seen."""
        e = self.cfg.estimate
        burst = e.scan_budget * max(self.cfg.daemon.interval, 1.0)
        self.tokens = min(burst, self.tokens + e.scan_budget * max(0.0, obs.now - self.tokens_at))
        self.tokens_at = obs.now
        due = []
        for p in self.procs.values():
            if p.estimate is None and p.estimate_failed is None:
                due.append(p)
            elif p.estimate_failed is not None and obs.now - p.estimate_failed_at >= e.reestimate_seconds:
                due.append(p)
            elif p.estimate is not None and obs.now - p.estimate.at >= e.reestimate_seconds:
                due.append(p)
        if not due:
            return
        if self.tokens < 0:
            wait = -self.tokens / e.scan_budget
            for p in due:
                # said once per process, not every round: the wait is in the text only the first time
                if not (p.last_reason or "").startswith("wait: estimator budget in debt"):
                    self._note(plan, p, "estimate", "wait", f"estimator budget in debt, next estimate "
                               f"in {wait:.0f} s (estimate.scan_budget {_mib(e.scan_budget)}/s)")
            return
        due.sort(key=lambda p: (p.estimate is not None, -p.info.anon_rss))
        cost = 0
        group_limit = self.tokens + e.scan_budget * JOINT_ESTIMATE_SECONDS
        for p in due:
            size = (p.info.eligible_bytes or p.info.anon_rss) * e.passes
            if plan.estimate and cost + size > group_limit:
                break
            plan.estimate.append(p.info)
            cost += size
        self.tokens -= cost
        self.estimated_bytes_total += cost
        names = ", ".join(f"{i.pid}" for i in plan.estimate)
        plan.decisions.append(Decision("estimate", "estimate", f"pids {names}: {_mib(cost)} to read "
                                       f"({e.passes} passes)"))

    def _classify(self, obs: Observation, plan: Plan) -> None:
        r = self.cfg.registration
        for p in self.procs.values():
            info = p.info
            if p.estimate is None:
                p.worthwhile = False
                if p.estimate_failed:
                    self._note(plan, p, "estimate", "skip", f"{info.name}: cannot estimate: "
                               f"{p.estimate_failed}")
                continue
            est = p.estimate
            enough = est.saved_bytes >= r.min_saving and est.saved_percent >= r.min_saving_percent
            p.worthwhile = enough
            predicted = (f"predicted saving {_mib(est.saved_bytes)} ({est.saved_percent:.1f}% of "
                         f"{_mib(est.scanned_bytes)})")
            if est.screened:
                predicted = f"predicted saving at most about {_mib(est.saved_bytes)} ({est.screened})"
            if not enough:
                why = ("below registration.min_saving " + _mib(r.min_saving)
                       if est.saved_bytes < r.min_saving else
                       f"below registration.min_saving_percent {r.min_saving_percent:g}%")
                if info.registered:
                    self._note(plan, p, "register", "not-worth", f"{info.name}: {predicted}, {why}; "
                               "it is registered anyway, so ksmd scans it for little (udedup disable "
                               f"{info.pid}, or exclude it)")
                else:
                    self._note(plan, p, "register", "skip", f"{info.name}: {predicted}, {why}")
                continue
            ranges = self._ranges(est)
            if info.registered:
                how = "merge-any (prctl)" if info.merge_any else f"{_mib(info.registered_bytes)} madvised"
                self._note(plan, p, "register", "registered", f"{info.name}: {predicted}; already "
                           f"registered ({how})")
                if ranges is not None:
                    if (r.allow_injection and not info.merge_any and p.registered_ranges is not None
                            and not _covers(p.registered_ranges, ranges) and not p.registration_failed):
                        # a newer estimate found saving outside what we registered: add it (the
                        # old ranges stay registered: unregistering would unmerge their pages)
                        plan.register.append(Register(info, "madvise", ranges))
                        p.registered_at = obs.now
                        p.registered_ranges = tuple(sorted(set(p.registered_ranges) | set(ranges)))
                        self._note(plan, p, "register", "register", f"{info.name}: the new estimate "
                                   f"puts saving outside the registered ranges: registering "
                                   f"{_ranges_text(ranges, est)}")
                elif (not info.merge_any and r.allow_injection and info.eligible_bytes
                        and info.registered_bytes < 0.8 * info.eligible_bytes
                        and p.registered_at is not None
                        and obs.now - p.registered_at >= self.cfg.estimate.reestimate_seconds):
                    # madvise covers the mappings that existed then: newer ones need another pass
                    plan.register.append(Register(info, r.inject_mode))
                    p.registered_at = obs.now
                    self._note(plan, p, "register", "register", f"{info.name}: only "
                               f"{_mib(info.registered_bytes)} of {_mib(info.eligible_bytes)} eligible "
                               "is registered (new mappings since the last injection)")
                continue
            if not r.allow_injection:
                self._note(plan, p, "register", "would-register", f"{info.name}: {predicted}; would "
                           "need injection; not allowed by config (registration.allow_injection = "
                           "false): start it under 'udedup run' instead")
                continue
            if p.registration_failed:
                self._note(plan, p, "register", "failed", f"{info.name}: {predicted}; injection "
                           f"failed: {p.registration_failed} (not retried until reload)")
                continue
            if p.registered_at is not None:
                continue  # injected, waiting to see mg flags in the next round
            p.registered_at = obs.now
            if ranges is not None:
                plan.register.append(Register(info, "madvise", ranges))
                p.registered_ranges = ranges
                self._note(plan, p, "register", "register", f"{info.name}: {predicted}; opting "
                           f"{_ranges_text(ranges, est)} in by injection (madvise)")
            else:
                plan.register.append(Register(info, r.inject_mode))
                self._note(plan, p, "register", "register", f"{info.name}: {predicted}; opting it "
                           f"in by injection (mode {r.inject_mode})")

    def _ranges(self, est: EstimateResult) -> tuple | None:
        """The ranges to register, or None for the whole process."""
        if self.cfg.registration.granularity != "ranges" or not est.ranges:
            return None
        return tuple(tuple(x) for x in est.ranges)

    def _settled(self, obs: Observation) -> tuple[bool, str]:
        scans = int(obs.counters.get("full_scans", 0))
        since = scans - self._change_scan
        if since < self.cfg.ksmd.settle_scans:
            return False, f"{since} full scans since the last registration"
        prev_scans = [k for k in self._scan_saved if k < scans]
        if not prev_scans:
            return False, "no earlier full scan seen yet"
        before = self._scan_saved[max(prev_scans)]
        now = self._scan_saved[scans]
        if abs(now - before) > max(16, SETTLE_TOLERANCE * now):
            return False, f"saved pages still moving ({before} -> {now} over the last full scan)"
        return True, f"saved pages steady over the last full scan, {since} full scans since the last registration"

    def _choose_mode(self, obs: Observation, plan: Plan, pressure_reason: str) -> None:
        cfg, k = self.cfg, self.cfg.ksmd
        managed_by_key = {key: p for key, p in self.procs.items()
                          if p.worthwhile and (p.info.registered or p.registered_at is not None)}
        managed = list(managed_by_key.values())
        pending = [p for p in self.procs.values() if p.estimate is None and p.estimate_failed is None]
        keys = set(managed_by_key)
        if keys - self._managed_keys:
            # new memory to merge: it needs settle_scans full scans of its own before "settled"
            self._change_scan = int(obs.counters.get("full_scans", 0))
            self._scan_saved.clear()
            self._scan_saved[self._change_scan] = (int(obs.counters.get("pages_sharing", 0))
                                                   + int(obs.counters.get("ksm_zero_pages", 0)))
        self._managed_keys = keys
        # memory being registered right now counts already: the knobs are for the next minutes
        registered_pages = sum(self._pending_bytes(p) if (p.registered_at is not None
                                                          and not p.info.registered)
                               else p.info.registered_bytes
                               for p in self.procs.values()) // obs.page_size
        plan.predicted_bytes = sum(p.estimate.saved_bytes for p in managed)
        profits = sum(max(0, p.info.ksm_profit) for p in managed)
        plan.realized_bytes = max(0, min(obs.saved_bytes, profits))
        plan.unrealized_bytes = max(0, plan.predicted_bytes - plan.realized_bytes)
        plan.scan_pages = registered_pages

        if not managed:
            if pending:
                mode, tag, reason = "hold", "waiting", f"waiting for estimates of {len(pending)} candidates"
            elif k.stop_when_idle:
                n = len(self.procs)
                mode, tag, reason = "stopped", "idle", (f"nothing worth merging ({n} candidates, none predicted to "
                                           "clear the registration thresholds): run=0, merged pages stay")
            else:
                mode, tag, reason = "slow", "idle", "nothing worth merging; ksmd.stop_when_idle is false"
        else:
            done_pct = 100.0 * plan.realized_bytes / plan.predicted_bytes if plan.predicted_bytes else 100.0
            settled, settle_reason = self._settled(obs)
            gap = (f"realized {_mib(plan.realized_bytes)} of predicted {_mib(plan.predicted_bytes)} "
                   f"({done_pct:.0f}%) in {len(managed)} processes")
            if done_pct >= k.realized_percent:
                mode, tag, reason = "slow", "realized", f"{gap}: saving realized"
            elif settled:
                mode, tag, reason = "slow", "settled", f"{gap}: merging settled ({settle_reason}); the rest is beyond reach"
            else:
                mode, tag, reason = "fast", "unrealized", f"{gap}: unrealized saving remains ({settle_reason})"

        desired: dict[str, object] = {}
        if mode == "stopped":
            desired["run"] = 0
        elif mode in ("fast", "slow"):
            desired["run"] = 1
            desired.update(self._speed(obs, plan, mode))
            if plan.pressure:
                reason += f"; memory pressure ({pressure_reason}): x{cfg.pressure.speedup:g}"
                tag += "+pressure"
        if k.use_zero_pages != "keep" and "use_zero_pages" in obs.knobs:
            desired["use_zero_pages"] = k.use_zero_pages == "on"
        if obs.knobs.get("advisor_mode") == "scan-time":
            desired.pop("pages_to_scan", None)
            desired.pop("sleep_millisecs", None)
            if not self._advisor_logged:
                self._advisor_logged = True
                plan.decisions.append(Decision("external", "yield", "advisor_mode is scan-time: the "
                                               "kernel's advisor tunes pages_to_scan; udedup leaves "
                                               "the scan rate to it and decides only run"))
        plan.mode = mode
        if (mode, tag) != (self.mode, self._mode_tag):
            plan.decisions.append(Decision("mode", mode, reason))
        self.mode, self._mode_tag, self._mode_reason = mode, tag, reason

        for name, value in desired.items():
            if name in self.yielded or name not in obs.knobs:
                continue
            current = obs.knobs[name]
            if current == value:
                # ours now as much as if we had written it: a later change by someone else is
                # theirs to keep, not ours to undo
                self.written[name] = value
                continue
            if (name == "pages_to_scan" and mode == self._knob_mode and current
                    and abs(value - current) <= HYSTERESIS * current):
                continue  # same mode, small drift of the measured cost: not worth a write
            plan.knobs[name] = value
        if plan.knobs:
            plan.decisions.append(Decision("knobs", "set", ", ".join(
                f"{n}={v}" for n, v in plan.knobs.items()) + f" ({mode}: {reason})"))
        self._knob_mode = mode

    def _speed(self, obs: Observation, plan: Plan, mode: str) -> dict:
        cfg, k = self.cfg, self.cfg.ksmd
        measured_pages = self._pages_per_full_scan(obs)
        pages = max(plan.scan_pages, measured_pages, 1)
        plan.scan_pages = pages
        seconds = k.fast_scan_seconds if mode == "fast" else k.slow_scan_seconds
        rate = pages / seconds
        if plan.pressure:
            rate *= cfg.pressure.speedup
        budget = k.cpu_budget_percent / 100.0
        if mode == "fast" and self.cpu_credit > 0 and k.burst_percent > k.cpu_budget_percent:
            # unspent budget: merge flat out now rather than slowly for longer. ksmd pays per
            # wake-up and per cold cache, so the same merge costs less CPU in a burst.
            plan.bursting = True
            budget = k.burst_percent / 100.0
            rate = budget / self.seconds_per_page
        ksmd_share = max(budget * KSMD_BUDGET_FLOOR, budget - self.daemon_cpu_share)
        max_rate = ksmd_share / self.seconds_per_page
        plan.budget_pages_per_second = max_rate
        if rate > max_rate:
            rate = max_rate
        plan.target_pages_per_second = rate
        sleep_ms = k.fast_sleep_millisecs if mode == "fast" else k.slow_sleep_millisecs
        if plan.bursting and budget >= 1.0:
            return {"pages_to_scan": k.max_pages_to_scan, "sleep_millisecs": 0}
        if budget < 1.0 and sleep_ms == 0:
            sleep_ms = 1  # sleep 0 runs ksmd flat out: no budget below 100% survives that
        sleep_ms = sleep_for_batch(rate, sleep_ms, self.seconds_per_page,
                                   min(k.min_batch_pages, k.max_pages_to_scan))
        return {"pages_to_scan": knobs_for_rate(rate, sleep_ms, self.seconds_per_page,
                                                k.max_pages_to_scan),
                "sleep_millisecs": sleep_ms}

    @staticmethod
    def _pending_bytes(p: _Proc) -> int:
        """Bytes a registration under way will add to ksmd's scan."""
        if p.registered_ranges is not None and p.estimate is not None:
            return p.estimate.range_bytes
        return p.info.eligible_bytes

    def _pages_per_full_scan(self, obs: Observation) -> int:
        """Pages one full scan covered, from the counters, once ksmd has completed scans."""
        prev = self._prev
        if prev is None:
            return 0
        d_scans = int(obs.counters.get("full_scans", 0)) - int(prev.counters.get("full_scans", 0))
        d_pages = int(obs.counters.get("pages_scanned", 0)) - int(prev.counters.get("pages_scanned", 0))
        if d_scans >= 2 and d_pages > 0:
            return d_pages // d_scans
        return 0

    def mappings_max_age(self, key) -> float:
        """How old this process's smaps figures may be for deciding about it (seconds). Reading
        smaps walks every page table entry, the biggest cost of a round: it is needed at once for
        a new process or a registration not seen yet, every ``daemon.interval`` for memory we
        manage (fast rounds come more often), and at re-estimate time for the rest."""
        p = self.procs.get(key)
        if p is None or p.estimate is None or (p.registered_at is not None and not p.info.registered):
            return 0.0
        if p.worthwhile or p.info.registered:
            return self.cfg.daemon.interval
        return self.cfg.estimate.reestimate_seconds

    # --- for metrics and the state file
    def view(self) -> dict:
        procs = []
        for p in self.procs.values():
            est = p.estimate
            procs.append({"pid": p.info.pid, "name": p.info.name, "anon_rss": p.info.anon_rss,
                          "registered": p.info.registered, "merge_any": p.info.merge_any,
                          "registered_bytes": p.info.registered_bytes,
                          "worthwhile": p.worthwhile,
                          "predicted_saved_bytes": est.saved_bytes if est else None,
                          "predicted_saved_percent": est.saved_percent if est else None,
                          "realized_saved_bytes": p.info.ksm_profit,
                          "decision": p.last_reason})
        return {"mode": self.mode, "mode_reason": self._mode_reason, "processes": procs,
                "yielded_knobs": dict(self.yielded), "written_knobs": dict(self.written),
                "estimated_bytes_total": self.estimated_bytes_total,
                "estimate_tokens": self.tokens, "seconds_per_page": self.seconds_per_page,
                "decisions_total": dict(self.decision_counts)}
