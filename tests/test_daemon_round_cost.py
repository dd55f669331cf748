"""What a daemon round costs: one smaps read per candidate per round, the true-saving walk reused
while nothing it depends on moved, and daemon.interval rounds on a quiet host in fast mode."""
from __future__ import annotations

import os
from types import SimpleNamespace

from udedup.daemon.loop import QUIET_ROUNDS, Daemon
from udedup.daemon.observe import TRUTH_REUSE_SECONDS, Observer
from udedup.ksm import Ksm

from daemon_fakes import SMAPS_ENTRY, cfg, fake_proc, fake_sysfs


def host(tmp_path, pids=(10, 11)):
    procfs = tmp_path / "proc"
    for pid in pids:
        fake_proc(procfs, pid, f"t{pid}", [f"t{pid}"], 1048576, merge_any=True,
                  mappings=[(1048576, True)])
        write_maps(procfs, pid)
    (procfs / "meminfo").write_text("MemTotal: 16384000 kB\nMemAvailable: 8192000 kB\n")
    sysfs = fake_sysfs(tmp_path / "ksm")
    return procfs, sysfs, Ksm(str(sysfs), procfs=str(procfs))


def write_maps(procfs, pid):
    """/proc/PID/maps from the fake smaps (its header lines)."""
    smaps = (procfs / str(pid) / "smaps").read_text().splitlines()
    heads = [line for line in smaps if line and ":" not in line.split()[0]]
    (procfs / str(pid) / "maps").write_text("".join(h + "\n" for h in heads))


def set_counter(sysfs, name, value):
    path = os.path.join(str(sysfs), name)
    os.chmod(path, 0o644)
    with open(path, "w") as f:
        f.write(f"{value}\n")


def count_smaps_reads(ob):
    reads = []
    real = ob.procfs.read_text

    def read_text(pid, name, *args, **kwargs):
        if name == "smaps":
            reads.append(pid)
        return real(pid, name, *args, **kwargs)
    ob.procfs.read_text = read_text
    return reads


def count_walks(ob):
    walks = []
    real = ob.truth.read

    def read(stats=None):
        walks.append(stats)
        return real(stats)
    ob.truth.read = read
    return walks


def test_a_round_reads_each_candidates_smaps_once_and_the_truth_walk_follows_changes(tmp_path):
    procfs, _sysfs, ksm = host(tmp_path)
    ob = Observer(str(procfs), ksm)
    reads = count_smaps_reads(ob)
    c = cfg(candidates={"names": ["t*"]})
    got = ob.observe(c, lambda key: 0.0, 1)
    assert len(got.processes) == 2 and got.true_savings is not None
    # with_mappings read both; the truth walk took their mg ranges (before: 4 reads)
    assert sorted(reads) == [10, 11]
    assert ob.truth.ranges_cache._kept[10][2] == ((0x7F0000000000, 0x7F0000000000 + 1048576 * 1024),)
    # pid 10 gets a new mapping, its smaps figures still young for the observer: the maps text
    # changed, so the truth walk reads its smaps itself and sees the new range
    with open(procfs / "10" / "smaps", "a") as f:
        f.write(SMAPS_ENTRY.format(start=0x7E0000000000, end=0x7E0000002000, path="", kb=8,
                                   mg=" mg"))
    write_maps(procfs, 10)
    reads.clear()
    ob.note_change()                   # a registration: the walk is redone
    ob.observe(c, lambda key: 100.0, 2)
    assert reads == [10]
    assert len(ob.truth.ranges_cache._kept[10][2]) == 2


def test_the_truth_walk_is_reused_while_nothing_it_depends_on_moved(tmp_path):
    procfs, sysfs, ksm = host(tmp_path)
    clock = [100.0]
    ob = Observer(str(procfs), ksm, clock=lambda: clock[0])
    walks = count_walks(ob)
    c = cfg(candidates={"names": ["t*"]})
    first = ob.observe(c, lambda key: 100.0, 1)
    assert len(walks) == 1 and first.true_savings.age_seconds == 0.0
    clock[0] += 10.0
    again = ob.observe(c, lambda key: 100.0, 2)
    assert len(walks) == 1                              # same counters, processes, no action
    assert again.true_savings.age_seconds == 10.0       # marked: a walk 10 s old
    assert again.true_savings.zero_mapped_pages == first.true_savings.zero_mapped_pages
    assert again.true_savings.breakdown()["age_seconds"] == 10.0
    set_counter(sysfs, "pages_sharing", 5)              # a drift inside the slack: reused
    clock[0] += 10.0
    drift = ob.observe(c, lambda key: 100.0, 3)
    assert len(walks) == 1 and drift.true_savings.stats.pages_sharing == 5   # fresh counters
    set_counter(sysfs, "pages_sharing", 5000)           # ksmd merged: walk again
    clock[0] += 10.0
    moved = ob.observe(c, lambda key: 100.0, 4)
    assert len(walks) == 2 and moved.true_savings.age_seconds == 0.0
    assert moved.true_savings.stats.pages_sharing == 5000
    ob.note_change()                                    # a registration: walk again
    clock[0] += 10.0
    ob.observe(c, lambda key: 100.0, 5)
    assert len(walks) == 3
    clock[0] += 10.0
    ob.observe(c, lambda key: 100.0, 6)
    assert len(walks) == 3
    clock[0] += TRUTH_REUSE_SECONDS                     # too old: walked again
    ob.observe(c, lambda key: 100.0, 7)
    assert len(walks) == 4
    fake_proc(procfs, 12, "t12", ["t12"], 1048576, merge_any=True, mappings=[(1048576, True)])
    write_maps(procfs, 12)                              # a new candidate: walk again
    clock[0] += 1.0
    ob.observe(c, lambda key: 100.0, 8)
    assert len(walks) == 5


def obs(counters, keys=((10, 1),)):
    procs = tuple(SimpleNamespace(key=k, merge_any=True, mergeable=True) for k in keys)
    return SimpleNamespace(counters=counters, processes=procs)


def test_a_fast_daemon_rounds_every_interval_once_counters_and_candidates_are_steady():
    d = Daemon(cfg(daemon={"interval": 10.0, "fast_interval": 0.5}))
    d.policy.mode = "fast"
    steady = {"pages_sharing": 100, "pages_shared": 10, "ksm_zero_pages": 0, "full_scans": 3,
              "pages_scanned": 5000}
    for _ in range(QUIET_ROUNDS):
        d._note_quiet(obs(steady), acted=False)
        assert d.next_interval() == 0.5                 # not quiet long enough yet
    d._note_quiet(obs(dict(steady, pages_scanned=9000)), acted=False)
    assert d.next_interval() == 10.0                    # pages_scanned alone is not a move
    d._note_quiet(obs(dict(steady, pages_scanned=9000, pages_sharing=1100)), acted=False)
    assert d.next_interval() == 0.5                     # a counter moved beyond the slack: fast at once
    for _ in range(QUIET_ROUNDS):
        d._note_quiet(obs(dict(steady, pages_sharing=1100)), acted=False)
    assert d.next_interval() == 10.0
    d._note_quiet(obs(dict(steady, pages_sharing=1100), keys=((10, 1), (12, 5))), acted=False)
    assert d.next_interval() == 0.5                     # a candidate appeared
    for _ in range(QUIET_ROUNDS):
        d._note_quiet(obs(dict(steady, pages_sharing=1100), keys=((10, 1), (12, 5))), acted=False)
    assert d.next_interval() == 10.0
    d._note_quiet(obs(dict(steady, pages_sharing=1100), keys=((10, 1), (12, 5))), acted=True)
    assert d.next_interval() == 0.5                     # a round that registered or estimated
    d.policy.mode = "slow"
    assert d.next_interval() == 10.0


def test_a_quiet_daemon_on_fake_trees_slows_its_rounds_and_speeds_up_on_a_new_candidate(tmp_path):
    """End to end: rounds over fake trees in fast mode (a prediction not realized: the fake
    counters never move), then a new candidate."""
    from udedup.daemon.model import EstimateResult
    MiB = 1 << 20
    procfs, sysfs, ksm = host(tmp_path, pids=(10,))
    c = cfg(daemon={"ksm_root": str(sysfs), "procfs": str(procfs), "interval": 10.0,
                    "fast_interval": 1.0, "state_file": str(tmp_path / "s.json")},
            metrics={"address": ""}, candidates={"names": ["t*"]})

    def estimator(infos, cfg_, use_zero, now):
        return {i.key: EstimateResult(now, 600 * MiB, i.anon_rss, 600 * MiB / i.anon_rss * 100)
                for i in infos}
    clock = [100.0]
    d = Daemon(c, clock=lambda: clock[0], estimator=estimator, ksm=ksm)
    d.original = ksm.knobs()
    intervals = []
    for _ in range(QUIET_ROUNDS + 3):
        d.run_round()
        intervals.append((d.policy.mode, d.next_interval()))
        clock[0] += intervals[-1][1]
    assert intervals[0] == ("fast", 1.0)
    assert intervals[-1] == ("fast", 10.0)
    fake_proc(procfs, 12, "t12", ["t12"], 1048576, merge_any=True, mappings=[(1048576, True)])
    write_maps(procfs, 12)
    d.run_round()
    assert (d.policy.mode, d.next_interval()) == ("fast", 1.0)


def test_a_quiet_candidates_smaps_figures_are_kept_past_max_age_until_it_moves(tmp_path,
                                                                              monkeypatch):
    import udedup.daemon.observe as observe
    from udedup.daemon.observe import STEADY_MAPPINGS_SECONDS
    procfs, _sysfs, ksm = host(tmp_path, pids=(10,))
    clock = [100.0]
    ob = Observer(str(procfs), ksm, clock=lambda: clock[0])
    reads = []                          # the observer's own smaps reads (not the truth walk's)
    real = observe.read_mappings

    def read_mappings(pid, procfs):
        reads.append(pid)
        return real(pid, procfs)
    monkeypatch.setattr(observe, "read_mappings", read_mappings)
    c = cfg(candidates={"names": ["t*"]})
    ob.observe(c, lambda key: 10.0, 1)
    assert reads == [10]
    clock[0] += 15.0                    # past max age, RssAnon, merging pages, maps all the same
    ob.observe(c, lambda key: 10.0, 2)
    assert reads == [10]
    ob.observe(c, lambda key: 0.0, 3)   # the policy wants them now (a registration not seen)
    assert reads == [10, 10]
    status = procfs / "10" / "status"
    status.write_text(status.read_text().replace("RssAnon:\t1048576 kB", "RssAnon:\t1048580 kB"))
    clock[0] += 15.0
    ob.observe(c, lambda key: 10.0, 4)  # RssAnon moved: read again
    assert reads == [10, 10, 10]
    with open(procfs / "10" / "maps", "a") as f:
        f.write("7d0000000000-7d0000001000 rw-p 00000000 00:00 0 \n")
    clock[0] += 15.0
    ob.observe(c, lambda key: 10.0, 5)  # the maps text changed: read again
    assert reads == [10, 10, 10, 10]
    clock[0] += 15.0
    ob.observe(c, lambda key: 10.0, 6)
    assert len(reads) == 4
    clock[0] += STEADY_MAPPINGS_SECONDS  # kept at most this long
    ob.observe(c, lambda key: 10.0, 7)
    assert len(reads) == 5
