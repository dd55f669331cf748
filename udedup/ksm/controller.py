"""The KSM sysfs controller: knobs, counters, snapshot/restore, ``settings()``, ``wait_settled()``.

Everything under ``/sys/kernel/mm/ksm`` goes through :class:`Ksm`. The root (and ``/proc``) are
constructor arguments so unit tests run on a fake tree without root.

Rules this module keeps, because the kernel is picky about them:

- Knobs are discovered from the directory, never hard-coded: they differ by kernel version. A file
  is a writable knob when its mode has the owner write bit; every other regular file is a counter.
- Every value is validated before anything is written, written, then re-read to verify. A write of
  the value already there is skipped (``max_page_sharing`` accepts its own value even while busy,
  but ``run=2`` is an action and is never skipped by :meth:`Ksm.unmerge_all`).
- Order: ``max_page_sharing`` / ``merge_across_nodes`` first (they need every KSM page gone, so
  ``run=2`` comes before them, and only with ``allow_unmerge=True``), then ``advisor_mode`` (switching
  it resets ``pages_to_scan``), then the rest, ``run`` last so ksmd restarts with the final settings.
- errno is translated in one place, :func:`_translate_oserror`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import fcntl
import logging
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from ..errors import (KsmBusyError, KsmError, KsmNotRunningError, KsmPermissionError, KsmTimeout,
                     KsmUnavailableError, KsmValueError)

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/kernel/mm/ksm"
DEFAULT_PROCFS = "/proc"

#: Bytes the kernel spends per tracked page (``sizeof(struct ksm_rmap_item)`` on 64-bit kernels).
RMAP_ITEM_BYTES = 64

#: The machine-wide lock that udedup's KSM tests and experiment scripts hold while they change knobs
#: or register memory, so that none of them runs under another's settings.
LOCK_PATH = "/tmp/udedup-ksm.lock"

#: Knobs that the kernel refuses to change (EBUSY) while any KSM page exists.
UNMERGE_KNOBS = ("max_page_sharing", "merge_across_nodes")

_U32 = 2**32 - 1
_ULONG = 2**64 - 1


@dataclass(frozen=True)
class KnobSpec:
    """How one knob is parsed, validated and written."""

    name: str
    kind: str                     # "int", "bool" or "choice"
    minimum: int = 0
    maximum: int = _ULONG
    choices: tuple[str, ...] = ()
    since: str = ""               # kernel version that added it (for "not on this kernel" messages)


# What mm/ksm.c accepts for each knob we know (kstrtouint -> u32, kstrtoul -> u64, explicit checks).
# A knob found in the directory but missing here is treated as a non-negative integer, or as a choice
# when it reads like "[a] b".
_KNOWN: dict[str, KnobSpec] = {spec.name: spec for spec in (
    KnobSpec("run", "int", 0, 2, since="2.6.32"),
    KnobSpec("pages_to_scan", "int", 0, _U32, since="2.6.32"),
    KnobSpec("sleep_millisecs", "int", 0, _U32, since="2.6.32"),
    KnobSpec("merge_across_nodes", "bool", since="3.9"),
    KnobSpec("max_page_sharing", "int", 2, 2**31 - 1, since="4.13"),
    KnobSpec("stable_node_chains_prune_millisecs", "int", 0, _U32, since="4.13"),
    KnobSpec("use_zero_pages", "bool", since="4.11"),
    KnobSpec("smart_scan", "bool", since="6.7"),
    KnobSpec("advisor_mode", "choice", choices=("none", "scan-time"), since="6.9"),
    KnobSpec("advisor_max_cpu", "int", 0, _ULONG, since="6.9"),
    KnobSpec("advisor_min_pages_to_scan", "int", 0, _ULONG, since="6.9"),
    KnobSpec("advisor_max_pages_to_scan", "int", 0, _ULONG, since="6.9"),
    KnobSpec("advisor_target_scan_time", "int", 1, _ULONG, since="6.9"),
)}

_TRUE = {"1", "y", "yes", "on", "true"}
_FALSE = {"0", "n", "no", "off", "false"}


# --- errno: the one place ----------------------------------------------------------------------
def _translate_oserror(err: OSError, *, knob: str, path: str, value=None, action: str = "write"):
    """The matching :class:`KsmError` for an OSError from sysfs (caller does ``raise ... from``)."""
    code = err.errno
    shown = "" if value is None else f"={value}"
    if code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        if code == _errno.EROFS:
            why = "sysfs is mounted read-only here (a container?)"
        else:
            why = ("writing KSM knobs needs root (the files are root-owned, mode 0644); run as "
                   "root or with sudo")
        return KsmPermissionError(f"cannot {action} {knob}{shown} ({path}): {why}",
                                  knob=knob, path=path, value=value, errno=code)
    if code == _errno.EBUSY:
        return KsmBusyError(
            f"the kernel refused {knob}{shown} (busy): it can change only while no page is merged; "
            "unmerge first ('udedup unmerge', or allow_unmerge=True / --allow-unmerge)",
            knob=knob, path=path, value=value, errno=code)
    if code in (_errno.EINVAL, _errno.ERANGE):
        return KsmValueError(f"the kernel rejected {knob}{shown}: invalid value"
                             + (" (pages_to_scan cannot be set while advisor_mode is scan-time)"
                                if knob == "pages_to_scan" else ""),
                             knob=knob, path=path, value=value, errno=code)
    if code in (_errno.ENOENT, _errno.ENOTDIR):
        return KsmUnavailableError(f"{path} does not exist: this kernel has no KSM knob {knob!r}",
                                   knob=knob, path=path, value=value, errno=code)
    if code == _errno.ENOMEM:
        return KsmError(f"{action} {knob}{shown} failed: out of memory (unmerging needs a free page "
                        "for every merged mapping)", knob=knob, path=path, value=value, errno=code)
    return KsmError(f"cannot {action} {knob}{shown} ({path}): {os.strerror(code or 0)}",
                    knob=knob, path=path, value=value, errno=code)


# --- snapshots and stats ------------------------------------------------------------------------
@dataclass(frozen=True)
class KnobSnapshot:
    """Every writable knob at one moment, typed. ``snap["run"]``, ``dict(snap)``."""

    values: Mapping[str, object]
    timestamp: float = field(default_factory=time.monotonic)

    def __getitem__(self, name: str):
        return self.values[name]

    def __contains__(self, name) -> bool:
        return name in self.values

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def keys(self):
        return self.values.keys()

    def items(self):
        return self.values.items()

    def as_dict(self) -> dict[str, object]:
        return dict(self.values)


@dataclass(frozen=True)
class KsmStats:
    """One read of every KSM counter.

    ``saved_bytes`` is the kernel's ``general_profit`` where it exists (5.19+ as a file), else the
    same formula rebuilt from the counters: ``(pages_sharing + ksm_zero_pages) * page_size -
    rmap_items * 64``, where the global rmap item count is recovered as ``pages_shared +
    pages_sharing + pages_unshared + pages_volatile`` (the kernel derives ``pages_volatile`` as the
    remainder of exactly that sum, so this is exact unless the kernel clamped ``pages_volatile`` at 0
    in a racy read) and 64 is ``sizeof(struct ksm_rmap_item)`` on 64-bit kernels.
    """

    timestamp: float
    page_size: int
    counters: dict[str, int]

    def _get(self, name: str) -> int:
        return int(self.counters.get(name, 0))

    pages_shared = property(lambda self: self._get("pages_shared"))
    pages_sharing = property(lambda self: self._get("pages_sharing"))
    pages_unshared = property(lambda self: self._get("pages_unshared"))
    pages_volatile = property(lambda self: self._get("pages_volatile"))
    full_scans = property(lambda self: self._get("full_scans"))
    pages_scanned = property(lambda self: self._get("pages_scanned"))
    pages_skipped = property(lambda self: self._get("pages_skipped"))
    ksm_zero_pages = property(lambda self: self._get("ksm_zero_pages"))
    stable_node_chains = property(lambda self: self._get("stable_node_chains"))
    stable_node_dups = property(lambda self: self._get("stable_node_dups"))

    @property
    def general_profit(self) -> int | None:
        return self.counters.get("general_profit")

    @property
    def saved_pages(self) -> int:
        return self.pages_sharing + self.ksm_zero_pages

    @property
    def rmap_items(self) -> int:
        return self.pages_shared + self.pages_sharing + self.pages_unshared + self.pages_volatile

    @property
    def saved_bytes(self) -> int:
        if self.general_profit is not None:
            return int(self.general_profit)
        return self.saved_pages * self.page_size - self.rmap_items * RMAP_ITEM_BYTES

    @property
    def sharing_ratio(self) -> float:
        return self.pages_sharing / self.pages_shared if self.pages_shared else 0.0

    def as_dict(self) -> dict:
        return {"timestamp": self.timestamp, "page_size": self.page_size,
                "counters": dict(self.counters), "saved_pages": self.saved_pages,
                "saved_bytes": self.saved_bytes, "sharing_ratio": self.sharing_ratio,
                "saved_bytes_source": ("general_profit" if self.general_profit is not None
                                       else "computed")}

    def _asdict(self) -> dict:  # for commands._util.print_json
        return self.as_dict()


# --- SIGINT deferral ----------------------------------------------------------------------------
@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C while a multi-knob write or restore runs, then deliver it.

    A KeyboardInterrupt between two knob writes would leave a half-applied state with nothing to
    restore it. Only the main thread can own signal handlers; elsewhere this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except (ValueError, OSError):  # pragma: no cover - e.g. embedded interpreters
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:  # pragma: no cover
                raise KeyboardInterrupt


# --- the controller -----------------------------------------------------------------------------
class Ksm:
    """Controller of one KSM sysfs directory.

    >>> ksm = Ksm()
    >>> with ksm.settings(run=1, pages_to_scan=5000, sleep_millisecs=0, smart_scan=0):
    ...     ksm.wait_settled(timeout=60)
    """

    def __init__(self, root: str = DEFAULT_ROOT, procfs: str = DEFAULT_PROCFS):
        self.root = os.fspath(root)
        self.procfs = os.fspath(procfs)
        if not os.path.isdir(self.root):
            raise KsmUnavailableError(
                f"{self.root} does not exist: this kernel has no KSM (built without CONFIG_KSM, "
                "or sysfs is not mounted)", path=self.root)
        self.page_size: int = os.sysconf("SC_PAGE_SIZE")
        self._ksmd_pid: int | None = None
        self._specs: dict[str, KnobSpec] | None = None
        self._names: tuple[list[str], list[str]] | None = None

    def __repr__(self) -> str:
        return f"Ksm(root={self.root!r})"

    # --- discovery
    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _scan_dir(self) -> tuple[list[str], list[str]]:
        # the set of files is fixed for the life of the kernel: list it once
        if self._names is None:
            self._names = self._list_dir()
        return self._names

    def _list_dir(self) -> tuple[list[str], list[str]]:
        knobs, counters = [], []
        try:
            names = sorted(os.listdir(self.root))
        except OSError as err:
            raise _translate_oserror(err, knob="(directory)", path=self.root, action="list") from err
        for name in names:
            try:
                st = os.stat(self._path(name))
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            (knobs if st.st_mode & 0o200 else counters).append(name)
        return knobs, counters

    def knob_names(self) -> list[str]:
        """Writable knobs on this kernel, sorted."""
        return list(self._scan_dir()[0])

    def counter_names(self) -> list[str]:
        """Read-only counters on this kernel, sorted."""
        return list(self._scan_dir()[1])

    def spec(self, name: str) -> KnobSpec:
        """How knob ``name`` is parsed; KsmValueError / KsmUnavailableError if there is no such knob."""
        if self._specs is None:
            self._specs = {}
        if name in self._specs:
            return self._specs[name]
        knobs, counters = self._scan_dir()
        if name not in knobs:
            if name in counters:
                raise KsmValueError(f"{name} is a read-only counter, not a knob; knobs here: "
                                    f"{', '.join(knobs)}", knob=name)
            if name in _KNOWN:
                raise KsmUnavailableError(
                    f"this kernel has no KSM knob {name!r} (added in Linux {_KNOWN[name].since}; "
                    f"running {os.uname().release})", knob=name)
            raise KsmValueError(f"unknown KSM knob {name!r}; knobs on this kernel: "
                                f"{', '.join(knobs)}", knob=name)
        spec = _KNOWN.get(name)
        if spec is None:
            raw = self._read_raw(name)
            if "[" in raw:
                spec = KnobSpec(name, "choice", choices=tuple(_choices(raw)[1]))
            else:
                spec = KnobSpec(name, "int", minimum=-(2**63) if raw.startswith("-") else 0)
        elif spec.kind == "choice":
            # the kernel lists its own choices: trust them over our table
            raw = self._read_raw(name)
            if "[" in raw:
                spec = dataclasses.replace(spec, choices=tuple(_choices(raw)[1]))
        self._specs[name] = spec
        return spec

    # --- raw I/O
    def _read_raw(self, name: str) -> str:
        path = self._path(name)
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as err:
            raise _translate_oserror(err, knob=name, path=path, action="read") from err

    def _write_raw(self, name: str, text: str, shown=None) -> None:
        path = self._path(name)
        try:
            _sysfs_write(path, text)
        except OSError as err:
            raise _translate_oserror(err, knob=name, path=path, value=shown or text) from err

    # --- typed values
    def parse(self, name: str, value) -> object:
        """Validate ``value`` (Python value or string) for knob ``name``; return the typed value."""
        spec = self.spec(name)
        if spec.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise KsmValueError(f"{name}={value!r}: expected a boolean (0/1, y/n, on/off)",
                                knob=name, value=value)
        if spec.kind == "choice":
            text = str(value).strip()
            if text not in spec.choices:
                raise KsmValueError(f"{name}={value!r}: expected one of {', '.join(spec.choices)}",
                                    knob=name, value=value)
            return text
        if isinstance(value, bool):
            raise KsmValueError(f"{name}={value!r}: expected an integer, not a boolean",
                                knob=name, value=value)
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            try:
                if not text.lstrip("-").isdigit():
                    raise ValueError(text)
                number = int(text, 10)
            except ValueError:
                raise KsmValueError(f"{name}={value!r}: expected a decimal integer",
                                    knob=name, value=value) from None
        if not spec.minimum <= number <= spec.maximum:
            raise KsmValueError(f"{name}={number} is out of range ({spec.minimum}..{spec.maximum})",
                                knob=name, value=value)
        return number

    @staticmethod
    def format(spec: KnobSpec, value) -> str:
        if spec.kind == "bool":
            return "1" if value else "0"
        return str(value)

    def _read_typed(self, name: str) -> object:
        spec = self.spec(name)
        raw = self._read_raw(name)
        if spec.kind == "choice":
            return _choices(raw)[0]
        if spec.kind == "bool":
            return raw.strip() not in ("0", "n", "N", "")
        return int(raw)

    def get(self, name: str) -> object:
        """Typed value of a knob (``advisor_mode`` -> ``"none"``), or of a counter (int)."""
        if name in self.counter_names():
            return int(self._read_raw(name))
        return self._read_typed(name)

    def knobs(self) -> dict[str, object]:
        """Every writable knob, typed."""
        return {name: self._read_typed(name) for name in self.knob_names()}

    def set(self, name: str, value) -> None:
        """Validate, write (unless already the value), re-read to verify."""
        typed = self.parse(name, value)
        self._write_typed(name, typed)

    def _write_typed(self, name: str, typed, force: bool = False) -> bool:
        spec = self.spec(name)
        current = self._read_typed(name)
        if current == typed and not force:
            return False
        text = self.format(spec, typed)
        log.debug("ksm: %s %r -> %s", name, current, text)
        self._write_raw(name, text, shown=text)
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
            raw = self._read_raw(name)
            try:
                counters[name] = int(raw)
            except ValueError:
                log.debug("ksm: counter %s is not an integer: %r", name, raw)
        return KsmStats(timestamp=time.monotonic(), page_size=self.page_size, counters=counters)

    # --- snapshot / apply / restore
    def snapshot(self) -> KnobSnapshot:
        """Every writable knob, typed, now."""
        return KnobSnapshot(self.knobs())

    def changed_since(self, snap: KnobSnapshot) -> dict[str, tuple[object, object]]:
        """Knobs whose value differs from ``snap``: ``{name: (then, now)}``.

        ``pages_to_scan`` is ignored while ``advisor_mode`` is ``scan-time``: the advisor retunes it
        itself once per full scan.
        """
        now = self.knobs()
        changed = {}
        for name, then in snap.items():
            if name == "pages_to_scan" and now.get("advisor_mode") == "scan-time":
                continue
            if now.get(name, then) != then:
                changed[name] = (then, now.get(name))
        return changed

    def validate(self, knobs: Mapping[str, object]) -> dict[str, object]:
        """Parse every value; raise on the first bad one before anything is written."""
        typed = {name: self.parse(name, value) for name, value in knobs.items()}
        mode = typed.get("advisor_mode", None)
        if mode is None and "pages_to_scan" in typed and "advisor_mode" in self.knob_names():
            mode = self.get("advisor_mode")
        if mode == "scan-time" and "pages_to_scan" in typed:
            raise KsmValueError(
                "pages_to_scan cannot be set while advisor_mode is scan-time (the advisor tunes it); "
                "set advisor_mode=none too, or tune advisor_min/max_pages_to_scan",
                knob="pages_to_scan", value=typed["pages_to_scan"])
        return typed

    @staticmethod
    def _order(names) -> list[str]:
        def key(name):
            if name in UNMERGE_KNOBS:
                return (0, name)
            if name == "advisor_mode":
                return (1, name)
            if name == "run":
                return (3, name)
            return (2, name)
        return sorted(names, key=key)

    def _needs_unmerge(self, typed: Mapping[str, object]) -> list[str]:
        need = []
        for name in UNMERGE_KNOBS:
            if name in typed and self._read_typed(name) != typed[name]:
                need.append(name)
        return need

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
                    self._write_raw("run", "2")
                    written.append("run")
                    typed = dict(typed)
                    typed.setdefault("run", previous_run if previous_run != 2 else 0)
        # validate() refused pages_to_scan together with the scan-time advisor
        for name in self._order(typed):
            if self._write_typed(name, typed[name]) and name not in written:
                written.append(name)
        return written

    def apply(self, knobs: Mapping[str, object], allow_unmerge: bool = False) -> KnobSnapshot:
        """Validate all, then write all, or none: a failure rolls back what was written.

        Returns the snapshot taken before writing (give it to :meth:`restore`).
        """
        return self._apply(self.validate(knobs), allow_unmerge)

    def _apply(self, typed: Mapping[str, object], allow_unmerge: bool) -> KnobSnapshot:
        """:meth:`apply` of values :meth:`validate` already returned."""
        before = self.snapshot()
        try:
            # a Ctrl-C held during the writes is delivered when they end, and lands in the
            # rollback below like any other failure
            with _sigint_deferred():
                self._write_all(typed, allow_unmerge)
        except BaseException:
            with _sigint_deferred():
                try:
                    self._restore(before, allow_unmerge=allow_unmerge)
                except KsmError as rollback_err:
                    log.error("ksm: rolling back a failed change also failed: %s", rollback_err)
            raise
        return before

    def restore(self, snap: KnobSnapshot, allow_unmerge: bool = False) -> None:
        """Put every knob of ``snap`` back, in an order the kernel accepts.

        ``max_page_sharing`` / ``merge_across_nodes`` can only change with no KSM page left: that
        needs ``allow_unmerge=True`` (``run=2`` first), else :class:`KsmBusyError` before anything is
        written. Otherwise best effort: every knob that can be restored is, and the first error is
        raised at the end.
        """
        with _sigint_deferred():
            self._restore(snap, allow_unmerge)

    def _restore(self, snap: KnobSnapshot, allow_unmerge: bool) -> None:
        present = set(self.knob_names())
        typed = {name: value for name, value in snap.items() if name in present}
        busy = self._needs_unmerge(typed)
        if busy and not allow_unmerge and self.stats().pages_shared:
            raise KsmBusyError(
                f"cannot restore {', '.join(busy)} while KSM pages exist: restore with "
                "allow_unmerge=True or unmerge first ('udedup unmerge')", knob=busy[0])
        first_error = None
        if busy and allow_unmerge and (self.stats().pages_shared or self.get("run") == 1):
            self._write_raw("run", "2")
        mode = typed.get("advisor_mode")
        for name in self._order(typed):
            if name == "pages_to_scan" and mode == "scan-time":
                continue
            try:
                self._write_typed(name, typed[name])
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
        before = self._apply(typed, allow_unmerge)
        applied = None
        try:
            applied = self.snapshot()
            yield self
        finally:
            try:
                outside = self.changed_since(applied) if applied is not None else {}
            except KsmError:
                outside = {}
            outside.pop("run", None)  # unmerge_all() inside the block is ours
            if outside:
                log.warning("ksm: knobs changed by someone else during settings(): %s; restoring "
                            "them anyway", ", ".join(f"{k} {a!r}->{b!r}" for k, (a, b) in
                                                     outside.items()))
            self.restore(before, allow_unmerge=allow_unmerge)

    # --- actions
    def unmerge_all(self) -> None:
        """``run=2`` (unmerge every KSM page; registrations stay), then ``run`` back as it was."""
        previous = self.get("run")
        with _sigint_deferred():
            try:
                self._write_raw("run", "2")
            finally:
                # on failure the kernel leaves run=0: put the old value back either way
                if previous != 2:
                    self._write_typed("run", previous)

    def _check_running(self, stats: KsmStats | None = None) -> None:
        run = self.get("run")
        if run != 1:
            why = {0: "stopped (run=0)", 2: "stopped and unmerging (run=2)"}.get(run, f"run={run}")
            raise KsmNotRunningError(
                f"ksmd is {why}: nothing will merge or settle; set run=1 (ksm.settings(run=1) or "
                "'udedup set run=1')", knob="run", value=run, stats=stats)

    def wait_settled(self, timeout: float = 60.0, poll: float = 0.05, stable_scans: int = 2,
                     min_scans: int = 3) -> KsmStats:
        """Block until merging has settled; return the final stats.

        Settled means both:
        - ``full_scans`` advanced by at least ``min_scans`` since the call: a page needs two visits
          before ksmd tries to merge it, and the scan in progress at the call may already have
          passed it, so 3 scans guarantee two full visits of every page registered before the call;
        - the saved pages (``pages_sharing + ksm_zero_pages``) and ``pages_shared`` did not change
          across ``stable_scans`` consecutive full scans.
        ``run=2`` resets ``full_scans`` to 0: a drop is counted as a restart, not as going backwards.
        Raises :class:`KsmNotRunningError` at once if ksmd is not running, and :class:`KsmTimeout`
        (``.stats`` = last counters) after ``timeout`` seconds.
        """
        if stable_scans < 1 or min_scans < 1:
            raise KsmValueError("wait_settled: stable_scans and min_scans must be >= 1")
        start = self.stats()
        self._check_running(start)
        deadline = time.monotonic() + timeout
        offset = 0                     # scans counted before the last reset
        last_raw = start.full_scans
        base = start.full_scans
        mark = (start.saved_pages, start.pages_shared)
        mark_scan = base
        stats = start
        while True:
            stats = self.stats()
            raw = stats.full_scans
            if raw < last_raw:         # run=2 happened: full_scans restarted at 0
                offset += last_raw
            last_raw = raw
            scans = offset + raw
            now_mark = (stats.saved_pages, stats.pages_shared)
            if now_mark != mark:
                # the change may belong to the scan still in progress (number scans + 1): count
                # clean scans only after that one
                mark, mark_scan = now_mark, scans + 1
            if scans - base >= min_scans and scans - mark_scan >= stable_scans:
                return stats
            if time.monotonic() >= deadline:
                run = self.get("run")
                raise KsmTimeout(
                    f"KSM did not settle within {timeout:g} s: full_scans advanced by {scans - base} "
                    f"(need {min_scans}), saved pages stable for {scans - mark_scan} scans (need "
                    f"{stable_scans}); run={run}, pages_to_scan={self._maybe('pages_to_scan')}, "
                    f"sleep_millisecs={self._maybe('sleep_millisecs')}: raise pages_to_scan or the "
                    "timeout", stats=stats)
            time.sleep(poll)

    def _maybe(self, name: str):
        try:
            return self.get(name)
        except KsmError:
            return "?"

    # --- ksmd CPU time
    def ksmd_pid(self) -> int:
        """PID of the ksmd kernel thread (cached while it stays ksmd)."""
        if self._ksmd_pid is not None and _comm(self.procfs, self._ksmd_pid) == "ksmd":
            return self._ksmd_pid
        self._ksmd_pid = None
        try:
            entries = os.listdir(self.procfs)
        except OSError as err:
            raise KsmUnavailableError(f"cannot list {self.procfs}: {err.strerror}",
                                      path=self.procfs) from err
        for entry in entries:
            if entry.isdigit() and _comm(self.procfs, int(entry)) == "ksmd":
                self._ksmd_pid = int(entry)
                return self._ksmd_pid
        raise KsmUnavailableError(f"no ksmd kernel thread in {self.procfs} (kernel without KSM, or "
                                  "procfs hides kernel threads)", path=self.procfs)

    def _ksmd_stat_fields(self) -> list[str]:
        pid = self.ksmd_pid()
        path = os.path.join(self.procfs, str(pid), "stat")
        try:
            with open(path) as f:
                text = f.read()
        except OSError as err:
            self._ksmd_pid = None
            raise KsmUnavailableError(f"cannot read {path}: {err.strerror}", path=path) from err
        # comm may contain spaces and parentheses: fields start after the last ')'
        return text[text.rindex(")") + 2:].split()

    def ksmd_cpu_seconds(self) -> float:
        """utime + stime of ksmd, in seconds (resolution 1/SC_CLK_TCK)."""
        fields = self._ksmd_stat_fields()
        # fields[0] is stat field 3 (state): utime is field 14, stime field 15
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def ksmd_start_seconds(self) -> float:
        """When ksmd started, in seconds since boot (stat field 22)."""
        return int(self._ksmd_stat_fields()[19]) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def experiment_lock(path: str = LOCK_PATH, enabled: bool = True) -> Iterator[None]:
    """Hold ``path`` (flock, exclusive) for the block; ``enabled=False`` when the caller holds it."""
    if not enabled:
        yield
        return
    with open(path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sysfs_write(path: str, text: str) -> None:
    """One write(2) of ``text``: sysfs parses the value from a single call and returns the kernel's
    error from it. Module-level so unit tests can stand in a fake kernel."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC: a no-op on sysfs, right on fake trees
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _choices(raw: str) -> tuple[str, list[str]]:
    """``"[none] scan-time"`` -> ``("none", ["none", "scan-time"])``."""
    words = raw.split()
    selected = next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), "")
    return selected, [w.strip("[]") for w in words]


def _comm(procfs: str, pid: int) -> str | None:
    try:
        with open(os.path.join(procfs, str(pid), "comm")) as f:
            return f.read().strip()
    except OSError:
        return None
