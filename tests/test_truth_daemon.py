"""The daemon's round carries the true saving beside the kernel's counters: read once per round
by the Observer, in the round's figures, the state file and the metrics."""
from __future__ import annotations

import numpy as np

from udedup.daemon.loop import Daemon
from udedup.daemon.metrics import DaemonCollector
from udedup.daemon.model import EstimateResult

from daemon_fakes import cfg, fake_proc, fake_sysfs
from test_truth import PS, ZERO, ZERO_PFNS, present, write_proc



def metric_values(collector) -> dict:
    return {s.name: s.value for family in collector.collect() for s in family.samples}


def daemon_on_trees(tmp_path):
    from udedup.ksm import Ksm
    procfs = tmp_path / "proc"
    e = np.full(1000, present(55), dtype=np.uint64)
    e[:400] = present(ZERO)                 # zero subpages of THPs ksmd split
    write_proc(procfs, 10, [(1000, True, e)], kzero=0, comm="vm-a")
    fake_proc(procfs, 11, "vm-b", ["vm-b"], 4096, merge_any=True, mappings=[(4096, True)])
    (procfs / "meminfo").write_text("MemTotal: 16384000 kB\nMemAvailable: 8192000 kB\n")
    sysfs = fake_sysfs(tmp_path / "ksm")
    (sysfs / "pages_sharing").write_text("300\n")
    (sysfs / "general_profit").write_text(str(300 * PS - 600 * 64) + "\n")
    c = cfg(daemon={"ksm_root": str(sysfs), "procfs": str(procfs),
                    "state_file": str(tmp_path / "s.json")},
            metrics={"address": ""}, candidates={"names": ["vm-*"]})

    def fake_estimate(infos, cfg_, use_zero, now):
        return {i.key: EstimateResult(now, 0, i.anon_rss, 0.0) for i in infos}

    clock = [100.0]
    d = Daemon(c, clock=lambda: clock[0], estimator=fake_estimate,
               ksm=Ksm(str(sysfs), procfs=str(procfs)))
    d.original = d.ksm.knobs()
    d.observer.truth._zero_pfns = ZERO_PFNS      # the fake tree has no self/pagemap to probe
    return d, sysfs, procfs, clock


def test_round_state_and_metrics_carry_the_true_saving(tmp_path):
    d, sysfs, procfs, clock = daemon_on_trees(tmp_path)
    reads = []
    real_read = d.observer.truth.read
    d.observer.truth.read = lambda stats=None: reads.append(1) or real_read(stats)
    d.run_round()
    assert len(reads) == 1                   # once per round, however many observations
    r = d.latest.last
    assert r.true_saved_bytes == (300 + 400) * PS and r.zero_mapped_pages == 400
    assert r.saved_bytes == 300 * PS - 600 * 64          # the kernel's figure stays
    assert r.true_read_seconds is not None and r.true_read_seconds >= 0
    state = d.latest.state()
    assert state["true_saved_bytes"] == 700 * PS and state["zero_mapped_pages"] == 400
    assert state["saved_bytes"] == 300 * PS - 600 * 64
    assert "really" in d.latest.status_line()
    m = metric_values(DaemonCollector(lambda: d.latest))
    assert m["udedup_true_saved_bytes"] == 700 * PS
    assert m["udedup_zero_mapped_pages"] == 400
    assert m["udedup_saved_bytes"] == 300 * PS - 600 * 64
    assert "udedup_true_savings_read_seconds" in m
    clock[0] += 10
    (sysfs / "pages_sharing").write_text("310\n")
    d.run_round()       # a drift within the slack: the walk stands, the counters are fresh
    assert len(reads) == 1 and d.latest.last.true_saved_bytes == 710 * PS
    clock[0] += 10
    (sysfs / "pages_sharing").write_text("3000\n")
    d.run_round()       # ksmd merged: walked again
    assert len(reads) == 2 and d.latest.last.true_saved_bytes == 3400 * PS


def test_observations_within_one_round_reuse_the_walk_with_fresh_counters(tmp_path):
    d, sysfs, procfs, clock = daemon_on_trees(tmp_path)
    reads = []
    real_read = d.observer.truth.read
    d.observer.truth.read = lambda stats=None: reads.append(1) or real_read(stats)
    first = d.observer.observe(d.cfg, lambda key: 0.0, 7)
    (sysfs / "pages_sharing").write_text("320\n")
    again = d.observer.observe(d.cfg, lambda key: 0.0, 7)
    assert len(reads) == 1
    assert first.true_savings.saved_pages == 700 and again.true_savings.saved_pages == 720
    d.observer.observe(d.cfg, lambda key: 0.0, 8)
    assert len(reads) == 1          # the next round, the counters within the slack: it stands
    (sysfs / "pages_sharing").write_text("3000\n")
    d.observer.observe(d.cfg, lambda key: 0.0, 9)
    assert len(reads) == 2


def test_a_round_without_a_true_saving_reports_the_counters_only(tmp_path):
    d, sysfs, procfs, clock = daemon_on_trees(tmp_path)

    def broken(stats=None):
        raise OSError("no /proc")
    d.observer.truth.read = broken
    d.run_round()
    r = d.latest.last
    assert r.true_saved_bytes is None and r.saved_bytes == 300 * PS - 600 * 64
    assert d.latest.state()["true_saved_bytes"] is None
    assert "really" not in d.latest.status_line()
    assert "udedup_true_saved_bytes" not in metric_values(DaemonCollector(lambda: d.latest))
