"""A/B runs on the real kernel, at tiny sizes: the physics of use_zero_pages, knobs restored, no
process left behind after a normal or an interrupted run, and the full-study script end to end."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from udedup.ab.engine import run_ab
from udedup.ab.records import ABInterrupted
from udedup.ab.running import CHILD_MODULE
from udedup.ab.synthetic import SyntheticSpec
from udedup.ab.workloads import CommandWorkload, SyntheticWorkload
from udedup.ksm import Ksm

pytestmark = pytest.mark.ksm

FAST = {"advisor_mode": "none", "pages_to_scan": 5000, "sleep_millisecs": 5, "smart_scan": 0}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(mib=16, **kw):
    params = dict(zero=0.4, duplicate=0.3, unique=0.3, volatile=0.0, group_sizes=(2, 8), seed=3,
                  name="test")
    params.update(kw)
    return SyntheticSpec(size=mib << 20, **params)


def _gone(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); it is not running
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_use_zero_pages_moves_zero_pages_from_pages_sharing_to_ksm_zero_pages():
    ksm = Ksm()
    before = ksm.snapshot()
    workload = SyntheticWorkload(_spec())
    result = run_ab(workload, fixed=FAST, trials=1, seed=5, settle_timeout=30, cow_sample=512)
    assert ksm.snapshot().as_dict() == before.as_dict()
    assert [t.status for t in result.trials] == ["ok", "ok"]
    by_arm = {t.arm: t for t in result.trials}
    off, on = by_arm["off"], by_arm["on"]
    n_zero = workload.describe()["pages"]["zero"]
    # the workload's own counters (ksm_stat), immune to other processes on the machine
    exp_off, exp_on = workload.expected(False), workload.expected(True)
    assert on.process["zero_pages"] == n_zero == exp_on["ksm_zero_pages"]
    assert off.process["zero_pages"] == 0
    assert on.process["merging_pages"] == exp_on["pages_shared"] + exp_on["pages_sharing"]
    assert off.process["merging_pages"] == exp_off["pages_shared"] + exp_off["pages_sharing"]
    # globally: zero pages are in ksm_zero_pages with the knob on, in pages_sharing with it off
    assert on.ksm_zero_pages >= n_zero and off.ksm_zero_pages == 0
    # (off: zero pages merge into ceil(n/max_page_sharing) KSM pages, the rest is pages_sharing)
    moved = exp_off["pages_sharing"] - exp_on["pages_sharing"]
    assert moved >= n_zero - n_zero // 256 - 1
    assert off.pages_sharing - on.pages_sharing >= moved - (on.foreign_pages or 0)
    # and tracking them costs no rmap item with the knob on
    assert off.process["rmap_items"] - on.process["rmap_items"] == n_zero
    # copy-on-write of a merged page costs far more than a plain write, in both arms
    for t in (off, on):
        assert t.cow["cow_pages"] == 512 and t.cow["method"] == "pagemap"
        assert t.cow_ns_per_page > 5 * t.write_ns_per_page
    assert on.cow["cow_zero_pages"] > 0 and off.cow["cow_zero_pages"] == 0
    for t in result.trials:
        assert t.ksmd_cpu_seconds >= 0 and t.settle_seconds > 0 and t.series["t"]
        assert t.process["pids"] and all(_gone(p) for p in t.process["pids"])


def test_sigterm_mid_run_restores_knobs_and_leaves_no_process():
    ksm = Ksm()
    before = ksm.snapshot()
    pids = []

    def progress(text):
        # called from the sampler while a workload runs: note it and send SIGTERM once
        if ": " in text and "scan" in text and not pids:
            pids.extend(p.pid for p in _children())
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(ABInterrupted) as info:
        run_ab(SyntheticWorkload(_spec(8, unique=0.2, volatile=0.1)), fixed=FAST, trials=3, seed=1,
               settle_timeout=30, progress=progress)
    assert info.value.signame == "SIGTERM" and info.value.result.interrupted
    assert pids and all(_gone(p) for p in pids)
    assert not _children()
    assert ksm.snapshot().as_dict() == before.as_dict()
    assert ksm.stats().pages_shared == 0 or ksm.get("run") == 1   # ours are unmerged


def _children():
    import psutil
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if CHILD_MODULE in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_command_workload_runs_with_process_wide_merging(tmp_path):
    """--cmd: a Python one-liner allocating duplicate pages merges with no madvise of its own."""
    ready = tmp_path / "ready"
    code = ("import mmap,sys,time; m=mmap.mmap(-1, 8<<20, flags=mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS);"
            "m.madvise(mmap.MADV_NOHUGEPAGE); m.write(b'\\x07'*(8<<20)); open(sys.argv[1],'w').close();"
            "time.sleep(60)")
    workload = CommandWorkload([sys.executable, "-c", code, str(ready)], ready_file=str(ready))
    result = run_ab(workload, arms={"a": {"use_zero_pages": 0}, "b": {"use_zero_pages": 1}},
                    fixed=FAST, trials=1, seed=2, settle_timeout=30)
    for t in result.trials:
        assert t.status == "ok", t.error
        # 2048 identical pages -> at least 2040 saved, whatever else python mapped
        assert t.process["merging_pages"] >= 2040
        assert t.cow is None                      # never writes into someone else's memory
        assert all(_gone(p) for p in t.process["pids"])


def test_full_study_script_at_tiny_size(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ab_use_zero_pages.py"),
                           "--size", "8M", "--trials", "1", "--presets", "mixed,no-zero",
                           "--out", str(out), "--no-figure"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "README.md").exists() and (out / "overview.csv").exists()
    for name in ("mixed", "no-zero"):
        assert (out / name / "result.json").exists() and (out / name / "summary.txt").exists()
    assert "no-zero" in (out / "README.md").read_text()


def test_workload_child_imports_our_copy_from_any_directory(tmp_path, monkeypatch):
    """A directory holding another `udedup` (a source checkout without the built extension, where
    `pip install . && udedup ab` is typically run) must not shadow the copy the parent runs."""
    shadow = tmp_path / "udedup"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing copy was imported')\n")
    (shadow / "workloads.py").write_text("raise ImportError('the shadowing copy was imported')\n")
    monkeypatch.chdir(tmp_path)
    running = SyntheticWorkload(_spec(4)).start(seed=1)
    try:
        assert running.alive()
    finally:
        running.stop()
