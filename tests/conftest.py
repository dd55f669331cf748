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
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from udedup.host.parse import parse_choices
from udedup.ksm import experiment_lock
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


_session_knobs: dict[str, str] = {}


def pytest_sessionstart(session):
    # under the lock: another pytest process's test may have knobs changed right now
    with experiment_lock():
        _session_knobs.update(_writable_knobs())


def pytest_sessionfinish(session, exitstatus):
    if not _session_knobs:
        return
    with experiment_lock():
        now = _writable_knobs()
        leaked = {k: (v, now.get(k)) for k, v in _session_knobs.items() if now.get(k) != v}
        if leaked:
            raw_restore(_session_knobs)
    if leaked:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in leaked.items())
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"KSM/THP KNOB LEAK: the test run changed {lines}; restored them", red=True)
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
