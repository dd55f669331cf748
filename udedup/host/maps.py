"""Mappings of a process, from /proc/PID/smaps (or maps), each classified the way
``vma_ksm_compatible()`` in mm/ksm.c does: KSM-compatible or not, and why not, in words."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProcessNotFoundError
from .fs import ProcFs, as_procfs

# VmFlags mnemonics that make a VMA incompatible with KSM (vma_ksm_compatible), with the words
# an operator needs. Order matters: the first match is the reason given.
_INCOMPATIBLE = (
    ("ht", "hugetlb", "hugetlbfs pages are never merged by KSM"),
    ("pf", "pfnmap", "raw PFN mapping (device or driver memory): KSM cannot merge it"),
    ("io", "io", "memory-mapped I/O: KSM cannot merge it"),
    ("mm", "mixedmap", "mixed PFN/page mapping (driver memory): KSM cannot merge it"),
    ("dp", "droppable", "droppable mapping (MAP_DROPPABLE): KSM ignores it"),
    ("de", "special", "special kernel-installed mapping (VM_DONTEXPAND): KSM ignores it"),
    ("sh", "shared", "shared mapping (MAP_SHARED): KSM merges only private anonymous pages"),
    ("ms", "shared", "shared mapping (MAP_SHARED): KSM merges only private anonymous pages"),
)
_SPECIAL_PATHS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]", "[sigpage]",
                  "[vectors]")


@dataclass(frozen=True)
class Mapping:
    """One VMA of a process, from smaps. Sizes are bytes."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str
    vmflags: frozenset
    rss: int = 0
    anonymous: int = 0
    ksm: int = 0
    anon_huge: int = 0
    swap: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def registered(self) -> bool:
        """VM_MERGEABLE is set: ksmd scans this mapping (madvise or PR_SET_MEMORY_MERGE)."""
        return "mg" in self.vmflags

    @property
    def kind(self) -> str:
        """anon, file (private file mapping), shared, hugetlb, pfnmap, io, mixedmap, droppable or
        special."""
        for flag, kind, _ in _INCOMPATIBLE:
            if flag in self.vmflags:
                return kind
        if self.path in _SPECIAL_PATHS:
            return "special"
        if self.inode:
            return "file"
        return "anon"

    @property
    def eligible(self) -> bool:
        """KSM can register this mapping. A private file mapping is compatible too, but only its
        copy-on-write (anonymous) pages are candidates; its page-cache pages never merge."""
        return self.kind in ("anon", "file")

    @property
    def reason(self) -> str | None:
        """Why KSM cannot use this mapping at all, in words; None when it is eligible."""
        for flag, _, why in _INCOMPATIBLE:
            if flag in self.vmflags:
                return why
        if self.path in _SPECIAL_PATHS:
            return f"special kernel mapping {self.path}: KSM ignores it"
        return None

    @property
    def name(self) -> str:
        return self.path or "[anon]"


def _size_kb(value: str) -> int:
    return int(value.split()[0]) * 1024


_SIZE_FIELDS = {"Rss": "rss", "Anonymous": "anonymous", "KSM": "ksm", "AnonHugePages": "anon_huge",
                "Swap": "swap"}


def parse_smaps(text: str) -> list[Mapping]:
    """Mappings from the text of /proc/PID/smaps (also accepts /proc/PID/maps: no flags, no sizes)."""
    mappings: list[Mapping] = []
    head = None
    sizes: dict[str, int] = {}
    flags: frozenset = frozenset()

    def flush():
        if head is not None:
            mappings.append(Mapping(*head, vmflags=flags, **sizes))

    for line in text.splitlines():
        if not line:
            continue
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            flush()
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            head = (start, end, parts[1], int(parts[2], 16), parts[3], int(parts[4]), path)
            sizes, flags = {}, frozenset()
        elif first == "VmFlags:":
            flags = frozenset(line.split()[1:])
        elif first[:-1] in _SIZE_FIELDS and first.endswith(":"):
            sizes[_SIZE_FIELDS[first[:-1]]] = _size_kb(line.split(None, 1)[1])
    flush()
    return mappings


def read_mappings(pid: int, procfs: ProcFs | str = "/proc", name: str = "smaps") -> list[Mapping]:
    """Every mapping of ``pid`` with its VmFlags and smaps sizes, in address order (``name="maps"``:
    addresses and permissions only, much cheaper).

    Raises ProcessNotFoundError, ProcessAccessError or KernelThreadError, each one line."""
    fs = as_procfs(procfs)
    fs.check_process(pid)
    mappings = parse_smaps(fs.read_text(pid, name))
    if not mappings:
        # smaps of a live user process is never empty; empty means the mm is being torn down
        fs.check_process(pid)
        raise ProcessNotFoundError(f"PID {pid} is exiting: it has no memory left to read", pid=pid)
    return mappings
