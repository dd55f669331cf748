"""estimate(domains=...): the trust-domain split of a joint estimate, on real processes.

Two LayoutChild processes, one per domain, hold contents in known places. The estimator only reads,
but the children's buffers are registered (MADV_MERGEABLE), so a ksmd run by another test would
merge them (zero pages then map the zero page and leave the scan): the ``ksm`` marker takes the
machine-wide experiment lock, with KSM stopped while it is held. The scope is the registered memory
(the children's buffers only) unless said otherwise, so every figure is exact."""
from __future__ import annotations

import pytest

import numpy as np

from udedup.estimate import estimate
from udedup.estimate.model import MappingReport
from udedup.estimate.ranges import SavingRanges
from udedup.estimate.scope import PageSet, Segment
from udedup.host.maps import Mapping
from udedup.ksm import Ksm

from cgroup_fixtures import PS, LayoutChild

ksm = pytest.mark.ksm

# x0: 3 in A, 2 in B -> A wins; y0: 2 in A, 3 in B -> B wins; w0: 2 and 2, a tie -> "A" (smallest
# key); x1: only in A; zero: 4 in A, 2 in B. Foreign pages are interleaved with registrable ones.
LAYOUT_A = [["x", 0], ["y", 0], ["unique", 1], ["x", 0], ["zero", 0], ["y", 0], ["x", 0],
            ["unique", 2], ["zero", 0], ["w", 0], ["x", 1], ["zero", 0], ["w", 0], ["x", 1],
            ["zero", 0], ["unique", 3]]
LAYOUT_B = [["x", 0], ["y", 0], ["y", 0], ["unique", 11], ["w", 0], ["zero", 0], ["x", 0],
            ["y", 0], ["w", 0], ["unique", 12], ["zero", 0], ["unique", 13]]
WINNER = {("x", 0): "A", ("y", 0): "B", ("w", 0): "A", ("x", 1): "A"}
MPS = 256


@pytest.fixture
def pair():
    with Ksm().settings(run=0):
        a, b = LayoutChild(LAYOUT_A), LayoutChild(LAYOUT_B)
        try:
            yield a, b
        finally:
            a.kill()
            b.kill()


def run(pair, domains, **kw):
    a, b = pair
    kw.setdefault("max_page_sharing", MPS)
    return estimate([a.pid, b.pid], interval=0, domains=domains, **kw)


def classes(layout, key, zero_across=True):
    """Per page of ``layout`` in domain ``key``: "ok" (registrable), "foreign" or "unique"."""
    zero_ok = zero_across or key == "A"     # A has most zero pages
    out = []
    for kind, n in layout:
        if kind == "zero":
            out.append("ok" if zero_ok else "foreign")
        elif kind == "unique":
            out.append("unique")
        else:
            out.append("ok" if WINNER[(kind, n)] == key else "foreign")
    return out


def expected_ranges(base, cls):
    """Spans of registrable pages, broken at foreign pages, joined across unique pages."""
    ranges, lo, hi = [], None, None
    for i, c in enumerate(cls):
        if c == "foreign":
            if lo is not None:
                ranges.append((base + lo * PS, base + (hi + 1) * PS))
            lo = None
        elif c == "ok":
            lo = i if lo is None else lo
            hi = i
    if lo is not None:
        ranges.append((base + lo * PS, base + (hi + 1) * PS))
    return ranges


def page_runs(base, cls, what="foreign"):
    out = []
    for i, c in enumerate(cls):
        a = base + i * PS
        if c == what:
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], a + PS)
            else:
                out.append((a, a + PS))
    return out


def inside(addr, ranges):
    return any(lo <= addr < hi for lo, hi in ranges)


@ksm
def test_domains_split_the_saving_and_the_ranges_skip_foreign_pages(pair):
    a, b = pair
    est = run(pair, {a.pid: "A", b.pid: "B"})
    assert est.pages_scanned == len(LAYOUT_A) + len(LAYOUT_B)
    ds = est.domains
    assert ds.zero_pages_across is True
    # everything registered: x0 5 pages save 4, y0 4, w0 (4 pages) 3, x1 1; six zero pages
    assert ds.saved_pages_all == pytest.approx({0: 12 + 5, 1: 12 + 6})
    assert ds.saved_pages_all == pytest.approx(
        {k: est.predicted(bool(k)).saved_pages for k in (0, 1)})
    # kept: A x0 (3 pages) 2 + x1 1 + w0 1, B y0 2; the zero pages stay registrable everywhere
    assert ds.saved_pages_kept == pytest.approx({0: 6 + 5, 1: 6 + 6})
    assert (ds.cross_groups, ds.exposed_pages, ds.exposed_zero_pages) == (3, 14, 2)
    assert ds.foreign_pages == 2 + 4
    by_key = {d.key: d for d in ds.per_domain}
    assert [d.key for d in ds.per_domain] == ["A", "B"]
    assert by_key["A"].pids == [a.pid] and by_key["B"].pids == [b.pid]
    assert by_key["A"].saved_pages_kept == pytest.approx({0: 4 + 4 * 5 / 6, 1: 8})
    assert by_key["B"].saved_pages_kept == pytest.approx({0: 2 + 2 * 5 / 6, 1: 4})
    assert (by_key["A"].exposed_pages, by_key["B"].exposed_pages) == (3 + 2 + 2, 2 + 3 + 2)
    assert (by_key["A"].foreign_pages, by_key["B"].foreign_pages) == (2, 4)
    for child, layout, key in ((a, LAYOUT_A, "A"), (b, LAYOUT_B, "B")):
        t = next(t for t in est.targets if t.pid == child.pid)
        cls = classes(layout, key)
        assert t.domain == key
        assert t.foreign_pages == cls.count("foreign")
        assert t.domain_saved_pages == pytest.approx(by_key[key].saved_pages_kept)
        assert t.domain_ranges == expected_ranges(child.address, cls)
        assert t.domain_range_pages == sum((hi - lo) // PS for lo, hi in t.domain_ranges)
        assert t.domain_uncovered_pages == 0
        for i, c in enumerate(cls):
            if c != "unique":
                assert inside(child.address + i * PS, t.domain_ranges) == (c == "ok"), (key, i)
        # every buffer page is registered today: each foreign page is a conflict, page precise
        assert t.conflict_ranges == page_runs(child.address, cls)
        d = t.as_dict()
        assert d["domain"] == key and len(d["domain_ranges"]) == len(t.domain_ranges)
    assert est.as_dict()["domains"]["cross_groups"] == 3
    assert "domains" in est.timings


@ksm
def test_zero_pages_within_domains_are_one_content(pair):
    a, b = pair
    est = run(pair, {a.pid: "A", b.pid: "B"}, zero_pages_across_domains=False)
    ds = est.domains
    assert ds.zero_pages_across is False
    # B's two zero pages are foreign now: A (4 zero pages) wins them
    assert ds.saved_pages_kept == pytest.approx({0: 6 + 3, 1: 6 + 4})
    assert ds.exposed_zero_pages == 2 and ds.foreign_pages == 2 + 4 + 2
    tb = next(t for t in est.targets if t.pid == b.pid)
    cls = classes(LAYOUT_B, "B", zero_across=False)
    assert tb.domain_ranges == expected_ranges(b.address, cls)
    assert tb.conflict_ranges == page_runs(b.address, cls)
    assert tb.domain_saved_pages == pytest.approx({0: 2, 1: 2})


@ksm
def test_ties_go_to_more_registered_pages_then_the_smallest_key(pair):
    a, b = pair
    # with max_page_sharing 2, x0 saves 1 in A (3 pages) and 1 in B (2 pages): a tie on saving,
    # A has more of them registered; y0: 1 and 1, B has more; w0: 2 and 2, then the key decides
    est = run(pair, {a.pid: "b-second", b.pid: "a-first"}, max_page_sharing=2)
    ta = next(t for t in est.targets if t.pid == a.pid)
    tb = next(t for t in est.targets if t.pid == b.pid)
    def contents(child, layout, ranges):
        return {tuple(layout[(addr - child.address) // PS]) for lo, hi in ranges
                for addr in range(lo, hi, PS)}
    foreign_a = contents(a, LAYOUT_A, ta.conflict_ranges)
    foreign_b = contents(b, LAYOUT_B, tb.conflict_ranges)
    assert foreign_a == {("y", 0), ("w", 0)}     # y0 to B (more registered), w0 to "a-first"
    assert foreign_b == {("x", 0)}
    assert (ta.foreign_pages, tb.foreign_pages) == (2 + 2, 2)


@ksm
def test_one_domain_changes_nothing_and_none_leaves_the_estimate_as_it_was(pair):
    a, b = pair
    plain = run(pair, None)
    assert plain.domains is None and "domains" not in plain.as_dict()
    assert all("domain" not in t.as_dict() for t in plain.targets)
    assert "domains" not in plain.timings
    same = run(pair, {a.pid: "t", b.pid: "t"})
    ds = same.domains
    assert (ds.cross_groups, ds.exposed_pages, ds.exposed_zero_pages, ds.foreign_pages) == \
        (0, 0, 0, 0)
    assert ds.saved_pages_kept == pytest.approx(ds.saved_pages_all)
    for t, p in zip(same.targets, plain.targets):
        assert t.domain_ranges == p.saving_ranges and t.domain_range_pages == p.range_pages
        assert t.conflict_ranges == []
    # the domain step changes no other output
    volatile = ("elapsed_seconds", "cpu_seconds", "timings", "domains")
    da, db = same.as_dict(), plain.as_dict()
    for d in (da, db):
        for k in volatile:
            d.pop(k, None)
        for t in d["targets"]:
            for k in [k for k in t if k.startswith("domain") or k in ("foreign_pages",
                                                                      "conflict_ranges")]:
                del t[k]
    assert da == db


@ksm
def test_a_target_missing_from_domains_is_its_own_domain(pair):
    a, b = pair
    est = run(pair, {a.pid: "A"})
    assert sorted(d.key for d in est.domains.per_domain) == sorted(["A", f"?{b.pid}"])
    assert est.domains.cross_groups == 3


@ksm
def test_more_spans_than_max_ranges_keep_those_saving_most(pair):
    a, b = pair
    # A's registrable pages fall into spans of 1, 2 and 8 pages between its two foreign pages
    est = run(pair, {a.pid: "A", b.pid: "B"}, max_ranges=2)
    ta = next(t for t in est.targets if t.pid == a.pid)
    spans = expected_ranges(a.address, classes(LAYOUT_A, "A"))
    assert [(hi - lo) // PS for lo, hi in spans] == [1, 2, 9]
    assert ta.domain_ranges == spans[1:]
    assert ta.domain_uncovered_pages == 1
    assert any("domain ranges leave out 1 registrable pages" in n for n in est.notes)
    for i, c in enumerate(classes(LAYOUT_A, "A")):
        if c == "foreign":
            assert not inside(a.address + i * PS, ta.domain_ranges)


@ksm
def test_all_eligible_scope_keeps_foreign_pages_out(pair):
    """The whole processes (interpreters included): the buffers' foreign pages stay outside the
    domain ranges, the registrable ones inside; only registered mappings give conflict ranges."""
    a, b = pair
    est = run(pair, {a.pid: "A", b.pid: "B"}, all_eligible=True)
    for child, layout, key in ((a, LAYOUT_A, "A"), (b, LAYOUT_B, "B")):
        t = next(t for t in est.targets if t.pid == child.pid)
        cls = classes(layout, key)
        for i, c in enumerate(cls):
            addr = child.address + i * PS
            if c == "foreign":
                assert not inside(addr, t.domain_ranges) and inside(addr, t.conflict_ranges)
            elif c == "ok":
                assert inside(addr, t.domain_ranges)
        buf = (child.address, child.address + len(layout) * PS)
        conflicts_in_buffer = [r for r in t.conflict_ranges if buf[0] <= r[0] < buf[1]]
        assert conflicts_in_buffer == page_runs(child.address, cls)
    ds = est.domains
    assert ds.exposed_pages >= 14 and ds.cross_groups >= 3
    assert sum(d.exposed_pages for d in ds.per_domain) == ds.exposed_pages
    assert ds.saved_pages_kept[1] <= ds.saved_pages_all[1]


def reference_ranges(saving, readable, foreign, ps, range_gap, max_ranges, start):
    """The domain ranges of one contiguous segment, the slow obvious way."""
    spans, cur, last_fc = [], None, None
    fc = np.cumsum(foreign)
    for i in np.flatnonzero(saving):
        if cur is None or fc[i] != last_fc:
            cur = []
            spans.append(cur)
        cur.append(int(i))
        last_fc = fc[i]
    total = sum(len(s) for s in spans)
    if len(spans) > max_ranges:
        best = sorted(range(len(spans)), key=lambda k: (-len(spans[k]), k))[:max_ranges]
        kept = [spans[k] for k in sorted(best)]
        ranges = [(start + s[0] * ps, start + (s[-1] + 1) * ps) for s in kept]
        inside = sum(int(readable[s[0]:s[-1] + 1].sum()) for s in kept)
        return ranges, inside, total - sum(len(s) for s in kept)
    gaps = [(b - a - 1, seq, si, a, b) for seq, (si, a, b) in enumerate(
        (si, s[j], s[j + 1]) for si, s in enumerate(spans) for j in range(len(s) - 1))
        if b - a - 1 > 0 and (b - a - 1) * ps >= range_gap]
    # sequence numbers count only the kept gap candidates, in order
    gaps = [(g, seq, si, a, b) for seq, (g, _, si, a, b) in enumerate(gaps)]
    chosen = sorted(sorted(gaps, key=lambda g: (-g[0], g[1]))[:max_ranges - len(spans)],
                    key=lambda g: (g[2], g[3]))
    by_span: dict = {}
    for g in chosen:
        by_span.setdefault(g[2], []).append(g)
    ranges, pieces = [], []
    for si, s in enumerate(spans):
        lo = s[0]
        for g in by_span.get(si, ()):
            pieces.append((lo, g[3]))
            lo = g[4]
        pieces.append((lo, s[-1]))
    ranges = [(start + a * ps, start + (b + 1) * ps) for a, b in pieces]
    return ranges, sum(int(readable[a:b + 1].sum()) for a, b in pieces), 0


@pytest.mark.parametrize("seed", range(6))
def test_saving_ranges_with_hard_breaks_match_the_obvious_way_in_any_chunking(seed):
    rng = np.random.default_rng(seed)
    n = 6000 if seed < 3 else 12000
    kind = rng.choice(4, n, p=[0.35, 0.5, 0.1, 0.05] if seed % 2 else [0.6, 0.3, 0.05, 0.05])
    saving, foreign, readable = kind == 1, kind == 2, kind != 3
    ps, start = 4096, 1 << 30
    report = MappingReport(1, Mapping(start, start + n * ps, "rw-p", 0, "00:00", 0, "",
                                      frozenset()), True)
    seg = Segment(1, 0, report, start, PageSet(np.arange(n)))
    for max_ranges, range_gap in ((1, 0), (3, 2 * ps), (64, 4 * ps), (5000, ps), (20000, 3 * ps)):
        want = reference_ranges(saving, readable, foreign, ps, range_gap, max_ranges, start)
        for chunk in (97, 1000, n):
            b = SavingRanges(ps, range_gap, max_ranges)
            b.start_segment(seg)
            for lo in range(0, n, chunk):
                b.add(lo, saving[lo:lo + chunk], readable[lo:lo + chunk], foreign[lo:lo + chunk])
            assert b.result() == want, (max_ranges, range_gap, chunk)
        # without foreign pages the builder is the saving-ranges builder of every estimate
        plain = SavingRanges(ps, range_gap, max_ranges)
        plain.start_segment(seg)
        plain.add(0, saving, readable)
        assert plain.result() == reference_ranges(saving, readable, np.zeros(n, bool), ps,
                                                  range_gap, max_ranges, start)
