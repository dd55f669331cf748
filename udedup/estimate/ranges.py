"""The saving ranges of a target: the page-aligned address ranges, each inside one mapping, that
hold every page predicted to save memory, joined across small gaps, so that registering only them
spares ksmd the memory that would never merge (about 3 us per registered page over its first two
scans, and a 64-byte rmap item for as long as it stays registered). Pure numpy.

With trust domains (:mod:`.domains`) the same builder makes the domain ranges: a page whose content
is registered in another domain ("foreign") is a hard break, as a mapping boundary is, so that no
range ever contains one.
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

    A target's ranges are its saving pages cut into spans at the hard breaks (mapping boundaries,
    and the foreign pages given to :meth:`add`), then cut inside spans at the gaps kept as splits.
    Joining across the smallest gaps until ``max_ranges`` remain is keeping the largest gaps, so
    only the ``max_ranges - 1`` largest gaps of at least ``range_gap`` seen so far are
    remembered: a gap pushed out of that set can never come back into it. When there are more
    spans than ``max_ranges``, the spans holding most saving pages are kept (a closed span pushed
    out of that set cannot come back either). Readable pages are counted by rank (readable pages
    before a position in its segment), so the readable pages of a span or a gap between two saving
    pages are a difference of ranks."""

    # gap record columns
    _GAP, _SEQ, _SEG, _PREV, _NEXT, _INSIDE = range(6)
    # span record columns: id (start order), segment start address, first and last page offset,
    # rank of both, saving pages
    _ID, _START, _FIRST, _LAST, _RANK0, _RANK1, _N = range(7)

    def __init__(self, page_size: int, range_gap: int, max_ranges: int):
        self.ps = page_size
        self.range_gap = range_gap
        self.max_ranges = max_ranges
        self.keep = max_ranges - 1
        self.gaps = np.empty((0, 6), dtype=np.int64)
        self.seq = 0
        self.spans = np.empty((0, 7), dtype=np.int64)
        self.nspans = 0          # spans started so far (some may have been pushed out)
        self.total = 0           # saving pages seen
        self._seg = None
        self._open = False       # the last span row may still grow
        self._open_fc = 0

    def start_segment(self, seg: Segment):
        self._seg = seg
        self._readable_before = 0
        self._foreign_before = 0
        self._open = False

    def add(self, pos0: int, saving: np.ndarray, readable: np.ndarray,
            foreign: np.ndarray | None = None):
        """Positions ``pos0 + i`` of the current segment: which save memory, which are readable,
        and (optional) which are foreign: no range may contain those."""
        rank = np.cumsum(readable, dtype=np.int64)
        rank += self._readable_before
        self._readable_before = int(rank[-1]) if rank.size else self._readable_before
        fc = None
        if foreign is not None:
            fc = np.cumsum(foreign, dtype=np.int64)
            fc += self._foreign_before
            self._foreign_before = int(fc[-1]) if fc.size else self._foreign_before
        at = np.flatnonzero(saving)
        if not at.size:
            return
        offs = self._seg.pageset.pages(at + pos0).astype(np.int64)
        ranks = rank[at]
        fcs = fc[at] if fc is not None else None
        self.total += int(at.size)
        brk = np.zeros(at.size, dtype=bool)          # a new span starts here
        if fcs is not None:
            brk[1:] = fcs[1:] != fcs[:-1]
        cont = self._open and not (fcs is not None and int(fcs[0]) != self._open_fc)
        brk[0] = not cont
        first = np.flatnonzero(brk)
        last = np.append(first[1:] - 1, at.size - 1)
        S = self
        prev = None
        if cont:
            row = self.spans[-1]
            prev = (int(row[S._ID]), int(row[S._LAST]), int(row[S._RANK1]))
            end0 = int(first[0]) - 1 if first.size else at.size - 1
            row[S._LAST], row[S._RANK1] = offs[end0], ranks[end0]
            row[S._N] += end0 + 1
        base = self.nspans
        if first.size:
            rec = np.empty((first.size, 7), dtype=np.int64)
            rec[:, S._ID] = np.arange(base, base + first.size)
            rec[:, S._START] = self._seg.start
            rec[:, S._FIRST], rec[:, S._LAST] = offs[first], offs[last]
            rec[:, S._RANK0], rec[:, S._RANK1] = ranks[first], ranks[last]
            rec[:, S._N] = last - first + 1
            self.spans = np.concatenate((self.spans, rec))
            self.nspans += int(first.size)
        self._open = True
        self._open_fc = int(fcs[-1]) if fcs is not None else 0
        if self.keep > 0 and self.nspans <= self.max_ranges:
            self._add_gaps(offs, ranks, brk, base, prev)
        self._prune()

    def _add_gaps(self, offs, ranks, brk, base, prev):
        piece = np.cumsum(brk)                      # 0: the span continued from before
        sid = base + piece - 1
        if prev is not None:
            sid[piece == 0] = prev[0]
            offs = np.concatenate(([prev[1]], offs))
            ranks = np.concatenate(([prev[2]], ranks))
            sid = np.concatenate(([prev[0]], sid))
            brk = np.concatenate(([True], brk))
        if offs.size < 2:
            return
        gap_pages = offs[1:] - offs[:-1] - 1
        split = np.flatnonzero(~brk[1:] & (gap_pages > 0) &
                               (gap_pages * self.ps >= self.range_gap))
        if not split.size:
            return
        rec = np.empty((split.size, 6), dtype=np.int64)
        rec[:, self._GAP] = gap_pages[split]
        rec[:, self._SEQ] = np.arange(self.seq, self.seq + split.size)
        rec[:, self._SEG] = sid[split]
        rec[:, self._PREV] = offs[split]
        rec[:, self._NEXT] = offs[split + 1]
        rec[:, self._INSIDE] = ranks[split + 1] - ranks[split] - 1
        self.seq += split.size
        self.gaps = np.concatenate((self.gaps, rec))
        if self.gaps.shape[0] > max(4 * self.keep, 1024):
            self.gaps = self._largest(self.gaps, self.keep)

    def _prune(self):
        if self.nspans > self.max_ranges and self.gaps.shape[0]:
            self.gaps = self.gaps[:0]               # only whole spans are kept from now on
        if self.spans.shape[0] <= max(4 * self.max_ranges, 1024):
            return
        closed = self.spans[:-1] if self._open else self.spans
        top = self._most_saving(closed)
        if self._open:
            top = np.concatenate((top, self.spans[-1:]))
        self.spans = top

    def _most_saving(self, spans: np.ndarray) -> np.ndarray:
        """The ``max_ranges`` spans with most saving pages (ties: the earliest), in start order."""
        order = np.lexsort((spans[:, self._ID], -spans[:, self._N]))[: self.max_ranges]
        return spans[np.sort(order)]

    def _largest(self, gaps: np.ndarray, k: int) -> np.ndarray:
        # largest first; among equal gaps the earliest, so the result does not depend on chunking
        order = np.lexsort((gaps[:, self._SEQ], -gaps[:, self._GAP]))
        return gaps[order[:k]]

    def result(self) -> tuple[list, int, int]:
        """(ranges, readable pages inside them, saving pages outside them)."""
        spans, ps, S = self.spans, self.ps, self
        if not self.nspans:
            return [], 0, 0
        if self.nspans > self.max_ranges:
            # one range per span is already too many: keep the spans saving most
            kept = self._most_saving(spans)
            ranges = [(int(s[S._START] + s[S._FIRST] * ps), int(s[S._START] + (s[S._LAST] + 1) * ps))
                      for s in kept]
            readable = int((kept[:, S._RANK1] - kept[:, S._RANK0] + 1).sum())
            return ranges, readable, self.total - int(kept[:, S._N].sum())
        chosen = self._largest(self.gaps, self.max_ranges - self.nspans)
        chosen = chosen[np.lexsort((chosen[:, self._PREV], chosen[:, self._SEG]))]
        ranges, readable, ci = [], 0, 0
        for s in spans.tolist():
            sid, start, first, last, rank0, rank1 = s[:6]
            readable += rank1 - rank0 + 1
            lo = first
            while ci < chosen.shape[0] and chosen[ci, self._SEG] == sid:
                ranges.append((start + lo * ps, start + (int(chosen[ci, self._PREV]) + 1) * ps))
                readable -= int(chosen[ci, self._INSIDE])
                lo = int(chosen[ci, self._NEXT])
                ci += 1
            ranges.append((start + lo * ps, start + (last + 1) * ps))
        return ranges, readable, 0
