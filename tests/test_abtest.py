"""The A/B engine without a kernel: driven against a fake sysfs tree with a fake ksmd and fake
workloads (knobs per arm, restore, timeouts, dying workloads, interrupts), and its report files.
The pure statistics and the synthetic layout are in test_ab_stats.py."""
from __future__ import annotations

import os
import signal
import threading

import pytest
from fake_sysfs import MINIMAL_COUNTERS, MINIMAL_KNOBS, StoreSysFs, make_fake_ksm

from udedup.ab.engine import run_ab
from udedup.ab.records import ABInterrupted, ABResult
from udedup.ab.report import format_table, write_report
from udedup.ab.stats import trial_order
from udedup.errors import KsmValueError, UsageError, WorkloadError
from udedup.ksm import Ksm


# --- the engine against a fake kernel -----------------------------------------------------------
KNOBS = MINIMAL_KNOBS
COUNTERS = tuple(MINIMAL_COUNTERS)
KSMD_PID = 77


def _atomic(path, text, mode):
    # sysfs and procfs reads never see half a write; the readers here run in other threads. The
    # staging file lives outside the tree: Ksm lists the directory to discover knobs.
    # One staging file per thread: the fake ksmd thread and a run=2 write can update the same
    # counter at once.
    tmp = path.parent.parent / f".staging-{path.parent.name}-{path.name}-{threading.get_ident()}"
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class FakeKernel:
    """Files as sysfs, writes checked like mm/ksm.c does, and a ksmd thread that 'merges' the
    running fake workload: a full scan every few ms while run=1, counters from use_zero_pages.
    :meth:`write` is the store function of the engine's :class:`Ksm` (through StoreSysFs)."""

    def __init__(self, tmp_path):
        self.root = make_fake_ksm(tmp_path / "ksm", KNOBS, MINIMAL_COUNTERS)
        self.proc = tmp_path / "proc"
        (self.proc / str(KSMD_PID)).mkdir(parents=True)
        (self.proc / str(KSMD_PID) / "comm").write_text("ksmd\n")
        self.ticks = 0
        self._write_stat()
        self.workload = None          # what is "mapped" now: (zero_pages, dup_pages)
        self.stalled = False          # ksmd makes no progress (a trial that never settles)
        self.meddle = False           # "another tool" writes a knob once ksmd runs
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._ksmd, daemon=True)
        self.on_unmerge = None        # called at each run=2 write with its count (1, 2, ...)
        self.unmerges = 0

    def _write_stat(self):
        fields = ["S"] + ["0"] * 40
        fields[11] = str(self.ticks)          # utime (stat field 14)
        _atomic(self.proc / str(KSMD_PID) / "stat", f"{KSMD_PID} (ksmd) " + " ".join(fields), 0o444)

    def get(self, name):
        return (self.root / name).read_text().strip()

    def put(self, name, value):
        path = self.root / name
        _atomic(path, f"{value}\n", 0o444 if name in COUNTERS else 0o644)

    def knobs(self):
        return {name: self.get(name) for name in KNOBS}

    def write(self, path, text):
        name = os.path.basename(path)
        if name == "advisor_mode":
            self.put(name, "[none] scan-time" if text == "none" else "none [scan-time]")
            return
        if name == "run" and text == "2":
            for counter in COUNTERS:
                self.put(counter, 0)
            self.put("run", 0)
            self.unmerges += 1
            if self.on_unmerge is not None:
                self.on_unmerge(self.unmerges)
            return
        self.put(name, text)

    def _ksmd(self):
        while not self.stop.wait(0.004):
            if self.get("run") != "1" or self.stalled:
                continue
            if self.meddle and int(self.get("full_scans")) >= 3:
                self.meddle = False    # well after the harness's snapshot at run=1
                self.put("sleep_millisecs", 99)
            self.put("full_scans", int(self.get("full_scans")) + 1)
            self.ticks += 1
            self._write_stat()
            if self.workload is not None:
                zero, dup = self.workload
                if self.get("use_zero_pages") == "1":
                    shared, sharing, kzero = dup // 2, dup // 2, zero
                else:
                    shared, sharing, kzero = dup // 2 + 1, dup // 2 + zero - 1, 0
                for name, value in (("pages_shared", shared), ("pages_sharing", sharing),
                                    ("ksm_zero_pages", kzero)):
                    self.put(name, value)
                self.put("general_profit", (sharing + kzero) * 4096)


class FakeRunning:
    def __init__(self, kernel, workload, die):
        self.kernel, self.workload = kernel, workload
        self.pid = None
        self.owned = True
        self._dead = die
        self.stopped = False

    def pids(self):
        return []

    def alive(self):
        return not self._dead and not self.stopped

    def exit_description(self):
        return "exited with status 3: boom" if self._dead else None

    def cow(self, sample, seed):
        return {"cow_ns_per_page": 2000.0 + seed % 7, "write_ns_per_page": 30.0}

    def stop(self, grace=2.0):
        self.stopped = True
        self.kernel.workload = None
        self.workload.stopped += 1


class FakeWorkload:
    kind = "fake"
    name = "fake"

    def __init__(self, kernel, zero=1000, dup=2000, fail_on=(), die_on=(), interrupt_on=(),
                 stall_on=(), meddle_on=()):
        self.kernel, self.zero, self.dup = kernel, zero, dup
        self.fail_on, self.die_on = set(fail_on), set(die_on)
        self.interrupt_on, self.stall_on = set(interrupt_on), set(stall_on)
        self.meddle_on = set(meddle_on)
        self.started = 0
        self.stopped = 0
        self.seen_knobs: list[dict] = []

    def describe(self):
        return {"kind": self.kind, "name": self.name}

    def preflight(self):
        pass

    def start(self, seed=0):
        n = self.started
        self.started += 1
        self.seen_knobs.append(self.kernel.knobs())
        if n in self.interrupt_on:
            raise KeyboardInterrupt
        if n in self.fail_on:
            raise WorkloadError("could not start")
        self.kernel.stalled = n in self.stall_on
        self.kernel.meddle = n in self.meddle_on
        self.kernel.workload = (self.zero, self.dup)
        return FakeRunning(self.kernel, self, die=n in self.die_on)


@pytest.fixture
def kernel(tmp_path):
    k = FakeKernel(tmp_path)
    k.thread.start()
    yield k
    k.stop.set()
    k.thread.join()


def _run(kernel, workload, **kw):
    kw.setdefault("trials", 2)
    kw.setdefault("seed", 11)
    ksm = Ksm(kernel.root, procfs=kernel.proc, sysfs=StoreSysFs(kernel.write))
    return run_ab(workload, ksm=ksm, settle_timeout=kw.pop("settle_timeout", 5.0),
                  sample_interval=0.01, **kw)


def test_engine_applies_each_arm_with_fixed_knobs_and_restores_everything(kernel):
    before = kernel.knobs()
    w = FakeWorkload(kernel)
    result = _run(kernel, w)
    assert kernel.knobs() == before
    assert len(result.trials) == 4 and w.stopped == 4
    for rec, seen in zip(result.trials, w.seen_knobs):
        assert seen["use_zero_pages"] == ("1" if rec.arm == "on" else "0")
        # the defaults are pinned, ksmd is stopped while the workload starts
        assert (seen["pages_to_scan"], seen["sleep_millisecs"], seen["smart_scan"]) == ("4000", "10", "0")
        assert seen["run"] == "0"
        assert rec.status == "ok" and rec.settle_seconds > 0 and rec.ksmd_cpu_seconds > 0
        assert rec.series["t"] and rec.series["t"] == sorted(rec.series["t"])
    on = [t for t in result.trials if t.arm == "on"]
    off = [t for t in result.trials if t.arm == "off"]
    assert all(t.ksm_zero_pages == 1000 and t.pages_sharing == 1000 for t in on)
    assert all(t.ksm_zero_pages == 0 and t.pages_sharing == 1999 for t in off)
    assert result.summary["arms"]["on"]["n"] == 2
    assert "more saved memory" in result.verdict or "saved memory" in result.verdict
    # the trial order is the seed's
    assert [(t.block, t.arm) for t in result.trials] == trial_order(["off", "on"], 2, 11)


def test_engine_custom_arms_and_fixed(kernel):
    w = FakeWorkload(kernel)
    result = _run(kernel, w, arms={"slow": {"pages_to_scan": 100}, "fast": {"pages_to_scan": 5000}},
                  fixed={"sleep_millisecs": 0}, trials=1)
    seen = {rec.arm: s for rec, s in zip(result.trials, w.seen_knobs)}
    assert seen["slow"]["pages_to_scan"] == "100" and seen["fast"]["pages_to_scan"] == "5000"
    assert all(s["sleep_millisecs"] == "0" for s in seen.values())
    assert all(s["smart_scan"] == "1" for s in seen.values())    # fixed={...} replaces defaults
    assert result.config["fixed"] == {"sleep_millisecs": 0}


def test_arms_varying_pages_to_scan_run_on_a_machine_with_the_scan_time_advisor(kernel):
    """The fixed advisor_mode=none makes the arms' pages_to_scan valid: each arm is validated
    with the fixed knobs, as a trial applies them."""
    kernel.put("advisor_mode", "none [scan-time]")
    before = kernel.knobs()
    w = FakeWorkload(kernel)
    result = _run(kernel, w, arms={"slow": {"pages_to_scan": 100}, "fast": {"pages_to_scan": 5000}},
                  trials=1)
    assert [t.status for t in result.trials] == ["ok", "ok"]
    assert all(s["advisor_mode"] == "[none] scan-time" for s in w.seen_knobs)
    assert kernel.knobs() == before


@pytest.mark.parametrize("arms, fixed, match", [
    ({"on": {"use_zero_pages": 1}}, None, "at least two arms"),
    ({"a": {"use_zero_pages": 0}, "b": {"pages_to_scan": 5}}, None, "same knobs"),
    ({"a": {"use_zero_pages": 0}, "b": {"use_zero_pages": 0}}, None, "identical"),
    ({"a": {"run": 0}, "b": {"run": 1}}, None, "driven by the harness"),
    ({"a": {"use_zero_pages": 0}, "b": {"use_zero_pages": 1}}, {"use_zero_pages": 1}, "both varied"),
])
def test_bad_arms_are_refused_before_anything_changes(kernel, arms, fixed, match):
    before = kernel.knobs()
    w = FakeWorkload(kernel)
    with pytest.raises(UsageError, match=match):
        _run(kernel, w, arms=arms, fixed=fixed)
    assert w.started == 0 and kernel.knobs() == before


def test_bad_knob_value_is_refused_before_anything_changes(kernel):
    before = kernel.knobs()
    w = FakeWorkload(kernel)
    with pytest.raises(KsmValueError):
        _run(kernel, w, arms={"a": {"use_zero_pages": 0}, "b": {"use_zero_pages": 7}})
    assert w.started == 0 and kernel.knobs() == before


def test_timeout_is_recorded_not_raised_and_left_out_of_the_medians(kernel):
    w = FakeWorkload(kernel, stall_on={1})
    result = _run(kernel, w, trials=1, settle_timeout=0.4)
    stalled = result.trials[1]
    assert stalled.timed_out and stalled.status == "timeout"
    assert result.summary["arms"][stalled.arm]["n"] == 0
    assert result.summary["arms"][stalled.arm]["timed_out"] == 1
    assert "no finished trial" in result.verdict


def test_dying_workload_is_reported_and_the_run_goes_on(kernel):
    before = kernel.knobs()
    w = FakeWorkload(kernel, die_on={2})
    result = _run(kernel, w)
    assert [t.status for t in result.trials].count("workload-died") == 1
    died = result.trials[2]
    assert died.status == "workload-died" and "status 3" in died.error and died.cow_ns_per_page is None
    assert kernel.knobs() == before and w.stopped == 4
    assert "workload-died" in format_table(result)


def test_knobs_changed_by_someone_else_mark_the_trial_disturbed(kernel):
    before = kernel.knobs()
    result = _run(kernel, FakeWorkload(kernel, meddle_on={1}), trials=2)
    t = result.trials[1]
    assert t.status == "disturbed" and t.outside_changes == {"sleep_millisecs": [10, 99]}
    assert result.summary["arms"][t.arm]["n"] == 1 and result.summary["arms"][t.arm]["disturbed"] == 1
    assert "left out" in format_table(result)
    assert kernel.knobs() == before


def test_workload_that_cannot_start_first_aborts_later_is_recorded(kernel):
    before = kernel.knobs()
    with pytest.raises(WorkloadError, match="failed to start"):
        _run(kernel, FakeWorkload(kernel, fail_on={0}))
    assert kernel.knobs() == before
    result = _run(kernel, FakeWorkload(kernel, fail_on={1}))
    assert result.trials[1].status == "workload-failed"
    assert kernel.knobs() == before


def test_interrupt_keeps_finished_trials_restores_knobs_and_stops_the_workload(kernel):
    before = kernel.knobs()
    w = FakeWorkload(kernel, interrupt_on={3})
    with pytest.raises(ABInterrupted) as info:
        _run(kernel, w, trials=3)
    result = info.value.result
    assert result.interrupted and len(result.trials) == 3
    assert kernel.knobs() == before
    assert w.stopped == 3 and kernel.workload is None
    assert isinstance(info.value, KeyboardInterrupt)


def test_sigterm_mid_trial_is_an_interrupt(kernel):
    """SIGTERM while waiting for the merge: cleanup runs, the trial in progress is dropped."""
    before = kernel.knobs()
    w = FakeWorkload(kernel, stall_on={1})
    timer = threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(ABInterrupted) as info:
            _run(kernel, w, trials=2, settle_timeout=30)
    finally:
        timer.cancel()
    assert info.value.signame == "SIGTERM"
    assert len(info.value.result.trials) == 1
    assert kernel.knobs() == before and w.stopped == 2


def test_sigint_during_the_final_cleanup_is_delivered_not_lost(kernel):
    """A real SIGINT arriving while the cleanup after the last trial restores the knobs (held, so
    the restore finishes): the run still ends as interrupted, with every trial."""
    before = kernel.knobs()
    # trials=1, two arms: run=2 is written once per trial, the third time by the final cleanup
    kernel.on_unmerge = lambda n: signal.raise_signal(signal.SIGINT) if n == 3 else None
    with pytest.raises(ABInterrupted) as info:
        _run(kernel, FakeWorkload(kernel), trials=1)
    assert info.value.signame == "SIGINT"
    assert info.value.result.interrupted and len(info.value.result.trials) == 2
    assert kernel.knobs() == before


def test_an_interrupt_landing_in_the_cleanup_restarts_it_and_keeps_the_trials(kernel):
    """A KeyboardInterrupt that gets into the cleanup (a Ctrl-C before the hold is in place) must
    neither skip the restore nor lose the finished trials: the cleanup starts over."""
    before = kernel.knobs()

    def interrupt(n):
        if n == 3:
            raise KeyboardInterrupt
    kernel.on_unmerge = interrupt
    w = FakeWorkload(kernel)
    with pytest.raises(ABInterrupted) as info:
        _run(kernel, w, trials=1)
    assert info.value.signame == "SIGINT" and len(info.value.result.trials) == 2
    assert kernel.unmerges == 4             # the interrupted cleanup's unmerge, then the whole again
    assert kernel.knobs() == before and w.stopped == 2


def test_report_files_round_trip(kernel, tmp_path):
    result = _run(kernel, FakeWorkload(kernel), trials=3)
    paths = write_report(result, str(tmp_path / "report"), figure=False)
    assert set(paths) == {"json", "trials_csv", "series_csv", "summary"}
    import json
    doc = json.loads(open(paths["json"]).read())
    assert set(doc["arms"]) == {"off", "on"}
    for t in doc["trials"]:
        assert {"arm", "pages_sharing", "ksm_zero_pages", "saved_bytes", "ksmd_cpu_seconds",
                "settle_seconds"} <= set(t)
    again = ABResult.from_dict(doc)
    assert again.summary["arms"]["on"]["metrics"]["saved_bytes"] == \
        result.summary["arms"]["on"]["metrics"]["saved_bytes"]
    lines = open(paths["trials_csv"]).read().splitlines()
    assert len(lines) == 1 + 6 and lines[0].startswith("index,block,arm,status")
    assert "verdict:" in open(paths["summary"]).read()


def test_figure_is_drawn_or_skipped_with_a_warning(kernel, tmp_path, caplog, monkeypatch):
    from udedup.ab.report import plot
    result = _run(kernel, FakeWorkload(kernel), trials=1)
    with monkeypatch.context() as m:
        m.setitem(__import__("sys").modules, "matplotlib", None)    # as if not installed
        assert plot(result, str(tmp_path / "none.png")) is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "none.png").exists()
    pytest.importorskip("matplotlib")
    path = plot(result, str(tmp_path / "ab.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
