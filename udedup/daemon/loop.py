"""``udedup daemon``: the host daemon's loop, its I/O, and its promises about the knobs.

The decisions are :mod:`udedup.policy`'s; this module observes (``/proc``, KSM sysfs, memory
pressure), acts (estimates, registrations, knob writes) and keeps these promises:

- signals only set flags (a wakeup fd interrupts the wait), the loop is
  ``while not signals.wait(timeout)``; SIGHUP reloads the configuration, SIGTERM/SIGINT end the loop;
- every knob the daemon wrote is put back on exit (``daemon.on_exit = "restore"``), unless someone
  else changed it meanwhile: their value wins, and is reported;
- the original values sit in a state file before the first write, so the next start after a crash
  or SIGKILL restores them;
- a startup self-test writes every knob it will manage to its current value and reads it back, so
  a missing privilege fails at start, not in the middle of the night;
- systemd ``Type=notify``: READY, STATUS with the savings, WATCHDOG, RELOADING, STOPPING, over the
  NOTIFY_SOCKET datagram socket (no libsystemd).
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, replace

from .config import Config
from ..ksm.controller import RMAP_ITEM_BYTES
from ..errors import (DaemonError, KernelThreadError, KsmError, KsmPermissionError, ProcessAccessError,
                     ProcessNotFoundError, UdedupError)
from .policy import (EstimateResult, Memory, Observation, Plan, Policy, ProcessInfo, _mib,
                     match_process)

log = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_STATE_FILE = Config().daemon.state_file   # the one default lives in config
#: Knob write order: the speed first, ``run`` last so ksmd starts with its final settings.
WRITE_ORDER = ("use_zero_pages", "sleep_millisecs", "pages_to_scan", "run")


# --- systemd notification ---------------------------------------------------------------------------
class SdNotify:
    """sd_notify(3) without libsystemd: one datagram per message to ``$NOTIFY_SOCKET``."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or ""
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else (addr or None)
        usec, wpid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        self.watchdog_seconds = None
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self._sock = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                # non-blocking: a datagram socket whose reader lags blocks the sender once ten
                # messages queue up, and the daemon must never stall on its supervisor
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as err:
            # systemd gone, lagging, or the socket not ours to use: the daemon keeps working
            log.debug("sd_notify %s failed: %s", lines[0] if lines else "", err)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# --- signals ----------------------------------------------------------------------------------------
class Signals:
    """Handlers only set flags; the C-level wakeup fd makes :meth:`wait` return at once."""

    def __init__(self):
        self.stop = False
        self.reload = False
        self.signame: str | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old: dict = {}
        self._old_fd = None

    def install(self) -> None:
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._on_stop)
        self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum, frame) -> None:
        self.stop = True
        self.signame = signal.Signals(signum).name

    def _on_reload(self, signum, frame) -> None:
        self.reload = True

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until a signal; True when asked to stop."""
        if not (self.stop or self.reload):
            try:
                select.select([self._r], [], [], max(0.0, timeout))
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                pass
        try:
            while self._r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        return self.stop

    def take_reload(self) -> bool:
        wanted, self.reload = self.reload, False
        return wanted

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
            self._old_fd = None
        self._r.close()
        self._w.close()


# --- observing the host -----------------------------------------------------------------------------
def _read(path: str, binary: bool = False):
    try:
        with open(path, "rb" if binary else "r") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _stat_fields(procfs: str, pid: int) -> tuple[str, list[str]] | None:
    text = _read(os.path.join(procfs, str(pid), "stat"))
    if not text or ")" not in text:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    return comm, text[text.rindex(")") + 2:].split()


def process_start_time(pid: int, procfs: str = "/proc") -> int | None:
    """starttime (stat field 22, clock ticks since boot): a pid plus this names one process."""
    got = _stat_fields(procfs, pid)
    return int(got[1][19]) if got else None


def discover_processes(procfs: str = "/proc", exclude_pid: int | None = None,
                       min_anon_rss: int = 0) -> list[ProcessInfo]:
    """Every user process with what candidate matching needs (no smaps: that is per candidate).

    Processes with less than ``min_anon_rss`` anonymous resident bytes, never candidates, are
    left out before their cmdline, exe, cgroup and ksm_stat are read: on most hosts that is most
    processes, and this walk runs every round."""
    from ..ksm.process import parse_ksm_stat
    from ..host.procmem import PF_KTHREAD

    out = []
    try:
        entries = os.listdir(procfs)
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit() or int(entry) == exclude_pid:
            continue
        pid = int(entry)
        base = os.path.join(procfs, entry)
        got = _stat_fields(procfs, pid)
        if got is None:
            continue
        comm, fields = got
        if int(fields[6]) & PF_KTHREAD or fields[0] in ("Z", "X"):
            continue
        status = _read(os.path.join(base, "status")) or ""
        uid, anon = 0, 0
        for line in status.splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
        if anon < min_anon_rss:
            continue
        raw = _read(os.path.join(base, "cmdline"), binary=True) or b""
        cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        try:
            exe = os.readlink(os.path.join(base, "exe"))
        except OSError:
            exe = ""
        cgroup = ""
        for line in (_read(os.path.join(base, "cgroup")) or "").splitlines():
            if line.startswith("0::"):
                cgroup = line[3:]
        ksm = parse_ksm_stat(_read(os.path.join(base, "ksm_stat")) or "")
        out.append(ProcessInfo(
            pid=pid, start_time=int(fields[19]), name=comm, cmdline=cmdline, exe=exe, uid=uid,
            cgroup=cgroup, anon_rss=anon, merge_any=ksm.get("ksm_merge_any") is True,
            mergeable=ksm.get("ksm_mergeable") is True,
            ksm_merging_pages=int(ksm.get("ksm_merging_pages", 0) or 0),
            ksm_profit=int(ksm.get("ksm_process_profit", 0) or 0)))
    return out


def with_mappings(info: ProcessInfo, procfs: str = "/proc") -> tuple[ProcessInfo | None, list]:
    """(``info`` plus registered and eligible resident bytes from smaps, the mappings); (None, [])
    if it exited; ProcessAccessError if we may not read it."""
    from ..host.procmem import read_mappings

    try:
        maps = read_mappings(info.pid, procfs)
    except (ProcessNotFoundError, KernelThreadError):
        return None, []
    registered = sum(m.anonymous for m in maps if m.registered)
    eligible = sum(m.anonymous for m in maps if m.eligible)
    return replace(info, registered_bytes=registered, eligible_bytes=eligible), maps


def read_memory(procfs: str = "/proc") -> Memory | None:
    info = {}
    for line in (_read(os.path.join(procfs, "meminfo")) or "").splitlines():
        name, _, rest = line.partition(":")
        if rest.strip():
            info[name] = int(rest.split()[0]) * 1024
    if "MemTotal" not in info:
        return None
    psi = None
    for line in (_read(os.path.join(procfs, "pressure", "memory")) or "").splitlines():
        if line.startswith("some "):
            for part in line.split()[1:]:
                key, _, value = part.partition("=")
                if key == "avg10":
                    psi = float(value)
    return Memory(total=info["MemTotal"], available=info.get("MemAvailable", info.get("MemFree", 0)),
                  psi_some_avg10=psi)


# --- the state file ---------------------------------------------------------------------------------
def _pid_is(pid: int, start_time, procfs: str = "/proc") -> bool:
    return bool(pid) and start_time is not None and process_start_time(pid, procfs) == start_time


def read_daemon_state(path: str = DEFAULT_STATE_FILE, procfs: str = "/proc") -> dict | None:
    """The running daemon's view for ``udedup status``: None without a readable state file.

    The dict has ``running`` (the writer is alive), ``pid``, ``mode``, ``saved_bytes``,
    ``predicted_bytes``, ``realized_bytes``, ``processes`` (per candidate: predicted and realized
    savings and the last decision), ``original_knobs``, ``written_knobs``, ``metrics_url``...
    """
    text = _read(path)
    if text is None:
        return None
    try:
        state = json.loads(text)
    except ValueError:
        return None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        return None
    state["running"] = _pid_is(state.get("pid", 0), state.get("pid_start_time"), procfs)
    return state


def describe_daemon_state(state: dict | None) -> list[str]:
    """Lines for ``udedup status``: the daemon's mode, savings and per-process decisions."""
    if state is None:
        return ["udedup daemon: not running (no state file)"]
    if not state.get("running"):
        return [f"udedup daemon: not running; state left by pid {state.get('pid')} (it did not exit "
                "cleanly: the next start restores the knobs it changed: "
                f"{_fmt_knobs(state.get('written_knobs') or {}) or 'none'})"]
    lines = [f"udedup daemon: pid {state['pid']}{' (dry run)' if state.get('dry_run') else ''}, "
             f"{state.get('mode')}: {state.get('mode_reason')}",
             f"  predicted {_mib(state.get('predicted_bytes') or 0)}, realized "
             f"{_mib(state.get('realized_bytes') or 0)}, machine saving {_mib(state.get('saved_bytes') or 0)}"
             + (f"; ksmd {state['ksmd_cpu_percent']:.1f}% CPU" if state.get("ksmd_cpu_percent") is not None else ""),
             f"  knobs it changed: {_fmt_knobs(state.get('written_knobs') or {}) or 'none'}"
             + (f"; left to others: {_fmt_knobs(state['yielded_knobs'])}" if state.get("yielded_knobs") else "")]
    if state.get("metrics_url"):
        lines.append(f"  metrics: {state['metrics_url']}")
    for p in state.get("processes") or []:
        pred = p.get("predicted_saved_bytes")
        lines.append(f"  {p['pid']:>7} {p['name'][:16]:16} predicted "
                     f"{_mib(pred) if pred is not None else '?':>11} realized "
                     f"{_mib(p.get('realized_saved_bytes') or 0):>11}  {p.get('decision') or ''}")
    return lines


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _in_write_order(names) -> list:
    return sorted(names, key=lambda n: WRITE_ORDER.index(n) if n in WRITE_ORDER else -1)


def restore_knobs(ksm, original: dict, written: dict) -> tuple[dict, dict]:
    """Put back ``original`` values of the knobs in ``written`` that still hold what we wrote.

    Returns (restored {knob: value}, left {knob: current value changed by someone else}).
    """
    restored, left = {}, {}
    try:
        current = ksm.knobs()
    except KsmError as err:
        log.error("cannot read the KSM knobs to restore them: %s", err)
        return restored, left
    first_error = None
    for name in _in_write_order(written):
        if name not in original or name not in current:
            continue
        if current[name] != written[name]:
            left[name] = current[name]
            continue
        if name == "pages_to_scan" and current.get("advisor_mode") == "scan-time":
            left[name] = current[name]  # the advisor owns it now
            continue
        try:
            ksm.set(name, original[name])
            restored[name] = original[name]
        except KsmError as err:
            log.error("could not restore %s=%r: %s", name, original[name], err)
            first_error = first_error or err
    if first_error is not None:
        raise first_error
    return restored, left


# --- estimation and registration adapters ---------------------------------------------------------
def estimate_processes(infos, cfg: Config, use_zero_pages: bool, now: float) -> dict:
    """One joint estimate (duplicates across processes count) -> {key: EstimateResult | str error}."""
    from ..estimate import core as estimate_mod

    e, r = cfg.estimate, cfg.registration
    pids = [i.pid for i in infos]
    results: dict = {}
    try:
        # threads=1: a daemon is judged by its CPU, not by how soon an estimate ends; the read-ahead
        # thread buys wall time for CPU (0.47 against 0.40 CPU-s for the benchmark's two VMs)
        est = estimate_mod.estimate(pids, passes=e.passes, interval=e.pass_interval,
                                    all_eligible=True, recheck=e.recheck, range_gap=r.range_gap,
                                    max_ranges=r.max_ranges, threads=1)
    except UdedupError as err:
        if len(infos) == 1:
            return {infos[0].key: str(err)}
        # one bad process must not stop the others: estimate them one by one
        for info in infos:
            results.update(estimate_processes([info], cfg, use_zero_pages, now))
        return results
    per_pid = _per_process(est, pids, use_zero_pages, by_ranges=r.granularity == "ranges")
    for info in infos:
        got = per_pid.get(info.pid)
        if got is None:
            results[info.key] = "exited during the estimate"
            continue
        saved, scanned, ranges, range_bytes = got
        pct = 100.0 * saved / scanned if scanned else 0.0
        results[info.key] = EstimateResult(at=now, saved_bytes=int(saved), scanned_bytes=int(scanned),
                                           saved_percent=pct, ranges=ranges, range_bytes=range_bytes)
    return results


def screen_processes(infos, cfg: Config, now: float, seed: int = 0, mappings=None) -> dict:
    """{key: EstimateResult} for the processes a sample rules out (see udedup.screen); the others
    are left for the full estimate. Nothing is ruled out when screening is off, when the threshold
    is so low that the sample would be most of the memory, or when the sample fails."""
    from ..estimate import screen as screen_mod

    r = cfg.registration
    if not cfg.estimate.screen or r.min_saving <= 0 or not infos:
        return {}
    rate = screen_mod.rate_for(r.min_saving)
    if rate > 0.25:
        return {}
    try:
        sampled = screen_mod.screen([i.pid for i in infos], rate, seed=seed,
                                    procfs=cfg.daemon.procfs, mappings=mappings)
    except UdedupError as err:
        log.info("screen failed (%s): estimating in full", err)
        return {}
    out = {}
    for info in infos:
        got = sampled.get(info.pid)
        if not isinstance(got, screen_mod.ScreenResult) or got.sampled_pages == 0:
            continue    # errors and empty samples: the full estimate decides and reports
        ps = screen_mod.pages.PAGE_SIZE
        present = got.present_pages * ps
        threshold = max(r.min_saving, r.min_saving_percent / 100.0 * present)
        bound = got.bound_pages * ps
        if bound >= 0.5 * threshold:
            continue
        out[info.key] = EstimateResult(
            at=now, saved_bytes=int(bound), scanned_bytes=int(present),
            saved_percent=100.0 * bound / present if present else 0.0,
            screened=(f"screened: {got.sampled_pages} sampled pages of {got.present_pages}, "
                      f"{got.zero_pages} zero, {got.twin_pages} with a twin"))
    return out


def _per_process(est, pids, use_zero_pages: bool, by_ranges: bool = False) -> dict:
    """{pid: (predicted saved bytes, scanned bytes, saving ranges, resident bytes in them)} from an
    Estimate's per-target attribution.

    The estimator splits each duplicate group's saving among the processes holding it, so the
    shares add up to the joint prediction. Each share pays 64 bytes of rmap item per page ksmd
    would scan, as general_profit does: the pages of the saving ranges when only those get
    registered (``by_ranges``), else every scanned page; zero pages merged into the shared zero
    page (use_zero_pages) give theirs back.
    """
    k = int(bool(use_zero_pages))
    ps = est.page_size
    per = {}
    for t in est.targets:
        if getattr(t, "kind", "process") != "process" or t.exited:
            continue
        readable = t.scanned_pages - t.unreadable_pages
        ranges = tuple(tuple(x) for x in getattr(t, "saving_ranges", ()) or ())
        range_pages = int(getattr(t, "range_pages", 0) or 0)
        scanned_by_ksmd = range_pages if by_ranges and ranges else readable
        rmap = scanned_by_ksmd - (t.zero_pages if use_zero_pages else 0)
        saved = t.saved_pages[k] * ps - rmap * RMAP_ITEM_BYTES
        per[int(t.pid)] = (saved, readable * ps, ranges, range_pages * ps)
    return per


def register_process(info: ProcessInfo, mode: str, ranges=None) -> tuple[bool, str]:
    from ..inject import core as inject

    try:
        result = inject.enable(info.pid, mode=mode, ranges=list(ranges) if ranges else None)
    except UdedupError as err:
        return False, str(err)
    how = str(getattr(result, "mode", mode))
    if ranges:
        how += f", {len(ranges)} range{'s' if len(ranges) != 1 else ''}"
    return True, how


# --- the daemon -------------------------------------------------------------------------------------
#: How often the counters are checked while ksmd bursts (see Daemon._burst_progress).
BURST_WATCH_SECONDS = 0.1


@dataclass
class Options:
    dry_run: bool = False
    once: bool = False


class Daemon:
    def __init__(self, cfg: Config, loader=None, options: Options | None = None, env=None,
                 clock=time.monotonic):
        self.cfg = cfg
        self.loader = loader                # () -> Config, for SIGHUP
        self.opts = options or Options()
        self.clock = clock
        self.notify = SdNotify(env)
        self.signals = Signals()
        self.policy = Policy(cfg, now=clock())
        self.ksm = None
        self.original: dict = {}
        self.state_path = cfg.daemon.state_file
        self.metrics = None
        self.collector = None
        self.metrics_url = None
        self.rounds = 0
        self.knob_writes = 0
        self.external_changes = 0
        self.started_wall = time.time()
        self._last_plan: Plan | None = None
        self._last_obs: Observation | None = None
        self._dry_logged: dict = {}
        self._unreadable: set = set()          # candidates we were refused: reported once
        self._mappings: dict = {}               # key -> (ProcessInfo with smaps figures, when read)
        self._own_start = process_start_time(os.getpid())

    # --- lifecycle
    def run(self) -> int:
        from ..ksm.controller import Ksm

        self.signals.install()
        try:
            self.ksm = Ksm(self.cfg.daemon.ksm_root, procfs=self.cfg.daemon.procfs)
            if not self.opts.dry_run:
                self._take_over_state_file()
            self.original = self.ksm.knobs()
            if not self.opts.dry_run:
                self._write_state()
                self._self_test()
            else:
                log.info("dry run: deciding and logging only, no knob, registration or state file "
                         "is written")
            self._start_metrics()
            if self.policy.cfg.registration.allow_injection:
                log.info("registration.allow_injection is on: worthwhile running processes will be "
                         "opted in through ptrace (needs CAP_SYS_PTRACE)")
            self._round()
            self.notify.send("READY=1", f"STATUS={self._status_line()}", f"MAINPID={os.getpid()}")
            log.info("udedup daemon ready (pid %d, interval %gs%s)", os.getpid(),
                     self.cfg.daemon.interval, ", dry run" if self.opts.dry_run else "")
            if not self.opts.once:
                self._loop()
        finally:
            self._shutdown()
        return 0

    def _interval(self) -> float:
        """Seconds to the next round: shorter while ksmd scans fast, so that it slows down soon
        after the saving is realized (a fast scan costs CPU for every second it runs on)."""
        d = self.cfg.daemon
        return min(d.interval, d.fast_interval) if self.policy.mode == "fast" else d.interval

    def _loop(self) -> None:
        next_round = self.clock() + self._interval()
        next_watch = float("inf")
        wd = self.notify.watchdog_seconds
        next_ping = self.clock() + wd / 2 if wd else float("inf")
        while not self.signals.wait(max(0.0, min(next_round, next_ping, next_watch) - self.clock())):
            if self.signals.take_reload():
                self._reload()
            now = self.clock()
            if now >= next_ping:
                self.notify.send("WATCHDOG=1")
                next_ping = now + wd / 2
            if now >= next_watch and self._burst_progress():
                next_round = now
            if now >= next_round:
                self._round()
                # skip missed rounds rather than running them back to back
                next_round = max(next_round + self._interval(), self.clock() + 0.05)
            bursting = self._last_plan is not None and self._last_plan.bursting
            next_watch = self.clock() + BURST_WATCH_SECONDS if bursting else float("inf")
        log.info("received %s: stopping", self.signals.signame or "stop")

    def _burst_progress(self) -> bool:
        """While ksmd bursts flat out, every second of it past the realized saving is wasted CPU:
        a round is due as soon as the counters say the saving is realized or a full scan ended
        (the policy decides about settling). Counters only, every BURST_WATCH_SECONDS."""
        plan, obs = self._last_plan, self._last_obs
        try:
            stats = self.ksm.stats()
        except KsmError:
            return True
        if stats.full_scans != int(obs.counters.get("full_scans", 0)):
            return True
        return stats.saved_bytes >= self.cfg.ksmd.realized_percent / 100.0 * plan.predicted_bytes

    def _shutdown(self) -> None:
        self.notify.send("STOPPING=1", "STATUS=stopping: restoring KSM knobs")
        try:
            if self.ksm is not None and not self.opts.dry_run:
                self._restore_on_exit()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.signals.uninstall()
            self.notify.close()

    def _restore_on_exit(self) -> None:
        written = dict(self.policy.written)
        keep_state = False
        try:
            if self.opts.once:
                if written:
                    log.info("--once: leaving the knobs as decided: %s", _fmt_knobs(written))
            elif self.cfg.daemon.on_exit == "leave":
                log.info("daemon.on_exit = leave: leaving %s", _fmt_knobs(written) or "the knobs as they are")
            elif written:
                try:
                    restored, left = restore_knobs(self.ksm, self.original, written)
                except KsmError as err:
                    keep_state = True  # the next start tries again
                    log.error("restoring the KSM knobs failed: %s; the state file %s keeps the "
                              "originals for the next start", err, self.state_path)
                else:
                    if restored:
                        log.info("restored %s", _fmt_knobs(restored))
                    for name, value in left.items():
                        log.warning("left %s=%r: changed by someone else after udedup set it", name, value)
        finally:
            if not keep_state:
                self._remove_state()

    # --- state file
    def _take_over_state_file(self) -> None:
        path = self.state_path
        state = read_daemon_state(path, self.cfg.daemon.procfs)
        if state is None:
            if os.path.exists(path):
                log.warning("state file %s is unreadable or from another version: ignoring it", path)
        elif state["running"] and state.get("pid") != os.getpid():
            raise DaemonError(f"another udedup daemon is running (pid {state['pid']}, state file "
                              f"{path}); stop it first, or give this one another daemon.state_file")
        elif os.path.realpath(state.get("ksm_root") or "") != os.path.realpath(self.cfg.daemon.ksm_root):
            raise DaemonError(f"the state file {path} belongs to a daemon of {state.get('ksm_root')}, "
                              f"not {self.cfg.daemon.ksm_root}: give this one another daemon.state_file")
        else:
            written = state.get("written_knobs") or {}
            original = state.get("original_knobs") or {}
            if written:
                log.warning("the previous daemon (pid %s) did not exit cleanly: restoring the knobs "
                            "it had changed from %s", state.get("pid"), path)
                restored, left = restore_knobs(self.ksm, original, written)
                if restored:
                    log.warning("restored %s", _fmt_knobs(restored))
                for name, value in left.items():
                    log.warning("left %s=%r: changed by someone else since the previous daemon set it",
                                name, value)
            self._remove_state()
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as err:
            raise DaemonError(f"cannot create the state directory {directory}: {err.strerror} (set "
                              "daemon.state_file, or under systemd RuntimeDirectory=udedup)") from err

    def _state(self) -> dict:
        plan, obs = self._last_plan, self._last_obs
        view = self.policy.view()
        state = {"version": STATE_VERSION, "pid": os.getpid(), "pid_start_time": self._own_start,
                 "started_at": self.started_wall, "updated_at": time.time(),
                 "ksm_root": self.cfg.daemon.ksm_root, "dry_run": self.opts.dry_run,
                 "config_file": self.cfg.sources.get("_file"), "metrics_url": self.metrics_url,
                 "interval": self.cfg.daemon.interval, "on_exit": self.cfg.daemon.on_exit,
                 "original_knobs": self.original, "written_knobs": dict(self.policy.written),
                 "yielded_knobs": view["yielded_knobs"], "rounds": self.rounds}
        state.update({k: view[k] for k in ("mode", "mode_reason", "processes", "decisions_total")})
        if plan is not None and obs is not None:
            state.update({"saved_bytes": obs.saved_bytes, "predicted_bytes": plan.predicted_bytes,
                          "realized_bytes": plan.realized_bytes,
                          "unrealized_bytes": plan.unrealized_bytes, "pressure": plan.pressure,
                          "ksmd_cpu_percent": plan.ksmd_cpu_percent,
                          "daemon_cpu_percent": plan.daemon_cpu_percent})
        return state

    def _write_state(self) -> None:
        try:
            _write_json_atomic(self.state_path, self._state())
        except OSError as err:
            if self.rounds == 0:
                raise DaemonError(f"cannot write the state file {self.state_path}: {err.strerror}; it "
                                  "holds the original knobs for crash recovery") from err
            log.error("cannot update the state file %s: %s", self.state_path, err.strerror)

    def _remove_state(self) -> None:
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("cannot remove the state file %s: %s", self.state_path, err.strerror)

    # --- self-test
    def _self_test(self) -> None:
        """Write each knob the daemon may manage to its current value and read it back."""
        names = ["sleep_millisecs", "run"]
        if self.original.get("advisor_mode") != "scan-time":
            names.append("pages_to_scan")
        if self.cfg.ksmd.use_zero_pages != "keep":
            names.append("use_zero_pages")
        for name in names:
            if name not in self.original or (name == "run" and self.original[name] == 2):
                continue
            try:
                # force: a no-op write is exactly what proves the permission without changing anything
                self.ksm._write_typed(name, self.original[name], force=True)
            except KsmPermissionError as err:
                raise KsmPermissionError(
                    f"startup self-test: {err} (under systemd the unit needs "
                    f"ReadWritePaths={self.cfg.daemon.ksm_root}; or run with --dry-run)",
                    knob=name) from err
        log.debug("self-test: wrote %s to their current values and read them back", ", ".join(names))

    # --- metrics
    def _start_metrics(self) -> None:
        address = self.cfg.metrics.address
        if not address:
            return
        from .metrics import DaemonCollector, MetricsServer

        self.collector = self.collector or DaemonCollector()
        self.metrics = MetricsServer(address, self.collector)
        self.metrics_url = self.metrics.url
        log.info("metrics on %s", self.metrics_url)

    # --- reload
    def _reload(self) -> None:
        self.notify.send("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        try:
            if self.loader is None:
                log.warning("SIGHUP: no configuration source to reload from")
                return
            try:
                new = self.loader()
            except UdedupError as err:
                log.error("SIGHUP: configuration not reloaded, keeping the current one: %s", err)
                return
            old = self.cfg
            for key in ("state_file", "ksm_root", "procfs"):
                if getattr(new.daemon, key) != getattr(old.daemon, key):
                    log.warning("SIGHUP: daemon.%s changes only at restart; keeping %r", key,
                                getattr(old.daemon, key))
                    setattr(new.daemon, key, getattr(old.daemon, key))
            self.cfg = new
            self.policy.reconfigure(new)
            if new.metrics.address != old.metrics.address:
                if self.metrics is not None:
                    self.metrics.close()
                    self.metrics, self.metrics_url = None, None
                try:
                    self._start_metrics()
                except UdedupError as err:
                    log.error("SIGHUP: metrics not restarted: %s", err)
            log.info("SIGHUP: configuration reloaded from %s", new.sources.get("_file") or "defaults")
            self._round()
        finally:
            self.notify.send("READY=1", f"STATUS={self._status_line()}")

    # --- one round
    def _observe(self) -> Observation:
        d = self.cfg.daemon
        procs = []
        now = self.clock()
        seen: dict = {}
        for info in discover_processes(d.procfs, exclude_pid=os.getpid(),
                                       min_anon_rss=self.cfg.candidates.min_anon_rss):
            ok, _why = match_process(self.cfg, info)
            if not ok:
                continue
            cached = self._mappings.get(info.key)
            if (cached is not None
                    and (cached[0].merge_any, cached[0].mergeable) == (info.merge_any, info.mergeable)
                    and (cached[3] == self.rounds     # read earlier in this round: still current
                         or now - cached[1] < self.policy.mappings_max_age(info.key))):
                seen[info.key] = cached
                procs.append(replace(info, registered_bytes=cached[0].registered_bytes,
                                     eligible_bytes=cached[0].eligible_bytes))
                continue
            try:
                detailed, maps = with_mappings(info, d.procfs)
            except ProcessAccessError as err:
                if info.key not in self._unreadable:
                    self._unreadable.add(info.key)
                    log.warning("pid %d (%s): matches the candidates but %s (reading another user's "
                                "process needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)", info.pid,
                                info.name, err)
                continue
            if detailed is not None:
                seen[info.key] = (detailed, now, maps, self.rounds)
                if match_process(self.cfg, detailed)[0]:
                    procs.append(detailed)
        self._mappings = seen
        stats = self.ksm.stats()
        try:
            ksmd_cpu = self.ksm.ksmd_cpu_seconds()
        except KsmError:
            ksmd_cpu = 0.0
        return Observation(now=now, processes=tuple(procs), counters=dict(stats.counters),
                           knobs=self.ksm.knobs(), saved_bytes=stats.saved_bytes,
                           page_size=stats.page_size, ksmd_cpu_seconds=ksmd_cpu,
                           daemon_cpu_seconds=time.process_time(), memory=read_memory(d.procfs))

    def _round(self) -> None:
        self.rounds += 1
        try:
            for attempt in range(3):
                obs = self._observe()
                plan = self.policy.decide(obs)
                final = attempt == 2 or not (plan.estimate or plan.register)
                # only the last plan of the round has its knobs applied: only it reports them
                self._log(plan, knobs=final)
                # the policy counts planned actions as done: they must run, final plan or not
                if plan.estimate:
                    self._estimate(plan, obs)
                if plan.register:
                    self._register(plan)
                if final:
                    break
            self._apply(plan, obs)
            self._last_plan, self._last_obs = plan, obs
        except KsmError as err:
            # sysfs hiccups are reported and retried next round; the loop goes on
            log.error("round %d: %s", self.rounds, err)
            return
        self.external_changes = self.policy.decision_counts.get("external", 0)
        self._publish(plan, obs)
        if not self.opts.dry_run:
            self._write_state()
        if self.rounds > 1:
            self.notify.send(f"STATUS={self._status_line()}")

    def _estimate(self, plan: Plan, obs: Observation) -> None:
        use_zero = bool(obs.knobs.get("use_zero_pages", False))
        if self.cfg.ksmd.use_zero_pages != "keep":
            use_zero = self.cfg.ksmd.use_zero_pages == "on"
        t0, cpu0 = time.monotonic(), time.process_time()
        # the smaps this round already read, by pid: the screen does not read them again
        results = screen_processes(plan.estimate, self.cfg, obs.now, seed=self.rounds,
                                   mappings={key[0]: cached[2] for key, cached in self._mappings.items()})
        full = [i for i in plan.estimate if i.key not in results]
        if len(full) < len(plan.estimate):
            log.info("screened %d processes in %.2f s (%.2f CPU-s): %d ruled out by their sample",
                     len(plan.estimate), time.monotonic() - t0, time.process_time() - cpu0,
                     len(results))
        if full:
            t1, cpu1 = time.monotonic(), time.process_time()
            results.update(estimate_processes(full, self.cfg, use_zero, obs.now))
            log.info("estimated %d processes in %.2f s (%.2f CPU-s)", len(full),
                     time.monotonic() - t1, time.process_time() - cpu1)
        for key, result in results.items():
            if isinstance(result, EstimateResult):
                self.policy.record_estimate(key, result, now=obs.now)
            else:
                log.info("pid %d: estimate failed: %s", key[0], result)
                self.policy.record_estimate(key, None, error=result, now=obs.now)

    def _register(self, plan: Plan) -> None:
        for info, mode, ranges in plan.register:
            if self.opts.dry_run:
                log.info("dry run: would opt pid %d (%s) in by injection, mode %s%s", info.pid,
                         info.name, mode, f", {len(ranges)} ranges" if ranges else "")
                continue
            ok, detail = register_process(info, mode, ranges)
            if ok:
                log.info("pid %d (%s): registered by injection (%s)", info.pid, info.name, detail)
            else:
                log.warning("pid %d (%s): injection failed: %s", info.pid, info.name, detail)
            self.policy.record_registration(info.key, ok, detail, self.clock())

    def _apply(self, plan: Plan, obs: Observation) -> None:
        if not plan.knobs:
            return
        if self.opts.dry_run:
            return
        for name in _in_write_order(plan.knobs):
            value = plan.knobs[name]
            self.ksm.set(name, value)
            self.policy.record_written({name: value})
            self.knob_writes += 1

    def _log(self, plan: Plan, knobs: bool = True) -> None:
        for d in plan.decisions:
            if d.kind == "knobs" and not knobs:
                continue
            if d.kind == "knobs" and self.opts.dry_run:
                if self._dry_logged.get("knobs") == plan.knobs:
                    continue
                self._dry_logged["knobs"] = dict(plan.knobs)
                log.info("dry run: would %s", d)
                continue
            level = logging.WARNING if d.kind == "external" else logging.INFO
            log.log(level, "%s", d)

    def _publish(self, plan: Plan, obs: Observation) -> None:
        if self.collector is None:
            return
        view = self.policy.view()
        knobs = dict(obs.knobs)
        if not self.opts.dry_run:
            knobs.update(plan.knobs)   # what they are after this round's writes
        self.collector.publish({
            "rounds": self.rounds, "dry_run": int(self.opts.dry_run),
            "saved_bytes": obs.saved_bytes, "counters": dict(obs.counters), "knobs": knobs,
            "ksmd_cpu_seconds": obs.ksmd_cpu_seconds, "daemon_cpu_seconds": obs.daemon_cpu_seconds,
            "ksmd_cpu_percent": plan.ksmd_cpu_percent, "daemon_cpu_percent": plan.daemon_cpu_percent,
            "cpu_budget_percent": self.cfg.ksmd.cpu_budget_percent,
            "seconds_per_page": plan.seconds_per_page, "scan_pages": plan.scan_pages,
            "target_pages_per_second": plan.target_pages_per_second,
            "budget_pages_per_second": plan.budget_pages_per_second,
            "mode": plan.mode, "pressure": int(plan.pressure),
            "predicted_bytes": plan.predicted_bytes, "realized_bytes": plan.realized_bytes,
            "unrealized_bytes": plan.unrealized_bytes, "processes": view["processes"],
            "estimated_bytes_total": view["estimated_bytes_total"],
            "estimate_tokens": view["estimate_tokens"], "scan_budget": self.cfg.estimate.scan_budget,
            "decisions_total": view["decisions_total"], "knob_writes": self.knob_writes,
            "external_changes": self.external_changes})

    def _status_line(self) -> str:
        plan, obs = self._last_plan, self._last_obs
        if plan is None or obs is None:
            return "starting"
        managed = sum(1 for p in self.policy.procs.values() if p.worthwhile)
        cpu = f", ksmd {plan.ksmd_cpu_percent:.0f}% CPU" if plan.ksmd_cpu_percent is not None else ""
        return (f"{plan.mode}: saved {_gib(obs.saved_bytes)}, predicted {_gib(plan.predicted_bytes)} "
                f"in {managed} processes{cpu}")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _fmt_knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in knobs.items())
