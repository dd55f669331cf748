"""What the daemon does about a plan: estimates (screen first, then the joint estimate),
registrations by injection, and knob writes through the KSM controller, and putting back what it
wrote.

Roots flow down: the estimator, the screen and injection read ``daemon.procfs``; knobs go through
the one :class:`~udedup.ksm.Ksm` (``daemon.ksm_root``), whose ``apply`` validates all, writes in
the one write order (:func:`udedup.ksm.knobs.write_order`) and rolls back on failure.

The promise about the knobs: restore only those still holding what the daemon wrote; a knob someone
else changed since is theirs (reported, not fought).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from ..errors import KsmError, KsmPermissionError, UdedupError
from ..host.fs import DEFAULT_PROCFS
from ..ksm import DEFAULT_ROOT
from ..ksm.knobs import KnobSnapshot, pages_to_scan_ignored, write_order
from .config import Config
from .fingerprint import Fingerprint
from .model import EstimateResult, Observation, Plan, ProcessInfo

log = logging.getLogger(__name__)

# --- estimation and registration ------------------------------------------------------------------
def estimate_processes(infos, cfg: Config, use_zero_pages: bool, now: float,
                       split: bool = True) -> dict:
    """One joint estimate (duplicates across processes count) -> {key: EstimateResult | str error},
    reading the processes under ``daemon.procfs``. With ``security.trust_domains`` on, the
    estimate is told each process's domain (:func:`udedup.host.domains.process_domains`) and each
    result carries its domain ranges and conflict ranges. A joint estimate that fails is made
    again one process at a time (``split``) so that one bad process does not stop the others;
    with domains the readable ones are then estimated jointly once more, since a process
    estimated alone knows nothing of the other domains' contents."""
    from ..estimate import estimate

    e, r, sec = cfg.estimate, cfg.registration, cfg.security
    pids = [i.pid for i in infos]
    results: dict = {}
    extra: dict = {}
    if sec.trust_domains != "none":
        from ..host.domains import process_domains
        extra = {"domains": process_domains(pids, sec.trust_domains, sec.cgroup_depth,
                                            cfg.daemon.procfs),
                 "zero_pages_across_domains": sec.zero_pages_across_domains}
    try:
        # threads=1: a daemon is judged by its CPU, not by how soon an estimate ends; the read-ahead
        # thread buys wall time for CPU (0.47 against 0.40 CPU-s for the benchmark's two VMs)
        est = estimate(pids, passes=e.passes, interval=e.pass_interval, all_eligible=True,
                       procfs=cfg.daemon.procfs, recheck=e.recheck, range_gap=r.range_gap,
                       max_ranges=r.max_ranges, threads=1, fingerprint_pages=e.confirm_pages,
                       **extra)
    except UdedupError as err:
        if len(infos) == 1 or not split:
            return {info.key: str(err) for info in infos}
        # one bad process must not stop the others: estimate them one by one
        for info in infos:
            results.update(estimate_processes([info], cfg, use_zero_pages, now, split=False))
        readable = [i for i in infos if isinstance(results.get(i.key), EstimateResult)]
        if extra and len(readable) > 1:
            results.update(estimate_processes(readable, cfg, use_zero_pages, now, split=False))
        return results
    if extra:
        ds = est.domains
        if ds is not None:
            log.debug("trust domains: %d domains, %d duplicate groups across them, %d foreign "
                      "pages; the domain step took %.3f s of the estimate", len(ds.per_domain),
                      ds.cross_groups, ds.foreign_pages, ds.seconds)
        per_pid = per_process_domains(est, use_zero_pages)
    else:
        per_pid = {pid: dict(zip(("saved", "scanned", "ranges", "range_bytes"), got))
                   for pid, got in per_process(est, pids, use_zero_pages,
                                               by_ranges=r.granularity == "ranges").items()}
    handback = thp_handback_bytes(est, use_zero_pages)
    samples = getattr(est, "fingerprints", None) or {}
    for info in infos:
        got = per_pid.get(info.pid)
        if got is None:
            results[info.key] = "exited during the estimate"
            continue
        saved, scanned = got.pop("saved"), got.pop("scanned")
        pct = 100.0 * saved / scanned if scanned else 0.0
        back = handback.get(info.pid, 0)
        sample = samples.get(info.pid)
        results[info.key] = EstimateResult(
            at=now, saved_bytes=int(saved), scanned_bytes=int(scanned), saved_percent=pct,
            counter_bytes=int(max(0, saved - back)) if back else None,
            fingerprint=None if sample is None else Fingerprint(
                info.pid, info.start_time, now, info.anon_rss, sample[0], sample[1]), **got)
    return results


def thp_handback_bytes(est, use_zero_pages: bool) -> dict:
    """{pid: bytes} of the zero subpages ksmd's THP splits are predicted to hand back in the
    process's in-scope mappings: saving the host gets that no KSM counter (pages_sharing,
    ksm_zero_pages, ksm_merging_pages) will ever show, so the daemon holds the counters' realized
    saving against the prediction without them."""
    k = int(bool(use_zero_pages))
    out: dict = {}
    for m in getattr(est, "mappings", ()) or ():
        back = m.thp_zero_pages.get(k, 0) if m.in_scope else 0
        if back:
            out[int(m.pid)] = out.get(int(m.pid), 0) + int(back) * est.page_size
    return out


def screen_processes(infos, cfg: Config, now: float, seed: int = 0, mappings=None) -> dict:
    """{key: EstimateResult} for the processes a sample rules out (see udedup.screen); the others
    are left for the full estimate. Nothing is ruled out when screening is off, when the threshold
    is so low that the sample would be most of the memory, or when the sample fails."""
    from ..estimate import screen as screen_mod
    from ..native import lib

    r = cfg.registration
    if not cfg.estimate.screen or r.min_saving <= 0 or not infos:
        return {}
    rate = screen_mod.rate_for(r.min_saving)
    if rate > 0.25:
        return {}
    try:
        sampled = screen_mod.screen([i.pid for i in infos], rate, seed=seed,
                                    procfs=cfg.daemon.procfs, mappings=mappings)
    except UdedupError as err:
        log.info("screen failed (%s): estimating in full", err)
        return {}
    out = {}
    for info in infos:
        got = sampled.get(info.pid)
        if not isinstance(got, screen_mod.ScreenResult) or got.sampled_pages == 0:
            continue    # errors and empty samples: the full estimate decides and reports
        ps = lib.PAGE_SIZE
        present = got.present_pages * ps
        threshold = max(r.min_saving, r.min_saving_percent / 100.0 * present)
        bound = got.bound_pages * ps
        if bound >= 0.5 * threshold:
            continue
        out[info.key] = EstimateResult(
            at=now, saved_bytes=int(bound), scanned_bytes=int(present),
            saved_percent=100.0 * bound / present if present else 0.0,
            screened=(f"screened: {got.sampled_pages} sampled pages of {got.present_pages}, "
                      f"{got.zero_pages} zero, {got.twin_pages} with a twin"))
    return out


def per_process(est, pids, use_zero_pages: bool, by_ranges: bool = False) -> dict:
    """{pid: (predicted saved bytes, scanned bytes, saving ranges, resident bytes in them)} from an
    Estimate's per-target attribution.

    The estimator splits each duplicate group's saving among the processes holding it, so the
    shares add up to the joint prediction. Each share pays 64 bytes of rmap item per page ksmd
    would scan, as general_profit does: the pages of the saving ranges when only those get
    registered (``by_ranges``), else every scanned page; zero pages merged into the shared zero
    page (use_zero_pages) give theirs back.
    """
    from ..ksm.accounting import RMAP_ITEM_BYTES

    k = int(bool(use_zero_pages))
    ps = est.page_size
    per = {}
    for t in est.targets:
        if getattr(t, "kind", "process") != "process" or t.exited:
            continue
        readable = t.scanned_pages - t.unreadable_pages
        ranges = tuple(tuple(x) for x in getattr(t, "saving_ranges", ()) or ())
        range_pages = int(getattr(t, "range_pages", 0) or 0)
        scanned_by_ksmd = range_pages if by_ranges and ranges else readable
        rmap = scanned_by_ksmd - (t.zero_pages if use_zero_pages else 0)
        saved = t.saved_pages[k] * ps - rmap * RMAP_ITEM_BYTES
        per[int(t.pid)] = (saved, readable * ps, ranges, range_pages * ps)
    return per


def per_process_domains(est, use_zero_pages: bool) -> dict:
    """{pid: EstimateResult fields} from an Estimate made with ``domains=``: what registering only
    each process's domain ranges saves (its ``domain_saved_pages``, paying an rmap item per page
    of those ranges), the ranges, and the foreign pages inside registered mappings
    (``conflict_ranges``, to unregister)."""
    from ..ksm.accounting import RMAP_ITEM_BYTES

    k = int(bool(use_zero_pages))
    ps = est.page_size
    summary = getattr(est, "domains", None)
    keys = tuple(sorted({d.key for d in getattr(summary, "per_domain", ()) or ()}))
    per = {}
    for t in est.targets:
        if getattr(t, "kind", "process") != "process" or t.exited:
            continue
        readable = t.scanned_pages - t.unreadable_pages
        range_pages = int(t.domain_range_pages or 0)
        rmap = max(0, range_pages - (t.zero_pages if use_zero_pages else 0))
        per[int(t.pid)] = {
            "saved": t.domain_saved_pages[k] * ps - rmap * RMAP_ITEM_BYTES,
            "scanned": readable * ps,
            "ranges": tuple(tuple(x) for x in t.domain_ranges or ()),
            "range_bytes": range_pages * ps, "domain": t.domain,
            "conflict_ranges": tuple(tuple(x) for x in t.conflict_ranges or ()),
            "foreign_pages": int(t.foreign_pages or 0),
            "other_domains": tuple(d for d in keys if d != t.domain)}
    return per


def register_process(info: ProcessInfo, mode: str, ranges=None, procfs: str = DEFAULT_PROCFS,
                     ksm_root: str = DEFAULT_ROOT) -> tuple[bool, str]:
    """Opt ``info`` in by injection (:func:`udedup.inject.enable`, which checks and reads the
    process under ``procfs`` and KSM under ``ksm_root``): (done, how or why not)."""
    from ..inject import enable

    try:
        result = enable(info.pid, mode=mode, ranges=list(ranges) if ranges else None,
                        procfs=procfs, ksm_root=ksm_root)
    except UdedupError as err:
        return False, str(err)
    how = str(getattr(result, "mode", mode))
    if ranges:
        how += f", {len(ranges)} range{'s' if len(ranges) != 1 else ''}"
    return True, how


def unregister_process(info: ProcessInfo, ranges, procfs: str = DEFAULT_PROCFS,
                       ksm_root: str = DEFAULT_ROOT) -> tuple[bool, str]:
    """``MADV_UNMERGEABLE`` over ``ranges`` of ``info`` by injection
    (:func:`udedup.inject.disable`, mode madvise): their merged pages get private copies again.
    (done, how or why not)."""
    from ..inject import disable

    try:
        disable(info.pid, mode="madvise", ranges=list(ranges), procfs=procfs, ksm_root=ksm_root)
    except UdedupError as err:
        return False, str(err)
    return True, f"madvise MADV_UNMERGEABLE, {len(ranges)} range{'s' if len(ranges) != 1 else ''}"


# --- knobs ----------------------------------------------------------------------------------------
def restore_knobs(ksm, original: dict, written: dict) -> tuple[dict, dict]:
    """Put back ``original`` values of the knobs in ``written`` that still hold what we wrote.

    Returns (restored {knob: value}, left {knob: current value changed by someone else}). Best
    effort through ``Ksm.restore``: every knob that can be restored is, the first error is raised.
    """
    try:
        current = ksm.knobs()
    except KsmError as err:
        log.error("cannot read the KSM knobs to restore them: %s", err)
        return {}, {}
    back, left = {}, {}
    for name in write_order(written):
        if name not in original or name not in current:
            continue
        if current[name] != written[name]:
            left[name] = current[name]
        elif name == "pages_to_scan" and pages_to_scan_ignored(current):
            left[name] = current[name]  # the advisor owns it now
        else:
            back[name] = original[name]
    if back:
        ksm.restore(KnobSnapshot(back))
    return back, left


def self_test(ksm, original: dict, cfg: Config) -> list[str]:
    """Write each knob the daemon may manage to its current value and read it back: a missing
    privilege fails now, at start, not in the middle of the night. Returns the knobs tested."""
    names = ["sleep_millisecs", "run"]
    if not pages_to_scan_ignored(original):
        names.append("pages_to_scan")
    if cfg.ksmd.use_zero_pages != "keep":
        names.append("use_zero_pages")
    tested = []
    for name in names:
        if name not in original or (name == "run" and original[name] == 2):
            continue
        try:
            # force: a no-op write is exactly what proves the permission without changing anything
            ksm.write_value(name, original[name], force=True)
        except KsmPermissionError as err:
            raise KsmPermissionError(
                f"startup self-test: {err} (under systemd the unit needs "
                f"ReadWritePaths={cfg.daemon.ksm_root}; or run with --dry-run)", knob=name) from err
        tested.append(name)
    return tested


class Actor:
    """Carries out the actions of a plan, and reports their results to the policy.

    ``estimator(infos, cfg, use_zero_pages, now)``, ``registrar(info, mode, ranges, procfs,
    ksm_root)`` and ``unregistrar(info, ranges, procfs, ksm_root)`` default to
    :func:`estimate_processes`, :func:`register_process` and :func:`unregister_process`; a caller
    without real memory to read (tests on fake trees) passes its own."""

    def __init__(self, ksm, policy, dry_run: bool = False, clock=time.monotonic,
                 estimator=estimate_processes, registrar=register_process,
                 unregistrar=unregister_process):
        self.ksm = ksm
        self.policy = policy
        self.dry_run = dry_run
        self.clock = clock
        self.estimator = estimator
        self.registrar = registrar
        self.unregistrar = unregistrar
        self.knob_writes = 0
        self.fingerprints: dict = {}        # key -> fingerprint.Fingerprint of the last full estimate
        self.confirmations = 0              # re-estimates a fingerprint made unnecessary
        self._unregister_failed: dict = {}   # pid -> the failure last logged at WARNING

    def estimate(self, cfg: Config, plan: Plan, obs: Observation, mappings: dict, seed: int) -> None:
        """Screen ``plan.estimate``, estimate the rest jointly, record every result. ``mappings``:
        {pid: mappings} already read this round."""
        use_zero = bool(obs.knobs.get("use_zero_pages", False))
        if cfg.ksmd.use_zero_pages != "keep":
            use_zero = cfg.ksmd.use_zero_pages == "on"
        t0, cpu0 = time.monotonic(), time.process_time()
        confirmed = self._confirm(cfg, plan.estimate, obs)
        todo = [i for i in plan.estimate if i.key not in confirmed]
        results = screen_processes(todo, cfg, obs.now, seed=seed, mappings=mappings)
        full = [i for i in todo if i.key not in results]
        if len(full) < len(todo):
            log.debug("screened %d processes in %.2f s (%.2f CPU-s): %d ruled out by their sample",
                     len(todo), time.monotonic() - t0, time.process_time() - cpu0,
                     len(results))
        if full:
            t1, cpu1 = time.monotonic(), time.process_time()
            estimated = self.estimator(full, cfg, use_zero, obs.now)
            results.update(estimated)
            log.debug("estimated %d processes in %.2f s (%.2f CPU-s)", len(full),
                     time.monotonic() - t1, time.process_time() - cpu1)
            self._fingerprint(cfg, [(i, estimated[i.key]) for i in full
                                    if isinstance(estimated.get(i.key), EstimateResult)])
        results.update(confirmed)
        for key, result in results.items():
            if isinstance(result, EstimateResult):
                self.policy.record_estimate(key, result, now=obs.now)
            else:
                # the policy reports it as a skip with this reason (registration.classify)
                log.debug("pid %d: estimate failed: %s", key[0], result)
                self.policy.record_estimate(key, None, error=result, now=obs.now)

    def _confirm(self, cfg: Config, infos, obs: Observation) -> dict:
        """{key: the last estimate, dated now} for the due processes whose fingerprint says their
        memory is what that estimate read; {} when any of them changed (the estimate is joint:
        duplicates across processes count, so they are estimated together again)."""
        from . import fingerprint

        e = cfg.estimate
        if e.confirm_pages <= 0:
            return {}
        ready = []
        for info in infos:
            fp = self.fingerprints.get(info.key)
            last = self.policy.last_estimate(info.key)
            if (fp is None or last is None or last.screened
                    or obs.now - fp.taken_at >= e.confirm_max_seconds):
                continue
            ready.append((info, fp, last))
        if not ready:
            return {}
        t0, cpu0 = time.monotonic(), time.process_time()
        for info, fp, _last in ready:
            why = fingerprint.changed(fp, info, cfg.daemon.procfs)
            if why is not None:
                log.debug("pid %d: estimating again: %s since its last full estimate", info.pid, why)
                return {}
        pages = sum(fp.pages for _i, fp, _l in ready)
        log.debug("re-estimate of %d processes skipped: %d sampled pages read back unchanged "
                  "(crc32c), in %.3f s (%.3f CPU-s)", len(ready), pages, time.monotonic() - t0,
                  time.process_time() - cpu0)
        self.confirmations += len(ready)
        return {info.key: dataclasses.replace(last, at=obs.now) for info, _fp, last in ready}

    def _fingerprint(self, cfg: Config, done) -> None:
        """Keep the fingerprints the estimator gave with the processes just estimated in full
        (``done``: (info, EstimateResult) pairs; see :mod:`.fingerprint`)."""
        if cfg.estimate.confirm_pages <= 0:
            return
        live = {key for key in self.fingerprints if self.policy.last_estimate(key) is not None}
        self.fingerprints = {k: v for k, v in self.fingerprints.items() if k in live}
        for info, result in done:
            if result.fingerprint is None:
                self.fingerprints.pop(info.key, None)
            else:
                self.fingerprints[info.key] = result.fingerprint

    def register(self, cfg: Config, plan: Plan) -> None:
        for info, mode, ranges in plan.register:
            if self.dry_run:
                log.info("dry run: would opt pid %d (%s) in by injection, mode %s%s", info.pid,
                         info.name, mode, f", {len(ranges)} ranges" if ranges else "")
                continue
            ok, detail = self.registrar(info, mode, ranges, procfs=cfg.daemon.procfs,
                                        ksm_root=cfg.daemon.ksm_root)
            if ok:
                log.info("pid %d (%s): registered by injection (%s)", info.pid, info.name, detail)
            else:
                log.warning("pid %d (%s): injection failed: %s", info.pid, info.name, detail)
            self.policy.record_registration(info.key, ok, detail, self.clock())

    def unregister(self, cfg: Config, plan: Plan) -> None:
        """Carry out ``plan.unregister`` (trust domains: pages that must not merge here)."""
        page = os.sysconf("SC_PAGE_SIZE")
        for info, ranges, _reason in plan.unregister:
            n = sum(e - s for s, e in ranges) // page
            if self.dry_run:
                log.info("dry run: would unregister %d pages of pid %d (%s) by injection (madvise)",
                         n, info.pid, info.name)
                continue
            ok, detail = self.unregistrar(info, ranges, procfs=cfg.daemon.procfs,
                                          ksm_root=cfg.daemon.ksm_root)
            if ok:
                self._unregister_failed.pop(info.pid, None)
                log.info("pid %d (%s): unregistered %d pages by injection (%s)", info.pid,
                         info.name, n, detail)
            elif self._unregister_failed.get(info.pid) != detail:
                self._unregister_failed[info.pid] = detail   # retried every round: said once
                log.warning("pid %d (%s): unregistering %d pages that must not merge across trust "
                            "domains failed: %s (retried each round)", info.pid, info.name, n,
                            detail)
            else:
                log.debug("pid %d (%s): unregistering failed again: %s", info.pid, info.name,
                          detail)
            self.policy.record_unregistration(info.key, ok, ranges, detail)

    def apply(self, plan: Plan) -> None:
        """Write ``plan.knobs`` (all or none: Ksm.apply rolls back a failure and raises)."""
        if not plan.knobs or self.dry_run:
            return
        self.ksm.apply(plan.knobs)
        self.policy.record_written(dict(plan.knobs))
        self.knob_writes += len(plan.knobs)
