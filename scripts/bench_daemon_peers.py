#!/usr/bin/env python3
"""The udedup daemon against its peers, on one host scenario.

The scenario: four processes, a few GiB in all.
  vm-a, vm-b   two "VMs" booted from one image: 75 % of their pages are the same image pages in
               both, 10 % zero pages (freed guest memory), 15 % private
  db-c         a cache of unique pages
  calc-d       unique pages rewritten several times a second (volatile)
They look like QEMU guests to ksmtuned (argv[0] qemu-system-x86_64, -enable-kvm).

The peers, each from the same start (fresh processes, everything unmerged, kernel-default knobs):
  reference    every process registered, pages_to_scan=10000 sleep_millisecs=0 smart_scan=0, until
               settled: its saving is the "achievable" one
  default      every process registered (KSM on everything), default knobs (100 pages / 20 ms)
  ksmtuned     every process registered, Debian's ksmtuned driving the knobs
  advisor      every process registered, advisor_mode=scan-time
  udedup       the daemon with candidates = these processes: it estimates them, registers by
               injection only what is worth it, and tunes ksmd
  floor        not a tuner: the least ksmd CPU any tuner pays here. The estimator (not counted)
               finds the ranges holding the saving; only those are registered and ksmd runs flat
               out (10000 pages / 0 ms) until 95 %

--scenario realhost replaces the four processes by real programs (scripts/realhost.py): three JVMs,
three Node.js processes, a Redis filled with DEBUG POPULATE, two Python workers and two QEMU guests
of the VM lab (TCG), the missing Debian packages installed with apt-get. Every peer runs through
the same code on either scenario.

Reported per peer (scripts/peers_report.py): saved memory over time, time to 90 % and 95 % of the
achievable saving, CPU-seconds of ksmd plus the tuner up to then (and its ratio to the floor row,
and the tuner's own share against ksmd's) and over the whole window, and the idle cost: ksmd's
and the tuner's CPU % over a quiet window after the window (--idle-window; the issue's figure is
600 s). Every KSM knob is restored at the end, also on Ctrl-C; every process started is killed.

  python scripts/bench_daemon_peers.py [--scale 1] [--window 150] [--idle-window 20] [--out report.txt]
  python scripts/bench_daemon_peers.py --scenario realhost [--programs java,node,redis,python,qemu]
         [--daemon-profile /tmp/daemon.prof]
  python scripts/bench_daemon_peers.py child --name vm-a --size 64M ...   (a workload process)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import ctypes
import json
import mmap
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from peers_report import fmt, idle_cost, report, summarize  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
PR_SET_NAME, PR_SET_PDEATHSIG, PR_SET_MEMORY_MERGE = 15, 1, 67
MADV_MERGEABLE = 12


# --- the workload process -------------------------------------------------------------------------
def _prctl(option, arg):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def child_main(args) -> int:
    """Fill a private anonymous buffer, say ready on stdout, live until stdin closes."""
    import numpy as np

    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_NAME, args.name.encode()[:15], 0, 0, 0)
    if args.register == "prctl":
        _prctl(PR_SET_MEMORY_MERGE, 1)
    n = args.size // PAGE
    buf = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    if args.register == "madvise":
        buf.madvise(MADV_MERGEABLE)
    pages = np.frombuffer(buf, dtype=np.uint8).reshape(n, PAGE)
    n_dup = int(n * args.dup)
    if n_dup:
        # duplicates within the process: copies of a few template pages
        templates = np.random.default_rng(args.image_seed ^ 0xD0D0).integers(
            0, 256, size=(args.templates, PAGE), dtype=np.uint8)
        pages[n - n_dup:] = templates[np.arange(n_dup) % args.templates]
        n = n - n_dup
    n_zero, n_image = int(n * args.zero), int(n * args.image)
    # zero pages are written once: real zero-filled pages, not the shared zero page
    pages[:n_zero, 0] = 0
    if n_image:
        image = np.random.default_rng(args.image_seed)
        for lo in range(n_zero, n_zero + n_image, 4096):
            hi = min(n_zero + n_image, lo + 4096)
            pages[lo:hi] = image.integers(0, 256, size=(hi - lo, PAGE), dtype=np.uint8)
    private = np.random.default_rng(args.private_seed)
    for lo in range(n_zero + n_image, n, 4096):
        hi = min(n, lo + 4096)
        pages[lo:hi] = private.integers(0, 256, size=(hi - lo, PAGE), dtype=np.uint8)
    stop = threading.Event()
    if args.volatile_hz > 0:
        words = pages[n_zero + n_image:n, :8].view(np.uint64)

        def churn():
            while not stop.wait(1.0 / args.volatile_hz):
                words[:, 0] += np.uint64(1)     # one write per page: its checksum changes
        threading.Thread(target=churn, daemon=True).start()
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "address": address,
                                 "pages": n}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()        # until the parent closes our stdin (or dies)
    stop.set()
    return 0


class Child:
    """A workload process; ``looks_like_qemu`` makes ksmtuned count it as a guest."""

    def __init__(self, name, size, zero=0.0, image=0.0, image_seed=1, private_seed=2,
                 volatile_hz=0.0, register="none", looks_like_qemu=False, dup=0.0, templates=64):
        argv = [sys.executable, os.path.abspath(__file__), "child", "--name", name, "--size",
                str(size), "--dup", str(dup), "--templates", str(templates),
                "--zero", str(zero), "--image", str(image), "--image-seed",
                str(image_seed), "--private-seed", str(private_seed), "--volatile-hz",
                str(volatile_hz), "--register", register]
        env = dict(os.environ)
        if looks_like_qemu:
            # argv[0] is only a name: the interpreter is still sys.executable, which then needs
            # its packages on the path explicitly
            argv = ["qemu-system-x86_64"] + argv[1:] + ["-enable-kvm"]
            env["PYTHONHOME"] = sys.base_prefix
            env["PYTHONPATH"] = os.pathsep.join([REPO] + site.getsitepackages())
        self.name = name
        self.proc = subprocess.Popen(argv, executable=sys.executable, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, start_new_session=True)
        self.info = None

    def wait_ready(self, timeout=300.0) -> dict:
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"workload {self.name} did not start (exit {self.proc.poll()})")
        self.info = json.loads(line)
        return self.info

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


# --- measuring --------------------------------------------------------------------------------------
def proc_cpu(pid: int) -> float | None:
    """utime+stime+cutime+cstime of ``pid`` in seconds (children it waited for included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Saved pages, general_profit, ksmd CPU and the tuner's CPU every ``period`` seconds."""

    def __init__(self, ksm, period=0.1):
        super().__init__(daemon=True)
        self.ksm, self.period = ksm, period
        self.samples = []
        self.tool_pids: list[int] = []
        self._tool_cpu_last: dict[int, float] = {}
        self._halt = threading.Event()
        self.t0 = time.monotonic()
        self.ksmd0 = ksm.ksmd_cpu_seconds()

    def tool_cpu(self) -> float:
        for pid in self.tool_pids:
            cpu = proc_cpu(pid)
            if cpu is not None:
                self._tool_cpu_last[pid] = cpu    # keep the last value once the process is gone
        return sum(self._tool_cpu_last.values())

    def sample(self):
        s = self.ksm.stats()
        self.samples.append({"t": time.monotonic() - self.t0, "saved_pages": s.saved_pages,
                             "saved_bytes": s.saved_bytes, "pages_sharing": s.pages_sharing,
                             "ksm_zero_pages": s.ksm_zero_pages, "full_scans": s.full_scans,
                             "ksmd_cpu": self.ksm.ksmd_cpu_seconds() - self.ksmd0,
                             "tool_cpu": self.tool_cpu(),
                             "knobs": {k: self.ksm.get(k) for k in WATCHED}})

    def run(self):
        while not self._halt.wait(self.period):
            self.sample()

    def halt(self):
        self._halt.set()
        self.join()
        self.sample()


# --- the host scenario ----------------------------------------------------------------------------
#: Layout of each "VM" buffer, in this order: zero pages, the image shared by both VMs, private pages.
VM_ZERO, VM_IMAGE = 0.10, 0.75


def vm_pair(size: int, **common) -> list[Child]:
    """The two "VMs" booted from one image (also used by bench_ksmd_rate.py)."""
    return [Child("vm-a", size, zero=VM_ZERO, image=VM_IMAGE, image_seed=7, private_seed=11, **common),
            Child("vm-b", size, zero=VM_ZERO, image=VM_IMAGE, image_seed=7, private_seed=12, **common)]


class Synthetic:
    """The synthetic scenario (see the module's docstring): ``start()``, ``describe()``,
    ``candidate_names()`` are what :class:`realhost.RealHost` offers too; every peer runs either
    through the same code."""

    name = "synthetic"

    def __init__(self, scale: float):
        self.scale, self.notes = scale, []

    def size(self, mib):
        return max(16, int(mib * self.scale)) * MiB

    def start(self, register: str, qemu: bool, log) -> list[Child]:
        common = dict(register=register, looks_like_qemu=qemu)
        kids = vm_pair(self.size(512), **common) + [
            Child("db-c", self.size(768), private_seed=13, **common),
            Child("calc-d", self.size(512), private_seed=14, volatile_hz=4.0, **common)]
        try:
            for k in kids:
                k.wait_ready()
        except BaseException:
            for k in kids:
                k.stop()
            raise
        return kids

    def describe(self) -> str:
        mib = lambda m: self.size(m) // MiB  # noqa: E731
        return (f"vm-a, vm-b {mib(512)} MiB each (75 % shared image, 10 % zero, 15 % private), "
                f"db-c {mib(768)} MiB unique, calc-d {mib(512)} MiB volatile (rewritten at 4 Hz)")

    def candidate_names(self, kids) -> list[str]:
        return [k.name for k in kids]

    def close(self) -> None:
        pass


def make_scenario(args, log):
    if args.scenario == "realhost":
        from realhost import RealHost
        return RealHost(args.scale, Child, log, install=not args.no_install,
                        programs=args.programs.split(","))
    return Synthetic(args.scale)


WATCHED = ("run", "pages_to_scan", "sleep_millisecs", "advisor_mode", "smart_scan")
BASELINE = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "smart_scan": 1,
            "use_zero_pages": 0, "advisor_mode": "none", "advisor_max_cpu": 70,
            "advisor_min_pages_to_scan": 500, "advisor_max_pages_to_scan": 30000,
            "advisor_target_scan_time": 200}


_LOCKING = True     # --no-lock: the caller (a test holding the suite's lock) keeps others out


def ksm_lock():
    from udedup.ksm import experiment_lock   # not at import: the workload children start lean
    return experiment_lock(enabled=_LOCKING)


def fresh_start(ksm, knobs: dict) -> None:
    """Nothing merged, no stale rmap items, kernel-default knobs, then the peer's own."""
    ksm.set("advisor_mode", "none")
    ksm.set("run", 2)
    for name, value in BASELINE.items():
        if name in ksm.knob_names():
            ksm.set(name, value)
    if knobs.get("advisor_mode") == "scan-time":
        ksm.set("advisor_mode", "scan-time")
    for name, value in knobs.items():
        if name not in ("advisor_mode", "run"):
            ksm.set(name, value)
    if "run" in knobs:
        ksm.set("run", knobs["run"])


def start_children(args, register, qemu, log) -> list:
    kids = args.workload.start(register, qemu, log)
    log(f"  workload ready: {', '.join(f'{k.name}={k.pid}' for k in kids)}")
    return kids


def run_peer(ksm, name, args, log, achievable_pages, **kw) -> tuple[dict, list]:
    """:func:`run_peer_once`, run again once if another program changed the knobs meanwhile (the
    test suites of this project reset knobs when their sessions end)."""
    out, samples = run_peer_once(ksm, name, args, log, achievable_pages, **kw)
    if "KNOBS CHANGED" in out.get("note", ""):
        log(f"  {name}: run again")
        out, samples = run_peer_once(ksm, name, args, log, achievable_pages, **kw)
    return out, samples


def run_peer_once(ksm, name, args, log, achievable_pages, register="prctl", knobs=None, tool=None,
                  until_settled=False) -> tuple[dict, list]:
    """One peer on fresh processes; ``tool(children, sampler) -> stop()`` starts the tuner."""
    with ksm_lock():
        # put the knobs back before the lock goes: a test session or experiment starting between
        # two peers must find them as they were, not at this peer's values
        snap = ksm.snapshot()
        kids = start_children(args, register, qemu=(name == "ksmtuned"), log=log)
        stop_tool = None
        try:
            fresh_start(ksm, knobs or {})
            sampler = Sampler(ksm)
            note = ""
            if tool is not None:
                stop_tool, note = tool(kids, sampler)
            sampler.start()
            deadline = time.monotonic() + (args.reference_timeout if until_settled else args.window)
            while time.monotonic() < deadline:
                time.sleep(0.5)
                if until_settled and settled(sampler.samples):
                    break
            quiet = None
            if not until_settled and args.idle_window > 0 and name in args.idle_peers.split(","):
                # the quiet window: the same processes, nothing new to merge; what keeps running
                sampler.sample()
                quiet = len(sampler.samples) - 1
                time.sleep(args.idle_window)
            sampler.halt()
        finally:
            if stop_tool is not None:
                stop_tool()
            for k in kids:
                k.stop()
            ksm.set("advisor_mode", "none")
            ksm.set("run", 2)
            ksm.restore(snap)
    samples = sampler.samples
    idle = idle_cost(samples, quiet) if quiet is not None else {}
    if quiet is not None:
        samples = samples[:quiet + 1]
    if tool is None and samples:
        # nothing of ours tunes these peers: any change is another program's, and spoils the run
        # (under the advisor, pages_to_scan is the kernel's to change)
        seen = {json.dumps({k: v for k, v in x["knobs"].items()
                            if not (k == "pages_to_scan" and x["knobs"]["advisor_mode"] == "scan-time")},
                           sort_keys=True) for x in samples}
        if len(seen) > 1:
            log(f"  WARNING: knobs changed during {name} by someone else: {sorted(seen)}")
            samples[-1]["foreign_knob_change"] = True
    if achievable_pages is None:
        achievable_pages = samples[-1]["saved_pages"]
    out = summarize(name, samples, achievable_pages, note)
    out.update(idle)
    if samples and samples[-1].get("foreign_knob_change"):
        out["note"] = (out["note"] + "; " if out["note"] else "") + "KNOBS CHANGED BY ANOTHER PROGRAM DURING THIS RUN"
    return out, samples


def settled(samples) -> bool:
    """Saved pages steady (within 0.1 %) over the last two full scans, four scans at least: a
    half-second look is not enough where a full scan of a real host takes longer."""
    if not samples or samples[-1]["full_scans"] < 4:
        return False
    b = samples[-1]
    a = next(x for x in samples if x["full_scans"] >= b["full_scans"] - 2)
    return b["full_scans"] - a["full_scans"] >= 2 and \
        abs(b["saved_pages"] - a["saved_pages"]) <= max(2, b["saved_pages"] // 1000)


def ksmtuned_tool(workdir, log):
    path = shutil.which("ksmtuned") or ("/usr/sbin/ksmtuned" if os.path.exists("/usr/sbin/ksmtuned") else None)

    def start(kids, sampler):
        pidfile = os.path.join(workdir, "ksmtuned.pid")
        total_kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        committed_kb = sum(k.info["pages"] for k in kids) * PAGE // 1024
        # ksmtuned starts ksmd only when guests commit memory within KSM_THRES_COEF % of the total;
        # model a host whose guests commit most of its RAM: the threshold just below what is left
        coef = max(20, min(99, int(100 * (total_kb - committed_kb) / total_kb) + 2))
        env = dict(os.environ, PIDFILE=pidfile, KSM_THRES_COEF=str(coef))
        subprocess.run([path], env=env, check=True, start_new_session=True, timeout=10)
        pid = int(open(pidfile).read())
        sampler.tool_pids.append(pid)
        time.sleep(0.2)
        os.kill(pid, signal.SIGUSR1)   # as libvirt does when a guest starts: retune now

        def stop():
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        return stop, (f"Debian ksmtuned {path}, KSM_THRES_COEF={coef} (default 20: see note), "
                      "KSM_MONITOR_INTERVAL=60 (default), SIGUSR1 at start")
    return start if path else None


def ksmtuned_default_check(ksm, workdir, args, log) -> str:
    """What stock ksmtuned does with this workload on this host: a few seconds suffice."""
    path = shutil.which("ksmtuned") or "/usr/sbin/ksmtuned"
    with ksm_lock():
        snap = ksm.snapshot()
        kids = start_children(args, "prctl", True, log)
        pid = None
        try:
            fresh_start(ksm, {"run": 1})
            pidfile = os.path.join(workdir, "ksmtuned-default.pid")
            subprocess.run([path], env=dict(os.environ, PIDFILE=pidfile), check=True,
                           start_new_session=True, timeout=10)
            pid = int(open(pidfile).read())
            time.sleep(0.3)
            os.kill(pid, signal.SIGUSR1)
            time.sleep(3.0)
            run = ksm.get("run")
        finally:
            if pid:
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
            for k in kids:
                k.stop()
            ksm.set("run", 2)
            ksm.restore(snap)
    return (f"stock ksmtuned (KSM_THRES_COEF=20) on this host with this workload set run={run} "
            "within 3 s of SIGUSR1" + (" (it stops ksmd: the guests commit far less than 80 % "
                                       "of RAM)" if run == 0 else ""))


def floor_tool(log):
    """Register exactly the ranges the estimator says hold the saving, then run ksmd flat out."""
    def start(kids, sampler):
        from udedup import inject
        from udedup.estimate import estimate
        from udedup.ksm import Ksm
        est = estimate([k.pid for k in kids], passes=2, interval=0.5, all_eligible=True,
                       recheck="candidates")
        pages = 0
        for t in est.targets:
            if t.saving_ranges:
                inject.enable(t.pid, mode="madvise", ranges=t.saving_ranges)
                pages += t.range_pages
        Ksm().set("run", 1)
        return (lambda: None), (f"saving ranges only ({pages} pages, estimator not counted), "
                                "pages_to_scan=10000 sleep_millisecs=0: the ksmd cost of the merge itself")
    return start


def udedup_tool(workdir, args, log, injection: bool):
    def start(kids, sampler):
        cfg = os.path.join(workdir, "udedup.toml")
        names = ", ".join(f'"{n}"' for n in args.workload.candidate_names(kids))
        with open(cfg, "w") as f:
            f.write(f"[candidates]\nnames = [{names}]\n"
                    f"[registration]\nallow_injection = {'true' if injection else 'false'}\n"
                    f"[metrics]\naddress = \"\"\n"
                    f"[daemon]\nstate_file = \"{workdir}/state.json\"\ninterval = {args.interval}\n")
        err = open(os.path.join(workdir, "daemon.log"), "w")
        prof = ["-m", "cProfile", "-o", args.daemon_profile] if args.daemon_profile else []
        proc = subprocess.Popen([sys.executable, *prof, "-m", "udedup", "daemon", "--config", cfg, "-v"],
                                cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stderr=err,
                                stdout=subprocess.DEVNULL, start_new_session=True)
        sampler.tool_pids.append(proc.pid)

        def stop():
            # sample its CPU one last time, then let it restore what it changed
            sampler.tool_cpu()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            err.close()
        return stop, (("UNDER cProfile (CPU figures inflated); " if prof else "") +
                      f"udedup daemon, defaults except candidates.names and "
                      f"registration.allow_injection={str(injection).lower()}, interval {args.interval}s; "
                      + ("workload started unregistered" if injection else
                         "workload started registered (udedup run): no injection available"))
    return start


PEERS = ("reference", "default", "ksmtuned", "advisor", "udedup", "floor")
PROGRAMS = ("java", "node", "redis", "python", "qemu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    c = sub.add_parser("child")
    c.add_argument("--name", required=True)
    c.add_argument("--size", type=int, required=True)
    c.add_argument("--dup", type=float, default=0.0, help="fraction copied from --templates pages")
    c.add_argument("--templates", type=int, default=64)
    c.add_argument("--zero", type=float, default=0.0, help="fraction of zero pages (of the rest)")
    c.add_argument("--image", type=float, default=0.0)
    c.add_argument("--image-seed", type=int, default=1)
    c.add_argument("--private-seed", type=int, default=2)
    c.add_argument("--volatile-hz", type=float, default=0.0)
    c.add_argument("--register", choices=("none", "prctl", "madvise"), default="none")
    parser.add_argument("--scale", type=float, default=1.0, help="workload size multiplier (1 = 2.25 GiB)")
    parser.add_argument("--window", type=float, default=150.0, help="seconds each peer runs")
    parser.add_argument("--reference-timeout", type=float, default=120.0)
    parser.add_argument("--interval", type=float, default=10.0, help="daemon.interval for udedup")
    parser.add_argument("--peers", default="reference,default,ksmtuned,advisor,udedup,floor")
    parser.add_argument("--scenario", choices=("synthetic", "realhost"), default="synthetic",
                        help="synthetic workload processes, or real programs (scripts/realhost.py)")
    parser.add_argument("--idle-window", type=float, default=20.0,
                        help="seconds of quiet after each tuner's window, for its idle cost "
                             "(default 20; the issue's figure is 600)")
    parser.add_argument("--idle-peers", default="default,ksmtuned,advisor,udedup",
                        help="the peers whose idle cost is measured (default: every tuner)")
    parser.add_argument("--daemon-profile", metavar="PATH",
                        help="run the udedup daemon under cProfile, its profile written to PATH")
    parser.add_argument("--no-install", action="store_true",
                        help="realhost: do not apt-get install missing programs")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help=f"realhost: which programs to start (default {','.join(PROGRAMS)})")
    parser.add_argument("--out", help="also write the report here (and JSON next to it)")
    parser.add_argument("--no-lock", action="store_true",
                        help="do not take the KSM experiment lock (the caller holds it already)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "-enable-kvm"]  # see Child
    args = parser.parse_args(argv)
    if args.cmd == "child":
        return child_main(args)
    peers = args.peers.split(",")
    for opt, given, known in (("--peers", peers, PEERS), ("--programs", args.programs.split(","), PROGRAMS)):
        unknown = set(given) - set(known)
        if unknown:
            print(f"{opt}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}",
                  file=sys.stderr)
            return 2
    global _LOCKING
    _LOCKING = not args.no_lock
    if args.daemon_profile:
        args.daemon_profile = os.path.abspath(args.daemon_profile)

    from udedup.ksm import Ksm
    ksm = Ksm()
    snap = ksm.snapshot()
    workdir = tempfile.mkdtemp(prefix="udedup-bench-")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    args.workload = make_scenario(args, log)
    results, series, notes = [], {}, list(args.workload.notes)
    achievable = predicted = None
    try:
        injection = True
        try:
            importlib.import_module("udedup.inject")
        except Exception as err:  # noqa: BLE001 - any failure means: no injection here
            injection = False
            notes.append(f"udedup: injection unavailable ({err}); its workload started registered")
        # reference first: it defines the achievable saving
        log("reference (everything registered, 10000 pages / 0 ms, smart_scan=0)")
        with ksm_lock():
            kids = start_children(args, "prctl", False, log)
            try:
                from udedup.estimate import estimate
                est = estimate([k.pid for k in kids], passes=2, interval=0.5, all_eligible=True)
                predicted = est.predicted(use_zero_pages=False).saved_pages
            finally:
                for k in kids:
                    k.stop()
        r, s = run_peer(ksm, "reference", args, log, None,
                        knobs={"run": 1, "pages_to_scan": 10000, "sleep_millisecs": 0, "smart_scan": 0},
                        until_settled=True)
        achievable = s[-1]["saved_pages"]
        spoiled = "KNOBS CHANGED" in r.get("note", "")
        r = summarize("reference", s, achievable, "every process registered; settled counters define "
                      "the achievable saving" + ("; KNOBS CHANGED BY ANOTHER PROGRAM" if spoiled else ""))
        results.append(r)
        series["reference"] = s
        log(f"  achievable {achievable * PAGE / MiB:.1f} MiB in {r['window_s']:.1f} s")
        for peer in peers:
            if peer == "reference":
                continue
            log(peer)
            if peer == "default":
                r, s = run_peer(ksm, peer, args, log, achievable, knobs={"run": 1})
                r["note"] = "every process registered (KSM on everything), kernel-default knobs"
            elif peer == "advisor":
                r, s = run_peer(ksm, peer, args, log, achievable,
                                knobs={"advisor_mode": "scan-time", "run": 1})
                r["note"] = "every process registered, advisor_mode=scan-time with its defaults"
            elif peer == "ksmtuned":
                tool = ksmtuned_tool(workdir, log)
                if tool is None:
                    notes.append("ksmtuned: not installed (apt-get install -y ksmtuned); not measured")
                    continue
                notes.append("ksmtuned: " + ksmtuned_default_check(ksm, workdir, args, log))
                r, s = run_peer(ksm, peer, args, log, achievable, tool=tool)
            elif peer == "floor":
                r, s = run_peer(ksm, peer, args, log, achievable, register="none",
                                knobs={"pages_to_scan": 10000, "sleep_millisecs": 0, "smart_scan": 1},
                                tool=floor_tool(log), until_settled=True)
            elif peer == "udedup":
                r, s = run_peer(ksm, peer, args, log, achievable,
                                register="none" if injection else "prctl",
                                tool=udedup_tool(workdir, args, log, injection))
                with open(os.path.join(workdir, "daemon.log")) as f:
                    daemon_log = f.read()
                if args.out:        # the whole log beside the report, for what the notes leave out
                    with open(os.path.splitext(args.out)[0] + ".daemon.log", "w") as f:
                        f.write(daemon_log)
                notes.append("udedup daemon log (decisions):")
                notes += ["  " + line for line in daemon_log.splitlines()
                          if any(w in line for w in ("register", "fast", "slow", "stopped", "not-worth",
                                                     "skip", "set", "estimate", "restored"))][:40]
            else:
                raise SystemExit(f"unknown peer {peer!r}")
            results.append(r)
            series[peer] = s
            log(f"  t95 {fmt(r.get('t95_s'), 's')}, CPU@95 {fmt(r.get('cpu95_s'), 's', 2)}, "
                f"saved {fmt(r.get('final_saved_mib'), ' MiB')}, CPU(window) {fmt(r.get('cpu_s_window'), 's', 2)}")
    finally:
        with contextlib.suppress(Exception):
            ksm.set("advisor_mode", "none")
            ksm.unmerge_all()
        ksm.restore(snap)
        shutil.rmtree(workdir, ignore_errors=True)
        args.workload.close()
    text = report(results, series, achievable or 0, predicted, notes, args)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"results": results, "series": series, "achievable_pages": achievable,
                       "predicted_pages": predicted, "notes": notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
