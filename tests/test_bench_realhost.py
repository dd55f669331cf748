"""scripts/bench_daemon_peers.py --scenario realhost (scripts/realhost.py): the argument parsing,
the scenario definitions, the report from recorded numbers, and a tiny live run."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "scripts", "bench_daemon_peers.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_daemon_peers", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def realhost():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import realhost as mod
    finally:
        sys.path.pop(0)
    return mod


def test_arguments(bench):
    a = bench.build_parser().parse_args(["--scenario", "realhost", "--scale", "0.1",
                                         "--idle-window", "600", "--programs", "java,qemu"])
    assert (a.scenario, a.scale, a.idle_window, a.programs) == ("realhost", 0.1, 600.0, "java,qemu")
    d = bench.build_parser().parse_args([])
    assert d.scenario == "synthetic" and d.idle_window > 0 and d.daemon_profile is None
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--scenario", "cloud"])


@pytest.mark.parametrize("opt,value", [("--peers", "udedup,nope"), ("--programs", "java,erlang")])
def test_unknown_names_are_one_line_errors(opt, value):
    r = subprocess.run([sys.executable, BENCH, opt, value], capture_output=True, text=True,
                       cwd=REPO, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 2
    assert r.stderr.startswith(f"{opt}: unknown") and "choose from" in r.stderr
    assert "Traceback" not in r.stderr


def test_synthetic_scenario_definition(bench):
    s = bench.Synthetic(0.5)
    assert s.name == "synthetic" and s.notes == []
    assert "vm-a, vm-b 256 MiB each" in s.describe() and "db-c 384 MiB" in s.describe()

    class Kid:
        def __init__(self, name):
            self.name = name
    assert s.candidate_names([Kid("vm-a"), Kid("db-c")]) == ["vm-a", "db-c"]


def test_realhost_scenario_definition(bench, realhost):
    h = realhost.RealHost(0.1, bench.Child, lambda m: None, install=False, programs=["python"])
    try:
        assert h.vms is None and h.python
        text = h.describe()
        assert text.startswith("2 Python workers (19 MiB: 50 % duplicates")
        assert "JVM" not in text and "QEMU" not in text
        # the daemon looks at every real program by its comm, QEMU's truncated one included
        names = h.candidate_names([])
        assert {"java", "node", "redis-server", "py-worker-*"} <= set(names)
        import fnmatch
        assert any(fnmatch.fnmatch("qemu-system-x86", n) for n in names)
        assert os.path.isfile(os.path.join(h.workdir, "Heap.java"))
    finally:
        h.close()
    assert not os.path.exists(h.workdir)
    assert realhost.PACKAGES["java"] == "openjdk-17-jre-headless"
    assert set(realhost.SELECTABLE) == set(bench.PROGRAMS)


def _samples(bench, points):
    """Recorded samples: (t, saved MiB, ksmd CPU-s, tool CPU-s)."""
    mib = bench.MiB // bench.PAGE
    return [{"t": t, "saved_pages": int(m * mib), "saved_bytes": int(m * bench.MiB),
             "pages_sharing": 0, "ksm_zero_pages": 0, "full_scans": 0, "ksmd_cpu": k,
             "tool_cpu": c, "knobs": {}} for t, m, k, c in points]


def test_report_from_recorded_numbers(bench):
    achievable = 100 * bench.MiB // bench.PAGE
    floor = _samples(bench, [(0, 0, 0, 0), (2, 50, 0.5, 0), (4, 96, 1.0, 0)])
    ud = _samples(bench, [(0, 0, 0, 0), (3, 80, 0.6, 0.3), (5, 95, 1.0, 0.4), (10, 99, 1.5, 0.5),
                          (20, 99, 1.6, 0.52)])
    quiet = 3      # the quiet window starts at t=10: 10 s, 0.02 CPU-s of the daemon = 0.2 %
    main_ud = ud[:quiet + 1]
    r_floor = bench.summarize("floor", floor, achievable)
    r_ud = bench.summarize("udedup", main_ud, achievable)
    r_ud.update(bench.idle_cost(ud, quiet))
    assert r_ud["t95_s"] == 5 and r_ud["cpu95_s"] == pytest.approx(1.4)
    assert (r_ud["ksmd95_s"], r_ud["tool95_s"]) == (1.0, 0.4)
    assert r_ud["idle_window_s"] == 10 and r_ud["idle_tool_pct"] == pytest.approx(0.2)
    assert r_ud["idle_ksmd_pct"] == pytest.approx(1.0)
    assert bench.idle_cost(ud, len(ud) - 1) == {}

    class Args:
        scenario, scale, window, idle_window = "realhost", 0.1, 10.0, 10.0
        workload = bench.Synthetic(0.1)
    text = bench.report([r_floor, r_ud], {"floor": floor, "udedup": main_ud}, achievable, None,
                        ["a note"], Args)
    assert "scenario realhost (scale 0.1)" in text
    assert "quiet window of 10 s" in text
    row = next(line.split() for line in text.splitlines() if line.startswith("udedup    "))
    # peer t90 t95 CPU@95 xfloor tool/ksmd saved@end CPU(win) ksmd tool idle-tool idle-ksmd
    assert row[2] == "5.0s" and row[3] == "1.40s" and row[4] == "1.40x" and row[5] == "0.40x"
    assert row[10] == "0.200%" and row[11] == "1.00%"
    assert "  CPU@95 <= 1.2x floor: 1.40x NOT met" in text
    assert "  daemon CPU <= 0.5x ksmd's: 0.40x met" in text
    assert "idle <= 0.1 % of a CPU (over 10 s; the issue asks for 10 minutes): 0.200 % NOT met" in text
    assert "a note" in text


def test_report_without_idle_window_says_so(bench):
    achievable = 100 * bench.MiB // bench.PAGE
    ud = _samples(bench, [(0, 0, 0, 0), (5, 99, 1.0, 0.2)])

    class Args:
        scenario, scale, window, idle_window = "synthetic", 1.0, 5.0, 0.0
        workload = bench.Synthetic(1.0)
    text = bench.report([bench.summarize("udedup", ud, achievable)], {"udedup": ud}, achievable,
                        None, [], Args)
    assert "not measured (--idle-window 0)" in text
    assert "(no floor row)" in text


@pytest.mark.ksm
@pytest.mark.slow
def test_tiny_live_realhost_run(tmp_path):
    """Reference and udedup on a tiny real host (JVMs, Node.js, Redis, Python workers; no QEMU
    guests: their boot takes too long for a test): it reports, and every knob comes back."""
    missing = [p for p in ("java", "node", "redis-server") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the benchmark installs them with "
                    "apt-get; this test does not)")
    from udedup.ksm import Ksm
    ksm = Ksm()
    before = ksm.knobs()
    out = tmp_path / "report.txt"
    r = subprocess.run([sys.executable, BENCH, "--scenario", "realhost", "--programs",
                        "java,node,redis,python", "--no-install", "--scale", "0.03", "--window", "4",
                        "--idle-window", "2", "--interval", "1", "--reference-timeout", "15",
                        "--peers", "udedup", "--no-lock", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=170,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "scenario realhost (scale 0.03): 3 JVMs" in text
    rows = {line.split()[0] for line in text.splitlines() if line[:10].strip() in ("reference", "udedup")}
    assert rows == {"reference", "udedup"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["achievable_pages"] > 0
    ud = next(x for x in data["results"] if x["peer"] == "udedup")
    assert ud["idle_window_s"] >= 1.5 and ud["idle_tool_pct"] >= 0
    assert ksm.knobs() == before


def test_settled_needs_two_steady_full_scans(bench):
    def s(scans, saved):
        return {"full_scans": scans, "saved_pages": saved}
    assert not bench.settled([])
    assert not bench.settled([s(0, 0), s(3, 100), s(3, 100)])            # fewer than 4 scans
    assert not bench.settled([s(2, 50), s(3, 90), s(4, 100)])            # still growing
    assert bench.settled([s(2, 100000), s(3, 100040), s(4, 100050)])     # within 0.1 %
    # steady over half a second but not over two scans: a slow full scan is not yet settled
    assert not bench.settled([s(3, 10), s(4, 5000), s(5, 9000), s(5, 9000), s(5, 9000)])
