"""The KSM sysfs controller (:class:`Ksm`): knobs read and written, snapshot/apply/restore,
``settings()``, counters, ``wait_settled()``, ksmd's CPU.

Everything under ``/sys/kernel/mm/ksm`` goes through :class:`Ksm`, and every file read or write
through :class:`udedup.host.fs.SysFs` (its ``knob_error`` is the one errno table). The root, the
procfs and the SysFs are constructor arguments so unit tests run on a fake tree without root.
What each knob accepts and the order writes go in are in :mod:`.knobs`; counters in :mod:`.stats`;
the settle test in :mod:`.settle`; ksmd in :mod:`.ksmd`.

Rules this module keeps, because the kernel is picky about them:

- Knobs are discovered from the directory, never hard-coded: they differ by kernel version. A file
  is a writable knob when its mode has a write bit; every other regular file is a counter.
- Every value is validated before anything is written, written, then re-read to verify. A write of
  the value already there is skipped (``max_page_sharing`` accepts its own value even while busy,
  but ``run=2`` is an action and is never skipped by :meth:`Ksm.unmerge_all`).
- Order: :func:`.knobs.write_order`; ``max_page_sharing`` / ``merge_across_nodes`` need every KSM
  page gone, so ``run=2`` comes before them, and only with ``allow_unmerge=True``.
- Ctrl-C is held while several knobs are written (:func:`udedup.signals.deferred`): a
  KeyboardInterrupt between two writes would leave a half-applied state with nothing to restore it.
- THP knobs (``thp.enabled``, ``thp.khugepaged/defrag``: :mod:`.thp`, the sibling directory
  ``transparent_hugepage`` by default) are knobs like KSM's in every method here.
- While :meth:`Ksm.settings` or :meth:`Ksm.apply` runs, every first write of a knob is recorded in
  a recovery journal (:mod:`.journal`) beforehand; the first snapshot, ``settings()`` or ``apply()``
  of a controller replays the journals that killed processes left (:meth:`Ksm.recover`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator, Mapping

from .. import signals
from ..errors import KsmBusyError, KsmError, KsmUnavailableError, KsmValueError
from ..host.fs import DEFAULT_PROCFS, ProcFs, SysFs, as_procfs
from . import journal as journals
from . import knobs as table
from . import settle, thp
from .knobs import UNMERGE_KNOBS, KnobSnapshot, KnobSpec, pages_to_scan_ignored, write_order
from .ksmd import Ksmd
from .stats import KsmStats

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/kernel/mm/ksm"
_DEFAULT = object()
#: Knobs a write of the key changes too (mm/ksm.c: a new advisor_mode resets pages_to_scan): a
#: value of them read before that write is stale after it.
_WRITE_ALSO_CHANGES = {"advisor_mode": ("pages_to_scan",)}


class Ksm:
    """Controller of one KSM sysfs directory.

    ``sysfs`` is the :class:`SysFs` every knob file is read and written through (default: one over
    the root's parent); tests pass a subclass that plays the kernel. ``thp_root``: the THP
    directory whose files are the ``thp.*`` knobs (default: ``transparent_hugepage`` beside
    ``root``; a missing one means no THP knob). ``journal_dir``: where recovery journals go
    (default :data:`.journal.DEFAULT_DIR` for the real KSM directory, none for other roots;
    None: no journal).

    >>> ksm = Ksm()
    >>> with ksm.settings(run=1, pages_to_scan=5000, sleep_millisecs=0, smart_scan=0):
    ...     ksm.wait_settled(timeout=60)
    """

    def __init__(self, root: str = DEFAULT_ROOT, procfs: str | ProcFs = DEFAULT_PROCFS,
                 sysfs: SysFs | None = None, thp_root: str | None = None,
                 journal_dir=_DEFAULT):
        self.root = os.fspath(root)
        self.thp_root = os.fspath(thp_root) if thp_root is not None else os.path.join(
            os.path.dirname(self.root.rstrip("/")), "transparent_hugepage")
        fs = as_procfs(procfs if isinstance(procfs, ProcFs) else os.fspath(procfs))
        self.procfs = fs.root
        self.sysfs = sysfs if sysfs is not None else SysFs(os.path.dirname(self.root))
        if not os.path.isdir(self.root):
            raise KsmUnavailableError(
                f"{self.root} does not exist: this kernel has no KSM (built without CONFIG_KSM, "
                "or sysfs is not mounted)", path=self.root)
        self.page_size: int = os.sysconf("SC_PAGE_SIZE")
        self.ksmd = Ksmd(fs)
        self._specs: dict[str, KnobSpec] = {}
        self._names: tuple[list[str], list[str]] | None = None
        self._thp_names: tuple[list[str], list[str]] | None = None
        if journal_dir is _DEFAULT:
            journal_dir = journals.DEFAULT_DIR if self.root == DEFAULT_ROOT else None
        self.journal = (journals.Journal(os.fspath(journal_dir), self.root, self.thp_root, fs)
                        if journal_dir is not None else None)
        self._recovered = False

    def __repr__(self) -> str:
        return f"Ksm(root={self.root!r})"

    # --- discovery
    def path(self, name: str) -> str:
        """The file of knob or counter ``name`` (``thp.*``: under :attr:`thp_root`)."""
        if thp.is_thp(name):
            return os.path.join(self.thp_root, thp.relpath(name))
        return os.path.join(self.root, name)

    def _scan_dir(self) -> tuple[list[str], list[str]]:
        # the set of files is fixed for the life of the kernel: list it once
        if self._names is None:
            files = sorted(self.sysfs.listdir(self.root))
            self._names = ([name for name, writable in files if writable],
                           [name for name, writable in files if not writable])
        return self._names

    def _scan_thp(self) -> tuple[list[str], list[str]]:
        if self._thp_names is None:
            self._thp_names = thp.discover(self.sysfs, self.thp_root)
        return self._thp_names

    def knob_names(self) -> list[str]:
        """Writable knobs on this kernel: KSM's sorted, then THP's (``thp.*``) sorted."""
        return list(self._scan_dir()[0]) + list(self._scan_thp()[0])

    def counter_names(self) -> list[str]:
        """Read-only counters on this kernel, sorted."""
        return list(self._scan_dir()[1])

    def spec(self, name: str) -> KnobSpec:
        """How knob ``name`` is parsed; KsmValueError / KsmUnavailableError if there is no such knob."""
        name = thp.canonical(name)
        if name in self._specs:
            return self._specs[name]
        if thp.is_thp(name):
            return self._thp_spec(name)
        knobs, counters = self._scan_dir()
        if name not in knobs:
            if name in counters:
                raise KsmValueError(f"{name} is a read-only counter, not a knob; knobs here: "
                                    f"{', '.join(knobs)}", knob=name)
            if name in table.KNOWN:
                raise KsmUnavailableError(
                    f"this kernel has no KSM knob {name!r} (added in Linux {table.KNOWN[name].since}; "
                    f"running {os.uname().release})", knob=name)
            raise KsmValueError(f"unknown KSM knob {name!r}; knobs on this kernel: "
                                f"{', '.join(knobs)} (and thp.* for THP)", knob=name)
        known = table.KNOWN.get(name)
        # a knob the table types fully needs no read; the others are typed by what they read
        spec = (known if known is not None and known.kind != "choice"
                else table.spec_from_raw(name, self.read_raw(name)))
        self._specs[name] = spec
        return spec

    def _thp_spec(self, name: str) -> KnobSpec:
        knobs, read_only = self._scan_thp()
        thp.check_name(name, knobs, read_only, self.thp_root)
        pmd = thp.pmd_pages(self.sysfs, self.thp_root, self.page_size)
        spec = self._specs[name] = thp.spec_for(name, self.read_raw(name), pmd)
        return spec

    # --- raw I/O, through SysFs
    def read_raw(self, name: str) -> str:
        """The text of file ``name``, stripped."""
        return self.sysfs.read(self.path(name), knob=name)

    def write_raw(self, name: str, text: str) -> None:
        """One write of ``text`` to knob ``name``, unchecked: the kernel's errno, translated, is the
        only check (the kernel tests and ``run=2`` use it). Journaled first while a journal is
        open."""
        name = thp.canonical(name)
        if self.journal is not None and self.journal.active and name not in self.journal.knobs:
            self.journal.note(name, self._read_typed(name))
        self.sysfs.write(self.path(name), text, knob=name)

    # --- typed values
    def parse(self, name: str, value) -> object:
        """Validate ``value`` (Python value or string) for knob ``name``; return the typed value."""
        return table.parse_value(self.spec(name), value)

    format = staticmethod(table.format_value)

    def _read_typed(self, name: str) -> object:
        return table.read_value(self.spec(name), self.read_raw(name))

    def get(self, name: str) -> object:
        """Typed value of a knob (``advisor_mode`` -> ``"none"``), or of a counter (int)."""
        name = thp.canonical(name)
        if name in self.counter_names() or name in self._scan_thp()[1]:
            return int(self.read_raw(name))
        return self._read_typed(name)

    def knobs(self) -> dict[str, object]:
        """Every writable knob, typed."""
        return {name: self._read_typed(name) for name in self.knob_names()}

    def set(self, name: str, value) -> None:
        """Validate, write (unless already the value), re-read to verify."""
        self.write_value(name, self.parse(name, value))

    def write_value(self, name: str, typed, force: bool = False, current=_DEFAULT) -> bool:
        """Write the typed value (already parsed) unless it is there already (``force``: write
        anyway), then re-read to verify; True when it wrote. ``current``: the value just read, if
        the caller has it (else it is read here)."""
        spec = self.spec(name)
        if current is _DEFAULT:
            current = self._read_typed(name)
        if current == typed and not force:
            return False
        text = table.format_value(spec, typed)
        log.debug("ksm: %s %r -> %s", name, current, text)
        self.write_raw(name, text)
        now = self._read_typed(name)
        if now != typed:
            raise KsmError(f"wrote {name}={text} but it reads back {now!r} (another tool writing KSM "
                           "knobs at the same time?)", knob=name, value=typed)
        return True

    # --- counters
    def stats(self) -> KsmStats:
        """Every read-only counter, read now."""
        counters = {}
        for name in self.counter_names():
            raw = self.read_raw(name)
            try:
                counters[name] = int(raw)
            except ValueError:
                log.debug("ksm: counter %s is not an integer: %r", name, raw)
        return KsmStats(timestamp=time.monotonic(), page_size=self.page_size, counters=counters)

    # --- snapshot / apply / restore
    def snapshot(self) -> KnobSnapshot:
        """Every writable knob, typed, now. The first snapshot of a controller replays the
        journals of killed processes first (:meth:`recover`): a baseline never holds what a killed
        run left behind."""
        self._recover_once()
        return KnobSnapshot(self.knobs())

    def recover(self) -> list[dict]:
        """Put back the knobs that processes killed before their restore left changed, from their
        recovery journals (:func:`.journal.replay`: what was restored is logged as a warning and
        returned). Nothing happens without a journal directory."""
        self._recovered = True
        if self.journal is None or self.journal.active:
            return []
        return journals.replay(self, self.journal)

    def _recover_once(self) -> None:
        if not self._recovered:
            self.recover()

    def changed_since(self, snap: KnobSnapshot) -> dict[str, tuple[object, object]]:
        """Knobs whose value differs from ``snap``: ``{name: (then, now)}``.

        ``pages_to_scan`` is ignored while ``advisor_mode`` is ``scan-time``: the advisor retunes it
        itself once per full scan.
        """
        return self._changed(snap, self.knobs())

    @staticmethod
    def _changed(snap: KnobSnapshot, now: Mapping[str, object]) -> dict[str, tuple[object, object]]:
        ignored = {"pages_to_scan"} if pages_to_scan_ignored(now) else set()
        return {name: (then, now.get(name)) for name, then in snap.items()
                if name not in ignored and now.get(name, then) != then}

    def validate(self, knobs: Mapping[str, object]) -> dict[str, object]:
        """Parse every value; raise on the first bad one before anything is written."""
        typed = {name: self.parse(name, value) for name, value in knobs.items()}
        thp.check_spellings(typed)
        if "pages_to_scan" in typed:
            mode = typed.get("advisor_mode")
            if mode is None and "advisor_mode" in self.knob_names():
                mode = self.get("advisor_mode")
            if pages_to_scan_ignored({"advisor_mode": mode}):
                raise KsmValueError(
                    "pages_to_scan cannot be set while advisor_mode is scan-time (the advisor "
                    "tunes it); set advisor_mode=none too, or tune advisor_min/max_pages_to_scan",
                    knob="pages_to_scan", value=typed["pages_to_scan"])
        return typed

    def _needs_unmerge(self, typed: Mapping[str, object],
                       now: Mapping[str, object] | None = None) -> list[str]:
        now = now or {}
        return [name for name in UNMERGE_KNOBS
                if name in typed and (now[name] if name in now else self._read_typed(name))
                != typed[name]]

    def _write_all(self, typed: Mapping[str, object], allow_unmerge: bool) -> list[str]:
        """Write in the kernel's order; returns the names written. Raises on the first failure."""
        written = []
        busy = self._needs_unmerge(typed)
        if busy:
            stats = self.stats()
            previous_run = self.get("run")
            if stats.pages_shared or previous_run == 1:
                if not allow_unmerge:
                    if stats.pages_shared:
                        raise KsmBusyError(
                            f"changing {', '.join(busy)} needs every KSM page unmerged "
                            f"({stats.pages_shared} KSM pages exist): pass allow_unmerge=True "
                            "(CLI: --allow-unmerge) to unmerge everything first", knob=busy[0])
                else:
                    # stop ksmd and unmerge, so nothing gets merged again before the write; run
                    # goes back to its value afterwards unless the caller asked for another
                    self.write_raw("run", "2")
                    written.append("run")
                    typed = dict(typed)
                    typed.setdefault("run", previous_run if previous_run != 2 else 0)
        # validate() refused pages_to_scan together with the scan-time advisor
        for name in write_order(typed):
            if self.write_value(name, typed[name]) and name not in written:
                written.append(name)
        return written

    def apply(self, knobs: Mapping[str, object], allow_unmerge: bool = False) -> KnobSnapshot:
        """Validate all, then write all, or none: a failure rolls back what was written.

        Returns the snapshot taken before writing (give it to :meth:`restore`).
        """
        typed = self.validate(knobs)
        self._recover_once()
        with journals.stretch(self.journal):
            return self._apply(typed, allow_unmerge)

    def _apply(self, typed: Mapping[str, object], allow_unmerge: bool) -> KnobSnapshot:
        """:meth:`apply` of values :meth:`validate` already returned."""
        before = self.snapshot()
        if self.journal is not None:     # one journal write for all (run: an unmerge writes it)
            self.journal.note_many({n: before[n] for n in map(thp.canonical, [*typed, "run"])
                                    if n in before})
        try:
            # a Ctrl-C held during the writes is delivered when they end, and lands in the
            # rollback below like any other failure
            with signals.deferred():
                self._write_all(typed, allow_unmerge)
        except BaseException:
            with signals.deferred():
                try:
                    self._restore(before, allow_unmerge=allow_unmerge)
                except KsmError as rollback_err:
                    if self.journal is not None:
                        self.journal.fail()
                    log.error("ksm: rolling back a failed change also failed: %s", rollback_err)
            raise
        return before

    def restore(self, snap: KnobSnapshot, allow_unmerge: bool = False,
                now: Mapping[str, object] | None = None) -> None:
        """Put every knob of ``snap`` back, in an order the kernel accepts.

        ``max_page_sharing`` / ``merge_across_nodes`` can only change with no KSM page left: that
        needs ``allow_unmerge=True`` (``run=2`` first), else :class:`KsmBusyError` before anything is
        written. Otherwise best effort: every knob that can be restored is, and the first error is
        raised at the end. ``now``: every knob as the caller just read it (:meth:`knobs`), so none
        is read again before its write.
        """
        with signals.deferred():
            self._restore(snap, allow_unmerge, now)

    def _restore(self, snap: KnobSnapshot, allow_unmerge: bool,
                 now: Mapping[str, object] | None = None) -> None:
        """``now``: every knob as just read (:meth:`knobs`), so that none is read twice; values
        a write makes stale (:data:`_WRITE_ALSO_CHANGES`, ``run=2``) are read again."""
        present = set(self.knob_names())
        typed = {name: value for name, value in snap.items() if name in present}
        now = dict(now or {})
        busy = self._needs_unmerge(typed, now)
        if busy and not allow_unmerge and self.stats().pages_shared:
            raise KsmBusyError(
                f"cannot restore {', '.join(busy)} while KSM pages exist: restore with "
                "allow_unmerge=True or unmerge first ('udedup unmerge')", knob=busy[0])
        first_error = None
        if busy and allow_unmerge and (self.stats().pages_shared or now.get("run", self.get("run"))
                                       == 1):
            self.write_raw("run", "2")
            now.pop("run", None)
        # the snapshot's advisor owns pages_to_scan: writing advisor_mode back restores it
        skip = {"pages_to_scan"} if pages_to_scan_ignored(typed) else set()
        for name in write_order(n for n in typed if n not in skip):
            try:
                current = now.pop(name, _DEFAULT)
                if self.write_value(name, typed[name], current=current):
                    for stale in _WRITE_ALSO_CHANGES.get(name, ()):
                        now.pop(stale, None)
            except KsmError as err:
                log.warning("ksm: could not restore %s=%r: %s", name, typed[name], err)
                first_error = first_error or err
        if first_error is not None:
            raise first_error

    @contextlib.contextmanager
    def settings(self, allow_unmerge: bool = False, **knobs) -> Iterator["Ksm"]:
        """Apply ``knobs`` for the ``with`` block, then restore every knob as it was.

        Validates everything first; a failure while applying rolls back what was written. The
        restore runs on normal exit, exceptions and KeyboardInterrupt alike (Ctrl-C is held while
        knobs are being written). Changing ``max_page_sharing`` / ``merge_across_nodes`` needs
        ``allow_unmerge=True``: restoring them unmerges every KSM page on the machine. Knobs someone
        else changed during the block are reported (logged) before being restored.
        """
        typed = self.validate(knobs)
        busy = [name for name in UNMERGE_KNOBS if name in typed]
        if busy and not allow_unmerge:
            raise KsmBusyError(
                f"settings({', '.join(busy)}=...) needs allow_unmerge=True: the kernel accepts a "
                "change of them only with no KSM page on the machine, so applying and restoring them "
                "unmerges everything", knob=busy[0])
        self._recover_once()
        with journals.stretch(self.journal):
            yield from self._settings_block(typed, allow_unmerge)

    def _settings_block(self, typed, allow_unmerge: bool):
        before = self._apply(typed, allow_unmerge)
        applied = None
        try:
            applied = self.snapshot()
            yield self
        finally:
            # one read of every knob serves both the check and the restore
            try:
                now = self.knobs()
            except KsmError:
                now = None
            outside = self._changed(applied, now) if applied is not None and now else {}
            outside.pop("run", None)  # unmerge_all() inside the block is ours
            if outside:
                log.warning("ksm: knobs changed by someone else during settings(): %s; restoring "
                            "them anyway", ", ".join(f"{k} {a!r}->{b!r}" for k, (a, b) in
                                                     outside.items()))
            try:
                self.restore(before, allow_unmerge=allow_unmerge, now=now)
            except BaseException:
                if self.journal is not None:
                    self.journal.fail()    # the journal outlives us: a later start retries
                raise

    # --- actions
    def unmerge_all(self) -> None:
        """``run=2`` (unmerge every KSM page; registrations stay), then ``run`` back as it was."""
        previous = self.get("run")
        with signals.deferred():
            try:
                self.write_raw("run", "2")
            finally:
                # on failure the kernel leaves run=0: put the old value back either way
                if previous != 2:
                    self.write_value("run", previous)

    def wait_settled(self, timeout: float = 60.0, poll: float = 0.05, stable_scans: int = 2,
                     min_scans: int = 3, tolerance: float = settle.DEFAULT_TOLERANCE,
                     floor_pages: int = settle.DEFAULT_FLOOR_PAGES,
                     tracker_out: list | None = None) -> KsmStats:
        """Block until merging has settled (:mod:`.settle` says what that means); return the read
        that carries the plateau's figure.

        Settled: ``full_scans`` advanced by at least ``min_scans`` since the call, and over the
        last ``stable_scans`` full scans the saved pages show no trend beyond ``tolerance`` (a
        fraction of the saving per full scan, plus ``floor_pages``): jitter, as live memory shows
        forever. ``tolerance=0`` is exact equality of the saved pages and ``pages_shared`` (static
        memory). The read returned is the newest whose saved pages are the plateau's median (with
        ``tolerance=0``: the last read). ``tracker_out`` (a list) receives the
        :class:`.settle.SettleTracker`, whose ``plateau`` says where and how it settled. A
        ``run=2`` reset of ``full_scans`` counts as a restart. Raises :class:`KsmNotRunningError`
        at once if ksmd is not running, and :class:`KsmTimeout` (``.stats`` = last counters) after
        ``timeout`` seconds.
        """
        return settle.wait_settled(self.stats, self.get, timeout=timeout, poll=poll,
                                   stable_scans=stable_scans, min_scans=min_scans,
                                   tolerance=tolerance, floor_pages=floor_pages,
                                   tracker_out=tracker_out)

    # --- ksmd CPU time
    def ksmd_pid(self) -> int:
        """PID of the ksmd kernel thread (cached while it stays ksmd)."""
        return self.ksmd.pid()

    def ksmd_cpu_seconds(self) -> float:
        """utime + stime of ksmd, in seconds (resolution 1/SC_CLK_TCK)."""
        return self.ksmd.cpu_seconds()

    def ksmd_start_seconds(self) -> float:
        """When ksmd started, in seconds since boot (stat field 22)."""
        return self.ksmd.start_seconds()
