"""The estimator, its screen and "why" read /proc and the KSM knobs only through the roots they
are given: fake trees here, no real process memory, no monkeypatching."""
from __future__ import annotations

import json

import numpy as np

from fake_sysfs import make_fake_ksm
from udedup.cli import main
from udedup.estimate import estimate, screen, why
from udedup import pages

PS = pages.PAGE_SIZE
PID = 4242
START = 16 * PS          # the fake mapping: pages 16..19


def fake_proc(root, ksm_stat="ksm_rmap_items 3\nksm_zero_pages 5\nksm_merging_pages 0\n"
              "ksm_merge_any: yes\nksm_mergeable: yes\n", registered=True):
    """/proc/PID of a process with one anonymous mapping of 4 resident pages that pagemap shows
    not present, and a shared mapping: nothing is read from memory (whether or not a real
    process has that PID)."""
    d = root / str(PID)
    d.mkdir(parents=True)
    (root / "self").symlink_to("/proc/self")   # the zero-page probe maps pages in this process
    (d / "stat").write_text(f"{PID} (fakeproc) S 1 {PID} {PID} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 "
                            "1 0 100 0 0\n")
    (d / "comm").write_text("fakeproc\n")
    flags = "rd wr mr mw me ac" + (" mg" if registered else "")
    (d / "smaps").write_text(
        f"{START:x}-{START + 4 * PS:x} rw-p 00000000 00:00 0 \n"
        f"Rss: {4 * PS // 1024} kB\nAnonymous: {4 * PS // 1024} kB\nKSM: 0 kB\n"
        f"AnonHugePages: 0 kB\nSwap: 0 kB\nVmFlags: {flags}\n"
        f"7f0000000000-7f0000001000 rw-s 00000000 00:05 99 /dev/shm/x\n"
        f"Rss: 4 kB\nAnonymous: 0 kB\nVmFlags: rd wr sh mr mw me ms\n")
    # 8-byte entries up to the mapping's end, none present
    (d / "pagemap").write_bytes(np.zeros(START // PS + 4, dtype=np.uint64).tobytes())
    if ksm_stat is not None:
        (d / "ksm_stat").write_text(ksm_stat)
    return root


def test_estimate_reads_the_given_procfs_and_ksm_root(tmp_path):
    proc = fake_proc(tmp_path / "proc")
    ksm = make_fake_ksm(tmp_path / "ksm", max_page_sharing=7, use_zero_pages=1)
    est = estimate(PID, interval=0, procfs=str(proc), ksm=str(ksm))
    assert (est.max_page_sharing, est.current_use_zero_pages) == (7, True)
    t = est.targets[0]
    assert (t.pid, t.name, t.kind) == (PID, "fakeproc", "process")
    assert t.existing_ksm_zero_pages == 5 and t.saved_pages == {0: 5, 1: 5}
    assert est.pages_scanned == 0 and any("nothing to scan" in n for n in est.notes)
    assert [m.in_scope for m in est.mappings] == [True, False]
    # the parameter wins over the knob; a missing KSM directory gives the kernel's defaults
    assert estimate(PID, interval=0, procfs=proc, ksm=ksm, max_page_sharing=9).max_page_sharing == 9
    est = estimate(PID, interval=0, procfs=proc, ksm=tmp_path / "no-ksm")
    assert (est.max_page_sharing, est.current_use_zero_pages) == (256, None)


def test_screen_reads_the_given_procfs(tmp_path):
    proc = fake_proc(tmp_path / "proc")
    got = screen.screen([PID, PID + 1], 1.0, procfs=str(proc))
    assert got[PID].present_pages == 0 and got[PID].sampled_pages == 0
    assert isinstance(got[PID + 1], str)          # no such process in this tree


def test_why_observes_the_given_roots_and_explains(tmp_path):
    proc = fake_proc(tmp_path / "proc")
    ksm = make_fake_ksm(tmp_path / "ksm", run=0, use_zero_pages=1)
    facts = why.observe(PID, procfs=proc, ksm=ksm)
    assert facts.ksm_state == {"run": 0, "use_zero_pages": True, "max_page_sharing": 256}
    assert facts.ksm_stat["ksm_merge_any"] is True and facts.ksm_stat["ksm_zero_pages"] == 5
    diagnosis = why.explain(facts)
    notes = [text for text, _ in diagnosis.notes]
    assert any("ksmd is not running (run=0)" in n for n in notes)
    assert any("PR_SET_MEMORY_MERGE is on" in n for n in notes)
    anon, shm = diagnosis.rows
    assert anon[2] == [] and "shared mapping" in shm[2][0][0] and shm[2][0][2] == why.KIND_FIX["shared"]
    d = diagnosis.as_dict()
    assert d["ksm_stat"]["ksm_merge_any"] is True and d["predictions"] is None
    json.dumps(d)
    # an estimate of the same facts: the mapping's reasons come from what was scanned
    est = estimate(PID, interval=0, all_eligible=True, procfs=proc, ksm=facts.ksm)
    rows = why.explain(facts, est).rows
    assert rows[0][2] == [("nothing in RAM (never touched or swapped out)", 0, None)]


def test_why_without_ksm_or_ksm_stat(tmp_path):
    proc = fake_proc(tmp_path / "proc", ksm_stat=None, registered=False)
    facts = why.observe(PID, procfs=str(proc), ksm=str(tmp_path / "no-ksm"))
    assert "error" in facts.ksm_state and facts.ksm_stat == {}
    notes = why.explain(facts).notes
    assert notes[0][0].startswith("KSM state unknown: ")
    assert ("no mapping of this process is registered with KSM", why.REGISTER_FIX) in notes
    assert not any("PR_SET_MEMORY_MERGE" in text for text, _ in notes)
    reasons = why.explain(facts).rows[0][2]
    assert reasons[0] == ("not registered (no mg flag): ksmd never scans it", None,
                          why.REGISTER_FIX)


def test_why_json_shows_ksm_stat_flags_as_booleans(tmp_path, capsys):
    proc = fake_proc(tmp_path / "proc", ksm_stat="ksm_merge_any: no\nksm_mergeable: yes\n")
    assert main(["why", str(PID), "--procfs", str(proc), "--no-scan", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ksm_stat"] == {"ksm_merge_any": False, "ksm_mergeable": True}
    assert d["pid"] == PID and len(d["mappings"]) == 2

