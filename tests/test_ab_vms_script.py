"""scripts/ab_vms.py, the VM study: arguments, the plan (no boot), the report rendered from recorded
trials (the real saving over the last full scans, huge pages lost, the contrasts), and one real run
at the smallest size (one guest, one THP setting, one trial per cell: ``vm``, ``ksm``, ``slow``)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from udedup.ab.records import ABResult, TrialRecord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "ab_vms.py")
MIB = 1 << 20


def run(*args, timeout=60):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout)


def load():
    spec = importlib.util.spec_from_file_location("ab_vms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help():
    out = run("--help")
    assert out.returncode == 0
    assert "--plan" in out.stdout and "--thp" in out.stdout and "--guests" in out.stdout


@pytest.mark.parametrize("args, word", [
    (["--guests", "x"], "--guests"), (["--guests", "0"], "--guests"),
    (["--thp", "sometimes"], "--thp"), (["--thp", "never,never"], "--thp"),
    (["--trials", "0"], "--trials"), (["--vm-memory", "64M"], "128 MiB"),
    (["--fix", "pages_to_scan"], "KNOB=VALUE")])
def test_bad_arguments_exit_2_with_one_line(args, word):
    out = run("--plan", *args)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "error:" in last and word in last and "Traceback" not in out.stderr


def test_plan_prints_the_cells_and_boots_nothing():
    out = run("--plan", "--guests", "2,4", "--trials", "3")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.count("4 cells x 3 trials = 12 trials") == 2
    for cell in ("uzp0-madvise", "uzp1-madvise", "uzp0-never", "uzp1-never"):
        assert f"cell {cell}: use_zero_pages={cell[3]} thp.enabled={cell.split('-')[1]}" in text
    order = [ln for ln in text.splitlines() if ln.strip().startswith("order:")]
    assert len(order) == 2 and all(len(o.split()) == 13 for o in order)


def _trial(index, arm, saved_mib, growth_mib, cpu, zero=0):
    """A trial whose series grows through full scan 1 (growth) and sits at saved_mib after."""
    scans = [0, 1, 1, 1, 2, 2, 3, 3, 4]
    true = [0, growth_mib, growth_mib * 2, growth_mib * 3] + [saved_mib] * 5
    t = TrialRecord(index=index, block=index // 4, arm=arm, knobs={}, status="ok",
                    settle_seconds=10.0 + index, ksmd_cpu_seconds=cpu, saved_pages=100 * 256,
                    general_profit=99 * MIB, saved_bytes=int(growth_mib * 2 * MIB))
    t.series = {"full_scans": scans, "true_saved_bytes": [int(v * MIB) for v in true],
                "zero_mapped_pages": [0] * 4 + [zero] * 5}
    return t


def _fake_study(folder, module):
    arms = module.study_arms(["madvise", "never"])
    trials, huge = [], {}
    for k in range(12):
        arm = list(arms)[k % 4]
        thp = arm.endswith("madvise")
        saved = (150 if thp else 100) + k % 3
        trials.append(_trial(k, arm, saved, 20, cpu=2.0 if arm.startswith("uzp1") else 3.0,
                             zero=5000 if thp else 0))
        huge[str(k)] = {"arm": arm, "before": (200 if thp else 0) * 2 * MIB,
                        "after": (150 if thp else 0) * 2 * MIB}
    config = {"arms": arms, "fixed": {"pages_to_scan": 4000}, "seed": 1, "stable_scans": 2,
              "page_size": 4096, "kernel": "test", "cpus": 2, "trials_per_arm": 3,
              "workload": {"kind": "vms", "name": "2 VMs",
                           "spec": {"guests": 2, "memory": 384 * MIB},
                           "accelerator": "tcg"}}
    result = ABResult(config=config, trials=trials)
    result.summarize()
    sub = folder / "2guests"
    sub.mkdir(parents=True)
    (sub / "result.json").write_text(json.dumps(result.to_dict()))
    (sub / "hugepages.json").write_text(json.dumps({"pmd_bytes": 2 * MIB, "trials": huge}))
    (folder / "study.json").write_text(json.dumps(
        {"guests": [2], "seconds": 60, "finished": "now", "notes": ["a note"],
         "args": {"trials": 3, "vm_memory": "384M", "thp": ["madvise", "never"], "seed": 1}}))


def test_rerender_takes_the_saving_over_the_last_scans_and_the_huge_pages_lost(tmp_path):
    module = load()
    _fake_study(tmp_path, module)
    out = run("--rerender", str(tmp_path), "--no-figure")
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "overview.csv") as f:
        rows = {(r["thp"], r["use_zero_pages"]): r for r in csv.DictReader(f)}
    mad = rows[("madvise", "0")]
    # the plateau over the last two full scans, not the growth of scan 1 (the engine's figure)
    assert float(mad["saved_bytes_median"]) == pytest.approx(150 * MIB, abs=3 * MIB)
    assert float(mad["engine_saved_bytes_median"]) == 40 * MIB
    assert float(mad["thp_before_median"]) == 200 and float(mad["thp_lost_median"]) == 50
    assert float(mad["zero_mapped_pages_median"]) == 5000
    assert float(rows[("never", "1")]["thp_lost_median"]) == 0
    diffs = {r["contrast"]: r for r in csv.DictReader(open(tmp_path / "contrasts.csv"))}
    uzp = diffs["use_zero_pages 1 - 0, thp madvise"]
    assert float(uzp["ksmd_cpu_seconds_diff"]) == pytest.approx(-1.0)
    assert uzp["ksmd_cpu_seconds_clear"] == "True"
    never = diffs["thp never - madvise, use_zero_pages=0"]
    assert float(never["thp_lost_diff"]) == -50
    text = (tmp_path / "README.md").read_text()
    assert "| 2 | madvise | 0 | 3/3 |" in text and "- a note" in text
    assert (tmp_path / "2guests" / "summary.txt").exists()


def test_plateau_truth_without_series_keeps_the_engine_figure():
    module = load()
    t = TrialRecord(index=0, block=0, arm="a", knobs={}, saved_bytes=123, zero_mapped_pages=4)
    assert module.plateau_truth(t) == (123, 4)


def test_rerender_of_a_folder_without_a_study_is_one_line(tmp_path):
    out = run("--rerender", str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip().startswith("error:")


@pytest.mark.vm
@pytest.mark.ksm
@pytest.mark.slow
def test_one_guest_one_trial_per_cell(tmp_path):
    if os.environ.get("UDEDUP_VM_TESTS") == "0":
        pytest.skip("UDEDUP_VM_TESTS=0")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    # the ksm marker holds the lock: the script must not take it again
    out = run("--guests", "1", "--thp", "never", "--trials", "1", "--no-lock", "--no-figure",
              "--out", str(tmp_path), timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "overview.csv")))
    assert [(r["thp"], r["use_zero_pages"]) for r in rows] == [("never", "0"), ("never", "1")]
    for r in rows:
        assert r["n"] == "1" and float(r["saved_bytes_median"]) > 0
        assert float(r["thp_lost_median"]) == 0     # never: the guests got no THP to lose
    assert json.load(open(tmp_path / "1guests" / "hugepages.json"))["trials"]
