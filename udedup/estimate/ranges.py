"""The saving ranges of a target: the page-aligned address ranges, each inside one mapping, that
hold every page predicted to save memory, joined across small gaps, so that registering only them
spares ksmd the memory that would never merge (about 3 us per registered page over its first two
scans, and a 64-byte rmap item for as long as it stays registered). Pure numpy.
"""
from __future__ import annotations

import numpy as np

from .scope import Segment

#: Join saving runs closer than this, keep at most that many ranges per target (each range
#: becomes a mapping of its own once registered, and a mapping costs the kernel a VMA).
DEFAULT_RANGE_GAP = 2 << 20
DEFAULT_MAX_RANGES = 64
#: Registering k ranges inside mappings can leave 2k + 1 VMAs; vm.max_map_count is 65530.
MAX_RANGES_LIMIT = 32768


class SavingRanges:
    """The saving ranges of one target, built segment by segment, chunk by chunk, in O(max_ranges)
    memory.

    A target's ranges are its saving pages cut at mapping boundaries and at the gaps kept as
    splits. Joining across the smallest gaps until ``max_ranges`` remain is keeping the largest
    gaps, so only the ``max_ranges - 1`` largest gaps of at least ``range_gap`` seen so far are
    remembered: a gap pushed out of that set can never come back into it. Readable pages are
    counted by rank (readable pages before a position in its segment), so the readable pages of a
    span or a gap between two saving pages are a difference of ranks."""

    # gap record columns
    _GAP, _SEQ, _SEG, _PREV, _NEXT, _INSIDE = range(6)

    def __init__(self, page_size: int, range_gap: int, max_ranges: int):
        self.ps = page_size
        self.range_gap = range_gap
        self.max_ranges = max_ranges
        self.keep = max_ranges - 1
        self.gaps = np.empty((0, 6), dtype=np.int64)
        self.seq = 0
        self.spans: list = []    # per segment with savings: [start, first, last, rank0, rank1, n]
        self._seg = None

    def start_segment(self, seg: Segment):
        self._seg = seg
        self._readable_before = 0
        self._span = None

    def add(self, pos0: int, saving: np.ndarray, readable: np.ndarray):
        """Positions ``pos0 + i`` of the current segment: which save memory, which are readable."""
        rank = np.cumsum(readable, dtype=np.int64)
        rank += self._readable_before
        self._readable_before = int(rank[-1]) if rank.size else self._readable_before
        at = np.flatnonzero(saving)
        if not at.size:
            return
        offs = self._seg.pageset.pages(at + pos0).astype(np.int64)
        ranks = rank[at]
        span = self._span
        if span is None:
            span = self._span = [self._seg.start, int(offs[0]), 0, int(ranks[0]), 0, 0]
            self.spans.append(span)
        else:   # the gap from the previous chunk's last saving page
            offs = np.concatenate(([span[2]], offs))
            ranks = np.concatenate(([span[4]], ranks))
        span[2], span[4] = int(offs[-1]), int(ranks[-1])
        span[5] += int(at.size)
        if self.keep <= 0 or offs.size < 2:
            return
        gap_pages = offs[1:] - offs[:-1] - 1
        split = np.flatnonzero((gap_pages > 0) & (gap_pages * self.ps >= self.range_gap))
        if not split.size:
            return
        rec = np.empty((split.size, 6), dtype=np.int64)
        rec[:, self._GAP] = gap_pages[split]
        rec[:, self._SEQ] = np.arange(self.seq, self.seq + split.size)
        rec[:, self._SEG] = len(self.spans) - 1
        rec[:, self._PREV] = offs[split]
        rec[:, self._NEXT] = offs[split + 1]
        rec[:, self._INSIDE] = ranks[split + 1] - ranks[split] - 1
        self.seq += split.size
        self.gaps = np.concatenate((self.gaps, rec))
        if self.gaps.shape[0] > max(4 * self.keep, 1024):
            self.gaps = self._largest(self.gaps, self.keep)

    def _largest(self, gaps: np.ndarray, k: int) -> np.ndarray:
        # largest first; among equal gaps the earliest, so the result does not depend on chunking
        order = np.lexsort((gaps[:, self._SEQ], -gaps[:, self._GAP]))
        return gaps[order[:k]]

    def result(self) -> tuple[list, int, int]:
        """(ranges, readable pages inside them, saving pages outside them)."""
        spans, ps = self.spans, self.ps
        if not spans:
            return [], 0, 0
        if len(spans) > self.max_ranges:
            # one range per mapping is already too many: keep the mappings saving most
            best = sorted(range(len(spans)), key=lambda i: (-spans[i][5], i))[: self.max_ranges]
            kept = [spans[i] for i in sorted(best)]
            ranges = [(s[0] + s[1] * ps, s[0] + (s[2] + 1) * ps) for s in kept]
            covered = sum(s[5] for s in kept)
            return ranges, sum(s[4] - s[3] + 1 for s in kept), sum(s[5] for s in spans) - covered
        chosen = self._largest(self.gaps, self.max_ranges - len(spans))
        chosen = chosen[np.lexsort((chosen[:, self._PREV], chosen[:, self._SEG]))]
        ranges, readable, ci = [], 0, 0
        for si, (start, first, last, rank0, rank1, _) in enumerate(spans):
            readable += rank1 - rank0 + 1
            lo = first
            while ci < chosen.shape[0] and chosen[ci, self._SEG] == si:
                ranges.append((start + lo * ps, start + (int(chosen[ci, self._PREV]) + 1) * ps))
                readable -= int(chosen[ci, self._INSIDE])
                lo = int(chosen[ci, self._NEXT])
                ci += 1
            ranges.append((start + lo * ps, start + (last + 1) * ps))
        return ranges, readable, 0
