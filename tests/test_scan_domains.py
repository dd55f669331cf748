"""``udedup scan --domains``: real cgroup v2 groups, one LayoutChild in each (the layouts of
tests/test_estimate_domains.py, whose figures are exact over the registered buffers). ``ksm``
marker: the children's buffers are registered, and a ksmd run by another test would merge them."""
from __future__ import annotations

import json

import pytest

from udedup.cli import main
from udedup.ksm import Ksm

from cgroup_fixtures import LayoutChild, cgroups
from test_estimate_domains import LAYOUT_A, LAYOUT_B

TOP = "udedup-test-h1-scan"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def children():
    """(pid in TOP/a, pid in TOP/b)."""
    with Ksm().settings(run=0), cgroups(TOP) as (_, (top,)), \
            cgroups(f"{TOP}/a", f"{TOP}/b") as (_, (ga, gb)):
        a, b = LayoutChild(LAYOUT_A, ga), LayoutChild(LAYOUT_B, gb)
        try:
            yield a.pid, b.pid
        finally:
            a.kill()
            b.kill()


def scan(capsys, pids, *extra):
    return run(capsys, "scan", *map(str, pids), "--interval", "0", "--max-page-sharing", "256",
               *extra)


@pytest.mark.ksm
def test_scan_domains_cgroup_json_and_text(capsys, children):
    code, out, err = scan(capsys, children, "--domains", "cgroup", "--json")
    assert code == 0, err
    d = json.loads(out)["domains"]
    assert (d["kind"], d["cgroup_depth"], d["zero_pages_across"]) == ("cgroup", 0, True)
    assert [p["key"] for p in d["per_domain"]] == [f"/{TOP}/a", f"/{TOP}/b"]
    assert [p["pids"] for p in d["per_domain"]] == [[children[0]], [children[1]]]
    assert (d["cross_groups"], d["exposed_pages"], d["exposed_zero_pages"]) == (3, 14, 2)
    assert d["saved_pages_all"] == {"0": 17.0, "1": 18.0}
    assert d["saved_pages_kept"] == {"0": 11.0, "1": 12.0}
    targets = json.loads(out)["targets"]
    assert [t["foreign_pages"] for t in targets] == [2, 4]
    assert all(t["domain_ranges"] and t["conflict_ranges"] for t in targets)

    code, out, err = scan(capsys, children, "--domains", "cgroup")
    assert code == 0, err
    assert "Trust domains (cgroup): 2 domains; inside domains KSM would save" in out
    assert "exposure if everything were merged: 3 contents in 14 pages shared across domains " \
           "(+2 zero pages with use_zero_pages=0)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(f"/{TOP}/")]
    assert sorted((r[0], r[1], r[-2], r[-1]) for r in rows) == [
        (f"/{TOP}/a", "1", "7", "2"), (f"/{TOP}/b", "1", "7", "4")]

    code, out, _ = scan(capsys, children, "--domains", "cgroup", "--zero-pages-within", "--json")
    d = json.loads(out)["domains"]
    assert d["zero_pages_across"] is False and d["saved_pages_kept"] == {"0": 9.0, "1": 10.0}


@pytest.mark.ksm
def test_scan_domains_depth_and_uid(capsys, children):
    code, out, err = scan(capsys, children, "--domains", "cgroup", "--cgroup-depth", "1",
                          "--json")
    assert code == 0, err
    d = json.loads(out)["domains"]
    assert [p["key"] for p in d["per_domain"]] == [f"/{TOP}"]
    assert (d["cross_groups"], d["exposed_pages"], d["foreign_pages"]) == (0, 0, 0)
    assert d["saved_pages_kept"] == d["saved_pages_all"]
    code, out, err = scan(capsys, children, "--domains", "uid", "--json")
    assert code == 0, err
    d = json.loads(out)["domains"]
    with open(f"/proc/{children[0]}/status") as f:
        uid = next(line.split()[2] for line in f if line.startswith("Uid:"))
    assert d["kind"] == "uid" and [p["key"] for p in d["per_domain"]] == [f"uid:{uid}"]
    code, out, _ = scan(capsys, children, "--json")
    assert code == 0 and "domains" not in json.loads(out)


@pytest.mark.parametrize("extra, message", [
    (["--domains", "tenant"], "invalid choice: 'tenant'"),
    (["--domains", "cgroup", "--cgroup-depth", "-1"], "--cgroup-depth -1: must be >= 0"),
    (["--domains", "uid", "--cgroup-depth", "2"], "--cgroup-depth applies to --domains cgroup"),
    (["--cgroup-depth", "x"], "invalid int value: 'x'"),
    (["--zero-pages-within"], "--zero-pages-within applies with --domains"),
])
def test_scan_domains_bad_values_are_one_line_errors(capsys, extra, message):
    # checked before any process is read (PID 1 is never scanned here)
    try:
        code = main(["scan", "1", *extra])
    except SystemExit as exc:       # argparse's own checks exit (with our one-line format)
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err and out == ""
