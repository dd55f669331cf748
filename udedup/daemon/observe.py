"""What the daemon sees each round: candidate processes (/proc), their smaps figures, KSM's
counters and knobs, the true saving (:mod:`udedup.ksm.truth`, read once per round), ksmd's and its
own CPU time, memory pressure; with ``metrics.per_cgroup`` the saving per process
(:mod:`udedup.ksm.attribution`, whose walk then gives the true saving too), and with
``security.trust_domains`` the page-by-page audit of the candidates (:mod:`udedup.ksm.audit`).

Every /proc read goes through :class:`~udedup.host.fs.ProcFs` and the parsers of
:mod:`udedup.host.parse`; the root is ``daemon.procfs``. A walk of /proc skips processes that
exit or hide their files while it runs (the ``maybe_*`` reads); a /proc that cannot be listed at
all, or a candidate we may not read, is reported.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from ..errors import (KernelThreadError, KsmError, ProcessAccessError, ProcessNotFoundError,
                      UdedupError)
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..host.maps import read_mappings
from ..host.parse import status_ids, status_kib
from ..ksm.attribution import AttributionReader
from ..ksm.truth import TrueSavings, TrueSavingsReader
from .candidates import match_process
from .config import Config
from .idlewatch import counter_values, counters_moved
from .model import Memory, Observation, ProcessInfo

log = logging.getLogger(__name__)

#: Longest reuse of a true-saving walk while nothing it depends on moves (KSM's saving counters
#: beyond the idle slack, the candidates and their KSM flags, no registration): pages a program reads
#: without writing can still land on the zero page unseen, so the walk is redone this often.
TRUTH_REUSE_SECONDS = 300.0


def process_start_time(pid: int, procfs: ProcFs | str = DEFAULT_PROCFS) -> int | None:
    """starttime (stat field 22, clock ticks since boot): a pid plus this names one process."""
    st = as_procfs(procfs).maybe_stat(pid)
    return st.start_time if st is not None else None


def discover_processes(procfs: ProcFs | str = DEFAULT_PROCFS, exclude_pid: int | None = None,
                       min_anon_rss: int = 0) -> list[ProcessInfo]:
    """Every user process with what candidate matching needs (no smaps: that is per candidate).

    Processes with less than ``min_anon_rss`` anonymous resident bytes, never candidates, are
    left out before their cmdline, exe, cgroup and ksm_stat are read: on most hosts that is most
    processes, and this walk runs every round. ProcessAccessError if /proc cannot be listed."""
    fs = as_procfs(procfs)
    out = []
    for pid in fs.pids():
        if pid == exclude_pid:
            continue
        st = fs.maybe_stat(pid)
        if st is None or st.kernel_thread or st.exited:
            continue
        status = fs.maybe_status(pid)
        if status is None:
            continue        # exited since its stat was read
        anon = status_kib(status, "RssAnon")
        if anon < min_anon_rss:
            continue
        uids = status_ids(status, "Uid")
        ksm = fs.maybe_ksm_stat(pid)
        out.append(ProcessInfo(
            pid=pid, start_time=st.start_time, name=st.comm, cmdline=fs.cmdline(pid),
            exe=fs.readlink(pid, "exe") or "", uid=uids[0] if uids else 0, cgroup=fs.cgroup(pid),
            anon_rss=anon, merge_any=ksm.get("ksm_merge_any") is True,
            mergeable=ksm.get("ksm_mergeable") is True,
            ksm_merging_pages=int(ksm.get("ksm_merging_pages", 0) or 0),
            ksm_profit=int(ksm.get("ksm_process_profit", 0) or 0)))
    return out


def with_mappings(info: ProcessInfo,
                  procfs: ProcFs | str = DEFAULT_PROCFS) -> tuple[ProcessInfo | None, list]:
    """(``info`` plus registered and eligible resident bytes from smaps, the mappings); (None, [])
    if it exited; ProcessAccessError if we may not read it."""
    try:
        maps = read_mappings(info.pid, procfs)
    except (ProcessNotFoundError, KernelThreadError):
        return None, []
    registered = sum(m.anonymous for m in maps if m.registered)
    eligible = sum(m.anonymous for m in maps if m.eligible)
    return replace(info, registered_bytes=registered, eligible_bytes=eligible), maps


def read_memory(procfs: ProcFs | str = DEFAULT_PROCFS) -> Memory | None:
    """MemTotal, MemAvailable and memory PSI ``some avg10``; None without a readable meminfo."""
    fs = as_procfs(procfs)
    info = fs.meminfo()
    if "MemTotal" not in info:
        return None
    psi = (fs.pressure("memory") or {}).get("some", {}).get("avg10")
    return Memory(total=info["MemTotal"], available=info.get("MemAvailable", info.get("MemFree", 0)),
                  psi_some_avg10=psi)


#: How long a process's smaps figures are kept past the policy's max age while its RssAnon and
#: KSM merging pages stay exactly the same (a quiet process: its smaps would say the same).
STEADY_MAPPINGS_SECONDS = 300.0


def _young(cached, info: ProcessInfo, now: float, max_age: float, procfs: ProcFs) -> bool:
    """The cached smaps figures still stand: younger than ``max_age``, or (a quiet process) up to
    STEADY_MAPPINGS_SECONDS old with the same RssAnon, KSM merging pages and maps text."""
    age = now - cached[1]
    if age < max_age:
        return True
    old = cached[0]
    if not (max_age > 0 and age < STEADY_MAPPINGS_SECONDS and cached[4] is not None
            and old.anon_rss == info.anon_rss and old.ksm_merging_pages == info.ksm_merging_pages):
        return False
    return _maybe_maps(procfs, info.pid) == cached[4]


def _maybe_maps(procfs: ProcFs, pid: int) -> bytes | None:
    try:
        return procfs.read_bytes(pid, "maps")
    except (UdedupError, OSError):
        return None


class Observer:
    """Builds each round's :class:`Observation`, keeping smaps figures between rounds: reading
    smaps walks every page table entry, the biggest cost of a round, so a process's figures are
    re-read only once the policy's ``mappings_max_age`` says they are too old."""

    def __init__(self, procfs: ProcFs | str, ksm, clock=time.monotonic, auditor=None):
        self.procfs = as_procfs(procfs)
        self.ksm = ksm
        self.clock = clock
        self._mappings: dict = {}       # key -> (ProcessInfo with smaps figures, when, mappings,
                                        # round, maps text read before them or None)
        self._unreadable: set = set()   # candidates we were refused: reported once
        self._memory_missing_said = False
        # one read per round; it keeps each process's mg ranges between rounds (smaps again only
        # when a process's maps or KSM flags change)
        self.truth = TrueSavingsReader(ksm, self.procfs, clock=clock)
        self._truth_failed_said = False
        self._truth: TrueSavings | None = None
        self._truth_round: int | None = None
        self._truth_key = None          # what the last walk depended on (see _truth_depends)
        self._truth_walked = 0.0        # when it ran (clock)
        self._changes = 0               # registrations and unregistrations seen (note_change)
        # metrics.per_cgroup: one attribution reader kept across rounds (every process, the
        # scope of the true saving: its truth is the round's)
        self.attribution: AttributionReader | None = None
        self._attribution = None
        self._attribution_failed_said = False
        # security.trust_domains: ``auditor(cfg, pids)`` -> AuditReport, once per round
        self.auditor = auditor or self._audit_candidates
        self._audit = None
        self._audit_round: int | None = None
        self._audit_failed_said = False
        self._audit_reader = None       # (the [security] keys it was made for, AuditReader)
        self._audit_pids: tuple = ()

    def note_change(self) -> None:
        """A registration or unregistration ran: the next true saving is walked again."""
        self._changes += 1

    def mappings_by_pid(self) -> dict:
        """{pid: mappings} read this round or recently (the screen does not read them again)."""
        return {key[0]: cached[2] for key, cached in self._mappings.items()}

    def observe(self, cfg: Config, max_age, round_number: int) -> Observation:
        """``max_age(key)``: how old (seconds) a process's smaps figures may be."""
        procs = []
        now = self.clock()
        # the truth walk's mg ranges are as old as the candidates' smaps figures may be
        ranges_cache = getattr(self.truth, "ranges_cache", None)
        if ranges_cache is not None:
            ranges_cache.refresh_seconds = max(5.0, cfg.daemon.interval, cfg.daemon.idle_interval)
        seen: dict = {}
        for info in discover_processes(self.procfs, exclude_pid=os.getpid(),
                                       min_anon_rss=cfg.candidates.min_anon_rss):
            if not match_process(cfg, info)[0]:
                continue
            cached = self._mappings.get(info.key)
            if (cached is not None
                    and (cached[0].merge_any, cached[0].mergeable) == (info.merge_any, info.mergeable)
                    and (cached[3] == round_number     # read earlier in this round: still current
                         or _young(cached, info, now, max_age(info.key), self.procfs))):
                seen[info.key] = cached
                procs.append(replace(info, registered_bytes=cached[0].registered_bytes,
                                     eligible_bytes=cached[0].eligible_bytes))
                continue
            # maps before smaps: a change in between shows to the truth walk as a new maps text
            maps_text = _maybe_maps(self.procfs, info.pid)
            try:
                detailed, maps = with_mappings(info, self.procfs)
            except ProcessAccessError as err:
                if info.key not in self._unreadable:
                    self._unreadable.add(info.key)
                    log.warning("pid %d (%s): matches the candidates but %s (reading another user's "
                                "process needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)", info.pid,
                                info.name, err)
                continue
            if detailed is not None:
                seen[info.key] = (detailed, now, maps, round_number, maps_text)
                if maps_text is not None and ranges_cache is not None:
                    # one smaps read per process per round: the truth walk takes these mg ranges
                    ranges_cache.put(info.pid, maps_text, {
                        "ksm_mergeable": info.mergeable, "ksm_merge_any": info.merge_any}, maps)
                if match_process(cfg, detailed)[0]:
                    procs.append(detailed)
        self._mappings = seen
        stats = self.ksm.stats()
        truth, attribution = self._true_savings(cfg, stats, round_number, procs)
        audit = self._round_audit(cfg, procs, round_number)
        try:
            ksmd_cpu = self.ksm.ksmd_cpu_seconds()
        except KsmError as err:
            # no ksmd thread to be seen (a container's /proc): its CPU counts as zero
            log.debug("ksmd CPU time unknown: %s", err)
            ksmd_cpu = 0.0
        memory = read_memory(self.procfs)
        if memory is None and not self._memory_missing_said:
            self._memory_missing_said = True
            log.warning("no MemTotal in %s: memory pressure is not detected",
                        self.procfs.path(None, "meminfo"))
        return Observation(now=now, processes=tuple(procs), counters=dict(stats.counters),
                           knobs=self.ksm.knobs(), saved_bytes=stats.saved_bytes,
                           page_size=stats.page_size, ksmd_cpu_seconds=ksmd_cpu,
                           daemon_cpu_seconds=time.process_time(), memory=memory,
                           true_savings=truth, attribution=attribution, audit=audit)

    def _truth_depends(self, stats, procs) -> tuple:
        """(the merge counters, the rest): the counters may drift within the idle watch's slack
        (a guest's kernel moves a few merged pages all the time), the rest must stay the same."""
        return (counter_values(stats.counters),
                (self._changes, tuple(sorted((p.key, p.merge_any, p.mergeable) for p in procs))))

    def _truth_stands(self, depends) -> bool:
        last = self._truth_key
        return (last is not None and depends[1] == last[1]
                and not counters_moved(last[0], depends[0]))

    def _true_savings(self, cfg: Config, stats, round_number: int, procs=()) -> tuple:
        """(TrueSavings | None, Attribution | None). A round may observe up to three times
        (estimates or registrations coming back): the pagemap walk is paid once per round, later
        observations take its zero-page part with their fresh counters. A round in which nothing
        the walk depends on moved (KSM's saving counters, the candidates, no registration) reuses
        the last walk, for up to TRUTH_REUSE_SECONDS: its ``age_seconds`` says how old it is."""
        if self._truth_round == round_number:
            last, attr = self._truth, self._attribution
            if attr is not None:
                attr = replace(attr, truth=replace(attr.truth, stats=stats))
            return (replace(last, stats=stats) if last is not None else None), attr
        self._truth_round = round_number
        depends, now = self._truth_depends(stats, procs), self.clock()
        if (not cfg.metrics.per_cgroup and self._truth is not None and self._truth_stands(depends)
                and now - self._truth_walked < TRUTH_REUSE_SECONDS):
            self._truth = replace(self._truth, stats=stats, age_seconds=now - self._truth_walked)
            return self._truth, None
        self._truth_key, self._truth_walked = depends, now
        self._attribution = self._read_attribution(stats) if cfg.metrics.per_cgroup else None
        if self._attribution is not None:
            self._truth = self._attribution.truth     # the same walk: no second one
            return self._truth, self._attribution
        try:
            self._truth = self.truth.read(stats)
        except (UdedupError, OSError) as err:
            self._truth = None
            if not self._truth_failed_said:
                self._truth_failed_said = True
                log.warning("the true saving cannot be read (%s): only KSM's counters are reported",
                            err)
        return self._truth, None

    def _read_attribution(self, stats):
        if self.attribution is None:
            self.attribution = AttributionReader(self.ksm, self.procfs)
        try:
            return self.attribution.read(stats)
        except (UdedupError, OSError) as err:
            if not self._attribution_failed_said:
                self._attribution_failed_said = True
                log.warning("metrics.per_cgroup: the saving per cgroup cannot be read (%s): no "
                            "per-cgroup figures", err)
            return None

    def _round_audit(self, cfg: Config, procs, round_number: int):
        """The candidates' audit (AuditReport), read once per round; None with domains off or
        when it fails (said once)."""
        if cfg.security.trust_domains == "none":
            self._audit, self._audit_round = None, None
            return None
        if self._audit_round == round_number:
            return self._audit
        self._audit_round = round_number
        if not procs:
            self._audit = None      # no candidate: nothing of ours to check
            return None
        try:
            self._audit = self.auditor(cfg, [p.pid for p in procs])
        except (UdedupError, OSError) as err:
            self._audit = None
            if not self._audit_failed_said:
                self._audit_failed_said = True
                log.warning("security.trust_domains: the audit of the candidates' KSM frames "
                            "cannot be read (%s): frames merged across domains are not found",
                            err)
            return None
        self._audit_failed_said = False
        log.debug("audit of %d candidates: %d KSM frames, %d mapped from two domains, %.3f s",
                  len(procs), self._audit.ksm_frames, len(self._audit.offenders),
                  self._audit.read_seconds)
        return self._audit

    def _audit_candidates(self, cfg: Config, pids):
        """The default auditor: one :class:`~udedup.ksm.audit.AuditReader` kept across rounds
        (it keeps each process's mg ranges), made again when the [security] keys change."""
        from ..ksm.audit import AuditReader

        sec = cfg.security
        key = (sec.trust_domains, sec.cgroup_depth, sec.zero_pages_across_domains)
        if self._audit_reader is None or self._audit_reader[0] != key:
            self._audit_reader = (key, AuditReader(
                sec.trust_domains, sec.cgroup_depth, ksm=self.ksm, procfs=self.procfs,
                pids=lambda: self._audit_pids, zero_pages_across_domains=sec.zero_pages_across_domains))
        self._audit_pids = tuple(pids)
        return self._audit_reader[1].read()
