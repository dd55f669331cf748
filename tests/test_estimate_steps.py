"""The estimator's pure steps on made-up arrays: the page sets, grouping by hash64, byte
confirmation with pages fetched from memory held here (no process, no /proc)."""
from __future__ import annotations

import numpy as np

from udedup.estimate.confirm import Confirmer
from udedup.estimate.group import group, hash_runs, head_sizes
from udedup.estimate.scope import NONE, VOLATILE, ZERO, PageSet
from udedup import pages

PS = pages.PAGE_SIZE


def test_pageset_runs_and_scattered_offsets_agree():
    runs = PageSet(np.arange(100, 200))
    scattered = PageSet(np.array([0, 2, 4, 9, 10, 11]))
    assert runs.offsets is None and runs.nbytes == 8       # one run: start and set position
    assert scattered.offsets is not None and scattered.nbytes == 6 * 4
    assert runs.pages(np.array([0, 50, 99])).tolist() == [100, 150, 199]
    assert runs.pages(slice(10, 13)).tolist() == [110, 111, 112]
    assert [a.tolist() for a in runs.runs(10, 20)] == [[110], [10]]
    assert scattered.pages(slice(2, 6)).tolist() == [4, 9, 10, 11]
    assert [a.tolist() for a in scattered.runs(1, 6)] == [[2, 4, 9], [1, 1, 3]]


def test_group_by_hash_bits_leaves_flagged_pages_out():
    big = np.uint64(1 << 40)           # the top bits decide: the low ones make room for ordinals
    keys = np.array([5, 9, 5, 5, 9, 7, 5], dtype=np.uint64) * big
    flags = np.zeros(7, dtype=np.uint8)
    flags[3] = ZERO                    # zero pages join no group
    rep = np.full(7, NONE, dtype=np.uint32)
    heads = group(keys, flags, rep, top_k=1)
    assert rep.tolist() == [0, 1, 0, int(NONE), 1, int(NONE), 0]   # heads: lowest ordinals
    assert heads.tolist() == [0]       # the largest group's head, for the head cache
    assert head_sizes(rep).tolist() == [3, 2, 0, 0, 0, 0, 0]
    assert group(np.empty(0, np.uint64), flags[:0], rep[:0], 4).size == 0


def test_hash_runs_sorts_each_run():
    runs = list(hash_runs(np.array([9, 3, 7, 1]), np.array([2, 1, 2, 1], dtype=np.uint64)))
    assert [r.tolist() for r in runs] == [[1, 3], [7, 9]]


class MemoryFetcher:
    """Pages by ordinal from an array held here, as passes.Fetcher reads them from a process."""

    def __init__(self, memory: np.ndarray, capacity: int = 4):
        self.memory = memory
        self.capacity = capacity
        self.buffer = np.zeros(capacity * PS, dtype=np.uint8)
        self.fetched: list = []

    def fetch(self, ords):
        ords = np.asarray(ords, dtype=np.int64)
        self.buffer.reshape(-1, PS)[:ords.size] = self.memory[ords]
        self.fetched += ords.tolist()
        return np.ones(ords.size, dtype=bool)


def _memory():
    """8 pages: content A at 0, 5, 6; B at 7 (a hash collision with A); others unique."""
    rng = np.random.default_rng(2)
    memory = rng.integers(0, 256, (8, PS), dtype=np.uint8)
    memory[[5, 6]] = memory[0]
    rep = np.full(8, NONE, dtype=np.uint32)
    rep[[0, 5, 6, 7]] = 0
    return memory, rep


def _last_pass(confirmer, memory, rep, flags):
    hashes = np.arange(8, dtype=np.uint64)
    for lo in (0, 4):                                  # two chunks of four pages
        r, f = rep[lo:lo + 4], flags[lo:lo + 4]
        cand = np.flatnonzero(r != NONE)
        if cand.size:
            confirmer.confirm(np.arange(lo, lo + 4), memory[lo:lo + 4].reshape(-1), cand, r, f,
                              hashes[lo:lo + 4])
    return confirmer.regroup_leftovers()


def test_confirm_compares_bytes_with_the_head_fetched_or_cached():
    for cached in (False, True):
        memory, rep = _memory()
        heads, reader = MemoryFetcher(memory), MemoryFetcher(memory)
        confirmer = Confirmer(rep, PS, np.zeros(8 * PS, dtype=np.uint8), heads, reader)
        if cached:
            confirmer.cache_groups(np.array([0]))
        unconfirmed = _last_pass(confirmer, memory, rep, np.zeros(8, dtype=np.uint8))
        assert rep[[0, 5, 6]].tolist() == [0, 0, 0] and rep[7] == NONE   # B is not A
        assert unconfirmed == 0                        # B alone: nothing to compare it with
        # the head lies in the first chunk: re-read for the second, unless the cache kept it
        assert heads.fetched == ([] if cached else [0])
        confirmer.close()


def test_a_volatile_head_hands_its_group_to_the_next_member():
    memory, rep = _memory()
    flags = np.zeros(8, dtype=np.uint8)
    flags[0] = VOLATILE
    confirmer = Confirmer(rep, PS, np.zeros(8 * PS, dtype=np.uint8), MemoryFetcher(memory),
                          MemoryFetcher(memory))
    _last_pass(confirmer, memory, rep, flags)
    assert rep[0] == NONE and rep[[5, 6]].tolist() == [5, 5] and rep[7] == NONE


def test_leftovers_find_their_twins_by_full_hash():
    """Members that did not match their head are regrouped by hash64 and compared again."""
    memory, rep = _memory()
    memory[[3, 7]] = memory[1]                       # B twice, both in A's candidate group
    rep[[3, 7]] = 0
    hashes = np.zeros(8, dtype=np.uint64)
    hashes[[3, 7]] = 42
    reader = MemoryFetcher(memory)
    confirmer = Confirmer(rep, PS, np.zeros(8 * PS, dtype=np.uint8), MemoryFetcher(memory), reader)
    for lo in (0, 4):
        r = rep[lo:lo + 4]
        cand = np.flatnonzero(r != NONE)
        confirmer.confirm(np.arange(lo, lo + 4), memory[lo:lo + 4].reshape(-1), cand, r,
                          np.zeros(4, dtype=np.uint8), hashes[lo:lo + 4])
    assert confirmer.regroup_leftovers() == 0
    assert rep[[0, 5, 6]].tolist() == [0, 0, 0] and rep[[3, 7]].tolist() == [3, 3]
