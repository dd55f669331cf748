"""Savings per process, cgroup and uid (udedup.ksm.attribution): on fake /proc trees (pagemap,
kpageflags and kpagecount written with numpy, cgroup and status files, smaps with ``mg``), then
on the real kernel with children in two real cgroup v2 groups (marked ``ksm``, root)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from udedup import cli
from udedup.errors import ProcessAccessError, UsageError
from udedup.host import pagemap as pm
from udedup.ksm import attribution as attr
from udedup.ksm.attribution import NEEDS_ROOT, attribute

from fake_sysfs import make_fake_ksm
from cgroup_fixtures import LayoutChild, cgroups, frame_counts, others_registered
from test_truth import HUGE, PS, ZERO, ZERO_PFNS, present, stats, write_proc

KSM_A, KSM_B, KSM_C = 0x5000, 0x5100, 0x9000    # fake KSM frames (C: far away, another span
PLAIN = 0x7000                                  # ordinary frames


def exclusive(pfn) -> np.uint64:
    return present(pfn) | np.uint64(pm.PM_MMAP_EXCLUSIVE)


def write_tables(root, frames: dict) -> None:
    """kpageflags and kpagecount under ``root``: ``frames`` is ``{pfn: (flags, count)}``."""
    size = max(frames) + 1
    flags, counts = np.zeros(size, dtype=np.uint64), np.zeros(size, dtype=np.uint64)
    for pfn, (f, c) in frames.items():
        flags[pfn], counts[pfn] = f, c
    (root / "kpageflags").write_bytes(flags.tobytes())
    (root / "kpagecount").write_bytes(counts.tobytes())


def place(d, cgroup: str, uid: int):
    (d / "cgroup").write_text(f"4:memory:/legacy\n0::{cgroup}\n")
    (d / "status").write_text(f"Name:\tx\nUid:\t{uid + 1}\t{uid}\t{uid}\t{uid}\n")


KSM = 1 << pm.KPF_KSM


def fake_host(tmp_path):
    """Three processes: 10 and 11 in /a (uid 1000), 12 in /b (uid 0). KSM page A is mapped by 10
    and 11 (k=2), B by 10 twice and by 12 (k=3), C only by 12 (k=1: saves nothing); 12 has 30
    mg pages on the zero page (5 of them KSM's) and 20 on the huge zero page; 11 has zero-page
    pages outside mg memory, which do not count."""
    p10 = np.concatenate([[present(KSM_A), present(KSM_B), present(KSM_B)],
                          [exclusive(PLAIN + i) for i in range(97)]]).astype(np.uint64)
    d = write_proc(tmp_path, 10, [(100, True, p10)], comm="a-one")
    place(d, "/a", 1000)
    p11 = np.full(10, exclusive(PLAIN + 200), dtype=np.uint64)
    p11[0] = present(KSM_A)
    p11[1] = np.uint64(pm.PM_SWAPPED | KSM_A)     # a swap entry whose low bits look like A
    p11[2] = present(PLAIN + 300)                 # shared (fork) but not KSM
    d = write_proc(tmp_path, 11, [(10, True, p11),
                                  (8, False, np.full(8, present(ZERO), dtype=np.uint64))],
                   comm="a-two")
    place(d, "/a", 1000)
    p12 = np.concatenate([[present(KSM_B), present(KSM_C)], [present(ZERO)] * 30,
                          [present(HUGE + i) for i in range(20)]]).astype(np.uint64)
    d = write_proc(tmp_path, 12, [(52, True, p12)], kzero=5, comm="b-one")
    place(d, "/b", 0)
    write_proc(tmp_path, 13, [(4, True, np.full(4, present(KSM_A), dtype=np.uint64))],
               mergeable=False)                   # ksm_stat says no mergeable memory
    write_tables(tmp_path, {KSM_A: (KSM, 2), KSM_B: (KSM, 3), KSM_C: (KSM, 1),
                            PLAIN + 300: (0, 2)})
    return tmp_path


def test_each_mapping_saves_one_minus_one_over_k_and_zero_mappings_one_page(tmp_path):
    root = fake_host(tmp_path)
    a = attribute(procfs=str(root), stats=stats(sharing=1 + 2, kzero=5), zero_pfns=ZERO_PFNS)
    by_pid = {p.pid: p for p in a.processes}
    assert set(by_pid) == {10, 11, 12}
    assert by_pid[10].ksm_saved_pages == pytest.approx(1 / 2 + 2 * 2 / 3)
    assert by_pid[10].ksm_mappings == 3 and by_pid[10].zero_mapped_pages == 0
    assert by_pid[11].ksm_saved_pages == pytest.approx(1 / 2) and by_pid[11].ksm_mappings == 1
    assert by_pid[11].zero_mapped_pages == 0                  # its zero pages are not mg
    assert by_pid[12].ksm_saved_pages == pytest.approx(2 / 3) and by_pid[12].ksm_mappings == 2
    assert by_pid[12].zero_mapped_pages == 50 and by_pid[12].ksm_zero_pages == 5
    assert [p.pid for p in a.processes] == [12, 10, 11]       # largest saving first
    assert (by_pid[10].cgroup, by_pid[10].uid, by_pid[10].comm) == ("/a", 1000, "a-one")
    assert (by_pid[12].cgroup, by_pid[12].uid) == ("/b", 0)
    # the whole: pages_sharing (A: 1, B: 2) + ksm_zero_pages 5 + 45 zero mappings outside KSM
    assert a.saved_pages == pytest.approx(3 + 50)
    assert a.truth.saved_pages == 3 + 5 + 45
    check = a.check()
    assert check["matches"] and check["difference_pages"] == 0 and check["why"] is None
    assert check["ksm_pages"] == {"attributed": 3.0, "pages_sharing": 3, "difference": 0.0}
    assert check["zero_pages"] == {"attributed": 50, "counted": 50, "difference": 0}
    assert check["counters_moved_pages"] is None              # stats given: not read again


def test_groups_by_cgroup_uid_and_process_sorted_by_saving(tmp_path):
    a = attribute(procfs=str(fake_host(tmp_path)), stats=stats(sharing=3, kzero=5),
                  zero_pfns=ZERO_PFNS)
    cg = a.groups("cgroup")
    assert [g.key for g in cg] == ["/b", "/a"]
    assert cg[1].saved_pages == pytest.approx(1 / 2 + 4 / 3 + 1 / 2)
    assert [p.pid for p in cg[1].processes] == [10, 11]
    assert sum(g.saved_pages for g in cg) == pytest.approx(a.saved_pages)
    assert [g.key for g in a.groups("uid")] == [0, 1000]
    assert [g.key for g in a.groups("process")] == [12, 10, 11]
    d = a.as_dict("cgroup")
    assert d["by"] == "cgroup" and d["groups"][0]["cgroup"] == "/b"
    assert d["groups"][0]["saved_bytes"] == round((50 + 2 / 3) * PS)
    assert d["groups"][1]["processes"][0]["pid"] == 10
    assert d["saved_bytes"] == a.saved_bytes and d["check"]["matches"]
    assert a.as_dict("uid")["groups"][1]["uid"] == 1000
    g = a.as_dict("process")["groups"][0]
    assert g["pid"] == 12 and g["comm"] == "b-one" and len(g["processes"]) == 1
    with pytest.raises(UsageError, match="cannot group savings by 'pod'"):
        a.groups("pod")


def test_a_difference_from_the_counters_is_reported_with_the_reason(tmp_path):
    a = attribute(procfs=str(fake_host(tmp_path)), stats=stats(sharing=7, kzero=5),
                  zero_pfns=ZERO_PFNS)
    check = a.check()
    assert not check["matches"] and check["difference_pages"] == -4
    assert check["ksm_pages"]["difference"] == -4 and "run=0" in check["why"]


def test_no_cgroup_v2_line_and_unreadable_status(tmp_path):
    d = write_proc(tmp_path, 40, [(2, True, np.array([present(KSM_A)] * 2, dtype=np.uint64))])
    (d / "cgroup").write_text("1:name=systemd:/\n")
    write_tables(tmp_path, {KSM_A: (KSM, 2)})
    a = attribute(procfs=str(tmp_path), stats=stats(sharing=1), zero_pfns=ZERO_PFNS)
    p = a.processes[0]
    assert p.cgroup == "" and p.uid is None and p.ksm_saved_pages == 1.0
    assert a.as_dict("cgroup")["groups"][0]["cgroup"] is None


def test_without_root_it_says_what_is_missing(tmp_path):
    root = fake_host(tmp_path)
    with pytest.raises(ProcessAccessError, match="need root") as err:
        attribute(procfs=str(root), stats=stats(), zero_pfns=())     # PFNs hidden
    assert str(err.value) == NEEDS_ROOT and "\n" not in NEEDS_ROOT
    os.remove(root / "kpagecount")
    with pytest.raises(Exception, match="kpagecount"):
        attribute(procfs=str(root), stats=stats(), zero_pfns=ZERO_PFNS)


def test_read_pfn_tables_in_spans(tmp_path):
    size = 3 * pm.PAGEMAP_BLOCK
    a = np.arange(size, dtype=np.uint64) * np.uint64(3)
    (tmp_path / "kpageflags").write_bytes(a.tobytes())
    (tmp_path / "kpagecount").write_bytes((a + np.uint64(1)).tobytes())
    pfns = np.array([5, 5, 6, 70, 200, pm.PAGEMAP_BLOCK + 3, 2 * pm.PAGEMAP_BLOCK - 1, 1,
                     size - 1, size + 10], dtype=np.uint64)
    for gap in (0, 1, 64, 1 << 20):
        flags, counts = pm.read_pfn_tables(pfns, procfs=str(tmp_path), gap=gap)
        want = np.where(pfns < size, pfns * np.uint64(3), 0)
        assert (flags == want).all()                  # past the table's end: 0
        assert (counts[pfns < size] == want[pfns < size] + 1).all()
    assert pm.read_pfn_tables([], procfs=str(tmp_path))[0].size == 0
    assert (pm.read_pfn_tables(pfns, ("kpageflags",), str(tmp_path))[0]
            == pm.read_kpageflags(pfns, str(tmp_path))).all()


def test_shared_anon_pfns_keeps_present_anonymous_pages_mapped_more_than_once():
    e = np.array([present(9), exclusive(10), present(11) | np.uint64(pm.PM_FILE),
                  np.uint64(pm.PM_SWAPPED | 12), np.uint64(13), present(ZERO), present(HUGE + 3),
                  present(HUGE + 512)], dtype=np.uint64)
    assert pm.shared_anon_pfns(e, ZERO_PFNS).tolist() == [9, HUGE + 512]
    assert pm.shared_anon_pfns(e).tolist() == [9, ZERO, HUGE + 3, HUGE + 512]


# --- the CLI --------------------------------------------------------------------------------------
def status(tmp_path, monkeypatch, capsys, *argv, zero=ZERO_PFNS):
    sysfs = make_fake_ksm(tmp_path / "ksm")
    for name, value in (("pages_shared", 2), ("pages_sharing", 3), ("ksm_zero_pages", 5)):
        (sysfs / name).write_text(f"{value}\n")
    root = fake_host(tmp_path / "proc")
    monkeypatch.setattr(attr, "zero_page_pfns_or_none", lambda procfs: zero)
    import udedup.ksm.truth as truth
    monkeypatch.setattr(truth, "zero_page_pfns", lambda procfs: zero)
    code = cli.main(["status", "--sysfs", str(sysfs), "--procfs", str(root), "--interval", "0",
                     "--top", "0", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_by_cgroup_json(tmp_path, monkeypatch, capsys):
    tmp_path.joinpath("proc").mkdir()
    code, out, err = status(tmp_path, monkeypatch, capsys, "--by", "cgroup", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert [g["cgroup"] for g in d["groups"]] == ["/b", "/a"]
    assert d["groups"][1]["saved_bytes"] == round((1 / 2 + 4 / 3 + 1 / 2) * PS)
    assert [p["pid"] for p in d["groups"][1]["processes"]] == [10, 11]
    att = d["attribution"]
    assert att["by"] == "cgroup" and att["check"]["matches"]
    assert att["saved_bytes"] == sum(g["saved_bytes"] for g in d["groups"]) == 53 * PS
    assert att["check"]["true_saved_pages"] == 53 and d["true_saved_pages"] == 53
    assert "saved_bytes" in d and "knobs" in d                # the status fields stay


def test_status_by_uid_text_table(tmp_path, monkeypatch, capsys):
    tmp_path.joinpath("proc").mkdir()
    code, out, err = status(tmp_path, monkeypatch, capsys, "--by", "uid")
    assert code == 0, err
    table = out[out.index("saved per uid"):].splitlines()
    assert table[1].split()[-1] == "UID"
    assert table[2].split()[-1] == "0" and table[3].split()[-1] == "1000"
    assert "equal" in table[-1] and "53 pages" in table[-1]


def test_status_by_without_root_exits_4_with_one_line(tmp_path, monkeypatch, capsys):
    tmp_path.joinpath("proc").mkdir()
    code, out, err = status(tmp_path, monkeypatch, capsys, "--by", "process", zero=())
    assert code == 4 and out == ""
    assert err.count("\n") == 1 and "need root" in err


# --- the real kernel, in two real cgroup v2 groups ------------------------------------------------
# Content: X shared inside /a (a1, a2: k=2), Y across both groups (a1, a2, b1: k=3), Z twice in a1
# and once in b1 (k=3), unique pages (never merge) and, in b1, zero-filled pages (the zero page,
# use_zero_pages=1).
NX, NY, NZ, NU, N0 = 40, 30, 20, 50, 10
LAYOUT = {
    "a1": [["x", i] for i in range(NX)] + [["y", i] for i in range(NY)]
          + [["z", i] for i in range(NZ)] * 2 + [["unique", 100 + i] for i in range(NU)],
    "a2": [["x", i] for i in range(NX)] + [["y", i] for i in range(NY)]
          + [["unique", 200 + i] for i in range(NU)],
    "b1": [["y", i] for i in range(NY)] + [["z", i] for i in range(NZ)]
          + [["zero", i] for i in range(N0)] + [["unique", 300 + i] for i in range(NU)],
}
K = {"x": 2, "y": 3, "z": 3}


def expected_pages(layout) -> float:
    return sum((1 - 1 / K[kind]) if kind in K else (1.0 if kind == "zero" else 0.0)
               for kind, _ in layout)


@pytest.mark.ksm
def test_per_cgroup_savings_in_real_cgroups_sum_to_the_true_saving(capsys):
    if os.geteuid() != 0:
        pytest.skip("attribution reads PFNs, kpageflags and kpagecount: root only")
    from udedup.ksm import Ksm
    ksm = Ksm()
    children = {}
    with cgroups("udedup-test-attr-a", "udedup-test-attr-b") as (mount, (cg_a, cg_b)):
        try:
            for name, layout in LAYOUT.items():
                children[name] = LayoutChild(layout, cg_a if name[0] == "a" else cg_b)
            pids = {p.pid for p in children.values()}
            others = others_registered(pids)
            if others:
                pytest.skip("other processes have mergeable memory (the sums would include "
                            f"them): {', '.join(others[:5])}")
            with ksm.settings(use_zero_pages=1, pages_to_scan=2000, sleep_millisecs=0,
                              smart_scan=0, run=1):
                try:
                    ksm.wait_settled(timeout=60)
                    ksm.set("run", 0)       # ksmd stopped: counters and page tables agree
                    a = attribute(ksm)
                    frames = {name: frame_counts(p.pid, p.address, len(LAYOUT[name]))
                              for name, p in children.items()}
                    capsys.readouterr()
                    code = cli.main(["status", "--by", "cgroup", "--json", "--interval", "0",
                                     "--top", "0"])
                    shown = json.loads(capsys.readouterr().out)
                finally:
                    ksm.set("run", 2)
        finally:
            for p in children.values():
                p.kill()
    rel_a, rel_b = "/" + os.path.relpath(cg_a, mount), "/" + os.path.relpath(cg_b, mount)
    groups = {g.key: g for g in a.groups("cgroup")}
    assert set(groups) == {rel_a, rel_b}
    want_a = expected_pages(LAYOUT["a1"]) + expected_pages(LAYOUT["a2"])
    want_b = expected_pages(LAYOUT["b1"])
    # kpagecount says what the content says: k per KSM page, the zero page for zero pages
    for name, (is_ksm, counts, on_zero) in frames.items():
        for i, (kind, _) in enumerate(LAYOUT[name]):
            assert bool(is_ksm[i]) == (kind in K), (name, i, kind)
            assert counts[i] == K.get(kind, counts[i]), (name, i, kind)
            assert bool(on_zero[i]) == (kind == "zero"), (name, i, kind)
    assert groups[rel_a].saved_pages == pytest.approx(want_a, abs=1e-6)
    assert groups[rel_b].saved_pages == pytest.approx(want_b, abs=1e-6)
    assert groups[rel_b].zero_mapped_pages == N0
    # the per-cgroup figures sum to the machine's true saving, to the page
    total = groups[rel_a].saved_pages + groups[rel_b].saved_pages
    assert total == pytest.approx(NX + 2 * NY + 2 * NZ + N0, abs=1e-6)
    stats = a.truth.stats
    assert stats.pages_sharing == NX + 2 * NY + 2 * NZ and stats.ksm_zero_pages == N0
    assert round(total) == a.truth.saved_pages and a.check()["matches"]
    assert code == 0        # the CLI, read in the same stopped state, says the same
    assert {g["cgroup"]: g["saved_bytes"] for g in shown["groups"]} == {
        rel_a: round(want_a * PS), rel_b: round(want_b * PS)}
    assert shown["attribution"]["check"]["matches"]


@pytest.mark.ksm
def test_bench_attribution_runs_at_a_tiny_size(capsys):
    """scripts/bench_attribution.py (the cost figures in the README) cannot rot."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "bench_attribution", os.path.join(root, "scripts", "bench_attribution.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if os.geteuid() != 0:
        pytest.skip("attribution reads PFNs, kpageflags and kpagecount: root only")
    assert bench.main(["--size", "8M", "--repeat", "2", "--no-lock"]) == 0   # ksm mark: lock held
    out = capsys.readouterr().out
    assert "cached read" in out and "attributed vs" in out and out.count("\n") == 1
