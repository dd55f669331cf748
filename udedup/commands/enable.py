"""``udedup enable PID...``: register running processes with KSM by injecting the syscall."""
from __future__ import annotations

import sys

from .. import inject
from ..errors import InjectError, UdedupError, UsageError
from ..host.fs import DEFAULT_PROCFS
from ..ksm import DEFAULT_ROOT
from ..units import human_bytes
from ..console import print_json

NAME = "enable"
HELP = "enable KSM inside running processes (ptrace injection of prctl/madvise)"
DESCRIPTION = """\
Make running processes opt into KSM without restarting them: udedup stops one thread for a
fraction of a millisecond with ptrace (PTRACE_SEIZE, no signal sent), has it execute
prctl(PR_SET_MEMORY_MERGE, 1) or madvise(MADV_MERGEABLE), restores its registers so that a
system call it was blocked in resumes as if nothing happened, and lets it go.

modes:
  prctl    the whole process, future mappings too (some kernels want CAP_SYS_RESOURCE in
           the target; 6.18 does not)
  madvise  the given --range, or every eligible anonymous private mapping; later mappings
           need another pass
  auto     prctl when the target can use it, else madvise (default)

Refused before touching the process: kernel threads, zombies, processes already traced (a
debugger), 32-bit programs, no ptrace permission (other user without CAP_SYS_PTRACE,
kernel.yama.ptrace_scope), seccomp filters (unless --force). Exit status 0 when every PID
succeeded, else the code of the first failure (8: no such process, 9: refused or failed).
"""
ORDER = 40


def add_arguments(parser) -> None:
    parser.add_argument("pids", nargs="+", metavar="PID",
                        help="process IDs (a thread ID selects the thread that runs the call)")
    parser.add_argument("--mode", choices=inject.MODES, default="auto",
                        help="prctl, madvise or auto (default)")
    parser.add_argument("--range", dest="ranges", action="append", metavar="START-END",
                        help="madvise only this address range (hex or decimal, page-aligned); "
                             "repeatable")
    parser.add_argument("--force", action="store_true",
                        help="inject even into a process under a seccomp filter")
    parser.add_argument("--procfs", default=DEFAULT_PROCFS, metavar="PATH",
                        help=f"procfs mount (default {DEFAULT_PROCFS})")
    parser.add_argument("--sysfs", default=DEFAULT_ROOT, metavar="PATH",
                        help=f"KSM sysfs directory (default {DEFAULT_ROOT})")


def parse_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition("-")
    try:
        if not sep:
            raise ValueError
        return int(start, 0), int(end, 0)
    except ValueError:
        raise UsageError(f"--range {text!r} is not START-END (e.g. 0x7f0000000000-0x7f0000400000)"
                         ) from None


def run(args) -> int:
    return run_action(args, inject.enable, "enabled")


def run_action(args, action, verb: str) -> int:
    ranges = [parse_range(r) for r in args.ranges] if args.ranges else None
    if ranges is not None and args.mode == "prctl":
        raise UsageError("--range needs --mode madvise (or auto): prctl acts on the whole process")
    exit_code = 0
    rows = []
    for pid in args.pids:
        try:
            res = action(pid, mode=args.mode, ranges=ranges, force=args.force,
                         procfs=args.procfs, ksm_root=args.sysfs)
        except UdedupError as err:
            exit_code = exit_code or err.exit_code
            rows.append({"pid": int(pid) if str(pid).isdigit() else pid, "ok": False, "error": {
                "type": type(err).__name__, "message": str(err), "exit_code": err.exit_code,
                "reason": getattr(err, "reason", None)}})
            if not args.json:
                print(f"udedup: error: {err}", file=sys.stderr)
            continue
        if not res.ok:
            exit_code = exit_code or InjectError.exit_code
        rows.append(res.as_dict())
        if not args.json and not args.quiet:
            _print_result(res, verb, args.verbose)
        elif not args.json:
            _print_failures(res)
    if args.json:
        print_json(rows)
    return exit_code


def _print_result(res, verb: str, verbose: int) -> None:
    held = f"held {res.elapsed_s * 1e3:.2f} ms"
    head = f"PID {res.pid} ({res.name}):"
    if res.mode == "prctl":
        scope = ("whole process, future mappings too" if res.action == "enable"
                 else "whole process: every mapping unregistered and unmerged")
        print(f"{head} {verb} via prctl(PR_SET_MEMORY_MERGE, {int(res.action == 'enable')}): "
              f"{scope} [{held}]")
    elif res.ranges:
        print(f"{head} {verb} via madvise on {len(res.ranges)} range(s), "
              f"{human_bytes(res.bytes)} [{held}]")
    else:
        print(f"{head} nothing done: {res.note}")
    if res.fallback:
        print(f"  prctl not used: {res.fallback}")
    if res.note and (res.ranges or res.mode == "prctl"):
        print(f"  note: {res.note}")
    _print_failures(res)
    if verbose:
        print(f"  thread {res.tid}, was in {res.was_in_syscall or 'user code'}; "
              f"{res.stops} ptrace stops, {res.signals_forwarded} signals passed on, "
              f"{res.retries} retries" + (", stopped (SIGSTOP) and left stopped"
                                          if res.group_stopped else ""))
        for call in res.calls:
            outcome = "ok" if call.ok else f"failed: {call.error}"
            print(f"    {call.call} = {call.result} ({outcome})")


def _print_failures(res) -> None:
    for call in res.calls:
        if not call.ok and call.call.startswith(res.mode):
            print(f"  {call.call} failed inside the target: {call.error}", file=sys.stderr)
