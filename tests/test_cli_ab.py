"""`udedup ab` from the command line: bad arguments give one line and the documented exit code before
anything changes; a real tiny run prints the JSON the README promises; Ctrl-C mid-run exits 130,
restores every knob, leaves no process and keeps the finished trials on disk."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from udedup import cli
from udedup.ab.running import CHILD_MODULE
from udedup.commands.ab import parse_arm
from udedup.errors import UsageError
from udedup.ksm import LOCK_PATH
from udedup.ksm.lock import lock_holders
from udedup import pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KSM = "/sys/kernel/mm/ksm"
FAST = ["--fix", "pages_to_scan=5000", "--fix", "sleep_millisecs=5"]


def _knobs():
    out = {}
    for name in sorted(os.listdir(KSM)):
        path = os.path.join(KSM, name)
        if os.stat(path).st_mode & 0o200:
            with open(path) as f:
                out[name] = f.read()
    return out


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


PR_SET_PDEATHSIG = 1


def _as_from_a_terminal():
    # Runs in the child before exec. A test runner started as a background job of a
    # non-interactive shell (`pytest ... &`) ignores SIGINT, and an ignored signal stays ignored
    # across fork and exec: the harness would then never see the Ctrl-C these tests send (it ran
    # all its trials and exited 0). Give it SIGINT as a terminal's foreground process has it, and
    # a SIGTERM (on which it restores the knobs) should the test process die first.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    pages.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _popen(argv, **kw):
    return subprocess.Popen(argv, cwd=kw.pop("cwd", ROOT), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal, **kw)


def _udedup(*args, **kw):
    return _popen([sys.executable, "-m", "udedup", "ab", *args], **kw)


def _stop(proc) -> None:
    """End a harness a test gave up on the way it restores the knobs (SIGTERM), then for sure."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- refused before anything starts ---------------------------------------------------------------
USAGE = [
    (["--trials", "0"], 2, "at least 1 trial"),
    (["--arm", "on:use_zero_pages=1"], 2, "at least two --arm"),
    (["--arm", "on:", "--arm", "off:use_zero_pages=0"], 2, "sets no knob"),
    (["--arm", "a:x=1", "--arm", "a:x=2"], 2, "two arms are named 'a'"),
    (["--preset", "nope"], 2, "unknown preset"),
    (["--size", "12Q"], 2, "is not a size"),
    (["--zero", "0.9", "--dup", "0.9"], 2, "must be between 0 and 1"),
    (["--cmd", "true", "--pid", "1"], 2, "choose one workload"),
    (["--ready-file", "/tmp/x"], 2, "apply to --cmd only"),
    (["--out", "x", "--no-out"], 2, "contradict"),
    (["--fix", "pages_to_scan"], 2, "expected KNOB=VALUE"),
    (["--lock-timeout", "-1"], 2, "give seconds >= 0"),
    (["--lock-timeout", "1", "--no-lock"], 2, "not together with --no-lock"),
]
NEEDS_KSM = [
    (["--fix", "use_zero_pages=1"], 2, "both varied by the arms and fixed"),
    (["--arm", "a:use_zero_pages=0", "--arm", "b:pages_to_scan=5"], 2, "same knobs"),
    (["--arm", "a:run=1", "--arm", "b:run=0"], 2, "driven by the harness"),
    (["--arm", "a:use_zero_pages=0", "--arm", "b:use_zero_pages=7"], 6, "expected a boolean"),
    (["--fix", "no_such_knob=1"], 6, "unknown KSM knob"),
    (["--pid", "999999999"], 8, "no process with PID 999999999"),
    (["--cmd", "/nonexistent/prog --x"], 11, "not found"),
]


def _run_main(argv, capsys):
    rc = cli.main(["ab", "--no-out", *argv])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("argv, code, message", USAGE)
def test_usage_errors(argv, code, message, capsys):
    rc, err = _run_main(argv, capsys)
    assert rc == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("udedup")


@pytest.mark.ksm   # reads knobs before and after: no other KSM test may run meanwhile
@pytest.mark.parametrize("argv, code, message", NEEDS_KSM)
def test_refused_before_any_knob_changes(argv, code, message, capsys):
    before = _knobs()
    rc, err = _run_main(argv, capsys)
    assert rc == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert _knobs() == before


@pytest.mark.ksm
def test_not_root_is_one_line_exit_4_and_changes_nothing():
    if not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop root")
    before = _knobs()
    proc = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "udedup", "ab", "--no-out"], cwd="/", env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4
    assert proc.stderr.strip() == ("udedup: error: cannot write /sys/kernel/mm/ksm/run: 'udedup ab' "
                                   "changes KSM knobs and needs root; run it as root or with sudo")
    assert _knobs() == before


def test_parse_arm_forms():
    assert parse_arm("on:use_zero_pages=1,pages_to_scan=5") == (
        "on", {"use_zero_pages": "1", "pages_to_scan": "5"})
    assert parse_arm("use_zero_pages=1") == ("use_zero_pages=1", {"use_zero_pages": "1"})
    with pytest.raises(UsageError):
        parse_arm(":use_zero_pages=1")


def test_the_harness_takes_sigint_even_from_a_runner_that_ignores_it():
    """The Ctrl-C test below is only a test if the harness it starts acts on SIGINT, whatever the
    runner inherited (SIG_IGN when pytest runs as `pytest ... &` in a script)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = _popen([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) "
                       "is signal.default_int_handler)"])
    finally:
        signal.signal(signal.SIGINT, previous)
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "True", err


def _is_workload(p) -> bool:
    try:
        return CHILD_MODULE in " ".join(p.cmdline())
    except psutil.Error:       # gone, or a zombie between kill and reaping
        return False


def _running(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- real runs ------------------------------------------------------------------------------------
@pytest.mark.ksm
def test_tiny_run_prints_the_promised_json_and_restores_knobs(tmp_path):
    before = _knobs()
    proc = _udedup("--size", "8M", "--trials", "1", "--seed", "3", "--json", "--out",
                   str(tmp_path / "rep"), "--no-figure", "--no-lock", *FAST)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert set(doc["arms"]) == {"off", "on"}
    assert doc["arms"]["on"]["knobs"] == {"use_zero_pages": True}
    assert len(doc["trials"]) == 2
    for t in doc["trials"]:
        for key in ("arm", "pages_sharing", "ksm_zero_pages", "saved_bytes", "ksmd_cpu_seconds",
                    "settle_seconds"):
            assert t[key] is not None, key
        assert "series" not in t          # the time series is in the report folder
    on = next(t for t in doc["trials"] if t["arm"] == "on")
    assert on["ksm_zero_pages"] > 0
    assert doc["verdict"].startswith("on (use_zero_pages=1) vs off (use_zero_pages=0)")
    assert "\r" not in err                # no progress line when stderr is not a terminal
    assert sorted(os.listdir(tmp_path / "rep")) == ["result.json", "series.csv", "summary.txt",
                                                    "trials.csv"]
    assert _knobs() == before


@pytest.mark.ksm
def test_ctrl_c_mid_run_exits_130_restores_knobs_kills_workload_keeps_trials(tmp_path):
    before = _knobs()
    out = tmp_path / "rep"
    proc = _udedup("--size", "8M", "--trials", "50", "--seed", "5", "--out", str(out), "--no-figure",
                   "--no-lock", *FAST)
    harness = psutil.Process(proc.pid)
    workers = set()
    deadline = time.monotonic() + 60
    try:
        # wait for a finished trial on disk and a workload running for the next one
        while time.monotonic() < deadline:
            kids = [p for p in harness.children(recursive=True) if _is_workload(p)]
            workers.update(p.pid for p in kids)
            if (out / "result.json").exists() and kids:
                break
            time.sleep(0.02)
        else:
            pytest.fail("no trial finished within 60 s")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 130, err
    assert "udedup: interrupted" in err
    # SIGKILL is delivered at once but a process with a big mapping takes a moment to die: allow
    # it that moment; an orphan left running still fails here
    gone_by = time.monotonic() + 5
    while [p for p in workers if _running(p)] and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert workers and not [p for p in workers if _running(p)]
    assert _knobs() == before
    doc = json.loads((out / "result.json").read_text())
    assert doc["interrupted"] and 1 <= len(doc["trials"]) < 100
    assert "INTERRUPTED" in (out / "summary.txt").read_text()


@pytest.mark.ksm
def test_a_workload_that_dies_is_reported_exit_11(tmp_path):
    """The command exits 0.5 s after it is ready, long before ksmd (10 pages per 100 ms) settles."""
    before = _knobs()
    ready = tmp_path / "ready"
    code = f"import time; open({str(ready)!r}, 'w').close(); time.sleep(0.5); raise SystemExit(3)"
    proc = _udedup("--cmd", shlex.join([sys.executable, "-c", code]), "--ready-file", str(ready),
                   "--trials", "1", "--json", "--no-out", "--no-lock", "--fix", "pages_to_scan=10",
                   "--fix", "sleep_millisecs=100", "--settle-timeout", "20")
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 11, err
    assert "the workload failed or died in 2 of 2 trials (first: exited with status 3" in err
    doc = json.loads(out)
    assert [t["status"] for t in doc["trials"]] == ["workload-died", "workload-died"]
    assert _knobs() == before


# --- the experiment lock and runs without a verdict -----------------------------------------------
@pytest.mark.ksm   # this test process holds the lock: the harness must wait, then give up
def test_a_busy_lock_is_waited_for_then_exit_5_and_nothing_changes():
    before = _knobs()
    proc = _udedup("--size", "8M", "--trials", "1", "--no-out", "--lock-timeout", "1", *FAST)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 5, err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"udedup ab: waiting for the KSM experiment lock {LOCK_PATH}, held "
                               f"by PID {os.getpid()} (")
    assert lines[1].startswith(f"udedup: error: the KSM experiment lock {LOCK_PATH} is still held "
                               f"by PID {os.getpid()} (") and "after 1 s" in lines[1]
    assert _knobs() == before


def _fds_to(pid, path):
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    found.append(int(fd))
            except OSError:
                pass
    except OSError:
        pass
    return found


def test_a_run_holds_the_lock_and_its_workloads_do_not_inherit_it():
    """Not marked ksm: the harness takes the machine's lock itself (waiting for other sessions)."""
    from conftest import ksm_unavailable_reason
    reason = ksm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    proc = _udedup("--size", "8M", "--trials", "2", "--seed", "4", "--no-out", "--cow-sample", "0",
                   *FAST)
    harness = psutil.Process(proc.pid)
    held_by, workloads, inherited = set(), set(), {}
    try:
        while proc.poll() is None:
            with open(LOCK_PATH, "a+") as f:
                held_by.update(lock_holders(f.fileno()))
            try:
                kids = harness.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for kid in kids:
                workloads.add(kid.pid)
                if _fds_to(kid.pid, LOCK_PATH):
                    inherited[kid.pid] = _fds_to(kid.pid, LOCK_PATH)
            time.sleep(0.01)
        _, err = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    assert proc.pid in held_by
    assert workloads and inherited == {}


@pytest.mark.ksm
def test_no_trial_settles_no_verdict_exit_7():
    before = _knobs()
    proc = _udedup("--size", "8M", "--trials", "1", "--no-out", "--no-lock", "--cow-sample", "0",
                   "--settle-timeout", "0.3", "--fix", "pages_to_scan=10", "--fix",
                   "sleep_millisecs=200")
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 7, err
    last = err.strip().splitlines()[-1]
    assert last == ("udedup: error: no verdict: every trial of arm 'off', 'on' was left out: 2 did "
                    "not settle within 0.3 s (raise --settle-timeout or pages_to_scan)")
    assert _knobs() == before


@pytest.mark.ksm   # the incident: another KSM user wrote knobs in every trial
def test_every_trial_disturbed_no_verdict_exit_7():
    knob = os.path.join(KSM, "stable_node_chains_prune_millisecs")
    if not os.path.exists(knob):
        pytest.skip("this kernel has no stable_node_chains_prune_millisecs knob to disturb with")
    with open(knob) as f:
        original = f.read().strip()
    before = _knobs()
    stop = threading.Event()

    def meddle():
        i = 0
        while not stop.wait(0.003):
            i += 1
            with open(knob, "w") as f:
                f.write(str(1000 + i % 997))
    writer = threading.Thread(target=meddle)
    proc = _udedup("--size", "8M", "--trials", "1", "--no-out", "--no-lock", "--cow-sample", "0",
                   *FAST)
    writer.start()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        stop.set()
        writer.join()
        with open(knob, "w") as f:
            f.write(original)
        _stop(proc)
    assert proc.returncode == 7, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("udedup: error: no verdict: every trial of arm 'off', 'on' was left out: "
                           "2 disturbed: someone else changed KSM knobs mid-trial (first: knobs "
                           "changed by someone else during the trial: "
                           "stable_node_chains_prune_millisecs"), last
    assert _knobs() == before
