"""host.domains: the trust-domain key of a process, from a fake /proc and from real processes."""
from __future__ import annotations

import os

import pytest

from udedup.errors import UsageError
from udedup.host.domains import (KINDS, cut_cgroup, domain_key, process_domain,
                                 process_domains)
from udedup.host.fs import ProcFs

POD = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-ab.scope"


def test_cut_cgroup():
    assert cut_cgroup(POD, 0) == POD
    assert cut_cgroup(POD, 3) == "/kubepods.slice/kubepods-burstable.slice/" \
                                 "kubepods-burstable-pod12.slice"
    assert cut_cgroup(POD, 1) == "/kubepods.slice"
    assert cut_cgroup(POD, 9) == POD
    assert cut_cgroup("/", 2) == "/" and cut_cgroup("", 0) == "/"


def test_domain_key():
    assert domain_key("none", POD, 5) == ""
    assert domain_key("cgroup", POD, 5, 1) == "/kubepods.slice"
    assert domain_key("uid", POD, 1000) == "uid:1000"
    assert domain_key("cgroup", None, 5) == "?" and domain_key("uid", POD, None) == "?"
    with pytest.raises(UsageError, match="unknown trust domain kind 'pod'"):
        domain_key("pod", POD, 5)


@pytest.fixture
def fakeproc(tmp_path):
    def proc(pid, cgroup=None, uid=None):
        d = tmp_path / str(pid)
        d.mkdir()
        if cgroup is not None:
            (d / "cgroup").write_text(cgroup)
        if uid is not None:
            (d / "status").write_text(f"Name:\tx\nUid:\t{uid + 1}\t{uid}\t{uid}\t{uid}\n")
    proc(10, "12:memory:/old\n0::/tenant-a/app\n", 1000)
    proc(11, "0::/tenant-a/db\n", 1001)
    proc(12, "12:memory:/v1-only\n", 1000)         # no cgroup v2 line
    proc(13)                                       # nothing readable
    return ProcFs(str(tmp_path))


def test_process_domains_from_a_fake_proc(fakeproc):
    pids = [10, 11, 12, 13, 14]
    assert process_domains(pids, "cgroup", 0, fakeproc) == {
        10: "/tenant-a/app", 11: "/tenant-a/db", 12: "?12", 13: "?13", 14: "?14"}
    assert process_domains(pids, "cgroup", 1, fakeproc) == {
        10: "/tenant-a", 11: "/tenant-a", 12: "?12", 13: "?13", 14: "?14"}
    # the effective uid (the second field), not the real one
    assert process_domains(pids, "uid", 0, fakeproc) == {
        10: "uid:1000", 11: "uid:1001", 12: "uid:1000", 13: "?13", 14: "?14"}
    assert process_domains(pids, "none", 0, fakeproc) == {p: "" for p in pids}
    assert process_domain(10, "cgroup", 2, str(fakeproc.root)) == "/tenant-a/app"


@pytest.mark.parametrize("kind, depth, message", [
    ("pod", 0, "unknown trust domain kind 'pod': use one of none, cgroup, uid"),
    ("cgroup", -1, "cgroup depth must be a whole number >= 0"),
    ("cgroup", "2", "cgroup depth must be a whole number >= 0"),
])
def test_bad_kind_and_depth(kind, depth, message):
    with pytest.raises(UsageError, match=message):
        process_domains([os.getpid()], kind, depth)


def test_real_processes():
    me = os.getpid()
    with open("/proc/self/cgroup") as f:
        v2 = [line[3:].strip() for line in f if line.startswith("0::")]
    got = process_domains([me], "cgroup")[me]
    assert got == (v2[0] if v2 and v2[0] else f"?{me}")
    assert process_domains([me], "uid") == {me: f"uid:{os.geteuid()}"}
    assert process_domains([999999999], "uid") == {999999999: "?999999999"}
    assert KINDS == ("none", "cgroup", "uid")
