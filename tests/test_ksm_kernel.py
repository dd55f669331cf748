"""udedup.ksm / memory / process against the real kernel (root, /sys/kernel/mm/ksm writable).

Every test runs inside ``Ksm.settings()`` with a fast scan (pages_to_scan=5000, sleep_millisecs=0,
smart_scan=0) and ends with run=2 (everything unmerged, ksmd stopped) before the knobs go back.

Exact counters: with max_page_sharing = m, N identical pages become ``N // m`` full KSM pages plus
one more holding the remainder if it is at least 2; a remainder of exactly 1 page has no partner
(the full KSM pages take no more mappings) and stays in the unstable tree (pages_unshared = 1).
Measured here on 6.18: 600 pages, m=256 -> shared 3, sharing 597; 33 pages, m=16 -> 2 / 30 / 1.

Global counters include every process on the machine, and other tools' experiments may run beside
these tests. So the exact figures are asserted per buffer, from the page tables: /proc/self/pagemap
gives each page's frame, /proc/kpageflags says whether that frame is a KSM page (KPF_KSM) or the
zero page (KPF_ZERO_PAGE). Our content is random, so the distinct KSM frames mapped in our buffer are
exactly the KSM pages our content made (its pages_shared). Per-process ksm_stat figures are
asserted too; the global counters only when no other process has memory registered with KSM.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from udedup.errors import KsmBusyError, KsmNotRunningError, KsmValueError
from udedup.ksm import Ksm, KsmStats
from udedup.ksm.accounting import ksm_pages
from udedup.errors import BufferInUseError
from udedup.ksm.memory import MergeableBuffer, kernel_version
from udedup.ksm.process import process_ksm, top_processes

pytestmark = pytest.mark.ksm

FAST = dict(run=1, pages_to_scan=5000, sleep_millisecs=0, smart_scan=0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_counters(n: int, m: int) -> dict[str, int]:
    shared, sharing, unshared = ksm_pages([n], m)
    return {"pages_shared": shared, "pages_sharing": sharing, "pages_unshared": unshared,
            # a chain of "dups" exists only once one content needs more than one KSM page
            "stable_node_dups": shared if shared > 1 else 0,
            "stable_node_chains": 1 if shared > 1 else 0}


def others_registered(exclude=()) -> list:
    skip = {os.getpid(), *exclude}
    return [p for p in top_processes(1000) if p.pid not in skip]


def global_counters_clean(exclude=()) -> bool:
    others = others_registered(exclude)
    if others:
        warnings.warn("other processes have KSM-registered memory "
                      f"({', '.join(f'{p.pid}/{p.comm}' for p in others[:5])}): global counters "
                      "not asserted")
    return not others


KPF_KSM = 1 << 21
KPF_ZERO_PAGE = 1 << 24


class PageKinds:
    """What backs each page of a buffer, read from pagemap + kpageflags (root only)."""

    def __init__(self, buf: MergeableBuffer):
        ps = buf.page_size
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(buf.address // ps * 8)
            entries = np.frombuffer(f.read(buf.npages * 8), np.uint64)
        self.present = ((entries >> np.uint64(63)) & np.uint64(1)).astype(bool)
        self.pfn = entries & np.uint64((1 << 55) - 1)
        flags = np.zeros(buf.npages, np.uint64)
        fd = os.open("/proc/kpageflags", os.O_RDONLY)
        try:
            for i in np.flatnonzero(self.present):
                flags[i] = np.frombuffer(os.pread(fd, 8, int(self.pfn[i]) * 8), np.uint64)[0]
        finally:
            os.close(fd)
        self.ksm = (flags & np.uint64(KPF_KSM)) != 0
        self.zero = (flags & np.uint64(KPF_ZERO_PAGE)) != 0

    def counters(self) -> dict[str, int]:
        """This buffer's share of the KSM counters (valid when its content is unique to it)."""
        shared = len(set(self.pfn[self.ksm].tolist()))
        return {"pages_shared": shared, "pages_sharing": int(self.ksm.sum()) - shared,
                "ksm_zero_pages": int(self.zero.sum())}


def assert_buffer_counters(kinds: PageKinds, exp: dict[str, int]) -> None:
    """The buffer's share is exactly ``exp``'s KSM pages, and none of it is a zero page."""
    assert kinds.counters() == {"pages_shared": exp["pages_shared"],
                                "pages_sharing": exp["pages_sharing"], "ksm_zero_pages": 0}


@pytest.fixture
def buffers():
    """Make MergeableBuffers that are gone after the test even when it fails holding views: a
    leftover mergeable mapping would merge with the next test's (adjacent VMAs join)."""
    made = []

    def make(nbytes):
        made.append(MergeableBuffer(nbytes))
        return made[-1]

    yield make
    for buf in made:
        try:
            buf.close()
        except BufferInUseError:
            buf.unmerge()             # breaks its merges and clears mg: nothing left to join


@pytest.fixture
def fast_ksm():
    ksm = Ksm()
    with ksm.settings(**FAST):
        try:
            yield ksm
        finally:
            ksm.set("run", 2)     # unmerge everything, keep ksmd stopped until run is restored


def fill_identical(buf: MergeableBuffer, count: int, seed: int, start: int = 0) -> np.ndarray:
    """Fill pages [start, start+count) with one random page; returns that page."""
    page = np.random.default_rng(seed).integers(0, 256, buf.page_size, dtype=np.uint8)
    buf.array("u1").reshape(-1, buf.page_size)[start:start + count] = page
    return page


def merged_buffer(ksm: Ksm, buffers, n: int, seed: int) -> tuple[MergeableBuffer, np.ndarray]:
    """A buffer of ``n`` identical pages, settled with every page merged; returns it and the page."""
    buf = buffers(n * ksm.page_size)
    page = fill_identical(buf, n, seed=seed)
    ksm.wait_settled(timeout=20)
    assert PageKinds(buf).ksm.all()
    return buf, page


def consistent_stats(ksm: Ksm) -> KsmStats:
    """One consistent read of the global counters. They are separate files that ksmd updates while
    it runs, so it is paused (run=0 waits for its current batch) for the read, then resumed."""
    ksm.set("run", 0)
    try:
        return ksm.stats()
    finally:
        ksm.set("run", 1)


def assert_global(st: KsmStats, expected: dict[str, int]) -> None:
    expected = dict(expected)
    # a page ksmd saw changed (or not yet twice) in its last pass is volatile rather than unshared:
    # the split is ksmd's timing, the sum is the content's
    unshared = expected.pop("pages_unshared", None)
    got = {name: st.counters[name] for name in expected}
    assert got == expected
    if unshared is not None:
        assert st.pages_unshared + st.pages_volatile == unshared
    if st.general_profit is not None:
        # our fallback formula gives the kernel's own figure
        without = {k: v for k, v in st.counters.items() if k != "general_profit"}
        assert KsmStats(st.timestamp, st.page_size, without).saved_bytes == st.general_profit


# --- merging to exact counters ------------------------------------------------------------------
def test_identical_pages_merge_to_exact_counters_and_content_survives(fast_ksm, buffers):
    ksm = fast_ksm
    n, m = 600, ksm.get("max_page_sharing")
    buf = buffers(n * ksm.page_size)
    page = fill_identical(buf, n, seed=600)
    cpu0 = ksm.ksmd_cpu_seconds()
    st = ksm.wait_settled(timeout=20)
    exp = expected_counters(n, m)
    assert_buffer_counters(PageKinds(buf), exp)
    me = process_ksm(os.getpid())
    assert me.merging_pages == exp["pages_shared"] + exp["pages_sharing"]
    assert me.rmap_items == n and me.zero_pages == 0
    assert me.smaps_ksm_bytes == me.merging_pages * ksm.page_size
    assert me.process_profit == me.merging_pages * ksm.page_size - n * 64
    if global_counters_clean():
        st = consistent_stats(ksm)
        assert_global(st, exp)
        assert st.saved_pages == exp["pages_sharing"]
        assert st.saved_bytes == exp["pages_sharing"] * ksm.page_size - n * 64
        # the per-process figure over-counts by one page per KSM page (module doc of ksm.process)
        assert me.process_profit - st.general_profit == exp["pages_shared"] * ksm.page_size
    assert (buf.array("u1").reshape(n, -1) == page).all()
    time.sleep(0.1)  # ksmd spins at sleep_millisecs=0: its CPU time must move
    assert ksm.ksmd_cpu_seconds() > cpu0


@pytest.mark.parametrize("n", [33, 100])
def test_max_page_sharing_splits_into_dups(buffers, n):
    ksm = Ksm()
    with ksm.settings(allow_unmerge=True, max_page_sharing=16, **FAST):
        try:
            buf = buffers(n * ksm.page_size)
            fill_identical(buf, n, seed=n)
            ksm.wait_settled(timeout=20)
            exp = expected_counters(n, 16)
            kinds = PageKinds(buf)
            assert_buffer_counters(kinds, exp)
            assert int((~kinds.ksm).sum()) == exp["pages_unshared"]
            assert process_ksm(os.getpid()).merging_pages == exp["pages_shared"] + exp["pages_sharing"]
            if global_counters_clean():
                assert_global(consistent_stats(ksm), exp)
        finally:
            ksm.set("run", 2)
    assert ksm.get("max_page_sharing") != 16


def test_copy_on_write_keeps_every_page_right(fast_ksm, buffers):
    ksm = fast_ksm
    n = 300
    buf, page = merged_buffer(ksm, buffers, n, seed=300)
    written = np.arange(0, n, 10)
    stamps = [np.frombuffer(int(i + 1).to_bytes(8, "little"), np.uint8) for i in written]
    view = buf.array("u1").reshape(n, -1)
    for i, stamp in zip(written, stamps):     # one COW break per page, each to unique content
        view[i, :8] = stamp
    expect = np.broadcast_to(page, (n, ksm.page_size)).copy()
    for i, stamp in zip(written, stamps):
        expect[i, :8] = stamp
    assert (view == expect).all()
    kinds = PageKinds(buf)
    assert not kinds.ksm[written].any() and kinds.ksm.sum() == n - len(written)
    ksm.wait_settled(timeout=20)
    assert (view == expect).all()
    del view
    exp = expected_counters(n - len(written), ksm.get("max_page_sharing"))
    assert_buffer_counters(PageKinds(buf), exp)
    assert process_ksm(os.getpid()).merging_pages == n - len(written)
    if global_counters_clean():
        exp["pages_unshared"] += len(written)      # unique pages wait in the unstable tree
        assert_global(consistent_stats(ksm), exp)


@pytest.mark.parametrize("use_zero_pages", [False, True])
def test_use_zero_pages_decides_where_zero_pages_are_counted(buffers, use_zero_pages):
    ksm = Ksm()
    zeros, data = 100, 50
    with ksm.settings(use_zero_pages=use_zero_pages, **FAST):
        try:
            buf = buffers((zeros + data) * ksm.page_size)
            fill_identical(buf, data, seed=7, start=zeros)
            buf.array("u1")[:zeros * ksm.page_size] = 0        # present pages full of zeros
            st = ksm.wait_settled(timeout=20)
            kinds = PageKinds(buf)
            me = process_ksm(os.getpid())
            m = ksm.get("max_page_sharing")
            d = expected_counters(data, m)
            if use_zero_pages:
                assert kinds.zero[:zeros].all() and not kinds.ksm[:zeros].any()
                assert (me.zero_pages, me.merging_pages) == (zeros, data)
                exp = {k: d[k] for k in ("pages_shared", "pages_sharing", "pages_unshared")}
                expected_zero = zeros
            else:
                # zero pages become one more KSM content like any other
                assert kinds.ksm[:zeros].all() and not kinds.zero.any()
                assert (me.zero_pages, me.merging_pages) == (0, zeros + data)
                z = expected_counters(zeros, m)
                exp = {k: z[k] + d[k] for k in ("pages_shared", "pages_sharing", "pages_unshared")}
                expected_zero = 0
            assert kinds.ksm[zeros:].all()
            assert int(kinds.zero.sum()) == expected_zero
            if global_counters_clean():
                st = consistent_stats(ksm)
                assert_global(st, exp)
                assert st.ksm_zero_pages == expected_zero
                assert st.saved_pages == exp["pages_sharing"] + expected_zero
            assert not buf.array("u1")[:zeros * ksm.page_size].any()
        finally:
            ksm.set("run", 2)


def test_unmerge_all_brings_savings_to_zero_and_run_back(fast_ksm, buffers):
    ksm = fast_ksm
    n = 200
    buf, page = merged_buffer(ksm, buffers, n, seed=200)
    ksm.unmerge_all()
    assert ksm.get("run") == 1
    ksm.wait_settled(timeout=20)                    # registrations stay: it merges again
    assert PageKinds(buf).ksm.all()
    # with run=0 nothing re-merges behind our back, so the zeros below are not a race
    ksm.set("run", 0)
    ksm.unmerge_all()
    assert ksm.get("run") == 0
    st = ksm.stats()
    assert st.pages_shared == st.pages_sharing == st.ksm_zero_pages == st.saved_pages == 0
    assert st.full_scans == 0                       # run=2 resets it
    assert not PageKinds(buf).ksm.any()
    me = process_ksm(os.getpid())
    assert me.merging_pages == 0 and me.smaps_ksm_bytes == 0
    assert (buf.array("u1").reshape(n, -1) == page).all()


# --- knobs on the real kernel -------------------------------------------------------------------
def test_wait_settled_refuses_when_ksmd_is_stopped():
    ksm = Ksm()
    with ksm.settings(run=0):
        with pytest.raises(KsmNotRunningError, match="run=0"):
            ksm.wait_settled(timeout=30)


def test_advisor_mode_round_trip_restores_pages_to_scan():
    ksm = Ksm()
    if "advisor_mode" not in ksm.knob_names():
        pytest.skip("kernel without advisor_mode (6.9+)")
    before = ksm.knobs()
    with pytest.raises(RuntimeError):
        with ksm.settings(advisor_mode="scan-time"):
            assert ksm.get("advisor_mode") == "scan-time"
            assert ksm.get("pages_to_scan") != before["pages_to_scan"] or \
                before["pages_to_scan"] == 500
            raise RuntimeError("boom")
    assert ksm.knobs() == before
    with ksm.settings(pages_to_scan=4321, sleep_millisecs=3):
        with pytest.raises(KeyboardInterrupt):
            with ksm.settings(advisor_mode="scan-time"):
                raise KeyboardInterrupt
        assert ksm.get("pages_to_scan") == 4321 and ksm.get("advisor_mode") == "none"
    assert ksm.knobs() == before


def test_kernel_errno_is_mapped(fast_ksm, buffers):
    ksm = fast_ksm
    buf = buffers(64 * ksm.page_size)
    fill_identical(buf, 64, seed=64)
    ksm.wait_settled(timeout=20)
    assert ksm.stats().pages_shared >= 1
    current = ksm.get("max_page_sharing")
    before = ksm.knobs()
    # our own check refuses before writing ...
    with pytest.raises(KsmBusyError, match="allow_unmerge"):
        ksm.apply({"max_page_sharing": current + 1})
    # ... and the kernel's EBUSY maps to the same class
    with pytest.raises(KsmBusyError, match="max_page_sharing"):
        ksm.write_raw("max_page_sharing", str(current + 1))
    for name, text in (("run", "3"), ("sleep_millisecs", "-1"), ("pages_to_scan", "x")):
        with pytest.raises(KsmValueError, match=f"rejected {name}"):
            ksm.write_raw(name, text)
    assert ksm.knobs() == before


# --- udedup run ---------------------------------------------------------------------------------
CHILD = r"""
import os, sys
page = os.urandom(int(sys.argv[1]))
block = bytearray(page * 512)          # 512 identical pages, plain malloc'd memory, no madvise
print(os.getpid(), flush=True)
sys.stdin.readline()
print(block[:1].hex() == page[:1].hex() and bytes(block) == page * 512, flush=True)
"""


@pytest.mark.skipif(kernel_version() < (6, 7), reason="merge-any survives exec from Linux 6.7")
def test_child_under_udedup_run_is_merge_any_and_merges(fast_ksm):
    ksm = fast_ksm
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen(
        [sys.executable, "-m", "udedup", "run", "--", sys.executable, "-c", CHILD,
         str(ksm.page_size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid = int(child.stdout.readline())
        assert pid == child.pid                         # exec, not a fork: same pid
        info = process_ksm(pid)
        assert info.merge_any is True
        ksm.wait_settled(timeout=20)
        deadline = time.monotonic() + 10
        while process_ksm(pid).merging_pages < 512 and time.monotonic() < deadline:
            time.sleep(0.05)
        info = process_ksm(pid)
        assert info.merging_pages >= 512, info
        assert info.mappings                            # the heap carries mg without madvise
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "True"   # content intact after merging
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
