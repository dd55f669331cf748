"""CLI: udedup status / set / unmerge / run.

Bad inputs are a table: each gives its documented exit code and one line on stderr naming what was
wrong, never a traceback, and leaves every knob as it was. Most rows run in-process on a fake sysfs
tree; ``run`` always runs in a child (its prctl would otherwise change the test process itself).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from udedup import cli
from udedup.errors import UdedupError

from fake_sysfs import KNOBS_618, make_fake_ksm, read_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOBS = KNOBS_618
COUNTERS = {
    "full_scans": "12", "general_profit": "4112384", "ksm_zero_pages": "0", "pages_scanned": "99",
    "pages_shared": "4", "pages_sharing": "1020", "pages_skipped": "0", "pages_unshared": "0",
    "pages_volatile": "0", "stable_node_chains": "1", "stable_node_dups": "4",
}


def fake_sysfs(root, drop=()):
    return make_fake_ksm(root, {k: v for k, v in KNOBS.items() if k not in drop},
                         {k: v for k, v in COUNTERS.items() if k not in drop})


def cli_run(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:           # argparse usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("udedup"), err
    import re
    assert re.search(pattern, lines[0]), (pattern, lines[0])


# (argv with {sysfs} placeholder, exit code, stderr pattern, tree options)
BAD_INPUTS = [
    (["set", "--sysfs", "{sysfs}", "foo=1"], 6, r"unknown KSM knob 'foo'", {}),
    (["set", "--sysfs", "{sysfs}", "pages_to_scan=abc"], 6, r"pages_to_scan='abc'.*integer", {}),
    (["set", "--sysfs", "{sysfs}", "pages_to_scan=-5"], 6, r"pages_to_scan=-5 is out of range", {}),
    (["set", "--sysfs", "{sysfs}", "use_zero_pages=maybe"], 6, r"use_zero_pages.*boolean", {}),
    (["set", "--sysfs", "{sysfs}", "run=3"], 6, r"run=3 is out of range \(0\.\.2\)", {}),
    (["set", "--sysfs", "{sysfs}", "advisor_mode=fast"], 6, r"none, scan-time", {}),
    (["set", "--sysfs", "{sysfs}", "pages_shared=0"], 6, r"read-only counter", {}),
    # all validated first: the good first value is not written either
    (["set", "--sysfs", "{sysfs}", "pages_to_scan=5000", "run=1", "use_zero_pages=2"], 6,
     r"use_zero_pages='2'", {}),
    (["set", "--sysfs", "{sysfs}", "pages_to_scan"], 2, r"expected KNOB=VALUE", {}),
    (["set", "--sysfs", "{sysfs}", "=5"], 2, r"expected KNOB=VALUE", {}),
    (["set", "--sysfs", "{sysfs}", "run=1", "run=0"], 2, r"run is given twice", {}),
    (["set", "--sysfs", "{sysfs}"], 2, r"required: KNOB=VALUE", {}),
    # KSM pages exist (fake pages_shared=4): refused before anything is written
    (["set", "--sysfs", "{sysfs}", "sleep_millisecs=5", "max_page_sharing=512"], 5,
     r"max_page_sharing.*--allow-unmerge", {}),
    (["set", "--sysfs", "{sysfs}", "smart_scan=0"], 3, r"no KSM knob 'smart_scan'.*6\.7",
     {"drop": ("smart_scan",)}),
    (["set", "--sysfs", "{missing}", "run=1"], 3, r"does not exist.*no KSM", {}),
    (["status", "--sysfs", "{missing}"], 3, r"does not exist.*no KSM", {}),
    (["unmerge", "--sysfs", "{missing}"], 3, r"does not exist.*no KSM", {}),
    (["status", "--sysfs", "{sysfs}", "--interval", "0", "--pid", "999999999"], 8,
     r"no process with PID 999999999", {}),
    (["status", "--sysfs", "{sysfs}", "--interval", "0", "--pid", "abc"], 2, r"bad pid 'abc'", {}),
    (["status", "--sysfs", "{sysfs}", "--interval", "0", "--pid", "-4"], 2, r"bad pid '-4'", {}),
    (["status", "--sysfs", "{sysfs}", "--interval", "0", "--pid", "2"], 8, r"kernel thread", {}),
    (["status", "--sysfs", "{sysfs}", "--interval", "-1"], 2, r"--interval -1: must be >= 0", {}),
    (["status", "--sysfs", "{sysfs}", "--top", "x"], 2, r"invalid int value", {}),
    (["status", "--sysfs", "{sysfs}", "--bogus"], 2, r"unrecognized arguments", {}),
]


@pytest.mark.parametrize("argv,code,pattern,opts", BAD_INPUTS,
                         ids=[" ".join(a[3:] if "--sysfs" in a else a) or a[0]
                              for a, *_ in BAD_INPUTS])
def test_bad_input_table(tmp_path, capsys, argv, code, pattern, opts):
    sysfs = fake_sysfs(tmp_path / "ksm", **opts)
    before = read_tree(sysfs)
    argv = [a.format(sysfs=sysfs, missing=tmp_path / "no-ksm") for a in argv]
    got, out, err = cli_run(argv, capsys)
    assert got == code, err
    assert_one_line_error(err, pattern)
    assert out == ""
    assert read_tree(sysfs) == before


@contextmanager
def as_user(uid=65534):
    """Drop the effective uid (and with it every capability) for a block, in this process."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.ksm
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user and back")
def test_not_root_is_refused_with_exit_4(capsys):
    cli.build_parser()                       # import every command module while we can read them
    before = tree_state_real()
    with as_user():
        set_result = cli_run(["set", "sleep_millisecs=7", "pages_to_scan=4242"], capsys)
        unmerge_result = cli_run(["unmerge"], capsys)
    assert set_result[0] == 4
    assert_one_line_error(set_result[2], r"cannot write pages_to_scan=4242.*needs root")
    assert unmerge_result[0] == 4
    assert_one_line_error(unmerge_result[2], r"cannot write run=2.*needs root")
    assert tree_state_real() == before


@pytest.mark.parametrize("code,exit_code,pattern", [
    (errno.EPERM, 4, r"refused \(EPERM\).*CAP_SYS_RESOURCE"),
    (errno.EINVAL, 3, r"no PR_SET_MEMORY_MERGE \(needs Linux 6\.4\+"),
])
def test_run_prctl_refusals(capsys, monkeypatch, code, exit_code, pattern):
    from udedup.ksm import memory
    from udedup.errors import NativeError

    def refuse(*args):
        raise NativeError("prctl failed", errno=code)

    monkeypatch.setattr(memory.syscalls, "prctl", refuse)
    monkeypatch.setattr(os, "execvp", lambda *a: pytest.fail("exec after a refused prctl"))
    got, out, err = cli_run(["run", "--", "true"], capsys)
    assert got == exit_code
    assert_one_line_error(err, pattern)


def test_run_refuses_kernels_that_drop_the_flag_at_exec(capsys, monkeypatch):
    from udedup.ksm import memory
    from udedup.commands import run as run_cmd
    calls = []
    monkeypatch.setattr(memory.syscalls, "prctl", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(run_cmd, "kernel_version", lambda: (6, 5))
    monkeypatch.setattr(os, "execvp", lambda *a: pytest.fail("exec on a 6.5 kernel"))
    got, out, err = cli_run(["run", "--", "true"], capsys)
    assert got == 3
    assert_one_line_error(err, r"drops PR_SET_MEMORY_MERGE at exec.*6\.7.*--force")
    assert calls == [(67, 1, 0, 0, 0)]


def tree_state_real():
    from udedup.ksm import Ksm
    return Ksm().knobs()


# --- working paths on a fake tree ---------------------------------------------------------------
def test_set_changes_all_and_reports(tmp_path, capsys):
    sysfs = fake_sysfs(tmp_path / "ksm")
    code, out, err = cli_run(["set", "--sysfs", sysfs, "pages_to_scan=5000", "use_zero_pages=on",
                              "sleep_millisecs=20"], capsys)
    assert code == 0, err
    assert "pages_to_scan: 100 -> 5000" in out and "use_zero_pages: False -> True" in out
    assert "sleep_millisecs" not in out
    assert (sysfs / "pages_to_scan").read_text().strip() == "5000"
    assert (sysfs / "use_zero_pages").read_text().strip() == "1"
    code, out, err = cli_run(["set", "--json", "--sysfs", sysfs, "run=1"], capsys)
    data = json.loads(out)
    assert data["changed"] == {"run": [0, 1]} and data["knobs"]["run"] == 1


def test_status_json_has_knobs_counters_and_savings(tmp_path, capsys):
    sysfs = fake_sysfs(tmp_path / "ksm")
    code, out, err = cli_run(["status", "--json", "--sysfs", sysfs, "--interval", "0"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["knobs"]["advisor_mode"] == "none" and data["knobs"]["pages_to_scan"] == 100
    assert data["counters"]["pages_sharing"] == 1020
    # the kernel's net figure stays beside the true saving, which adds the zero-page mappings of
    # mergeable memory outside KSM (read from the real /proc here: whatever this machine has)
    assert data["saved_pages"] == 1020 and data["general_profit_bytes"] == 4112384
    assert data["general_profit_source"] == "general_profit"
    assert data["saved_bytes_source"] == "true_savings"
    assert data["breakdown"]["ksm_counters"]["bytes"] == 1020 * os.sysconf("SC_PAGE_SIZE")
    assert data["saved_bytes"] == (data["breakdown"]["ksm_counters"]["bytes"]
                                   + data["breakdown"]["zero_page_mappings"]["bytes"])
    assert data["process_profit_overcount_bytes"] == 4 * os.sysconf("SC_PAGE_SIZE")
    assert data["ksmd"]["window"] == "since_start"    # --interval 0: average since ksmd started
    assert isinstance(data["top_processes"], list)


def test_status_text_says_which_cpu_window(tmp_path, capsys):
    sysfs = fake_sysfs(tmp_path / "ksm", drop=("general_profit",))
    code, out, err = cli_run(["status", "--sysfs", sysfs, "--interval", "0.05", "--top", "0"],
                             capsys)
    assert code == 0, err
    assert "over the last 0.05 s" in out or "ksmd CPU: unknown" in out
    assert "computed from counters" in out            # no general_profit on this "kernel"
    assert "pages_sharing 1020" in out


def test_status_without_ksmd_in_procfs_still_reports(tmp_path, capsys):
    sysfs = fake_sysfs(tmp_path / "ksm")
    procfs = tmp_path / "proc"
    procfs.mkdir()
    code, out, err = cli_run(["status", "--json", "--sysfs", sysfs, "--procfs", procfs,
                              "--interval", "0"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["ksmd"]["pid"] is None and "no ksmd" in data["ksmd"]["error"]
    assert data["top_processes"] == []


def test_unmerge_on_fake_tree_writes_2_then_previous_run(tmp_path, capsys, monkeypatch):
    from udedup.host.fs import SysFs
    sysfs = fake_sysfs(tmp_path / "ksm")
    (sysfs / "run").write_text("1\n")
    writes = []
    real = SysFs.write
    # the command builds its own Ksm: record at the one writer every knob write goes through
    monkeypatch.setattr(SysFs, "write", lambda self, path, text, *a, **kw: (
        writes.append(text), real(self, path, text, *a, **kw)))
    code, out, err = cli_run(["unmerge", "--json", "--sysfs", sysfs], capsys)
    assert code == 0, err
    assert writes == ["2", "1"]
    assert json.loads(out)["run"] == 1


# --- udedup run, in a child ---------------------------------------------------------------------
def udedup_child(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "udedup", "run", *args], capture_output=True,
                          text=True, env=env, timeout=60, **kw)


@pytest.mark.parametrize("args,code,pattern", [
    (["--", "/nonexistent/cmd"], 127, r"/nonexistent/cmd: command not found"),
    (["no-such-command-udedup"], 127, r"command not found"),
    (["--", "/etc/passwd"], 126, r"/etc/passwd: permission denied"),
    (["--", "/"], 126, r"/: permission denied"),
    ([], 2, r"no command given"),
    (["--"], 2, r"no command given"),
])
def test_run_bad_commands(args, code, pattern):
    res = udedup_child(*args)
    assert res.returncode == code, res.stderr
    assert_one_line_error(res.stderr, pattern)


def test_run_passes_exit_code_signals_and_default_dispositions():
    assert udedup_child("sh", "-c", "exit 7").returncode == 7
    assert udedup_child("--", "sh", "-c", "kill -TERM $$").returncode == -15
    res = udedup_child("--", "cat", "/proc/self/status", "/proc/self/ksm_stat")
    assert res.returncode == 0, res.stderr
    fields = dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
    ignored = int(fields["SigIgn"].strip(), 16)
    # Python ignores SIGPIPE (13) and SIGXFSZ (25); the command must get the defaults back
    assert not ignored & (1 << (13 - 1)) and not ignored & (1 << (25 - 1))
    assert fields["ksm_merge_any"].strip() == "yes"


def test_usage_error_codes_match_the_exception_tree():
    # the table above relies on these; README's exit-code table documents them
    from udedup import errors
    assert errors.KsmUnavailableError.exit_code == 3
    assert errors.KsmPermissionError.exit_code == 4
    assert errors.KsmBusyError.exit_code == 5
    assert errors.KsmValueError.exit_code == 6
    assert errors.KsmTimeout.exit_code == errors.KsmNotRunningError.exit_code == 7
    assert errors.ProcessNotFoundError.exit_code == errors.KernelThreadError.exit_code == 8
    assert errors.UsageError.exit_code == 2
    assert issubclass(errors.KsmNotRunningError, UdedupError)
