"""The estimator without ksmd: exact page classification, byte confirmation, errors, partial scans.

Accuracy against the real kernel is in test_estimate_kernel.py.
"""
from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from udedup.errors import KernelThreadError, ProcessNotFoundError, UsageError
from udedup.estimate import RMAP_ITEM_BYTES, estimate, ksm_pages
from udedup.host.maps import read_mappings
from udedup.host.pagemap import present_pages, zero_page_pfns
from udedup import pages

PS = pages.PAGE_SIZE
HERE = os.path.dirname(os.path.abspath(__file__))


class Buffer:
    """Private anonymous pages, optionally MADV_MERGEABLE, never THP."""

    def __init__(self, npages, register=True):
        self.mm = mmap.mmap(-1, npages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mm.madvise(mmap.MADV_NOHUGEPAGE)
        if register:
            self.mm.madvise(mmap.MADV_MERGEABLE)
        self.pages = np.frombuffer(self.mm, dtype=np.uint8).reshape(npages, PS)
        self.address = int(self.pages.ctypes.data)
        self.nbytes = npages * PS

    def close(self):
        self.pages = None
        self.mm.close()


@pytest.fixture
def buffers():
    made = []

    def make(npages, register=True):
        b = Buffer(npages, register)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def _content(i):
    return np.random.default_rng([7, i]).integers(0, 256, PS, dtype=np.uint8)


def _layout(buf, zero, groups, unique, absent=0, readzero=0, seed=0):
    """Fill: zero pages, groups of given sizes (shuffled), unique pages, absent, read-only."""
    p = buf.pages
    rng = np.random.default_rng(seed)
    at = 0
    p[at:at + zero] = 1
    p[at:at + zero] = 0
    at += zero
    labels = np.repeat(np.arange(len(groups)), groups)
    labels = labels[rng.permutation(labels.size)]
    for k, lab in enumerate(labels):
        p[at + k] = _content(int(lab))
    at += labels.size
    p[at:at + unique] = rng.integers(0, 256, (unique, PS), dtype=np.uint8)
    at += unique + absent
    int(p[at:at + readzero, 0].sum())
    return at + readzero


def test_ksm_pages_model_matches_the_kernel_accounting():
    # measured on 6.18 with max_page_sharing=16 (see the accuracy tests)
    assert ksm_pages([2], 16) == (1, 1, 0)
    assert ksm_pages([16], 16) == (1, 15, 0)
    assert ksm_pages([17], 16) == (1, 15, 1)      # a leftover single page stays unshared
    assert ksm_pages([18], 16) == (2, 16, 0)
    assert ksm_pages([33, 40], 16) == (5, 67, 1)
    assert ksm_pages([262144], 256) == (1024, 261120, 0)   # KSM.md: 1 GiB of one page
    assert ksm_pages([], 256) == (0, 0, 0)


# Buffers with zero pages stay unregistered (scanned with all_eligible): a ksmd that another test
# runs meanwhile with use_zero_pages=1 would otherwise turn them into zero-page mappings.
def test_exact_classification_and_predictions(buffers):
    groups = [2, 3, 15, 16, 17, 18, 33, 40]
    buf = buffers(100 + sum(groups) + 50 + 20 + 10, register=False)
    _layout(buf, zero=100, groups=groups, unique=50, absent=20, readzero=10)
    before = buf.pages.copy()
    est = estimate(buf, interval=0, max_page_sharing=16, all_eligible=True)
    assert np.array_equal(before, buf.pages)          # nothing written
    assert est.pages_scanned == 100 + sum(groups) + 50 + (0 if zero_page_pfns() else 10)
    assert est.zero_pages == 100 + (0 if zero_page_pfns() else 10)
    assert est.duplicate_pages == sum(groups) and est.duplicate_groups == len(groups)
    assert est.largest_group == 40 and sorted(est.group_sizes.tolist()) == groups
    assert est.unique_pages == 50 and est.volatile_pages == 0 and not est.partial
    p0, p1 = est.predicted(False), est.predicted(True)
    shared, sharing, unshared = ksm_pages(groups, 16)
    assert (p0.pages_shared, p0.pages_sharing) == (shared + 7, sharing + 93)  # 100 zero pages
    assert (p1.pages_shared, p1.pages_sharing, p1.ksm_zero_pages) == (shared, sharing,
                                                                      est.zero_pages)
    assert p0.rmap_items == est.pages_scanned and p1.rmap_items == est.pages_scanned - \
        est.zero_pages
    assert p1.general_profit == (sharing + est.zero_pages) * PS - p1.rmap_items * RMAP_ITEM_BYTES
    assert p1.saved_bytes == p1.general_profit
    assert 0 < p0.saved_percent < 100
    assert est.bytes_per_page <= 24
    d = est.as_dict()
    assert {"pages_scanned", "zero_pages", "duplicate_pages", "volatile_pages"} <= d.keys()
    assert [p["use_zero_pages"] for p in d["predictions"]] == [0, 1]
    json.dumps(d)


def test_absent_pages_are_not_faulted_in(buffers):
    buf = buffers(64)
    buf.pages[:8] = 3
    estimate(buf, interval=0)
    present = present_pages(os.getpid(), buf.address, buf.address + buf.nbytes)
    assert present.size == 8


def test_zero_is_a_byte_check(buffers):
    buf = buffers(6, register=False)
    buf.pages[:] = 1
    buf.pages[:] = 0
    buf.pages[1, PS - 1] = 1     # zero but for its last byte
    buf.pages[2, 0] = 1
    est = estimate(buf, interval=0, all_eligible=True)
    assert est.zero_pages == 4
    assert est.unique_pages == 2   # pages 1 and 2 differ from each other and from zero


def test_each_page_counts_once(buffers):
    buf = buffers(8)
    buf.pages[:] = 4
    views = [buf.pages[:6], buf.pages[4:], buf.mm]     # overlapping views of one buffer
    est = estimate(views, interval=0)
    assert len(est.targets) == 1 and est.pages_scanned == 8 and est.largest_group == 8


def test_scope_registered_by_default_all_eligible_on_request(buffers):
    reg, plain = buffers(8), buffers(8, register=False)
    reg.pages[:] = 5
    plain.pages[:] = 5
    est = estimate([reg, plain], interval=0)
    assert est.pages_scanned == 8 and est.duplicate_pages == 8
    est = estimate([reg, plain], interval=0, all_eligible=True)
    assert est.pages_scanned == 16 and est.duplicate_pages == 16 and est.duplicate_groups == 1
    assert {t.scanned_pages for t in est.targets} == {8}
    assert est.predicted(False).pages_sharing == 15


def test_hash_matches_alone_never_count(buffers, monkeypatch):
    """With a hash that collides for different contents, groups come only from byte compares."""
    real = pages.scan_pages

    def coarse(buf, page_size=None, crc_out=None, hash_out=None, zero_out=None):
        res = real(buf, page_size, crc_out, hash_out, zero_out)
        res.hash[:] = res.hash % np.uint64(3)    # three buckets for every content there is
        return res
    monkeypatch.setattr(pages, "scan_pages", coarse)
    groups = [2, 5, 9, 3, 4]
    buf = buffers(sum(groups) + 40)
    _layout(buf, zero=0, groups=groups, unique=40, seed=3)
    est = estimate(buf, interval=0, max_page_sharing=4)
    assert sorted(est.group_sizes.tolist()) == sorted(groups)
    assert est.duplicate_pages == sum(groups) and est.unique_pages == 40
    assert est.predicted(False).pages_sharing == ksm_pages(groups, 4)[1]


def test_all_unique_with_identical_hashes_has_no_duplicates(buffers, monkeypatch):
    real = pages.scan_pages

    def constant(buf, page_size=None, crc_out=None, hash_out=None, zero_out=None):
        res = real(buf, page_size, crc_out, hash_out, zero_out)
        res.hash[:] = 12345
        return res
    monkeypatch.setattr(pages, "scan_pages", constant)
    buf = buffers(30)
    buf.pages[:] = np.random.default_rng(1).integers(0, 256, (30, PS), dtype=np.uint8)
    est = estimate(buf, interval=0)
    assert est.duplicate_pages == 0 and est.unique_pages == 30
    assert est.predicted(True).pages_sharing == 0


def test_volatile_pages_are_excluded(buffers):
    buf = buffers(48)
    buf.pages[:] = 9                       # one content everywhere
    stop = threading.Event()
    hot = buf.pages[:16]

    def churn():
        while not stop.is_set():
            hot[:, 100] += 1
            time.sleep(0.0005)
    t = threading.Thread(target=churn)
    t.start()
    try:
        est = estimate(buf, interval=0.05, passes=3)
    finally:
        stop.set()
        t.join()
    assert est.volatile_pages == 16
    assert est.duplicate_pages == 32 and est.largest_group == 32
    assert est.predicted(False).rmap_items == 48


def test_many_chunks_heads_in_earlier_chunks_and_cache_off(buffers):
    """Small buffers force heads to be re-read from earlier chunks; results must not change."""
    groups = [2] * 40 + [7] * 10 + [100]
    buf = buffers(sum(groups) + 60)
    _layout(buf, zero=0, groups=groups, unique=60, seed=5)
    want = sorted(groups)
    for kwargs in ({}, {"buffer_bytes": 8 * PS, "cache_bytes": 8 * PS},
                   {"buffer_bytes": 8 * PS, "cache_bytes": 0, "threads": 1}):
        est = estimate(buf, interval=0, **kwargs)
        assert sorted(est.group_sizes.tolist()) == want, kwargs
        assert est.unique_pages == 60


@pytest.fixture
def children(estimate_children):
    return estimate_children


def test_processes_merge_across_each_other(children):
    shared = {"kind": "dup", "pages": 64, "contents": 8, "seed": 11}
    _, a = children([shared, {"kind": "unique", "pages": 20}])
    _, b = children([shared, {"kind": "unique", "pages": 30}])
    est = estimate([a["pid"], b["pid"], a["pid"]], interval=0, max_page_sharing=256)
    assert [t.pid for t in est.targets] == [a["pid"], b["pid"]]
    assert est.pages_scanned == 84 + 94 and est.zero_pages == 0 and est.unique_pages == 50
    assert est.duplicate_groups == 8 and est.largest_group == 16
    by_pid = {t.pid: t for t in est.targets}
    assert by_pid[a["pid"]].duplicate_pages == 64 and by_pid[b["pid"]].duplicate_pages == 64
    # each process gets half of every group's saving (8 groups of 16 pages: 15 saved each)
    assert by_pid[a["pid"]].saved_pages[1] == by_pid[b["pid"]].saved_pages[1] == \
        pytest.approx(60.0)
    assert est.top_processes(2)[0].saved_pages[0] == pytest.approx(60.0)
    top = est.top_mappings(1, use_zero_pages=True)[0]
    assert top.pid in (a["pid"], b["pid"]) and top.saved_pages[1] >= 60


def kill_in_pass_2(proc):
    """(killed, progress): a progress callback that kills ``proc`` when pass 2 starts; ``killed``
    gets the page count done then."""
    killed = []

    def progress(pass_no, passes, done, total):
        if pass_no == 2 and not killed:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed.append(done)
    return killed, progress


def test_process_exiting_mid_scan_gives_a_partial_result(children):
    proc, info = children([{"kind": "dup", "pages": 512, "contents": 4}])
    _, other = children([{"kind": "dup", "pages": 64, "contents": 4}])
    killed, progress = kill_in_pass_2(proc)
    est = estimate([info["pid"], other["pid"]], interval=0, buffer_bytes=16 * PS,
                   progress=progress, threads=1)
    assert killed and est.partial
    assert any(f"PID {info['pid']} exited during pass 2" in n for n in est.notes)
    gone = next(t for t in est.targets if t.pid == info["pid"])
    assert gone.exited and gone.unreadable_pages == 512
    assert est.duplicate_pages == 64 and est.predicted(False).rmap_items == 64


def test_errors():
    with pytest.raises(UsageError):
        estimate([])
    with pytest.raises(UsageError, match="passes"):
        estimate(os.getpid(), passes=1)
    with pytest.raises(UsageError, match="interval"):
        estimate(os.getpid(), interval=-1)
    with pytest.raises(UsageError, match="max_page_sharing"):
        estimate(os.getpid(), max_page_sharing=1)
    with pytest.raises(ProcessNotFoundError):
        estimate(999_999_999)
    with pytest.raises(UsageError, match="buffer"):
        estimate(object())
    with open("/proc/2/comm") as f:
        if f.read().strip() == "kthreadd":
            with pytest.raises(KernelThreadError):
                estimate(2)


def test_nothing_registered_says_so(buffers):
    buf = buffers(4, register=False)
    buf.pages[:] = 1
    est = estimate(buf, interval=0)
    assert est.pages_scanned == 0 and est.predicted(True).general_profit == 0
    assert any("--all-eligible" in n for n in est.notes)


def test_bench_script_runs_without_ksm():
    script = os.path.join(os.path.dirname(HERE), "scripts", "bench_estimate.py")
    r = subprocess.run([sys.executable, script, "--size", "4M", "--no-ksm", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["pages"] == (4 << 20) // PS
    # pages a running ksmd already mapped to the zero page are left out of the scan
    assert out["estimate"]["pages_scanned"] + out["estimate"]["zero_mapped_pages"] == out["pages"]
    assert out["ratios"]["read_scan_vs_plain_read"] > 0
    assert out["estimate"]["index_bytes_per_page"] <= 24


# --- recheck="candidates" -----------------------------------------------------------------------
def _prediction_fields(p):
    return (p.pages_shared, p.pages_sharing, p.ksm_zero_pages, p.rmap_items, p.saved_pages,
            p.general_profit)


def test_recheck_candidates_predicts_the_same_and_reads_less(children, buffers):
    # Registered memory only (no all_eligible, which would scan the children's whole heap), so
    # no zero pages here: a ksmd run meanwhile by another test with use_zero_pages=1 could turn
    # them into zero-page mappings between the two estimates. Zero pages: the next test.
    # Content c of seed 7 in the children is _content(c) here: groups span processes and buffer.
    _, a = children([{"kind": "dup", "pages": 32, "contents": 4, "seed": 7},
                     {"kind": "unique", "pages": 20}, {"kind": "volatile", "pages": 16}])
    _, b = children([{"kind": "dup", "pages": 32, "contents": 4, "seed": 7},
                     {"kind": "dup", "pages": 12, "contents": 3, "seed": 5},
                     {"kind": "unique", "pages": 30}])
    _, c = children([{"kind": "unique", "pages": 12}])
    buf = buffers(25)
    p = buf.pages
    p[0:6] = _content(100)                      # a group of this buffer alone
    p[12:22] = np.random.default_rng(3).integers(0, 256, (10, PS), dtype=np.uint8)
    p[22:25] = _content(0)                      # joins a group of both children
    vol = p[6:12]

    def run(recheck):
        vol[:] = _content(101)                  # a group in pass 1 ...
        done_once = []

        def progress(pass_no, passes, done, total):
            if pass_no == 1 and done == total and not done_once:
                done_once.append(done)          # ... rewritten page by page before pass 2
                vol[:] = np.random.default_rng(1).integers(0, 256, (6, PS), dtype=np.uint8)
        est = estimate([a["pid"], b["pid"], c["pid"], buf], interval=0.2,
                       max_page_sharing=256, recheck=recheck, progress=progress)
        assert done_once
        return est

    full, cand = run("all"), run("candidates")
    del p, vol
    assert (full.recheck, cand.recheck) == ("all", "candidates")
    assert cand.as_dict()["recheck"] == "candidates"
    for est in (full, cand):
        assert sorted(est.group_sizes.tolist()) == [4, 4, 4, 6, 16, 16, 16, 19]
        assert est.duplicate_pages == 32 + 44 + 6 + 3 and est.zero_pages == 0
    for uzp in (False, True):
        assert _prediction_fields(full.predicted(uzp)) == _prediction_fields(cand.predicted(uzp))
    for t_full, t_cand in zip(full.targets, cand.targets):
        assert t_full.saved_pages == t_cand.saved_pages
        assert t_full.saving_ranges == t_cand.saving_ranges
        assert t_full.range_pages == t_cand.range_pages
    assert [m.saved_pages for m in full.mappings] == [m.saved_pages for m in cand.mappings]
    # volatile: the rewritten group in both; the churning unique pages only where re-read
    assert cand.volatile_pages == 6
    assert full.volatile_pages > 6
    missed = full.volatile_pages - cand.volatile_pages
    assert cand.unique_pages == full.unique_pages + missed
    assert cand.predicted(True).pages_unshared == full.predicted(True).pages_unshared + missed
    # pass 2 re-reads the candidates of pass 1 only (heads re-read as often in both)
    head_reads = full.bytes_read - 2 * full.pages_scanned * PS
    assert cand.bytes_read == (cand.pages_scanned + cand.duplicate_pages + 6) * PS + head_reads
    assert cand.bytes_read < full.bytes_read
    # saving ranges of processes with known layout; one with nothing to save gets none
    by_pid = {t.pid: t for t in cand.targets}
    assert by_pid[a["pid"]].saving_ranges == [(a["start"], a["start"] + 32 * PS)]
    assert by_pid[a["pid"]].range_pages == 32
    assert by_pid[b["pid"]].saving_ranges == [(b["start"], b["start"] + 44 * PS)]
    assert by_pid[c["pid"]].saving_ranges == [] and by_pid[c["pid"]].range_pages == 0
    mine = cand.targets[-1]
    assert mine.kind == "buffer" and mine.saving_ranges == [(buf.address, buf.address + 25 * PS)]
    assert mine.range_pages == 25 and mine.uncovered_pages == 0


def test_recheck_candidates_with_zero_pages(buffers):
    """Zero pages are re-read too: a zero page written between passes leaves the prediction."""
    groups = [3, 5, 9]
    buf = buffers(40 + sum(groups) + 30, register=False)
    _layout(buf, zero=40, groups=groups, unique=30, seed=2)
    p = buf.pages

    def run(recheck):
        p[:40] = 0
        done_once = []

        def progress(pass_no, passes, done, total):
            if pass_no == 1 and done == total and not done_once:
                done_once.append(done)
                p[:4, 7] = 1                     # four zero pages change
                p[-2:, 7] += 1                   # and two unique ones
        return estimate(buf, interval=0, all_eligible=True, max_page_sharing=16,
                        recheck=recheck, progress=progress)

    full, cand = run("all"), run("candidates")
    del p
    for est in (full, cand):
        assert est.zero_pages == 36 and sorted(est.group_sizes.tolist()) == groups
    for uzp in (False, True):
        assert _prediction_fields(full.predicted(uzp)) == _prediction_fields(cand.predicted(uzp))
    assert (full.volatile_pages, cand.volatile_pages) == (6, 4)
    assert cand.bytes_read == full.bytes_read - 30 * PS
    assert full.targets[0].saving_ranges == cand.targets[0].saving_ranges == \
        [(buf.address + 4 * PS, buf.address + (40 + sum(groups)) * PS)]


def test_recheck_candidates_notices_an_exit_without_reading(children):
    """A process with no candidate is not read after pass 1: its exit must still be noticed."""
    proc, info = children([{"kind": "unique", "pages": 64}])
    _, other = children([{"kind": "dup", "pages": 64, "contents": 4}])
    killed, progress = kill_in_pass_2(proc)
    est = estimate([info["pid"], other["pid"]], interval=0, recheck="candidates",
                   progress=progress)
    assert killed and est.partial
    assert any(f"PID {info['pid']} exited during pass 2" in n for n in est.notes)
    gone = next(t for t in est.targets if t.pid == info["pid"])
    assert gone.exited and gone.unreadable_pages == 64 and gone.saving_ranges == []
    assert est.predicted(False).rmap_items == 64 and est.duplicate_pages == 64


@pytest.mark.parametrize("kwargs", [{"threads": 1}, {"buffer_bytes": 8 * PS, "cache_bytes": 0},
                                    {"buffer_bytes": 8 * PS, "cache_bytes": 8 * PS}])
def test_recheck_candidates_across_many_sparse_chunks(buffers, kwargs):
    """Candidates scattered over many chunks: heads in earlier chunks, cached or re-read."""
    groups = [2] * 40 + [7] * 10 + [100]
    buf = buffers(sum(groups) + 300)
    _layout(buf, zero=0, groups=groups, unique=300, seed=5)
    order = np.random.default_rng(9).permutation(buf.pages.shape[0])
    buf.pages[:] = buf.pages[order]               # unique pages between the candidates
    full = estimate(buf, interval=0, **kwargs)
    cand = estimate(buf, interval=0, recheck="candidates", **kwargs)
    assert sorted(cand.group_sizes.tolist()) == sorted(groups)
    assert cand.unique_pages == full.unique_pages == 300
    assert cand.targets[0].saving_ranges == full.targets[0].saving_ranges
    assert _prediction_fields(cand.predicted(True)) == _prediction_fields(full.predicted(True))
    assert cand.bytes_read < full.bytes_read


# --- saving ranges --------------------------------------------------------------------------------
def _page_ranges(buf, est):
    return [((a - buf.address) // PS, (b - buf.address) // PS)
            for a, b in est.targets[0].saving_ranges]


def test_saving_ranges_follow_the_layout(buffers):
    buf = buffers(40, register=False)
    p = buf.pages
    p[:] = np.random.default_rng(4).integers(0, 256, (40, PS), dtype=np.uint8)  # unique
    p[0:8] = 0
    p[12:20] = _content(1)
    p[22:26] = _content(1)
    p[32:36] = _content(2)
    p[36:38] = 0
    buf.mm.madvise(mmap.MADV_DONTNEED, 21 * PS, PS)        # page 21 not present
    gap = 3 * PS    # gaps: 4 pages (8-12), 2 (20-22, one absent), 6 (26-32)
    want = {
        (gap, 64): ([(0, 8), (12, 26), (32, 38)], 8 + 13 + 6),
        (gap, 2): ([(0, 26), (32, 38)], 25 + 6),       # the smallest gap joined
        (gap, 1): ([(0, 38)], 37),
        (0, 64): ([(0, 8), (12, 20), (22, 26), (32, 38)], 8 + 8 + 4 + 6),
        (5 * PS, 3): ([(0, 26), (32, 38)], 31),        # fewer than max_ranges: no forced split
        (7 * PS, 64): ([(0, 38)], 37),
    }
    for (range_gap, max_ranges), (ranges, resident) in want.items():
        est = estimate(buf, interval=0, all_eligible=True, range_gap=range_gap,
                       max_ranges=max_ranges)
        assert _page_ranges(buf, est) == ranges, (range_gap, max_ranges)
        assert est.targets[0].range_pages == resident, (range_gap, max_ranges)
        assert est.targets[0].uncovered_pages == 0
    est = estimate(buf, interval=0, all_eligible=True)          # default: 2 MiB
    assert _page_ranges(buf, est) == [(0, 38)] and est.targets[0].range_pages == 37
    d = est.as_dict()["targets"][0]
    assert d["saving_ranges"] == [[hex(buf.address), hex(buf.address + 38 * PS)]]
    assert d["range_pages"] == 37
    json.dumps(d)


def test_saving_ranges_never_cross_a_mapping(buffers):
    buf = buffers(16, register=False)
    buf.pages[:] = 6                             # one group over two mappings
    buf.mm.madvise(mmap.MADV_DONTDUMP, 6 * PS, 10 * PS)    # splits the VMA at page 6
    maps = [m for m in read_mappings(os.getpid())
            if m.start < buf.address + buf.nbytes and m.end > buf.address]
    assert len(maps) == 2
    est = estimate(buf, interval=0, all_eligible=True, range_gap=1 << 30)
    assert _page_ranges(buf, est) == [(0, 6), (6, 16)]
    assert est.targets[0].range_pages == 16 and est.largest_group == 16
    # one range allowed: the mapping saving most keeps it, the rest is reported uncovered
    est = estimate(buf, interval=0, all_eligible=True, max_ranges=1)
    t = est.targets[0]
    assert _page_ranges(buf, est) == [(6, 16)] and t.range_pages == 10 and t.uncovered_pages == 6
    assert any("max_ranges=1" in n for n in est.notes)


def test_volatile_and_unique_pages_are_outside_the_ranges(buffers):
    buf = buffers(24)
    buf.pages[:] = np.random.default_rng(8).integers(0, 256, (24, PS), dtype=np.uint8)
    buf.pages[:4] = 9
    buf.pages[20:24] = 9
    hot = buf.pages[20:24]

    def progress(pass_no, passes, done, total):
        if pass_no == 1 and done == total:
            hot[:, 0] += 1                       # volatile: the group's tail drops out
    est = estimate(buf, interval=0, range_gap=0, progress=progress, recheck="candidates")
    assert _page_ranges(buf, est) == [(0, 4)] and est.targets[0].range_pages == 4
    assert est.volatile_pages == 4 and est.duplicate_pages == 4


def test_recheck_and_range_errors():
    for kwargs, word in (({"recheck": "some"}, "recheck"), ({"recheck": None}, "recheck"),
                         ({"range_gap": -1}, "range_gap"), ({"range_gap": 1.5}, "range_gap"),
                         ({"max_ranges": 0}, "max_ranges"), ({"max_ranges": 1 << 20}, "max_ranges"),
                         ({"max_ranges": True}, "max_ranges")):
        with pytest.raises(UsageError, match=word) as info:
            estimate(os.getpid(), **kwargs)
        assert "\n" not in str(info.value)
