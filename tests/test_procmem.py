"""host.maps, host.pagemap, host.remote: smaps classification, pagemap presence, kpageflags and
kpagecount, remote reads (EFAULT, ESRCH), errors."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from udedup import pages

from udedup.host import fs, pagemap, remote
from udedup.host import maps as hostmaps
from udedup.host.parse import PF_KTHREAD
from udedup.errors import (KernelThreadError, ProcessAccessError, ProcessError,
                           ProcessNotFoundError)

PS = pages.PAGE_SIZE
ROOT = os.geteuid() == 0

SMAPS = """\
55d0a0000000-55d0a0001000 r--p 00000000 fd:01 1234                       /usr/bin/prog
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
55d0a0100000-55d0a0300000 rw-p 00000000 00:00 0                          [heap]
Rss:                2048 kB
Anonymous:          2048 kB
AnonHugePages:      2048 kB
KSM:                   8 kB
Swap:                 12 kB
VmFlags: rd wr mr mw me ac mg
7f0000000000-7f0000100000 rw-s 00000000 00:01 77                         /dev/zero (deleted)
Rss:                  40 kB
VmFlags: rd wr sh mr mw me ms
7f0000200000-7f0000400000 rw-p 00000000 00:10 88                         /anon_hugepage (deleted)
VmFlags: rd wr mr mw me de ht
7f0000400000-7f0000401000 rw-p 00000000 00:00 0                          [anon:dev]
VmFlags: rd wr mr mw me dc de io pf
7f0000500000-7f0000502000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de
7f0000600000-7f0000700000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me ac dp
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
VmFlags: ex
"""


def test_parse_smaps_classifies_like_vma_ksm_compatible():
    maps = hostmaps.parse_smaps(SMAPS)
    got = [(m.kind, m.eligible, m.registered) for m in maps]
    assert got == [("file", True, False), ("anon", True, True), ("shared", False, False),
                   ("hugetlb", False, False), ("pfnmap", False, False), ("special", False, False),
                   ("droppable", False, False), ("special", False, False)]
    heap = maps[1]
    assert (heap.start, heap.end, heap.size) == (0x55d0a0100000, 0x55d0a0300000, 2 << 20)
    assert (heap.rss, heap.anonymous, heap.anon_huge, heap.ksm, heap.swap) == \
        (2 << 20, 2 << 20, 2 << 20, 8 << 10, 12 << 10)
    assert heap.reason is None and heap.name == "[heap]"
    assert "MAP_SHARED" in maps[2].reason
    assert "hugetlb" in maps[3].reason
    assert "[vsyscall]" in maps[7].reason
    assert maps[6].name == "[anon]"


def test_read_mappings_of_this_process():
    registered = mmap.mmap(-1, 4 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    registered.madvise(mmap.MADV_MERGEABLE)
    shared = mmap.mmap(-1, 4 * PS)   # Python's default: MAP_SHARED, KSM ignores it
    try:
        maps = hostmaps.read_mappings(os.getpid())
        by_start = {m.start: m for m in maps}
        reg = by_start[_addr(registered)]
        assert reg.registered and reg.eligible and reg.kind == "anon" and reg.size == 4 * PS
        sh = by_start[_addr(shared)]
        assert not sh.eligible and sh.kind == "shared" and not sh.registered
    finally:
        registered.close()
        shared.close()


def _addr(buf) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


@pytest.mark.parametrize("pid", [999_999_999, -3, 0, "abc"])
def test_unknown_or_bad_pid(pid):
    with pytest.raises(ProcessNotFoundError):
        hostmaps.read_mappings(pid)


def test_kernel_thread():
    with open("/proc/2/comm") as f:
        if f.read().strip() != "kthreadd":
            pytest.skip("PID 2 is not kthreadd here")
    with pytest.raises(KernelThreadError, match="kernel thread"):
        hostmaps.read_mappings(2)


def _fake_proc(tmp_path, pid, state, flags):
    d = tmp_path / str(pid)
    d.mkdir()
    (d / "stat").write_text(f"{pid} (x y) {state} 1 1 1 0 -1 {flags} 0 0 0 0 0 0\n")
    (d / "smaps").write_text("")
    return str(tmp_path)


def test_zombie_and_exiting_process_on_a_fake_procfs(tmp_path):
    procfs = _fake_proc(tmp_path, 42, "Z", 0)
    with pytest.raises(ProcessNotFoundError, match="zombie"):
        hostmaps.read_mappings(42, procfs)
    procfs = _fake_proc(tmp_path, 43, "S", 0)
    with pytest.raises(ProcessNotFoundError, match="exiting"):
        hostmaps.read_mappings(43, procfs)
    procfs = _fake_proc(tmp_path, 44, "S", PF_KTHREAD)
    with pytest.raises(KernelThreadError):
        hostmaps.read_mappings(44, procfs)


@pytest.mark.skipif(not ROOT, reason="needs root to drop to another user")
def test_permission_denied_is_one_line_access_error():
    # a forked child drops to nobody and reads init's smaps: the ptrace access check refuses
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - runs in the child
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            hostmaps.read_mappings(1)
        except ProcessAccessError as err:
            os.write(wfd, str(err).encode())
            code = 0
        except BaseException:
            code = 2
        os._exit(code)
    os.close(wfd)
    message = os.read(rfd, 4096).decode()
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert message.startswith("not allowed to read smaps of PID 1") and "\n" not in message


def test_process_error_table():
    assert isinstance(fs.process_error(PermissionError(errno.EACCES, "x"), 5, "smaps"),
                      ProcessAccessError)
    assert isinstance(fs.process_error(FileNotFoundError(errno.ENOENT, "x"), 5, "smaps"),
                      ProcessNotFoundError)
    other = fs.process_error(OSError(errno.EIO, "x"), 5, "smaps")
    assert isinstance(other, ProcessError) and other.errno == errno.EIO


def test_page_runs_coalesces_contiguous_pages():
    addrs = np.array([0, PS, 2 * PS, 10 * PS, 12 * PS, 13 * PS], dtype=np.uint64)
    starts, lens = remote.page_runs(addrs, PS)
    assert starts.tolist() == [0, 10 * PS, 12 * PS]
    assert lens.tolist() == [3 * PS, PS, 2 * PS]
    one = remote.page_runs(np.array([7 * PS], dtype=np.uint64), PS)
    assert one[0].tolist() == [7 * PS] and one[1].tolist() == [PS]


def _private(npages):
    buf = mmap.mmap(-1, npages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    return buf


def test_present_pages_skips_untouched_and_never_faults_in():
    buf = _private(64)
    try:
        a = np.frombuffer(buf, dtype=np.uint8).reshape(64, PS)
        a[0:10, 0] = 1            # written: present
        int(a[20:25, 0].sum())    # read faults: they map the shared zero page
        start = _addr(buf)
        present = pagemap.present_pages(os.getpid(), start, start + 64 * PS)
        assert present.tolist() == [start + i * PS for i in list(range(10)) + list(range(20, 25))]
        assert pagemap.present_pages(os.getpid(), start, start + 64 * PS,
                                     anon_only=True).size == 15
        again = pagemap.present_pages(os.getpid(), start, start + 64 * PS)
        assert np.array_equal(present, again)     # looking did not fault anything in
        if pagemap.zero_page_pfns():
            real = pagemap.present_pages(os.getpid(), start, start + 64 * PS, anon_only=True,
                                         skip_zero_page=True)
            assert real.size == 10
        del a
    finally:
        buf.close()


def test_present_offsets_counts():
    e = np.array([pagemap.PM_PRESENT | 7, pagemap.PM_SWAPPED | 3, 0,
                  pagemap.PM_PRESENT | pagemap.PM_FILE | 9, pagemap.PM_PRESENT | 100],
                 dtype=np.uint64)
    counts = {}
    idx = pagemap.present_offsets(e, anon_only=True, zero_pfns=((100, 101),), counts=counts)
    assert idx.tolist() == [0]
    assert counts == {"swapped": 1, "file": 1, "zero_page": 1}


def test_remote_reader_reads_exact_bytes_and_survives_vanished_pages():
    buf = _private(40)
    a = np.frombuffer(buf, dtype=np.uint8).reshape(40, PS)
    a[:] = np.arange(40, dtype=np.uint8)[:, None]
    start = _addr(buf)
    addrs = np.arange(40, dtype=np.uint64) * np.uint64(PS) + np.uint64(start)
    reader = remote.RemoteReader(os.getpid(), buffer_bytes=64 * PS)
    try:
        ok = reader.read(addrs[::-1][:20])          # not contiguous: one iovec per page
        assert ok.all()
        got = reader.buffer[: 20 * PS].reshape(20, PS)
        assert (got[:, 0] == np.arange(39, 19, -1)).all() and (got == got[:, :1]).all()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        assert libc.munmap(ctypes.c_void_p(start + 10 * PS), 5 * PS) == 0
        ok = reader.read(addrs)
        assert np.flatnonzero(~ok).tolist() == list(range(10, 15))
        assert reader.pages_failed == 5
        back = reader.buffer[: 40 * PS].reshape(40, PS)[:, 0]
        assert (back[ok] == np.arange(40)[ok]).all()
        with pytest.raises(ValueError):
            reader.read(np.zeros(65, dtype=np.uint64))
        del got, back
    finally:
        reader.close()
        del a
        buf.close()


def test_remote_reader_process_exit_is_clean():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    maps = hostmaps.read_mappings(child.pid)
    stack = next(m for m in maps if m.path == "[stack]")
    addrs = pagemap.present_pages(child.pid, stack.start, stack.end)[:4]
    reader = remote.RemoteReader(child.pid, buffer_bytes=8 * PS)
    try:
        assert reader.read(addrs).all()
        child.stdin.close()
        child.wait(timeout=30)
        ok = reader.read(addrs)
        assert not ok.any() and child.pid in reader.exited
        assert not reader.read(addrs).any()     # stays stopped, no syscall, no error
    finally:
        reader.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    with pytest.raises(ProcessNotFoundError):
        hostmaps.read_mappings(child.pid)


def test_read_ahead_keeps_order_and_raises_reader_errors():
    buf = _private(32)
    a = np.frombuffer(buf, dtype=np.uint8).reshape(32, PS)
    a[:] = np.arange(32, dtype=np.uint8)[:, None]
    start = _addr(buf)
    big = mmap.mmap(-1, 8 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    readers = [remote.RemoteReader(os.getpid(), buffer=memoryview(big)[i * 4 * PS:
                                                                        (i + 1) * 4 * PS])
               for i in range(2)]
    try:
        chunks = [(os.getpid(), np.arange(i, i + 4, dtype=np.uint64) * np.uint64(PS) +
                   np.uint64(start), i) for i in range(0, 32, 4)]
        seen = []
        for tag, reader, ok in remote.read_ahead(iter(chunks), readers):
            assert ok.all()
            seen.append((tag, int(reader.buffer[0]), int(reader.buffer[3 * PS])))
        assert seen == [(i, i, i + 3) for i in range(0, 32, 4)]

        def broken():
            yield chunks[0]
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            for _ in remote.read_ahead(broken(), readers):
                pass
        # the consumer leaving early stops the thread
        before = threading.active_count()
        for _ in remote.read_ahead(iter(chunks), readers):
            break
        assert threading.active_count() == before
    finally:
        for r in readers:
            r.close()
        big.close()
        del a
        buf.close()


# --- /proc/kpageflags and /proc/kpagecount --------------------------------------------------------
def _fake_pfn_table(tmp_path, name, values: dict[int, int], frames: int = 64):
    table = np.zeros(frames, dtype=np.uint64)
    for pfn, v in values.items():
        table[pfn] = v
    (tmp_path / name).write_bytes(table.tobytes())


def test_kpageflags_and_kpagecount_on_a_fake_tree(tmp_path):
    from udedup.host.pagemap import (KPF_KSM, KPF_THP, KPF_ZERO_PAGE, read_kpagecount,
                                     read_kpageflags)
    assert (KPF_KSM, KPF_THP, KPF_ZERO_PAGE) == (21, 22, 24)
    _fake_pfn_table(tmp_path, "kpageflags", {3: 1 << KPF_KSM, 4: 1 << KPF_THP, 5: 1 << KPF_THP,
                                             9: 1 << KPF_ZERO_PAGE})
    _fake_pfn_table(tmp_path, "kpagecount", {3: 7, 9: 1})
    # any order, repeats, runs of consecutive frames; a frame past the end reads as 0
    pfns = np.array([9, 3, 4, 5, 3, 1000, 0], dtype=np.uint64)
    flags = read_kpageflags(pfns, str(tmp_path))
    assert flags.dtype == np.uint64
    assert flags.tolist() == [1 << KPF_ZERO_PAGE, 1 << KPF_KSM, 1 << KPF_THP, 1 << KPF_THP,
                              1 << KPF_KSM, 0, 0]
    assert read_kpagecount(pfns, str(tmp_path)).tolist() == [1, 7, 0, 0, 7, 0, 0]
    assert read_kpageflags([], str(tmp_path)).size == 0


def test_kpageflags_errors_are_udedup_errors(tmp_path):
    from udedup.host.pagemap import read_kpageflags
    with pytest.raises(ProcessError, match="does not exist") as info:
        read_kpageflags([1], str(tmp_path))
    assert info.value.errno == errno.ENOENT and not isinstance(info.value, ProcessNotFoundError)
    if not ROOT:
        _fake_pfn_table(tmp_path, "kpageflags", {})
        os.chmod(tmp_path / "kpageflags", 0)
        with pytest.raises(ProcessAccessError, match="root"):
            read_kpageflags([1], str(tmp_path))


@pytest.mark.skipif(not ROOT, reason="PFNs and /proc/kpageflags need CAP_SYS_ADMIN")
def test_real_zero_page_pfn_has_kpf_zero_page():
    from udedup.host.pagemap import KPF_ZERO_PAGE, read_kpagecount, read_kpageflags, zero_page_pfns
    if not os.path.exists("/proc/kpageflags"):
        pytest.skip("this kernel has no /proc/kpageflags")
    ranges = zero_page_pfns()
    assert ranges, "as root the zero page's PFN is visible"
    first, _ = ranges[0]
    flags = read_kpageflags([first])
    assert (int(flags[0]) >> KPF_ZERO_PAGE) & 1 == 1
    assert read_kpagecount([first]).shape == (1,)
