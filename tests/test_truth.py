"""True savings on fake /proc trees: pagemap files written with numpy, smaps with ``mg`` flags,
ksm_stat files; and the pagemap helpers on made-up entries."""
from __future__ import annotations

import os

import numpy as np
import pytest

from udedup.host import pagemap as pm
from udedup.ksm.stats import KsmStats
from udedup.ksm.truth import NEVER_WRITTEN_NOTE, TrueSavingsReader, true_savings

PS = os.sysconf("SC_PAGE_SIZE")
ZERO = 0x3000                 # fake PFN of the shared zero page
HUGE = 0x40000                # fake first PFN of the huge zero page (512 frames)
ZERO_PFNS = ((ZERO, ZERO + 1), (HUGE, HUGE + 512))
BASE = 0x10000000             # low addresses keep the fake pagemap files small


def present(pfn) -> np.uint64:
    return np.uint64(pm.PM_PRESENT | int(pfn))


def stats(sharing=0, kzero=0) -> KsmStats:
    return KsmStats(0.0, PS, {"pages_shared": 1 if sharing else 0, "pages_sharing": sharing,
                              "ksm_zero_pages": kzero, "pages_unshared": 0, "pages_volatile": 0})


def write_proc(root, pid, maps, kzero=0, mergeable=True, merge_any=False, stat=True, comm="vm"):
    """A fake process: ``maps`` is ``[(n_pages, mg, entries or None)]``, laid out from BASE with a
    one-page gap; each mapping's pagemap entries (uint64, n_pages of them) go into its pagemap."""
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    if stat:
        yn = {True: "yes", False: "no"}
        (d / "ksm_stat").write_text(
            f"ksm_rmap_items 10\nksm_zero_pages {kzero}\nksm_merging_pages 0\n"
            f"ksm_process_profit 0\nksm_merge_any: {yn[merge_any]}\nksm_mergeable: {yn[mergeable]}\n")
    smaps, maps_text, start = "", "", BASE
    with open(d / "pagemap", "wb") as f:
        for n, mg, entries in maps:
            end = start + n * PS
            head = f"{start:x}-{end:x} rw-p 00000000 00:00 0\n"
            maps_text += head
            smaps += head + f"Size: {n * PS // 1024} kB\nVmFlags: rd wr mr mw me ac{' mg' if mg else ''}\n"
            if entries is not None:
                f.seek(start // PS * 8)
                f.write(np.asarray(entries, dtype=np.uint64).tobytes())
            start = end + PS
        f.truncate(start // PS * 8)
    (d / "smaps").write_text(smaps)
    (d / "maps").write_text(maps_text)
    return d


# --- host.pagemap helpers ----------------------------------------------------------------------
def test_zero_page_entries_counts_present_zero_and_huge_zero_only():
    e = np.zeros(2000, dtype=np.uint64)
    e[0:10] = present(ZERO)                          # shared zero page
    e[10:522] = [present(HUGE + i) for i in range(512)]   # a PMD on the huge zero page
    e[600] = present(HUGE + 512)                     # the frame after it: an ordinary page
    e[601] = present(HUGE - 1)
    e[602] = np.uint64(pm.PM_SWAPPED | ZERO)         # a swap entry whose low bits look like it
    e[603] = np.uint64(ZERO)                         # not present
    e[604] = present(ZERO) | np.uint64(pm.PM_FILE)   # flags beside the PFN do not matter
    e[700:710] = present(7)
    assert pm.zero_page_entries(e, ZERO_PFNS) == 10 + 512 + 1
    assert pm.zero_page_entries(e, ()) == 0
    assert pm.zero_page_entries(e[:0], ZERO_PFNS) == 0
    scratch = np.empty(4096, dtype=np.uint64)
    assert pm.zero_page_entries(e, ZERO_PFNS, scratch) == 523


def test_count_zero_mapped_reads_ranges_in_blocks(tmp_path):
    n = 3000
    e = np.full(n, present(99), dtype=np.uint64)
    e[::7] = present(ZERO)
    write_proc(tmp_path, 5, [(n, True, e)])
    fd = os.open(tmp_path / "5" / "pagemap", os.O_RDONLY)
    try:
        whole = [(BASE, BASE + n * PS)]
        expect = len(range(0, n, 7))
        for block in (1, 64, 1000, 1 << 16):
            assert pm.count_zero_mapped(fd, 5, whole, ZERO_PFNS, block=block) == expect
        assert pm.count_zero_mapped(fd, 5, [(BASE, BASE + 7 * PS)], ZERO_PFNS) == 1
        assert pm.count_zero_mapped(fd, 5, whole, ()) == 0     # PFNs hidden: nothing told
        assert pm.scan_zero_mapped(fd, whole) is None          # a plain file has no PAGEMAP_SCAN
    finally:
        os.close(fd)


# --- the reader on fake trees --------------------------------------------------------------------
def test_true_saving_adds_zero_mappings_of_mergeable_memory_outside_ksm(tmp_path):
    split = np.full(1024, present(500), dtype=np.uint64)
    split[:300] = present(ZERO)                      # zero subpages a THP split handed back
    other = np.full(64, present(ZERO), dtype=np.uint64)      # not mergeable: not counted
    write_proc(tmp_path, 10, [(1024, True, split), (64, False, other)], kzero=20)
    huge = np.array([present(HUGE + i) for i in range(512)], dtype=np.uint64)
    write_proc(tmp_path, 11, [(512, True, huge)])
    write_proc(tmp_path, 12, [(64, True, other)], mergeable=False)  # ksm_stat says no
    reader = TrueSavingsReader(procfs=str(tmp_path), zero_pfns=ZERO_PFNS)
    t = reader.read(stats(sharing=1000, kzero=20))
    assert t.method == "pfn"
    by_pid = {p.pid: p for p in t.processes}
    assert set(by_pid) == {10, 11}
    assert by_pid[10].zero_mapped_pages == 300 and by_pid[10].ksm_zero_pages == 20
    assert by_pid[10].outside_ksm_pages == 280
    assert by_pid[11].outside_ksm_pages == 512 and by_pid[11].mergeable_bytes == 512 * PS
    assert t.zero_mapped_pages == 280 + 512
    assert t.ksm_counter_pages == 1020 and t.ksm_counter_bytes == 1020 * PS
    assert t.saved_pages == 1020 + 792 and t.saved_bytes == (1020 + 792) * PS
    assert t.read_seconds >= 0 and t.unreadable_processes == 0
    b = t.breakdown()
    assert b["ksm_counters"] == {"pages_sharing": 1000, "ksm_zero_pages": 20, "pages": 1020,
                                 "bytes": 1020 * PS}
    assert b["zero_page_mappings"]["pages"] == 792
    assert b["zero_page_mappings"]["note"] == NEVER_WRITTEN_NOTE
    assert "never written" in NEVER_WRITTEN_NOTE and "baseline" in NEVER_WRITTEN_NOTE
    d = t.as_dict()
    assert d["saved_bytes"] == t.saved_bytes and len(d["processes"]) == 2
    assert "processes" not in t.as_dict(processes=False)


def test_ksm_zero_pages_beyond_the_mapped_ones_do_not_go_negative(tmp_path):
    e = np.full(16, present(ZERO), dtype=np.uint64)
    write_proc(tmp_path, 20, [(16, True, e)], kzero=40)
    t = TrueSavingsReader(procfs=str(tmp_path), zero_pfns=ZERO_PFNS).read(stats(kzero=40))
    assert t.processes[0].outside_ksm_pages == 0 and t.zero_mapped_pages == 0
    assert t.saved_pages == 40


def test_merge_any_and_old_kernels_count_as_mergeable(tmp_path):
    e = np.full(8, present(ZERO), dtype=np.uint64)
    write_proc(tmp_path, 30, [(8, True, e)], mergeable=False, merge_any=True)
    d = write_proc(tmp_path, 31, [(8, True, e)])
    (d / "ksm_stat").write_text("ksm_rmap_items 3\nksm_zero_pages 0\n")     # before 6.6
    d = write_proc(tmp_path, 32, [(8, True, e)])
    (d / "ksm_stat").write_text("ksm_rmap_items 0\nksm_zero_pages 0\n")     # nothing tracked
    write_proc(tmp_path, 33, [(8, True, e)], stat=False)                   # no ksm_stat at all
    t = TrueSavingsReader(procfs=str(tmp_path), zero_pfns=ZERO_PFNS).read(stats())
    assert sorted(p.pid for p in t.processes) == [30, 31]
    assert t.zero_mapped_pages == 16


def test_only_the_given_pids_and_a_callable(tmp_path):
    e = np.full(8, present(ZERO), dtype=np.uint64)
    write_proc(tmp_path, 40, [(8, True, e)])
    write_proc(tmp_path, 41, [(8, True, e)])
    assert TrueSavingsReader(procfs=str(tmp_path), pids=[41], zero_pfns=ZERO_PFNS).read(
        stats()).zero_mapped_pages == 8
    assert TrueSavingsReader(procfs=str(tmp_path), pids=lambda: [40, 41, 99],
                             zero_pfns=ZERO_PFNS).read(stats()).zero_mapped_pages == 16


def test_without_zero_pfns_nothing_is_counted_and_method_says_so(tmp_path):
    e = np.full(8, present(ZERO), dtype=np.uint64)
    write_proc(tmp_path, 50, [(8, True, e)])
    t = TrueSavingsReader(procfs=str(tmp_path), zero_pfns=()).read(stats(sharing=5))
    assert t.method is None and t.zero_mapped_pages == 0 and t.saved_pages == 5
    assert t.breakdown()["zero_page_mappings"]["method"] is None


def test_an_exited_or_unreadable_process_is_skipped(tmp_path):
    e = np.full(8, present(ZERO), dtype=np.uint64)
    d = write_proc(tmp_path, 60, [(8, True, e)])
    (d / "pagemap").unlink()                         # as if we may not open it
    write_proc(tmp_path, 61, [(8, True, e)])
    t = TrueSavingsReader(procfs=str(tmp_path), zero_pfns=ZERO_PFNS).read(stats())
    assert [p.pid for p in t.processes] == [61] and t.unreadable_processes == 1
    gone = TrueSavingsReader(procfs=str(tmp_path), pids=[77], zero_pfns=ZERO_PFNS).read(stats())
    assert gone.processes == () and gone.unreadable_processes == 0


def test_mg_ranges_are_kept_until_maps_or_flags_change(tmp_path):
    e = np.full(8, present(ZERO), dtype=np.uint64)
    d = write_proc(tmp_path, 70, [(8, True, e)])
    now = [0.0]
    reader = TrueSavingsReader(procfs=str(tmp_path), zero_pfns=ZERO_PFNS, clock=lambda: now[0],
                               refresh_seconds=10)
    assert reader.read(stats()).zero_mapped_pages == 8
    smaps = (d / "smaps").read_text()
    (d / "smaps").write_text(smaps.replace(" mg", ""))     # unregistered, maps text the same
    assert reader.read(stats()).zero_mapped_pages == 8     # cached ranges
    now[0] = 11.0                                          # too old: smaps read again
    assert reader.read(stats()).zero_mapped_pages == 0
    (d / "smaps").write_text(smaps)
    now[0] = 12.0
    assert reader.read(stats()).zero_mapped_pages == 0     # cached (no mg) again
    (d / "maps").write_text((d / "maps").read_text() + "")  # same text: still cached
    assert reader.read(stats()).zero_mapped_pages == 0
    with open(d / "maps", "a") as f:                       # a new mapping: maps changed
        f.write(f"{BASE + 100 * PS:x}-{BASE + 101 * PS:x} rw-p 00000000 00:00 0\n")
    assert reader.read(stats()).zero_mapped_pages == 8


def test_counters_are_read_from_the_ksm_given(tmp_path):
    from udedup.ksm import Ksm
    from fake_sysfs import make_fake_ksm
    sysfs = make_fake_ksm(tmp_path / "ksm")
    (sysfs / "pages_sharing").write_text("7\n")
    (sysfs / "ksm_zero_pages").write_text("3\n")
    procfs = tmp_path / "proc"
    write_proc(procfs, 80, [(8, True, np.full(8, present(ZERO), dtype=np.uint64))])
    ksm = Ksm(str(sysfs), procfs=str(procfs))
    t = TrueSavingsReader(ksm, zero_pfns=ZERO_PFNS).read()
    assert t.stats.pages_sharing == 7 and t.saved_pages == 7 + 3 + 8
    assert t.page_size == PS
    # one-shot, zero pages probed under the fake root: it has no self/pagemap, so none is known
    once = true_savings(ksm)
    assert once.method is None and once.saved_pages == 10 and once.unreadable_processes == 0


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 10000])
def test_scan_zero_mapped_on_own_memory_matches_pagemap_pfns(n):
    """PAGEMAP_SCAN against the PFN path on this process's own memory (no KSM involved); the
    vec-full restart is exercised when the zero pages form more than 4096 regions."""
    import mmap
    if os.geteuid() != 0:
        pytest.skip("the PFN path needs root (CAP_SYS_ADMIN) to see PFNs")
    mm = mmap.mmap(-1, 2 * n * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_NOHUGEPAGE)
        view = np.frombuffer(mm, dtype=np.uint8)
        addr = int(view.ctypes.data)
        for i in range(0, 2 * n, 2):
            view[i * PS] = 1                      # written: a page of its own
            _ = view[(i + 1) * PS]                # read: the zero page
        fd = pm.open_pagemap(os.getpid())
        try:
            ranges = [(addr, addr + 2 * n * PS)]
            scanned = pm.scan_zero_mapped(fd, ranges)
            if scanned is None:
                pytest.skip("this kernel has no PAGEMAP_SCAN (6.7+)")
            assert scanned == n == pm.count_zero_mapped(fd, os.getpid(), ranges,
                                                        pm.zero_page_pfns())
        finally:
            os.close(fd)
        del view
    finally:
        mm.close()
