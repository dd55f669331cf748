"""The A/B harness's pure parts: statistics on numbers with known answers, the trial order, and the
synthetic workload's layout and expectations."""
from __future__ import annotations

import os

import numpy as np
import pytest

from udedup.ab.records import TrialRecord
from udedup.ab.stats import bootstrap_diff, median_iqr, summarize, trial_order
from udedup.ab.synthetic import (DUPLICATE, UNIQUE, VOLATILE, ZERO, SyntheticSpec, expected_counters,
                                 make_layout, parse_size, preset)
from udedup.errors import UsageError


# --- statistics -----------------------------------------------------------------------------------
def test_median_iqr_known_answers():
    assert median_iqr([5, 1, 4, 2, 3]) == {"n": 5, "median": 3.0, "q1": 2.0, "q3": 4.0,
                                           "min": 1.0, "max": 5.0}
    # None and nan are missing values, not zeros
    assert median_iqr([None, 1.0, float("nan"), 3.0])["median"] == 2.0
    assert median_iqr([None])["median"] is None and median_iqr([])["n"] == 0


def test_bootstrap_of_a_pure_shift_is_exact():
    d = bootstrap_diff([10, 10, 10], [13, 13, 13], seed=1)
    assert (d["diff"], d["ci_low"], d["ci_high"]) == (3.0, 3.0, 3.0)
    assert d["relative"] == pytest.approx(0.3) and d["clear"]


def test_bootstrap_of_identical_samples_is_not_clear():
    d = bootstrap_diff([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], seed=2)
    assert d["diff"] == 0.0 and d["ci_low"] < 0 < d["ci_high"] and not d["clear"]


def test_bootstrap_interval_covers_the_true_shift_with_the_right_width():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.0, 1.0, 400), rng.normal(1.0, 1.0, 400)
    d = bootstrap_diff(a, b, seed=4)
    assert d["ci_low"] < 1.0 < d["ci_high"] and d["clear"]
    # sd of a median of n normals ~ 1.2533/sqrt(n); of a difference, sqrt(2) times that
    expected_width = 2 * 1.96 * np.sqrt(2) * 1.2533 / np.sqrt(400)
    assert 0.7 * expected_width < d["ci_high"] - d["ci_low"] < 1.4 * expected_width


def test_bootstrap_needs_three_values_a_side_for_an_interval():
    d = bootstrap_diff([1, 2], [5, 6])
    assert d["diff"] == 4.0 and d["ci_low"] is None and not d["clear"]
    assert bootstrap_diff([], [1, 2, 3])["diff"] is None


def test_trial_order_blocks_hold_every_arm_once_and_follow_the_seed():
    order = trial_order(["off", "on"], 50, seed=7)
    assert len(order) == 100
    for block in range(50):
        assert sorted(arm for b, arm in order if b == block) == ["off", "on"]
    firsts = {order[2 * k][1] for k in range(50)}
    assert firsts == {"off", "on"}                   # the order really is shuffled
    assert order == trial_order(["off", "on"], 50, seed=7)
    assert order != trial_order(["off", "on"], 50, seed=8)


def _rec(i, arm, saved, cpu, status="ok"):
    return TrialRecord(index=i, block=i // 2, arm=arm, knobs={}, status=status,
                       timed_out=status == "timeout", saved_bytes=saved, ksmd_cpu_seconds=cpu,
                       settle_seconds=1.0, cow_ns_per_page=2000.0, ksm_zero_pages=0 if arm == "off" else 10,
                       pages_sharing=100 if arm == "off" else 90)


def test_summary_uses_finished_trials_and_the_verdict_says_what_changed():
    arms = {"off": {"use_zero_pages": 0}, "on": {"use_zero_pages": 1}}
    trials = [_rec(0, "off", 100 << 20, 1.0), _rec(1, "on", 110 << 20, 1.0),
              _rec(2, "off", 101 << 20, 1.1), _rec(3, "on", 111 << 20, 1.1),
              _rec(4, "off", 99 << 20, 0.9), _rec(5, "on", 109 << 20, 0.9),
              _rec(6, "on", 1 << 20, 5.0, status="timeout"),
              _rec(7, "off", None, None, status="workload-died")]
    s = summarize(trials, arms, seed=1)
    assert s["arms"]["on"]["n"] == 3 and s["arms"]["on"]["timed_out"] == 1
    assert s["arms"]["off"]["died"] == 1
    assert s["arms"]["on"]["metrics"]["saved_bytes"]["median"] == 110 << 20
    saved = s["differences"][0]["metrics"]["saved_bytes"]
    assert saved["diff"] == 10 << 20 and saved["clear"]
    assert not s["differences"][0]["metrics"]["ksmd_cpu_seconds"]["clear"]
    v = s["verdict"]
    assert v.startswith("on (use_zero_pages=1) vs off (use_zero_pages=0)")
    assert "more saved memory" in v and "ksmd CPU: no clear difference" in v
    assert "ksm_zero_pages +10" in v


# --- the synthetic workload's description -------------------------------------------------------
def test_layout_counts_groups_and_expectations():
    ps = os.sysconf("SC_PAGE_SIZE")
    spec = SyntheticSpec(size=1000 * ps, zero=0.25, duplicate=0.5, unique=0.15, volatile=0.10,
                         group_sizes=(2, 3, 300), seed=5)
    lay = make_layout(spec, ps)
    assert [lay.count(k) for k in (ZERO, DUPLICATE, UNIQUE, VOLATILE)] == [250, 500, 150, 100]
    assert lay.group_sizes.sum() == 500 and lay.group_sizes.min() >= 2
    for g, size in enumerate(lay.group_sizes):
        assert np.count_nonzero(lay.group == g) == size
    assert not np.array_equal(lay.kinds[:250], np.zeros(250))     # placed at random
    off = expected_counters(lay, use_zero_pages=False, max_page_sharing=256, page_size=ps)
    on = expected_counters(lay, use_zero_pages=True, max_page_sharing=256, page_size=ps)
    # 250 zero pages: one content, one KSM page (250 <= 256) off; all in ksm_zero_pages on
    assert on["ksm_zero_pages"] == 250 and off["ksm_zero_pages"] == 0
    assert off["pages_shared"] == on["pages_shared"] + 1
    assert off["pages_sharing"] == on["pages_sharing"] + 249
    big = expected_counters(lay, False, max_page_sharing=100, page_size=ps)
    assert big["pages_shared"] > off["pages_shared"]   # chains: one KSM page per 100 mappings


def test_spec_validation_and_sizes():
    ps = os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(UsageError, match="add up to"):
        SyntheticSpec(size=ps * 10, zero=0.5, duplicate=0.5, unique=0.5, volatile=0).validate()
    with pytest.raises(UsageError, match="group sizes"):
        SyntheticSpec(size=ps * 10, zero=1, duplicate=0, unique=0, volatile=0,
                      group_sizes=(1,)).validate()
    with pytest.raises(UsageError, match="unknown workload preset"):
        preset("nope", 1 << 20)
    assert parse_size("256M") == 256 << 20 and parse_size("1GiB") == 1 << 30
    assert parse_size(str(ps + 1)) == ps
    for bad in ("12Q", "-1M", "", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)
    for name in ("mixed", "zero-heavy", "vm-like", "no-zero"):
        assert preset(name, 4 << 20).validate().name == name
