"""THP knobs as knobs (``thp.enabled``, ``thp.khugepaged/defrag``) and the recovery journal: on fake
sysfs trees (discovery, validation, spelling, order, restore, errno, ``udedup set``, journal replay)
and, marked ``ksm``, on the real kernel (settings() restores THP knobs; a SIGKILLed child's knobs
come back from its journal). Every real test puts the THP knobs it touches back even on failure."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from udedup import cli
from udedup.errors import KsmPermissionError, KsmUnavailableError, KsmValueError
from udedup.host.fs import ProcFs
from udedup.ksm import Ksm, journal
from udedup.ksm.knobs import write_order

from conftest import raw_restore, thp_knobs
from fake_sysfs import StoreSysFs, make_fake_ksm, make_fake_thp, read_thp, read_tree


class FakeKernel(StoreSysFs):
    """mm/ksm.c and mm/huge_memory.c's store functions, enough for order and errno: a choice file
    takes one of its words and shows it bracketed, a flag takes 0/1, max_ptes_* at most 511."""

    def __init__(self, tmp):
        super().__init__(self._store, str(tmp))
        self.tmp = tmp
        self.writes: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}

    def _store(self, path, text):
        rel = os.path.relpath(path, self.tmp)
        name = ("thp." + rel.split("/", 1)[1]) if rel.startswith("transparent_hugepage/") \
            else os.path.basename(path)
        self.writes.append((name, text))
        if name in self.fail:
            code = self.fail.pop(name)
            raise OSError(code, os.strerror(code))
        with open(path) as f:
            now = f.read().strip()
        if "[" in now:
            words = [w.strip("[]") for w in now.split()]
            if text not in words:
                raise OSError(errno.EINVAL, "Invalid argument")
            text = " ".join(f"[{w}]" if w == text else w for w in words)
        elif "max_ptes" in name and int(text) > 511:
            raise OSError(errno.EINVAL, "Invalid argument")
        with open(path, "w") as f:
            f.write(text + "\n")


@pytest.fixture
def trees(tmp_path):
    make_fake_ksm(tmp_path / "ksm")
    make_fake_thp(tmp_path / "transparent_hugepage")
    return tmp_path


@pytest.fixture
def kernel(trees):
    return FakeKernel(trees)


def fake_ksm(trees, kernel=None, **kw):
    return Ksm(trees / "ksm", sysfs=kernel, **kw)


# --- discovery, typing, validation ---------------------------------------------------------------
def test_thp_knobs_are_discovered_beside_ksm(trees):
    ksm = fake_ksm(trees)
    names = ksm.knob_names()
    assert names[:len(names) - 14] == sorted(n for n in names if not n.startswith("thp."))
    thp = [n for n in names if n.startswith("thp.")]
    assert thp == sorted(thp) and len(thp) == 14
    assert {"thp.enabled", "thp.khugepaged/defrag", "thp.hugepages-2048kB/enabled"} <= set(thp)
    assert not {"thp.hpage_pmd_size", "thp.khugepaged/full_scans"} & set(thp)   # read-only
    assert not any("stats" in n for n in thp)
    snap = ksm.snapshot()
    assert snap["thp.enabled"] == "madvise" and snap["thp.khugepaged/defrag"] is True
    assert snap["thp.hugepages-2048kB/enabled"] == "inherit"
    assert snap["thp.khugepaged/max_ptes_none"] == 511
    assert ksm.get("thp.khugepaged/full_scans") == 3
    assert ksm.spec("thp.enabled").choices == ("always", "madvise", "never")
    assert ksm.spec("thp.khugepaged/max_ptes_swap").maximum == 511      # HPAGE_PMD_NR - 1


def test_no_thp_directory_means_no_thp_knob(tmp_path):
    ksm = Ksm(make_fake_ksm(tmp_path / "ksm"))
    assert not [n for n in ksm.knob_names() if n.startswith("thp.")]
    with pytest.raises(KsmUnavailableError, match="no transparent huge pages") as err:
        ksm.validate({"thp.enabled": "never"})
    assert err.value.exit_code == 3


def test_an_explicit_thp_root(tmp_path):
    make_fake_thp(tmp_path / "elsewhere")
    ksm = Ksm(make_fake_ksm(tmp_path / "ksm"), thp_root=tmp_path / "elsewhere")
    assert ksm.get("thp.enabled") == "madvise"


def test_both_spellings_name_one_file(trees):
    ksm = fake_ksm(trees)
    assert ksm.path("thp.khugepaged.defrag") == ksm.path("thp.khugepaged/defrag") == str(
        trees / "transparent_hugepage" / "khugepaged" / "defrag")
    assert ksm.validate({"thp.khugepaged.defrag": "0"}) == {"thp.khugepaged.defrag": False}
    with pytest.raises(KsmValueError, match="name the same knob"):
        ksm.validate({"thp.khugepaged.defrag": 0, "thp.khugepaged/defrag": 1})


@pytest.mark.parametrize("knobs, message", [
    ({"thp.enabled": "sometimes"}, "expected one of always, madvise, never"),
    ({"thp.defrag": "whenever"}, r"expected one of always, defer, defer\+madvise, madvise, never"),
    ({"thp.hugepages-2048kB/enabled": "on"}, "always, inherit, madvise, never"),
    ({"thp.use_zero_page": "2"}, "expected a boolean"),
    ({"thp.khugepaged/max_ptes_none": 512}, r"out of range \(0\.\.511\)"),
    ({"thp.khugepaged/pages_to_scan": 0}, r"out of range \(1\.\."),
    ({"thp.khugepaged/scan_sleep_millisecs": "-1"}, "out of range"),
    ({"thp.enable": "never"}, "unknown THP knob 'thp.enable' .did you mean thp.enabled"),
    ({"thp.hpage_pmd_size": 1}, "read-only, not a knob"),
    ({"thp.khugepaged/full_scans": 1}, "read-only"),
])
def test_bad_thp_values_are_refused_before_anything_is_written(trees, kernel, knobs, message):
    ksm = fake_ksm(trees, kernel)
    before = read_thp(trees / "transparent_hugepage")
    with pytest.raises(KsmValueError, match=message) as err:
        ksm.apply({"use_zero_pages": 1, **knobs})
    assert err.value.exit_code == 6
    assert kernel.writes == [] and read_thp(trees / "transparent_hugepage") == before


def test_the_unknown_knob_message_folds_per_size_files(trees):
    with pytest.raises(KsmValueError) as err:
        fake_ksm(trees).validate({"thp.nonsense": 1})
    text = str(err.value)
    assert "thp.khugepaged/defrag" in text and "thp.hugepages-<size>kB/{enabled} for 2 sizes" in text
    with pytest.raises(KsmValueError, match=r"\(and thp\.\* for THP\)"):
        fake_ksm(trees).validate({"nonsense": 1})


# --- order, restore, errors ------------------------------------------------------------------
def test_write_order_puts_thp_after_ksm_and_before_run():
    order = write_order(["run", "thp.enabled", "use_zero_pages", "thp.khugepaged/defrag",
                         "max_page_sharing", "advisor_mode"])
    assert order == ["max_page_sharing", "advisor_mode", "use_zero_pages", "thp.enabled",
                     "thp.khugepaged/defrag", "run"]


def test_settings_writes_thp_knobs_in_order_and_restores_them(trees, kernel):
    ksm = fake_ksm(trees, kernel)
    thp_before = read_thp(trees / "transparent_hugepage")
    ksm_before = read_tree(trees / "ksm")
    knobs = {"run": 1, "use_zero_pages": 1, "thp.enabled": "never", "thp.khugepaged.defrag": 0,
             "thp.hugepages-2048kB/enabled": "never", "thp.khugepaged/max_ptes_none": 0}
    with ksm.settings(**knobs):
        assert [n for n, _ in kernel.writes] == ["use_zero_pages", "thp.enabled",
                                                 "thp.hugepages-2048kB/enabled",
                                                 "thp.khugepaged/defrag",
                                                 "thp.khugepaged/max_ptes_none", "run"]
        assert ksm.get("thp.enabled") == "never" and ksm.get("thp.khugepaged/defrag") is False
        assert (trees / "transparent_hugepage/enabled").read_text() == "always madvise [never]\n"
    assert read_thp(trees / "transparent_hugepage") == thp_before
    assert read_tree(trees / "ksm") == ksm_before
    assert kernel.writes[-1][0] == "run"              # the restore writes run last too


def test_changed_since_sees_thp_knobs(trees, kernel):
    ksm = fake_ksm(trees, kernel)
    snap = ksm.snapshot()
    (trees / "transparent_hugepage/enabled").write_text("[always] madvise never\n")
    assert ksm.changed_since(snap) == {"thp.enabled": ("madvise", "always")}
    ksm.restore(snap)
    assert ksm.get("thp.enabled") == "madvise"


def test_a_kernel_refusal_rolls_back_the_thp_knobs_written(trees, kernel):
    ksm = fake_ksm(trees, kernel)
    kernel.fail["thp.khugepaged/defrag"] = errno.EINVAL
    with pytest.raises(KsmValueError, match="the kernel rejected thp.khugepaged/defrag"):
        ksm.apply({"thp.enabled": "never", "thp.khugepaged/defrag": 0})
    assert ksm.get("thp.enabled") == "madvise"


def test_not_root_says_thp_knobs_need_root(trees, kernel):
    kernel.fail["thp.enabled"] = errno.EACCES
    with pytest.raises(KsmPermissionError, match="writing THP knobs needs root") as err:
        fake_ksm(trees, kernel).apply({"thp.enabled": "never"})
    assert err.value.exit_code == 4


# --- udedup set ----------------------------------------------------------------------------------
def test_udedup_set_thp_knobs(trees, capsys):
    # plain files: a choice file would not bracket what is written, so flags and numbers here
    code = cli.main(["set", "--sysfs", str(trees / "ksm"), "thp.khugepaged.defrag=0",
                     "thp.khugepaged/max_ptes_none=64", "use_zero_pages=1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "thp.khugepaged/defrag: True -> False" in out
    assert "thp.khugepaged/max_ptes_none: 511 -> 64" in out and "use_zero_pages" in out
    assert (trees / "transparent_hugepage/khugepaged/defrag").read_text().strip() == "0"


@pytest.mark.parametrize("args, code, message", [
    (["thp.enabled=bogus"], 6, "expected one of always, madvise, never"),
    (["thp.enable=never"], 6, "unknown THP knob"),
    (["thp.khugepaged/max_ptes_none=9999"], 6, "out of range"),
])
def test_udedup_set_refuses_bad_thp_knobs(trees, capsys, args, code, message):
    assert cli.main(["set", "--sysfs", str(trees / "ksm"), *args]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_udedup_set_without_the_right_to_write_exits_4(trees):
    """Root without CAP_DAC_OVERRIDE on files it does not own: what a normal user meets."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (util-linux) to drop the override capability")
    knob = trees / "transparent_hugepage" / "enabled"
    os.chown(knob, 65534, 65534)
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--",
         sys.executable, "-m", "udedup", "set", "--sysfs", str(trees / "ksm"), "thp.enabled=never"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert "cannot write thp.enabled=never" in proc.stderr
    assert "writing THP knobs needs root" in proc.stderr and "Traceback" not in proc.stderr


# --- the recovery journal, on fake trees -----------------------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def write_journal(directory, trees, pid, knobs, created, start_time=12345, boot=None):
    os.makedirs(directory, exist_ok=True)
    doc = {"version": 1, "pid": pid, "start_time": start_time,
           "boot_id": boot or journal.boot_id(ProcFs()), "created": created,
           "command": "udedup ab --arm ...", "ksm_root": str(trees / "ksm"),
           "thp_root": str(trees / "transparent_hugepage"), "knobs": knobs}
    path = os.path.join(directory, f"knobs-journal-{pid}-1.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def test_settings_journals_the_originals_and_removes_the_journal(trees, kernel, tmp_path):
    jdir = tmp_path / "journal"
    ksm = fake_ksm(trees, kernel, journal_dir=jdir)
    with ksm.settings(use_zero_pages=1, **{"thp.enabled": "never"}):
        files = os.listdir(jdir)
        assert len(files) == 1 and files[0].startswith(f"knobs-journal-{os.getpid()}-")
        doc = json.loads((jdir / files[0]).read_text())
        assert doc["knobs"] == {"use_zero_pages": False, "thp.enabled": "madvise", "run": 0}
        assert doc["pid"] == os.getpid() and doc["ksm_root"] == str(trees / "ksm")
        ksm.set("thp.khugepaged/defrag", 0)     # a write inside the block is journaled too
        doc = json.loads((jdir / files[0]).read_text())
        assert doc["knobs"]["thp.khugepaged/defrag"] is True
    assert os.listdir(jdir) == []
    ksm.apply({"thp.enabled": "never"})           # apply journals only while it writes
    assert os.listdir(jdir) == []


def test_a_failed_restore_keeps_the_journal(trees, kernel, tmp_path):
    jdir = tmp_path / "journal"
    ksm = fake_ksm(trees, kernel, journal_dir=jdir)
    with pytest.raises(KsmValueError):
        with ksm.settings(**{"thp.enabled": "never"}):
            kernel.fail["thp.enabled"] = errno.EINVAL
    assert len(os.listdir(jdir)) == 1


def test_journals_of_dead_processes_are_replayed_oldest_value_last(trees, tmp_path, caplog):
    jdir = str(tmp_path / "journal")
    (trees / "transparent_hugepage/enabled").write_text("always madvise [never]\n")
    (trees / "ksm/use_zero_pages").write_text("1\n")
    # an older run changed enabled madvise -> always and died; a newer one changed always -> never
    write_journal(jdir, trees, dead_pid(), {"thp.enabled": "madvise", "use_zero_pages": False},
                  created=1.0)
    newer = dead_pid()
    write_journal(jdir, trees, newer, {"thp.enabled": "always"}, created=2.0)
    ksm = fake_ksm(trees, FakeKernel(trees), journal_dir=jdir)
    with caplog.at_level(logging.WARNING, logger="udedup.ksm.journal"):
        snap = ksm.snapshot()
    assert snap["thp.enabled"] == "madvise" and snap["use_zero_pages"] is False
    assert os.listdir(jdir) == []
    text = caplog.text
    assert f"restored knobs left changed by PID {newer} (udedup ab --arm ...)" in text
    assert "thp.enabled 'never' -> 'always'" in text and "use_zero_pages True -> False" in text


def test_no_replay_while_a_live_process_journals(trees, tmp_path, caplog):
    jdir = str(tmp_path / "journal")
    (trees / "transparent_hugepage/enabled").write_text("always madvise [never]\n")
    write_journal(jdir, trees, dead_pid(), {"thp.enabled": "madvise"}, created=1.0)
    me = ProcFs().stat(os.getpid()).start_time
    write_journal(jdir, trees, os.getpid(), {"run": 0}, created=2.0, start_time=me)
    with caplog.at_level(logging.WARNING):
        assert fake_ksm(trees, journal_dir=jdir).recover() == []
    assert "not replayed yet" in caplog.text and len(os.listdir(jdir)) == 2
    assert (trees / "transparent_hugepage/enabled").read_text() == "always madvise [never]\n"


def test_journals_of_an_earlier_boot_or_other_roots_are_not_replayed(trees, tmp_path):
    jdir = str(tmp_path / "journal")
    (trees / "transparent_hugepage/enabled").write_text("always madvise [never]\n")
    write_journal(jdir, trees, dead_pid(), {"thp.enabled": "madvise"}, created=1.0,
                  boot="00000000-0000-0000-0000-000000000000")
    other = write_journal(str(tmp_path / "j2"), trees, dead_pid(), {"thp.enabled": "madvise"}, 1.0)
    doc = json.loads(open(other).read())
    doc["ksm_root"] = "/elsewhere/ksm"
    os.rename(other, os.path.join(jdir, "knobs-journal-1-1.json"))
    with open(os.path.join(jdir, "knobs-journal-1-1.json"), "w") as f:
        json.dump(doc, f)
    assert fake_ksm(trees, journal_dir=jdir).recover() == []
    assert os.listdir(jdir) == ["knobs-journal-1-1.json"]     # the earlier boot's is gone
    assert (trees / "transparent_hugepage/enabled").read_text() == "always madvise [never]\n"


def test_fake_roots_have_no_journal_unless_asked(trees):
    assert fake_ksm(trees).journal is None


# --- the real kernel -------------------------------------------------------------------------------
@pytest.fixture
def thp_restored():
    """Every THP knob as it was after the test, whatever the test did."""
    saved = thp_knobs()
    if not saved:
        pytest.skip("this kernel has no /sys/kernel/mm/transparent_hugepage")
    try:
        yield saved
    finally:
        if thp_knobs() != saved:
            raw_restore(saved)


def _other(value, choices):
    return next(c for c in choices if c != value)


@pytest.mark.ksm
def test_real_settings_change_and_restore_thp_knobs(thp_restored):
    ksm = Ksm()
    before = ksm.snapshot()
    enabled = _other(before["thp.enabled"], ("never", "madvise"))
    defrag = not before["thp.khugepaged/defrag"]
    with ksm.settings(run=0, **{"thp.enabled": enabled, "thp.khugepaged/defrag": defrag}):
        assert ksm.get("thp.enabled") == enabled
        assert ksm.get("thp.khugepaged/defrag") is defrag
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            assert f"[{enabled}]" in f.read()
    assert ksm.snapshot().as_dict() == before.as_dict()
    assert thp_knobs() == thp_restored


CHILD = """
import sys, time
from udedup.ksm import Ksm
ksm = Ksm()
with ksm.settings(run=0, use_zero_pages=int(sys.argv[1]),
                  **{"thp.enabled": sys.argv[2], "thp.khugepaged/defrag": int(sys.argv[3])}):
    print("changed", flush=True)
    time.sleep(600)
"""


def _kill_child_mid_settings(before):
    uzp = int(not before["use_zero_pages"])
    enabled = _other(before["thp.enabled"], ("never", "madvise"))
    defrag = int(not before["thp.khugepaged/defrag"])
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(uzp), enabled, str(defrag)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "changed"
        mine = [n for n in os.listdir(journal.DEFAULT_DIR) if f"-{child.pid}-" in n]
        assert len(mine) == 1
        doc = json.load(open(os.path.join(journal.DEFAULT_DIR, mine[0])))
        assert doc["knobs"]["thp.enabled"] == before["thp.enabled"]
        assert doc["knobs"]["use_zero_pages"] == before["use_zero_pages"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ksm = Ksm()
    assert ksm.get("thp.enabled") == enabled and ksm.get("use_zero_pages") == bool(uzp)
    return child.pid


@pytest.mark.ksm
def test_real_sigkill_mid_settings_is_restored_by_the_next_settings(thp_restored, caplog):
    before = Ksm().snapshot()
    pid = _kill_child_mid_settings(before)
    with caplog.at_level(logging.WARNING, logger="udedup.ksm.journal"):
        with Ksm().settings(run=before["run"]):
            pass
    assert Ksm().snapshot().as_dict() == before.as_dict()
    assert f"restored knobs left changed by PID {pid}" in caplog.text
    assert not [n for n in os.listdir(journal.DEFAULT_DIR) if f"-{pid}-" in n]


@pytest.mark.ksm
def test_real_sigkill_is_restored_by_the_next_udedup_command(thp_restored):
    before = Ksm().snapshot()
    pid = _kill_child_mid_settings(before)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "udedup", "set", f"run={int(before['run'])}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"restored knobs left changed by PID {pid}" in proc.stderr
    assert "thp.enabled" in proc.stderr and "use_zero_pages" in proc.stderr
    assert Ksm().snapshot().as_dict() == before.as_dict()
    assert time.monotonic() - t0 < 30


def test_ctrl_c_inside_settings_restores_thp_knobs_and_removes_the_journal(trees, kernel, tmp_path,
                                                                            sigint_default):
    jdir = tmp_path / "journal"
    ksm = fake_ksm(trees, kernel, journal_dir=jdir)
    before = read_thp(trees / "transparent_hugepage")
    with pytest.raises(KeyboardInterrupt):
        with ksm.settings(**{"thp.enabled": "never", "thp.khugepaged/defrag": 0}):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert read_thp(trees / "transparent_hugepage") == before and os.listdir(jdir) == []


@pytest.mark.ksm
def test_real_ab_with_thp_arms_and_a_thp_fixed_knob_restores_them(thp_restored):
    from udedup.ab.engine import run_ab
    from udedup.ab.synthetic import SyntheticSpec
    from udedup.ab.workloads import SyntheticWorkload

    ksm = Ksm()
    before = ksm.snapshot()
    spec = SyntheticSpec(size=4 << 20, zero=0.4, duplicate=0.3, unique=0.3, volatile=0.0,
                         group_sizes=(2, 8), seed=3, name="thp")
    defrag = _other(before["thp.defrag"], ("never", "madvise"))
    result = run_ab(SyntheticWorkload(spec), trials=1, seed=5, settle_timeout=30, cow_sample=64,
                    arms={"madvise": {"thp.enabled": "madvise"}, "never": {"thp.enabled": "never"}},
                    fixed={"advisor_mode": "none", "pages_to_scan": 5000, "sleep_millisecs": 5,
                           "smart_scan": 0, "thp.khugepaged.defrag": 0, "thp.defrag": defrag})
    assert [t.status for t in result.trials] == ["ok", "ok"]
    assert {t.arm: t.knobs["thp.enabled"] for t in result.trials} == {"madvise": "madvise",
                                                                       "never": "never"}
    assert all(t.knobs["thp.khugepaged.defrag"] is False for t in result.trials)
    assert ksm.snapshot().as_dict() == before.as_dict()
