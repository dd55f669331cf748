"""The state file: the original knobs for crash recovery, and the daemon's last round for
``udedup status``.

It is :meth:`RoundSnapshot.state <udedup.daemon.snapshot.RoundSnapshot.state>` as JSON, written
atomically (a reader never sees half a file) before the first knob write and after every round.
It names its writer by pid and start time, so a reader can tell a live daemon from one that died:
the next start then restores the knobs the dead one had changed and still held.
"""
from __future__ import annotations

import json
import logging
import os

from ..errors import DaemonError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..units import mib
from .act import restore_knobs
from .config import Config
from .observe import process_start_time
from .snapshot import STATE_VERSION, RoundSnapshot

log = logging.getLogger(__name__)

DEFAULT_STATE_FILE = Config().daemon.state_file   # the one default lives in config


def format_knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in knobs.items())


def _pid_is(pid: int, start_time, procfs: ProcFs | str) -> bool:
    return bool(pid) and start_time is not None and process_start_time(pid, procfs) == start_time


def read_daemon_state(path: str = DEFAULT_STATE_FILE,
                      procfs: ProcFs | str = DEFAULT_PROCFS) -> dict | None:
    """The running daemon's view for ``udedup status``: None without a readable state file.

    The dict has ``running`` (the writer is alive), ``pid``, ``mode``, ``saved_bytes``,
    ``predicted_bytes``, ``realized_bytes``, ``processes`` (per candidate: predicted and realized
    savings and the last decision), ``original_knobs``, ``written_knobs``, ``metrics_url``...
    """
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        # a status display goes on without the daemon's part; the daemon itself warns at start
        log.debug("state file %s unreadable: %s", path, err)
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
                f"{format_knobs(state.get('written_knobs') or {}) or 'none'})"]
    lines = [f"udedup daemon: pid {state['pid']}{' (dry run)' if state.get('dry_run') else ''}, "
             f"{state.get('mode')}: {state.get('mode_reason')}",
             f"  predicted {mib(state.get('predicted_bytes') or 0)}, realized "
             f"{mib(state.get('realized_bytes') or 0)}, machine saving {mib(state.get('saved_bytes') or 0)}"
             + (f"; ksmd {state['ksmd_cpu_percent']:.1f}% CPU" if state.get("ksmd_cpu_percent") is not None else ""),
             f"  knobs it changed: {format_knobs(state.get('written_knobs') or {}) or 'none'}"
             + (f"; left to others: {format_knobs(state['yielded_knobs'])}" if state.get("yielded_knobs") else "")]
    if state.get("metrics_url"):
        lines.append(f"  metrics: {state['metrics_url']}")
    for p in state.get("processes") or []:
        pred = p.get("predicted_saved_bytes")
        lines.append(f"  {p['pid']:>7} {p['name'][:16]:16} predicted "
                     f"{mib(pred) if pred is not None else '?':>11} realized "
                     f"{mib(p.get('realized_saved_bytes') or 0):>11}  {p.get('decision') or ''}")
    return lines


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


class StateFile:
    """The daemon's state file at ``path`` (``daemon.state_file``)."""

    def __init__(self, path: str, procfs: ProcFs | str = DEFAULT_PROCFS):
        self.path = path
        self.procfs = as_procfs(procfs)

    def take_over(self, ksm, ksm_root: str) -> None:
        """Refuse to start beside a live daemon of the same file; after one that died, restore
        the knobs it had changed; then make sure the directory exists."""
        path = self.path
        state = read_daemon_state(path, self.procfs)
        if state is None:
            if os.path.exists(path):
                log.warning("state file %s is unreadable or from another version: ignoring it", path)
        elif state["running"] and state.get("pid") != os.getpid():
            raise DaemonError(f"another udedup daemon is running (pid {state['pid']}, state file "
                              f"{path}); stop it first, or give this one another daemon.state_file")
        elif os.path.realpath(state.get("ksm_root") or "") != os.path.realpath(ksm_root):
            raise DaemonError(f"the state file {path} belongs to a daemon of {state.get('ksm_root')}, "
                              f"not {ksm_root}: give this one another daemon.state_file")
        else:
            written = state.get("written_knobs") or {}
            original = state.get("original_knobs") or {}
            if written:
                log.warning("the previous daemon (pid %s) did not exit cleanly: restoring the knobs "
                            "it had changed from %s", state.get("pid"), path)
                restored, left = restore_knobs(ksm, original, written)
                if restored:
                    log.warning("restored %s", format_knobs(restored))
                for name, value in left.items():
                    log.warning("left %s=%r: changed by someone else since the previous daemon set it",
                                name, value)
            self.remove()
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as err:
            raise DaemonError(f"cannot create the state directory {directory}: {err.strerror} (set "
                              "daemon.state_file, or under systemd RuntimeDirectory=udedup)") from err

    def write(self, snapshot: RoundSnapshot, required: bool) -> None:
        """Write ``snapshot``; ``required`` (before the first knob write: the file holds the
        originals for crash recovery) turns a failure into DaemonError, else it is logged."""
        try:
            write_json_atomic(self.path, snapshot.state())
        except OSError as err:
            if required:
                raise DaemonError(f"cannot write the state file {self.path}: {err.strerror}; it "
                                  "holds the original knobs for crash recovery") from err
            log.error("cannot update the state file %s: %s", self.path, err.strerror)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("cannot remove the state file %s: %s", self.path, err.strerror)

