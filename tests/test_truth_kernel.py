"""The true saving on the real kernel, with THP: KSM merging a subpage of a transparent huge page
splits it, the split maps the THP's zero-filled subpages to the shared zero page, and no KSM counter
sees them; the truth does. Marked ``ksm`` (the machine-wide lock, knobs restored)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from udedup.errors import BufferInUseError
from udedup.host import pagemap as pm
from udedup.ksm import Ksm
from udedup.ksm.memory import MergeableBuffer, kernel_version
from udedup.ksm.process import process_ksm
from udedup.ksm.truth import TrueSavingsReader

pytestmark = pytest.mark.ksm

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
N_THP, DUP = 16, 8          # THPs, and duplicate subpages in each (the same DUP pages in all)


def thp_mode() -> str | None:
    try:
        text = open(THP).read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def thp_subpages(fd, lo, hi) -> np.ndarray:
    entries = pm.read_pagemap(fd, lo, hi)
    flags = pm.read_kpageflags(entries & np.uint64(pm.PM_PFN_MASK))
    return ((flags >> np.uint64(pm.KPF_THP)) & np.uint64(1)).astype(bool)


def test_zero_subpages_of_split_thps_count_in_the_truth_and_not_in_the_counters():
    mode = thp_mode()
    if mode not in ("madvise", "always"):
        pytest.skip(f"THP is {mode!r} here ({THP}): this test needs madvise or always")
    if kernel_version() < (6, 12):
        pytest.skip("a THP split maps zero-filled subpages to the zero page from Linux 6.12")
    if os.geteuid() != 0:
        pytest.skip("telling THPs apart (kpageflags) and the zero page's PFN need root")
    ksm = Ksm()
    ps = ksm.page_size
    pmd = 512 * ps
    buf = MergeableBuffer((N_THP + 1) * pmd, hugepages=True)   # MADV_HUGEPAGE, not NOHUGEPAGE
    fd = pm.open_pagemap(os.getpid())
    try:
        a = buf.array("u1")
        off = (-buf.address) % pmd
        region = a[off:off + N_THP * pmd].reshape(N_THP, 512, ps)
        pages = np.random.default_rng(12).integers(0, 256, (DUP, ps), dtype=np.uint8)
        for t in range(N_THP):
            region[t, :DUP] = pages         # the first write faults in a whole (zeroed) THP
            region[t, 100, 0] = t + 1       # and one subpage of its own
        lo, hi = buf.address + off, buf.address + off + N_THP * pmd
        huge = thp_subpages(fd, lo, hi)
        if huge.sum() < N_THP * 512 // 2:
            pytest.skip(f"only {int(huge.sum())} of {N_THP * 512} subpages got THPs "
                        "(memory too fragmented for huge pages)")
        zero_subpages = int(huge.reshape(N_THP, 512)[:, DUP:].sum()) - int(huge[100::512].sum())
        zero_pfns = pm.zero_page_pfns()
        reader = TrueSavingsReader(ksm, pids=[os.getpid()])
        before = reader.read()
        assert before.processes[0].zero_mapped_pages == 0    # every page is part of a THP

        with ksm.settings(use_zero_pages=0, pages_to_scan=5000, sleep_millisecs=0, smart_scan=0,
                          run=1):
            try:
                ksm.wait_settled(timeout=60)
                ksm.set("run", 0)           # hold everything still for the reads below
                truth = reader.read()
                mine = process_ksm(os.getpid(), smaps=False)
                on_zero = pm.count_zero_mapped(fd, os.getpid(), [(lo, hi)], zero_pfns)
                after = thp_subpages(fd, lo, hi)
            finally:
                ksm.set("run", 2)
        assert not after.any()              # every THP with a duplicate subpage was split
        p = truth.processes[0]
        assert p.ksm_zero_pages == mine.zero_pages == 0       # use_zero_pages=0: none is KSM's
        # the truth counts exactly the buffer's pages on the zero page (pagemap and PFN) ...
        assert p.zero_mapped_pages == p.outside_ksm_pages == on_zero
        # ... which are the THPs' zero-filled subpages, handed back by the split
        assert on_zero == zero_subpages
        # KSM's counters see only the duplicates: every mapping of a KSM page in this process
        assert mine.merging_pages == N_THP * DUP
        assert truth.zero_mapped_pages >= on_zero > 10 * mine.merging_pages
        assert truth.saved_pages == truth.ksm_counter_pages + truth.zero_mapped_pages
        assert not region[:, DUP:100].any() and (region[:, :DUP] == pages).all()
        del a, region
    finally:
        os.close(fd)
        try:
            buf.close()
        except BufferInUseError:    # a failure's traceback holds the views: unregister at least
            buf.unmerge()


def test_bench_truth_runs_at_a_tiny_size(capsys):
    """scripts/bench_truth.py (the cost figures in the README) cannot rot."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_truth",
                                                  os.path.join(root, "scripts", "bench_truth.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--size", "8M", "--repeat", "2", "--no-lock"]) == 0   # ksm mark: lock held
    out = capsys.readouterr().out
    assert "cached read" in out and "PAGEMAP_SCAN" in out and out.count("\n") == 2
