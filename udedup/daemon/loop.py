"""``udedup daemon``: the loop, and the daemon's life around it.

Each round observes (:mod:`.observe`), decides (:mod:`.policy`), acts (:mod:`.act`) and
publishes one :class:`~.snapshot.RoundSnapshot`, from which the state file (:mod:`.state`), the
metrics (:mod:`.metrics`) and systemd's STATUS come. Around the rounds:

- signals only set flags (:mod:`.wakeup`: a wakeup fd interrupts the wait), the loop is
  ``while not signals.wait(timeout)``; SIGHUP reloads the configuration, SIGTERM/SIGINT end the loop;
- every knob the daemon wrote is put back on exit (``daemon.on_exit = "restore"``), unless someone
  else changed it meanwhile: their value wins, and is reported;
- the original values sit in the state file before the first write, so the next start after a crash
  or SIGKILL restores them;
- a startup self-test writes every knob it will manage to its current value and reads it back, so
  a missing privilege fails at start, not in the middle of the night;
- systemd ``Type=notify`` (:mod:`.systemd`): READY, STATUS with the savings, WATCHDOG, RELOADING,
  STOPPING.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from ..errors import KsmError, ProcessError, UdedupError
from .act import (Actor, estimate_processes, register_process, restore_knobs, self_test,
                  unregister_process)
from .config import Config
from .decisionlog import DecisionLog
from .domains import span_warning
from .idlewatch import IdleWatch, counter_values, counters_moved
from .observe import Observer, process_start_time
from .policy import Policy
from .snapshot import DaemonIdentity, RoundSnapshot, build_snapshot, round_figures
from .state import StateFile, format_knobs
from .systemd import SdNotify
from .wakeup import Signals


log = logging.getLogger(__name__)

#: How often the counters are checked while ksmd bursts (see :func:`burst_due`).
BURST_WATCH_SECONDS = 0.1
#: Rounds in a row with nothing moved (idlewatch.WATCHED_COUNTERS beyond their slack, the
#: candidates, no action) after which a fast-mode daemon rounds every daemon.interval instead of
#: daemon.fast_interval, and a slow or stopped one every daemon.idle_interval, with the idle watch
#: (:mod:`.idlewatch`) in between.
QUIET_ROUNDS = 3
#: The modes in which a quiet host is idle (see QUIET_ROUNDS).
IDLE_MODES = ("slow", "stopped")


@dataclass
class Options:
    dry_run: bool = False
    once: bool = False


def burst_due(ksm, full_scans: int, predicted_bytes: int, realized_percent: float) -> bool:
    """While ksmd bursts flat out, every second of it past the realized saving is wasted CPU: a
    round is due as soon as the counters say the saving is realized or a full scan ended since
    the last round (``full_scans`` then; the policy decides about settling). Counters only."""
    try:
        stats = ksm.stats()
    except KsmError:
        return True
    if stats.full_scans != full_scans:
        return True
    return stats.saved_bytes >= realized_percent / 100.0 * predicted_bytes


class Daemon:
    """``ksm``: the controller to use (default: one over ``daemon.ksm_root`` and
    ``daemon.procfs``, opened by :meth:`run`); ``estimator``/``registrar``/``unregistrar``: see
    :class:`~.act.Actor`; ``auditor``: see :class:`~.observe.Observer`."""

    def __init__(self, cfg: Config, loader=None, options: Options | None = None, env=None,
                 clock=time.monotonic, ksm=None, estimator=estimate_processes,
                 registrar=register_process, unregistrar=unregister_process, auditor=None):
        self.cfg = cfg
        self.loader = loader                # () -> Config, for SIGHUP
        self.opts = options or Options()
        self.clock = clock
        self.notify = SdNotify(env)
        self.signals = Signals()
        self.policy = Policy(cfg, now=clock())
        self.state = StateFile(cfg.daemon.state_file, cfg.daemon.procfs)
        self.identity = DaemonIdentity(
            pid=os.getpid(), pid_start_time=process_start_time(os.getpid(), cfg.daemon.procfs),
            started_at=time.time(), ksm_root=cfg.daemon.ksm_root, dry_run=self.opts.dry_run,
            config_file=cfg.sources.get("_file"))
        self.original: dict = {}
        self.metrics = None
        self.metrics_url = None
        self.rounds = 0
        self._quiet_rounds, self._quiet_key = 0, None   # see _note_quiet
        self.latest: RoundSnapshot | None = None   # the last completed round: what metrics read
        self._estimator, self._registrar = estimator, registrar
        self._unregistrar, self._auditor = unregistrar, auditor
        self._span_checked = False  # the trust-domain warning: checked until said, per start/reload
        self._dry_logged: dict = {}
        self.decisions = DecisionLog(log, clock=clock)     # INFO, at most once a minute per subject
        self.ksm = None
        if ksm is not None:
            self.attach(ksm)

    def attach(self, ksm) -> None:
        """Use ``ksm`` for observing and acting."""
        self.ksm = ksm
        self.observer = Observer(self.cfg.daemon.procfs, ksm, clock=self.clock,
                                 auditor=self._auditor)
        self.actor = Actor(ksm, self.policy, dry_run=self.opts.dry_run, clock=self.clock,
                           estimator=self._estimator, registrar=self._registrar,
                           unregistrar=self._unregistrar)
        self.idle_watch = IdleWatch(self.cfg.daemon.procfs, ksm, self.cfg.candidates.min_anon_rss)

    # --- lifecycle
    def run(self) -> int:
        from ..ksm import Ksm

        self.signals.install()
        try:
            if self.ksm is None:
                self.attach(Ksm(self.cfg.daemon.ksm_root, procfs=self.cfg.daemon.procfs))
            if not self.opts.dry_run:
                self.state.take_over(self.ksm, self.cfg.daemon.ksm_root)
            self.original = self.ksm.knobs()
            if not self.opts.dry_run:
                self.state.write(self.snapshot(None), required=True)
                tested = self_test(self.ksm, self.original, self.cfg)
                log.debug("self-test: wrote %s to their current values and read them back",
                          ", ".join(tested))
            else:
                log.info("dry run: deciding and logging only, no knob, registration or state file "
                         "is written")
            self._start_metrics()
            if self.policy.cfg.registration.allow_injection:
                log.info("registration.allow_injection is on: worthwhile running processes will be "
                         "opted in through ptrace (needs CAP_SYS_PTRACE)")
            self.run_round()
            self.notify.send("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")
            log.info("udedup daemon ready (pid %d, interval %gs%s)", os.getpid(),
                     self.cfg.daemon.interval, ", dry run" if self.opts.dry_run else "")
            if not self.opts.once:
                self._loop()
        finally:
            self._shutdown()
        return 0

    def next_interval(self) -> float:
        """Seconds to the next round: shorter while ksmd scans fast, so that it slows down soon
        after the saving is realized (a fast scan costs CPU for every second it runs on); but
        daemon.interval once KSM's counters and the candidates stayed the same over
        QUIET_ROUNDS rounds (a quiet host in fast mode), fast again when one moves."""
        d = self.cfg.daemon
        if self.policy.mode == "fast" and self._quiet_rounds < QUIET_ROUNDS:
            return min(d.interval, d.fast_interval)
        if self.idle():
            return max(d.interval, d.idle_interval)
        return d.interval

    def idle(self) -> bool:
        """Slow or stopped, nothing moved for QUIET_ROUNDS rounds, and idle rounds asked for: the
        rounds are spaced by daemon.idle_interval and the idle watch runs between them."""
        return (self.policy.mode in IDLE_MODES and self._quiet_rounds >= QUIET_ROUNDS
                and self.cfg.daemon.idle_interval > self.cfg.daemon.interval)

    def _note_quiet(self, obs, acted: bool) -> None:
        """Count the rounds in a row in which nothing moved: KSM's counters of merging and
        scanning, the candidate set and their KSM flags, and no action of ours."""
        counters = counter_values(obs.counters)
        procs = tuple(sorted((p.key, p.merge_any, p.mergeable) for p in obs.processes))
        prev = self._quiet_key
        same = (not acted and prev is not None and procs == prev[1]
                and not counters_moved(prev[0], counters))
        self._quiet_key = (counters, procs)
        self._quiet_rounds = self._quiet_rounds + 1 if same else 0

    def _loop(self) -> None:
        next_round = self.clock() + self.next_interval()
        next_watch = float("inf")
        wd = self.notify.watchdog_seconds
        next_ping = self.clock() + wd / 2 if wd else float("inf")
        while not self.signals.wait(max(0.0, min(next_round, next_ping, next_watch) - self.clock())):
            if self.signals.take_reload():
                self._reload()
            now = self.clock()
            if now >= next_ping:
                self.notify.send("WATCHDOG=1")
                next_ping = now + wd / 2
            last = self.latest.last if self.latest is not None else None
            if now >= next_watch and last is not None and self._watch_due(last):
                next_round = now
            if now >= next_round:
                self.run_round()
                # skip missed rounds rather than running them back to back
                next_round = max(next_round + self.next_interval(), self.clock() + 0.05)
            last = self.latest.last if self.latest is not None else None
            if last is not None and last.bursting:
                next_watch = self.clock() + BURST_WATCH_SECONDS
            elif self.idle():
                if next_watch == float("inf") or now >= next_watch:
                    next_watch = self.clock() + self.cfg.daemon.interval
            else:
                next_watch = float("inf")
        log.info("received %s: stopping", self.signals.signame or "stop")

    def _watch_due(self, last) -> bool:
        """Between rounds: the burst watch while ksmd bursts, the idle watch while idle."""
        if last.bursting:
            return burst_due(
                self.ksm, int(last.counters.get("full_scans", 0)),
                last.predicted_bytes if last.counted_bytes is None else last.counted_bytes,
                self.cfg.ksmd.realized_percent)
        reason = self.idle_watch.moved()
        if reason is not None:
            log.debug("idle watch: %s: a round now", reason)
        return reason is not None

    def _shutdown(self) -> None:
        self.notify.send("STOPPING=1", "STATUS=stopping: restoring KSM knobs")
        try:
            if self.ksm is not None and not self.opts.dry_run:
                self._restore_on_exit()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.signals.uninstall()
            self.notify.close()

    def _restore_on_exit(self) -> None:
        written = dict(self.policy.written)
        keep_state = False
        try:
            if self.opts.once:
                if written:
                    log.info("--once: leaving the knobs as decided: %s", format_knobs(written))
            elif self.cfg.daemon.on_exit == "leave":
                log.info("daemon.on_exit = leave: leaving %s", format_knobs(written) or "the knobs as they are")
            elif written:
                try:
                    restored, left = restore_knobs(self.ksm, self.original, written)
                except KsmError as err:
                    keep_state = True  # the next start tries again
                    log.error("restoring the KSM knobs failed: %s; the state file %s keeps the "
                              "originals for the next start", err, self.state.path)
                else:
                    if restored:
                        log.info("restored %s", format_knobs(restored))
                    for name, value in left.items():
                        log.warning("left %s=%r: changed by someone else after udedup set it", name, value)
        finally:
            if not keep_state:
                self.state.remove()

    # --- metrics
    def _start_metrics(self) -> None:
        address = self.cfg.metrics.address
        if not address:
            return
        from .metrics import DaemonCollector, MetricsServer

        # the collector reads self.latest at scrape time: one reference, replaced whole per round
        self.metrics = MetricsServer(address, DaemonCollector(
            lambda: self.latest, lambda: self.cfg.metrics.max_process_series))
        self.metrics_url = self.metrics.url
        log.info("metrics on %s", self.metrics_url)

    # --- reload
    def _reload(self) -> None:
        self.notify.send("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        try:
            if self.loader is None:
                log.warning("SIGHUP: no configuration source to reload from")
                return
            try:
                new = self.loader()
            except UdedupError as err:
                log.error("SIGHUP: configuration not reloaded, keeping the current one: %s", err)
                return
            old = self.cfg
            for key in ("state_file", "ksm_root", "procfs"):
                if getattr(new.daemon, key) != getattr(old.daemon, key):
                    log.warning("SIGHUP: daemon.%s changes only at restart; keeping %r", key,
                                getattr(old.daemon, key))
                    setattr(new.daemon, key, getattr(old.daemon, key))
            self.cfg = new
            self.policy.reconfigure(new)
            self._span_checked = False
            if new.metrics.address != old.metrics.address:
                if self.metrics is not None:
                    self.metrics.close()
                    self.metrics, self.metrics_url = None, None
                try:
                    self._start_metrics()
                except UdedupError as err:
                    log.error("SIGHUP: metrics not restarted: %s", err)
            log.info("SIGHUP: configuration reloaded from %s", new.sources.get("_file") or "defaults")
            self.run_round()
        finally:
            self.notify.send("READY=1", f"STATUS={self.status_line()}")

    # --- one round
    def run_round(self) -> None:
        """Observe, decide, act; up to three decisions when estimates or registrations come
        back within the round; then publish the round's snapshot."""
        self.rounds += 1
        cfg = self.cfg
        acted = False
        try:
            for attempt in range(3):
                obs = self.observer.observe(cfg, self.policy.mappings_max_age, self.rounds)
                if attempt == 0:
                    self._warn_span(obs)
                plan = self.policy.decide(obs)
                final = attempt == 2 or not (plan.estimate or plan.register)
                # only the last plan of the round has its knobs applied: only it reports them
                self._log(plan, knobs=final)
                # the policy counts planned actions as done: they must run, final plan or not;
                # pages that must not merge here are unregistered first
                acted = acted or bool(plan.unregister or plan.register or plan.estimate)
                if plan.unregister or plan.register:
                    self.observer.note_change()
                if plan.unregister:
                    self.actor.unregister(cfg, plan)
                if plan.estimate:
                    self.actor.estimate(cfg, plan, obs, self.observer.mappings_by_pid(), self.rounds)
                if plan.register:
                    self.actor.register(cfg, plan)
                if final:
                    break
            self.actor.apply(plan)
            self._note_quiet(obs, acted)
            self.idle_watch.arm(obs.processes, cfg.candidates.min_anon_rss)
        except (KsmError, ProcessError) as err:
            # sysfs or /proc hiccups are reported and retried next round; the loop goes on
            log.error("round %d: %s", self.rounds, err)
            return
        self.latest = self.snapshot(round_figures(plan, obs, self.opts.dry_run))
        if not self.opts.dry_run:
            self.state.write(self.latest, required=False)
        if self.rounds > 1:
            self.notify.send(f"STATUS={self.status_line()}")

    def _warn_span(self, obs) -> None:
        """Trust domains off, candidates in two or more cgroups or uids: say so once (per start
        or reload), as soon as it is so."""
        if self._span_checked or self.cfg.security.trust_domains != "none":
            return
        text = span_warning(obs.processes)
        if text is not None:
            self._span_checked = True
            log.warning("%s", text)

    def snapshot(self, last) -> RoundSnapshot:
        """The daemon now, with ``last`` the figures of the round just done (None: none yet)."""
        return build_snapshot(self.identity, self.cfg, self.policy, now_wall=time.time(),
                              rounds=self.rounds, original=self.original,
                              metrics_url=self.metrics_url,
                              knob_writes=self.actor.knob_writes if self.ksm is not None else 0,
                              last=last)

    def status_line(self) -> str:
        return self.latest.status_line() if self.latest is not None else "starting"

    def _log(self, plan, knobs: bool = True) -> None:
        self.decisions.flush()
        for d in plan.decisions:
            if d.kind == "knobs" and not knobs:
                continue
            if d.kind == "knobs" and self.opts.dry_run:
                if self._dry_logged.get("knobs") == plan.knobs:
                    continue
                self._dry_logged["knobs"] = dict(plan.knobs)
                self.decisions.emit(d, "dry run: would ")
                continue
            self.decisions.emit(d)
