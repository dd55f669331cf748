"""Shared test machinery.

KSM state is global to the machine, so tests marked ``ksm``:
- are skipped, with the reason, where /sys/kernel/mm/ksm is missing or not writable;
- hold one lock (udedup.ksm.experiment_lock: a flock on /tmp/udedup-ksm.lock, which the
  experiment scripts take too) for their whole run, so no two overlap, across
  pytest processes too;
- are watched by a session guard that records every writable knob at the start and fails the run
  (and puts the knobs back) if any differs at the end: KSM's, and THP's
  (/sys/kernel/mm/transparent_hugepage and its subdirectories, named ``thp.<path>``).
The guard reads and writes sysfs directly, not through udedup.ksm.Ksm, so a bug there cannot hide
a leak; it takes only the pure write order (udedup.ksm.knobs.write_order) and the choice parser.
It reads and writes only while it holds the lock, and a process that changes knobs without the lock
(a daemon, ``udedup set``, a script run without it) is told by its recovery journal
(udedup.ksm.journal, /run/udedup): the value that process changed is not the baseline (its original
is), and the guard never writes a knob that process is changing right now.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from udedup.host.fs import ProcFs
from udedup.host.parse import parse_choices
from udedup.ksm import experiment_lock
from udedup.ksm import journal as journals
from udedup.ksm.knobs import write_order

KSM_ROOT = "/sys/kernel/mm/ksm"
THP_ROOT = "/sys/kernel/mm/transparent_hugepage"
_READ_ONLY = {"full_scans", "general_profit", "ksm_zero_pages", "pages_scanned", "pages_shared",
              "pages_sharing", "pages_skipped", "pages_unshared", "pages_volatile",
              "stable_node_chains", "stable_node_dups"}


def ksm_unavailable_reason() -> str | None:
    if not os.path.isdir(KSM_ROOT):
        return f"{KSM_ROOT} does not exist: this kernel has no KSM (CONFIG_KSM)"
    if os.geteuid() != 0:
        return "KSM tests write /sys/kernel/mm/ksm knobs and need root"
    if not os.access(os.path.join(KSM_ROOT, "run"), os.W_OK):
        return f"{KSM_ROOT}/run is not writable (read-only sysfs in this container?)"
    return None


def _writable_knobs() -> dict[str, str]:
    knobs = {}
    if not os.path.isdir(KSM_ROOT):
        return knobs
    for name in sorted(os.listdir(KSM_ROOT)):
        path = os.path.join(KSM_ROOT, name)
        if name in _READ_ONLY or not os.path.isfile(path) or not (os.stat(path).st_mode & 0o200):
            continue
        with open(path) as f:
            knobs[name] = f.read().strip()
    knobs.update(thp_knobs())
    return knobs


def thp_knobs() -> dict[str, str]:
    """Every writable THP file (the directory and its subdirectories) as ``thp.<path>``: raw text."""
    knobs = {}
    if not os.path.isdir(THP_ROOT):
        return knobs
    for sub in [""] + sorted(d for d in os.listdir(THP_ROOT)
                             if os.path.isdir(os.path.join(THP_ROOT, d))):
        for name in sorted(os.listdir(os.path.join(THP_ROOT, sub))):
            path = os.path.join(THP_ROOT, sub, name)
            if os.path.isfile(path) and os.stat(path).st_mode & 0o200:
                with open(path) as f:
                    knobs["thp." + os.path.join(sub, name)] = f.read().strip()
    return knobs


def raw_restore(saved: dict[str, str]) -> None:
    """Write ``saved`` (raw texts by knob name, ``thp.*`` too) back, in the one write order."""
    for name in write_order(saved):
        value = saved[name]
        if "[" in value:       # a choice knob reads "[none] scan-time": write the selected one
            value = parse_choices(value)[0]
        path = (os.path.join(THP_ROOT, name[4:]) if name.startswith("thp.")
                else os.path.join(KSM_ROOT, name))
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError:
            pass


def plain(value) -> str:
    """A knob's value as one comparable text: raw ``"[none] scan-time"`` and journaled ``"none"``
    alike read ``"none"``; a journaled True reads ``"1"``."""
    if isinstance(value, bool):
        return str(int(value))
    text = str(value)
    return parse_choices(text)[0] if "[" in text else text


def foreign_experiments(journal_dir: str = journals.DEFAULT_DIR) -> dict[str, tuple[object, int, str]]:
    """Knobs that live processes other than this one are changing now, from their recovery
    journals: ``{knob: (its value before they changed it, pid, command)}`` (the oldest original
    when two journals hold a knob)."""
    out: dict[str, tuple[object, int, str]] = {}
    for entry in reversed(journals.scan(journal_dir, KSM_ROOT, THP_ROOT, ProcFs())):  # oldest first
        if entry.state == "live" and entry.pid != os.getpid():
            for name, value in entry.knobs.items():
                out.setdefault(name, (value, entry.pid, entry.command))
    return out


def session_baseline(now: dict[str, str], foreign: dict[str, tuple]) -> dict[str, str]:
    """The knobs the run must leave as it found them: ``now`` (raw), except those another process
    is changing outside the lock: their original from its journal."""
    return {**now, **{k: plain(v[0]) for k, v in foreign.items() if k in now}}


def judge(saved: dict[str, str], now: dict[str, str], foreign: dict[str, tuple]):
    """``(leaked, left)``: knobs that differ from ``saved`` (``{knob: (then, now)}``, raw), and,
    apart, those another process is changing now and will restore to ``saved`` itself
    (``{knob: (pid, command)}``): no leak of ours, and not ours to write."""
    leaked, left = {}, {}
    for name, then in saved.items():
        if plain(now.get(name)) == plain(then):
            continue
        if name in foreign and plain(foreign[name][0]) == plain(then):
            left[name] = foreign[name][1:]
        else:
            leaked[name] = (then, now.get(name))
    return leaked, left


_session_knobs: dict[str, str] = {}


def pytest_sessionstart(session):
    # under the lock: another pytest process's test may have knobs changed right now
    with experiment_lock():
        _session_knobs.update(session_baseline(_writable_knobs(), foreign_experiments()))


def pytest_sessionfinish(session, exitstatus):
    if not _session_knobs:
        return
    with experiment_lock():     # compare and restore only while no other KSM test runs
        foreign = foreign_experiments()
        leaked, left = judge(_session_knobs, _writable_knobs(), foreign)
        if leaked:  # every knob, in the one write order (advisor_mode resets pages_to_scan)
            raw_restore({k: v for k, v in _session_knobs.items() if k not in foreign})
    report = session.config.pluginmanager.get_plugin("terminalreporter")
    if left:
        report.write_line("KSM/THP knobs changed outside the experiment lock by a live process "
                          "(left to it, it restores them): " + ", ".join(
                              f"{k} by PID {pid} ({cmd})" for k, (pid, cmd) in left.items()),
                          yellow=True)
    if leaked:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in leaked.items())
        busy = [k for k in leaked if k in foreign]
        report.write_line(
            f"KSM/THP KNOB LEAK: the test run changed {lines}; restored them"
            + (f" except {', '.join(busy)} (a live process is changing them now)" if busy else ""),
            red=True)
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _ksm_marker(request):
    """Tests marked ``ksm`` get the skip check and the machine-wide lock."""
    if request.node.get_closest_marker("ksm") is None:
        yield
        return
    reason = ksm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with experiment_lock():
        yield


@contextlib.contextmanager
def _estimate_spawner():
    made = []
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "estimate_targets.py")

    def spawn(spec):
        p = subprocess.Popen([sys.executable, script, json.dumps(spec)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        made.append(p)
        return p, json.loads(p.stdout.readline())
    try:
        yield spawn
    finally:
        for p in made:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def sigint_default():
    """Ctrl-C raises KeyboardInterrupt in this test, whatever pytest inherited: a shell starts
    background jobs with SIGINT ignored, and Python then leaves it ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.fixture
def estimate_children():
    """Start tests/estimate_targets.py children (memory of known content): ``spawn(spec)`` returns
    ``(Popen, info)``; every child is killed and reaped after the test."""
    with _estimate_spawner() as spawn:
        yield spawn


@pytest.fixture(scope="module")
def estimate_children_module():
    """:func:`estimate_children` for children shared by a whole test module."""
    with _estimate_spawner() as spawn:
        yield spawn
