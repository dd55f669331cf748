"""What an estimate found and predicts: the result classes (:class:`Estimate`, its
:class:`Prediction` per use_zero_pages, a :class:`TargetReport` per target and a
:class:`MappingReport` per mapping). Pure data; the counters come from :mod:`udedup.ksm.accounting`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..host.maps import Mapping
from ..ksm.accounting import RMAP_ITEM_BYTES
from .thp import counters


@dataclass(frozen=True)
class Prediction:
    """KSM counters predicted for the scanned memory alone, once ksmd has settled, and the memory
    the host really gets back. A prediction, never a reading: ``as_dict`` says so.

    THP-backed memory (see :mod:`.thp`): ksmd splits a THP when it tries to merge one of its
    subpages, and the split maps the THP's zero-filled subpages to the shared zero page outside
    every KSM counter: ``thp_zero_pages``. The counters leave them out; ``saved_bytes`` and
    ``real_saved_bytes`` count them."""

    use_zero_pages: bool
    max_page_sharing: int
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    ksm_zero_pages: int
    rmap_items: int
    page_size: int
    scanned_bytes: int
    thp_zero_pages: int = 0       # zero subpages the THP splits hand back (no KSM counter)
    thps: int = 0                 # THPs among the scanned pages
    thps_split: int = 0           # of them, split by ksmd (huge pages lost)

    @property
    def saved_pages(self) -> int:
        """Pages freed as the counters show: pages_sharing + ksm_zero_pages (pages_shared are the
        KSM pages kept)."""
        return self.pages_sharing + self.ksm_zero_pages

    @property
    def real_saved_pages(self) -> int:
        """Pages the host gets back: the counters' pages and the zero subpages of split THPs."""
        return self.saved_pages + self.thp_zero_pages

    @property
    def real_saved_bytes(self) -> int:
        """``real_saved_pages`` in bytes: the figure ``udedup status`` reports as saved_bytes and
        the host's AnonPages drop."""
        return self.real_saved_pages * self.page_size

    @property
    def general_profit(self) -> int:
        """The kernel's formula: saved pages minus 64 bytes of rmap item per scanned page."""
        return self.saved_pages * self.page_size - self.rmap_items * RMAP_ITEM_BYTES

    @property
    def saved_bytes(self) -> int:
        """Net bytes really saved: general_profit plus the zero subpages THP splits hand back
        (without THPs, general_profit itself)."""
        return self.general_profit + self.thp_zero_pages * self.page_size

    @property
    def saved_percent(self) -> float:
        return 100.0 * self.saved_bytes / self.scanned_bytes if self.scanned_bytes else 0.0

    def as_dict(self) -> dict:
        return {"predicted": True,
                "use_zero_pages": int(self.use_zero_pages), "max_page_sharing": self.max_page_sharing,
                "pages_shared": self.pages_shared, "pages_sharing": self.pages_sharing,
                "pages_unshared": self.pages_unshared, "ksm_zero_pages": self.ksm_zero_pages,
                "rmap_items": self.rmap_items, "saved_pages": self.saved_pages,
                "general_profit": self.general_profit, "saved_bytes": self.saved_bytes,
                "saved_percent": round(self.saved_percent, 3),
                "thp_zero_pages": self.thp_zero_pages, "real_saved_pages": self.real_saved_pages,
                "real_saved_bytes": self.real_saved_bytes, "thps": self.thps,
                "thps_split": self.thps_split,
                "huge_pages_lost": self.thps_split}

    _asdict = as_dict


@dataclass
class ThpSummary:
    """The THPs among the scanned pages and what ksmd will do to them, per use_zero_pages
    (``outcomes[0]``, ``outcomes[1]``: :class:`~.thp.ThpOutcome`). ``known`` False: some mapping
    holds THPs the scan could not find (PFNs hidden): the THP part of the prediction is unknown.
    ``frozen_sizes`` (per duplicate group, in ``Estimate.group_sizes`` order) and ``zero_frozen``:
    pages held by THPs whose split fails."""

    known: bool
    thps: int
    thp_pages: int
    outcomes: dict
    zero_frozen: int = 0
    frozen_sizes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def as_dict(self, page_size: int) -> dict:
        return {"known": self.known, "thps": self.thps, "thp_pages": self.thp_pages,
                "predicted": {str(k): o.as_dict(page_size) for k, o in sorted(self.outcomes.items())}}


COUNT_FIELDS = ("scanned_pages", "zero_pages", "duplicate_pages", "unique_pages", "volatile_pages",
                 "unreadable_pages")


@dataclass(kw_only=True)
class _PageCounts:
    """What the scanned pages of a mapping, or of a whole target, turned out to be."""

    scanned_pages: int = 0
    zero_pages: int = 0
    duplicate_pages: int = 0
    unique_pages: int = 0
    volatile_pages: int = 0
    unreadable_pages: int = 0
    saved_pages: dict = field(default_factory=lambda: {0: 0.0, 1: 0.0})

    def _counts_dict(self) -> dict:
        d = {k: getattr(self, k) for k in COUNT_FIELDS}
        d["saved_pages"] = {str(k): round(v, 1) for k, v in self.saved_pages.items()}
        return d


@dataclass
class MappingReport(_PageCounts):
    """One mapping of a target: its classification and, when scanned, what its pages are."""

    pid: int
    mapping: Mapping
    in_scope: bool
    present_pages: int = 0        # present anonymous pages, zero-page mappings included
    zero_mapped_pages: int = 0    # already map the kernel's zero page: free, ksmd skips them
    swapped_pages: int = 0
    thps: int = 0                 # THPs among the scanned pages
    thp_pages: int = 0            # scanned pages that are THP subpages
    # per use_zero_pages (0, 1): THPs ksmd will split, zero subpages the splits hand back
    thps_split: dict = field(default_factory=lambda: {0: 0, 1: 0})
    thp_zero_pages: dict = field(default_factory=lambda: {0: 0, 1: 0})

    def as_dict(self) -> dict:
        m = self.mapping
        return {"pid": self.pid, "start": hex(m.start), "end": hex(m.end), "path": m.path,
                "kind": m.kind, "registered": m.registered, "eligible": m.eligible,
                "reason": m.reason, "in_scope": self.in_scope, "anon_huge_bytes": m.anon_huge,
                "present_pages": self.present_pages, "zero_mapped_pages": self.zero_mapped_pages,
                "swapped_pages": self.swapped_pages, "thps": self.thps,
                "thp_pages": self.thp_pages,
                "thps_split": {str(k): v for k, v in self.thps_split.items()},
                "thp_zero_pages": {str(k): v for k, v in self.thp_zero_pages.items()},
                **self._counts_dict()}


@dataclass
class TargetReport(_PageCounts):
    """One target: a process, or a buffer of this process."""

    pid: int
    name: str
    kind: str                     # "process" or "buffer"
    exited: bool = False
    existing_ksm_zero_pages: int = 0
    # Page-aligned [start, end) addresses, each inside one mapping, in address order, covering
    # every page predicted to save memory (non-volatile zero pages, members of confirmed duplicate
    # groups): what to register so ksmd scans little else.
    saving_ranges: list = field(default_factory=list)
    range_pages: int = 0          # scanned, readable pages inside saving_ranges (rmap items)
    # saving pages outside saving_ranges: 0 unless more mappings hold savings than max_ranges
    # (then the ranges of the mappings saving least are left out)
    uncovered_pages: int = 0
    # With trust domains (estimate(domains=...); all None / empty without): the target's domain
    # key; the ranges to register instead of saving_ranges (its registrable pages, never a foreign
    # one) and the readable pages inside them; its foreign pages (content registered in another
    # domain) and, page precise, those of them in registered (mg) mappings: what to unregister;
    # the pages saved per use_zero_pages when every domain registers only its registrable pages;
    # registrable pages outside domain_ranges (more spans than max_ranges)
    domain: str | None = None
    domain_ranges: list = field(default_factory=list)
    domain_range_pages: int = 0
    foreign_pages: int = 0
    conflict_ranges: list = field(default_factory=list)
    domain_saved_pages: dict | None = None
    domain_uncovered_pages: int = 0

    def as_dict(self) -> dict:
        d = {"pid": self.pid, "name": self.name, "kind": self.kind, "exited": self.exited}
        d.update(self._counts_dict())
        d["existing_ksm_zero_pages"] = self.existing_ksm_zero_pages
        d["saving_ranges"] = [[hex(a), hex(b)] for a, b in self.saving_ranges]
        d["range_pages"] = self.range_pages
        d["uncovered_pages"] = self.uncovered_pages
        if self.domain is not None:
            d["domain"] = self.domain
            d["domain_ranges"] = [[hex(a), hex(b)] for a, b in self.domain_ranges]
            d["domain_range_pages"] = self.domain_range_pages
            d["domain_uncovered_pages"] = self.domain_uncovered_pages
            d["foreign_pages"] = self.foreign_pages
            d["conflict_ranges"] = [[hex(a), hex(b)] for a, b in self.conflict_ranges]
            d["domain_saved_pages"] = {str(k): round(v, 1)
                                       for k, v in (self.domain_saved_pages or {}).items()}
        return d


def _pages_dict(pages: dict) -> dict:
    return {str(k): round(v, 1) for k, v in sorted(pages.items())}


@dataclass
class DomainReport:
    """One trust domain of an estimate: its processes, what it saves when every domain registers
    only its registrable pages (``saved_pages_kept``) and when everything is registered
    (``saved_pages_all``), per use_zero_pages; its pages in contents found in several domains
    (``exposed_pages``), those of them whose content is registered elsewhere (``foreign_pages``)."""

    key: str
    pids: list
    saved_pages_kept: dict
    exposed_pages: int = 0
    saved_pages_all: dict = field(default_factory=lambda: {0: 0.0, 1: 0.0})
    foreign_pages: int = 0
    scanned_pages: int = 0
    zero_pages: int = 0

    def as_dict(self) -> dict:
        return {"key": self.key, "pids": list(self.pids),
                "saved_pages_kept": _pages_dict(self.saved_pages_kept),
                "saved_pages_all": _pages_dict(self.saved_pages_all),
                "exposed_pages": self.exposed_pages, "foreign_pages": self.foreign_pages,
                "scanned_pages": self.scanned_pages, "zero_pages": self.zero_pages}


@dataclass
class DomainSummary:
    """Trust domains over a whole estimate (:mod:`.domains`). KSM has no partition: a content
    found in several domains is registered in one of them only (where it saves most; ties: more
    pages already registered, then the smallest key). ``zero_pages_across``: zero pages stay
    registrable everywhere (they merge into the kernel's zero page with use_zero_pages=1).

    ``saved_pages_all`` / ``saved_pages_kept`` {use_zero_pages: pages}: everything registered
    (the plain prediction) / only the registrable pages. ``cross_groups``: confirmed duplicate
    groups with members in two or more domains; ``exposed_pages``: their pages (each would map a
    KSM page mapped from another domain if everything were merged); ``exposed_zero_pages``: zero
    pages outside the domain with most of them, when two or more domains have some (what merges
    across domains with use_zero_pages=0)."""

    zero_pages_across: bool
    saved_pages_all: dict
    saved_pages_kept: dict
    cross_groups: int = 0
    exposed_pages: int = 0
    exposed_zero_pages: int = 0
    per_domain: list = field(default_factory=list)
    foreign_pages: int = 0
    seconds: float = 0.0          # time the domain step took

    def as_dict(self) -> dict:
        return {"zero_pages_across": self.zero_pages_across, "domains": len(self.per_domain),
                "saved_pages_all": _pages_dict(self.saved_pages_all),
                "saved_pages_kept": _pages_dict(self.saved_pages_kept),
                "cross_groups": self.cross_groups, "exposed_pages": self.exposed_pages,
                "exposed_zero_pages": self.exposed_zero_pages,
                "foreign_pages": self.foreign_pages,
                "per_domain": [d.as_dict() for d in self.per_domain],
                "seconds": round(self.seconds, 4)}


@dataclass
class Estimate:
    """What KSM would do with the scanned memory. Counts are pages of ``page_size`` bytes."""

    page_size: int
    passes: int
    interval: float
    all_eligible: bool
    max_page_sharing: int
    current_use_zero_pages: bool | None
    targets: list
    mappings: list
    pages_scanned: int = 0        # read in pass 1
    zero_pages: int = 0
    duplicate_pages: int = 0      # non-zero pages with at least one byte-identical twin
    duplicate_groups: int = 0
    largest_group: int = 0
    unique_pages: int = 0
    volatile_pages: int = 0
    unreadable_pages: int = 0     # vanished mid-scan (unmapped, process exited)
    zero_mapped_pages: int = 0
    unconfirmed_pages: int = 0    # hash matched but bytes differed on every retry: counted unique
    existing_ksm_zero_pages: int = 0
    group_sizes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    partial: bool = False
    notes: list = field(default_factory=list)
    elapsed_seconds: float = 0.0
    cpu_seconds: float = 0.0
    bytes_read: int = 0
    index_bytes: int = 0          # peak bytes of per-page bookkeeping
    buffer_bytes: int = 0         # the fixed read buffer
    timings: dict = field(default_factory=dict)   # seconds per phase
    # what later passes re-read: "all", or "candidates" (then volatile_pages counts only the
    # re-checked zero pages and duplicate candidates that changed)
    recheck: str = "all"
    thp: ThpSummary | None = None  # None: no THP among the scanned pages
    domains: DomainSummary | None = None   # estimate(domains=...) only
    # estimate(fingerprint_pages=...) only: {pid: (sorted page addresses, their crc32c)}
    fingerprints: dict | None = None

    @property
    def thp_known(self) -> bool:
        return self.thp is None or self.thp.known

    @property
    def readable_pages(self) -> int:
        return self.pages_scanned - self.unreadable_pages

    def predicted(self, use_zero_pages: bool) -> Prediction:
        """Counters KSM reaches on this memory alone, settled, with ``use_zero_pages``; THPs
        split as :mod:`.thp` says (their zero subpages handed back outside the counters)."""
        k = int(bool(use_zero_pages))
        t = self.thp
        handed = frozen_zero = thps = split = 0
        frozen = np.empty(0, dtype=np.int64)
        if t is not None and t.outcomes:
            out = t.outcomes[k]
            handed, thps, split = out.zero_pages_handed_back, out.thps, out.thps_split
            frozen, frozen_zero = t.frozen_sizes, t.zero_frozen
        sizes = self.group_sizes - frozen if frozen.size else self.group_sizes
        c = counters(sizes, frozen, self.zero_pages - handed - frozen_zero, frozen_zero,
                     self.unique_pages, self.readable_pages, handed, bool(use_zero_pages),
                     self.max_page_sharing)
        return Prediction(bool(use_zero_pages), self.max_page_sharing, c.pages_shared,
                          c.pages_sharing, c.pages_unshared,
                          c.ksm_zero_pages + self.existing_ksm_zero_pages, c.rmap_items,
                          self.page_size, self.readable_pages * self.page_size, handed, thps,
                          split)

    @property
    def predictions(self) -> list:
        return [self.predicted(False), self.predicted(True)]

    def _uzp(self, use_zero_pages):
        if use_zero_pages is None:
            use_zero_pages = bool(self.current_use_zero_pages)
        return int(bool(use_zero_pages))

    def top_mappings(self, n: int = 10, use_zero_pages: bool | None = None) -> list:
        """Scanned mappings by predicted pages saved (under the current use_zero_pages)."""
        k = self._uzp(use_zero_pages)
        scanned = [m for m in self.mappings if m.scanned_pages]
        return sorted(scanned, key=lambda m: -m.saved_pages[k])[:n]

    def top_processes(self, n: int = 10, use_zero_pages: bool | None = None) -> list:
        k = self._uzp(use_zero_pages)
        return sorted(self.targets, key=lambda t: -t.saved_pages[k])[:n]

    @property
    def bytes_per_page(self) -> float:
        return self.index_bytes / self.pages_scanned if self.pages_scanned else 0.0

    def as_dict(self, top: int = 10) -> dict:
        return {
            "page_size": self.page_size, "passes": self.passes, "interval": self.interval,
            "recheck": self.recheck,
            "all_eligible": self.all_eligible, "max_page_sharing": self.max_page_sharing,
            "current_use_zero_pages": self.current_use_zero_pages,
            "partial": self.partial, "notes": list(self.notes),
            "pages_scanned": self.pages_scanned, "zero_pages": self.zero_pages,
            "duplicate_pages": self.duplicate_pages, "duplicate_groups": self.duplicate_groups,
            "largest_group": self.largest_group, "unique_pages": self.unique_pages,
            "volatile_pages": self.volatile_pages, "unreadable_pages": self.unreadable_pages,
            "zero_mapped_pages": self.zero_mapped_pages,
            "unconfirmed_pages": self.unconfirmed_pages,
            "existing_ksm_zero_pages": self.existing_ksm_zero_pages,
            "predictions": [p.as_dict() for p in self.predictions],
            "thp": self.thp.as_dict(self.page_size) if self.thp is not None else None,
            "thp_known": self.thp_known,
            "targets": [t.as_dict() for t in self.targets],
            "top_mappings": [m.as_dict() for m in self.top_mappings(top)],
            "elapsed_seconds": round(self.elapsed_seconds, 4),
            "cpu_seconds": round(self.cpu_seconds, 4), "bytes_read": self.bytes_read,
            "index_bytes": self.index_bytes, "bytes_per_page": round(self.bytes_per_page, 2),
            "buffer_bytes": self.buffer_bytes,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            **({"domains": self.domains.as_dict()} if self.domains is not None else {}),
        }

    _asdict = as_dict
