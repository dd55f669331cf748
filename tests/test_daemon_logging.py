"""``udedup daemon`` logs its decisions at its default level (INFO), each once rather than every
round, rate-limited; ``-q`` keeps warnings only, ``-v`` adds the detail."""
from __future__ import annotations

import logging
import subprocess
import sys

from udedup.daemon.decisionlog import DecisionLog
from udedup.daemon.loop import Daemon
from udedup.daemon.model import Decision, EstimateResult

from daemon_fakes import cfg, fake_proc, fake_sysfs

MiB = 1 << 20
LOGGER = "udedup.daemon.loop"


def fake_host(tmp_path):
    procfs = tmp_path / "proc"
    fake_proc(procfs, 10, "vm-dup", ["vm-dup"], 1048576, merge_any=True, mappings=[(1048576, True)])
    fake_proc(procfs, 11, "vm-uniq", ["vm-uniq"], 1048576, mappings=[(1048576, False)])
    fake_proc(procfs, 12, "vm-cold", ["vm-cold"], 524288, mappings=[(524288, False)])
    (procfs / "meminfo").write_text("MemTotal: 16384000 kB\nMemAvailable: 8192000 kB\n")
    return procfs, fake_sysfs(tmp_path / "ksm")


def decision_lines(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_rounds_log_each_decision_once(tmp_path, caplog):
    from udedup.ksm import Ksm
    procfs, sysfs = fake_host(tmp_path)
    c = cfg(daemon={"ksm_root": str(sysfs), "procfs": str(procfs),
                    "state_file": str(tmp_path / "s.json")},
            metrics={"address": ""}, candidates={"names": ["vm-*"]},
            registration={"allow_injection": True})
    predicted = {10: 600 * MiB, 11: 0, 12: 300 * MiB}

    def fake_estimate(infos, cfg_, use_zero, now):
        return {i.key: EstimateResult(now, predicted[i.pid], i.anon_rss,
                                      100.0 * predicted[i.pid] / i.anon_rss) for i in infos}

    def fake_register(info, mode, ranges, procfs, ksm_root):
        return True, "prctl"

    clock = [100.0]
    d = Daemon(c, clock=lambda: clock[0], estimator=fake_estimate, registrar=fake_register,
               ksm=Ksm(str(sysfs), procfs=str(procfs)))
    d.original = d.ksm.knobs()
    caplog.set_level(logging.DEBUG, logger="udedup")
    for _ in range(4):
        d.run_round()
        clock[0] += 10
    info = decision_lines(caplog)
    text = "\n".join(info)
    # register: which process, how much predicted, how; skip with the reason; ksmd's speed and why
    assert "pid 12: register: vm-cold: predicted saving 300.0 MiB" in text
    assert "opting it in by injection (mode auto)" in text
    assert "pid 11: skip: vm-uniq: predicted saving 0.0 MiB" in text
    assert "below registration.min_saving" in text
    assert "registered: vm-dup: predicted saving 600.0 MiB" in text
    knobs = [line for line in info if line.startswith("set: ")]
    assert knobs and "pages_to_scan=" in knobs[0] and "(fast: " in knobs[0]
    assert len(info) == len(set(info)), "a decision was logged twice"
    assert sum("vm-cold" in line for line in info) == 2    # tracked, then registered: once each
    # an outside knob change: one warning, not one per round
    (sysfs / "sleep_millisecs").write_text("123\n")
    for _ in range(3):
        d.run_round()
        clock[0] += 10
    warned = decision_lines(caplog, logging.WARNING)
    assert len(warned) == 1 and "sleep_millisecs was changed by someone else" in warned[0]


def test_a_flapping_decision_is_held_back_then_caught_up(caplog):
    clock = [0.0]
    dl = DecisionLog(logging.getLogger(LOGGER), clock=lambda: clock[0], repeat_seconds=60)
    caplog.set_level(logging.DEBUG, logger="udedup")
    for mode in ("fast", "slow", "fast", "slow", "fast"):
        dl.emit(Decision("mode", mode, f"reason {mode}"))
        clock[0] += 5
    assert decision_lines(caplog) == ["fast: reason fast", "slow: reason slow"]
    assert len(decision_lines(caplog, logging.DEBUG)) == 3
    clock[0] = 61
    dl.flush()                       # the window ended: the latest state, at INFO
    assert decision_lines(caplog)[-1] == "fast: reason fast (2 more like it held back)"
    dl.emit(Decision("mode", "stopped", "idle"))    # a new decision is never held
    assert decision_lines(caplog)[-1] == "stopped: idle"
    # knob writes: the same values again are held, other values are a speed change
    dl.emit(Decision("knobs", "set", "run=1, sleep_millisecs=0 (fast: a)"))
    dl.emit(Decision("knobs", "set", "run=1, sleep_millisecs=200 (slow: b)"))
    dl.emit(Decision("knobs", "set", "run=1, sleep_millisecs=0 (fast: c)"))
    assert decision_lines(caplog)[-2:] == ["set: run=1, sleep_millisecs=0 (fast: a)",
                                           "set: run=1, sleep_millisecs=200 (slow: b)"]


def run_daemon(tmp_path, *flags) -> str:
    procfs, sysfs = fake_host(tmp_path)
    got = subprocess.run(
        [sys.executable, "-m", "udedup", "daemon", *flags, "--dry-run", "--once",
         "--set", f"daemon.ksm_root={sysfs}", "--set", f"daemon.procfs={procfs}",
         "--set", "metrics.address=", "--set", "candidates.names=vm-*",
         "--set", f"daemon.state_file={tmp_path / 's.json'}"],
        capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    return got.stderr


def test_default_level_shows_decisions_quiet_hides_them_verbose_adds_detail(tmp_path):
    default = run_daemon(tmp_path / "a")
    assert "udedup: INFO: pid 10: track: vm-dup: new candidate" in default
    assert "udedup: INFO: udedup daemon ready" in default
    assert "DEBUG" not in default
    quiet = run_daemon(tmp_path / "b", "-q")
    assert "INFO" not in quiet and "DEBUG" not in quiet
    verbose = run_daemon(tmp_path / "c", "-v")
    assert "udedup: INFO: pid 10: track" in verbose and "udedup: DEBUG: " in verbose
