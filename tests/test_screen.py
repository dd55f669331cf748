"""udedup.screen: the sampled look that rules candidates out before a full estimate."""
from __future__ import annotations

import math
import os

import pytest

from udedup.daemon.act import screen_processes
from udedup.daemon.config import Config
from udedup.daemon.model import ProcessInfo
from udedup.errors import UsageError
from udedup.estimate import screen
from udedup.host.maps import read_mappings
from udedup.host.pagemap import present_pages

PS = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
UNREGISTERED = {"register": False}      # ksmd must not touch these while we count


def rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_rate_gives_the_expected_twins_at_the_threshold():
    r = screen.rate_for(32 * MiB, PS)
    pairs_pages = 2 * 32 * MiB // PS                 # a process saving T in pairs holds 2T duplicates
    assert pairs_pages * r * r == pytest.approx(screen.EXPECTED_TWINS)
    assert screen.rate_for(0, PS) == 1.0
    assert screen.rate_for(PS, PS) == 1.0           # tiny thresholds: read everything
    assert screen.rate_for(1 << 30, PS) < screen.rate_for(32 * MiB, PS)


def test_bound_counts_zero_pages_over_p_and_twins_over_p_squared():
    r = screen.ScreenResult(pid=1, rate=0.1, present_pages=100000, sampled_pages=10000,
                            zero_pages=50, twin_pages=20)
    assert r.bound_pages == math.ceil(50 / 0.1 + 20 / 0.01)
    capped = screen.ScreenResult(pid=1, rate=0.01, present_pages=1000, sampled_pages=10,
                                 zero_pages=5, twin_pages=5)
    assert capped.bound_pages == 1000


def test_full_rate_counts_exactly_and_touches_no_absent_page(estimate_children):
    _, a = estimate_children({"regions": [{"kind": "unique", "pages": 2048}], "options": UNREGISTERED})
    _, b = estimate_children({"regions": [{"kind": "zero", "pages": 1024},
                                          {"kind": "unique", "pages": 1024},
                                          {"kind": "absent", "pages": 4096},
                                          {"kind": "readzero", "pages": 1024}],
                              "options": UNREGISTERED})
    _, c = estimate_children({"regions": [{"kind": "dup", "pages": 2048, "contents": 2048, "seed": 3}],
                              "options": UNREGISTERED})
    _, d = estimate_children({"regions": [{"kind": "dup", "pages": 2048, "contents": 2048, "seed": 3}],
                              "options": UNREGISTERED})
    pids = [x["pid"] for x in (a, b, c, d)]
    before = rss_anon(b["pid"])
    got = screen.screen(pids, 1.0)
    ra, rb, rc, rd = (got[p] for p in pids)
    # the interpreter's own heap holds a few zero pages and twins: a small allowance for it
    noise = 300
    assert ra.sampled_pages == ra.present_pages and ra.zero_pages < noise and ra.twin_pages < noise
    assert 1024 <= rb.zero_pages < 1024 + noise and rb.twin_pages < noise
    # every page of c has its twin in d (and back): 2048 pages each
    assert 2048 <= rc.twin_pages < 2048 + noise and 2048 <= rd.twin_pages < 2048 + noise
    # never-touched pages and pages mapping the shared zero page are not sampled, not faulted in
    assert rb.present_pages < ra.present_pages + noise
    assert rss_anon(b["pid"]) - before < MiB
    # mappings read beforehand (the daemon passes its own) give the same sample
    assert screen.screen(pids, 1.0, mappings={p: read_mappings(p) for p in pids}) == got
    _, first, n = next(r for r in b["regions"] if r[0] == "absent")
    lo = b["start"] + first * PS
    assert present_pages(b["pid"], lo, lo + n * PS).size == 0


def unique_and_twins(spawn, seed: int):
    """One process of 4096 unique pages, two holding the same 4096 pages (each page's twin is in
    the other)."""
    _, u = spawn({"regions": [{"kind": "unique", "pages": 4096}], "options": UNREGISTERED})
    twins = [spawn({"regions": [{"kind": "dup", "pages": 4096, "contents": 4096, "seed": seed}],
                    "options": UNREGISTERED})[1] for _ in range(2)]
    return u, *twins


def test_sample_bound_separates_duplicate_rich_from_unique(estimate_children):
    u, v, w = unique_and_twins(estimate_children, seed=5)
    got = screen.screen([u["pid"], v["pid"], w["pid"]], 0.25, seed=7)
    ru, rv = got[u["pid"]], got[v["pid"]]
    assert 0.2 * ru.present_pages < ru.sampled_pages < 0.3 * ru.present_pages
    assert rv.bound_pages > 2048                     # 4096 duplicate pages: found by the sample
    assert ru.bound_pages < 1024


def test_screen_processes_rules_out_only_what_cannot_reach_the_threshold(estimate_children):
    u, v, w = unique_and_twins(estimate_children, seed=9)
    infos = [ProcessInfo(pid=x["pid"], start_time=i, name=n)
             for i, (x, n) in enumerate(((u, "uniq"), (v, "dup-v"), (w, "dup-w")))]
    cfg = Config()
    cfg.registration.min_saving = 4 * MiB
    cfg.registration.min_saving_percent = 0.0
    out = screen_processes(infos, cfg, now=1.0, seed=3)
    assert set(out) == {infos[0].key}                # the duplicate-rich pair goes to the full estimate
    est = out[infos[0].key]
    assert est.saved_bytes < 2 * MiB and est.screened.startswith("screened: ")
    cfg.estimate.screen = False
    assert screen_processes(infos, cfg, now=1.0) == {}
    cfg.estimate.screen = True
    cfg.registration.min_saving = 64 * 1024           # the sample would be most of the memory
    assert screen_processes(infos, cfg, now=1.0) == {}


def test_bad_rate_and_missing_process():
    with pytest.raises(UsageError, match="screen rate"):
        screen.screen([os.getpid()], 0.0)
    got = screen.screen([2 ** 22 + 7], 0.5)
    assert isinstance(got[2 ** 22 + 7], str)
