"""The THP knob table: what each file of /sys/kernel/mm/transparent_hugepage accepts, how its name is
spelled as a knob (``thp.`` + its path under that directory), and which knobs this kernel has.

THP knobs are driven like KSM knobs (:class:`udedup.ksm.Ksm` validates, writes, verifies, restores
them, in :func:`udedup.ksm.knobs.write_order`): ``thp.enabled=never``, ``thp.khugepaged/defrag=0``,
``thp.hugepages-2048kB/enabled=inherit``. The dotted spelling ``thp.khugepaged.defrag`` names the same
file (no THP file or directory name has a dot); :func:`canonical` turns either into the slashed one.

Knobs are discovered from the directory (its regular files and those of its subdirectories, a mode
with a write bit making a knob), never from a list: they differ by kernel version and config. The
table below types the ones whose limits the kernel source states (mm/huge_memory.c,
mm/khugepaged.c); a choice file lists its choices itself (``always [madvise] never``), and a file
missing from the table is typed by what it reads (:func:`udedup.ksm.knobs.spec_from_raw`).
"""
from __future__ import annotations

import difflib
import fnmatch
import os

from ..errors import KsmUnavailableError, KsmValueError
from .knobs import U32, KnobSpec, spec_from_raw

DEFAULT_ROOT = "/sys/kernel/mm/transparent_hugepage"
PREFIX = "thp."

#: Subdirectories holding counters only (per-size ``hugepages-*kB/stats``): not walked.
_COUNTER_DIRS = ("stats",)


def _pmd_limited(name: str, since: str, pmd_pages: int) -> KnobSpec:
    # khugepaged: kstrtoul, then "> HPAGE_PMD_NR - 1" is EINVAL
    return KnobSpec(name, "int", 0, pmd_pages - 1, since=since)


def known_specs(pmd_pages: int = 512) -> dict[str, KnobSpec]:
    """The THP knobs whose limits the kernel states, by knob name; ``hugepages-*`` entries are
    patterns for every per-size directory. ``pmd_pages``: base pages per PMD huge page
    (``hpage_pmd_size`` / page size, 512 on x86-64 with 4 KiB pages)."""
    specs = (
        KnobSpec("thp.enabled", "choice", since="2.6.38"),          # always/madvise/never
        KnobSpec("thp.defrag", "choice", since="2.6.38"),           # always/defer/.../never
        KnobSpec("thp.shmem_enabled", "choice", since="4.8"),
        KnobSpec("thp.use_zero_page", "bool", since="3.8"),         # single_hugepage_flag_store
        KnobSpec("thp.shrink_underused", "bool", since="6.12"),     # kstrtobool
        KnobSpec("thp.khugepaged/defrag", "bool", since="2.6.38"),  # single_hugepage_flag_store
        KnobSpec("thp.khugepaged/pages_to_scan", "int", 1, U32, since="2.6.38"),  # 0: EINVAL
        KnobSpec("thp.khugepaged/scan_sleep_millisecs", "int", 0, U32, since="2.6.38"),
        KnobSpec("thp.khugepaged/alloc_sleep_millisecs", "int", 0, U32, since="2.6.38"),
        _pmd_limited("thp.khugepaged/max_ptes_none", "2.6.38", pmd_pages),
        _pmd_limited("thp.khugepaged/max_ptes_swap", "4.8", pmd_pages),
        _pmd_limited("thp.khugepaged/max_ptes_shared", "5.8", pmd_pages),
        KnobSpec("thp.hugepages-*/enabled", "choice", since="6.8"),  # always/inherit/madvise/never
        KnobSpec("thp.hugepages-*/shmem_enabled", "choice", since="6.11"),
    )
    return {spec.name: spec for spec in specs}


def is_thp(name: str) -> bool:
    return str(name).startswith(PREFIX)


def canonical(name: str) -> str:
    """``thp.khugepaged.defrag`` -> ``thp.khugepaged/defrag``; other names unchanged."""
    if not is_thp(name):
        return name
    return PREFIX + name[len(PREFIX):].replace(".", "/").strip("/")


def check_spellings(names) -> None:
    """KsmValueError when two of ``names`` spell one knob (``thp.a.b`` and ``thp.a/b``)."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(canonical(name), name)
        if other != name:
            raise KsmValueError(f"{other} and {name} name the same knob: give it once", knob=name)


def relpath(name: str) -> str:
    """The file of THP knob ``name`` relative to the THP directory."""
    return canonical(name)[len(PREFIX):]


def known(name: str, pmd_pages: int = 512) -> KnobSpec | None:
    """The table's spec of ``name`` (canonical), renamed for a per-size file; None if untyped."""
    table = known_specs(pmd_pages)
    if name in table:
        return table[name]
    for pattern, spec in table.items():
        if "*" in pattern and fnmatch.fnmatchcase(name, pattern):
            return KnobSpec(name, spec.kind, spec.minimum, spec.maximum, spec.choices, spec.since)
    return None


def spec_for(name: str, raw: str, pmd_pages: int = 512) -> KnobSpec:
    """How THP knob ``name`` (canonical) is parsed, given what its file reads now."""
    return spec_from_raw(name, raw, known(name, pmd_pages))


def discover(sysfs, root: str) -> tuple[list[str], list[str]]:
    """``(knobs, read_only)``: the ``thp.*`` names of the writable and the read-only files of
    ``root`` and of its subdirectories (``khugepaged/``, ``hugepages-*kB/``), each sorted.
    ``([], [])`` when ``root`` does not exist (a kernel without CONFIG_TRANSPARENT_HUGEPAGE)."""
    if not os.path.isdir(root):
        return [], []
    knobs, read_only = [], []
    # the subdirectories' names are not knobs: listing them needs the directory itself
    with os.scandir(root) as it:
        subdirs = sorted(e.name for e in it if e.is_dir() and e.name not in _COUNTER_DIRS)
    for sub in [""] + subdirs:
        for name, writable in sysfs.listdir(os.path.join(root, sub)):
            (knobs if writable else read_only).append(PREFIX + os.path.join(sub, name))
    return sorted(knobs), sorted(read_only)


def pmd_pages(sysfs, root: str, page_size: int) -> int:
    """Base pages per PMD huge page, from ``hpage_pmd_size`` (512 when it cannot be read)."""
    path = os.path.join(root, "hpage_pmd_size")
    if not os.path.exists(path):
        return 512
    try:
        return max(2, int(sysfs.read(path, knob="thp.hpage_pmd_size")) // page_size)
    except (ValueError, OSError):
        return 512


def describe(knobs: list[str]) -> str:
    """The knob list for a message: the per-size files folded into one pattern each."""
    sized = [k for k in knobs if relpath(k).startswith("hugepages-")]
    plain = [k for k in knobs if k not in sized]
    text = ", ".join(plain)
    files = sorted({relpath(k).split("/", 1)[-1] for k in sized})
    if files:
        sizes = len({relpath(k).split("/", 1)[0] for k in sized})
        text += (f", and thp.hugepages-<size>kB/{{{','.join(files)}}} for {sizes} sizes")
    return text


def unknown_message(name: str, knobs: list[str], root: str = DEFAULT_ROOT) -> str:
    """The one-line error for a ``thp.*`` name this kernel lacks."""
    near = difflib.get_close_matches(name, knobs, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return (f"unknown THP knob {name!r}{hint}; a THP knob is thp. + a file under "
            f"{root}; THP knobs here: {describe(knobs)}")


def check_name(name: str, knobs: list[str], read_only: list[str], root: str) -> None:
    """Raise the one-line error for a ``thp.*`` name that is not a knob of ``root``: read-only
    (exit 6), no THP at all or a knob this kernel is too old for (exit 3), unknown (exit 6)."""
    if name in knobs:
        return
    if name in read_only:
        raise KsmValueError(f"{name} is read-only, not a knob; THP knobs here: {describe(knobs)}",
                            knob=name)
    if not os.path.isdir(root):
        raise KsmUnavailableError(f"{root} does not exist: this kernel has no transparent huge "
                                  f"pages (CONFIG_TRANSPARENT_HUGEPAGE), so no {name}",
                                  knob=name, path=root)
    spec = known_specs().get(name)
    if spec is not None:
        raise KsmUnavailableError(f"this kernel has no THP knob {name!r} (added in Linux "
                                  f"{spec.since}; running {os.uname().release})", knob=name)
    raise KsmValueError(unknown_message(name, knobs, root), knob=name)
