"""What the policy reasons about, as plain data: the processes and host figures the daemon
observed, the estimator's predictions, and the plan and decisions a round produces.

No I/O and no decisions here: :mod:`.observe` fills these in, :mod:`.policy` reads them and
returns a :class:`Plan`, :mod:`.act` carries the plan out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ..ksm.truth import TrueSavings

#: ksmd CPU per scanned page before we have measured it (KSM.md: 1-2 us per page on first passes).
PRIOR_SECONDS_PER_PAGE = 2e-6


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
    #: security.trust_domains on: the process's domain key; ``ranges`` are then its domain ranges
    #: (registrable pages only, never a page whose content saves more in another domain) and
    #: ``saved_bytes`` what registering only those saves
    domain: str | None = None
    #: page-precise ranges of foreign pages inside mappings registered now: to unregister
    conflict_ranges: tuple = ()
    foreign_pages: int = 0      # pages whose content won in another domain
    other_domains: tuple = ()   # the other domains of the joint estimate (for the log)
    #: the part of ``saved_bytes`` KSM's counters will show: without the zero subpages THP splits
    #: hand back (mapped to the zero page outside every counter); None: all of it
    counter_bytes: int | None = None
    #: the sampled pages and their crc32c when this estimate read them (udedup.daemon.fingerprint)
    fingerprint: object = None

    @property
    def counted_bytes(self) -> int:
        """The prediction to hold the counters' realized saving against (like with like)."""
        return self.saved_bytes if self.counter_bytes is None else self.counter_bytes


class Register(NamedTuple):
    """One registration to do by injection: the whole process (``ranges`` None) or ``ranges``."""

    info: "ProcessInfo"
    mode: str                   # inject mode: auto, prctl, madvise
    ranges: tuple | None = None


class Unregister(NamedTuple):
    """Ranges to unregister by injection (``MADV_UNMERGEABLE``), and why: they hold pages that must
    not merge in this process's trust domain."""

    info: "ProcessInfo"
    ranges: tuple
    reason: str


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
    #: the round's true saving: the counters plus the zero-page mappings of mergeable memory
    #: outside them (None if it could not be read)
    true_savings: TrueSavings | None = None
    #: the round's exact saving per process (udedup.ksm.attribution.Attribution), read when
    #: metrics.per_cgroup is on (None otherwise, or if it could not be read)
    attribution: object | None = None
    #: security.trust_domains on: the round's page-by-page check (udedup.ksm.audit.AuditReport)
    #: of the KSM frames mapped from two domains (None when domains are off or it failed)
    audit: object | None = None


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
    unregister: list = field(default_factory=list)      # Unregister actions, by injection
    knobs: dict = field(default_factory=dict)           # knob -> value to write
    mode: str = "hold"                                  # fast, slow, stopped, hold
    decisions: list = field(default_factory=list)       # new or changed decisions only
    pressure: bool = False
    predicted_bytes: int = 0
    counted_bytes: int = 0                              # of it, what the counters will show
    realized_bytes: int = 0
    unrealized_bytes: int = 0
    scan_pages: int = 0                                 # registered pages a full scan covers
    target_pages_per_second: float = 0.0
    budget_pages_per_second: float = 0.0
    ksmd_cpu_percent: float | None = None
    daemon_cpu_percent: float | None = None
    seconds_per_page: float = PRIOR_SECONDS_PER_PAGE
    bursting: bool = False                              # fast scan above the average budget


@dataclass
class TrackedProcess:
    """The policy's memory of one candidate across rounds."""

    info: ProcessInfo
    estimate: EstimateResult | None = None
    estimate_failed: str | None = None
    estimate_failed_at: float = 0.0
    registration_failed: str | None = None
    registered_at: float | None = None
    registered_ranges: tuple | None = None  # what our last range registration covered
    # trust domains: ranges the round's audit unregistered (their frames were shared with another
    # domain): not registered again until a newer estimate; and the estimate (its ``at``) whose
    # conflict ranges were planned for unregistering
    withheld: tuple = ()
    conflicts_of: float | None = None
    last_reason: str | None = None          # last decision reported for this process
    worthwhile: bool = False

    def note(self, plan: Plan, kind: str, action: str, reason: str) -> None:
        """Add a decision about this process to ``plan`` when it differs from the last one: a
        process's decision is reported when it changes, not every round."""
        text = f"{action}: {reason}"
        if self.last_reason != text:
            self.last_reason = text
            plan.decisions.append(Decision(kind, action, reason, self.info.pid))
