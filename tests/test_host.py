"""host.parse on literal text, and host.fs (ProcFs, SysFs, the errno tables) on fake trees passed
as their roots."""
from __future__ import annotations

import errno
import os

import pytest

from udedup.errors import (KernelThreadError, KsmBusyError, KsmError, KsmPermissionError,
                           KsmUnavailableError, KsmValueError, ProcessAccessError, ProcessError,
                           ProcessNotFoundError)
from udedup.host import fs, parse
from udedup.host.fs import ProcFs, SysFs

ROOT = os.geteuid() == 0


def stat_line(pid=42, comm="prog", state="S", flags=0, utime=5, stime=6, start=77):
    # fields 3..22 of proc(5): state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime
    rest = [state, "1", str(pid), str(pid), "0", "-1", str(flags), "0", "0", "0", "0",
            str(utime), str(stime), "0", "0", "20", "0", "1", "0", str(start)]
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


# --- parse: /proc/PID/stat ------------------------------------------------------------------------
def test_stat_comm_with_spaces_and_parentheses():
    st = parse.parse_stat(stat_line(1234, comm="a (b) c) d", state="R", utime=11, stime=12,
                                    start=999))
    assert (st.pid, st.comm, st.state, st.ppid) == (1234, "a (b) c) d", "R", 1)
    assert (st.utime, st.stime, st.start_time) == (11, 12, 999)
    assert st.fields[0] == "R" and len(st.fields) == 20
    assert not st.kernel_thread and not st.exited


def test_stat_flags_zombie_and_dead():
    assert parse.parse_stat(stat_line(flags=parse.PF_KTHREAD)).kernel_thread
    assert parse.parse_stat(stat_line(state="Z")).exited
    assert parse.parse_stat(stat_line(state="X")).exited
    assert not parse.parse_stat(stat_line(state="D")).exited


def test_stat_short_fake_lines():
    # seven fields after the name is enough (fakes and old kernels): what is missing reads as 0
    st = parse.parse_stat("7 (x y) S 3 1 1 0 -1 64\n")
    assert (st.comm, st.ppid, st.flags, st.utime, st.start_time) == ("x y", 3, 64, 0, 0)
    with pytest.raises(ValueError, match="short"):
        parse.parse_stat("7 (x) S 3 1")
    for bad in ("", "garbage", "12 x S 1"):
        with pytest.raises(ValueError):
            parse.parse_stat(bad)


# --- parse: status ------------------------------------------------------------------------------
STATUS = """\
Name:\tmy prog
State:\tS (sleeping)
Uid:\t1000\t1001\t1002\t1003
Gid:\t100\t100\t100\t100
VmRSS:\t    2048 kB
CapEff:\t0000000000200000
"""


def test_status_and_its_helpers():
    st = parse.parse_status(STATUS)
    assert st["Name"] == "my prog" and st["State"] == "S (sleeping)"
    assert parse.status_ids(st, "Uid") == [1000, 1001, 1002, 1003]
    assert parse.status_ids(st, "Groups") == []
    assert parse.status_kib(st, "VmRSS") == 2048 * 1024 and parse.status_kib(st, "VmSwap") == 0
    assert parse.status_has_cap(st, 21)          # CAP_SYS_ADMIN is bit 21
    assert not parse.status_has_cap(st, 19)
    assert not parse.status_has_cap({"CapEff": "zz"}, 21) and not parse.status_has_cap({}, 21)


# --- parse: ksm_stat ----------------------------------------------------------------------------
def test_ksm_stat_both_line_forms_and_flags():
    text = ("ksm_rmap_items 12\nksm_zero_pages 3\nksm_merging_pages 5\nksm_process_profit -4096\n"
            "ksm_merge_any: yes\nksm_mergeable: no\n\n")
    assert parse.parse_ksm_stat(text) == {
        "ksm_rmap_items": 12, "ksm_zero_pages": 3, "ksm_merging_pages": 5,
        "ksm_process_profit": -4096, "ksm_merge_any": True, "ksm_mergeable": False}
    # the colon form for counters too, and text that is neither stays text
    assert parse.parse_ksm_stat("ksm_rmap_items: 7\nksm_future: maybe\nksm_merge_any YES\n") == {
        "ksm_rmap_items": 7, "ksm_future": "maybe", "ksm_merge_any": True}
    assert parse.parse_ksm_stat("") == {}


# --- parse: meminfo, PSI, cgroup, cmdline, choices ----------------------------------------------
def test_meminfo_bytes_and_counts():
    text = ("MemTotal:       16384 kB\nMemAvailable:    8192 kB\nHugePages_Total:       4\n"
            "Hugepagesize:       2048 kB\nBogus: n/a\n")
    assert parse.parse_meminfo(text) == {"MemTotal": 16384 << 10, "MemAvailable": 8192 << 10,
                                         "HugePages_Total": 4, "Hugepagesize": 2048 << 10}


def test_psi_some_and_full():
    text = ("some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=7 junk\n")
    got = parse.parse_psi(text)
    assert got["some"] == {"avg10": 1.5, "avg60": 0.25, "avg300": 0.0, "total": 12345.0}
    assert got["full"]["total"] == 7.0 and "junk" not in got["full"]
    assert parse.parse_psi("") == {}


def test_cgroup_v2_hybrid_and_v1_only():
    assert parse.parse_cgroup("0::/user.slice/app.scope\n") == "/user.slice/app.scope"
    hybrid = "12:memory:/user.slice\n1:name=systemd:/user.slice/x.scope\n0::/user.slice/x.scope\n"
    assert parse.parse_cgroup(hybrid) == "/user.slice/x.scope"
    assert parse.parse_cgroup("9:name=systemd:/\n8:pids:/\n") == ""
    assert parse.parse_cgroup("0::/\n") == "/"


def test_cmdline():
    assert parse.parse_cmdline(b"python3\0-m\0udedup scan\0") == "python3 -m udedup scan"
    assert parse.parse_cmdline(b"") == ""
    assert parse.parse_cmdline(b"bad\xff\0") == "bad\ufffd"


def test_choices():
    assert parse.parse_choices("[none] scan-time") == ("none", ["none", "scan-time"])
    assert parse.parse_choices("always [madvise] never\n") == ("madvise",
                                                                ["always", "madvise", "never"])
    assert parse.parse_choices("1") == ("", ["1"])


# --- a fake /proc ---------------------------------------------------------------------------------
def fake_process(root, pid, stat=None, **files):
    d = root / str(pid)
    (d / "task" / str(pid)).mkdir(parents=True)
    (d / "stat").write_text(stat_line(pid) if stat is None else stat)
    (d / "task" / str(pid) / "stat").write_text(stat_line(pid, comm="thread"))
    for name, text in files.items():
        path = d / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
    return d


@pytest.fixture
def proc(tmp_path):
    root = tmp_path / "proc"
    root.mkdir()
    fake_process(root, 10, comm="my prog\n", cmdline=b"a\0b c\0", cgroup="0::/a.slice\n",
                 status=STATUS, ksm_stat="ksm_rmap_items 3\nksm_merge_any: yes\n")
    fake_process(root, 11)                                   # no comm, no ksm_stat
    (root / "11" / "task" / "12").mkdir()
    fake_process(root, 20, stat=stat_line(20, state="Z"))    # zombie
    fake_process(root, 21, stat=stat_line(21, comm="kworker/0:1", flags=parse.PF_KTHREAD))
    fake_process(root, 22, stat="")                          # being torn down
    (root / "self").mkdir()
    (root / "meminfo").write_text("MemTotal: 1024 kB\n")
    (root / "pressure").mkdir()
    (root / "pressure" / "memory").write_text("some avg10=2.00 avg60=0 avg300=0 total=9\n")
    return ProcFs(str(root))


def test_procfs_reads_and_parses_through_its_root(proc):
    assert repr(proc).startswith("ProcFs(") and fs.as_procfs(proc) is proc
    assert fs.as_procfs(proc.root).root == proc.root and fs.as_procfs(None).root == "/proc"
    assert proc.path(10, "stat", tid=10).endswith("/10/task/10/stat")
    assert proc.read_bytes(10, "cmdline") == b"a\0b c\0"
    assert proc.read_text(10, "comm") == "my prog\n"
    assert proc.comm(10) == "my prog" and proc.comm(11) is None and proc.comm(11, "?") == "?"
    assert proc.cmdline(10) == "a b c" and proc.cmdline(11) == ""
    assert proc.cgroup(10) == "/a.slice" and proc.cgroup(11) == ""
    assert proc.stat(10).comm == "prog" and proc.stat(10, tid=10).comm == "thread"
    assert proc.status(10)["Name"] == "my prog" and proc.maybe_status(10)["Uid"].startswith("1000")
    assert sorted(proc.pids()) == [10, 11, 20, 21, 22]
    assert proc.tids(11) == [11, 12] and proc.tids(99) == []
    assert proc.exists(10) and not proc.exists(99)
    assert proc.meminfo() == {"MemTotal": 1 << 20}
    assert proc.pressure("memory")["some"]["avg10"] == 2.0 and proc.pressure("io") is None
    assert proc.global_text("nothing") is None
    assert proc.readlink(10, "exe") is None
    fd = proc.open(10, "stat")
    try:
        assert os.read(fd, 3) == b"10 "
    finally:
        os.close(fd)


def test_procfs_missing_process_and_maybe_readers(proc):
    with pytest.raises(ProcessNotFoundError, match="PID 99"):
        proc.read_text(99, "stat")
    with pytest.raises(ProcessNotFoundError):
        proc.stat(99)
    with pytest.raises(ProcessNotFoundError):
        proc.open(99, "pagemap")
    with pytest.raises(ProcessNotFoundError, match="exiting"):
        proc.stat(22)
    assert proc.maybe_bytes(99, "stat") is None and proc.maybe_text(99, "stat") is None
    assert proc.maybe_stat(99) is None and proc.maybe_stat(22) is None
    assert proc.maybe_status(99) is None
    assert proc.maybe_stat(10).pid == 10
    assert proc.maybe_ksm_stat(99) == {}


def test_ksm_stat_missing_file_versus_missing_process(proc):
    assert proc.ksm_stat(10) == {"ksm_rmap_items": 3, "ksm_merge_any": True}
    assert proc.ksm_stat(11) == {}              # the process exists, the kernel has no such file
    with pytest.raises(ProcessNotFoundError):
        proc.ksm_stat(99)                       # the process does not
    assert proc.maybe_ksm_stat(10)["ksm_merge_any"] is True


def test_check_process_on_fakes(proc):
    assert proc.check_process(10).pid == 10
    assert proc.check_process("11").pid == 11
    with pytest.raises(ProcessNotFoundError, match="zombie"):
        proc.check_process(20)
    with pytest.raises(KernelThreadError, match="kworker/0:1"):
        proc.check_process(21)
    with pytest.raises(ProcessNotFoundError, match="exiting"):
        proc.check_process(22)
    with pytest.raises(ProcessNotFoundError):
        proc.check_process(99)


@pytest.mark.parametrize("bad", [True, "abc", None, 0, -5, 1.5j])
def test_check_pid_rejects_what_is_not_a_pid(bad):
    with pytest.raises(ProcessNotFoundError, match="PID|process ID"):
        fs.check_pid(bad)


def test_check_pid_accepts_numbers():
    assert fs.check_pid("12") == 12 and fs.check_pid(7) == 7


def test_global_files_missing_and_denied(tmp_path):
    proc = ProcFs(str(tmp_path))
    with pytest.raises(ProcessError, match="/proc/kpageflags does not exist") as info:
        proc.open_global("kpageflags")
    assert info.value.errno == errno.ENOENT
    err = fs.process_error(PermissionError(errno.EACCES, "x"), None, "kpagecount")
    assert isinstance(err, ProcessAccessError) and "root" in str(err)
    other = fs.process_error(OSError(errno.EIO, "x"), None, "kpagecount")
    assert type(other) is ProcessError and other.errno == errno.EIO


# --- the /proc errno table ------------------------------------------------------------------------
@pytest.mark.parametrize("err, kind", [
    (FileNotFoundError(errno.ENOENT, "x"), ProcessNotFoundError),
    (ProcessLookupError(errno.ESRCH, "x"), ProcessNotFoundError),
    (OSError(errno.ESRCH, "x"), ProcessNotFoundError),
    (PermissionError(errno.EACCES, "x"), ProcessAccessError),
    (PermissionError(errno.EPERM, "x"), ProcessAccessError),
])
def test_process_error_table(err, kind):
    got = fs.process_error(err, 5, "smaps")
    assert type(got) is kind and got.pid == 5 and "\n" not in str(got)
    assert isinstance(got, OSError)      # ProcessLookupError / PermissionError: callers catch either


def test_process_error_other_errno_keeps_it():
    got = fs.process_error(OSError(errno.EIO, "x"), 5, "smaps")
    assert type(got) is ProcessError and got.errno == errno.EIO and "smaps of PID 5" in str(got)


@pytest.mark.skipif(ROOT, reason="root reads a mode 000 file anyway (the table is tested above)")
def test_unreadable_file_is_an_access_error(proc):
    path = os.path.join(proc.root, "10", "environ")
    with open(path, "w") as f:
        f.write("X=1")
    os.chmod(path, 0)
    with pytest.raises(ProcessAccessError, match="not allowed to read environ of PID 10"):
        proc.read_text(10, "environ")
    assert proc.maybe_text(10, "environ") is None


# --- sysfs and its errno table ------------------------------------------------------------------
@pytest.mark.parametrize("code, kind, words", [
    (errno.EACCES, KsmPermissionError, "needs root"),
    (errno.EPERM, KsmPermissionError, "needs root"),
    (errno.EROFS, KsmPermissionError, "read-only"),
    (errno.EBUSY, KsmBusyError, "unmerge first"),
    (errno.EINVAL, KsmValueError, "invalid value"),
    (errno.ERANGE, KsmValueError, "invalid value"),
    (errno.ENOENT, KsmUnavailableError, "no KSM knob 'run'"),
    (errno.ENOTDIR, KsmUnavailableError, "no KSM knob 'run'"),
    (errno.ENOMEM, KsmError, "out of memory"),
    (errno.EIO, KsmError, "cannot write run=1"),
])
def test_knob_error_table(code, kind, words):
    got = fs.knob_error(OSError(code, "x"), knob="run", path="/sys/kernel/mm/ksm/run", value=1)
    assert type(got) is kind and words in str(got)
    assert (got.knob, got.value, got.errno) == ("run", 1, code)


def test_knob_error_names_the_scan_time_exception():
    got = fs.knob_error(OSError(errno.EINVAL, "x"), knob="pages_to_scan", path="p", value=5)
    assert "advisor_mode is scan-time" in str(got)


def test_sysfs_on_a_fake_tree(tmp_path):
    (tmp_path / "ksm").mkdir()
    (tmp_path / "ksm" / "run").write_text("0\n")
    (tmp_path / "ksm" / "full_scans").write_text("3\n")
    os.chmod(tmp_path / "ksm" / "full_scans", 0o444)
    sysfs = SysFs(str(tmp_path))
    assert repr(sysfs) == f"SysFs({str(tmp_path)!r})"
    run = sysfs.path("ksm", "run")
    assert sysfs.read(run, "run") == "0"
    sysfs.write(run, "1", "run")
    assert sysfs.read(run, "run") == "1"
    assert sorted(sysfs.listdir(sysfs.path("ksm"))) == [("full_scans", False), ("run", True)]
    with pytest.raises(KsmUnavailableError, match="no KSM knob 'sleep_millisecs'"):
        sysfs.read(sysfs.path("ksm", "sleep_millisecs"), "sleep_millisecs")
    with pytest.raises(KsmUnavailableError):
        sysfs.write(sysfs.path("nothing", "run"), "1", "run")
    with pytest.raises(KsmUnavailableError):
        sysfs.listdir(sysfs.path("nothing"))


# --- the real /proc -------------------------------------------------------------------------------
def test_real_procfs_of_this_process():
    proc = ProcFs()
    with open("/proc/self/comm") as f:
        assert proc.comm(os.getpid()) == f.read().strip()
    assert proc.comm(999_999_999) is None and proc.comm(999_999_999, default="?") == "?"
    assert proc.check_process(os.getpid()).pid == os.getpid()
    stat = proc.ksm_stat(os.getpid())
    if stat:     # kernels since 6.1
        assert isinstance(stat["ksm_rmap_items"], int)
        assert stat.get("ksm_merge_any", False) in (True, False)


# --- pagemap.read_pfn_tables: sorted PFNs skip the sort ---------------------------------------------
def test_read_pfn_tables_skips_the_sort_of_sorted_pfns_with_the_same_results(tmp_path, monkeypatch):
    import numpy as np
    from udedup.host import pagemap as pm
    size = 2 * pm.PAGEMAP_BLOCK
    table = np.arange(size, dtype=np.uint64) * np.uint64(5) + np.uint64(1)
    (tmp_path / "kpageflags").write_bytes(table.tobytes())
    (tmp_path / "kpagecount").write_bytes((table * np.uint64(2)).tobytes())
    rng = np.random.default_rng(7)
    distinct = np.sort(rng.choice(size + 50, 3000, replace=False)).astype(np.uint64)  # some past the end
    dups = np.sort(np.concatenate([distinct, distinct[::3], distinct[:1]]))
    shuffled = rng.permutation(dups)

    def want(pfns):
        flags = np.where(pfns < size, table[np.minimum(pfns, size - 1)], 0)
        return flags, flags * np.uint64(2)

    for pfns in (shuffled, distinct[:1], distinct[:0]):       # the sort still serves these
        got = pm.read_pfn_tables(pfns, procfs=str(tmp_path))
        assert all((g == w).all() for g, w in zip(got, want(pfns)))

    def no_sort(*args, **kwargs):
        raise AssertionError("np.unique sorted PFNs that were in order already")
    monkeypatch.setattr(np, "unique", no_sort)
    for pfns in (distinct, dups, np.full(4, 9, dtype=np.uint64)):
        for gap in (0, 64):
            got = pm.read_pfn_tables(pfns, procfs=str(tmp_path), gap=gap)
            assert all(g.dtype == np.uint64 and (g == w).all() for g, w in zip(got, want(pfns)))
