"""Per-cgroup saving and cross-domain KSM frames in the daemon's round, state file and /metrics:
``Observation.attribution`` becomes ``Round.cgroups`` and ``udedup_cgroup_saved_bytes{cgroup}``
(capped at metrics.max_cgroup_series, the rest summed as cgroup="other"), ``Observation.audit``
becomes ``Round.cross_domain_frames`` and ``udedup_cross_domain_ksm_frames``."""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import pytest

from udedup.ksm.attribution import Attribution, ProcessSaving
from udedup.ksm.audit import AuditReport, Offender

from test_metrics_promtool import README, busy_round, exposition, families, type_lines

PS = 4096


def saving(pid, cgroup, ksm_pages, zero_pages=0):
    return ProcessSaving(pid=pid, comm=f"p{pid}", uid=0, cgroup=cgroup, mergeable_bytes=1 << 20,
                         ksm_mappings=int(ksm_pages * 2), ksm_saved_pages=ksm_pages,
                         zero_mapped_pages=zero_pages, ksm_zero_pages=0)


def attribution(*procs) -> Attribution:
    return Attribution(page_size=PS, processes=tuple(procs), truth=None, unreadable_processes=0,
                       read_seconds=0.01)


def offenders(n, listed=None):
    """An AuditReport with ``n`` offender frames, ``listed`` of them in its (capped) list."""
    listed = n if listed is None else listed
    return AuditReport(kind="cgroup", depth=3, domains={"/a": [1], "/b": [3]}, ksm_frames=n + 5,
                       offenders=[Offender(pfn=1000 + i, zero=False,
                                           mappings=(("/a", 1, "p1", 0x1000), ("/b", 3, "p3", 0x2000)))
                                  for i in range(listed)],
                       offender_frames=n, offender_pages=2 * n, groups=[], zero_frames_across=0,
                       zero_pages_across_domains=True, zero_page_mappings=0,
                       unreadable_processes=0, read_seconds=0.01, limit=listed)


def round_with(tmp_path, attr=None, audit=None, cap=50):
    """busy_round's daemon, then one more round whose Observation carries ``attr`` and ``audit``
    (what the Observer fills with metrics.per_cgroup and trust domains on)."""
    d = busy_round(tmp_path)
    d.cfg.metrics.max_cgroup_series = cap
    real = d.observer.observe

    def observe(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), attribution=attr, audit=audit)
    d.observer.observe = observe
    d.run_round()
    return d


FIVE = attribution(saving(1, "/kubepods.slice/a", 100.5), saving(2, "/kubepods.slice/a", 50, 10),
                   saving(3, "/kubepods.slice/b", 300), saving(4, "/system.slice/c", 2),
                   saving(5, "", 0, 7), saving(6, "/machine.slice/d", 1))


def test_round_and_state_carry_cgroups_largest_first(tmp_path):
    d = round_with(tmp_path, FIVE, offenders(3, listed=1))   # the count, not the capped list
    r = d.latest.last
    # a: 100.5 + 50 + 10 zero pages = 160.5 pages; "" (no cgroup v2 group) is "/"
    assert r.cgroups == (("/kubepods.slice/b", 300 * PS, 1), ("/kubepods.slice/a", round(160.5 * PS), 2),
                         ("/", 7 * PS, 1), ("/system.slice/c", 2 * PS, 1),
                         ("/machine.slice/d", 1 * PS, 1))
    assert sum(c[1] for c in r.cgroups) == FIVE.saved_bytes      # nothing lost in the mapping
    assert r.cross_domain_frames == 3
    state = d.latest.state()
    assert state["cross_domain_frames"] == 3
    assert state["cgroups"][0] == {"cgroup": "/kubepods.slice/b", "saved_bytes": 300 * PS,
                                   "processes": 1}


def test_cgroup_series_are_capped_the_rest_summed(tmp_path):
    d = round_with(tmp_path, FIVE, offenders(0), cap=2)
    fams = families(exposition(d))
    saved = {s.labels["cgroup"]: s.value for s in fams["udedup_cgroup_saved_bytes"].samples}
    assert saved == {"/kubepods.slice/b": 300 * PS, "/kubepods.slice/a": round(160.5 * PS),
                     "other": (7 + 2 + 1) * PS}
    procs = {s.labels["cgroup"]: s.value for s in fams["udedup_cgroup_processes"].samples}
    assert procs == {"/kubepods.slice/b": 1, "/kubepods.slice/a": 2, "other": 3}
    assert fams["udedup_cgroup_series_folded"].samples[0].value == 3
    assert fams["udedup_cross_domain_ksm_frames"].samples[0].value == 0    # domains on, clean
    d.cfg.metrics.max_cgroup_series = 50               # SIGHUP: the next round's snapshot has it
    d.run_round()
    fams = families(exposition(d))
    assert "other" not in {s.labels["cgroup"] for s in fams["udedup_cgroup_saved_bytes"].samples}
    assert len(fams["udedup_cgroup_saved_bytes"].samples) == 5
    assert fams["udedup_cgroup_series_folded"].samples[0].value == 0
    d.cfg.metrics.max_cgroup_series = 0                # everything in "other"
    d.run_round()
    fams = families(exposition(d))
    assert {s.labels["cgroup"]: s.value for s in fams["udedup_cgroup_saved_bytes"].samples} == {
        "other": FIVE.saved_bytes}


def test_off_means_no_series(tmp_path):
    """per_cgroup off (no attribution) and domains off (no audit): neither family appears, and
    the state file says cross_domain_frames null."""
    d = round_with(tmp_path)
    types = type_lines(exposition(d))
    assert not [n for n in types if n.startswith("udedup_cgroup_")]
    assert "udedup_cross_domain_ksm_frames" not in types
    assert d.latest.last.cgroups == () and d.latest.last.cross_domain_frames is None
    assert d.latest.state()["cross_domain_frames"] is None and "cgroups" not in d.latest.state()


def test_promtool_finds_nothing_with_cgroup_series(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install --no-install-recommends "
                    "prometheus)")
    text = exposition(round_with(tmp_path, FIVE, offenders(2), cap=3))
    assert 'udedup_cgroup_saved_bytes{cgroup="other"}' in text
    got = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0 and not (got.stdout + got.stderr).strip(), got.stdout + got.stderr


def test_new_families_are_in_the_readme(tmp_path):
    with open(README, encoding="utf-8") as fh:
        readme = fh.read()
    text = exposition(round_with(tmp_path, FIVE, offenders(1), cap=2))
    names = [n for n in type_lines(text) if n.startswith(("udedup_cgroup_", "udedup_cross_"))]
    assert len(names) == 4
    missing = [n for n in names if not re.search(rf"`{n}[`{{]", readme)]
    assert not missing, f"README lacks {missing}"


N_X, N_Y = 48, 32


@pytest.mark.ksm
def test_real_cgroups_in_the_round_and_the_metrics(tmp_path):
    """Two real cgroup v2 groups: a1, a2 in A and b1 in B hold the same N_X pages "x" (content
    across domains), b1 and b2 in B the same N_Y pages "y". The children register themselves;
    once ksmd merged them, one daemon round (dry run, metrics.per_cgroup, trust_domains =
    "cgroup") exports each group's exact saving (x: a frame mapped 3 times, 2/3 page per
    mapping; y: 1/2 page per mapping) and the N_X cross-domain frames its audit finds."""
    import os
    import time

    from udedup.daemon.config import Config
    from udedup.daemon.loop import Daemon, Options
    from udedup.ksm import Ksm
    from udedup.ksm.attribution import attribute

    from cgroup_fixtures import LayoutChild, cgroups, frame_counts, others_registered

    if os.geteuid() != 0:
        pytest.skip("needs root: pagemap PFNs, /proc/kpageflags and kpagecount")
    names = ("udedup-test-h4-a", "udedup-test-h4-b")
    ksm = Ksm()
    x = [["x", i] for i in range(N_X)]
    y = [["y", i] for i in range(N_Y)]
    with cgroups(*names) as (_mount, (ga, gb)):
        kids = []
        try:
            for layout, group in ((x, ga), (x, ga), (x + y, gb), (y, gb)):
                kids.append(LayoutChild(layout, group))
            pids = [k.pid for k in kids]
            if others_registered(pids):
                pytest.skip(f"other processes have KSM memory: {others_registered(pids)}")
            with ksm.settings(run=1, pages_to_scan=5000, sleep_millisecs=10, smart_scan=0,
                              use_zero_pages=0):
                deadline = time.monotonic() + 60
                while not all(frame_counts(k.pid, k.address, len(k.layout))[0].all() for k in kids):
                    assert time.monotonic() < deadline, "ksmd did not merge the buffers in 60 s"
                    time.sleep(0.1)
                ksm.set("run", 0)                    # merged pages stay; nothing moves now
                cfg = Config()
                cfg.candidates.cgroups = ["/udedup-test-h4-*"]
                cfg.candidates.min_anon_rss = 0
                cfg.metrics.address = ""
                cfg.metrics.per_cgroup = True
                cfg.security.trust_domains = "cgroup"
                cfg.daemon.state_file = str(tmp_path / "state.json")
                d = Daemon(cfg, options=Options(dry_run=True), ksm=ksm)
                d.original = ksm.knobs()
                # the exact attribution read with ksmd stopped, just before the round
                expected = {g.key: g for g in attribute(pids=pids).groups("cgroup")}
                d.run_round()
            ps = os.sysconf("SC_PAGE_SIZE")
            r = d.latest.last
            mine = {c: (b, n) for c, b, n in r.cgroups if c in expected}
            a, b = "/" + names[0], "/" + names[1]
            assert mine[a] == (round(2 * N_X * 2 / 3 * ps), 2)
            assert mine[b] == (round((N_X * 2 / 3 + 2 * N_Y / 2) * ps), 2)
            assert mine[a][0] == round(expected[a].saved_pages * ps)
            assert r.cross_domain_frames == N_X          # every x frame, none of y
            fams = families(exposition(d))
            saved = {s.labels["cgroup"]: s.value for s in fams["udedup_cgroup_saved_bytes"].samples}
            assert saved[a] == mine[a][0] and saved[b] == mine[b][0]
            assert fams["udedup_cross_domain_ksm_frames"].samples[0].value == N_X
            ksm.unmerge_all()
        finally:
            for k in kids:
                k.kill()
