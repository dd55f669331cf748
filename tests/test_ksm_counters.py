"""udedup.ksm counters on fake trees and scripted reads: KsmStats and its derived figures, the settle
test (pure, over a sequence of reads, and wait_settled's polling), ksmd's CPU from a fake procfs."""
from __future__ import annotations

import os
import time

import pytest

from udedup.errors import KsmNotRunningError, KsmTimeout, KsmUnavailableError, KsmValueError
from udedup.ksm import Ksm, KsmStats
from udedup.ksm.settle import SettleTracker, settle_index

from fake_sysfs import COUNTERS_618, make_fake_ksm


@pytest.fixture
def tree(tmp_path):
    return make_fake_ksm(tmp_path / "ksm")


# --- stats --------------------------------------------------------------------------------------
def _stats(ps=4096, **counters):
    return KsmStats(timestamp=0.0, page_size=ps, counters=counters)


def test_stats_reads_every_counter(tree):
    for name, value in {"pages_shared": 4, "pages_sharing": 1020, "ksm_zero_pages": 100,
                        "general_profit": -64, "full_scans": 7}.items():
        (tree / name).write_text(f"{value}\n")
    st = Ksm(tree).stats()
    assert set(st.counters) == set(COUNTERS_618)
    assert st.pages_shared == 4 and st.pages_sharing == 1020 and st.full_scans == 7
    assert st.saved_pages == 1120
    assert st.saved_bytes == -64                      # general_profit wins where present
    assert st.sharing_ratio == 255.0
    assert st.as_dict()["saved_bytes_source"] == "general_profit"


def test_saved_bytes_formula_without_general_profit():
    # the figures of 600 identical + 100 zero pages (use_zero_pages=1) measured on 6.18, where
    # general_profit read 2816512
    st = _stats(pages_shared=3, pages_sharing=597, ksm_zero_pages=100, pages_unshared=0,
                pages_volatile=0)
    assert st.general_profit is None
    assert st.rmap_items == 600
    assert st.saved_bytes == (597 + 100) * 4096 - 600 * 64 == 2816512
    assert _stats().sharing_ratio == 0.0


# --- wait_settled (scripted counters) -----------------------------------------------------------
def _script(monkeypatch, ksm, rows, run=1):
    """rows: (full_scans, pages_sharing, pages_shared); the last row repeats."""
    state = {"i": 0}

    def stats():
        row = rows(state["i"]) if callable(rows) else rows[min(state["i"], len(rows) - 1)]
        state["i"] += 1
        return _stats(full_scans=row[0], pages_sharing=row[1], pages_shared=row[2])

    monkeypatch.setattr(ksm, "stats", stats)
    monkeypatch.setattr(ksm, "get", lambda name: run if name == "run" else 0)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    return state


def test_wait_settled_needs_scans_and_stable_savings(tree, monkeypatch):
    ksm = Ksm(tree)
    rows = [(10, 0, 0), (11, 0, 0), (12, 50, 1), (13, 99, 1), (14, 99, 1), (15, 99, 1),
            (16, 99, 1), (17, 99, 1)]
    state = _script(monkeypatch, ksm, rows)
    st = ksm.wait_settled(timeout=5, tolerance=0)       # exact equality: static memory
    # last change seen at full_scans=13 (may belong to scan 14): clean scans 15 and 16
    assert st.full_scans == 16 and st.pages_sharing == 99
    assert state["i"] == 7


def test_wait_settled_counts_full_scans_across_a_reset(tree, monkeypatch):
    ksm = Ksm(tree)
    rows = [(40, 5, 1), (41, 5, 1), (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)]
    _script(monkeypatch, ksm, rows)
    st = ksm.wait_settled(timeout=5, tolerance=0)
    # without reset handling 0 < 40 would never reach 40 + 3
    assert st.full_scans == 3


def test_wait_settled_times_out_with_last_stats(tree, monkeypatch):
    ksm = Ksm(tree)
    _script(monkeypatch, ksm, lambda i: (i, i, 1))   # savings never stop moving
    with pytest.raises(KsmTimeout, match="did not settle within 0.05 s") as info:
        ksm.wait_settled(timeout=0.05, tolerance=0)
    assert isinstance(info.value.stats, KsmStats)
    assert info.value.stats.full_scans > 0


@pytest.mark.parametrize("run", [0, 2])
def test_wait_settled_refuses_when_ksmd_is_stopped(tree, monkeypatch, run):
    ksm = Ksm(tree)
    _script(monkeypatch, ksm, [(0, 0, 0)], run=run)
    with pytest.raises(KsmNotRunningError, match="run=1"):
        ksm.wait_settled(timeout=30)


# --- ksmd CPU -----------------------------------------------------------------------------------
def _fake_proc(root, procs):
    for pid, (comm, utime, stime) in procs.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        fields = ["S", "2", "0", "0", "0", "-1", "2129984", "0", "0", "0", "0", str(utime),
                  str(stime), "0", "0", "25", "5", "1", "0", "123"] + ["0"] * 30
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    return root


def test_ksmd_cpu_seconds_from_fake_procfs(tree, tmp_path):
    proc = _fake_proc(tmp_path / "proc", {1: ("init", 5, 5), 37: ("ksmd", 150, 50),
                                          99: ("evil) (ksmd", 1, 1)})
    ksm = Ksm(tree, procfs=proc)
    tick = os.sysconf("SC_CLK_TCK")
    assert ksm.ksmd_pid() == 37
    assert ksm.ksmd_cpu_seconds() == pytest.approx(200 / tick)
    assert ksm.ksmd_start_seconds() == pytest.approx(123 / tick)


def test_no_ksmd_thread_is_unavailable(tree, tmp_path):
    proc = _fake_proc(tmp_path / "proc", {1: ("init", 5, 5)})
    with pytest.raises(KsmUnavailableError, match="no ksmd"):
        Ksm(tree, procfs=proc).ksmd_cpu_seconds()


# --- settle, pure: a function of the counters read one after another -----------------------------
def _reads(rows):
    return [_stats(full_scans=f, pages_sharing=sharing, pages_shared=shared)
            for f, sharing, shared in rows]


def test_settle_index_over_a_sequence():
    rows = [(10, 0, 0), (11, 0, 0), (12, 50, 1), (13, 99, 1), (14, 99, 1), (15, 99, 1),
            (16, 99, 1), (17, 99, 1)]
    # the change seen at 13 may belong to scan 14: clean scans 15 and 16
    assert settle_index(_reads(rows), tolerance=0) == 6
    assert settle_index(_reads(rows), stable_scans=1, tolerance=0) == 5
    assert settle_index(_reads(rows[:6]), tolerance=0) is None
    # quiet from the start still needs min_scans full scans
    assert settle_index(_reads([(5, 7, 1), (6, 7, 1), (7, 7, 1), (8, 7, 1)]), tolerance=0) == 3
    assert settle_index(_reads([(5, 7, 1), (6, 7, 1), (7, 7, 1), (8, 7, 1)])) == 3
    # with the default tolerance a 49-page step is within the 32-page floor once two levels of
    # the window have it: one scan earlier than exact equality
    assert settle_index(_reads(rows)) == 5


def test_settle_counts_a_run_2_reset_as_a_restart():
    tracker = SettleTracker(_stats(full_scans=40, pages_sharing=5, pages_shared=1))
    assert not tracker.observe(_stats(full_scans=0))
    assert tracker.scans_done == 0          # 40 + 0 scans: the reset is not going backwards
    for scans in (1, 2):
        assert not tracker.observe(_stats(full_scans=scans))
    assert tracker.observe(_stats(full_scans=3))
    assert "advanced by 3 (need 3)" in tracker.progress()


def test_settle_refuses_nonsense_scan_counts():
    with pytest.raises(KsmValueError, match=">= 1"):
        SettleTracker(_stats(), stable_scans=0)
