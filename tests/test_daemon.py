"""The daemon as a process: READY over a fake NOTIFY_SOCKET, metrics scraped and parsed, SIGHUP
reload, SIGTERM restores the knobs, SIGKILL then restart restores them, startup refusals; and end
to end on the real kernel.

The lifecycle tests run the real ``udedup daemon`` in a subprocess against a fake KSM sysfs tree
(regular files), so they need neither root nor the KSM lock and touch no real knob. Regular files,
unlike sysfs, keep stale bytes after a shorter write: SysFs truncates as it writes (a no-op on
sysfs), so the fake tree reads back what was written.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from udedup.daemon.state import describe_daemon_state, read_daemon_state
from udedup.daemon.systemd import SdNotify

from fake_sysfs import MINIMAL_COUNTERS, MINIMAL_KNOBS, make_fake_ksm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "scripts", "bench_daemon_peers.py")

RUNNER = """
import sys
from udedup import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _drop_dac_override():
    # out of the bounding set, so gone from root's capabilities after exec: files of other users
    # are then only as writable as their mode says
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):       # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:     # PR_CAPBSET_DROP
            os._exit(99)


def fake_sysfs(root, **knobs):
    return make_fake_ksm(root, {**MINIMAL_KNOBS, "run": "1"}, MINIMAL_COUNTERS, **knobs)


def knob(root, name) -> str:
    return (root / name).read_text().strip()


class Notify:
    """The systemd end of NOTIFY_SOCKET: a thread collects every datagram as it arrives."""

    def __init__(self, path):
        import threading
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self._seen = 0
        self._closed = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self):
        while not self._closed:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def wait_for(self, line: str, timeout: float = 15.0) -> str:
        """The first message after the previous match that has ``line``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(self._seen, len(self.messages)):
                if line in self.messages[i].splitlines():
                    self._seen = i + 1
                    return self.messages[i]
            time.sleep(0.02)
        raise AssertionError(f"no {line!r} from the daemon within {timeout}s; got {self.messages[-5:]}")

    def close(self):
        self._closed = True
        self._thread.join()
        self.sock.close()


class Daemon:
    def __init__(self, tmp_path, config_text: str, name="d", notify=True, extra_args=(),
                 drop_caps=False):
        self.tmp = tmp_path
        self.config = tmp_path / f"{name}.toml"
        self.config.write_text(config_text)
        self.notify = Notify(tmp_path / f"{name}.notify") if notify else None
        self.stderr_path = tmp_path / f"{name}.stderr"
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop("UDEDUP_CONFIG", None)
        if self.notify:
            env.update(NOTIFY_SOCKET=self.notify.path, WATCHDOG_USEC="300000")
        preexec = _drop_dac_override if drop_caps else None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, "daemon", "--config", str(self.config), "-v", *extra_args],
            stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "w"), env=env, cwd=REPO,
            preexec_fn=preexec)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit; stderr:\n{self.stderr}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.notify:
            self.notify.close()


def config(tmp_path, sysfs, **sections) -> str:
    base = {
        "candidates": {"include_registered": False},      # no process on this host is ours
        "ksmd": {"use_zero_pages": "on", "cpu_budget_percent": 20.0},
        "metrics": {"address": "127.0.0.1:0"},
        "daemon": {"interval": 0.1, "state_file": str(tmp_path / "run" / "state.json"),
                   "ksm_root": str(sysfs)},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    lines = []
    for section, values in base.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def sysfs(tmp_path):
    return fake_sysfs(tmp_path / "ksm")


def test_lifecycle_ready_metrics_reload_external_change_and_sigterm(tmp_path, sysfs):
    d = Daemon(tmp_path, config(tmp_path, sysfs))
    try:
        ready = d.notify.wait_for("READY=1")
        assert any(line.startswith("STATUS=stopped: saved 0.00 GiB") for line in ready.splitlines())
        # nothing is worth merging on this host: ksmd stopped, use_zero_pages as configured
        assert knob(sysfs, "run") == "0" and knob(sysfs, "use_zero_pages") == "1"
        state = read_daemon_state(str(tmp_path / "run" / "state.json"))
        assert state["running"] and state["pid"] == d.proc.pid and state["mode"] == "stopped"
        assert state["original_knobs"]["run"] == 1 and state["original_knobs"]["use_zero_pages"] is False
        assert state["written_knobs"]["run"] == 0
        text = "\n".join(describe_daemon_state(state))     # what `udedup status` shows
        assert f"udedup daemon: pid {d.proc.pid}, stopped: nothing worth merging" in text
        assert "knobs it changed: " in text and "run=0" in text and state["metrics_url"] in text

        m = scrape(state["metrics_url"])
        assert m[("udedup_up", ())] == 1.0
        assert m[("udedup_mode", (("mode", "stopped"),))] == 1.0
        assert m[("udedup_mode", (("mode", "fast"),))] == 0.0
        assert m[("udedup_ksm_knob", (("knob", "run"),))] == 0.0
        assert m[("udedup_cpu_budget_percent", ())] == 20.0
        assert m[("udedup_saved_bytes", ())] == 0.0
        assert m[("udedup_knob_writes_total", ())] == 2.0
        assert ("udedup_ksmd_cpu_seconds_total", ()) in m
        d.notify.wait_for("WATCHDOG=1", timeout=2)

        # SIGHUP: the new budget is in force, systemd hears RELOADING then READY
        d.config.write_text(d.config.read_text().replace("cpu_budget_percent = 20.0",
                                                         "cpu_budget_percent = 7.5"))
        d.signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING=1")
        d.notify.wait_for("READY=1")
        assert scrape(state["metrics_url"])[("udedup_cpu_budget_percent", ())] == 7.5

        # someone else starts ksmd: reported, not fought, and theirs to keep at exit
        (sysfs / "run").write_text("1\n")
        wait_until(lambda: "run was changed by someone else" in d.stderr, what="the report")
        time.sleep(0.3)
        assert knob(sysfs, "run") == "1"
        assert scrape(state["metrics_url"])[("udedup_external_knob_changes_total", ())] == 1.0

        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        d.notify.wait_for("STOPPING=1")
    finally:
        d.stop()
    err = d.stderr
    assert "configuration reloaded" in err and "received SIGTERM" in err
    assert "restored use_zero_pages=False" in err
    assert knob(sysfs, "use_zero_pages") == "0" and knob(sysfs, "run") == "1"
    assert not (tmp_path / "run" / "state.json").exists()
    assert "Traceback" not in err


def test_sigkill_then_restart_restores_the_knobs(tmp_path, sysfs):
    text = config(tmp_path, sysfs, metrics={"address": ""})
    state_file = tmp_path / "run" / "state.json"
    first = Daemon(tmp_path, text, name="first")
    try:
        first.notify.wait_for("READY=1")
        assert (knob(sysfs, "run"), knob(sysfs, "use_zero_pages")) == ("0", "1")
        first.signal(signal.SIGKILL)
        first.wait()
    finally:
        first.stop()
    assert (knob(sysfs, "run"), knob(sysfs, "use_zero_pages")) == ("0", "1")   # nobody restored
    stale = read_daemon_state(str(state_file))
    assert stale is not None and not stale["running"] and stale["written_knobs"]["run"] == 0
    assert "did not exit cleanly: the next start restores" in describe_daemon_state(stale)[0]

    second = Daemon(tmp_path, text, name="second")
    try:
        second.notify.wait_for("READY=1")
        # the originals it recorded are the restored ones, not what the killed daemon left
        state = read_daemon_state(str(state_file))
        assert state["running"] and state["original_knobs"]["run"] == 1
        assert state["original_knobs"]["use_zero_pages"] is False
        # a third instance on the same state file refuses to start
        third = subprocess.run([sys.executable, "-m", "udedup", "daemon", "--config", str(second.config),
                                "--once"], capture_output=True, text=True, cwd=REPO, timeout=30,
                               env=dict(os.environ, PYTHONPATH=REPO))
        assert third.returncode == 12
        assert third.stderr.startswith("udedup: error: another udedup daemon is running (pid "
                                       f"{second.proc.pid}")
        assert third.stderr.count("\n") == 1
        second.signal(signal.SIGTERM)
        assert second.wait() == 0
    finally:
        second.stop()
    assert "did not exit cleanly" in second.stderr
    assert "WARNING: restored use_zero_pages=False, run=1" in second.stderr      # at start
    assert "INFO: restored use_zero_pages=False, run=1" in second.stderr         # at SIGTERM
    assert (knob(sysfs, "run"), knob(sysfs, "use_zero_pages")) == ("1", "0")
    assert not state_file.exists()


def test_dry_run_once_changes_nothing(tmp_path, sysfs):
    d = Daemon(tmp_path, config(tmp_path, sysfs, metrics={"address": ""}), extra_args=["--dry-run", "--once"])
    try:
        assert d.wait() == 0
        d.notify.wait_for("READY=1")
    finally:
        d.stop()
    assert (knob(sysfs, "run"), knob(sysfs, "use_zero_pages")) == ("1", "0")
    assert "dry run: would set: run=0, use_zero_pages=True" in d.stderr
    assert not (tmp_path / "run").exists()


def test_self_test_fails_without_write_permission(tmp_path, sysfs):
    """Knob files owned by someone else, and no CAP_DAC_OVERRIDE: EACCES, exit 4 before the loop."""
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the fake knobs to another user")
    for name in ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages"):
        os.chown(sysfs / name, 65534, 65534)
    d = Daemon(tmp_path, config(tmp_path, sysfs, metrics={"address": ""}), notify=False,
               drop_caps=True)
    try:
        assert d.wait() == 4
    finally:
        d.stop()
    err = d.stderr
    assert "udedup: error: startup self-test: cannot write sleep_millisecs" in err
    assert "ReadWritePaths" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "state.json").exists()
    assert (knob(sysfs, "run"), knob(sysfs, "use_zero_pages")) == ("1", "0")


def test_sd_notify_abstract_socket_and_watchdog_env():
    n = SdNotify({"NOTIFY_SOCKET": "@udedup-test", "WATCHDOG_USEC": "2000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.address == "\0udedup-test" and n.watchdog_seconds == 2.0
    assert SdNotify({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert SdNotify({}).send("READY=1") is False


# --- end to end on the real kernel ------------------------------------------------------------------
def _bench_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_daemon_peers", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mg_bytes(pid, buffer=None) -> int:
    """Registered anonymous bytes of ``pid``; with ``buffer`` = (address, size), only inside the
    workload's buffer (the interpreter's heap holds zero pages and duplicates of its own, which the
    daemon may rightly register)."""
    from udedup.host.maps import read_mappings
    lo = hi = None
    if buffer is not None:
        lo, hi = buffer[0], buffer[0] + buffer[1]
    return sum(m.anonymous for m in read_mappings(pid) if m.registered
               and (lo is None or (m.start >= lo and m.end <= hi)))


def _injection_available() -> bool:
    try:
        import udedup.inject  # noqa: F401
    except Exception:  # noqa: BLE001 - not built here: the variant is skipped, with the reason
        return False
    return True


@pytest.mark.ksm
@pytest.mark.slow
@pytest.mark.parametrize("registered_by", ["injection", "udedup run"])
def test_end_to_end_registers_the_duplicate_rich_workload_only(tmp_path, registered_by):
    if registered_by == "injection" and not _injection_available():
        pytest.skip("udedup.inject is not available in this build")
    from udedup.ksm import Ksm
    bench = _bench_module()
    mib = 1 << 20
    dup = bench.Child("udd-dup", 48 * mib, dup=0.9, templates=64,
                      register="none" if registered_by == "injection" else "prctl")
    uniq = bench.Child("udd-uniq", 48 * mib, private_seed=5)
    ksm = Ksm()
    try:
        dup.wait_ready()
        uniq.wait_ready()
        with ksm.settings(run=0, pages_to_scan=100, sleep_millisecs=20, smart_scan=0,
                          use_zero_pages=0):
            before = ksm.snapshot()
            text = config(tmp_path, ksm.root,
                          candidates={"names": ["udd-*"], "min_anon_rss": "8 MiB"},
                          registration={"allow_injection": registered_by == "injection",
                                        "min_saving": "8 MiB"},
                          ksmd={"use_zero_pages": "keep", "fast_scan_seconds": 0.5},
                          daemon={"interval": 0.5})
            d = Daemon(tmp_path, text, name="e2e")
            try:
                d.notify.wait_for("READY=1", timeout=30)
                templates, copies = 64, int(48 * mib // bench.PAGE * 0.9)
                expected_sharing = copies - templates
                wait_until(lambda: ksm.stats().pages_sharing >= 0.9 * expected_sharing, timeout=30,
                           what=f"{expected_sharing} pages_sharing (daemon log:\n{d.stderr})")
                assert _mg_bytes(dup.pid) > 40 * mib
                if registered_by == "injection":
                    # registration.granularity "ranges": the unique tenth of the buffer stays out
                    assert _mg_bytes(dup.pid, (dup.info["address"], 48 * mib)) < 46 * mib
                assert _mg_bytes(uniq.pid) == 0           # left alone: never registered
                state = read_daemon_state(str(tmp_path / "run" / "state.json"))
                by_name = {p["name"]: p for p in state["processes"]}
                assert by_name["udd-dup"]["worthwhile"] and not by_name["udd-uniq"]["worthwhile"]
                assert by_name["udd-dup"]["predicted_saved_bytes"] > 0.9 * expected_sharing * bench.PAGE - 4 * mib
                m = scrape(state["metrics_url"])
                dup_labels = (("name", "udd-dup"), ("pid", str(dup.pid)))
                uniq_labels = (("name", "udd-uniq"), ("pid", str(uniq.pid)))
                assert m[("udedup_process_predicted_saved_bytes", dup_labels)] > 30 * mib
                assert m[("udedup_process_registered", dup_labels)] == 1.0
                assert m[("udedup_process_registered", uniq_labels)] == 0.0
                assert m[("udedup_process_worthwhile", uniq_labels)] == 0.0
                # the metrics are those of the last round: they catch up within a round or two
                wait_until(lambda: scrape(state["metrics_url"])[("udedup_ksm_pages_sharing", ())]
                           >= 0.9 * expected_sharing, timeout=5, what="pages_sharing in the metrics")
                assert m[("udedup_estimate_bytes_total", ())] > 0
                d.signal(signal.SIGTERM)
                assert d.wait() == 0
            finally:
                d.stop()
            assert ksm.knobs() == before.as_dict()            # the daemon put back what it changed
            err = d.stderr
            assert "udd-uniq: predicted saving" in err and "below registration.min_saving" in err
            if registered_by == "injection":
                assert "udd-dup: predicted saving" in err
                assert re.search(r"opting \d+ ranges? holding the predicted saving", err)
                assert "in by injection (madvise)" in err
            else:
                assert "already registered (merge-any (prctl))" in err
            assert "fast: " in err and "Traceback" not in err
            ksm.unmerge_all()
    finally:
        dup.stop()
        uniq.stop()


@pytest.mark.ksm
@pytest.mark.slow
def test_bench_script_runs_at_a_tiny_size(tmp_path):
    """scripts/bench_daemon_peers.py end to end (reference and udedup only, 16 MiB processes): it
    reports, and leaves every knob as it found it."""
    from udedup.ksm import Ksm
    ksm = Ksm()
    before = ksm.knobs()
    out = tmp_path / "report.txt"
    r = subprocess.run([sys.executable, BENCH, "--scale", "0.02", "--window", "3", "--interval", "1",
                        "--reference-timeout", "20", "--peers", "udedup", "--no-lock", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "achievable saving (reference, settled)" in text
    rows = {line.split()[0] for line in text.splitlines() if line[:10].strip() in ("reference", "udedup")}
    assert rows == {"reference", "udedup"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["achievable_pages"] > 0 and data["series"]["udedup"]
    assert ksm.knobs() == before


@pytest.mark.ksm
@pytest.mark.slow
def test_ksmd_rate_script_runs_at_a_tiny_size(tmp_path):
    """scripts/bench_ksmd_rate.py: each case reaches 95 % of the saving, knobs come back."""
    from udedup.ksm import Ksm
    ksm = Ksm()
    before = ksm.knobs()
    out = tmp_path / "rate.txt"
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_ksmd_rate.py"),
                        "--size", "16", "--cases", "whole:10000:0,ranges:2000:20", "--no-lock",
                        "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in out.read_text().splitlines()
            if line.startswith(("whole ", "ranges "))]
    assert [(row[0], row[1], row[2]) for row in rows] == [("whole", "10000", "0"),
                                                          ("ranges", "2000", "20")]
    assert all(row[3] != "-" and float(row[4].rstrip("s")) > 0 for row in rows)
    assert ksm.knobs() == before


def test_metrics_address_in_use_is_a_config_error():
    from udedup.errors import ConfigError
    from udedup.daemon.metrics import DaemonCollector, MetricsServer
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(ConfigError, match="cannot listen") as info:
            MetricsServer(f"127.0.0.1:{taken.getsockname()[1]}", DaemonCollector(lambda: None))
        assert info.value.exit_code == 10
    finally:
        taken.close()
    m = MetricsServer("127.0.0.1:0", DaemonCollector(lambda: None))
    try:
        families = scrape(m.url)
        assert families[("udedup_up", ())] == 0.0        # no round published yet
    finally:
        m.close()


def test_status_reads_the_state_file_it_is_given(tmp_path, sysfs, capsys):
    """``udedup status --state-file``: a daemon run with another daemon.state_file is found."""
    from udedup import cli
    from udedup.daemon.observe import process_start_time
    path = tmp_path / "elsewhere.json"
    path.write_text(json.dumps({
        "version": 1, "pid": os.getpid(), "pid_start_time": process_start_time(os.getpid()),
        "mode": "slow", "mode_reason": "saving realized", "written_knobs": {"run": 1},
        "original_knobs": {"run": 0}, "processes": [], "saved_bytes": 0}))
    argv = ["status", "--sysfs", str(sysfs), "--top", "0", "--interval", "0", "--state-file", str(path)]
    assert cli.main([*argv, "--json"]) == 0
    daemon = json.loads(capsys.readouterr().out)["daemon"]
    assert daemon["running"] is True and daemon["pid"] == os.getpid() and daemon["mode"] == "slow"
    assert cli.main(argv) == 0
    assert f"udedup daemon: pid {os.getpid()}, slow: saving realized" in capsys.readouterr().out
    assert cli.main(["status", "--sysfs", str(sysfs), "--top", "0", "--interval", "0",
                     "--state-file", str(tmp_path / "none.json")]) == 0
    assert "udedup daemon: not running (no state file)" in capsys.readouterr().out
