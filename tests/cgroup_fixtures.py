"""Real cgroup v2 groups and page-layout child processes for the tests that need them
(attribution, audit, trust domains). A test that cannot make a group skips with the reason."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from udedup.host import pagemap as pm

PS = os.sysconf("SC_PAGE_SIZE")

CHILD = r"""
import ctypes, json, mmap, os, sys
import numpy as np
import numpy.random                  # loaded before a drop to another uid (see ``user``)
ps = mmap.PAGESIZE
pages = json.loads(sys.argv[1])      # one [kind, index] per page
sys.stdin.readline()                 # until the parent has moved us into our cgroup
if len(sys.argv) > 2:                # run as this uid (python and numpy are loaded already)
    os.setresgid(int(sys.argv[2]), int(sys.argv[2]), int(sys.argv[2]))
    os.setresuid(int(sys.argv[2]), int(sys.argv[2]), int(sys.argv[2]))
buf = mmap.mmap(-1, len(pages) * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
a = np.frombuffer(buf, dtype=np.uint8).reshape(len(pages), ps)
for i, (kind, n) in enumerate(pages):
    seed = {"x": 1, "y": 2, "z": 3, "zero": 4, "unique": 5, "w": 6}[kind]
    a[i] = np.random.default_rng([seed, n]).integers(0, 256, ps, dtype=np.uint8)
    if kind == "zero":
        a[i] = 0                     # written, then zero: KSM maps it to the zero page
buf.madvise(mmap.MADV_MERGEABLE)
print(json.dumps({"address": int(a.ctypes.data)}), flush=True)
sys.stdin.readline()
"""


def cgroup2_mount() -> str | None:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


@contextlib.contextmanager
def cgroups(*names):
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 mounted here")
    made = []
    try:
        for name in names:
            path = os.path.join(mount, name)
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except OSError as err:
                pytest.skip(f"cannot create a cgroup v2 group under {mount}: {err.strerror}")
            made.append(path)
        yield mount, made
    finally:
        for path in made:
            for _ in range(50):       # rmdir is EBUSY until the killed children are gone
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def others_registered(mine) -> list[str]:
    from udedup.host.fs import ProcFs
    procfs, out = ProcFs(), []
    for pid in procfs.pids():
        stat = procfs.maybe_ksm_stat(pid)
        if pid not in mine and stat and (stat.get("ksm_mergeable") is True
                                         or stat.get("ksm_merge_any") is True
                                         or int(stat.get("ksm_rmap_items", 0) or 0) > 0):
            out.append(f"{pid} ({procfs.comm(pid, default='?')})")
    return out


def frame_counts(pid, address, n):
    fd = pm.open_pagemap(pid)
    try:
        entries = pm.read_pagemap(fd, address, address + n * PS, pid=pid)
    finally:
        os.close(fd)
    pfns = entries & np.uint64(pm.PM_PFN_MASK)
    flags, counts = pm.read_pfn_tables(pfns)
    zero = np.zeros(n, dtype=bool)
    for first, stop in pm.zero_page_pfns():
        zero |= (pfns >= first) & (pfns < stop)
    return ((flags >> np.uint64(pm.KPF_KSM)) & np.uint64(1)).astype(bool), counts, zero


class LayoutChild:
    """A child process whose one anonymous buffer (MADV_NOHUGEPAGE, MADV_MERGEABLE) holds one page
    per ``[kind, index]`` of ``layout``: kinds "x", "y", "z", "w", "zero", "unique"; the same
    (kind, index) gives the same bytes in every child. Moved into ``cgroup`` (a cgroup v2
    directory) before it fills its buffer, if given; running as ``user`` (a uid, its gid too: the
    child drops root after loading python, whose files another uid may not read), if given."""

    def __init__(self, layout, cgroup: str | None = None, user: int | None = None):
        self.layout = layout
        self.user = user
        extra = [] if user is None else [str(int(user))]
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(layout), *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     close_fds=True)
        self.pid = self.proc.pid
        if cgroup is not None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(self.pid))
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.address = json.loads(self.proc.stdout.readline())["address"]

    def kill(self):
        self.proc.kill()
        self.proc.wait()
