"""What KSM does to transparent huge pages, as a model: which THPs ksmd splits, what the split hands
back, and what that does to the counters. Pure: no I/O (the estimator finds the THPs, from
/proc/kpageflags, in :mod:`.passes`).

What the kernel does (mm/ksm.c, mm/huge_memory.c, mm/migrate.c; 6.12 and later, measured on 6.18
with ``scripts/thp_ksm_probe.py``):

- ksmd visits every subpage of a THP like a small page: checksum, then the stable and the unstable
  tree (or, with use_zero_pages=1, the zero page). A THP is split only when a merge is *tried* on
  one of its subpages (``try_to_merge_one_page`` splits a large folio first): a subpage with a
  byte-identical twin anywhere (another THP, a small page, the same THP: then the first try fails
  on the shared compound page and ``cmp_and_merge_page`` splits it on its own), or a zero subpage
  (use_zero_pages=1: the zero-page path; 0: any other zero page, its twin). THPs of unique content
  stay whole.
- Every split of an anonymous THP remaps its subpages with ``RMP_USE_SHARED_ZEROPAGE``: each
  zero-filled subpage is mapped to the shared zero page and freed (unless the VMA is mlocked,
  VM_LOCKED). Those pages are saved outside every KSM counter (``ksm_zero_pages`` too), and ksmd
  frees their rmap items, since it skips pages on the zero page. The subpage whose merge triggered
  the split, if zero, goes the same way: the merge then fails, nothing is counted.
- The other subpages become small pages: duplicates merge as usual, unique ones stay (one rmap
  item each, in the unstable tree: pages_unshared). One huge page is lost per split.
- A split fails when the THP has references beyond its mappings (pinned: vfio, RDMA, io_uring
  fixed buffers, a pipe holding a vmspliced page; or being migrated). Then no subpage merges; ksmd
  retries every scan (``thp_split_page_failed`` rises each time). Its subpages keep rmap items: of
  each content only the first one stays in the unstable tree (pages_unshared), the rest are in no
  tree (pages_volatile). Pins cannot be seen from user space: the estimator assumes splits succeed
  and says so; :func:`thp_outcome` takes the failing THPs as an input.

Measured (``docs/results/thp_estimate/``): on 9 kinds x 8 synthetic THPs
(``scripts/thp_ksm_probe.py``) splits, zero pages handed back and every counter as this model says
(use_zero_pages=0: one THP off, the last zero page has no partner left once the others are handed
back); on two live TCG guests (``scripts/thp_vm_check.py``) the huge pages lost exactly, the zero
pages handed back within 0.02 %, the counters within 1.5 %, the real saving within 0.4 %.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ksm.accounting import ksm_pages


@dataclass(frozen=True)
class ThpLayout:
    """The THPs among the scanned pages: THP ``i`` is ordinals ``start[i] .. start[i] + length[i]
    - 1`` (its subpages in scope). ``locked``: in an mlocked mapping (a split hands nothing back);
    ``fails``: its split will fail (pinned). Both optional, per THP."""

    start: np.ndarray
    length: np.ndarray
    locked: np.ndarray | None = None
    fails: np.ndarray | None = None

    @property
    def count(self) -> int:
        return int(self.start.size)

    @property
    def pages(self) -> int:
        return int(self.length.sum())

    @staticmethod
    def empty() -> "ThpLayout":
        return ThpLayout(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def _flag(self, values) -> np.ndarray:
        if values is None:
            return np.zeros(self.count, dtype=bool)
        return np.asarray(values, dtype=bool)

    def owner(self, total: int) -> np.ndarray:
        """Per ordinal (``total`` of them), the THP index holding it, or -1."""
        own = np.full(total, -1, dtype=np.int64)
        for i, (a, n) in enumerate(zip(self.start.tolist(), self.length.tolist())):
            own[a:a + n] = i
        return own


@dataclass(frozen=True)
class ThpOutcome:
    """What ksmd will do to each THP (arrays per THP) under one use_zero_pages value."""

    use_zero_pages: bool
    split: np.ndarray          # bool: split (a merge was tried on a subpage and the split worked)
    failed: np.ndarray         # bool: a merge was tried, the split failed: nothing merges in it
    handed_back: np.ndarray    # int: zero subpages the split maps to the shared zero page

    @property
    def thps(self) -> int:
        return int(self.split.size)

    @property
    def thps_split(self) -> int:
        return int(self.split.sum())

    @property
    def thps_failed(self) -> int:
        return int(self.failed.sum())

    @property
    def thps_whole(self) -> int:
        return self.thps - self.thps_split

    @property
    def zero_pages_handed_back(self) -> int:
        return int(self.handed_back.sum())

    def as_dict(self, page_size: int) -> dict:
        return {"use_zero_pages": int(self.use_zero_pages), "thps": self.thps,
                "thps_split": self.thps_split, "thps_whole": self.thps_whole,
                "thps_split_failed": self.thps_failed,
                "zero_pages_handed_back": self.zero_pages_handed_back,
                "huge_pages_lost": self.thps_split,
                "huge_bytes_lost": self.thps_split * 512 * page_size}


def per_thp_sum(layout: ThpLayout, mask: np.ndarray) -> np.ndarray:
    """How many of each THP's ordinals ``mask`` (bool, per ordinal) holds."""
    if not layout.count:
        return np.zeros(0, dtype=np.int64)
    csum = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
    return csum[layout.start + layout.length] - csum[layout.start]


def thp_outcome(layout: ThpLayout, zero_per_thp, twin_per_thp, use_zero_pages: bool,
                zero_total: int) -> ThpOutcome:
    """Which THPs ksmd splits. ``zero_per_thp``: stable (non-volatile) zero subpages per THP;
    ``twin_per_thp``: subpages with a byte-identical non-zero twin anywhere in scope;
    ``zero_total``: stable zero pages in the whole scope (small pages included): with
    use_zero_pages=0 a zero page needs another one to merge with."""
    zero = np.asarray(zero_per_thp, dtype=np.int64)
    twin = np.asarray(twin_per_thp, dtype=np.int64)
    zero_tried = zero > 0 if use_zero_pages else (zero > 0) & (zero_total >= 2)
    tried = (twin > 0) | zero_tried
    fails = layout._flag(layout.fails)
    split = tried & ~fails
    back = np.where(split & ~layout._flag(layout.locked), zero, 0)
    return ThpOutcome(bool(use_zero_pages), split, tried & fails, back)


@dataclass(frozen=True)
class Counters:
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    ksm_zero_pages: int
    rmap_items: int


def counters(group_sizes, frozen_sizes, zero_small: int, zero_frozen: int, unique: int,
             readable: int, handed_back: int, use_zero_pages: bool,
             max_page_sharing: int) -> Counters:
    """The counters KSM settles at. ``group_sizes``: pages of each non-zero duplicate content
    that can merge (small pages and subpages of THPs that split); ``frozen_sizes`` (same order, or
    empty): the pages of each content held in THPs whose split fails; ``zero_small``: stable zero
    pages that can merge (small pages, subpages of split mlocked THPs, a lone zero subpage of a
    whole THP); ``zero_frozen``: zero subpages of THPs whose split fails; ``unique``: pages of
    unique content; ``readable``: every scanned page still mapped; ``handed_back``: zero subpages
    the splits map to the zero page (no counter, no rmap item)."""
    mps = max_page_sharing
    sizes = np.asarray(group_sizes, dtype=np.int64)
    frozen = np.asarray(frozen_sizes, dtype=np.int64)
    if frozen.size == 0:
        frozen = np.zeros(sizes.size, dtype=np.int64)
    shared, sharing, unshared = ksm_pages(sizes, mps)
    # a content whose mergeable pages make no KSM page keeps one page in the unstable tree
    unshared += int(((sizes == 0) & (frozen > 0)).sum())
    unshared += unique
    rmap = readable - handed_back
    zero = 0
    if use_zero_pages:
        zero = zero_small
        rmap -= zero_small
        unshared += int(zero_frozen > 0)
    else:
        zs, zg, zu = ksm_pages(np.array([zero_small]), mps)
        shared, sharing, unshared = shared + zs, sharing + zg, unshared + zu
        unshared += int(zero_small == 0 and zero_frozen > 0)
    return Counters(shared, sharing, unshared, zero, rmap)
