"""The settle detector (udedup.ksm.settle) on recorded series: synthetic ones (a merge ramp then
jitter forever, steady growth that must not settle, a step after a plateau, ksmd not advancing) and
one recorded from live memory (tests/data/settle_live.csv, scripts/record_settle_series.py), where
exact equality never settles. Also the same detector behind Ksm.wait_settled, run_ab and the
daemon's policy. No root, no real KSM."""
from __future__ import annotations

import csv
import os
import random
import time

import pytest

from udedup.ab.engine import run_ab
from udedup.errors import KsmTimeout, KsmValueError, UsageError
from udedup.ksm import Ksm, KsmStats
from udedup.ksm.settle import (DEFAULT_FLOOR_PAGES, DEFAULT_TOLERANCE, MAX_WINDOW_READS,
                               SettleTracker, settle_point, theil_sen)

from fake_sysfs import make_fake_ksm
from test_policy import PS, MiB, estimated_round, proc

DATA = os.path.join(os.path.dirname(__file__), "data")


def series(per_scan, reads_per_scan=5, dt=0.1, jitter=0, seed=1):
    """(times, full_scans, saved) with ``reads_per_scan`` reads while full_scans is i, the
    saving ``per_scan[i]`` plus uniform jitter of ±``jitter`` pages per read."""
    rng = random.Random(seed)
    times, scans, saved = [], [], []
    for i, level in enumerate(per_scan):
        for _ in range(reads_per_scan):
            times.append(round(len(times) * dt, 3))
            scans.append(i)
            saved.append(int(level) + (rng.randint(-jitter, jitter) if jitter else 0))
    return times, scans, saved


def live(name="settle_live.csv"):
    with open(os.path.join(DATA, name)) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return ([float(r["t"]) for r in rows], [int(r["full_scans"]) for r in rows],
            [int(r["pages_sharing"]) + int(r["ksm_zero_pages"]) for r in rows],
            [int(r["pages_shared"]) for r in rows])


# --- synthetic series ---------------------------------------------------------------------------
RAMP = [0, 0, 20000, 40000, 48000, 50000]


def test_ramp_then_jitter_settles_on_the_plateau_and_equality_never_does():
    t, f, s = series(RAMP + [50000] * 60, jitter=10)
    p = settle_point(t, f, s)
    assert p is not None
    # the plateau starts in scan 5; 3 advances of window later it is judged flat
    assert 7 <= p.scans <= 9, p
    assert abs(p.saved_pages - 50000) <= 10 and abs(p.trend) <= 10
    assert p.band == pytest.approx(DEFAULT_TOLERANCE * p.saved_pages + DEFAULT_FLOOR_PAGES)
    assert s[p.median_index] == p.saved_pages and p.start_index <= p.median_index <= p.index
    assert settle_point(t, f, s, tolerance=0) is None
    # without jitter both settle, at the same read
    t, f, s = series(RAMP + [50000] * 10)
    assert settle_point(t, f, s).index == settle_point(t, f, s, tolerance=0).index


@pytest.mark.parametrize("rate", [0.01, 0.005])
def test_steady_growth_is_a_trend_not_jitter(rate):
    # 1 %/scan: 500 pages per scan at 50k, nearly 4 times the band; 0.5 %/scan too
    t, f, s = series([50000 * (1 + rate) ** i for i in range(80)], jitter=10)
    assert settle_point(t, f, s) is None
    tracker = SettleTracker(None)
    for args in zip(f, s, t):
        tracker.add(args[0], args[1], t=args[2])
    assert tracker.trend == pytest.approx(rate * s[-1], rel=0.15)
    assert "pages per full scan" in tracker.progress() and "allowed ±" in tracker.progress()


def test_jitter_of_10_pages_on_50k_is_within_the_band_and_1_percent_is_not():
    band = DEFAULT_TOLERANCE * 50000 + DEFAULT_FLOOR_PAGES
    assert 10 * 4 < band < 500 / 3      # a margin of 4 for jitter, of 3 for a 1 %/scan merge


def test_a_step_after_a_short_plateau_settles_on_the_new_level():
    t, f, s = series([0, 0, 30000, 30000, 40000] + [40000] * 10, jitter=10)
    p = settle_point(t, f, s)
    assert abs(p.saved_pages - 40000) <= 10
    assert f[p.start_index] >= 4            # the window holds no read of the old level


def test_a_step_takes_a_settled_verdict_back():
    tracker = SettleTracker(None)
    t, f, s = series([0, 0, 50000, 50000, 50000, 50000, 50000], jitter=10)
    states = [tracker.add(*args) for args in zip(f, s, t)]
    assert states[-1] and tracker.plateau.saved_pages in range(49990, 50011)
    assert not tracker.add(6, 52000)        # a step within the scan: no longer settled
    for scan in (7, 8, 9):
        assert not tracker.add(scan, 52000) or scan == 9
    assert tracker.settled and tracker.plateau.saved_pages == 52000


def test_no_full_scan_advancing_never_settles():
    t, f, s = series([0, 0, 50000], reads_per_scan=1)
    t2, f2, s2 = series([50000], reads_per_scan=1000)
    f2 = [2] * len(f2)
    assert settle_point(t + t2, f + f2, s + s2) is None
    assert settle_point(t + t2, f + f2, s + s2, tolerance=0) is None


def test_the_window_stays_bounded_while_ksmd_does_not_advance():
    tracker = SettleTracker(None)
    for i in range(3 * MAX_WINDOW_READS):
        tracker.add(7, 1000 + i % 3)
    assert len(tracker.window) <= MAX_WINDOW_READS and tracker.window[0].index == 0
    assert not tracker.settled


def test_scans_faster_than_the_reads():
    # ksmd completes two or three full scans between two reads: the window still spans 3 advances
    f = [0, 2, 5, 7, 9, 12, 14, 17, 19]
    s = [0, 40000, 50000, 50004, 49995, 50002, 50001, 49998, 50003]
    p = settle_point(None, f, s)
    assert p.index == 4 and p.seconds is None and p.scan_span >= 3    # from read 2 (scan 5) on


def test_theil_sen_ignores_one_outlier_and_equal_x():
    assert theil_sen([(0, 0), (1, 10), (2, 20), (3, 1000), (4, 40)]) == pytest.approx(10)
    assert theil_sen([(1, 5), (1, 9)]) == 0.0


def test_bad_arguments():
    with pytest.raises(KsmValueError, match=r"fraction in \[0, 1\)"):
        SettleTracker(None, tolerance=1.5)
    with pytest.raises(KsmValueError, match="floor_pages"):
        SettleTracker(None, floor_pages=-1)
    with pytest.raises(KsmValueError, match="differ in length"):
        settle_point([0.0], [0, 1], [0, 1])
    with pytest.raises(UsageError, match="settle_tolerance"):
        run_ab(None, settle_tolerance=-0.1)


# --- recorded from live memory ------------------------------------------------------------------
# settle_live.csv: two processes rewriting 50 random pages/s each (scripts/record_settle_series.py);
# settle_vms_*.csv: `udedup ab` on two QEMU guests with exact settling, timed out after 60 s
LIVE = ["settle_live.csv", "settle_vms_off.csv", "settle_vms_on.csv"]


@pytest.mark.parametrize("name", LIVE)
def test_live_series_settles_within_a_few_scans_and_equality_never(name):
    t, f, s, _ = live(name)
    final = s[-1]
    merged = next(i for i, v in enumerate(s) if v >= 0.99 * final)     # the merge is done
    p = settle_point(t, f, s)
    assert p is not None
    assert p.scans - (f[merged] - f[0]) <= 4, p         # within 4 full scans of the merge
    assert t[merged] < p.seconds < t[-1] / 2
    plateau = s[merged:]
    assert min(plateau) <= p.saved_pages <= max(plateau)
    assert abs(p.saved_pages - sorted(plateau)[len(plateau) // 2]) <= 0.002 * p.saved_pages
    # the counters never repeat over 3 full scans: exact equality waits forever
    assert settle_point(t, f, s, tolerance=0) is None
    assert max(plateau) - min(plateau) > 0


def test_live_series_through_wait_settled(tmp_path, monkeypatch):
    """Ksm.wait_settled reading the recorded counters one poll after another: it returns the read
    carrying the plateau's median, and gives the tracker; with tolerance=0 it times out."""
    t, f, s, shared = live()
    ksm = Ksm(make_fake_ksm(tmp_path / "ksm"))

    def play():
        state = {"i": 0}

        def stats():
            i = min(state["i"], len(t) - 1)
            state["i"] += 1
            return KsmStats(timestamp=t[i], page_size=PS, counters={
                "full_scans": f[i], "pages_sharing": s[i], "pages_shared": shared[i]})
        monkeypatch.setattr(ksm, "stats", stats)
        return state

    monkeypatch.setattr(ksm, "get", lambda name: 1 if name == "run" else 0)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    play()
    trackers = []
    st = ksm.wait_settled(timeout=30, tracker_out=trackers)
    p = trackers[0].plateau
    assert st.saved_pages == p.saved_pages and st.full_scans <= f[p.index]
    assert p == settle_point(t, f, s)
    play()
    with pytest.raises(KsmTimeout, match="tolerance 0"):
        ksm.wait_settled(timeout=0.2, tolerance=0)


# --- the daemon's policy uses the same detector ------------------------------------------------
def _rounds(host, levels):
    plans = []
    for level in levels:
        host.scan(1, 262144, 0.5, saved_pages=int(level), profit={1: int(level) * PS})
        plans.append(host.round())
    return plans


def test_daemon_settles_on_jitter_and_not_on_steady_growth():
    rng = random.Random(3)
    _, host, _ = estimated_round(proc(1), 512 * MiB)
    plans = _rounds(host, [65536 + rng.randint(-10, 10) for _ in range(4)])
    modes = [p.mode for p in plans]
    assert modes[:2] == ["fast", "fast"] and modes[-1] == "slow"
    assert any("merging settled" in str(d) for d in plans[modes.index("slow")].decisions)
    policy, host, _ = estimated_round(proc(1), 512 * MiB)
    plans = _rounds(host, [65536 * 1.01 ** i for i in range(10)])
    assert {p.mode for p in plans} == {"fast"}
    assert "still moving (+7" in policy.mode_reason, policy.mode_reason     # 1 % of ~71k pages
