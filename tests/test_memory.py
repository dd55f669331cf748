"""udedup.memory: MergeableBuffer mappings as the kernel sees them (smaps), views, close, prctl.

These register memory with madvise (no privilege, no knob writes) but never start ksmd, so they
need neither root nor the KSM lock. Whole-process prctl runs in a child: turning it off would unmerge
the test process's own ranges.
"""
from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from udedup.ksm import memory

from udedup import pages

from udedup.host.maps import Mapping, read_mappings
from udedup.errors import (BufferInUseError, KsmPermissionError, KsmUnavailableError, NativeError,
                           PageBufferError)
from udedup.ksm.memory import MergeableBuffer, kernel_version, mergeable_array

PAGE = pages.PAGE_SIZE


def smaps_entry(address: int) -> Mapping:
    """The mapping containing ``address``, from our own smaps."""
    for mapping in read_mappings(os.getpid()):
        if mapping.start <= address < mapping.end:
            return mapping
    raise AssertionError(f"{address:#x} is not mapped")


def test_buffer_is_private_anonymous_mergeable_and_not_huge():
    buf = MergeableBuffer(3 * PAGE + 1)
    try:
        assert buf.nbytes == 4 * PAGE and buf.npages == 4
        assert buf.address % PAGE == 0
        mapping = smaps_entry(buf.address)
        flags = mapping.vmflags
        assert mapping.perms == "rw-p", mapping   # p: MAP_PRIVATE (KSM ignores shared mappings)
        assert "mg" in flags and "nh" in flags, flags
        assert "hg" not in flags
    finally:
        buf.close()


def test_merge_false_then_merge_and_unmerge_toggle_mg():
    buf = MergeableBuffer(PAGE * 2, merge=False)
    try:
        assert "mg" not in smaps_entry(buf.address).vmflags
        buf.merge()
        assert buf.merged and "mg" in smaps_entry(buf.address).vmflags
        buf.unmerge()
        assert not buf.merged and "mg" not in smaps_entry(buf.address).vmflags
    finally:
        buf.close()


def test_hugepages_true_asks_for_thp():
    with MergeableBuffer(4 << 20, hugepages=True) as buf:
        flags = smaps_entry(buf.address).vmflags
        assert "hg" in flags and "nh" not in flags and "mg" in flags


def test_python_default_mmap_is_shared_which_ksm_ignores():
    # the pitfall MergeableBuffer exists for: documents why MAP_PRIVATE is passed
    import mmap
    m = mmap.mmap(-1, PAGE)
    view = np.frombuffer(m, dtype="u1")
    perms = smaps_entry(view.ctypes.data).perms
    del view
    m.close()
    assert perms == "rw-s"


def test_array_is_a_view_of_the_buffer():
    buf = MergeableBuffer(2 * PAGE)
    a = buf.array("u8")
    assert a.ctypes.data == buf.address and a.size == 2 * PAGE // 8
    b = buf.array("u1", (2, PAGE))
    a[0] = 0x0102030405060708
    assert b[0, 0] == 8 and buf.mmap[:1] == b"\x08"
    with pytest.raises(PageBufferError, match="needs"):
        buf.array("u8", (3, PAGE))
    del a, b
    buf.close()


def test_close_is_idempotent_and_refuses_while_views_live():
    buf = MergeableBuffer(PAGE)
    view = buf.array()
    with pytest.raises(BufferInUseError, match=r"1 numpy view.*del arr"):
        buf.close()
    sub = view[10:20]
    del view                                  # the slice keeps the memory exported
    with pytest.raises(BufferInUseError, match=r"slice.*del arr"):
        buf.close()
    assert not buf.closed
    del sub
    gc.collect()
    buf.close()
    buf.close()
    assert buf.closed
    with pytest.raises(Exception, match="closed"):
        buf.array()


def test_context_manager_does_not_mask_an_exception_with_live_views():
    with pytest.raises(ZeroDivisionError):
        with MergeableBuffer(PAGE) as buf:
            keep = buf.array()
            1 / 0
    assert not buf.closed
    del keep
    buf.close()


def test_context_manager_with_live_view_on_normal_exit_raises():
    with pytest.raises(BufferInUseError):
        with MergeableBuffer(PAGE) as buf:
            keep = buf.array()
    del keep
    buf.close()


def test_bad_sizes():
    for bad in (0, -1, 1.5, True, "4096"):
        with pytest.raises(PageBufferError):
            MergeableBuffer(bad)


def test_mergeable_array_keeps_its_mapping_alive():
    arr = mergeable_array((3, 100), "u4")
    address = arr.ctypes.data
    gc.collect()                              # the MergeableBuffer object itself is gone
    arr[:] = 7
    assert arr.shape == (3, 100) and arr.dtype == np.uint32 and int(arr.sum()) == 2100
    assert "mg" in smaps_entry(address).vmflags
    del arr
    gc.collect()
    with open("/proc/self/maps") as f:
        starts = [int(line.split("-")[0], 16) for line in f]
    assert address not in starts              # unmapped with the last view


def test_kernel_version_parsing():
    assert kernel_version("6.18.44-fc-v657") == (6, 18)
    assert kernel_version("6.7.0") == (6, 7)
    assert kernel_version("5.15.0-91-generic") == (5, 15)
    assert kernel_version("weird") == (0, 0)
    assert kernel_version() >= (2, 6)


@pytest.mark.parametrize("code,cls,pattern", [
    (errno.EPERM, KsmPermissionError, "refused.*CAP_SYS_RESOURCE"),
    (errno.EINVAL, KsmUnavailableError, r"6\.4"),
])
def test_prctl_errors_are_explained(monkeypatch, code, cls, pattern):
    def fail(*args):
        raise NativeError("prctl failed", errno=code)

    monkeypatch.setattr(memory.syscalls, "prctl", fail)
    for call in (memory.enable_process_merge, memory.disable_process_merge,
                 memory.process_merge_enabled):
        with pytest.raises(cls, match=pattern):
            call()


@pytest.mark.skipif(kernel_version() < (6, 4), reason="PR_SET_MEMORY_MERGE needs Linux 6.4")
def test_process_merge_switch_in_a_child():
    # the child also drops every capability first: on this kernel no privilege is needed
    code = r"""
import mmap, os
from udedup.ksm import memory
root = os.geteuid() == 0
if root:
    os.seteuid(65534)
    assert open("/proc/self/status").read().split("CapEff:")[1].split()[0].strip("0") == ""
out = [memory.process_merge_enabled()]
memory.enable_process_merge()
out.append(memory.process_merge_enabled())
m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:1] = b"x"
memory.disable_process_merge()
out.append(memory.process_merge_enabled())
memory.enable_process_merge()
if root:
    os.seteuid(0)                    # /proc/self/ksm_stat belongs to uid 0
out.append("ksm_merge_any: yes" in open("/proc/self/ksm_stat").read())
print(out)
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[False, True, False, True]"
