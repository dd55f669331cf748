"""``udedup status`` reports the true saving (KSM counters plus zero-page mappings of mergeable
memory outside KSM) with its breakdown, and keeps the kernel's general_profit beside it."""
from __future__ import annotations

import json

import numpy as np

from udedup import cli

from fake_sysfs import make_fake_ksm
from test_truth import PS, ZERO, present, write_proc


def run_status(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def trees(tmp_path, monkeypatch):
    sysfs = make_fake_ksm(tmp_path / "ksm")
    for name, value in (("pages_shared", 4), ("pages_sharing", 1020), ("ksm_zero_pages", 5),
                        ("general_profit", 4112384)):
        (sysfs / name).write_text(f"{value}\n")
    procfs = tmp_path / "proc"
    e = np.full(600, present(77), dtype=np.uint64)
    e[:250] = present(ZERO)
    write_proc(procfs, 4242, [(600, True, e)], kzero=5, comm="qemu")
    # the fake tree has no self/pagemap to probe: give the zero page's fake PFN
    import udedup.ksm.truth as truth
    monkeypatch.setattr(truth, "zero_page_pfns", lambda procfs: ((ZERO, ZERO + 1),))
    return sysfs, procfs


def test_status_json_saved_bytes_is_the_true_saving_with_a_breakdown(tmp_path, capsys, monkeypatch):
    sysfs, procfs = trees(tmp_path, monkeypatch)
    code, out, err = run_status(["status", "--json", "--sysfs", sysfs, "--procfs", procfs,
                                 "--interval", "0", "--top", "0"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["saved_bytes"] == (1020 + 5 + 245) * PS == d["true_saved_pages"] * PS
    assert d["saved_bytes_source"] == "true_savings"
    assert d["general_profit_bytes"] == 4112384 and d["general_profit_source"] == "general_profit"
    assert d["saved_pages"] == 1025            # the counters' pages, as before
    b = d["breakdown"]
    assert b["ksm_counters"]["bytes"] == 1025 * PS
    assert b["zero_page_mappings"]["pages"] == 245 and b["zero_page_mappings"]["method"] == "pfn"
    assert "never written" in b["zero_page_mappings"]["note"]
    assert b["rmap_items_bytes"] == (4 + 1020) * 64
    assert d["zero_page_processes"] == [{"pid": 4242, "comm": "qemu", "mergeable_bytes": 600 * PS,
                                         "zero_mapped_pages": 250, "ksm_zero_pages": 5,
                                         "outside_ksm_pages": 245}]
    for key in ("knobs", "counters", "page_size", "sharing_ratio", "ksmd", "top_processes",
                "process_profit_overcount_bytes", "daemon"):
        assert key in d                        # every field status had stays


def test_status_text_shows_both_figures(tmp_path, capsys, monkeypatch):
    sysfs, procfs = trees(tmp_path, monkeypatch)
    code, out, err = run_status(["status", "--sysfs", sysfs, "--procfs", procfs, "--interval", "0",
                                 "--top", "0"], capsys)
    assert code == 0, err
    assert "saved: " in out and "really" in out and "245 pages" in out
    assert "never written" in out
    assert "kernel figure:" in out and "(general_profit)" in out and "pages_sharing 1020" in out


def test_status_without_zero_page_pfns_says_unknown(tmp_path, capsys, monkeypatch):
    sysfs, procfs = trees(tmp_path, monkeypatch)
    import udedup.ksm.truth as truth
    monkeypatch.setattr(truth, "zero_page_pfns", lambda procfs: ())
    code, out, err = run_status(["status", "--sysfs", sysfs, "--procfs", procfs, "--interval", "0",
                                 "--top", "0"], capsys)
    assert code == 0, err
    assert "unknown" in out and "kernel figure:" in out
