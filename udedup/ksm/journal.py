"""The knob recovery journal: what a process is about to change, written down before it changes it,
so that a process killed before it could restore the knobs (SIGKILL, OOM kill, power cut of the
session) leaves enough behind for the next one to put them back.

While a :class:`Journal` is open (:meth:`Journal.begin` .. :meth:`Journal.end`, nested), the first
write of each knob records the knob's value from just before the write into
``<directory>/knobs-journal-<pid>-<seq>.json`` (written whole, then renamed into place: a reader never
sees half a file). A clean end removes the file. :func:`scan` finds the journals of the same sysfs
roots and tells those of live processes from those of dead ones (the PID is gone, is a zombie, or is
now another process: its start time differs; or the journal is from an earlier boot, whose knobs the
reboot reset). :meth:`udedup.ksm.Ksm.recover` replays the dead ones, newest first so that the oldest
original value is the one left.

Pure bookkeeping: the values are typed (JSON: bool, int, str) and written back through
:class:`udedup.ksm.Ksm`, which validates them like any other value.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field

from ..host.fs import ProcFs

log = logging.getLogger(__name__)

#: Where journals live: /run is cleared at boot, as the knobs are reset.
DEFAULT_DIR = "/run/udedup"
_PREFIX = "knobs-journal-"
_SEQ = itertools.count(1)


def boot_id(procfs: ProcFs) -> str:
    text = procfs.global_text("sys", "kernel", "random", "boot_id")
    return text.strip() if text else ""


def _start_time(procfs: ProcFs, pid: int) -> int | None:
    st = procfs.maybe_stat(pid)
    return None if st is None or st.exited else st.start_time


class Journal:
    """The journal of one :class:`udedup.ksm.Ksm` (its roots) in this process."""

    def __init__(self, directory: str, ksm_root: str, thp_root: str, procfs: ProcFs):
        self.directory = directory
        self.roots = {"ksm_root": ksm_root, "thp_root": thp_root}
        self.procfs = procfs
        self.depth = 0
        self.path: str | None = None
        self.knobs: dict[str, object] = {}
        self.dirty = False
        self._broken = False          # the directory cannot be written: said once

    @property
    def active(self) -> bool:
        return self.depth > 0

    def begin(self) -> None:
        """Open (or nest) a stretch during which knob writes are journaled."""
        if self.depth == 0:
            self.path, self.knobs, self.dirty = None, {}, False
        self.depth += 1

    def note(self, name: str, value) -> None:
        """Record ``value`` as the original of ``name`` unless recorded already; on disk before
        the caller writes the knob."""
        if not self.active or name in self.knobs:
            return
        self.knobs[name] = value
        self._write()

    def note_many(self, values) -> None:
        """:meth:`note` of several knobs, in one write."""
        new = {name: value for name, value in values.items() if name not in self.knobs}
        if self.active and new:
            self.knobs.update(new)
            self._write()

    def fail(self) -> None:
        """A restore failed: the file outlives the stretch (replayed once this process is gone)."""
        self.dirty = True

    def end(self) -> None:
        """Close one level; the outermost removes the file unless a restore failed."""
        if self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            if self.path is not None and not self.dirty:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    log.warning("cannot remove the knob journal %s: %s", self.path, err)
            self.path, self.knobs = None, {}

    def _write(self) -> None:
        if self._broken:
            return
        pid = os.getpid()
        if self.path is None:
            self.path = os.path.join(self.directory, f"{_PREFIX}{pid}-{next(_SEQ)}.json")
            # what names this process: read once per file (a fork gets a file of its own)
            self._who = {"version": 1, "pid": pid,
                         "start_time": _start_time(self.procfs, pid) or 0,
                         "boot_id": boot_id(self.procfs), "created": time.time(),
                         "command": self.procfs.cmdline(pid), **self.roots}
        doc = {**self._who, "knobs": self.knobs}
        tmp = self.path + ".tmp"
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.path)
        except OSError as err:
            self._broken = True
            # without the right to write /run, the knob write fails next with its own message
            (log.debug if isinstance(err, PermissionError) else log.warning)(
                "cannot write the knob journal %s (%s): if this process is killed before it "
                "restores the knobs, nothing will put them back", self.path, err)


@contextlib.contextmanager
def stretch(journal: Journal | None):
    """``journal.begin()`` .. ``journal.end()`` around the block; nothing for no journal."""
    if journal is None:
        yield
        return
    journal.begin()
    try:
        yield
    finally:
        journal.end()


@dataclass
class Entry:
    """One journal file found on disk."""

    path: str
    pid: int
    command: str
    created: float
    knobs: dict = field(default_factory=dict)
    state: str = "live"           # "live", "dead", "earlier-boot"

    def claim(self) -> str | None:
        """Rename the file so no concurrent replayer takes it too; the new path, or None if another
        process took it first."""
        claimed = f"{self.path}.replaying-{os.getpid()}"
        try:
            os.rename(self.path, claimed)
        except OSError:
            return None
        return claimed


def scan(directory: str, ksm_root: str, thp_root: str, procfs: ProcFs) -> list[Entry]:
    """Every journal of these roots in ``directory``, newest first, each with its state."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    me = boot_id(procfs)
    entries = []
    for name in names:
        if not (name.startswith(_PREFIX) and name.endswith(".json")):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                doc = json.load(f)
            pid, knobs = int(doc["pid"]), dict(doc["knobs"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring the unreadable knob journal %s: %s", path, err)
            continue
        if doc.get("ksm_root") != ksm_root or doc.get("thp_root") != thp_root:
            continue
        entry = Entry(path, pid, str(doc.get("command", "")), float(doc.get("created", 0)), knobs)
        if doc.get("boot_id") and me and doc["boot_id"] != me:
            entry.state = "earlier-boot"
        else:
            started, recorded = _start_time(procfs, pid), doc.get("start_time")
            if started is None or (recorded and started != recorded):
                entry.state = "dead"        # gone, a zombie, or the PID is another process now
        entries.append(entry)
    return sorted(entries, key=lambda e: e.created, reverse=True)


def replay(ksm, journal: Journal) -> list[dict]:
    """Put back the knobs recorded by dead processes' journals of ``ksm``'s roots; returns what was
    done, one dict per journal (``pid``, ``command``, ``restored`` {knob: [left, restored]},
    ``error``). Journals of earlier boots are removed unread (the reboot reset the knobs).

    Nothing is replayed while a live process (this one included) has a journal open for these
    roots: that process recorded the dead one's leftovers as its originals and would put them back
    at its end. The dead journals wait for a later start."""
    from .knobs import UNMERGE_KNOBS, KnobSnapshot
    from ..errors import KsmError

    entries = scan(journal.directory, journal.roots["ksm_root"], journal.roots["thp_root"],
                   journal.procfs)
    dead = [e for e in entries if e.state == "dead"]
    for entry in entries:
        if entry.state == "earlier-boot":
            claimed = entry.claim()
            if claimed:
                os.unlink(claimed)
    live = [e for e in entries if e.state == "live"]
    if dead and live:
        log.warning("knob journal%s of ended process%s %s not replayed yet: PID %d (%s) is "
                    "changing knobs now", "s" if len(dead) > 1 else "", "es" if len(dead) > 1 else "",
                    ", ".join(str(e.pid) for e in dead), live[0].pid, live[0].command or "?")
        return []
    done = []
    present = set(ksm.knob_names())
    for entry in dead:
        claimed = entry.claim()
        if claimed is None:
            continue
        values = {name: value for name, value in entry.knobs.items() if name in present}
        report = {"pid": entry.pid, "command": entry.command, "journal": entry.path,
                  "restored": {}, "error": None}
        try:
            left = {name: ksm.get(name) for name in values}
            report["restored"] = {name: [left[name], ksm.parse(name, value)]
                                  for name, value in values.items()
                                  if left[name] != ksm.parse(name, value)}
            ksm.restore(KnobSnapshot(values),
                        allow_unmerge=any(name in UNMERGE_KNOBS for name in values))
        except KsmError as err:
            report["error"] = str(err)
            os.rename(claimed, entry.path)
            log.warning("PID %d (%s) ended without restoring the knobs it changed, and putting "
                        "them back failed: %s (journal %s kept)", entry.pid, entry.command or "?",
                        err, entry.path)
            done.append(report)
            continue
        os.unlink(claimed)
        if report["restored"]:
            log.warning("restored knobs left changed by PID %d (%s), which ended without putting "
                        "them back (killed?): %s (journal %s)", entry.pid, entry.command or "?",
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in
                                  report["restored"].items()), entry.path)
        else:
            log.info("knob journal of ended PID %d: every knob already had its original value",
                     entry.pid)
        done.append(report)
    return done
