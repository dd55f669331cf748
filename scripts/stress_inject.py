#!/usr/bin/env python3
"""Stress the syscall injector against target programs that check their own correctness.

For each target type (tests/targets/target_*.c, compiled here with gcc): start it, inject
``--count`` times (udedup.enable / udedup.disable, madvise mode over the duplicate buffer and over
every eligible mapping, into random threads where it has several), then verify:

- crashes: the target exited before being told to;
- correctness: its own report (checksums, counter stream, sleep lengths, lost or reordered
  signals, rseq violations, signal mask after epoll_pwait);
- visible EINTR: calls that failed with EINTR inside the target;
- KSM: after a final ``enable`` the target's duplicate pages merge (``/proc/PID/ksm_merging_pages``)
  with ksmd running fast; every knob is restored and everything unmerged afterwards.

The seccomp target must be refused every time (and stay correct). The "stopped" type injects into
a target stopped with SIGSTOP and checks it is still stopped afterwards.

    python scripts/stress_inject.py                  # 1000 injections per target type
    python scripts/stress_inject.py --count 50 --targets pipe,epoll --no-ksm

Exit status 0 when every target type passed. Needs root (ptrace, KSM sysfs) and gcc.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import udedup  # noqa: E402
from udedup.errors import InjectRefusedError, UdedupError  # noqa: E402
from udedup.host.fs import ProcFs  # noqa: E402
from udedup.ksm import LOCK_PATH as KSM_LOCK, Ksm, experiment_lock  # noqa: E402

TARGET_DIR = os.path.join(ROOT, "tests", "targets")
#: target types: (program, seconds between counter words written to its stdin or None, longest
#: random pause between two injections)
TYPES = {
    "compute": ("target_compute", None, 0.001),
    "pipe": ("target_pipe", 0.002, 0.001),
    "nanosleep": ("target_nanosleep", None, 0.001),
    "futex": ("target_futex", None, 0.001),
    # words 50 ms apart and pauses up to 40 ms around its 30 ms timeout: waits end by events, by
    # timeouts, and are interrupted; an injection restarts an interrupted wait with its whole
    # timeout, so back-to-back injections would never let one expire
    "epoll": ("target_epoll", 0.05, 0.04),
    "timer": ("target_timer", 0.002, 0.001),
    "rseq": ("target_rseq", None, 0.001),
    "stopped": ("target_pipe", 0.002, 0.001),
    "seccomp": ("target_seccomp", 0.002, 0.001),
}
SKIP_EXIT = 77


def build_targets(outdir: str, gcc: str = "gcc", names=None) -> dict[str, str]:
    """Compile tests/targets/target_*.c into ``outdir``; {program name: path}."""
    wanted = set(names) if names else None
    built = {}
    for fname in sorted(os.listdir(TARGET_DIR)):
        if not (fname.startswith("target_") and fname.endswith(".c")):
            continue
        name = fname[:-2]
        if wanted is not None and name not in wanted:
            continue
        out = os.path.join(outdir, name)
        cmd = [gcc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", out,
               os.path.join(TARGET_DIR, fname)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"compiling {fname} failed:\n{proc.stderr}")
        built[name] = out
    return built


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)


class TargetProcess:
    """A running target: READY fields parsed, optional counter feeder on its stdin."""

    def __init__(self, path: str, mib: int = 4, feed: bool = False, feed_interval=0.002,
                 args=()):
        self.proc = subprocess.Popen([path, str(mib), *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=False)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            rest = self.proc.stdout.read().decode()
            self.proc.wait()
            if self.proc.returncode == SKIP_EXIT:
                raise SkipTarget(f"{os.path.basename(path)}: {(line + rest).strip()}")
            raise RuntimeError(f"{path} did not start: {line!r} {rest!r}")
        self.ready = _fields(line)
        self.pid = int(self.ready["pid"])
        self.tids = [int(t) for t in self.ready.get("tids", str(self.pid)).split(",")]
        self.dup = (int(self.ready["dup_addr"], 16),
                    int(self.ready["dup_addr"], 16) + int(self.ready["dup_len"]))
        self._stop = threading.Event()
        self._feeder = None
        self.words = 0
        if feed:
            self._feeder = threading.Thread(target=self._feed, args=(feed_interval,), daemon=True)
            self._feeder.start()

    def _feed(self, interval):
        while not self._stop.wait(interval):
            try:
                self.proc.stdin.write(self.words.to_bytes(8, "little"))
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                return
            self.words += 1

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 10.0) -> dict:
        """Close stdin (the stop signal), wait, return the RESULT fields (+ returncode)."""
        self._stop.set()
        if self._feeder:
            self._feeder.join()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.stdin = None  # communicate() must not touch it again
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
        lines = [ln for ln in out.decode().splitlines() if ln.startswith("RESULT")]
        result = _fields(lines[-1]) if lines else {}
        result["returncode"] = self.proc.returncode
        return result

    def kill(self):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


class SkipTarget(Exception):
    pass


PROC = ProcFs()


def proc_state(pid: int) -> str:
    return PROC.stat(pid).state


def wait_state(pid: int, states: str, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_state(pid) in states:
            return True
        time.sleep(0.0005)
    return False


def inject_once(t: TargetProcess, i: int, rng: random.Random):
    """One enable or disable, cycling through the madvise variants. Returns the InjectResult."""
    who = rng.choice(t.tids)
    op = i % 4
    if op == 0:
        return udedup.enable(who, mode="madvise", ranges=[t.dup])
    if op == 1:
        return udedup.disable(who, mode="madvise", ranges=[t.dup])
    if op == 2:
        return udedup.enable(who, mode="madvise")
    return udedup.disable(who, mode="madvise")


def ksm_merge_check(pid: int, dup: tuple[int, int], timeout: float = 30.0,
                    lock: bool = True) -> dict:
    """Unmerge everything, register ``pid``'s memory with KSM (an injected madvise), run ksmd fast
    until the target's duplicate pages merge, then unmerge everything and restore every knob.

    ``lock``: take the machine-wide KSM test lock (main() and the tests already hold it)."""
    page = udedup.PAGE_SIZE
    dup_pages = (dup[1] - dup[0]) // page
    ksm = Ksm()
    # ksmd stays stopped until the target is registered: a range left registered by the last
    # injection would otherwise merge again between the unmerge and the "before" reading
    knobs = {"run": 0, "pages_to_scan": 5000, "sleep_millisecs": 0}
    if "smart_scan" in ksm.knob_names():
        knobs["smart_scan"] = 0
    with contextlib.ExitStack() as stack:
        w0 = time.monotonic()
        stack.enter_context(experiment_lock(enabled=lock))
        lock_wait = time.monotonic() - w0
        merging = 0
        with ksm.settings(**knobs):
            try:
                # start from nothing merged: ksm_merging_pages lags behind MADV_UNMERGEABLE until
                # ksmd next runs, and someone else's ksmd run may have merged pages meanwhile
                ksm.unmerge_all()
                before = _merging_pages(pid)
                res = udedup.enable(pid, mode="madvise")
                ksm.set("run", 1)
                t0 = time.monotonic()
                while time.monotonic() - t0 < timeout:
                    merging = _merging_pages(pid)
                    if merging >= dup_pages * 0.95:
                        break
                    time.sleep(0.02)
                merge_s = time.monotonic() - t0
            finally:
                ksm.unmerge_all()
    return {"dup_pages": dup_pages, "merging_before": before, "merging_pages": merging,
            "merge_s": merge_s, "lock_wait_s": lock_wait, "registered_bytes": res.bytes,
            "merged": before == 0 and merging >= dup_pages * 0.95}


def _merging_pages(pid: int) -> int:
    return int(PROC.read_text(pid, "ksm_merging_pages"))


def stress_type(kind: str, path: str, count: int, mib: int, do_ksm: bool, seed: int = 1,
                log=None) -> dict:
    """Run ``count`` injections into one target of type ``kind``; return the figures."""
    program, interval, pause = TYPES[kind]
    rng = random.Random(seed)
    t = TargetProcess(path, mib=mib, feed=interval is not None, feed_interval=interval or 0)
    stats = {"type": kind, "injections": 0, "ok": 0, "refused": 0, "errors": {}, "crashed": False,
             "stop_lost": 0, "retries": 0, "signals_forwarded": 0, "eintr_fixups": 0,
             "rseq_aborts": 0, "hold_us": [], "wall_us": []}
    try:
        time.sleep(0.05)
        for i in range(count):
            if not t.alive():
                stats["crashed"] = True
                break
            if kind == "stopped":
                os.kill(t.pid, signal.SIGSTOP)
                wait_state(t.pid, "T")
            w0 = time.perf_counter()
            try:
                res = inject_once(t, i, rng)
            except InjectRefusedError as err:
                stats["refused"] += 1
                stats.setdefault("refusal", str(err))
            except UdedupError as err:
                key = f"{type(err).__name__}: {err}"[:160]
                stats["errors"][key] = stats["errors"].get(key, 0) + 1
            else:
                stats["ok"] += int(res.ok)
                stats["retries"] += res.retries
                stats["signals_forwarded"] += res.signals_forwarded
                stats["eintr_fixups"] += int(res.eintr_fixup)
                stats["rseq_aborts"] += res.rseq_aborts
                stats["hold_us"].append(res.elapsed_s * 1e6)
            stats["wall_us"].append((time.perf_counter() - w0) * 1e6)
            stats["injections"] += 1
            if kind == "stopped":
                # after the detach the thread re-enters the group stop on its own: give it time
                if not wait_state(t.pid, "T", timeout=1.0):
                    stats["stop_lost"] += 1
                os.kill(t.pid, signal.SIGCONT)
                wait_state(t.pid, "RS")
            time.sleep(rng.random() * pause)
        if not t.alive():
            stats["crashed"] = True
        if do_ksm and kind != "seccomp" and not stats["crashed"]:
            stats["ksm"] = ksm_merge_check(t.pid, t.dup, lock=False)
    finally:
        result = t.finish()
    stats["result"] = result
    stats["eintr"] = int(result.get("eintr", -1))
    stats["target_ok"] = result.get("ok") == "1" and result["returncode"] == 0
    stats["crashed"] = stats["crashed"] or result["returncode"] not in (0, 1)
    hold = stats.pop("hold_us")
    wall = stats.pop("wall_us")
    stats["hold_us_median"] = statistics.median(hold) if hold else None
    stats["hold_us_p99"] = sorted(hold)[int(len(hold) * 0.99)] if hold else None
    stats["hold_us_max"] = max(hold) if hold else None
    stats["wall_us_median"] = statistics.median(wall) if wall else None
    expected_refusals = count if kind == "seccomp" else 0
    checks = {
        "crashed": not stats["crashed"],
        "target reported a failure": stats["target_ok"],
        "EINTR visible": stats["eintr"] == 0,
        "injection errors": not stats["errors"],
        "refusals": stats["refused"] == expected_refusals,
        "group stop lost": stats["stop_lost"] == 0,
        "injections missing": stats["injections"] == count,
        "injections not ok": kind == "seccomp" or stats["ok"] == count,
        "KSM did not merge": stats.get("ksm", {}).get("merged", True),
    }
    stats["failed_checks"] = [name for name, good in checks.items() if not good]
    stats["passed"] = not stats["failed_checks"]
    return stats


def _fmt(v, unit=""):
    return "-" if v is None else (f"{v:.0f}{unit}" if isinstance(v, float) else f"{v}{unit}")


def print_table(rows, out=sys.stdout):
    head = ("type", "inject", "ok", "refused", "errors", "crash", "target", "EINTR", "retries",
            "sigfwd", "eintrfix", "rseq", "hold med/p99/max us", "call med us", "KSM merged")
    print(" | ".join(head), file=out)
    for r in rows:
        ksm = r.get("ksm")
        ksm_txt = (f"{ksm['merging_pages']}/{ksm['dup_pages']} in {ksm['merge_s']:.2f}s"
                   if ksm else "-")
        print(" | ".join([
            r["type"], str(r["injections"]), str(r["ok"]), str(r["refused"]),
            str(sum(r["errors"].values())), "yes" if r["crashed"] else "no",
            "ok" if r["target_ok"] else "FAIL", str(r["eintr"]), str(r["retries"]),
            str(r["signals_forwarded"]), str(r["eintr_fixups"]), str(r["rseq_aborts"]),
            f"{_fmt(r['hold_us_median'])}/{_fmt(r['hold_us_p99'])}/{_fmt(r['hold_us_max'])}",
            _fmt(r["wall_us_median"]), ksm_txt]), file=out)
        print(f"    target report: {' '.join(f'{k}={v}' for k, v in r['result'].items())}",
              file=out)
        for err, n in r["errors"].items():
            print(f"    error x{n}: {err}", file=out)
        if r["failed_checks"]:
            print(f"    FAILED: {', '.join(r['failed_checks'])}", file=out)
        if r.get("refusal"):
            print(f"    refusal: {r['refusal']}", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="injections per target type")
    ap.add_argument("--targets", default=",".join(TYPES),
                    help=f"comma-separated target types (default all: {','.join(TYPES)})")
    ap.add_argument("--mib", type=int, default=4, help="MiB of duplicate memory per target")
    ap.add_argument("--no-ksm", action="store_true", help="skip the KSM merge check")
    ap.add_argument("--no-lock", action="store_true",
                    help=f"do not take {KSM_LOCK} (the caller holds it already)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gcc", default=os.environ.get("CC", "gcc"))
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.targets.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TYPES]
    if unknown or args.count < 1:
        ap.error(f"unknown target type(s) {unknown}; known: {', '.join(TYPES)}" if unknown
                 else "--count must be >= 1")
    if not shutil.which(args.gcc):
        print(f"stress_inject: {args.gcc} not found: a C compiler is needed for the targets",
              file=sys.stderr)
        return 2
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="udedup-targets-") as tmp:
        built = build_targets(tmp, args.gcc, {TYPES[k][0] for k in kinds})
        # Registering the targets' duplicate pages changes what a running ksmd merges: hold the
        # machine-wide KSM lock (as the ksm-marked tests do) so no KSM test runs meanwhile.
        w0 = time.monotonic()
        with experiment_lock(enabled=not args.no_lock):
            lock_wait = time.monotonic() - w0
            t0 = time.monotonic()
            for i, kind in enumerate(kinds):
                try:
                    rows.append(stress_type(kind, built[TYPES[kind][0]], args.count,
                                            args.mib, not args.no_ksm, seed=args.seed + i))
                except SkipTarget as why:
                    skipped.append(f"{kind}: {why}")
    elapsed = time.monotonic() - t0
    passed = all(r["passed"] for r in rows)
    if args.json:
        json.dump({"count": args.count, "rows": rows, "skipped": skipped, "passed": passed,
                   "elapsed_s": elapsed, "lock_wait_s": lock_wait}, sys.stdout, indent=2)
        print()
    else:
        print(f"udedup injection stress: {args.count} injections per target type, "
              f"kernel {os.uname().release}, {elapsed:.1f} s (+{lock_wait:.1f} s waiting for "
              "the KSM lock)")
        print_table(rows)
        for s in skipped:
            print(f"skipped {s}")
        print("PASSED" if passed else "FAILED: " + ", ".join(r["type"] for r in rows
                                                            if not r["passed"]))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
