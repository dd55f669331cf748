"""Pure parsers of the kernel's text formats: no I/O, so each is tested on literal text.

/proc/PID/stat, /proc/PID/status, /proc/PID/ksm_stat, /proc/PID/cgroup, /proc/meminfo and the PSI
files (/proc/pressure/*). smaps has its own module (:mod:`.maps`): it also classifies mappings.
"""
from __future__ import annotations

from dataclasses import dataclass

#: task flag of kernel threads (include/linux/sched.h), stat field 9
PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat (or /proc/PID/task/TID/stat) that udedup uses.

    ``fields`` keeps every field after the command name, ``fields[0]`` being field 3 (state), for
    the rare caller that needs another one."""

    pid: int
    comm: str
    state: str          # R, S, D, Z, X, T, t, ...
    ppid: int
    flags: int          # PF_* task flags
    utime: int          # clock ticks
    stime: int          # clock ticks
    start_time: int     # clock ticks since boot: a pid plus this names one process
    fields: tuple

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def exited(self) -> bool:
        """A zombie or a dead task: its memory is gone."""
        return self.state in ("Z", "X")


def parse_stat(text: str) -> ProcStat:
    """/proc/PID/stat. The command name may hold spaces and parentheses: the fields start after the
    last ``)``. Raises ValueError on text that is not a stat line."""
    if "(" not in text or ")" not in text:
        raise ValueError(f"not a /proc stat line: {text[:60]!r}")
    pid = int(text.split("(", 1)[0])
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = tuple(text[text.rindex(")") + 1:].split())
    if len(fields) < 7:
        raise ValueError(f"short /proc stat line ({len(fields)} fields after the name)")

    def field(k):   # fields[k] is stat field k + 3 (proc(5)); old kernels and fakes stop early
        return int(fields[k]) if k < len(fields) else 0

    # ppid 4, flags 9, utime 14, stime 15, starttime 22
    return ProcStat(pid=pid, comm=comm, state=fields[0], ppid=field(1), flags=field(6),
                    utime=field(11), stime=field(12), start_time=field(19), fields=fields)


def parse_status(text: str) -> dict[str, str]:
    """/proc/PID/status as ``{field: value}`` (values stripped, kept as text)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def status_ids(status: dict, key: str) -> list[int]:
    """``Uid``/``Gid`` of a parsed status: real, effective, saved, filesystem."""
    return [int(x) for x in status.get(key, "").split()]


def status_kib(status: dict, key: str) -> int:
    """A ``VmRSS: 123 kB``-style status field in bytes (0 when absent)."""
    value = status.get(key, "")
    return int(value.split()[0]) * 1024 if value else 0


def status_has_cap(status: dict, cap: int) -> bool:
    """The capability numbered ``cap`` is in ``CapEff``."""
    try:
        return bool(int(status.get("CapEff", "0"), 16) >> cap & 1)
    except ValueError:
        return False


def _flag(text: str):
    return {"yes": True, "no": False}.get(text.strip().lower())


def parse_ksm_stat(text: str) -> dict[str, object]:
    """/proc/PID/ksm_stat -> ``{name: int | bool | str}``.

    Counters are ints; ``ksm_merge_any: yes`` / ``ksm_mergeable: no`` are bools; anything else stays
    text. The kernel writes both ``name value`` and ``name: value`` lines."""
    values: dict[str, object] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        name, _, rest = line.partition(":") if ":" in line else line.partition(" ")
        rest = rest.strip()
        if rest.lstrip("-").isdigit():
            values[name.strip()] = int(rest)
        else:
            flag = _flag(rest)
            values[name.strip()] = flag if flag is not None else rest
    return values


def parse_cgroup(text: str) -> str:
    """The cgroup v2 path of /proc/PID/cgroup (the ``0::`` line), ``""`` without one."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return ""


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> ``{field: bytes}`` (``HugePages_*`` counts stay counts)."""
    info = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            value = int(parts[0])
            info[name.strip()] = value * 1024 if parts[1:] == ["kB"] else value
    return info


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """A PSI file (/proc/pressure/memory) -> ``{"some": {"avg10": ..., "total": ...}, "full": ...}``."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, *parts = line.split()
        values = {}
        for part in parts:
            key, _, value = part.partition("=")
            try:
                values[key] = float(value)
            except ValueError:
                continue
        out[kind] = values
    return out


def parse_cmdline(raw: bytes) -> str:
    """/proc/PID/cmdline (NUL-separated) as one line of text."""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def parse_choices(raw: str) -> tuple[str, list[str]]:
    """A sysfs choice file: ``"[none] scan-time"`` -> ``("none", ["none", "scan-time"])``."""
    words = raw.split()
    selected = next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), "")
    return selected, [w.strip("[]") for w in words]
