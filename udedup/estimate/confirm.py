"""Byte confirmation: a candidate counts as a duplicate only once ``compare_pages`` found it equal,
byte for byte, to its group's head; a hash match alone never counts.

The last pass meets a group's head before its members (the head is the lowest ordinal). A member
is compared with its head where the head is in the same chunk, else with a copy in the head cache
(the heads of the largest groups, whose members are everywhere), else with the head re-read. A
head that changed or vanished hands the group to its next good member. Members that did not match
are regrouped by their full hash64 and compared again, round after round.

Pages are read through two :class:`.passes.Fetcher` objects (``heads`` and ``reader``:
``fetch(ordinals) -> ok``, the pages landing in ``buffer``, at most ``capacity`` at a time): this
module does no I/O of its own.
"""
from __future__ import annotations

import numpy as np

from ..native import kernels
from .group import hash_runs
from .scope import NONE, UNREADABLE, VOLATILE

_PENDING = -1      # a group whose head was lost: its next good member becomes the head


class Confirmer:
    """Confirms candidate groups chunk by chunk (:meth:`confirm`), then the leftovers
    (:meth:`regroup_leftovers`). ``rep``: the scope's group head per ordinal (updated);
    ``cache``: a flat uint8 array of whole pages for the head cache; ``heads`` re-reads group
    heads, ``reader`` members."""

    def __init__(self, rep: np.ndarray, page_size: int, cache: np.ndarray, heads, reader):
        self.rep = rep
        self.ps = page_size
        self.heads = heads
        self.reader = reader
        self.cache_flat = cache
        self.cache = cache.reshape(-1, page_size)
        self.cache_heads = np.empty(0, dtype=np.int64)
        self.cache_valid = np.empty(0, dtype=bool)
        self._heads_over: dict = {}
        self._over_keys = np.empty(0, dtype=np.int64)
        self._over_vals = np.empty(0, dtype=np.int64)
        self.leftovers: list = []

    def close(self) -> None:
        """Drop the views of the head cache, so that its buffer can be unmapped."""
        self.cache = self.cache_flat = None

    def cache_groups(self, heads: np.ndarray) -> None:
        """Keep copies of these heads (sorted ordinals) when the last pass reads them."""
        self.cache_heads = heads
        self.cache_valid = np.zeros(self.cache_heads.size, dtype=bool)

    def _current_heads(self, g: np.ndarray) -> np.ndarray:
        cur = g.astype(np.int64)
        if self._over_keys.size:
            pos = np.searchsorted(self._over_keys, cur)
            pos_c = np.minimum(pos, self._over_keys.size - 1)
            hit = self._over_keys[pos_c] == cur
            cur[hit] = self._over_vals[pos_c[hit]]
        return cur

    def _set_heads(self, updates: dict):
        self._heads_over.update(updates)
        keys = np.fromiter(self._heads_over.keys(), dtype=np.int64, count=len(self._heads_over))
        vals = np.fromiter(self._heads_over.values(), dtype=np.int64, count=len(self._heads_over))
        order = np.argsort(keys)
        self._over_keys, self._over_vals = keys[order], vals[order]

    def _cache_lookup(self, heads: np.ndarray):
        """(slot, hit) of heads in the head cache."""
        ch = self.cache_heads
        if not ch.size:
            return np.zeros(heads.size, np.int64), np.zeros(heads.size, bool)
        slot = np.minimum(np.searchsorted(ch, heads), ch.size - 1)
        return slot, (ch[slot] == heads) & self.cache_valid[slot]

    def confirm(self, chunk_ords, buf, cand, r, f, h):
        """Byte-compare each candidate of this chunk with its group's current head.

        ``chunk_ords``: the ordinal of each page of the chunk (sorted); ``buf``: the chunk's
        pages; ``cand``: positions in the chunk of the candidates; ``r``, ``f``, ``h``: rep, flags
        and hash64 of the chunk (``r`` is updated)."""
        ps = self.ps
        g = r[cand].astype(np.int64)
        ords = chunk_ords[cand]
        bad = (f[cand] & (VOLATILE | UNREADABLE)) != 0
        if bad.any():
            r[cand[bad]] = NONE
            lost = ords[bad & (ords == g)]
            if lost.size:   # a head changed or vanished: its next good member takes over
                self._set_heads({int(x): _PENDING for x in lost})
            keep = ~bad
            cand, g, ords = cand[keep], g[keep], ords[keep]
            if not cand.size:
                return
        cur = self._current_heads(g)
        pending = cur == _PENDING
        if pending.any():
            updates = {}
            for pos in np.flatnonzero(pending):
                gg = int(g[pos])
                if gg not in updates:
                    updates[gg] = int(ords[pos])
                cur[pos] = updates[gg]
            self._set_heads(updates)
        need = cur != ords
        here = np.flatnonzero(~need)
        if here.size:   # heads, including members just promoted to head
            r[cand[here]] = ords[here].astype(np.uint32)
            if self.cache_heads.size:
                hords = ords[here]
                slot = np.minimum(np.searchsorted(self.cache_heads, hords),
                                  self.cache_heads.size - 1)
                hit = self.cache_heads[slot] == hords
                if hit.any():
                    pages2d = buf.reshape(-1, ps)
                    self.cache[slot[hit]] = pages2d[cand[here[hit]]]
                    self.cache_valid[slot[hit]] = True
        idx = np.flatnonzero(need)
        if not idx.size:
            return
        equal = np.zeros(idx.size, dtype=bool)
        heads = cur[idx]
        members = cand[idx]
        # a head is never after its members, so it is in this chunk or an earlier one
        at = np.minimum(np.searchsorted(chunk_ords, heads), chunk_ords.size - 1)
        inside = chunk_ords[at] == heads
        if inside.any():
            equal[inside] = kernels.compare_pages(buf, members[inside], at[inside], page_size=ps)
        outside = np.flatnonzero(~inside)
        if outside.size:
            slot, hit = self._cache_lookup(heads[outside])
            if hit.any():
                which = outside[hit]
                equal[which] = kernels.compare_pages(buf, members[which], slot[hit],
                                                   b=self.cache_flat, page_size=ps)
                outside = outside[~hit]
        if outside.size:
            uniq, inv = np.unique(heads[outside], return_inverse=True)
            cap = self.heads.capacity
            for lo in range(0, uniq.size, cap):
                batch = uniq[lo:lo + cap]
                got = self.heads.fetch(batch)
                sel = (inv >= lo) & (inv < lo + batch.size)
                which = outside[sel]
                slots = inv[sel] - lo
                hb = self.heads.buffer[: batch.size * ps]
                equal[which] = kernels.compare_pages(buf, members[which], slots, b=hb,
                                                   page_size=ps) & got[slots]
        r[members[equal]] = heads[equal].astype(np.uint32)
        if not equal.all():
            miss = members[~equal]
            r[miss] = NONE
            self.leftovers.append((chunk_ords[miss], h[miss].copy()))

    def regroup_leftovers(self, max_rounds: int = 64) -> int:
        """Candidates that did not match their head: group them by full hash64 and compare again,
        round after round (each round confirms one content of a run), so pages whose hash bits
        collided still find their true twins. Returns the pages left unconfirmed."""
        if not self.leftovers:
            return 0
        ords = np.concatenate([a for a, _ in self.leftovers])
        hashes = np.concatenate([b for _, b in self.leftovers])
        self.leftovers = []
        unconfirmed = 0
        for pending in hash_runs(ords, hashes):
            rounds = 0
            while pending.size >= 2 and rounds < max_rounds:
                rounds += 1
                head, rest = pending[:1], pending[1:]
                if not self.heads.fetch(head)[0]:
                    pending = rest
                    continue
                eq = self._equal_to_head(rest)
                if eq.any():
                    self.rep[head] = np.uint32(head[0])
                    self.rep[rest[eq]] = np.uint32(head[0])
                else:
                    unconfirmed += 1
                pending = rest[~eq]
            unconfirmed += pending.size if pending.size >= 2 or rounds else 0
        return int(unconfirmed)

    def _equal_to_head(self, ords: np.ndarray) -> np.ndarray:
        """Pages (by ordinal) byte-equal to the page in head slot 0."""
        ps, cap = self.ps, self.reader.capacity
        hb = self.heads.buffer[:ps]
        eq = np.zeros(ords.size, dtype=bool)
        for lo in range(0, ords.size, cap):
            part = ords[lo:lo + cap]
            got = self.reader.fetch(part)
            eq[lo:lo + part.size] = kernels.compare_pages(
                self.reader.buffer[: part.size * ps], np.arange(part.size),
                np.zeros(part.size, np.int64), b=hb, page_size=ps) & got
        return eq
