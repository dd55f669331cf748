"""The THP model (udedup.estimate.thp) on made-up THPs, the THP runs found from kpageflags, the
prediction built from them, and (root, THP madvise) an estimate of a THP-backed buffer; marked ksm:
the prediction against what ksmd then does."""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from udedup.estimate.model import Estimate, ThpSummary
from udedup.estimate.passes import thp_runs
from udedup.estimate.thp import ThpLayout, counters, per_thp_sum, thp_outcome
from udedup.host.pagemap import KPF_COMPOUND_HEAD, KPF_THP

PS = 4096
SUB = 512


def layout(n, **kw):
    return ThpLayout(np.arange(n, dtype=np.int64) * SUB, np.full(n, SUB, dtype=np.int64), **kw)


def test_split_only_where_a_merge_is_tried():
    lay = layout(4)
    # all zero / dup + zero / unique + zero / unique only
    zero = [512, 256, 256, 0]
    twin = [0, 256, 0, 0]
    for uzp in (0, 1):
        o = thp_outcome(lay, zero, twin, uzp, zero_total=1024)
        assert o.split.tolist() == [True, True, True, False]
        assert o.handed_back.tolist() == [512, 256, 256, 0]
        assert (o.thps_split, o.thps_whole, o.zero_pages_handed_back) == (3, 1, 1024)


def test_lone_zero_page_merges_only_with_use_zero_pages():
    lay = layout(1)
    assert not thp_outcome(lay, [1], [0], False, zero_total=1).split[0]
    assert thp_outcome(lay, [1], [0], True, zero_total=1).split[0]
    assert thp_outcome(lay, [1], [0], False, zero_total=2).split[0]


def test_failed_split_and_mlocked():
    lay = layout(3, locked=[False, True, False], fails=[False, False, True])
    o = thp_outcome(lay, [10, 10, 10], [0, 0, 0], True, zero_total=30)
    assert o.split.tolist() == [True, True, False]
    assert o.failed.tolist() == [False, False, True]
    assert o.handed_back.tolist() == [10, 0, 0]     # mlocked: split, nothing handed back


def test_per_thp_sum():
    lay = ThpLayout(np.array([0, 5]), np.array([3, 2]))
    mask = np.array([1, 0, 1, 1, 1, 1, 0, 0], dtype=bool)
    assert per_thp_sum(lay, mask).tolist() == [2, 1]


def test_counters_match_the_measured_probe():
    # scripts/thp_ksm_probe.py, 9 kinds x 8 THPs (measured on 6.18, both use_zero_pages values):
    # pages_shared 777, pages_sharing 5391, pages_unshared 18657, ksm_zero_pages 0, rmap 28664
    groups = [8] * 256 + [8] * 512 + [8] + [2] * 8 + [8] * 256      # the last 256: pinned THPs
    frozen = [0] * (256 + 512 + 1 + 8) + [8] * 256
    sizes = np.array(groups) - np.array(frozen)
    for uzp in (0, 1):
        c = counters(sizes, frozen, zero_small=0, zero_frozen=2048, unique=18400,
                     readable=36864, handed_back=8200, use_zero_pages=uzp, max_page_sharing=256)
        assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.ksm_zero_pages,
                c.rmap_items) == (777, 5391, 18657, 0, 28664)


def test_counters_without_thp_are_the_old_model():
    sizes = np.array([2, 3, 600])
    c0 = counters(sizes, [], 100, 0, 50, 1000, 0, False, 256)
    assert (c0.pages_shared, c0.pages_sharing, c0.pages_unshared) == (2 + 3 + 1, 1 + 2 + 597 + 99,
                                                                      50)
    c1 = counters(sizes, [], 100, 0, 50, 1000, 0, True, 256)
    assert (c1.ksm_zero_pages, c1.rmap_items) == (100, 900)


def _flags(thp, head):
    return (np.asarray(thp, dtype=np.uint64) << np.uint64(KPF_THP)) | \
        (np.asarray(head, dtype=np.uint64) << np.uint64(KPF_COMPOUND_HEAD))


def test_thp_runs_from_kpageflags():
    # a THP (4 subpages shown), a small page, a THP cut by a missing page, two THPs back to back
    off = np.array([0, 1, 2, 3, 4, 8, 9, 11, 12, 13, 14, 15])
    pfn = np.array([100, 101, 102, 103, 7, 200, 201, 203, 300, 301, 400, 401])
    thp = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    head = [1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0]
    assert thp_runs(off, pfn, _flags(thp, head)) == [(0, 4), (5, 2), (7, 1), (8, 2), (10, 2)]
    assert thp_runs(off, pfn, _flags([0] * 12, [0] * 12)) == []


def _estimate(zero, dup_groups, unique, thp=None):
    est = Estimate(page_size=PS, passes=2, interval=0.0, all_eligible=True, max_page_sharing=256,
                   current_use_zero_pages=False, targets=[], mappings=[])
    est.group_sizes = np.array(dup_groups, dtype=np.int64)
    est.zero_pages, est.unique_pages = zero, unique
    est.duplicate_pages = int(sum(dup_groups))
    est.pages_scanned = zero + unique + est.duplicate_pages
    est.thp = thp
    return est


def test_prediction_counts_handed_back_zero_pages():
    lay = layout(2)
    outs = {k: thp_outcome(lay, [512, 0], [0, 0], bool(k), 512) for k in (0, 1)}
    est = _estimate(zero=512, dup_groups=[], unique=512,
                    thp=ThpSummary(True, 2, 1024, outs))
    for k in (0, 1):
        p = est.predicted(bool(k))
        assert (p.pages_shared, p.pages_sharing, p.ksm_zero_pages) == (0, 0, 0)
        assert p.thp_zero_pages == 512 and p.real_saved_pages == 512
        assert p.rmap_items == 512
        assert p.saved_bytes == p.general_profit + 512 * PS
        assert p.real_saved_bytes == 512 * PS
        d = p.as_dict()
        assert d["predicted"] is True and d["thps_split"] == 1 and d["huge_pages_lost"] == 1
    assert est.as_dict()["thp"]["predicted"]["0"]["zero_pages_handed_back"] == 512


def test_prediction_without_thp_unchanged():
    est = _estimate(zero=10, dup_groups=[3], unique=5)
    p0, p1 = est.predicted(False), est.predicted(True)
    assert (p0.pages_shared, p0.pages_sharing, p0.thp_zero_pages) == (2, 11, 0)
    assert p1.ksm_zero_pages == 10 and p1.saved_bytes == p1.general_profit
    assert est.as_dict()["thp"] is None and est.as_dict()["thp_known"] is True


def test_unknown_thp_part_is_said():
    est = _estimate(zero=10, dup_groups=[3], unique=5, thp=ThpSummary(False, 0, 0, {}))
    p = est.predicted(False)
    assert p.thp_zero_pages == 0 and p.pages_sharing == 11
    d = est.as_dict()
    assert d["thp_known"] is False and d["thp"]["known"] is False


def test_scope_without_pfns_marks_thp_unknown(monkeypatch):
    from udedup.estimate import passes

    def no_flags(pfns, procfs):
        raise passes.ProcessError("kpageflags: permission denied")
    monkeypatch.setattr(passes, "read_kpageflags", no_flags)
    mm, off = _thp_buffer(1)
    try:
        arr = np.frombuffer(mm, dtype=np.uint64, count=SUB * PS // 8, offset=off)
        arr[:] = 1
        from udedup.estimate import estimate
        est = estimate([memoryview(arr)], all_eligible=True, passes=2, interval=0.0)
        if not any(r.mapping.anon_huge for r in est.mappings):
            pytest.skip("the kernel gave no THP")
        assert est.thp_known is False
        assert any(n.startswith("THP part unknown") for n in est.notes)
        del arr
    finally:
        mm.close()


def _thp_buffer(nthp):
    """A 2 MiB-aligned MADV_HUGEPAGE private anonymous buffer of ``nthp`` THPs, or skip."""
    if os.geteuid() != 0:
        pytest.skip("needs root (PFNs in pagemap, /proc/kpageflags)")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                pytest.skip("THP is disabled")
    except OSError:
        pytest.skip("no THP")
    huge = SUB * PS
    mm = mmap.mmap(-1, (nthp + 1) * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    off = -(-base // huge) * huge - base
    mm.madvise(mmap.MADV_HUGEPAGE, off, nthp * huge)
    return mm, off


def _fill(arr, kinds):
    pages = arr.reshape(-1, PS // 8)
    rng = np.random.default_rng(5)
    for t, kind in enumerate(kinds):
        blk = pages[t * SUB:(t + 1) * SUB]
        blk[:] = 1
        if kind == "zero":
            blk[:] = 0
        elif kind == "dup_zero":
            blk[:256] = np.arange(256, dtype=np.uint64)[:, None] + 77
            blk[256:] = 0
        else:
            blk[:] = rng.integers(0, 2 ** 63, size=blk.shape, dtype=np.uint64)


def test_estimate_finds_thps_and_predicts_splits():
    from udedup.estimate import estimate
    kinds = ["zero", "dup_zero", "dup_zero", "unique"]
    mm, off = _thp_buffer(len(kinds))
    try:
        arr = np.frombuffer(mm, dtype=np.uint64, count=len(kinds) * SUB * PS // 8, offset=off)
        _fill(arr, kinds)
        est = estimate([memoryview(arr)], all_eligible=True, passes=2, interval=0.0)
        if est.thp is None or est.thp.thps < len(kinds):
            pytest.skip(f"the kernel gave {est.thp.thps if est.thp else 0} THPs, not 4")
        p0, p1 = est.predicted(False), est.predicted(True)
        for p in (p0, p1):
            assert (p.thps, p.thps_split, p.thp_zero_pages) == (4, 3, 1024)
            assert (p.pages_shared, p.pages_sharing, p.ksm_zero_pages) == (256, 256, 0)
            assert p.rmap_items == 4 * SUB - 1024
        del arr
    finally:
        mm.close()


@pytest.mark.ksm
def test_prediction_matches_ksmd_on_thps():
    from udedup.estimate import estimate
    from udedup.ksm import Ksm
    ksm_ctl = Ksm()
    kinds = ["zero", "dup_zero", "dup_zero", "unique"]
    mm, off = _thp_buffer(len(kinds))
    n = len(kinds) * SUB * PS
    try:
        arr = np.frombuffer(mm, dtype=np.uint64, count=n // 8, offset=off)
        _fill(arr, kinds)
        est = estimate([memoryview(arr)], all_eligible=True, passes=2, interval=0.0)
        if est.thp is None or est.thp.thps < len(kinds):
            pytest.skip("no THPs")
        mm.madvise(mmap.MADV_MERGEABLE, off, n)
        with ksm_ctl.settings(use_zero_pages=1, pages_to_scan=20000, sleep_millisecs=0,
                              smart_scan=0, run=1):
            ksm_ctl.wait_settled(timeout=120, stable_scans=3, min_scans=5)
            with open("/proc/self/ksm_stat") as f:
                stat = dict(line.replace(":", " ").split()[:2] for line in f)
        pred = est.predicted(True)
        assert int(stat["ksm_merging_pages"]) == pred.pages_shared + pred.pages_sharing
        assert int(stat["ksm_rmap_items"]) == pred.rmap_items
        del arr
    finally:
        mm.close()
