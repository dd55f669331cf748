"""The idle watch and idle spacing of rounds (udedup.daemon.idlewatch, Daemon.next_interval), on
fake /proc and KSM trees: what moves calls a round, what does not stays quiet."""
from __future__ import annotations

import dataclasses

from udedup.daemon.idlewatch import RSS_SLACK_BYTES, IdleWatch
from udedup.daemon.loop import QUIET_ROUNDS, Daemon
from udedup.ksm import Ksm

from daemon_fakes import cfg, fake_proc, fake_sysfs

MiB = 1 << 20


def host(tmp_path):
    procfs = tmp_path / "proc"
    fake_proc(procfs, 10, "vm-a", ["vm-a"], 512 * 1024, merge_any=True, mappings=[(512 * 1024, True)])
    fake_proc(procfs, 11, "vm-b", ["vm-b"], 256 * 1024, merge_any=True, mappings=[(256 * 1024, True)])
    fake_proc(procfs, 50, "sshd", ["sshd"], 2 * 1024)
    sysfs = fake_sysfs(tmp_path / "ksm")
    ksm = Ksm(str(sysfs), procfs=str(procfs))
    return procfs, sysfs, ksm


def candidates(procfs, pids):
    """ProcessInfo-like records as a round leaves them: pid, start_time, anon_rss."""
    from udedup.daemon.observe import discover_processes
    return [p for p in discover_processes(str(procfs)) if p.pid in pids]


def set_rss(procfs, pid, kib):
    status = procfs / str(pid) / "status"
    lines = [f"RssAnon:\t{kib} kB" if line.startswith("RssAnon:") else line
             for line in status.read_text().splitlines()]
    status.write_text("\n".join(lines) + "\n")


def test_a_quiet_host_stays_quiet_and_small_new_processes_are_dismissed(tmp_path):
    procfs, sysfs, ksm = host(tmp_path)
    w = IdleWatch(str(procfs), ksm, min_anon_rss=32 * MiB)
    assert w.moved() == "not armed"
    w.arm(candidates(procfs, {10, 11}))
    assert w.moved() is None
    # counters nobody watches move (a scan goes on): quiet
    (sysfs / "pages_scanned").write_text("123456\n")
    assert w.moved() is None
    # drift inside the slack: quiet
    set_rss(procfs, 10, 512 * 1024 + (RSS_SLACK_BYTES >> 10) // 2)
    assert w.moved() is None
    # a small new process (a shell, cron): read once, then remembered
    fake_proc(procfs, 60, "sh", ["sh"], 1024)
    assert w.moved() is None
    (procfs / "60" / "status").unlink()      # not read again: the watch would see it exited
    assert w.moved() is None


def test_what_a_round_acts_on_calls_a_round(tmp_path):
    procfs, sysfs, ksm = host(tmp_path)
    w = IdleWatch(str(procfs), ksm, min_anon_rss=32 * MiB)

    def rearmed():
        w.arm(candidates(procfs, {10, 11}))
        assert w.moved() is None

    rearmed()
    (sysfs / "pages_sharing").write_text("1000\n")
    assert w.moved() == "KSM counters moved"
    rearmed()
    (sysfs / "full_scans").write_text("1\n")
    assert w.moved() == "KSM counters moved"
    rearmed()
    set_rss(procfs, 11, 256 * 1024 + 2 * (RSS_SLACK_BYTES >> 10))
    assert "candidate 11's anonymous memory moved (256 -> 264 MiB)" == w.moved()
    rearmed()
    fake_proc(procfs, 70, "java", ["java"], 300 * 1024)
    assert w.moved() == "new process 70 (java)"
    rearmed()                                  # known after the round: quiet again
    (procfs / "10" / "status").unlink()
    (procfs / "10" / "stat").unlink()
    (procfs / "10").rename(procfs / "gone-10")
    assert w.moved() == "candidate 10 exited"


def test_a_reused_pid_is_a_new_process(tmp_path):
    procfs, sysfs, ksm = host(tmp_path)
    w = IdleWatch(str(procfs), ksm)
    procs = candidates(procfs, {10})
    w.arm([dataclasses.replace(procs[0], start_time=procs[0].start_time + 1)])
    assert w.moved() == "candidate 10 exited"


def test_idle_rounds_are_spaced_by_idle_interval_only_when_quiet_and_slow():
    d = Daemon(cfg(daemon={"interval": 10.0, "fast_interval": 1.0, "idle_interval": 60.0}))
    d.policy.mode = "slow"
    assert d.next_interval() == 10.0 and not d.idle()
    d._quiet_rounds = QUIET_ROUNDS
    assert d.idle() and d.next_interval() == 60.0
    d.policy.mode = "stopped"
    assert d.next_interval() == 60.0
    d.policy.mode = "fast"                    # quiet in fast mode: interval, never idle spacing
    assert not d.idle() and d.next_interval() == 10.0
    d.policy.mode = "slow"
    d.cfg.daemon.idle_interval = 5.0          # at most interval: no idle spacing
    assert not d.idle() and d.next_interval() == 10.0


def test_the_daemon_arms_the_watch_each_round_on_fake_trees(tmp_path):
    procfs, sysfs, ksm = host(tmp_path)
    (procfs / "meminfo").write_text("MemTotal: 16384000 kB\nMemAvailable: 8192000 kB\n")
    c = cfg(daemon={"ksm_root": str(sysfs), "procfs": str(procfs),
                    "state_file": str(tmp_path / "s.json")},
            metrics={"address": ""}, candidates={"names": ["vm-*"]})
    from udedup.daemon.model import EstimateResult

    def fake_estimate(infos, cfg_, use_zero, now):
        return {i.key: EstimateResult(now, 0, i.anon_rss, 0.0) for i in infos}

    d = Daemon(c, clock=lambda: 100.0, estimator=fake_estimate, ksm=ksm)
    d.original = d.ksm.knobs()
    d.run_round()
    assert d.idle_watch.moved() is None
    assert sorted(d.idle_watch._candidates) == [10, 11]     # the candidates, not sshd
    (sysfs / "ksm_zero_pages").write_text("7\n")                # inside the slack: quiet
    assert not d._watch_due(d.latest.last)
    (sysfs / "ksm_zero_pages").write_text("7000\n")             # beyond it: a round now
    assert d._watch_due(d.latest.last)


def test_merge_counters_drift_within_the_slack_without_a_round(tmp_path):
    from udedup.daemon.idlewatch import COUNTER_SLACK_PAGES, counters_moved
    procfs, sysfs, ksm = host(tmp_path)
    (sysfs / "pages_sharing").write_text("200000\n")
    w = IdleWatch(str(procfs), ksm)
    w.arm(candidates(procfs, {10}))
    (sysfs / "pages_sharing").write_text("200900\n")       # 0.45 %: a guest's kernel at work
    assert w.moved() is None
    (sysfs / "pages_sharing").write_text("201100\n")       # 0.55 %: a round
    assert w.moved() == "KSM counters moved"
    assert not counters_moved((0, 0, 0, 5), (COUNTER_SLACK_PAGES, 0, 0, 5))
    assert counters_moved((0, 0, 0, 5), (COUNTER_SLACK_PAGES + 1, 0, 0, 5))
    assert counters_moved((0, 0, 0, 5), (0, 0, 0, 6))     # a full scan ended: always a round
    assert counters_moved(None, (0, 0, 0, 5))
