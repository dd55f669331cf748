"""Reading another process's memory never unshares its pages: process_vm_readv pins what it reads
and the kernel gives a pinned shared anonymous page (KSM, fork-shared) a private copy, so
:class:`udedup.host.remote.RemoteReader` reads batches holding shared pages through /proc/PID/mem.
Each test also runs the reader with ``keep_shared=False`` to show the kernel behaviour it avoids
(so the test fails if the routing is lost)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from udedup.host import pagemap as pm
from udedup.host.remote import RemoteReader

from cgroup_fixtures import LayoutChild, frame_counts

PS = os.sysconf("SC_PAGE_SIZE")

FORKER = r"""
import ctypes, json, mmap, os, sys
import numpy as np
n = int(sys.argv[1])
buf = mmap.mmap(-1, n * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
a = np.frombuffer(buf, dtype=np.uint8).reshape(n, mmap.PAGESIZE)
a[:, 0] = np.arange(n) % 251 + 1
a[:, 1] = 7
pid = os.fork()
if pid == 0:
    print(json.dumps({"pid": os.getpid(), "address": int(a.ctypes.data)}), flush=True)
    sys.stdin.readline()
    os._exit(0)
sys.stdin.readline()
os.kill(pid, 9)
"""


def exclusive(pid, address, n):
    fd = pm.open_pagemap(pid)
    try:
        e = pm.read_pagemap(fd, address, address + n * PS, pid=pid)
    finally:
        os.close(fd)
    return (e & np.uint64(pm.PM_MMAP_EXCLUSIVE)) != 0


def read_all(pid, address, n, keep_shared):
    with RemoteReader(pid, n * PS, keep_shared=keep_shared) as r:
        ok = r.read(np.arange(address, address + n * PS, PS, dtype=np.uint64))
        data = r.buffer[: n * PS].reshape(n, PS).copy()
        return ok, data, r.shared_batches


@pytest.mark.skipif(os.geteuid() != 0, reason="reads another process's memory and pagemap: root")
def test_fork_shared_pages_stay_shared_when_read():
    n = 64
    parent = subprocess.Popen([sys.executable, "-c", FORKER, str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = json.loads(parent.stdout.readline())
        pid, addr = child["pid"], child["address"]
        assert not exclusive(pid, addr, n).any()       # shared with the parent since fork
        ok, data, batches = read_all(pid, addr, n // 2, keep_shared=True)
        assert ok.all() and batches == 1
        assert (data[:, 0] == np.arange(n // 2) % 251 + 1).all() and (data[:, 1] == 7).all()
        assert not exclusive(pid, addr, n // 2).any()  # still shared: nothing was copied
        # what the routing avoids: process_vm_readv gives every page it reads a private copy
        ok, data, batches = read_all(pid, addr + n // 2 * PS, n // 2, keep_shared=False)
        assert ok.all() and batches == 0
        assert exclusive(pid, addr + n // 2 * PS, n // 2).all()
    finally:
        parent.stdin.write("\n")
        parent.stdin.close()
        parent.wait()


@pytest.mark.ksm
def test_merged_pages_stay_merged_when_read():
    if os.geteuid() != 0:
        pytest.skip("kpageflags (the KSM bit) is root's only")
    from udedup.ksm import Ksm
    n = 400
    layout = [["x", i % 50] for i in range(n)]
    ksm = Ksm()
    c = LayoutChild(layout)
    try:
        with ksm.settings(run=1, pages_to_scan=5000, sleep_millisecs=0, smart_scan=0,
                          use_zero_pages=0):
            deadline = time.monotonic() + 60
            while not frame_counts(c.pid, c.address, n)[0].all() and time.monotonic() < deadline:
                time.sleep(0.1)
            ksm.set("run", 0)              # nothing merges again behind the reads
            assert frame_counts(c.pid, c.address, n)[0].all(), "ksmd did not merge the layout"
            half = n // 2
            ok, data, batches = read_all(c.pid, c.address, half, keep_shared=True)
            assert ok.all() and batches == 1
            ok2, data2, _ = read_all(c.pid, c.address + half * PS, half, keep_shared=False)
            is_ksm = frame_counts(c.pid, c.address, n)[0]
    finally:
        c.kill()
    assert is_ksm[:half].all()                     # read through /proc/PID/mem: still merged
    assert not is_ksm[half:].any()                 # process_vm_readv unshared every page
    assert ok2.all()
    # the bytes are the same either way: page i holds the content of ("x", i % 50)
    assert (data == data2).all()
