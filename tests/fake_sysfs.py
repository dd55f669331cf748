"""Fake /sys/kernel/mm/ksm trees for unit tests: a file with the owner write bit is a knob, a
read-only one a counter, as udedup.ksm tells them apart; and :class:`StoreSysFs`, a SysFs whose
writes a test plays the kernel for."""
from __future__ import annotations

import os

from udedup.host.fs import SysFs, knob_error

# what Linux 6.18 has, at the boot defaults
KNOBS_618 = {
    "run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "use_zero_pages": "0",
    "smart_scan": "1", "max_page_sharing": "256", "merge_across_nodes": "1",
    "stable_node_chains_prune_millisecs": "2000", "advisor_mode": "[none] scan-time",
    "advisor_max_cpu": "70", "advisor_min_pages_to_scan": "500",
    "advisor_max_pages_to_scan": "30000", "advisor_target_scan_time": "200",
}
COUNTERS_618 = {
    "full_scans": "0", "general_profit": "0", "ksm_zero_pages": "0", "pages_scanned": "0",
    "pages_shared": "0", "pages_sharing": "0", "pages_skipped": "0", "pages_unshared": "0",
    "pages_volatile": "0", "stable_node_chains": "0", "stable_node_dups": "0",
}
# the knobs and counters the daemon reads or writes
MINIMAL_KNOBS = {k: KNOBS_618[k] for k in ("run", "pages_to_scan", "sleep_millisecs",
                                           "use_zero_pages", "smart_scan", "max_page_sharing",
                                           "advisor_mode")}
MINIMAL_COUNTERS = {k: "0" for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                     "pages_volatile", "full_scans", "pages_scanned",
                                     "ksm_zero_pages", "general_profit")}


def make_fake_ksm(root, knobs=None, counters=None, **overrides):
    """Write ``knobs`` (default: 6.18's) and ``counters`` under ``root``; ``overrides`` set knobs."""
    knobs = dict(KNOBS_618 if knobs is None else knobs)
    knobs.update({k: str(v) for k, v in overrides.items()})
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    for table, mode in ((knobs, 0o644), (COUNTERS_618 if counters is None else counters, 0o444)):
        for name, value in table.items():
            (root / name).write_text(value + "\n")
            os.chmod(root / name, mode)
    return root


def read_tree(root) -> dict[str, str]:
    """Every file of a fake tree and its text: compare before and after to prove nothing changed."""
    return {p.name: p.read_text() for p in sorted(root.iterdir())}


class StoreSysFs(SysFs):
    """A :class:`SysFs` that hands every knob write to ``store(path, text)``, a test's stand-in for
    the kernel's store function: it updates the fake tree or raises OSError(errno), which reaches the
    caller translated as the real SysFs translates it. Reads are the tree's files.
    ``Ksm(root, sysfs=StoreSysFs(store))``."""

    def __init__(self, store, root: str = "/sys"):
        super().__init__(root)
        self.store = store

    def write(self, path, text, knob, shown=None):
        try:
            self.store(path, text)
        except OSError as err:
            raise knob_error(err, knob=knob, path=path, value=shown or text) from err


# /sys/kernel/mm/transparent_hugepage as Linux 6.18 has it on x86-64 (a few per-size directories)
THP_618 = {
    "enabled": "always [madvise] never", "defrag": "always defer defer+madvise [madvise] never",
    "shmem_enabled": "always within_size advise [never] deny force", "use_zero_page": "1",
    "shrink_underused": "1",
    "khugepaged/defrag": "1", "khugepaged/pages_to_scan": "4096",
    "khugepaged/scan_sleep_millisecs": "10000", "khugepaged/alloc_sleep_millisecs": "60000",
    "khugepaged/max_ptes_none": "511", "khugepaged/max_ptes_swap": "64",
    "khugepaged/max_ptes_shared": "256",
    "hugepages-2048kB/enabled": "always [inherit] madvise never",
    "hugepages-64kB/enabled": "always inherit madvise [never]",
}
THP_COUNTERS_618 = {"hpage_pmd_size": "2097152", "khugepaged/full_scans": "3",
                    "khugepaged/pages_collapsed": "0", "hugepages-2048kB/stats/anon_fault_alloc": "0"}


def make_fake_thp(root, knobs=None, counters=None, **overrides):
    """A THP directory under ``root`` (``transparent_hugepage`` beside a fake ``ksm`` is where
    ``Ksm`` looks by default): ``knobs`` by path (default :data:`THP_618`), ``overrides`` by path
    with ``/`` spelled ``__`` (``khugepaged__defrag="0"``)."""
    knobs = dict(THP_618 if knobs is None else knobs)
    knobs.update({k.replace("__", "/"): str(v) for k, v in overrides.items()})
    for table, mode in ((knobs, 0o644), (THP_COUNTERS_618 if counters is None else counters, 0o444)):
        for name, value in table.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value + "\n")
            os.chmod(path, mode)
    return root


def read_thp(root) -> dict[str, str]:
    """Every file of a fake THP tree by path and its text (the stats subdirectories included)."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}
