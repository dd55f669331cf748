"""What an A/B run keeps: one :class:`TrialRecord` per trial, the :class:`ABResult` (every trial,
the configuration and the summary; its ``to_dict()`` is the JSON report) and
:class:`ABInterrupted`, which carries the finished trials out of a stopped run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from statistics import median
from typing import Mapping

from .stats import summarize


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
    saved_bytes: int | None = None     # the true saving's change over the trial (take_true_saving)
    counter_saved_bytes: int | None = None  # the kernel's figure (general_profit), the old one
    true_saved_bytes: int | None = None     # = saved_bytes where the true saving could be read
    zero_mapped_pages: int | None = None    # change of mergeable pages on the zero page outside KSM
    plateau: dict | None = None        # where and how the trial settled (ksm.settle.Plateau)
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
    series: dict = field(default_factory=dict)   # columns: sampler.SERIES_COLUMNS

    def as_dict(self, series: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if not series:
            d.pop("series")
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in d.items() if k in names})
        if record.series:   # a report written before a column existed: that column reads as empty
            n = len(record.series.get("t", []))
            record.series = {**{c: [None] * n for c in _series_columns()}, **record.series}
        return record

    def take_true_saving(self) -> None:
        """Make ``saved_bytes`` the change of the true saving over the trial (the sampler's
        ``true_saved_bytes``), taken over the plateau where the trial settled on one (the median
        of the samples in its window of full scans, as the counters are), else the last sample.
        The kernel's figure moves to ``counter_saved_bytes``. Exact: the baseline is read before
        ksmd starts, so pages read but never written before the trial cancel out. A trial without
        true samples keeps the counters' figure."""
        rows = plateau_rows(self.series, self.plateau)
        true = [self.series["true_saved_bytes"][i] for i in rows]
        if not true:
            return
        zero = [self.series.get("zero_mapped_pages", [None] * (max(rows) + 1))[i] for i in rows]
        self.counter_saved_bytes = self.saved_bytes
        self.true_saved_bytes = self.saved_bytes = int(median(true))
        self.zero_mapped_pages = int(median(zero)) if None not in zero else None
        cpu = self.ksmd_cpu_seconds
        if cpu:
            self.saved_mib_per_cpu_second = round(self.saved_bytes / 2**20 / cpu, 2)


def plateau_rows(series: Mapping[str, list], plateau: Mapping | None) -> list[int]:
    """Indexes of the samples with a true saving inside the plateau's window of full scans
    (after ``plateau["scans"] - plateau["scan_span"]``, up to ``plateau["scans"]`` full scans since
    the first sample)
    and the last one; without a plateau (a timeout, exact settling not recorded), the last."""
    values = series.get("true_saved_bytes") or []
    have = [i for i, v in enumerate(values) if v is not None]
    if not have:
        return []
    scans = series.get("full_scans") or []
    if plateau and len(scans) == len(values) and scans and scans[0] is not None:
        hi = plateau.get("scans")
        lo = hi - plateau.get("scan_span", 0) if hi is not None else None
        # the window's first full-scan count holds reads from before the plateau (on guests most
        # merging happens during it): only the later counts are the plateau
        inside = [i for i in have if lo is not None and lo < scans[i] - scans[0] <= hi]
        if inside:
            return sorted(set(inside) | {have[-1]})
    return [have[-1]]


def _series_columns():
    from .sampler import SERIES_COLUMNS   # here: the sampler imports the KSM layer, records not
    return SERIES_COLUMNS


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
