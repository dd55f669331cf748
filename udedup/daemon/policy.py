"""The daemon's decisions, as pure functions of what it observed: no I/O, no clock of its own.

Each round the daemon hands :meth:`Policy.decide` an :class:`Observation` (candidate processes with
their KSM state, KSM counters and knobs, ksmd and daemon CPU time, memory pressure, the time) and
gets back a :class:`Plan`: which processes to estimate now, which to register, which knobs to write,
and every decision with its reason. Estimation and registration results come back through
:meth:`Policy.record_estimate` / :meth:`Policy.record_registration`, knob writes through
:meth:`Policy.record_written`. Tests drive it with hand-made observations and a fake clock. The
data it reasons about is in :mod:`.model`, the rate arithmetic in :mod:`.rates`, which estimated
processes are worth registering in :mod:`.registration`.

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

import dataclasses

from ..ksm.knobs import pages_to_scan_ignored
from ..ksm.settle import DEFAULT_TOLERANCE, SettleTracker
from ..units import mib
from .config import Config
from .domains import resolve_audit, subtract
from .model import (PRIOR_SECONDS_PER_PAGE, Decision, EstimateResult, Observation, Plan,
                    TrackedProcess)
from .rates import ewma_weight, knobs_for_rate, pressure_state, sleep_for_batch
from .registration import classify


#: Knob writes within this relative distance of the current value are skipped (no flapping).
HYSTERESIS = 0.2
#: The settle detector's tolerance (:mod:`udedup.ksm.settle`): its default, one for every caller.
SETTLE_TOLERANCE = DEFAULT_TOLERANCE
#: ksmd keeps at least this share of the CPU budget, whatever the daemon itself used.
KSMD_BUDGET_FLOOR = 0.25
#: One joint estimate may read up to this many seconds of the estimator budget in advance (it is
#: paid back before the next one starts): joint, because KSM merges across processes.
JOINT_ESTIMATE_SECONDS = 60.0
#: Weight of the newest sample in the moving averages of per-page cost and daemon CPU (the daemon's
#: CPU: of a sample covering one daemon.interval; shorter ones weigh less, see rates.ewma_weight).
EWMA = 0.5


class Policy:
    """Keeps the memory of past rounds (estimates, scan tracking, knob ownership) and decides."""

    def __init__(self, cfg: Config, now: float = 0.0):
        self.cfg = cfg
        self.procs: dict[tuple[int, int], TrackedProcess] = {}
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
        self.mode_reason = ""
        self._mode_tag = ""
        self._prev: Observation | None = None
        self._settle: SettleTracker | None = None   # since the registered set last grew
        self._managed_keys: set = set()
        self._knob_mode = None                      # mode the current knob values were chosen for
        self._advisor_logged = False
        self._audit_done = None                     # the last audit turned into unregistrations

    # --- feedback from the daemon
    def _credit_cap(self) -> float:
        k = self.cfg.ksmd
        return k.cpu_budget_percent / 100.0 * k.cpu_budget_window

    def reconfigure(self, cfg: Config) -> None:
        """SIGHUP: new settings; estimates stay, yielded knobs are ours again to decide about."""
        old = self.cfg.security
        self.cfg = cfg
        self.cpu_credit = min(self.cpu_credit, self._credit_cap())
        self.yielded.clear()
        # estimates made for other trust domains say nothing about these: estimate again
        stale = dataclasses.astuple(old) != dataclasses.astuple(cfg.security)
        for p in self.procs.values():
            p.last_reason = None
            p.registration_failed = None
            if stale:
                p.estimate, p.estimate_failed, p.withheld, p.conflicts_of = None, None, (), None
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
        p.withheld = ()     # the newer estimate decides afresh what is registrable

    def last_estimate(self, key) -> EstimateResult | None:
        """The estimate the policy holds for ``key`` (None: none, or it is not tracked)."""
        p = self.procs.get(key)
        return p.estimate if p is not None else None

    def record_unregistration(self, key, ok: bool, ranges, detail: str) -> None:
        """Done: no longer registered; failed: the conflicts are planned again next round."""
        p = self.procs.get(key)
        if p is not None and ok and p.registered_ranges is not None:
            p.registered_ranges = subtract(p.registered_ranges, ranges)
        elif p is not None and not ok:
            p.conflicts_of = None

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
        self._resolve_audit(obs, plan)
        classify(cfg, self.procs.values(), obs.now, plan, obs.page_size)
        self._choose_mode(obs, plan, pressure_reason)
        self._prev = obs
        for d in plan.decisions:
            self.decision_counts[d.kind] = self.decision_counts.get(d.kind, 0) + 1
        return plan

    def _resolve_audit(self, obs: Observation, plan: Plan) -> None:
        if (obs.audit is None or obs.audit is self._audit_done
                or self.cfg.security.trust_domains == "none"):
            return
        self._audit_done = obs.audit  # an audit is acted on once, however often a round decides
        resolve_audit(self.cfg, self.procs.values(), obs.audit, obs.page_size, plan)

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
                self.procs[info.key] = TrackedProcess(info)
                plan.decisions.append(Decision("candidate", "track", f"{info.name}: new candidate, "
                                               f"{mib(info.anon_rss)} anonymous", info.pid))
            else:
                p.info = info
        for key in [k for k in self.procs if k not in seen]:
            gone = self.procs.pop(key)
            plan.decisions.append(Decision("candidate", "forget", f"{gone.info.name}: exited or no "
                                           "longer a candidate", gone.info.pid))

    def _measure(self, obs: Observation, plan: Plan) -> None:
        prev = self._prev
        scans = int(obs.counters.get("full_scans", 0))
        if self._settle is not None:
            if prev is not None and scans < int(prev.counters.get("full_scans", 0)):
                self._restart_settle(obs)   # run=2 unmerged everything: merging starts over
            else:
                self._settle.add(scans, _saved_pages(obs), t=obs.now)
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
        # weighted by the time the sample covers: the decides of one round are seconds apart
        weight = ewma_weight(EWMA, dt, self.cfg.daemon.interval)
        self.daemon_cpu_share = weight * (d_daemon / dt) + (1 - weight) * self.daemon_cpu_share
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
                    p.note(plan, "estimate", "wait", f"estimator budget in debt, next estimate "
                           f"in {wait:.0f} s (estimate.scan_budget {mib(e.scan_budget)}/s)")
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
        plan.decisions.append(Decision("estimate", "estimate", f"pids {names}: {mib(cost)} to read "
                                       f"({e.passes} passes)"))

    def _restart_settle(self, obs: Observation) -> None:
        self._settle = SettleTracker(None, stable_scans=1, min_scans=self.cfg.ksmd.settle_scans,
                                     tolerance=SETTLE_TOLERANCE)
        self._settle.add(int(obs.counters.get("full_scans", 0)), _saved_pages(obs), t=obs.now)

    def _settled(self, obs: Observation) -> tuple[bool, str]:
        t = self._settle
        since = t.scans_done if t is not None else 0
        if t is None or since < t.min_scans:
            return False, f"{since} full scans since the last registration"
        if not t.settled:
            if t.trend is None or not t.covered:
                return False, "no earlier full scan seen yet"
            return False, (f"saved pages still moving ({t.trend:+.0f} pages per full scan, "
                           f"steady is within ±{t.band:.0f})")
        return True, (f"saved pages steady over the last full scans ({t.trend:+.0f} pages per scan), "
                      f"{since} full scans since the last registration")

    def _choose_mode(self, obs: Observation, plan: Plan, pressure_reason: str) -> None:
        cfg, k = self.cfg, self.cfg.ksmd
        managed_by_key = {key: p for key, p in self.procs.items()
                          if p.worthwhile and (p.info.registered or p.registered_at is not None)}
        managed = list(managed_by_key.values())
        pending = [p for p in self.procs.values() if p.estimate is None and p.estimate_failed is None]
        keys = set(managed_by_key)
        if keys - self._managed_keys:
            # new memory to merge: it needs settle_scans full scans of its own before "settled"
            self._restart_settle(obs)
        self._managed_keys = keys
        # memory being registered right now counts already: the knobs are for the next minutes
        registered_pages = sum(self._pending_bytes(p) if (p.registered_at is not None
                                                          and not p.info.registered)
                               else p.info.registered_bytes
                               for p in self.procs.values()) // obs.page_size
        plan.predicted_bytes = sum(p.estimate.saved_bytes for p in managed)
        # realized is read from KSM's counters, so it is held against the part of the prediction
        # the counters will show: THP splits hand back zero subpages outside them (a THP guest
        # would otherwise look unrealized for ever and keep ksmd fast)
        plan.counted_bytes = sum(p.estimate.counted_bytes for p in managed)
        profits = sum(max(0, p.info.ksm_profit) for p in managed)
        plan.realized_bytes = max(0, min(obs.saved_bytes, profits))
        plan.unrealized_bytes = max(0, plan.counted_bytes - plan.realized_bytes)
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
            counted = plan.counted_bytes
            done_pct = 100.0 * plan.realized_bytes / counted if counted > 0 else 100.0
            settled, settle_reason = self._settled(obs)
            rest = (f" (of {mib(plan.predicted_bytes)} in all: THP splits hand back the rest, "
                    "outside the counters)" if counted != plan.predicted_bytes else "")
            gap = (f"realized {mib(plan.realized_bytes)} of predicted {mib(counted)}{rest} "
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
        if pages_to_scan_ignored(obs.knobs):
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
        self.mode, self._mode_tag, self.mode_reason = mode, tag, reason

        for name, value in desired.items():
            if name in self.yielded or name not in obs.knobs:
                continue
            current = obs.knobs[name]
            if current == value:
                # ours now as much as if we had written it: a later change by someone else is
                # theirs to keep, not ours to undo
                self.written[name] = value
                continue
            if (name in ("pages_to_scan", "sleep_millisecs") and mode == self._knob_mode
                    and current and abs(value - current) <= HYSTERESIS * current):
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
    def _pending_bytes(p: TrackedProcess) -> int:
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


def _saved_pages(obs: Observation) -> int:
    return int(obs.counters.get("pages_sharing", 0)) + int(obs.counters.get("ksm_zero_pages", 0))
