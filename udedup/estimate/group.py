"""Grouping by hash64, pure numpy: candidate groups of possibly identical pages. Nothing is
declared equal here: :mod:`.confirm` compares every candidate's bytes with its group head.
"""
from __future__ import annotations

import numpy as np

from .scope import NONE, STEP

_NO_GROUP = np.uint64(2 ** 64 - 1)   # sort key of a page in no group: after every real key


class TopRuns:
    """The heads of the ``k`` longest runs seen, in O(k) memory."""

    def __init__(self, k: int):
        self.k = k
        self.lengths = np.empty(0, dtype=np.int64)
        self._heads = np.empty(0, dtype=np.int64)

    def add(self, lengths, heads):
        if not len(lengths):
            return
        self.lengths = np.concatenate((self.lengths, np.asarray(lengths, dtype=np.int64)))
        self._heads = np.concatenate((self._heads, np.asarray(heads, dtype=np.int64)))
        if self.lengths.size > 4 * self.k:
            self._prune()

    def _prune(self):
        if self.lengths.size > self.k:
            keep = np.argpartition(-self.lengths, self.k - 1)[: self.k]
            self.lengths, self._heads = self.lengths[keep], self._heads[keep]

    def heads(self) -> np.ndarray:
        self._prune()
        return self._heads


def group(keys: np.ndarray, flags: np.ndarray, rep: np.ndarray, top_k: int) -> np.ndarray:
    """Turn the hash array ``keys`` (uint64, one per ordinal), in place, into sorted
    (hash bits | ordinal) keys; set ``rep`` of every member of a candidate group to its head.
    Pages with any flag (zero, unreadable) join no group. Returns the heads of the ``top_k``
    largest groups, sorted (for the head cache).

    Keys sort by hash bits, then ordinal, so a run of equal hash bits is a candidate group and
    its first key holds its lowest ordinal: the head, which the last pass meets first. Afterwards
    ``keys`` maps back to nothing: the caller drops it."""
    n = keys.size
    if n == 0:
        return np.empty(0, dtype=np.int64)
    obits = max(1, int(n).bit_length())
    shift = np.uint64(obits)
    for lo in range(0, n, STEP):
        hi = min(n, lo + STEP)
        k = keys[lo:hi]
        k >>= shift
        k <<= shift
        k |= np.arange(lo, hi, dtype=np.uint64)
        k[flags[lo:hi] != 0] = _NO_GROUP
    keys.sort()
    valid = int(np.searchsorted(keys, _NO_GROUP))
    mask = np.uint64((1 << obits) - 1)
    top = TopRuns(top_k)
    carry_prefix, carry_head, carry_count = None, 0, 0
    for lo in range(0, valid, STEP):
        k = keys[lo:min(valid, lo + STEP)]
        pre = k >> shift
        ords = (k & mask).astype(np.uint32)
        m = k.size
        new = np.empty(m, dtype=bool)
        new[0] = carry_count == 0 or pre[0] != carry_prefix
        np.not_equal(pre[1:], pre[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        s0 = int(starts[0]) if starts.size else m
        if s0:   # the run carried over from the previous piece continues
            if carry_count == 1:
                rep[carry_head] = carry_head
            rep[ords[:s0]] = carry_head
            carry_count += s0
        if not starts.size:
            continue
        if carry_count >= 2:
            top.add(np.array([carry_count]), np.array([carry_head]))
        ends = np.append(starts[1:], m)
        lengths = ends - starts
        inner = lengths[:-1]
        if inner.size:
            heads = ords[starts[:-1]]
            sel = np.repeat(inner >= 2, inner)
            head_of = np.repeat(heads, inner)
            rep[ords[s0: starts[-1]][sel]] = head_of[sel]
            big = inner >= 2
            top.add(inner[big], heads[big])
        last = int(starts[-1])
        carry_prefix, carry_head, carry_count = pre[last], int(ords[last]), m - last
        if carry_count >= 2:
            rep[ords[last:]] = carry_head
    if carry_count >= 2:
        top.add(np.array([carry_count]), np.array([carry_head]))
    return np.sort(top.heads()).astype(np.int64)


def hash_runs(ords: np.ndarray, hashes: np.ndarray):
    """The ordinals of each run of equal full hash64, each sorted (lowest first), one array per
    distinct hash: the candidates to compare again after their first head did not match."""
    order = np.argsort(hashes, kind="stable")
    ords, hashes = ords[order], hashes[order]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    ends = np.r_[starts[1:], hashes.size]
    for s, e in zip(starts, ends):
        yield np.sort(ords[s:e])


def head_sizes(rep: np.ndarray) -> np.ndarray:
    """Pages per head (0 for an ordinal that heads no group), from the confirmed ``rep``."""
    if not rep.size:
        return np.zeros(0, np.int64)
    return np.bincount(rep[rep != NONE], minlength=rep.size)
