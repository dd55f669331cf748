"""The KSM knob table: what each knob accepts, how its value is parsed and written, the one order
the kernel accepts writes in, the one place the scan-time advisor's exception is decided, and the
typed snapshot of every knob.

Pure: no I/O. :class:`udedup.ksm.Ksm` reads and writes the files; the daemon and the A/B engine
import :func:`write_order` and :func:`pages_to_scan_ignored` from here so every writer agrees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..errors import KsmValueError
from ..host.parse import parse_choices

U32 = 2**32 - 1
ULONG = 2**64 - 1

#: Knobs that the kernel refuses to change (EBUSY) while any KSM page exists.
UNMERGE_KNOBS = ("max_page_sharing", "merge_across_nodes")

#: The advisor_mode under which the kernel tunes pages_to_scan itself.
SCAN_TIME = "scan-time"


@dataclass(frozen=True)
class KnobSpec:
    """How one knob is parsed, validated and written."""

    name: str
    kind: str                     # "int", "bool" or "choice"
    minimum: int = 0
    maximum: int = ULONG
    choices: tuple[str, ...] = ()
    since: str = ""               # kernel version that added it (for "not on this kernel" messages)


# What mm/ksm.c accepts for each knob we know (kstrtouint -> u32, kstrtoul -> u64, explicit checks).
# A knob found in the directory but missing here is treated as a non-negative integer, or as a choice
# when it reads like "[a] b" (see spec_from_raw).
KNOWN: dict[str, KnobSpec] = {spec.name: spec for spec in (
    KnobSpec("run", "int", 0, 2, since="2.6.32"),
    KnobSpec("pages_to_scan", "int", 0, U32, since="2.6.32"),
    KnobSpec("sleep_millisecs", "int", 0, U32, since="2.6.32"),
    KnobSpec("merge_across_nodes", "bool", since="3.9"),
    KnobSpec("max_page_sharing", "int", 2, 2**31 - 1, since="4.13"),
    KnobSpec("stable_node_chains_prune_millisecs", "int", 0, U32, since="4.13"),
    KnobSpec("use_zero_pages", "bool", since="4.11"),
    KnobSpec("smart_scan", "bool", since="6.7"),
    KnobSpec("advisor_mode", "choice", choices=("none", SCAN_TIME), since="6.9"),
    KnobSpec("advisor_max_cpu", "int", 0, ULONG, since="6.9"),
    KnobSpec("advisor_min_pages_to_scan", "int", 0, ULONG, since="6.9"),
    KnobSpec("advisor_max_pages_to_scan", "int", 0, ULONG, since="6.9"),
    KnobSpec("advisor_target_scan_time", "int", 1, ULONG, since="6.9"),
)}

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


_TRUE = {"1", "y", "yes", "on", "true"}
_FALSE = {"0", "n", "no", "off", "false"}


def spec_from_raw(name: str, raw: str, known: KnobSpec | None = None) -> KnobSpec:
    """The spec of knob ``name`` given what its file reads now.

    ``known``: the table's spec (default: :data:`KNOWN`'s; :mod:`.thp` passes its own). A choice
    knob lists its choices itself (``"[none] scan-time"``): the kernel's list wins over the table's.
    A knob missing from the table is an integer (signed if it reads negative), or a choice when it
    reads like one.
    """
    spec = known if known is not None else KNOWN.get(name)
    bracketed = "[" in raw
    if spec is None:
        if bracketed:
            return KnobSpec(name, "choice", choices=tuple(parse_choices(raw)[1]))
        return KnobSpec(name, "int", minimum=-(2**63) if raw.startswith("-") else 0)
    if spec.kind == "choice" and bracketed:
        return KnobSpec(spec.name, "choice", choices=tuple(parse_choices(raw)[1]),
                        since=spec.since)
    return spec


def parse_value(spec: KnobSpec, value) -> object:
    """Validate ``value`` (Python value or string) for ``spec``; return the typed value."""
    name = spec.name
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
        if not text.lstrip("-").isdigit():
            raise KsmValueError(f"{name}={value!r}: expected a decimal integer",
                                knob=name, value=value)
        number = int(text, 10)
    if not spec.minimum <= number <= spec.maximum:
        raise KsmValueError(f"{name}={number} is out of range ({spec.minimum}..{spec.maximum})",
                            knob=name, value=value)
    return number


def format_value(spec: KnobSpec, value) -> str:
    """The text written to the knob's file for a typed value."""
    if spec.kind == "bool":
        return "1" if value else "0"
    return str(value)


def read_value(spec: KnobSpec, raw: str) -> object:
    """The typed value of what the knob's file reads (a choice file reads ``"[a] b"``)."""
    if spec.kind == "choice":
        return parse_choices(raw)[0]
    if spec.kind == "bool":
        return raw.strip() not in ("0", "n", "N", "")
    return int(raw)


def write_order(names: Iterable[str]) -> list[str]:
    """``names`` in the one order the kernel accepts them written in.

    1. ``max_page_sharing`` / ``merge_across_nodes`` first: they change only with no KSM page left,
       so the writer unmerges (``run=2``, its own write, before this list) and writes them before
       anything can restart ksmd;
    2. ``advisor_mode``: switching it resets ``pages_to_scan``, so a ``pages_to_scan`` written
       before it would be lost;
    3. every other KSM knob;
    4. the THP knobs (``thp.*``): after KSM's, before ``run``, so a ksmd that restarts finds the
       final THP mode (what it merges out of huge pages depends on it); they depend on none of
       KSM's and the kernel takes them in any order among themselves;
    5. ``run`` last, so ksmd restarts with the final settings.
    """
    def key(name: str):
        if name in UNMERGE_KNOBS:
            return (0, name)
        if name == "advisor_mode":
            return (1, name)
        if name == "run":
            return (4, name)
        if name.startswith("thp."):
            return (3, name)
        return (2, name)
    return sorted(names, key=key)


def pages_to_scan_ignored(knobs: Mapping[str, object]) -> bool:
    """True while ``advisor_mode`` (typed, as in ``knobs``) is scan-time: the advisor retunes
    ``pages_to_scan`` itself once per full scan, so it is neither written, restored nor reported as
    changed, and the kernel refuses a write of it (EINVAL)."""
    return knobs.get("advisor_mode") == SCAN_TIME
