"""Policy decisions from hand-made observations with a fake clock (the daemon's observation and
action code on fake trees: test_daemon_trees.py)."""
from __future__ import annotations

import dataclasses

import pytest

from udedup.daemon.candidates import match_process
from udedup.daemon.config import Config
from udedup.daemon.model import (PRIOR_SECONDS_PER_PAGE, EstimateResult, Memory, Observation,
                                 ProcessInfo, Register)
from udedup.daemon.policy import Policy
from udedup.daemon.rates import ewma_weight, knobs_for_rate, pressure_state, sleep_for_batch

from daemon_fakes import cfg

PS = 4096
MiB, GiB = 1 << 20, 1 << 30


def proc(pid, name="vm", size=GiB, registered=True, **kw) -> ProcessInfo:
    base = dict(pid=pid, start_time=pid * 10, name=name, cmdline=f"/usr/bin/{name} --guest",
                exe=f"/usr/bin/{name}", uid=0, cgroup="/machine.slice/x", anon_rss=size,
                merge_any=registered, registered_bytes=size if registered else 0,
                eligible_bytes=size)
    base.update(kw)
    return ProcessInfo(**base)


KNOBS = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": False,
         "smart_scan": True, "advisor_mode": "none", "max_page_sharing": 256}


class Host:
    """A fake host: processes, KSM counters and knobs, CPU clocks; ``round()`` builds the
    Observation the daemon would, at a fake time."""

    def __init__(self, policy: Policy, *procs):
        self.policy = policy
        self.now = 0.0
        self.procs = list(procs)
        self.counters = {"full_scans": 0, "pages_scanned": 0, "pages_sharing": 0, "pages_shared": 0,
                         "ksm_zero_pages": 0}
        self.knobs = dict(KNOBS)
        self.saved = 0
        self.ksmd_cpu = 0.0
        self.daemon_cpu = 0.0
        self.memory = Memory(total=16 * GiB, available=12 * GiB, psi_some_avg10=0.0)

    def round(self, dt=10.0, apply=True):
        self.now += dt
        obs = Observation(now=self.now, processes=tuple(self.procs), counters=dict(self.counters),
                          knobs=dict(self.knobs), saved_bytes=self.saved, page_size=PS,
                          ksmd_cpu_seconds=self.ksmd_cpu, daemon_cpu_seconds=self.daemon_cpu,
                          memory=self.memory)
        plan = self.policy.decide(obs)
        if apply:
            self.knobs.update(plan.knobs)
            self.policy.record_written(plan.knobs)
        return plan

    def scan(self, scans, pages, cpu, saved_pages=None, profit=None):
        """ksmd did ``scans`` full scans over ``pages`` pages using ``cpu`` seconds."""
        self.counters["full_scans"] += scans
        self.counters["pages_scanned"] += pages
        self.ksmd_cpu += cpu
        if saved_pages is not None:
            self.counters["pages_sharing"] = saved_pages
            self.saved = saved_pages * PS
        if profit is not None:
            self.procs = [dataclasses.replace(p, ksm_profit=profit.get(p.pid, 0)) for p in self.procs]


def estimated(policy, info, saved, at=0.0):
    policy.record_estimate(info.key, EstimateResult(at=at, saved_bytes=saved,
                                                    scanned_bytes=info.anon_rss,
                                                    saved_percent=100.0 * saved / info.anon_rss))


def estimated_round(info, saved, config=None, **knobs):
    """A policy tracking ``info`` (on a host whose ``knobs`` differ as given) after one round, told
    ``saved`` by the estimator: (policy, host, the plan of the round after the estimate)."""
    policy = Policy(cfg() if config is None else config)
    host = Host(policy, info)
    host.knobs.update(knobs)
    host.round()
    estimated(policy, info, saved)
    return policy, host, host.round()


def merge_steadily(host, saved_pages, scans=4) -> list:
    """``scans`` rounds, each after one full scan of 1 GiB that ends with ``saved_pages`` merged
    (pid 1's profit): their plans."""
    plans = []
    for _ in range(scans):
        host.scan(1, 262144, 0.5, saved_pages=saved_pages, profit={1: saved_pages * PS})
        plans.append(host.round())
    return plans


def texts(plan):
    return [str(d) for d in plan.decisions]


# --- pure helpers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,info,ok,words", [
    ({}, proc(1, registered=False), False, "matches no candidates pattern"),
    ({}, proc(1, registered=True), True, "include_registered"),
    ({"include_registered": False}, proc(1), False, "matches no candidates pattern"),
    ({"names": ["qemu-*"]}, proc(1, "qemu-system-x86", registered=False), True, "candidates.names"),
    ({"cmdline": [r"--guest\b"]}, proc(1, registered=False), True, "candidates.cmdline"),
    ({"exe": ["/usr/bin/*"]}, proc(1, registered=False), True, "candidates.exe"),
    ({"cgroups": ["/machine.slice/*"]}, proc(1, registered=False), True, "candidates.cgroups"),
    ({"names": ["vm"], "exclude_names": ["v*"]}, proc(1), False, "exclude_names"),
    ({"names": ["vm"], "exclude_cmdline": ["guest"]}, proc(1), False, "exclude_cmdline"),
    ({"names": ["vm"], "exclude_uids": [0]}, proc(1), False, "exclude_uids"),
    ({"names": ["vm"], "exclude_cgroups": ["/machine.slice/*"]}, proc(1), False, "exclude_cgroups"),
    ({"names": ["vm"], "uids": [1000]}, proc(1), False, "not in candidates.uids"),
    ({"names": ["vm"], "uids": [1000]}, proc(1, uid=1000), True, "candidates.names"),
    ({"names": ["vm"]}, proc(1, size=10 * MiB), False, "below candidates.min_anon_rss"),
    ({}, proc(1, registered=False, mergeable=True), True, "include_registered"),
])
def test_match_process(changes, info, ok, words):
    got, why = match_process(cfg(candidates=changes), info)
    assert got is ok and words in why


def test_sleep_grows_until_batches_reach_the_minimum():
    # 25000 pages/s at 2 us/page: 4000-page batches need 4000 * (1 - 0.05) / 25000 s = 152 ms
    assert sleep_for_batch(25000, 20, 2e-6, 4000) == 152
    assert knobs_for_rate(25000, 152, 2e-6, 10**6) >= 4000
    assert sleep_for_batch(25000, 500, 2e-6, 4000) == 500     # already long enough
    assert sleep_for_batch(10, 200, 2e-6, 4000) == 60000      # capped
    assert sleep_for_batch(1e9, 0, 2e-6, 4000) == 0           # flat out: no sleep to stretch
    assert sleep_for_batch(25000, 20, 2e-6, 1) == 20          # rule off


def test_fast_mode_scans_in_large_batches_by_default():
    vm = proc(1, size=GiB)
    c = cfg(candidates={"names": ["vm"]})
    c.ksmd.min_batch_pages = Config().ksmd.min_batch_pages
    policy, _, plan = estimated_round(vm, 400 * MiB, c)
    assert plan.mode == "fast"
    assert plan.knobs["pages_to_scan"] >= c.ksmd.min_batch_pages
    assert plan.knobs["sleep_millisecs"] > c.ksmd.fast_sleep_millisecs
    # the rate is what the budget allows, whatever the batch size
    p, s = plan.knobs["pages_to_scan"], plan.knobs["sleep_millisecs"] / 1000
    rate = p / (s + p * policy.seconds_per_page)
    assert rate == pytest.approx(plan.target_pages_per_second, rel=0.01)


def test_knobs_for_rate():
    # p / (s + p c) = R  <=>  p = R s / (1 - R c)
    p = knobs_for_rate(100000, 20, 2e-6, 10**6)
    assert p == 2500 and abs(p / (0.020 + p * 2e-6) - 100000) < 1
    assert knobs_for_rate(10, 200, 2e-6, 10**6) == 3
    assert knobs_for_rate(1e9, 20, 2e-6, 5000) == 5000        # more than one CPU: capped
    assert knobs_for_rate(0.001, 200, 2e-6, 5000) == 1


def test_pressure_state():
    c = cfg()
    assert pressure_state(c, None)[0] is False
    assert pressure_state(c, Memory(16 * GiB, 12 * GiB, 0.0))[0] is False
    hit, why = pressure_state(c, Memory(16 * GiB, 1 * GiB, 0.0))
    assert hit and "MemAvailable 6.2%" in why
    hit, why = pressure_state(c, Memory(16 * GiB, 12 * GiB, 25.0))
    assert hit and "PSI some avg10 25.0" in why
    assert pressure_state(cfg(pressure={"psi_some_avg10": 0.0}), Memory(16 * GiB, 12 * GiB, 99.0))[0] is False


# --- the life of a policy ---------------------------------------------------------------------------
def test_estimate_then_fast_then_slow_once_realized():
    dup, uniq = proc(100, "vm-dup"), proc(200, "vm-uniq")
    policy = Policy(cfg())
    host = Host(policy, dup, uniq)

    plan = host.round()
    assert [p.pid for p in plan.estimate] == [100, 200]      # one joint estimate for both
    assert plan.mode == "hold" and not plan.knobs
    assert any("waiting for estimates" in t for t in texts(plan))
    estimated(policy, dup, 512 * MiB, at=host.now)
    estimated(policy, uniq, 1 * MiB, at=host.now)

    plan = host.round()
    assert plan.mode == "fast"
    # 2 GiB registered = 524288 pages in 5 s = 104858 pages/s; the 20 % budget at the prior
    # 2 us/page allows 100000 pages/s: clamped, then p = R s / (1 - R c) = 2500 at 20 ms
    assert plan.scan_pages == 524288
    assert plan.budget_pages_per_second == pytest.approx(0.2 / PRIOR_SECONDS_PER_PAGE)
    assert plan.knobs == {"run": 1, "pages_to_scan": 2500}       # sleep_millisecs is already 20
    assert policy.written == {"run": 1, "pages_to_scan": 2500, "sleep_millisecs": 20}
    t = "\n".join(texts(plan))
    assert "pid 100: registered: vm-dup: predicted saving 512.0 MiB (50.0%" in t
    assert "pid 200: not-worth: vm-uniq" in t and "below registration.min_saving 32.0 MiB" in t
    assert plan.predicted_bytes == 512 * MiB and plan.unrealized_bytes == 512 * MiB

    # one full scan, part merged: still fast, nothing rewritten, nothing re-reported
    host.scan(1, 600000, 1.2, saved_pages=50000, profit={100: 50000 * PS})
    plan = host.round()
    assert plan.mode == "fast" and plan.knobs == {} and plan.ksmd_cpu_percent == pytest.approx(12.0)
    assert not [d for d in plan.decisions if d.pid is not None]
    assert plan.realized_bytes == 50000 * PS

    # realized >= 95 % of the prediction: slow, 300 s per full scan at 200 ms sleeps
    host.scan(2, 1048576, 2.1, saved_pages=128000, profit={100: 500 * MiB})
    plan = host.round()
    assert plan.mode == "slow"
    rate = 524288 / 300
    assert plan.knobs == {"pages_to_scan": knobs_for_rate(rate, 200, policy.seconds_per_page, 100000),
                          "sleep_millisecs": 200}
    assert any("saving realized" in t for t in texts(plan))
    assert policy.mode == "slow"


def test_settled_short_of_prediction_goes_slow():
    _, host, plan = estimated_round(proc(1), 512 * MiB)
    assert plan.mode == "fast"
    plans = merge_steadily(host, 65536, scans=3)
    # moving, or not enough scans yet; then settled
    assert [p.mode for p in plans] == ["fast", "fast", "slow"]
    plan = plans[-1]
    assert any("merging settled" in t and "(50%)" in t for t in texts(plan))


def test_a_thp_guest_is_realized_by_the_counters_part_of_its_prediction():
    # a THP-backed guest: 512 MiB predicted, 128 MiB of it zero subpages that ksmd's THP splits
    # hand back outside every KSM counter; the counters can show at most 384 MiB
    guest = proc(1, "qemu")
    policy = Policy(cfg())
    host = Host(policy, guest)
    host.round()
    policy.record_estimate(guest.key, EstimateResult(
        at=host.now, saved_bytes=512 * MiB, scanned_bytes=GiB, saved_percent=50.0,
        counter_bytes=384 * MiB))
    plan = host.round()
    assert plan.mode == "fast"
    assert plan.predicted_bytes == 512 * MiB and plan.counted_bytes == 384 * MiB
    assert plan.unrealized_bytes == 384 * MiB
    # the counters reach 370 MiB = 96 % of their part: realized, slow (without the split the
    # daemon saw 72 % and stayed fast until merging settled)
    host.scan(1, 262144, 0.5, saved_pages=370 * MiB // PS, profit={1: 370 * MiB})
    plan = host.round()
    assert plan.mode == "slow"
    assert plan.unrealized_bytes == 14 * MiB
    t = "\n".join(texts(plan))
    assert "realized 370.0 MiB of predicted 384.0 MiB (of 512.0 MiB in all: THP splits" in t
    assert "(96%)" in t and "saving realized" in t


def test_new_registration_restarts_the_settle_count():
    policy, host, _ = estimated_round(proc(1, "a"), 512 * MiB)
    assert merge_steadily(host, 65536)[-1].mode == "slow"
    b = proc(2, "b")
    host.procs.append(b)
    host.round()
    estimated(policy, b, 256 * MiB, at=host.now)
    plan = host.round()
    assert plan.mode == "fast" and plan.knobs["sleep_millisecs"] == 20


def test_nothing_worth_merging_stops_ksmd():
    policy, host, plan = estimated_round(proc(1), 4 * MiB, run=1)
    assert plan.mode == "stopped" and plan.knobs == {"run": 0}
    assert any("nothing worth merging" in t and "merged pages stay" in t for t in texts(plan))
    policy.cfg.ksmd.stop_when_idle = False
    plan = host.round()
    assert plan.mode == "slow" and plan.knobs["run"] == 1


def test_cpu_budget_measured_cost_and_daemon_share():
    policy, host, _ = estimated_round(proc(1, size=4 * GiB), 2 * GiB,
                                      cfg(ksmd={"cpu_budget_percent": 10.0}))
    # ksmd spent 10 us per page, the daemon 20 % of a CPU: the cost moves halfway (EWMA 0.5)
    # to 6 us, and the daemon's share (10 % after the EWMA) eats the whole budget but ksmd's floor
    host.scan(0, 100000, 1.0)
    host.daemon_cpu += 2.0
    plan = host.round()
    assert policy.seconds_per_page == pytest.approx(6e-6)
    assert plan.daemon_cpu_percent == pytest.approx(20.0)
    assert plan.budget_pages_per_second == pytest.approx(0.1 * 0.25 / 6e-6)
    assert plan.target_pages_per_second == pytest.approx(plan.budget_pages_per_second)
    # the chosen knobs keep ksmd within its share: p / (s + p c) * c <= share
    p, s = host.knobs["pages_to_scan"], host.knobs["sleep_millisecs"] / 1000
    assert p / (s + p * 6e-6) * 6e-6 <= 0.1 * 0.25 * 1.01


def test_unspent_budget_lets_a_fast_scan_burst_until_it_is_spent():
    # 20 % over 60 s: 12 CPU-s of credit
    policy, host, plan = estimated_round(proc(1, size=GiB), 400 * MiB,
                                         cfg(ksmd={"cpu_budget_window": 60.0}))
    assert plan.mode == "fast" and plan.bursting and policy.cpu_credit == pytest.approx(12.0)
    assert plan.knobs == {"run": 1, "pages_to_scan": 100000, "sleep_millisecs": 0}
    # 11 CPU-s of ksmd and 2 of the daemon over 5 s: the credit (12 + 0.2 * 5 - 13) is spent
    host.scan(1, 262144, 11.0)
    host.daemon_cpu += 2.0
    plan = host.round(dt=5)
    assert policy.cpu_credit == pytest.approx(0.0, abs=1e-9) and not plan.bursting
    # back within the average budget: ksmd's share of 20 %, minus the daemon's
    assert plan.target_pages_per_second * policy.seconds_per_page <= 0.2
    assert plan.knobs["sleep_millisecs"] > 0
    # idle time refills it at the budget rate, up to one window's worth
    plan = host.round(dt=1000)
    assert policy.cpu_credit == pytest.approx(12.0) and plan.bursting


def test_slow_mode_never_bursts():
    _, host, _ = estimated_round(proc(1, size=GiB), 400 * MiB, cfg(ksmd={"cpu_budget_window": 60.0}))
    host.scan(3, 3 * 262144, 1.0, saved_pages=400 * MiB // PS, profit={1: 400 * MiB})
    plan = host.round()
    assert plan.mode == "slow" and not plan.bursting and plan.knobs["sleep_millisecs"] > 0


def test_small_cost_drift_does_not_rewrite_knobs():
    _, host, plan = estimated_round(proc(1, size=4 * GiB), 2 * GiB)
    first = plan.knobs["pages_to_scan"]
    host.scan(0, 100000, 0.22)            # 2.2 us/page: a 5 % change
    plan = host.round()
    assert "pages_to_scan" not in plan.knobs and host.knobs["pages_to_scan"] == first


def test_memory_pressure_scans_faster_within_budget():
    policy, host, _ = estimated_round(proc(1), 512 * MiB)
    plan = merge_steadily(host, 131072)[-1]
    assert plan.mode == "slow"
    calm = plan.target_pages_per_second
    host.memory = Memory(total=16 * GiB, available=GiB // 2, psi_some_avg10=30.0)
    plan = host.round()
    assert plan.pressure and plan.target_pages_per_second == pytest.approx(4 * calm)
    assert any("memory pressure" in t for t in texts(plan))
    assert plan.knobs["pages_to_scan"] > host.knobs.get("pages_to_scan", 0) // 2
    # in fast mode the budget caps the speedup
    host.memory = Memory(total=16 * GiB, available=GiB // 2, psi_some_avg10=30.0)
    big = proc(2, "big", size=8 * GiB)
    host.procs.append(big)
    host.round()
    estimated(policy, big, 4 * GiB, at=host.now)
    plan = host.round(dt=100)
    assert plan.mode == "fast" and plan.target_pages_per_second == pytest.approx(plan.budget_pages_per_second)


def test_estimator_budget_is_a_token_bucket_with_debt():
    a = proc(1, size=2 * GiB)
    policy = Policy(cfg(estimate={"scan_budget": 256 * MiB}))
    host = Host(policy, a)
    plan = host.round()
    assert [p.pid for p in plan.estimate] == [1]
    # the bucket holds at most one interval of budget (2.5 GiB); 2 GiB x 2 passes is paid afterwards
    assert policy.tokens == 2.5 * GiB - 4 * GiB
    estimated(policy, a, 0, at=host.now)
    host.procs.append(proc(2, "b"))
    plan = host.round(dt=2)
    assert plan.estimate == [] and any("in debt, next estimate in 4 s" in t for t in texts(plan))
    plan = host.round(dt=5)
    assert [p.pid for p in plan.estimate] == [2]
    assert policy.estimated_bytes_total == 6 * GiB
    # re-estimated after estimate.reestimate_seconds
    policy.record_estimate(proc(2, "b").key, EstimateResult(host.now, 0, GiB, 0.0))
    plan = host.round(dt=600)
    assert sorted(p.pid for p in plan.estimate) == [1, 2]


def test_failed_estimate_is_retried_only_after_the_reestimate_interval():
    a = proc(1)
    policy = Policy(cfg())
    host = Host(policy, a)
    host.round()
    policy.record_estimate(a.key, None, error="permission denied", now=host.now)
    plan = host.round(dt=100)
    assert plan.estimate == [] and any("cannot estimate: permission denied" in t for t in texts(plan))
    assert plan.mode == "stopped"
    plan = host.round(dt=600)
    assert [p.pid for p in plan.estimate] == [1]


def test_unregistered_process_needs_injection():
    vm = proc(1, registered=False)
    policy, host, plan = estimated_round(vm, 512 * MiB, cfg(candidates={"names": ["vm"]}))
    assert plan.register == [] and plan.mode == "stopped"
    assert any("would need injection; not allowed by config" in t for t in texts(plan))

    policy.reconfigure(cfg(candidates={"names": ["vm"]}, registration={"allow_injection": True,
                                                                         "inject_mode": "madvise"}))
    plan = host.round()
    assert [(a.info.pid, a.mode, a.ranges) for a in plan.register] == [(1, "madvise", None)]
    assert plan.mode == "fast"                   # registration under way: scan for it
    assert host.round().register == []           # not repeated while waiting for the mg flags
    policy.record_registration(vm.key, False, "target is traced by a debugger", host.now)
    plan = host.round()
    assert plan.register == [] and any("injection failed: target is traced" in t for t in texts(plan))
    assert plan.mode == "stopped"                # nothing registered after all: nothing to scan


def test_knobs_changed_by_someone_else_are_reported_and_left_alone():
    policy, host, plan = estimated_round(proc(1), 512 * MiB)
    # 1 GiB = 262144 pages in 5 s at 20 ms sleeps: p = R s / (1 - R c) = 1172
    assert plan.knobs["pages_to_scan"] == 1172
    host.knobs["pages_to_scan"] = 777                # an operator, or ksmtuned
    plan = host.round()
    assert "pages_to_scan" not in plan.knobs
    assert any(d.kind == "external" and "pages_to_scan was changed by someone else (1172 -> 777)"
               in d.reason for d in plan.decisions)
    assert policy.yielded == {"pages_to_scan": 777} and "pages_to_scan" not in policy.written
    plans = merge_steadily(host, 131072)
    assert not any("pages_to_scan" in p.knobs for p in plans)      # even when the mode changes
    plan = plans[-1]
    assert plan.mode == "slow" and host.knobs["pages_to_scan"] == 777
    policy.reconfigure(policy.cfg)                   # SIGHUP: ours to decide again
    assert "pages_to_scan" in host.round().knobs


def test_advisor_mode_owns_the_scan_rate():
    vm = proc(1)
    policy = Policy(cfg())
    host = Host(policy, vm)
    host.knobs.update(advisor_mode="scan-time", pages_to_scan=500)
    first = host.round()
    assert sum("advisor" in t for t in texts(first)) == 1      # said once
    estimated(policy, vm, 512 * MiB)
    plan = host.round()
    assert plan.mode == "fast" and plan.knobs == {"run": 1}
    assert not any("advisor" in t for t in texts(plan))


def test_use_zero_pages_setting():
    vm = proc(1)
    policy = Policy(cfg(ksmd={"use_zero_pages": "on"}))
    host = Host(policy, vm)
    plan = host.round()
    assert plan.knobs == {"use_zero_pages": True}


def test_exited_process_is_forgotten():
    a, b = proc(1, "a"), proc(2, "b")
    policy = Policy(cfg())
    host = Host(policy, a, b)
    host.round()
    host.procs = [a]
    plan = host.round()
    assert any(d.action == "forget" and d.pid == 2 for d in plan.decisions)
    assert list(policy.procs) == [a.key]
    # same pid, new process (start time differs): a new candidate, not the old estimate
    host.procs = [a, dataclasses.replace(b, start_time=999)]
    plan = host.round()
    assert any(d.action == "track" and d.pid == 2 for d in plan.decisions)


RANGES = ((0x7f0000000000, 0x7f0000000000 + 448 * MiB),)


def estimated_with_ranges(**registration):
    """An unregistered 1 GiB process whose estimate puts its saving in RANGES (448 MiB): the
    plan of the round after the estimate."""
    vm = proc(1, registered=False)
    policy = Policy(cfg(candidates={"names": ["vm"]},
                        registration={"allow_injection": True, **registration}))
    host = Host(policy, vm)
    host.round()
    policy.record_estimate(vm.key, EstimateResult(0.0, 400 * MiB, GiB, 39.0, ranges=RANGES,
                                                  range_bytes=448 * MiB))
    return vm, policy, host, host.round()


def test_range_granularity_registers_only_the_saving_ranges():
    vm, policy, host, plan = estimated_with_ranges()
    assert plan.register == [Register(vm, "madvise", RANGES)]
    assert any("opting 1 range holding the predicted saving (448.0 MiB of 1024.0 MiB resident)" in t
               for t in texts(plan))
    # ksmd's speed is sized for the ranges, not the whole process
    assert plan.scan_pages == 448 * MiB // PS and plan.mode == "fast"

    # registered now: mg flags cover the ranges; the same ranges again are not re-registered
    host.procs = [dataclasses.replace(vm, registered_bytes=448 * MiB)]
    assert host.round(dt=700).register == []
    # a newer estimate finds saving outside them: only then is there more to register
    more = RANGES + ((0x7f1000000000, 0x7f1000000000 + 64 * MiB),)
    policy.record_estimate(vm.key, EstimateResult(host.now, 440 * MiB, GiB, 43.0, ranges=more,
                                                  range_bytes=512 * MiB))
    plan = host.round()
    assert plan.register == [Register(host.procs[0], "madvise", more)]
    assert any("new estimate puts saving outside the registered ranges" in t for t in texts(plan))


def test_process_granularity_ignores_the_ranges():
    vm, _, _, plan = estimated_with_ranges(granularity="process")
    assert plan.register == [Register(vm, "auto", None)]
    assert plan.scan_pages == GiB // PS


def test_decides_within_a_round_weigh_the_daemon_cpu_by_their_time():
    """A round that estimates decides again seconds later: that short stretch (mostly the
    estimate's own CPU) counts for its time, not as a whole round's sample."""
    policy, host, _ = estimated_round(proc(1, size=4 * GiB), 2 * GiB)
    assert policy.daemon_cpu_share == 0.0
    host.daemon_cpu += 0.5                       # the estimate: 0.5 CPU-s in 0.5 s
    host.round(dt=0.5)
    assert policy.daemon_cpu_share == pytest.approx(ewma_weight(0.5, 0.5, 10.0))
    assert policy.daemon_cpu_share < 0.05        # a whole round's weight would make it 0.5
    # a whole daemon.interval (or more) still weighs 0.5, as before
    assert ewma_weight(0.5, 10.0, 10.0) == 0.5 and ewma_weight(0.5, 60.0, 10.0) == 0.5
    # two halves of an interval weigh as much as one whole interval
    assert 1 - (1 - ewma_weight(0.5, 5.0, 10.0)) ** 2 == pytest.approx(0.5)


def test_metrics_collector_reads_the_snapshot_at_scrape_time():
    from prometheus_client.registry import CollectorRegistry

    from udedup.daemon.metrics import DaemonCollector
    from udedup.daemon.snapshot import DaemonIdentity, build_snapshot, round_figures
    policy = Policy(cfg())
    host = Host(policy, proc(1))
    current = [None]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(lambda: current[0]))
    assert registry.get_sample_value("udedup_up") == 0.0
    obs_plan = host.round()
    ident = DaemonIdentity(pid=1, pid_start_time=1, started_at=0.0, ksm_root="/x", dry_run=False,
                           config_file=None)
    obs = Observation(now=host.now, processes=tuple(host.procs), counters=dict(host.counters),
                      knobs=dict(host.knobs), saved_bytes=0, page_size=PS, ksmd_cpu_seconds=0.0,
                      daemon_cpu_seconds=0.0)
    current[0] = build_snapshot(ident, policy.cfg, policy, now_wall=0.0, rounds=1, original=KNOBS,
                                metrics_url=None, knob_writes=0,
                                last=round_figures(obs_plan, obs, dry_run=False))
    assert registry.get_sample_value("udedup_up") == 1.0
    assert registry.get_sample_value("udedup_mode", {"mode": "hold"}) == 1.0
    assert registry.get_sample_value("udedup_process_registered", {"pid": "1", "name": "vm"}) == 1.0
    state = current[0].state()
    assert state["processes"][0]["pid"] == 1 and state["mode"] == "hold"
    assert current[0].status_line().startswith("hold: saved 0.00 GiB")
