"""scripts/thp_ksm_probe.py reads /proc through host.fs.ProcFs, host.parse and host.maps (the
project's one parser), on a fake tree here: the figures it reports are those of the files."""
from __future__ import annotations

import importlib.util
import os

import pytest

from udedup.host.fs import ProcFs

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "thp_ksm_probe.py")
VMSTAT = "nr_free_pages 1000\nthp_split_page 7\nthp_split_page_failed 2\nthp_underused_split_page 1\n" \
         "thp_fault_alloc 99\n"
KSM_STAT = ("ksm_rmap_items 512\nksm_zero_pages 3\nksm_merging_pages 40\nksm_process_profit -4096\n"
            "ksm_merge_any: yes\nksm_mergeable: no\n")
SMAPS = """\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
AnonHugePages:      2048 kB
VmFlags: rd wr mr mw me ac hg
7f0000400000-7f0000401000 rw-p 00000000 00:00 0
Size:                  4 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac
"""


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("thp_ksm_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def procfs(tmp_path):
    (tmp_path / "vmstat").write_text(VMSTAT)
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "ksm_stat").write_text(KSM_STAT)
    (tmp_path / "42" / "smaps").write_text(SMAPS)
    (tmp_path / "42" / "stat").write_text("42 (probe) S 1 42 42 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 77\n")
    return ProcFs(str(tmp_path))


def test_vmstat_keeps_the_thp_split_counters(probe, procfs):
    assert probe.vmstat(procfs) == {"thp_split_page": 7, "thp_split_page_failed": 2,
                                    "thp_underused_split_page": 1}


def test_ksm_stat_is_host_parse(probe, procfs):
    assert probe.ksm_stat(procfs, pid=42) == {
        "ksm_rmap_items": 512, "ksm_zero_pages": 3, "ksm_merging_pages": 40,
        "ksm_process_profit": -4096, "ksm_merge_any": True, "ksm_mergeable": False}


def test_anon_huge_kb_of_the_mapping_holding_the_address(probe, procfs):
    assert probe.anon_huge_kb(0x7f0000200000, procfs, pid=42) == 2048
    assert probe.anon_huge_kb(0x7f0000400000, procfs, pid=42) == 0
    assert probe.anon_huge_kb(0x1000, procfs, pid=42) == 0


def test_the_script_opens_no_proc_file_itself():
    with open(SCRIPT) as f:
        text = f.read()
    assert 'open("/proc' not in text and "open('/proc" not in text
