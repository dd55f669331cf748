"""udedup.ksm.experiment_lock: the machine-wide lock of KSM tests and experiment scripts."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from udedup.errors import KsmBusyError
from udedup.ksm import experiment_lock
from udedup.ksm.lock import lock_holders

LOCK_HOLDER = r"""
import os, subprocess, sys
from udedup.ksm import experiment_lock
with experiment_lock(sys.argv[1]):
    # close_fds=False: only close-on-exec on the lock's descriptor keeps it out of the child
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             stdout=subprocess.DEVNULL, close_fds=False)
    print(child.pid, flush=True)
    os._exit(0)   # die holding the lock, as a killed test run or script does
"""


def test_a_child_started_under_the_lock_does_not_hold_it(tmp_path):
    path = str(tmp_path / "ksm.lock")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, path], stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        assert holder.wait(timeout=30) == 0
        os.kill(child, 0)                   # the child outlives the holder ...
        with open(path) as f:               # ... and must not keep the lock alive
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()


HOLD_UNTIL_STDIN_CLOSES = r"""
import sys
from udedup.ksm import experiment_lock
with experiment_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_STDIN_CLOSES, path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_busy_lock_says_who_holds_it_and_times_out(tmp_path):
    path = str(tmp_path / "ksm.lock")
    holder = _holder(path)
    try:
        said = []
        t0 = time.monotonic()
        with pytest.raises(KsmBusyError, match=rf"still held by PID {holder.pid} \(python.*after 0.3 s"):
            with experiment_lock(path, timeout=0.3, on_wait=said.append):
                pytest.fail("took a lock someone else holds")
        assert 0.3 <= time.monotonic() - t0 < 5
        assert len(said) == 1 and f"held by PID {holder.pid} (python" in said[0]
        assert lock_holders_of(path) == [holder.pid]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    said = []
    with experiment_lock(path, timeout=0, on_wait=said.append):   # free: taken at once, no word
        assert lock_holders_of(path) == [os.getpid()]
    assert said == []


def test_the_wait_ends_when_the_holder_lets_go(tmp_path):
    path = str(tmp_path / "ksm.lock")
    holder = _holder(path)
    threading.Timer(0.3, holder.stdin.close).start()
    try:
        t0 = time.monotonic()
        with experiment_lock(path, timeout=20):
            assert 0.2 < time.monotonic() - t0 < 20
    finally:
        holder.wait(timeout=30)
        holder.stdout.close()


def lock_holders_of(path):
    with open(path) as f:
        return lock_holders(f.fileno())


# --- the session guard (tests/conftest.py) and processes that change knobs without the lock ------
def test_the_guard_takes_a_journaled_original_as_baseline_and_leaves_that_knob_to_its_owner():
    from conftest import judge, session_baseline
    now = {"smart_scan": "0", "advisor_mode": "none [scan-time]", "pages_to_scan": "100"}
    foreign = {"smart_scan": (True, 4242, "udedup daemon")}
    saved = session_baseline(now, foreign)
    assert saved == {"smart_scan": "1", "advisor_mode": "none [scan-time]", "pages_to_scan": "100"}
    # at the end the other process still runs: not a leak, not ours to write
    assert judge(saved, now, foreign) == ({}, {"smart_scan": (4242, "udedup daemon")})
    # ... it has restored its knob, and the run leaked another one
    later = {**now, "smart_scan": "1", "advisor_mode": "[none] scan-time"}
    assert judge(saved, later, {}) == ({"advisor_mode": ("none [scan-time]", "[none] scan-time")}, {})
    assert judge(saved, {**later, "advisor_mode": "none [scan-time]"}, {}) == ({}, {})


UNLOCKED_EXPERIMENT = r"""
import sys
from udedup.ksm import Ksm
ksm = Ksm()
with ksm.settings(smart_scan=not ksm.get("smart_scan")):   # no lock, like a daemon or a script
    print("changed", flush=True)
    sys.stdin.read()
"""


@pytest.mark.ksm
def test_a_process_changing_knobs_without_the_lock_is_no_baseline_and_not_overwritten():
    from conftest import _writable_knobs, foreign_experiments, judge, session_baseline
    if not os.path.exists("/sys/kernel/mm/ksm/smart_scan"):
        pytest.skip("this kernel has no smart_scan knob (Linux 6.7+)")
    original = _writable_knobs()["smart_scan"]
    child = subprocess.Popen([sys.executable, "-c", UNLOCKED_EXPERIMENT], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "changed\n"
        now = _writable_knobs()
        assert now["smart_scan"] != original
        foreign = foreign_experiments()
        assert foreign["smart_scan"][1] == child.pid
        saved = session_baseline(now, foreign)
        assert saved["smart_scan"] == original
        leaked, left = judge(saved, now, foreign)
        assert leaked == {} and left["smart_scan"][0] == child.pid
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0
        child.stdout.close()
    assert _writable_knobs()["smart_scan"] == original
    assert "smart_scan" not in foreign_experiments()
