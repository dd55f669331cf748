"""``udedup scan`` and ``udedup why``: output, JSON keys, one-line errors with their exit codes."""
from __future__ import annotations

import json
import sys

import pytest

from udedup.cli import main


@pytest.fixture(scope="module")
def targets(estimate_children_module):
    """A registered child with known content, one that registered nothing, one with THP and
    volatile pages."""
    def spawn(spec):
        return estimate_children_module(spec)[1]["pid"]
    registered = spawn([{"kind": "zero", "pages": 40}, {"kind": "dup", "pages": 60, "contents": 3},
                        {"kind": "unique", "pages": 20}])
    plain = spawn({"regions": [{"kind": "dup", "pages": 30, "contents": 2}],
                   "options": {"register": False}})
    busy = spawn({"regions": [{"kind": "dup", "pages": 2048, "contents": 3},
                              {"kind": "volatile", "pages": 16}],
                  "options": {"thp": True}})
    return registered, plain, busy


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_scan_json_has_the_documented_keys(capsys, targets):
    registered = targets[0]
    code, out, err = run(capsys, "scan", str(registered), "--json", "--interval", "0",
                         "--max-page-sharing", "16")
    assert code == 0, err
    d = json.loads(out)
    # a ksmd running for another test may have mapped some zero pages to the zero page already
    zero = d["zero_pages"] + d["zero_mapped_pages"]
    assert (d["pages_scanned"] + d["zero_mapped_pages"], zero, d["duplicate_pages"],
            d["volatile_pages"]) == (120, 40, 60, 0)
    assert [p["use_zero_pages"] for p in d["predictions"]] == [0, 1]
    for p in d["predictions"]:
        assert {"pages_shared", "pages_sharing", "ksm_zero_pages", "general_profit"} <= p.keys()
    assert d["predictions"][1]["ksm_zero_pages"] == 40
    assert d["predictions"][1]["pages_sharing"] == 60 - 3 * 2   # 3 groups of 20 pages, at 16
    assert err == ""      # no progress line when stderr is not a terminal


@pytest.mark.ksm   # the lock: a ksmd run by another session would merge the registered target's pages
def test_scan_text_and_all_eligible(capsys, targets):
    registered, plain = targets[:2]
    code, out, _ = run(capsys, "scan", str(registered), str(plain), "--interval", "0")
    assert code == 0
    assert "Scanned 120 pages" in out and "registered memory" in out
    assert "use_zero_pages=0" in out and "use_zero_pages=1" in out and "general_profit" in out
    code, out, _ = run(capsys, "scan", str(plain), "--all-eligible", "--interval", "0", "--json")
    d = json.loads(out)
    assert d["all_eligible"] and d["duplicate_pages"] >= 30


@pytest.mark.parametrize("argv, code, message", [
    (["scan", "999999999"], 8, "no process with PID 999999999"),
    (["scan", "abc"], 2, "'abc' is not a PID"),
    (["scan", "-5"], 2, "process IDs are positive"),
    (["scan", "0"], 2, "process IDs are positive"),
    (["scan", "1", "--passes", "1"], 2, "at least 2"),
    (["scan", "1", "--interval", "-1"], 2, ">= 0 seconds"),
    (["why", "999999999"], 8, "no process with PID 999999999"),
    (["why", "2"], 8, "kernel thread"),
])
def test_errors_are_one_line_with_exit_codes(capsys, argv, code, message):
    if argv == ["why", "2"]:
        with open("/proc/2/comm") as f:
            if f.read().strip() != "kthreadd":
                pytest.skip("PID 2 is not kthreadd here")
    got, out, err = run(capsys, *argv)
    assert got == code
    assert err.startswith("udedup: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err and out == ""


def test_why_lists_reasons_and_fixes(capsys, targets):
    registered, plain = targets[:2]
    code, out, _ = run(capsys, "why", str(plain), "--interval", "0")
    assert code == 0
    assert "not registered (no mg flag)" in out and "fix: register it" in out
    assert "duplicate content" in out and "mappings KSM cannot use" in out
    code, out, _ = run(capsys, "why", str(registered), "--json", "--interval", "0")
    d = json.loads(out)
    mine = [m for m in d["mappings"] if m["registered"]]
    assert len(mine) == 1 and mine[0]["duplicate_pages"] == 60
    assert mine[0]["zero_pages"] + mine[0]["zero_mapped_pages"] == 40
    reasons = " ".join(w["reason"] for w in mine[0]["why"])
    assert "zero" in reasons and "duplicate content" in reasons and "unique" in reasons
    code, out, _ = run(capsys, "why", str(registered), "--no-scan")
    assert code == 0 and f"PID {registered}" in out


def test_scan_progress_only_on_a_terminal(capsys, targets, monkeypatch):
    registered = targets[0]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = run(capsys, "scan", str(registered), "--interval", "0")
    assert code == 0 and "scanning: pass" in err


def test_why_names_volatile_pages_and_huge_pages(capsys, targets):
    busy = targets[2]
    code, out, _ = run(capsys, "why", str(busy), "--json", "--interval", "0.05")
    assert code == 0
    mine = [m for m in json.loads(out)["mappings"] if m["registered"]]
    assert len(mine) == 1 and mine[0]["volatile_pages"] == 16
    reasons = " ".join(w["reason"] for w in mine[0]["why"])
    assert "volatile" in reasons
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = "[never]" not in f.read()
    if thp and mine[0]["anon_huge_bytes"]:
        assert "THP-backed" in reasons
    code, out, _ = run(capsys, "why", str(busy), "--no-scan")
    assert code == 0 and ("THP-backed" in out or not mine[0]["anon_huge_bytes"])
