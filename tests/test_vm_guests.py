"""The VM lab's guests started, made ready and stopped by :class:`udedup.ab.vms.VmWorkload`, with a
fake ``qemu`` (a shell script writing the serial console file): readiness, death before ready, a
timeout, a delay instead of the marker, and no orphan after the harness is SIGKILLed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from udedup.ab import vmlab
from udedup.ab.vms import VmRunning, VmSpec, VmWorkload
from udedup.errors import WorkloadError


FAKE_QEMU = """#!/bin/sh
# a stand-in for qemu: writes the console file named by -serial file:PATH as its mode says
serial=""; append=""
while [ $# -gt 0 ]; do
    case "$1" in -serial) serial=${2#file:}; shift ;; -append) append=$2; shift ;; esac
    shift
done
case "$FAKE_QEMU_MODE" in
  ready) sleep 0.2; echo "UDEDUP-VM-BOOT" > "$serial"; echo "UDEDUP-VM-READY $append" >> "$serial" ;;
  die) echo "booting" > "$serial"; echo "qemu: cannot allocate guest RAM" >&2; exit 1 ;;
  hang) echo "SeaBIOS" > "$serial" ;;
esac
exec sleep 300
"""


@pytest.fixture
def fake_lab(tmp_path, monkeypatch):
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU)
    qemu.chmod(0o755)
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")

    def make(mode, guests=2, ready_timeout=10.0, ready_delay=None):
        monkeypatch.setenv("FAKE_QEMU_MODE", mode)
        w = VmWorkload(VmSpec(guests=guests, accel="tcg", kernel=str(tmp_path / "k"),
                              initrd=str(tmp_path / "i")), ready_timeout=ready_timeout,
                       ready_delay=ready_delay)
        w.qemu, w.accel = str(qemu), "tcg"
        w.image = vmlab.ensure_image(0, kernel=str(tmp_path / "k"), initrd=str(tmp_path / "i"))
        return w
    return make


def _gone(pids, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids):
            return True
        time.sleep(0.05)
    return False


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_guests_become_ready_and_stop_leaves_nothing(fake_lab):
    run = fake_lab("ready", guests=3).start(seed=4)
    try:
        assert isinstance(run, VmRunning) and run.alive() and run.exit_description() is None
        assert len(run.info["ready"]) == 3 and all("udedup.seed=" in r for r in run.info["ready"])
        seeds = {r.split("udedup.seed=")[1].split()[0] for r in run.info["ready"]}
        assert len(seeds) == 3                       # every guest its own unique data
        pids = run.pids()
        assert len(pids) >= 3 and run.cow(16, 1) is None
    finally:
        run.stop()
    assert _gone(pids) and not run.alive()
    run.stop()                                        # idempotent


def test_a_guest_that_dies_before_ready(fake_lab):
    with pytest.raises(WorkloadError, match="exited with status 1.*cannot allocate|console ended"):
        fake_lab("die").start()


def test_a_guest_that_never_gets_ready(fake_lab):
    t0 = time.monotonic()
    with pytest.raises(WorkloadError, match=r"not ready after 1 s under tcg.*SeaBIOS"):
        fake_lab("hang", ready_timeout=1.0).start()
    assert time.monotonic() - t0 < 5


def test_ready_delay_instead_of_the_marker(fake_lab):
    run = fake_lab("hang", guests=1, ready_delay=0.3).start()
    try:
        assert run.alive()
    finally:
        run.stop()


def test_guests_die_with_the_harness(fake_lab, tmp_path):
    """SIGKILL of the process that started the guests: PR_SET_PDEATHSIG takes them down too."""
    script = tmp_path / "harness.py"
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(vmlab.__file__))))
    script.write_text(f"""
import sys
sys.path.insert(0, {package_parent!r})
from udedup.ab import vmlab, vmpackages
from udedup.ab.vms import VmSpec, VmWorkload
w = VmWorkload(VmSpec(guests=2, accel="tcg", kernel={str(tmp_path / 'k')!r}, initrd={str(tmp_path / 'i')!r}))
w.qemu, w.accel = {str(tmp_path / 'qemu-system-x86_64')!r}, "tcg"
w.image = vmlab.ensure_image(0, kernel={str(tmp_path / 'k')!r}, initrd={str(tmp_path / 'i')!r})
run = w.start()
print(" ".join(map(str, run.pids())), flush=True)
import time; time.sleep(60)
""")
    env = {**os.environ, "FAKE_QEMU_MODE": "ready"}
    harness = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(p) for p in harness.stdout.readline().split()]
        assert pids
        harness.send_signal(signal.SIGKILL)
        harness.wait()
        assert _gone(pids), f"orphans left: {pids}"
    finally:
        if harness.poll() is None:
            harness.kill()
