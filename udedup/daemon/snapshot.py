"""One typed snapshot of a round: the single source of the state file, the metrics and
``udedup status``.

The daemon builds a :class:`RoundSnapshot` once per round from the policy, the round's plan and
observation; the state file is :meth:`RoundSnapshot.state` as JSON (``udedup status`` reads that),
and the metrics collector reads the latest snapshot at scrape time. Frozen: the HTTP thread can
hold one while the loop builds the next.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .model import Observation, Plan

STATE_VERSION = 1


@dataclass(frozen=True)
class ProcessEntry:
    """One candidate as the policy last saw it (a line of ``udedup status``, a metric label set)."""

    pid: int
    name: str
    anon_rss: int
    registered: bool
    merge_any: bool
    registered_bytes: int
    worthwhile: bool
    predicted_saved_bytes: int | None
    predicted_saved_percent: float | None
    realized_saved_bytes: int
    decision: str | None


@dataclass(frozen=True)
class DaemonIdentity:
    """What stays put for the life of one daemon (and its configuration file)."""

    pid: int
    pid_start_time: int | None
    started_at: float
    ksm_root: str
    dry_run: bool
    config_file: str | None


@dataclass(frozen=True)
class Round:
    """The figures of a completed round (absent from the snapshot written before the first)."""

    saved_bytes: int
    counters: Mapping[str, int]
    knobs: Mapping[str, object]         # as they are after this round's writes
    ksmd_cpu_seconds: float
    daemon_cpu_seconds: float
    ksmd_cpu_percent: float | None
    daemon_cpu_percent: float | None
    seconds_per_page: float
    scan_pages: int
    target_pages_per_second: float
    budget_pages_per_second: float
    pressure: bool
    bursting: bool
    predicted_bytes: int
    realized_bytes: int
    unrealized_bytes: int
    # the true saving (udedup.ksm.truth): counters plus the zero-page mappings of mergeable memory
    # outside them; None where it could not be read
    true_saved_bytes: int | None = None
    zero_mapped_pages: int | None = None     # mergeable pages on the zero page outside KSM
    true_read_seconds: float | None = None   # what that read cost this round
    # metrics.per_cgroup: ((cgroup path, saved bytes, processes), ...), largest saving first
    cgroups: tuple = ()
    # security.trust_domains on: KSM frames found mapped from two domains this round (before the
    # daemon unregistered the losing side: AuditReport.offender_frames, complete even when its
    # offenders list is capped), None when domains are off
    cross_domain_frames: int | None = None
    # the part of predicted_bytes KSM's counters will show (THP splits hand back the rest)
    counted_bytes: int | None = None


@dataclass(frozen=True)
class RoundSnapshot:
    identity: DaemonIdentity
    updated_at: float
    rounds: int
    mode: str
    mode_reason: str
    interval: float
    on_exit: str
    metrics_url: str | None
    cpu_budget_percent: float
    scan_budget: int
    original_knobs: Mapping[str, object]
    written_knobs: Mapping[str, object]
    yielded_knobs: Mapping[str, object]
    processes: tuple[ProcessEntry, ...]
    decisions_total: Mapping[str, int]
    estimated_bytes_total: int
    estimate_tokens: float
    knob_writes: int
    external_changes: int
    last: Round | None = field(default=None)
    max_cgroup_series: int = 50         # metrics.max_cgroup_series when the snapshot was built

    @property
    def managed_processes(self) -> int:
        return sum(1 for p in self.processes if p.worthwhile)

    def state(self) -> dict:
        """The state file's JSON object (``read_daemon_state`` adds ``running``)."""
        ident = self.identity
        out = {"version": STATE_VERSION, "pid": ident.pid, "pid_start_time": ident.pid_start_time,
               "started_at": ident.started_at, "updated_at": self.updated_at,
               "ksm_root": ident.ksm_root, "dry_run": ident.dry_run,
               "config_file": ident.config_file, "metrics_url": self.metrics_url,
               "interval": self.interval, "on_exit": self.on_exit,
               "original_knobs": dict(self.original_knobs),
               "written_knobs": dict(self.written_knobs),
               "yielded_knobs": dict(self.yielded_knobs), "rounds": self.rounds,
               "mode": self.mode, "mode_reason": self.mode_reason,
               "processes": [dataclasses.asdict(p) for p in self.processes],
               "decisions_total": dict(self.decisions_total)}
        if self.last is not None:
            r = self.last
            out.update({"saved_bytes": r.saved_bytes, "predicted_bytes": r.predicted_bytes,
                        "predicted_counted_bytes": r.counted_bytes,
                        "realized_bytes": r.realized_bytes, "unrealized_bytes": r.unrealized_bytes,
                        "pressure": r.pressure, "ksmd_cpu_percent": r.ksmd_cpu_percent,
                        "daemon_cpu_percent": r.daemon_cpu_percent,
                        "true_saved_bytes": r.true_saved_bytes,
                        "zero_mapped_pages": r.zero_mapped_pages,
                        "cross_domain_frames": r.cross_domain_frames})
            if r.cgroups:
                out["cgroups"] = [{"cgroup": c, "saved_bytes": b, "processes": n}
                                  for c, b, n in r.cgroups]
        return out

    def status_line(self) -> str:
        """systemd's STATUS= line."""
        r = self.last
        if r is None:
            return "starting"
        cpu = f", ksmd {r.ksmd_cpu_percent:.0f}% CPU" if r.ksmd_cpu_percent is not None else ""
        really = f" (really {gib(r.true_saved_bytes)})" if r.true_saved_bytes is not None else ""
        return (f"{self.mode}: saved {gib(r.saved_bytes)}{really}, "
                f"predicted {gib(r.predicted_bytes)} "
                f"in {self.managed_processes} processes{cpu}")


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _frozen(mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


def process_entries(policy) -> tuple[ProcessEntry, ...]:
    out = []
    for p in policy.procs.values():
        est = p.estimate
        out.append(ProcessEntry(
            pid=p.info.pid, name=p.info.name, anon_rss=p.info.anon_rss,
            registered=p.info.registered, merge_any=p.info.merge_any,
            registered_bytes=p.info.registered_bytes, worthwhile=p.worthwhile,
            predicted_saved_bytes=est.saved_bytes if est else None,
            predicted_saved_percent=est.saved_percent if est else None,
            realized_saved_bytes=p.info.ksm_profit, decision=p.last_reason))
    return tuple(out)


def round_figures(plan: Plan, obs: Observation, dry_run: bool) -> Round:
    knobs = dict(obs.knobs)
    if not dry_run:
        knobs.update(plan.knobs)   # what they are after this round's writes
    truth = obs.true_savings
    return Round(saved_bytes=obs.saved_bytes, counters=_frozen(obs.counters), knobs=_frozen(knobs),
                 ksmd_cpu_seconds=obs.ksmd_cpu_seconds, daemon_cpu_seconds=obs.daemon_cpu_seconds,
                 ksmd_cpu_percent=plan.ksmd_cpu_percent, daemon_cpu_percent=plan.daemon_cpu_percent,
                 seconds_per_page=plan.seconds_per_page, scan_pages=plan.scan_pages,
                 target_pages_per_second=plan.target_pages_per_second,
                 budget_pages_per_second=plan.budget_pages_per_second, pressure=plan.pressure,
                 bursting=plan.bursting, predicted_bytes=plan.predicted_bytes,
                 realized_bytes=plan.realized_bytes, unrealized_bytes=plan.unrealized_bytes,
                 true_saved_bytes=truth.saved_bytes if truth is not None else None,
                 zero_mapped_pages=truth.zero_mapped_pages if truth is not None else None,
                 true_read_seconds=truth.read_seconds if truth is not None else None,
                 cgroups=cgroup_figures(obs.attribution),
                 cross_domain_frames=obs.audit.offender_frames if obs.audit is not None else None,
                 counted_bytes=plan.counted_bytes)


def cgroup_figures(attribution) -> tuple:
    """``((cgroup path, saved bytes, processes), ...)`` of an
    :class:`~udedup.ksm.attribution.Attribution`, largest saving first (ties: the path); ``()``
    when there is none. Processes in no cgroup v2 group (path "") are under "/"."""
    if attribution is None:
        return ()
    rows = [(g.key or "/", round(g.saved_pages * attribution.page_size), len(g.processes))
            for g in attribution.groups("cgroup")]
    return tuple(sorted(rows, key=lambda r: (-r[1], r[0])))


def build_snapshot(identity: DaemonIdentity, cfg, policy, *, now_wall: float, rounds: int,
                   original: Mapping, metrics_url: str | None, knob_writes: int,
                   last: Round | None) -> RoundSnapshot:
    """The snapshot of the policy as it is now, with ``last`` the figures of the round just done
    (None before the first)."""
    return RoundSnapshot(
        identity=identity, updated_at=now_wall, rounds=rounds, mode=policy.mode,
        mode_reason=policy.mode_reason, interval=cfg.daemon.interval, on_exit=cfg.daemon.on_exit,
        metrics_url=metrics_url, cpu_budget_percent=cfg.ksmd.cpu_budget_percent,
        scan_budget=cfg.estimate.scan_budget, original_knobs=_frozen(original),
        written_knobs=_frozen(policy.written), yielded_knobs=_frozen(policy.yielded),
        processes=process_entries(policy), decisions_total=_frozen(policy.decision_counts),
        estimated_bytes_total=policy.estimated_bytes_total, estimate_tokens=policy.tokens,
        knob_writes=knob_writes, external_changes=policy.decision_counts.get("external", 0),
        last=last, max_cgroup_series=cfg.metrics.max_cgroup_series)
