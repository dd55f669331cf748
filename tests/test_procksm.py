"""udedup.ksm.process on a fake procfs (parsing, errors, ordering, over-count) and on our own process."""
from __future__ import annotations

import os

import pytest

from udedup.errors import KernelThreadError, ProcessNotFoundError, UsageError
from udedup.host.maps import parse_smaps
from udedup.host.parse import parse_ksm_stat
from udedup.ksm.accounting import profit_overcount_bytes
from udedup.ksm.memory import MergeableBuffer
from udedup.ksm.process import mergeable_mappings, process_ksm, top_processes

PAGE = os.sysconf("SC_PAGE_SIZE")

KSM_STAT = """ksm_rmap_items {rmap}
ksm_zero_pages {zero}
ksm_merging_pages {merging}
ksm_process_profit {profit}
ksm_merge_any: {any}
ksm_mergeable: {mergeable}
"""

SMAPS = """55d5c0e4b000-55d5c0e4d000 r--p 00000000 08:01 1234   /usr/bin/cat
Size:                  8 kB
KSM:                   0 kB
VmFlags: rd mr mw me
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
KSM:                 400 kB
VmFlags: rd wr mr mw me ac mg
7f0000200000-7f0000201000 rw-p 00000000 00:00 0   [heap]
KSM:                   4 kB
VmFlags: rd wr mr mw me ac
"""


def fake_process(proc, pid, comm="app", rmap=0, zero=0, merging=0, profit=0, any_="no",
                 mergeable="no", smaps="", kthread=False):
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "ksm_stat").write_text("" if kthread else KSM_STAT.format(
        rmap=rmap, zero=zero, merging=merging, profit=profit, any=any_, mergeable=mergeable))
    (d / "ksm_merging_pages").write_text("" if kthread else f"{merging}\n")
    (d / "smaps").write_text(smaps)


def test_parse_ksm_stat():
    values = parse_ksm_stat(KSM_STAT.format(rmap=5, zero=1, merging=3, profit=-64, any="yes",
                                            mergeable="no") + "ksm_future 9\n")
    assert values == {"ksm_rmap_items": 5, "ksm_zero_pages": 1, "ksm_merging_pages": 3,
                      "ksm_process_profit": -64, "ksm_merge_any": True, "ksm_mergeable": False,
                      "ksm_future": 9}


def test_parse_smaps_sums_ksm_and_lists_mg_mappings():
    total, mappings = mergeable_mappings(parse_smaps(SMAPS))
    assert total == 404 * 1024
    assert len(mappings) == 1
    m = mappings[0]
    assert (m.start, m.end, m.perms, m.path, m.ksm_bytes) == (
        0x7f0000000000, 0x7f0000100000, "rw-p", "", 400 * 1024)
    assert m.size == 1 << 20


def test_process_ksm_from_fake_procfs(tmp_path):
    fake_process(tmp_path, 42, "db", rmap=300, zero=10, merging=200, profit=800000, any_="yes",
                 mergeable="yes", smaps=SMAPS)
    p = process_ksm(42, procfs=str(tmp_path))
    assert (p.pid, p.comm, p.rmap_items, p.zero_pages, p.merging_pages, p.process_profit) == (
        42, "db", 300, 10, 200, 800000)
    assert p.merge_any is True and p.mergeable is True and p.registered
    assert p.smaps_ksm_bytes == 404 * 1024 and len(p.mappings) == 1
    assert p.merging_bytes == 200 * PAGE
    d = p.as_dict()
    assert d["mergeable_mappings"][0]["start"] == "0x7f0000000000"
    assert process_ksm(42, procfs=str(tmp_path), smaps=False).mappings is None


@pytest.mark.parametrize("pid", [0, -3, "abc", "", True, "1.5"])
def test_bad_pid_is_a_usage_error(pid):
    with pytest.raises(UsageError, match="bad pid"):
        process_ksm(pid)


def test_missing_process_and_kernel_thread(tmp_path):
    with pytest.raises(ProcessNotFoundError, match="no process with PID 77"):
        process_ksm(77, procfs=str(tmp_path))
    fake_process(tmp_path, 2, "kthreadd", kthread=True)
    with pytest.raises(KernelThreadError, match="kernel thread"):
        process_ksm(2, procfs=str(tmp_path))


def test_top_processes_sorted_by_profit_skipping_unregistered(tmp_path):
    fake_process(tmp_path, 10, "small", rmap=10, merging=5, profit=1000, mergeable="yes")
    fake_process(tmp_path, 11, "big", rmap=100, merging=90, profit=9000, any_="yes",
                 mergeable="yes")
    fake_process(tmp_path, 12, "idle")                     # not registered: left out
    fake_process(tmp_path, 13, "fresh", mergeable="yes")   # registered, nothing scanned yet
    fake_process(tmp_path, 2, "kthreadd", kthread=True)
    (tmp_path / "self").mkdir()
    top = top_processes(10, procfs=str(tmp_path))
    assert [p.comm for p in top] == ["big", "small", "fresh"]
    assert [p.comm for p in top_processes(1, procfs=str(tmp_path))] == ["big"]
    assert top_processes(0, procfs=str(tmp_path)) == []
    detailed = top_processes(1, procfs=str(tmp_path), smaps=True)
    assert detailed[0].smaps_ksm_bytes == 0


def test_profit_overcount_is_one_page_per_ksm_page():
    # 1024 identical pages with max_page_sharing=256: 4 KSM pages; ksm_merging_pages counts 1024
    # mappings but only 1020 pages are saved
    assert profit_overcount_bytes(4, 4096) == 4 * 4096


def test_own_process_shows_the_buffer_as_mg_mapping():
    buf = MergeableBuffer(8 * PAGE)
    try:
        me = process_ksm(os.getpid())
        assert me.mergeable is True
        assert me.merge_any is False
        spans = [(m.start, m.end) for m in me.mappings]
        assert (buf.address, buf.address + buf.nbytes) in spans
    finally:
        buf.close()
    assert (buf.address, buf.address + buf.nbytes) not in [
        (m.start, m.end) for m in process_ksm(os.getpid()).mappings]


def test_live_process_without_ksm_stat_names_the_kernel(tmp_path):
    fake_process(tmp_path, 42, "db")
    (tmp_path / "42" / "ksm_stat").unlink()       # a kernel before 6.1, or without CONFIG_KSM
    with pytest.raises(ProcessNotFoundError,
                       match=r"kernel without KSM per-process stats \(needs 6\.1\+ and CONFIG_KSM\)"):
        process_ksm(42, procfs=str(tmp_path))
