"""udedup.ksm on a fake sysfs tree: discovery, typed parsing, validation, restore order, errno
mapping, rollback, the knob table. No root, no real KSM. Counters, settle and ksmd are in
test_ksm_counters.py, the lock in test_ksm_lock.py."""
from __future__ import annotations

import errno
import os
import signal

import pytest

from udedup.errors import (KsmBusyError, KsmError, KsmPermissionError, KsmUnavailableError,
                           KsmValueError)
from udedup.ksm import Ksm
from udedup.ksm.knobs import pages_to_scan_ignored, write_order

from fake_sysfs import COUNTERS_618, KNOBS_618, StoreSysFs, make_fake_ksm, read_tree

# what a 5.15 kernel has: no smart_scan, no advisor, no general_profit file
OLD_KNOBS = ("advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan",
             "advisor_max_pages_to_scan", "advisor_target_scan_time", "smart_scan")


class FakeKernel(StoreSysFs):
    """Stands in for mm/ksm.c's store functions, enough to check order and errno handling: the
    :class:`SysFs` a :class:`Ksm` writes through (``Ksm(tree, sysfs=kernel)``)."""

    def __init__(self, root):
        super().__init__(self._store, str(root.parent))
        self.root = root
        self.writes: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}      # knob -> errno to raise on write
        self.ignore: set[str] = set()       # knobs whose write "succeeds" but changes nothing
        self.on_write = None

    def _get(self, name):
        return (self.root / name).read_text().strip()

    def _put(self, name, value):
        (self.root / name).write_text(value + "\n")

    def _store(self, path, text):
        name = os.path.basename(path)
        self.writes.append((name, text))
        if self.on_write:
            self.on_write(name, text)
        if name in self.fail:                 # one-shot
            code = self.fail.pop(name)
            if name == "run" and text == "2":
                self._put("run", "0")         # what the kernel does when unmerging fails
            raise OSError(code, os.strerror(code))
        if name in self.ignore:
            return
        if name == "pages_to_scan" and "[scan-time]" in self._get("advisor_mode"):
            raise OSError(errno.EINVAL, "Invalid argument")
        if name in ("max_page_sharing", "merge_across_nodes"):
            if self._get(name) != text and int(self._get("pages_shared")):
                raise OSError(errno.EBUSY, "Device or resource busy")
        if name == "advisor_mode":
            self._put(name, "[none] scan-time" if text == "none" else "none [scan-time]")
            self._put("pages_to_scan", "100" if text == "none" else "500")
            return
        if name == "run" and text == "2":
            for counter in ("pages_shared", "pages_sharing", "ksm_zero_pages", "full_scans"):
                self._put(counter, "0")
        self._put(name, text)


@pytest.fixture
def tree(tmp_path):
    return make_fake_ksm(tmp_path / "ksm")


@pytest.fixture
def kernel(tree):
    return FakeKernel(tree)


# --- discovery and parsing ----------------------------------------------------------------------
def test_missing_directory_is_unavailable(tmp_path):
    with pytest.raises(KsmUnavailableError, match="no KSM"):
        Ksm(tmp_path / "nope")


def test_knobs_and_counters_are_told_apart_by_mode(tree):
    ksm = Ksm(tree)
    assert ksm.knob_names() == sorted(KNOBS_618)
    assert ksm.counter_names() == sorted(COUNTERS_618)


def test_old_kernel_has_fewer_knobs_and_says_which_version_added_them(tmp_path):
    knobs = {k: v for k, v in KNOBS_618.items() if k not in OLD_KNOBS}
    counters = {k: v for k, v in COUNTERS_618.items() if k != "general_profit"}
    ksm = Ksm(make_fake_ksm(tmp_path / "ksm", knobs, counters))
    assert "smart_scan" not in ksm.knob_names()
    with pytest.raises(KsmUnavailableError, match=r"smart_scan.*6\.7"):
        ksm.set("smart_scan", 0)
    assert "advisor_mode" not in ksm.knobs()


def test_unknown_knob_and_counter_are_value_errors(tree):
    ksm = Ksm(tree)
    with pytest.raises(KsmValueError, match="unknown KSM knob 'pages_to_sca'"):
        ksm.set("pages_to_sca", 1)
    with pytest.raises(KsmValueError, match="read-only counter"):
        ksm.set("pages_shared", 1)


def test_typed_get(tree):
    ksm = Ksm(tree)
    assert ksm.get("advisor_mode") == "none"
    assert ksm.get("use_zero_pages") is False
    assert ksm.get("smart_scan") is True
    assert ksm.get("pages_to_scan") == 100
    assert ksm.get("full_scans") == 0
    (tree / "advisor_mode").write_text("none [scan-time]\n")
    assert ksm.get("advisor_mode") == "scan-time"


@pytest.mark.parametrize("text,expected", [
    ("0", False), ("1", True), ("y", True), ("n", False), ("on", True), ("off", False),
    ("Y", True), ("OFF", False), (True, True), (0, False), (1, True)])
def test_boolean_spellings(tree, text, expected):
    assert Ksm(tree).parse("use_zero_pages", text) is expected


@pytest.mark.parametrize("name,value,pattern", [
    ("use_zero_pages", "maybe", r"use_zero_pages='maybe'.*boolean"),
    ("use_zero_pages", 2, "use_zero_pages=2"),
    ("pages_to_scan", "abc", r"pages_to_scan='abc'.*integer"),
    ("pages_to_scan", "-1", r"pages_to_scan=-1 is out of range"),
    ("pages_to_scan", 2**32, "out of range"),
    ("pages_to_scan", "1.5", "pages_to_scan='1.5'"),
    ("pages_to_scan", True, "not a boolean"),
    ("max_page_sharing", 1, r"max_page_sharing=1 is out of range \(2\.\."),
    ("run", 3, r"run=3 is out of range \(0\.\.2\)"),
    ("advisor_mode", "fast", r"advisor_mode='fast'.*none, scan-time"),
    ("advisor_target_scan_time", 0, "advisor_target_scan_time=0"),
])
def test_bad_values_name_knob_and_value(tree, name, value, pattern):
    with pytest.raises(KsmValueError, match=pattern) as info:
        Ksm(tree).parse(name, value)
    assert info.value.knob == name


def test_unknown_future_knob_is_parsed_from_its_content(tmp_path):
    knobs = dict(KNOBS_618, future_knob="7", future_mode="[a] b c")
    ksm = Ksm(make_fake_ksm(tmp_path / "ksm", knobs))
    assert ksm.get("future_knob") == 7
    assert ksm.get("future_mode") == "a"
    assert ksm.parse("future_mode", "c") == "c"
    with pytest.raises(KsmValueError):
        ksm.parse("future_mode", "d")


# --- writes -------------------------------------------------------------------------------------
def test_set_writes_formatted_value_and_skips_no_op(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    ksm.set("use_zero_pages", "on")
    ksm.set("pages_to_scan", "5000")
    ksm.set("pages_to_scan", 5000)          # already 5000: no write
    ksm.set("smart_scan", True)             # already 1: no write
    assert kernel.writes == [("use_zero_pages", "1"), ("pages_to_scan", "5000")]
    assert (tree / "use_zero_pages").read_text().strip() == "1"


def test_write_that_does_not_stick_is_reported(tree, kernel):
    kernel.ignore.add("sleep_millisecs")
    with pytest.raises(KsmError, match="reads back 20"):
        Ksm(tree, sysfs=kernel).set("sleep_millisecs", 5)


@pytest.mark.parametrize("code,cls,pattern", [
    (errno.EACCES, KsmPermissionError, "needs root"),
    (errno.EPERM, KsmPermissionError, "needs root"),
    (errno.EROFS, KsmPermissionError, "read-only"),
    (errno.EBUSY, KsmBusyError, "unmerge first"),
    (errno.EINVAL, KsmValueError, r"rejected sleep_millisecs=5"),
    (errno.ENOENT, KsmUnavailableError, "no KSM knob 'sleep_millisecs'"),
    (errno.ENOMEM, KsmError, "out of memory"),
    (errno.EIO, KsmError, "Input/output error"),
])
def test_errno_mapping(tree, kernel, code, cls, pattern):
    kernel.fail["sleep_millisecs"] = code
    with pytest.raises(cls, match=pattern) as info:
        Ksm(tree, sysfs=kernel).set("sleep_millisecs", 5)
    assert info.value.knob == "sleep_millisecs"
    assert info.value.errno == code
    assert isinstance(info.value.__cause__, OSError)


def test_real_open_failure_is_translated(tree):
    # without the fake kernel: a real open(2) failure goes through the same translation
    (tree / "run").unlink()
    (tree / "run").mkdir()  # open(O_WRONLY) on a directory: EISDIR -> generic KsmError
    ksm = Ksm(tree)
    with pytest.raises(KsmError, match="run"):
        ksm.write_raw("run", "1")


# --- snapshot / restore / settings --------------------------------------------------------------
def test_restore_puts_advisor_mode_before_pages_to_scan_and_run_last(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    snap = ksm.snapshot()
    ksm.set("advisor_mode", "scan-time")
    ksm.set("run", 1)
    ksm.set("sleep_millisecs", 0)
    assert ksm.get("pages_to_scan") == 500
    kernel.writes.clear()
    ksm.restore(snap)
    names = [name for name, _ in kernel.writes]
    assert names == ["advisor_mode", "sleep_millisecs", "run"]   # pages_to_scan came back with it
    assert ksm.knobs() == snap.as_dict()


def test_restore_to_scan_time_never_writes_pages_to_scan(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    ksm.set("advisor_mode", "scan-time")
    snap = ksm.snapshot()
    ksm.set("advisor_mode", "none")
    ksm.set("pages_to_scan", 9000)
    kernel.writes.clear()
    ksm.restore(snap)
    assert kernel.writes == [("advisor_mode", "scan-time")]
    assert ksm.get("pages_to_scan") == 500


def test_restore_of_max_page_sharing_needs_allow_unmerge(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    snap = ksm.snapshot()
    (tree / "max_page_sharing").write_text("64\n")
    (tree / "sleep_millisecs").write_text("0\n")
    (tree / "run").write_text("1\n")
    (tree / "pages_shared").write_text("10\n")
    with pytest.raises(KsmBusyError, match="allow_unmerge=True"):
        ksm.restore(snap)
    assert kernel.writes == []              # refused before writing anything
    ksm.restore(snap, allow_unmerge=True)
    assert kernel.writes[0] == ("run", "2")
    assert kernel.writes[1] == ("max_page_sharing", "256")
    assert kernel.writes[-1] == ("run", "0")
    assert ksm.knobs() == snap.as_dict()


def test_restore_is_best_effort_and_raises_first_error(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    snap = ksm.snapshot()
    (tree / "sleep_millisecs").write_text("0\n")
    (tree / "use_zero_pages").write_text("1\n")
    kernel.fail["sleep_millisecs"] = errno.EIO
    with pytest.raises(KsmError, match="sleep_millisecs"):
        ksm.restore(snap)
    assert ksm.get("use_zero_pages") is False


def test_settings_applies_and_restores(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    before = read_tree(tree)
    with ksm.settings(run=1, pages_to_scan=5000, sleep_millisecs=0, smart_scan=0) as inner:
        assert inner is ksm
        assert ksm.get("run") == 1 and ksm.get("pages_to_scan") == 5000
        assert ksm.get("smart_scan") is False
        assert kernel.writes[-1] == ("run", "1")    # run last
    assert read_tree(tree) == before


class CountingKernel(FakeKernel):
    """A :class:`FakeKernel` that counts the reads of every file by name."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: dict[str, int] = {}

    def read(self, path, knob):
        self.reads[knob] = self.reads.get(knob, 0) + 1
        return super().read(path, knob)


@pytest.mark.parametrize("knobs", [dict(run=1, pages_to_scan=5000, sleep_millisecs=0, smart_scan=0),
                                   dict(advisor_mode="scan-time", use_zero_pages=1)])
def test_settings_reads_each_knob_once_at_its_end(tree, knobs):
    kernel = CountingKernel(tree)
    ksm = Ksm(tree, sysfs=kernel)
    before = read_tree(tree)
    with ksm.settings(**knobs):
        kernel.reads.clear()
        kernel.writes.clear()
    written = {name for name, _ in kernel.writes}
    # one read of each knob to compare and restore, plus the read-back of each knob written
    # (pages_to_scan, which writing advisor_mode resets, is read again after it)
    again = {"pages_to_scan"} if "advisor_mode" in written else set()
    expected = {name: 1 + (name in written) + (name in again) for name in ksm.knob_names()}
    assert {k: v for k, v in kernel.reads.items() if k in expected} == expected
    assert read_tree(tree) == before


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_settings_restores_on_exception_and_ctrl_c(tree, kernel, exc):
    ksm = Ksm(tree, sysfs=kernel)
    before = read_tree(tree)
    with pytest.raises(exc):
        with ksm.settings(run=1, use_zero_pages=1):
            raise exc()
    assert read_tree(tree) == before


def test_settings_validates_everything_before_writing(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    with pytest.raises(KsmValueError, match="use_zero_pages"):
        with ksm.settings(run=1, pages_to_scan=5000, use_zero_pages="maybe"):
            pytest.fail("entered the block")
    with pytest.raises(KsmValueError, match="unknown"):
        with ksm.settings(run=1, bogus=3):
            pytest.fail("entered the block")
    assert kernel.writes == []


def test_settings_rejects_pages_to_scan_under_scan_time_advisor(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    with pytest.raises(KsmValueError, match="advisor_mode is scan-time"):
        ksm.apply({"advisor_mode": "scan-time", "pages_to_scan": 5000})
    assert kernel.writes == []


def test_half_applied_settings_are_rolled_back(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    before = read_tree(tree)
    kernel.fail["use_zero_pages"] = errno.EINVAL   # written after pages_to_scan/sleep_millisecs
    with pytest.raises(KsmValueError, match="use_zero_pages=1"):
        with ksm.settings(run=1, pages_to_scan=5000, sleep_millisecs=0, use_zero_pages=1):
            pytest.fail("entered the block")
    written = [name for name, _ in kernel.writes]
    assert written[:3] == ["pages_to_scan", "sleep_millisecs", "use_zero_pages"]
    assert "run" not in written[:3]
    assert read_tree(tree) == before


def test_ctrl_c_during_apply_is_held_then_rolled_back(tree, kernel, sigint_default):
    ksm = Ksm(tree, sysfs=kernel)
    before = read_tree(tree)
    handler = signal.getsignal(signal.SIGINT)

    def interrupt(name, text):
        if name == "pages_to_scan":
            os.kill(os.getpid(), signal.SIGINT)

    kernel.on_write = interrupt
    with pytest.raises(KeyboardInterrupt):
        ksm.apply({"pages_to_scan": 5000, "sleep_millisecs": 0, "run": 1})
    written = [name for name, _ in kernel.writes]
    # the writes after the signal still ran (no half-written state), then everything was undone
    assert written[:3] == ["pages_to_scan", "sleep_millisecs", "run"]
    assert read_tree(tree) == before
    assert signal.getsignal(signal.SIGINT) is handler


def test_settings_with_unmerge_knob_needs_allow_unmerge(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    with pytest.raises(KsmBusyError, match="allow_unmerge=True"):
        with ksm.settings(max_page_sharing=16):
            pytest.fail("entered the block")
    assert kernel.writes == []
    (tree / "pages_shared").write_text("5\n")
    (tree / "run").write_text("1\n")
    with ksm.settings(allow_unmerge=True, max_page_sharing=16):
        assert kernel.writes[:2] == [("run", "2"), ("max_page_sharing", "16")]
        assert kernel.writes[-1] == ("run", "1")   # run was not asked for: back as it was
        (tree / "run").write_text("1\n")    # someone restarts ksmd, pages get merged again
        (tree / "pages_shared").write_text("3\n")
    assert ksm.get("max_page_sharing") == 256
    assert ksm.get("run") == 1


def test_changed_since_reports_outside_changes(tree, kernel):
    ksm = Ksm(tree, sysfs=kernel)
    snap = ksm.snapshot()
    assert ksm.changed_since(snap) == {}
    (tree / "sleep_millisecs").write_text("7\n")
    (tree / "advisor_mode").write_text("none [scan-time]\n")
    (tree / "pages_to_scan").write_text("1234\n")      # the advisor's own doing: not reported
    assert ksm.changed_since(snap) == {"sleep_millisecs": (20, 7),
                                       "advisor_mode": ("none", "scan-time")}


def test_unmerge_all_writes_2_then_previous_run(tree, kernel):
    (tree / "run").write_text("1\n")
    (tree / "pages_shared").write_text("9\n")
    ksm = Ksm(tree, sysfs=kernel)
    ksm.unmerge_all()
    assert kernel.writes == [("run", "2"), ("run", "1")]
    assert ksm.stats().pages_shared == 0


def test_unmerge_all_failure_still_puts_run_back(tree, kernel):
    (tree / "run").write_text("1\n")
    kernel.fail["run"] = errno.ENOMEM
    with pytest.raises(KsmError, match="out of memory"):
        Ksm(tree, sysfs=kernel).unmerge_all()
    assert [w for w in kernel.writes] == [("run", "2"), ("run", "1")]


# --- the knob table ---------------------------------------------------------------------------
def test_write_order_unmerge_knobs_first_run_last():
    assert write_order(["run", "pages_to_scan", "use_zero_pages", "advisor_mode",
                        "merge_across_nodes", "max_page_sharing"]) == [
        "max_page_sharing", "merge_across_nodes", "advisor_mode", "pages_to_scan",
        "use_zero_pages", "run"]


def test_pages_to_scan_is_ignored_only_under_the_scan_time_advisor():
    assert pages_to_scan_ignored({"advisor_mode": "scan-time", "pages_to_scan": 500})
    assert not pages_to_scan_ignored({"advisor_mode": "none"})
    assert not pages_to_scan_ignored({"pages_to_scan": 100})     # a kernel without the advisor
