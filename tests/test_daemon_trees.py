"""The daemon's observation and action code, and its rounds, on fake /proc and sysfs trees (no
real process, no real knob; the estimator is replaced by fixed predictions: a fake process has no
memory to read)."""
from __future__ import annotations

import dataclasses

import pytest

from udedup.daemon.act import per_process, restore_knobs, thp_handback_bytes
from udedup.daemon.loop import Daemon, burst_due
from udedup.daemon.model import EstimateResult, Memory
from udedup.daemon.observe import (discover_processes, process_start_time, read_memory,
                                   with_mappings)

from daemon_fakes import RecordingSysFs, add_mapping, cfg, fake_proc, fake_sysfs

PS = 4096
MiB, GiB = 1 << 20, 1 << 30


def test_discovery_and_memory_on_a_fake_proc(tmp_path):
    procfs = tmp_path / "proc"
    fake_proc(procfs, 10, "qemu-system-x86", ["qemu-system-x86_64", "-m", "1G"], 1048576,
              merge_any=True, mappings=[(1048576, True), (2048, False)])
    fake_proc(procfs, 11, "bash", ["bash"], 2048)
    fake_proc(procfs, 2, "kthreadd", [], 0, kthread=True)
    (procfs / "meminfo").write_text("MemTotal: 16384000 kB\nMemFree: 100 kB\nMemAvailable: 8192000 kB\n")
    (procfs / "pressure").mkdir()
    (procfs / "pressure" / "memory").write_text(
        "some avg10=1.50 avg60=0.20 avg300=0.00 total=10\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")

    found = {p.pid: p for p in discover_processes(str(procfs))}
    assert sorted(found) == [10, 11]                    # the kernel thread is skipped
    # below candidates.min_anon_rss: left out before its other files are read
    assert [p.pid for p in discover_processes(str(procfs), min_anon_rss=64 * MiB)] == [10]
    q = found[10]
    assert (q.name, q.cmdline, q.uid, q.cgroup, q.anon_rss, q.merge_any, q.start_time) == (
        "qemu-system-x86", "qemu-system-x86_64 -m 1G", 0, "/machine.slice/vm.scope", GiB, True, 70)
    q, maps = with_mappings(q, str(procfs))
    assert len(maps) == 2 and maps[0].registered
    assert q.registered_bytes == GiB and q.eligible_bytes == GiB + 2 * MiB
    mem = read_memory(str(procfs))
    assert mem == Memory(total=16384000 * 1024, available=8192000 * 1024, psi_some_avg10=1.5)
    assert process_start_time(10, str(procfs)) == 70


def test_discovery_skips_vanished_processes_and_reports_an_unlistable_proc(tmp_path):
    from udedup.errors import ProcessAccessError
    procfs = tmp_path / "proc"
    fake_proc(procfs, 10, "vm", ["vm"], 1048576)
    fake_proc(procfs, 11, "gone", ["gone"], 1048576)
    (procfs / "11" / "status").unlink()              # exited between its stat and its status
    (procfs / "12").mkdir()                          # exited before its stat was read
    assert [p.pid for p in discover_processes(str(procfs))] == [10]
    with pytest.raises(ProcessAccessError, match="cannot list"):
        discover_processes(str(tmp_path / "no-proc"))


def test_per_process_prediction_pays_rmap_items_for_what_ksmd_scans():
    """64 bytes of rmap item per page ksmd would scan: the ranges' pages when only they are
    registered, every scanned page otherwise."""
    target = dataclasses.make_dataclass("T", ["pid", "kind", "exited", "scanned_pages",
                                              "unreadable_pages", "zero_pages", "saved_pages",
                                              "saving_ranges", "range_pages"])
    t = target(7, "process", False, 1000, 0, 100, (600, 700), [(0x1000, 0x1000 + 800 * PS)], 800)
    est = type("E", (), {"page_size": PS, "targets": [t]})()
    whole = per_process(est, [7], use_zero_pages=False)
    ranges = per_process(est, [7], use_zero_pages=False, by_ranges=True)
    zero = per_process(est, [7], use_zero_pages=True, by_ranges=True)
    assert whole[7] == (600 * PS - 1000 * 64, 1000 * PS, ((0x1000, 0x1000 + 800 * PS),), 800 * PS)
    assert ranges[7][0] == 600 * PS - 800 * 64
    assert zero[7][0] == 700 * PS - 700 * 64


def test_thp_handback_per_process_is_what_no_counter_will_show():
    """The zero subpages THP splits hand back, per process and use_zero_pages, summed over the
    in-scope mappings only: the part of a prediction KSM's counters never show."""
    from udedup.estimate.model import MappingReport
    from udedup.host.maps import Mapping

    def report(pid, start, in_scope, back0, back1):
        m = Mapping(start, start + 2 * 1024 * 1024, "rw-p", 0, "00:00", 0, "", frozenset({"mg"}))
        r = MappingReport(pid, m, in_scope)
        r.thp_zero_pages = {0: back0, 1: back1}
        return r

    est = type("E", (), {"page_size": PS, "mappings": [
        report(7, 0x200000, True, 300, 310), report(7, 0x600000, True, 12, 12),
        report(7, 0xa00000, False, 500, 500),          # out of scope: ksmd never scans it
        report(9, 0x200000, True, 0, 0)]})()
    assert thp_handback_bytes(est, use_zero_pages=False) == {7: 312 * PS}
    assert thp_handback_bytes(est, use_zero_pages=True) == {7: 322 * PS}
    assert thp_handback_bytes(type("E", (), {"page_size": PS, "mappings": []})(), False) == {}
    # the daemon's result: counter_bytes the prediction less the handback, saved_bytes all of it
    r = EstimateResult(0.0, 500 * PS, 1000 * PS, 50.0, counter_bytes=188 * PS)
    assert r.counted_bytes == 188 * PS and r.saved_bytes == 500 * PS
    assert EstimateResult(0.0, 500 * PS, 1000 * PS, 50.0).counted_bytes == 500 * PS


def test_burst_watch_calls_a_round_once_the_saving_is_realized(tmp_path):
    from udedup.ksm import Ksm
    sysfs = fake_sysfs(tmp_path / "ksm")
    ksm = Ksm(str(sysfs), procfs=str(tmp_path))
    # the last round saw full_scans 0 and a prediction of 400 MiB
    due = lambda: burst_due(ksm, 0, 400 * MiB, cfg().ksmd.realized_percent)  # noqa: E731
    (sysfs / "general_profit").write_text(str(300 * MiB))
    assert not due()                                # 75 % of the prediction: keep bursting
    (sysfs / "general_profit").write_text(str(390 * MiB))
    assert due()                                    # >= ksmd.realized_percent (95 %): decide now
    (sysfs / "general_profit").write_text("0")
    (sysfs / "full_scans").write_text("1")
    assert due()                                    # a full scan ended: the policy looks at settling


def test_rounds_come_faster_while_ksmd_scans_fast():
    d = Daemon(cfg(daemon={"interval": 10.0, "fast_interval": 0.5}))
    d.policy.mode = "fast"
    assert d.next_interval() == 0.5
    d.policy.mode = "slow"
    assert d.next_interval() == 10.0


def test_daemon_rounds_on_fake_trees_write_the_fake_knobs(tmp_path):
    """Observe -> decide -> act, end to end over fake trees, with the estimator replaced by fixed
    predictions (a fake process has no memory to read) and a fake clock."""
    from udedup.ksm import Ksm
    procfs = tmp_path / "proc"
    fake_proc(procfs, 10, "vm-dup", ["vm-dup"], 1048576, merge_any=True, mappings=[(1048576, True)])
    fake_proc(procfs, 11, "vm-uniq", ["vm-uniq"], 1048576, merge_any=True, mappings=[(1048576, True)])
    fake_proc(procfs, 12, "vm-cold", ["vm-cold"], 524288, mappings=[(524288, False)])
    (procfs / "meminfo").write_text("MemTotal: 16384000 kB\nMemAvailable: 8192000 kB\n")
    sysfs = fake_sysfs(tmp_path / "ksm")
    c = cfg(daemon={"ksm_root": str(sysfs), "procfs": str(procfs), "state_file": str(tmp_path / "s.json")},
            metrics={"address": ""}, candidates={"names": ["vm-*"]})
    predicted = {10: 600 * MiB, 11: 0, 12: 0}
    calls = []

    def fake_estimate(infos, cfg_, use_zero, now):
        calls.append(sorted(i.pid for i in infos))
        return {i.key: EstimateResult(now, predicted[i.pid], i.anon_rss,
                                      100.0 * predicted[i.pid] / i.anon_rss) for i in infos}

    kernel = RecordingSysFs(str(tmp_path))
    clock = [100.0]
    d = Daemon(c, clock=lambda: clock[0], estimator=fake_estimate,
               ksm=Ksm(str(sysfs), procfs=str(procfs), sysfs=kernel))
    d.original = d.ksm.knobs()
    d.run_round()
    assert calls == [[10, 11, 12]]
    read = lambda name: (sysfs / name).read_text().strip()  # noqa: E731
    assert read("run") == "1" and read("sleep_millisecs") == "20"
    assert int(read("pages_to_scan")) == 2500            # 2 GiB registered, clamped by the budget
    assert d.policy.written == {"run": 1, "pages_to_scan": 2500, "sleep_millisecs": 20}
    assert kernel.writes == [("pages_to_scan", "2500"), ("run", "1")]    # speed first, run last
    state = d.latest.state()
    assert state["mode"] == "fast" and state["original_knobs"]["run"] == 0
    # realized: the fake counters say 600 MiB are saved, over three full scans
    (sysfs / "pages_sharing").write_text(str(600 * MiB // PS))
    (sysfs / "general_profit").write_text(str(600 * MiB))
    (sysfs / "full_scans").write_text("3")
    (procfs / "10" / "ksm_stat").write_text(
        "ksm_rmap_items 262144\nksm_zero_pages 0\nksm_merging_pages 153600\n"
        f"ksm_process_profit {600 * MiB}\nksm_merge_any: yes\nksm_mergeable: yes\n")
    clock[0] += 10

    # a 4 kB mapping more in every smaps: a process whose smaps the next round reads shows it
    for pid in (10, 11, 12):
        add_mapping(procfs, pid)

    def smaps_reads(extra_kb):
        """The processes whose figures include the ``extra_kb`` added: read since."""
        return sorted(key[0] for key, p in d.policy.procs.items()
                      if p.info.eligible_bytes % MiB == extra_kb * 1024)
    d.run_round()
    assert read("sleep_millisecs") == "200" and d.policy.mode == "slow"
    # smaps walks page tables: the unregistered process known not to be worth it is not read
    # again (the registered ones are, every daemon.interval: ksmd scans them whatever we think)
    assert smaps_reads(4) == [10, 11]
    for pid in (10, 11, 12):
        add_mapping(procfs, pid, start=0x7D0000000000)
    clock[0] += 1
    d.run_round()
    assert smaps_reads(8) == []               # one second later: the figures are current enough
    assert d.policy.procs[(12, 84)].info.eligible_bytes == GiB // 2      # figures of the last read
    restored, left = restore_knobs(d.ksm, d.original, d.policy.written)
    assert restored == {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20} and left == {}
    assert (read("run"), read("pages_to_scan"), read("sleep_millisecs")) == ("0", "100", "20")


def test_estimate_screen_and_injection_read_the_configured_procfs(tmp_path):
    """daemon.procfs reaches the estimator, the screen and injection: this process, alive under
    the real /proc, does not exist under an empty fake one."""
    import os

    from udedup.daemon.act import estimate_processes, register_process, screen_processes
    from udedup.daemon.model import ProcessInfo
    empty = tmp_path / "proc"
    empty.mkdir()
    me = ProcessInfo(pid=os.getpid(), start_time=1, name="me", anon_rss=GiB)
    c = cfg(daemon={"procfs": str(empty)}, registration={"min_saving": 64 * MiB})
    got = estimate_processes([me], c, use_zero_pages=False, now=0.0)
    assert got[me.key].startswith(f"no process with PID {os.getpid()}")
    assert screen_processes([me], c, now=0.0) == {}      # the sample failed: left to the estimate
    ok, why = register_process(me, "auto", procfs=str(empty))
    assert not ok and why.startswith(f"no process with PID {os.getpid()}")
