"""Injection into running processes (udedup.inject, csrc/inject.c, udedup enable/disable).

- Refusal logic on fake /proc trees (no ptrace needed).
- The native injector against the C targets in tests/targets/, which check their own correctness
  (compiled with gcc at test time): every target type takes a few dozen injections and must
  report no EINTR, no checksum/stream/sleep/signal/rseq failure, and stay alive.
- Proof the two subtle fixes matter: without them the same targets fail.
- A real-kernel KSM check: after ``enable`` the target's duplicate pages merge.
Real injections register memory with KSM, so they are marked ``ksm`` (the machine-wide lock).
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import pytest

import udedup
from udedup import cli
from udedup import inject
from udedup import pages
from udedup.host.fs import ProcFs
from udedup.host.maps import read_mappings
from udedup.host.parse import PF_KTHREAD
from udedup.ksm.memory import PR_SET_MEMORY_MERGE
from udedup.errors import (InjectError, InjectRefusedError, KernelThreadError,
                           KsmUnavailableError, ProcessNotFoundError, UnsupportedArchError,
                           UsageError)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "stress_inject.py")
INJECTIONS = 50  # per target type here; scripts/stress_inject.py does 1000


def _load_stress():
    spec = importlib.util.spec_from_file_location("stress_inject", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


stress = _load_stress()


def _cannot_inject() -> str | None:
    if platform.machine() != "x86_64" or not pages.INJECT_SUPPORTED:
        return "the injector supports x86_64 only"
    if shutil.which("gcc") is None:
        return "gcc is needed to build the target programs"
    scope = int(ProcFs().global_text("sys", "kernel", "yama", "ptrace_scope") or 0)
    if scope >= 3 or (scope == 2 and os.geteuid() != 0):
        return f"kernel.yama.ptrace_scope={scope} forbids ptrace here"
    return None


_skip_no_ptrace = pytest.mark.skipif(_cannot_inject() is not None, reason=str(_cannot_inject()))


def needs_ptrace(test):
    """Real injection. Also marked ``ksm``: registering a process's duplicate pages changes what a
    running ksmd merges, so these hold the machine-wide KSM lock like every test that touches KSM
    state (and are skipped where KSM is unavailable)."""
    return _skip_no_ptrace(pytest.mark.ksm(test))


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    reason = _cannot_inject()
    if reason:
        pytest.skip(reason)
    return stress.build_targets(str(tmp_path_factory.mktemp("targets")))


@pytest.fixture
def spawn(targets):
    started = []

    def start(name, feed=False, mib=1, args=()):
        t = stress.TargetProcess(targets[name], mib=mib, feed=feed, args=args)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


# --- pure logic -----------------------------------------------------------------------------------
@pytest.mark.parametrize("code, offset", [
    (b"", -1), (b"\x0f", -1), (b"\x05\x0f", -1), (b"\x0f\x05", 0), (b"\x90\x0f\x05", 1),
    (b"\x0f\x0f\x05", 1), (b"\x0f\x90\x0f\x05\x0f\x05", 2), (b"\x90" * 5000 + b"\x0f\x05", 5000),
])
def test_find_syscall_insn(code, offset):
    if not pages.INJECT_SUPPORTED:
        offset = -1
    assert pages.find_syscall_insn(code) == offset


class FakeProc:
    """A minimal /proc tree: one process (PID 4242, threads given), self, yama."""

    def __init__(self, root, pid=4242, threads=(4242,), state="S", flags=0, uid=0, gid=0,
                 tracer=0, seccomp=0, cap_eff="000001ffffffffff", self_cap="000001ffffffffff",
                 elf_class=2, yama=None, ppid=1):
        self.root = root
        self.pid = pid
        for tid in threads:
            tdir = root / str(pid) / "task" / str(tid)
            tdir.mkdir(parents=True)
            (tdir / "stat").write_text(self._stat(tid, state, flags, ppid))
            (tdir / "status").write_text(self._status(tid, uid, gid, tracer, seccomp, cap_eff,
                                                      ppid))
        pdir = root / str(pid)
        (pdir / "stat").write_text(self._stat(pid, state, flags, ppid))
        (pdir / "status").write_text(self._status(pid, uid, gid, tracer, seccomp, cap_eff, ppid))
        (pdir / "exe").write_bytes(b"\x7fELF" + bytes([elf_class]) + b"\x01\x01" + b"\0" * 9)
        (pdir / "mem").write_bytes(b"")
        (pdir / "comm").write_text("fake\n")
        me = root / "self"
        me.mkdir()
        (me / "status").write_text(f"Name:\tpytest\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
                                   f"CapEff:\t{self_cap}\n")
        if yama is not None:
            ydir = root / "sys" / "kernel" / "yama"
            ydir.mkdir(parents=True)
            (ydir / "ptrace_scope").write_text(f"{yama}\n")

    @staticmethod
    def _stat(pid, state, flags, ppid):
        return f"{pid} (fake) {state} {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0 1 1 0 0 20 0 1 0\n"

    def _status(self, tid, uid, gid, tracer, seccomp, cap_eff, ppid):
        return (f"Name:\tfake\nState:\tS (sleeping)\nTgid:\t{self.pid}\nPid:\t{tid}\n"
                f"PPid:\t{ppid}\nTracerPid:\t{tracer}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                f"Gid:\t{gid}\t{gid}\t{gid}\t{gid}\nCapEff:\t{cap_eff}\nSeccomp:\t{seccomp}\n")


def _check(tmp_path, force=False, pid=4242, **kw):
    FakeProc(tmp_path, **kw)
    return inject.check_target(pid, force=force, procfs=str(tmp_path))


@pytest.mark.skipif(not pages.INJECT_SUPPORTED, reason="x86_64 only")
class TestRefusals:
    def test_plain_process_is_accepted(self, tmp_path):
        t = _check(tmp_path, threads=(4242, 4243))
        assert (t.pid, t.tid, t.has_cap_sys_resource, t.own_child) == (4242, 4242, True, False)

    def test_thread_id_selects_that_thread(self, tmp_path):
        root = tmp_path
        FakeProc(root, threads=(4242, 4243))
        # /proc/<tid> of a non-leader thread: Tgid names the process
        tdir = root / "4243"
        tdir.mkdir()
        for name in ("stat", "status"):
            (tdir / name).write_text((root / "4242" / "task" / "4243" / name).read_text())
        (tdir / "mem").write_bytes(b"")
        t = inject.check_target(4243, procfs=str(root))
        assert (t.pid, t.tid) == (4242, 4243)

    def test_missing_capability_is_reported(self, tmp_path):
        assert not _check(tmp_path, cap_eff="0000000000000000").has_cap_sys_resource

    def test_kernel_thread(self, tmp_path):
        with pytest.raises(KernelThreadError, match="kernel thread") as e:
            _check(tmp_path, flags=PF_KTHREAD)
        assert e.value.exit_code == 8

    def test_zombie(self, tmp_path):
        with pytest.raises(InjectRefusedError, match="zombie") as e:
            _check(tmp_path, state="Z")
        assert (e.value.reason, e.value.exit_code) == ("zombie", 9)

    def test_zombie_leader_with_live_thread_uses_the_thread(self, tmp_path):
        FakeProc(tmp_path, threads=(4242, 4243))
        (tmp_path / "4242" / "stat").write_text(FakeProc._stat(4242, "Z", 0, 1))
        (tmp_path / "4242" / "task" / "4242" / "stat").write_text(FakeProc._stat(4242, "Z", 0, 1))
        assert inject.check_target(4242, procfs=str(tmp_path)).tid == 4243

    def test_traced(self, tmp_path):
        with pytest.raises(InjectRefusedError, match="already traced by PID 77") as e:
            _check(tmp_path, tracer=77)
        assert e.value.reason == "traced" and e.value.tracer == 77

    def test_seccomp_filter_needs_force(self, tmp_path):
        with pytest.raises(InjectRefusedError, match="seccomp filter.*--force") as e:
            _check(tmp_path, seccomp=2)
        assert e.value.reason == "seccomp"

    def test_seccomp_filter_forced(self, tmp_path):
        assert _check(tmp_path, seccomp=2, force=True).seccomp == 2

    def test_seccomp_strict_even_forced(self, tmp_path):
        with pytest.raises(InjectRefusedError, match="strict"):
            _check(tmp_path, seccomp=1, force=True)

    @pytest.mark.parametrize("scope, self_cap, match", [
        (3, "000001ffffffffff", "ptrace_scope=3"),
        (2, "0000000000000000", "ptrace_scope=2"),
        (1, "0000000000000000", "ptrace_scope=1.*descendants"),
    ])
    def test_yama(self, tmp_path, scope, self_cap, match):
        with pytest.raises(InjectRefusedError, match=match) as e:
            _check(tmp_path, yama=scope, self_cap=self_cap)
        assert e.value.reason == "ptrace"

    def test_yama_1_allows_descendants(self, tmp_path):
        assert _check(tmp_path, yama=1, self_cap="0", ppid=os.getpid()).pid == 4242

    def test_other_user_without_cap_sys_ptrace(self, tmp_path):
        with pytest.raises(InjectRefusedError, match="another user"):
            _check(tmp_path, uid=os.getuid() + 1000, self_cap="0")

    def test_other_user_with_cap_sys_ptrace(self, tmp_path):
        assert _check(tmp_path, uid=os.getuid() + 1000).pid == 4242

    def test_32bit_program(self, tmp_path):
        with pytest.raises(UnsupportedArchError, match="32-bit"):
            _check(tmp_path, elf_class=1)

    def test_not_found(self, tmp_path):
        with pytest.raises(ProcessNotFoundError):
            inject.check_target(999, procfs=str(tmp_path))

    @pytest.mark.parametrize("bad", ["abc", 0, -3, "1.5"])
    def test_not_a_pid(self, bad):
        with pytest.raises(UsageError):
            inject.check_target(bad)

    def test_ourselves(self):
        with pytest.raises(InjectRefusedError, match="this process") as e:
            inject.check_target(os.getpid())
        assert e.value.reason == "self"


@pytest.mark.skipif(not pages.INJECT_SUPPORTED, reason="x86_64 only")
class TestRoots:
    """enable/disable read /proc and the KSM directory under the roots they are given, down to
    the last reader (the D-state wait included): these run on fake trees, touching nothing."""

    def test_procfs_reaches_the_target_checks(self, tmp_path):
        FakeProc(tmp_path, tracer=77)
        for action in (udedup.enable, udedup.disable):
            with pytest.raises(InjectRefusedError, match="already traced by PID 77") as e:
                action(4242, procfs=str(tmp_path), ksm_root=str(tmp_path))
            assert e.value.reason == "traced"

    def test_procfs_reaches_the_d_state_wait(self, tmp_path):
        FakeProc(tmp_path, state="D")
        with pytest.raises(InjectRefusedError, match="uninterruptible sleep") as e:
            udedup.enable(4242, mode="madvise", procfs=ProcFs(str(tmp_path)),
                          ksm_root=str(tmp_path))
        assert (e.value.reason, e.value.exit_code) == ("busy", 9)

    def test_missing_ksm_root_is_reported_first(self, tmp_path):
        with pytest.raises(KsmUnavailableError, match="no KSM") as e:
            udedup.enable(4242, procfs=str(tmp_path), ksm_root=str(tmp_path / "no-ksm"))
        assert e.value.exit_code == KsmUnavailableError.exit_code

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode 000 file anyway")
    def test_unreadable_proc_file_is_a_ptrace_refusal(self, tmp_path):
        FakeProc(tmp_path)
        (tmp_path / "4242" / "status").chmod(0)
        with pytest.raises(InjectRefusedError, match="cannot read .*status.*run as root") as e:
            inject.check_target(4242, procfs=str(tmp_path))
        assert (e.value.reason, e.value.exit_code) == ("ptrace", 9)


def test_bad_mode_and_ranges_are_usage_errors():
    with pytest.raises(UsageError, match="unknown mode"):
        udedup.enable(os.getpid(), mode="bogus")
    with pytest.raises(UsageError, match="madvise only"):
        udedup.enable(os.getpid(), mode="prctl", ranges=[(0, 4096)])


@pytest.mark.parametrize("argv, code, message", [
    (["enable", "abc"], 2, "not a PID"),
    (["enable", "999999999"], 8, "no process with PID 999999999"),
    (["disable", "999999999"], 8, "no process"),
    (["enable", "--range", "12", "1"], 2, "START-END"),
    (["enable", "--mode", "prctl", "--range", "0x1000-0x2000", "1"], 2, "--mode madvise"),
])
def test_cli_errors(argv, code, message, capsys):
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(not pages.INJECT_SUPPORTED, reason="x86_64 only")
def test_cli_refuses_ourselves_with_exit_9(capsys):
    assert cli.main(["enable", str(os.getpid())]) == 9
    assert "this process" in capsys.readouterr().err


# --- the real thing -------------------------------------------------------------------------------
@needs_ptrace
@pytest.mark.parametrize("kind", ["compute", "pipe", "nanosleep", "futex", "epoll", "timer", "rseq",
                                  "stopped"])
def test_target_survives_injections(kind, targets):
    try:
        row = stress.stress_type(kind, targets[stress.TYPES[kind][0]], INJECTIONS, 1, False)
    except stress.SkipTarget as why:
        pytest.skip(str(why))
    assert not row["crashed"], row
    assert row["eintr"] == 0, row["result"]
    assert row["target_ok"], row["result"]
    assert row["ok"] == INJECTIONS and not row["errors"], row["errors"]
    assert row["stop_lost"] == 0
    if kind == "epoll":
        assert row["eintr_fixups"] > 0  # epoll_wait was caught and its EINTR turned into a restart
    if kind == "rseq":
        assert row["rseq_aborts"] > 0


@needs_ptrace
def test_seccomp_target_is_refused_and_force_reaches_the_filter(targets, spawn):
    t = spawn("target_seccomp", feed=True)
    for _ in range(3):
        with pytest.raises(InjectRefusedError, match="seccomp"):
            udedup.enable(t.pid)
    res = udedup.enable(t.pid, mode="madvise", ranges=[t.dup], force=True)
    assert res.ok and res.calls[0].result == 0
    # the filter answers EPERM to PR_SET_MEMORY_MERGE: the injected call really went through it
    ip = inject.find_syscall_address(t.pid)
    out = pages.inject_syscalls(t.pid, ip, [(inject.NR_PRCTL, (PR_SET_MEMORY_MERGE, 1))],
                                own_child=True)
    assert out.results == [-errno.EPERM]
    result = t.finish()
    assert result["ok"] == "1", result


def _wait_blocked_in(pid: int, nr: int, timeout: float = 5.0) -> None:
    # /proc/PID/syscall: the number of the call the thread is blocked in, first
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ProcFs().read_text(pid, "syscall").split()[0] == str(nr):
            return
        time.sleep(0.001)
    pytest.fail(f"PID {pid} never blocked in syscall {nr}")


@needs_ptrace
def test_results_and_registration(spawn):
    t = spawn("target_pipe")  # no input: it blocks in read() once READY is written
    _wait_blocked_in(t.pid, 0)
    ip = inject.find_syscall_address(t.pid)
    out = pages.inject_syscalls(t.pid, ip, [(39, ()), (inject.NR_PRCTL, (68, 0, 0, 0, 0))],
                                own_child=True)
    assert out.results[0] == t.pid          # getpid() ran in the target
    assert out.results[1] in (0, 1)         # PR_GET_MEMORY_MERGE
    assert out.info["saved_orig_rax"] == 0  # it was blocked in read()
    assert out.info["saved_rax"] == -512    # -ERESTARTSYS: restarted after we left

    def registered():
        maps = read_mappings(t.pid)
        return [m for m in maps if m.start <= t.dup[0] < m.end][0].registered

    res = udedup.enable(t.pid, mode="madvise", ranges=[t.dup])
    assert res.ok and res.mode == "madvise" and res.ranges == (t.dup,) and registered()
    assert res.was_in_syscall == "read" and res.elapsed_s > 0
    res = udedup.disable(t.pid, mode="madvise", ranges=[t.dup])
    assert res.ok and not registered()
    res = udedup.enable(t.pid)  # auto: prctl where the kernel allows it, else madvise
    assert res.ok and res.mode in ("prctl", "madvise") and registered()
    if res.mode == "madvise":
        assert res.ranges and res.bytes >= t.dup[1] - t.dup[0]
    res = udedup.disable(t.pid)
    assert res.ok and not any(m.registered for m in read_mappings(t.pid)
                              if m.kind == "anon")
    assert t.finish()["ok"] == "1"


@needs_ptrace
def test_prctl_mode(spawn):
    t = spawn("target_pipe")
    try:
        res = udedup.enable(t.pid, mode="prctl")
    except InjectError as e:
        # a kernel that wants CAP_SYS_RESOURCE refuses inside the target: auto falls back
        assert e.errno == errno.EPERM and "madvise" in str(e)
        res = udedup.enable(t.pid)
        assert res.mode == "madvise" and "prctl" in res.fallback
    else:
        assert res.ok and res.mode == "prctl"
        assert "ksm_merge_any: yes" in ProcFs().read_text(t.pid, "ksm_stat")
        res = udedup.disable(t.pid, mode="prctl")
        assert res.ok
        assert "ksm_merge_any: no" in ProcFs().read_text(t.pid, "ksm_stat")
        res = udedup.enable(t.pid)  # auto takes prctl where the kernel allows it
        assert res.ok and res.mode == "prctl"
        udedup.disable(t.pid)
    assert t.finish()["ok"] == "1"


@needs_ptrace
def test_thread_id_runs_the_call_in_that_thread(spawn):
    t = spawn("target_futex")
    worker = t.tids[-1]
    res = udedup.enable(worker, mode="madvise", ranges=[t.dup])
    assert (res.pid, res.tid) == (t.pid, worker) and res.ok
    ip = inject.find_syscall_address(t.pid)
    assert pages.inject_syscalls(worker, ip, [(186, ())]).results == [worker]  # gettid
    assert t.finish()["ok"] == "1"


@needs_ptrace
def test_ranges_must_be_mapped_and_aligned(spawn):
    t = spawn("target_pipe")
    start, end = t.dup
    with pytest.raises(UsageError, match="page-aligned"):
        udedup.enable(t.pid, mode="madvise", ranges=[(start + 1, end)])
    with pytest.raises(UsageError, match="not fully mapped"):
        udedup.enable(t.pid, mode="madvise", ranges=[(start, end + (64 << 20))])
    with pytest.raises(UsageError, match="empty or reversed"):
        udedup.enable(t.pid, mode="madvise", ranges=[(end, start)])
    assert t.finish()["ok"] == "1"


# --- proof the refinements are needed: the same targets fail without them -------------------------
def _getpid_ten_times(t, **switches) -> dict:
    """Inject getpid() ten times with one refinement switched off; the target's RESULT line."""
    time.sleep(0.05)
    ip = inject.find_syscall_address(t.pid)
    for _ in range(10):
        pages.inject_syscalls(t.pid, ip, [(39, ())], own_child=True, **switches)
        time.sleep(0.003)
    return t.finish()


@needs_ptrace
def test_without_the_eintr_fixup_epoll_sees_eintr(spawn):
    result = _getpid_ten_times(spawn("target_epoll", feed=True), keep_eintr=True)
    assert int(result["eintr"]) > 0, result


@needs_ptrace
def test_without_the_rseq_abort_the_section_resumes_unaborted(spawn):
    try:
        t = spawn("target_rseq")
    except stress.SkipTarget as why:
        pytest.skip(str(why))
    result = _getpid_ten_times(t, rseq_check=False)
    assert int(result["violations"]) > 0, result


# --- the thread dies or the code is wrong ---------------------------------------------------------
@needs_ptrace
def test_target_exiting_inside_the_call(spawn):
    t = spawn("target_pipe")
    ip = inject.find_syscall_address(t.pid)
    with pytest.raises(ProcessNotFoundError, match="exited with status 3"):
        pages.inject_syscalls(t.pid, ip, [(231, (3,))], own_child=True)  # exit_group(3)
    # our own child's exit status was left for its real waiter
    assert t.proc.wait(timeout=5) == 3


@needs_ptrace
def test_target_killed_inside_the_call(spawn):
    t = spawn("target_pipe")
    ip = inject.find_syscall_address(t.pid)
    with pytest.raises(InjectError, match="killed by SIGKILL"):
        pages.inject_syscalls(t.pid, ip, [(62, (t.pid, signal.SIGKILL))], own_child=True)
    assert t.proc.wait(timeout=5) == -signal.SIGKILL


@needs_ptrace
def test_address_without_syscall_instruction_is_refused_untouched(spawn):
    t = spawn("target_pipe", feed=True)
    with pytest.raises(InjectError, match="syscall instruction"):
        pages.inject_syscalls(t.pid, t.dup[0], [(39, ())], own_child=True)
    assert t.alive() and t.finish()["ok"] == "1"


@needs_ptrace
def test_fault_at_the_instruction_is_suppressed(spawn):
    # 0f 05 in read-only data: the check before running passes, executing it faults (NX). The
    # SIGSEGV exists only because of us: it must be dropped, the registers restored.
    t = spawn("target_pipe", feed=True)
    nx = int(t.ready["nx_syscall"], 16)
    with pytest.raises(InjectError, match="faulted") as e:
        pages.inject_syscalls(t.pid, nx, [(39, ())], own_child=True)
    assert e.value.outcome.info["stops"] >= 2
    time.sleep(0.02)
    assert t.alive() and t.finish()["ok"] == "1"


@needs_ptrace
def test_no_such_thread():
    with pytest.raises(ProcessNotFoundError):
        pages.inject_syscalls(2 ** 22 + 12345, 0, [(39, ())])


@needs_ptrace
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as two other users")
def test_ptrace_permission_denied_by_the_kernel(spawn, tmp_path):
    # a target of one user, an injector of another without CAP_SYS_PTRACE: PTRACE_SEIZE fails,
    # and so does the pre-check
    t = spawn("target_pipe")
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        lines = []
        try:
            os.setgid(65534)
            os.setuid(65534)
            for what, call in (("SEIZE", lambda: pages.inject_syscalls(t.pid, 0, [(39, ())])),
                               ("CHECK", lambda: inject.check_target(t.pid))):
                try:
                    call()
                    lines.append(f"{what} allowed")
                except InjectRefusedError as err:
                    lines.append(f"{what} {err.reason}")
        except BaseException as err:
            lines.append(f"ERROR {err!r}")
        os.write(wfd, "\n".join(lines).encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        out = f.read()
    os.waitpid(child, 0)
    assert out.split("\n") == ["SEIZE ptrace", "CHECK ptrace"], out
    assert t.finish()["ok"] == "1"


# --- CLI and KSM ----------------------------------------------------------------------------------
@needs_ptrace
def test_cli_enable_disable_json(spawn, capsys):
    t = spawn("target_nanosleep")
    assert cli.main(["enable", str(t.pid), "--mode", "madvise", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["ok"] and rows[0]["mode"] == "madvise" and rows[0]["pid"] == t.pid
    assert cli.main(["disable", str(t.pid), "-v"]) == 0
    out = capsys.readouterr().out
    comm = ProcFs().comm(t.pid)  # truncated to 15 characters by the kernel
    assert f"PID {t.pid} ({comm}): disabled via madvise" in out
    # one bad PID among good ones: the good one is done, the exit code is the failure's
    assert cli.main(["enable", "999999999", str(t.pid), "-q"]) == 8
    assert t.finish()["ok"] == "1"


@needs_ptrace
def test_ksm_merges_the_targets_duplicate_memory(spawn):
    t = spawn("target_pipe", feed=True, mib=4)
    got = stress.ksm_merge_check(t.pid, t.dup, timeout=20, lock=False)
    assert got["merging_before"] == 0
    assert got["merged"], got
    assert t.finish()["ok"] == "1"  # its memory still reads back identical


@needs_ptrace
def test_stress_script_runs(tmp_path):
    # --no-lock: this test holds the KSM lock already (marked ksm)
    proc = subprocess.run([sys.executable, SCRIPT, "--count", "5", "--no-ksm", "--no-lock",
                           "--targets", "pipe,seccomp"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout


@needs_ptrace
def test_nanosleep_keeps_its_remaining_time(spawn):
    # One 300 ms sleep interrupted 10 times: restart_syscall must continue to the original end;
    # restarting the whole interval each time would make it last well over 300 ms + 100 ms.
    t = spawn("target_nanosleep", args=(300,))
    ip = inject.find_syscall_address(t.pid)
    time.sleep(0.02)
    in_sleep = 0
    for _ in range(10):
        out = pages.inject_syscalls(t.pid, ip, [(39, ())], own_child=True)
        in_sleep += out.info["saved_rax"] == -516  # -ERESTART_RESTARTBLOCK: caught in the sleep
        time.sleep(0.02)
    assert in_sleep >= 8
    result = t.finish()
    assert result["ok"] == "1" and int(result["short"]) == 0, result
    assert int(result["max_overshoot_us"]) < 100_000, result
