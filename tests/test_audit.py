"""The trust-domain audit (udedup.ksm.audit, ``udedup audit``): on fake /proc trees (pagemap and
kpageflags written with numpy, cgroup and status files, smaps with ``mg``; the bytes of a frame
are "read" from a table of which fake frames are zero-filled), then on the real kernel with
children in two real cgroup v2 groups and under two uids (marked ``ksm``, root)."""
from __future__ import annotations

import json
import mmap
import os
import time

import numpy as np
import pytest

from udedup import cli
from udedup.errors import AUDIT_FINDINGS_EXIT, ProcessAccessError, UsageError
from udedup.host import pagemap as pm
from udedup.ksm import audit as audit_mod
from udedup.ksm.audit import NEEDS_ROOT, audit, mem_zero_pages

from cgroup_fixtures import LayoutChild, cgroups
from test_attribution import exclusive, place
from test_truth import BASE, PS, ZERO, ZERO_PFNS, present, write_proc

KSM = 1 << pm.KPF_KSM
A, B, C, D, Z, ONCE = 0x5000, 0x5100, 0x9000, 0x9100, 0x6000, 0x6100   # fake KSM frames
PLAIN = 0x7000
ZERO_FILLED = {Z}           # the fake KSM frames whose bytes are all zero


def write_flags(root, frames: dict) -> None:
    flags = np.zeros(max(frames) + 1, dtype=np.uint64)
    for pfn, f in frames.items():
        flags[pfn] = f
    (root / "kpageflags").write_bytes(flags.tobytes())


def fake_zero_reader(root):
    """The fake frames' bytes: zero-filled when the page's PFN (its fake pagemap) is in
    ZERO_FILLED. Records what was read."""
    reads = []

    def read(pid, addrs, page_size):
        entries = np.fromfile(root / str(pid) / "pagemap", dtype=np.uint64)
        pfns = entries[(np.asarray(addrs) // page_size).astype(np.int64)] & np.uint64(pm.PM_PFN_MASK)
        reads.append((pid, [int(a) for a in addrs]))
        return np.isin(pfns, list(ZERO_FILLED))
    read.reads = reads
    return read


def fake_host(root):
    """10, 11 in /a (uids 1000, 1001), 12 in /b/x and 13 in /b/y (uid 1000). A: 10 + 11 (inside
    /a; across uids). B: 10 + 12 twice (across /a and /b/x). C: 12 + 13 (across /b/x and /b/y,
    one domain at depth 1). Z, zero-filled: 10 + 12. D: 12 twice (inside). ONCE: a KSM frame
    mapped once (shared with nobody). PLAIN+300: shared by 10 and 12 but no KSM page. 10 has 3
    mg pages on the kernel's zero page; 14 has no mergeable memory but maps B."""
    p10 = np.array([present(A), present(B), present(Z), exclusive(ONCE), exclusive(PLAIN),
                    present(PLAIN + 300), present(ZERO), present(ZERO), present(ZERO)],
                   dtype=np.uint64)
    place(write_proc(root, 10, [(len(p10), True, p10)], comm="a-one"), "/a", 1000)
    p11 = np.array([present(A), exclusive(PLAIN + 1)], dtype=np.uint64)
    place(write_proc(root, 11, [(1, False, p11[1:]), (1, True, p11[:1])], comm="a-two"),
          "/a", 1001)
    p12 = np.array([present(B), present(B), present(C), present(Z), present(D), present(D),
                    present(PLAIN + 300), np.uint64(pm.PM_SWAPPED | A)], dtype=np.uint64)
    place(write_proc(root, 12, [(len(p12), True, p12)], comm="bx"), "/b/x", 1000)
    p13 = np.array([present(C)], dtype=np.uint64)
    place(write_proc(root, 13, [(1, True, p13)], comm="by"), "/b/y", 1000)
    place(write_proc(root, 14, [(1, True, np.array([present(B)], dtype=np.uint64))],
                     mergeable=False), "/c", 1000)
    write_flags(root, {A: KSM, B: KSM, C: KSM, D: KSM, Z: KSM, ONCE: KSM, PLAIN + 300: 0})
    return root


def run_audit(root, **kw):
    return audit(procfs=str(root), zero_pfns=ZERO_PFNS, zero_reader=fake_zero_reader(root), **kw)


def test_frames_mapped_from_two_cgroups_are_offenders_grouped_by_their_domains(tmp_path):
    r = run_audit(fake_host(tmp_path))
    assert not r.ok and r.kind == "cgroup" and r.depth == 0
    assert r.domains == {"/a": [10, 11], "/b/x": [12], "/b/y": [13]}
    assert r.ksm_frames == 5                        # A, B, C, D, Z (ONCE is mapped once)
    assert [o.pfn for o in r.offenders] == [B, C]   # Z: zero-filled, allowed by default
    assert r.offender_frames == 2 and r.offender_pages == 5
    b, c = r.offenders
    assert not b.zero and b.domains == ("/a", "/b/x")
    assert b.mappings == (("/a", 10, "a-one", BASE + PS), ("/b/x", 12, "bx", BASE),
                          ("/b/x", 12, "bx", BASE + PS))
    assert c.mappings == (("/b/x", 12, "bx", BASE + 2 * PS), ("/b/y", 13, "by", BASE))
    assert r.zero_frames_across == 1 and r.zero_page_mappings == 3
    assert [(g.domains, g.frames, g.pages, g.zero_frames) for g in r.groups] == [
        (("/a", "/b/x"), 1, 3, 0), (("/b/x", "/b/y"), 1, 2, 0)]
    assert r.groups[0].processes == ((12, "bx", "/b/x", 2, (BASE, BASE + PS)),
                                     (10, "a-one", "/a", 1, (BASE + PS,)))
    assert r.unreadable_processes == 0 and r.processes == 4


def test_domain_sets_grouped_the_same_without_the_row_code(tmp_path, monkeypatch):
    want = [(g.domains, g.frames, g.pages, g.zero_frames, g.processes)
            for g in run_audit(fake_host(tmp_path), zero_pages_across_domains=False).groups]
    monkeypatch.setattr(audit_mod, "_ROW_CODE_LIMIT", 0)     # rows sorted as rows
    got = [(g.domains, g.frames, g.pages, g.zero_frames, g.processes)
           for g in run_audit(tmp_path, zero_pages_across_domains=False).groups]
    assert got == want and len(got) == 2


def test_zero_filled_frames_are_read_and_offend_only_when_strict(tmp_path):
    root = fake_host(tmp_path)
    reader = fake_zero_reader(root)
    r = audit(procfs=str(root), zero_pfns=ZERO_PFNS, zero_reader=reader,
              zero_pages_across_domains=False)
    # one mapping of each cross-domain frame was read (B, Z by 10; C by 12), nothing else
    assert sorted(reader.reads) == [(10, [BASE + PS, BASE + 2 * PS]), (12, [BASE + 2 * PS])]
    assert [(o.pfn, o.zero) for o in r.offenders] == [(B, False), (Z, True), (C, False)]
    assert r.offender_frames == 3 and r.zero_frames_across == 1
    assert [(g.domains, g.frames, g.pages, g.zero_frames) for g in r.groups] == [
        (("/a", "/b/x"), 2, 5, 1), (("/b/x", "/b/y"), 1, 2, 0)]
    # zero-ness is the bytes, not the frame: a reader that finds nothing zero makes Z an offender
    r = audit(procfs=str(root), zero_pfns=ZERO_PFNS,
              zero_reader=lambda pid, addrs, ps: np.zeros(len(addrs), dtype=bool))
    assert r.offender_frames == 3 and r.zero_frames_across == 0


def test_depth_uid_none_and_pids_change_the_domains(tmp_path):
    root = fake_host(tmp_path)
    r = run_audit(root, depth=1)
    assert r.domains == {"/a": [10, 11], "/b": [12, 13]} and [o.pfn for o in r.offenders] == [B]
    r = run_audit(root, kind="uid")
    assert r.domains == {"uid:1000": [10, 12, 13], "uid:1001": [11]}
    assert [o.pfn for o in r.offenders] == [A] and r.offenders[0].domains == ("uid:1000",
                                                                               "uid:1001")
    r = run_audit(root, kind="none")
    assert r.ok and r.domains == {"": [10, 11, 12, 13]} and r.zero_frames_across == 0
    r = run_audit(root, pids=[10, 11, 13])      # 12 not audited: B and C have one domain left
    assert r.ok and r.ksm_frames == 4 and r.domains == {"/a": [10, 11], "/b/y": [13]}


def test_limit_caps_the_list_not_the_counts_and_as_dict_is_json(tmp_path):
    r = run_audit(fake_host(tmp_path), zero_pages_across_domains=False, limit=1)
    assert len(r.offenders) == 1 and r.offender_frames == 3 and r.offender_pages == 7
    d = json.loads(json.dumps(r.as_dict()))
    assert d["ok"] is False and d["offenders_listed"] == 1 and d["limit"] == 1
    assert d["offenders"] == [{"pfn": B, "zero": False, "domains": ["/a", "/b/x"], "mappings": [
        {"domain": "/a", "pid": 10, "comm": "a-one", "address": BASE + PS},
        {"domain": "/b/x", "pid": 12, "comm": "bx", "address": BASE},
        {"domain": "/b/x", "pid": 12, "comm": "bx", "address": BASE + PS}]}]
    assert d["groups"][0]["processes"][0] == {"pid": 12, "comm": "bx", "domain": "/b/x",
                                              "pages": 3, "addresses": [BASE, BASE + PS, BASE + 3 * PS]}
    assert {k: d[k] for k in ("offender_frames", "zero_frames_across", "ksm_frames",
                              "zero_page_mappings", "zero_pages_across_domains")} == {
        "offender_frames": 3, "zero_frames_across": 1, "ksm_frames": 5,
        "zero_page_mappings": 3, "zero_pages_across_domains": False}


def test_bad_kind_depth_and_no_root(tmp_path):
    root = fake_host(tmp_path)
    with pytest.raises(UsageError, match="trust domain kind"):
        run_audit(root, kind="tenant")
    with pytest.raises(UsageError, match="depth"):
        run_audit(root, depth=-1)
    with pytest.raises(ProcessAccessError) as err:
        audit(procfs=str(root), zero_pfns=())      # pagemap shows no PFNs
    assert str(err.value) == NEEDS_ROOT and "\n" not in NEEDS_ROOT
    os.remove(root / "kpageflags")
    with pytest.raises(Exception, match="kpageflags"):
        run_audit(root)


def cli_audit(root, monkeypatch, capsys, *argv, zero=ZERO_PFNS):
    monkeypatch.setattr(audit_mod, "zero_page_pfns_or_none", lambda procfs: zero)
    fake = fake_zero_reader(root)
    monkeypatch.setattr(audit_mod, "mem_zero_pages", lambda pid, addrs, ps, procfs: fake(
        pid, addrs, ps))
    try:
        code = cli.main(["audit", "--procfs", str(root), *argv])
    except SystemExit as exit:     # argparse: a bad option
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes_text_and_json(tmp_path, monkeypatch, capsys):
    root = fake_host(tmp_path)
    code, out, err = cli_audit(root, monkeypatch, capsys)
    assert code == AUDIT_FINDINGS_EXIT == 13, err
    lines = out.splitlines()
    assert "4 processes" in lines[0] and "3 domains" in lines[0] and "5 shared KSM frames" in lines[0]
    assert lines[1] == "FOUND: 2 KSM frames (5 pages) are mapped from two or more domains"
    assert lines[2] == "  /a + /b/x: 1 frames, 3 pages"
    assert lines[3] == f"    pid 12 (bx) in /b/x: 2 pages, e.g. {BASE:#x}, {BASE + PS:#x}"
    assert any(line.startswith("zero-filled KSM frames mapped across domains: 1, allowed")
               for line in lines)
    code, out, _ = cli_audit(root, monkeypatch, capsys, "--cgroup-depth", "2", "--pid", "10",
                             "11", "--pid", "13")
    assert code == 0 and "ok: no KSM page" in out
    code, out, _ = cli_audit(root, monkeypatch, capsys, "--strict-zero", "--json", "--limit", "2")
    d = json.loads(out)
    assert code == 13 and d["offender_frames"] == 3 and len(d["offenders"]) == 2
    code, out, _ = cli_audit(root, monkeypatch, capsys, "--domains", "uid", "--json")
    assert code == 13 and [o["pfn"] for o in json.loads(out)["offenders"]] == [A]
    code, out, _ = cli_audit(root, monkeypatch, capsys, "--domains", "none")
    assert code == 0


def test_cli_not_root_and_bad_options(tmp_path, monkeypatch, capsys):
    root = fake_host(tmp_path)
    code, out, err = cli_audit(root, monkeypatch, capsys, zero=())
    assert code == 4 and out == "" and err.count("\n") == 1 and "needs root" in err
    for argv in (["--limit", "-1"], ["--cgroup-depth", "-2"], ["--domains", "pod"]):
        code, out, err = cli_audit(root, monkeypatch, capsys, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1, argv


def test_mem_zero_pages_reads_the_bytes_of_a_live_process():
    if not os.access(f"/proc/{os.getpid()}/mem", os.R_OK):
        pytest.skip("/proc/self/mem is not readable here")
    buf = mmap.mmap(-1, 6 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(buf, dtype=np.uint8).reshape(6, PS)
    a[1, PS - 1] = 1            # page 1: one non-zero byte at its very end
    a[3, 0] = 7
    a[5, 9] = 2
    base = a.ctypes.data
    # out of order, runs and gaps: each answer goes to its own address
    addrs = np.array([base + i * PS for i in (5, 0, 1, 2, 3, 4)], dtype=np.uint64)
    try:
        assert mem_zero_pages(os.getpid(), addrs, PS).tolist() == [False, True, False, True,
                                                                   False, True]
        gone = np.array([0x1000, base], dtype=np.uint64)   # not mapped: not read, not zero
        assert mem_zero_pages(os.getpid(), gone, PS).tolist() == [False, True]
        assert mem_zero_pages(999999999, gone, PS).tolist() == [False, False]   # no such pid
    finally:
        del a
        buf.close()


# --- the real kernel: children in two real cgroup v2 groups, or under two uids -------------------
NIN, NX, NZ, N0 = 40, 30, 10, 16


def merged(ksm, want: int, timeout: float = 60.0) -> None:
    """Until pages_sharing + ksm_zero_pages reach ``want`` (settle detection alone may stop
    early on a hundred pages)."""
    deadline = time.monotonic() + timeout
    while True:
        s = ksm.stats()
        if s.pages_sharing + s.ksm_zero_pages >= want:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"KSM merged {s.pages_sharing} + {s.ksm_zero_pages} pages in {timeout} s, "
                        f"not the {want} expected")
        time.sleep(0.05)


def real_audit(children, ksm_knobs, want, **kw):
    """Merge the children's buffers (pinned knobs) until ``want`` pages are saved, stop ksmd,
    audit them (and the CLI's exit code and JSON with the same options), unmerge."""
    from udedup.ksm import Ksm
    ksm = Ksm()
    pids = [c.pid for c in children]
    argv = ["audit", "--json", "--limit", "1000", "--pid", *map(str, pids),
            "--domains", kw.get("kind", "cgroup")]
    if kw.get("zero_pages_across_domains") is False:
        argv.append("--strict-zero")
    with ksm.settings(pages_to_scan=2000, sleep_millisecs=0, smart_scan=0, run=1, **ksm_knobs):
        try:
            ksm.wait_settled(timeout=60)
            merged(ksm, want)
            ksm.set("run", 0)           # ksmd stopped: the page tables hold still
            report = audit(ksm=ksm, pids=pids, **kw)
            code = cli.main(argv)
        finally:
            ksm.set("run", 2)
    return report, code


def start(specs):
    children = []
    try:
        for layout, cgroup, user in specs:
            children.append(LayoutChild(layout, cgroup, user=user))
    except BaseException:
        for c in children:
            c.kill()
        raise
    return children


def need_root():
    if os.geteuid() != 0:
        pytest.skip("the audit reads PFNs and kpageflags: root only")


def rel(mount, path):
    return "/" + os.path.relpath(path, mount)


@pytest.mark.ksm
def test_real_cgroups_content_shared_inside_each_group_only_is_clean(capsys):
    need_root()
    inside = [["x", i] for i in range(NIN)]
    with cgroups("udedup-test-audit-a", "udedup-test-audit-b") as (mount, (cg_a, cg_b)):
        kids = start([(inside, cg_a, None), (inside, cg_a, None),
                      ([["w", i] for i in range(NIN)] + [["unique", 1]], cg_b, None),
                      ([["w", i] for i in range(NIN)] + [["unique", 2]], cg_b, None)])
        try:
            r, code = real_audit(kids, {"use_zero_pages": 0}, 2 * NIN)
        finally:
            for c in kids:
                c.kill()
    out = json.loads(capsys.readouterr().out)
    assert r.ok and code == 0 and out["ok"]
    assert r.ksm_frames == 2 * NIN               # every content merged, inside its group
    assert r.domains == {rel(mount, cg_a): [kids[0].pid, kids[1].pid],
                         rel(mount, cg_b): [kids[2].pid, kids[3].pid]}


@pytest.mark.ksm
def test_real_cgroups_content_shared_across_groups_is_found_frame_by_frame(capsys):
    need_root()
    # X: inside /a; Y: a1 + b1 (across); Z: a1, a2 and b1 (across, 3 pages per frame)
    a1 = [["x", i] for i in range(NIN)] + [["y", i] for i in range(NX)] + \
        [["z", i] for i in range(NZ)]
    a2 = [["x", i] for i in range(NIN)] + [["z", i] for i in range(NZ)] + [["unique", 7]]
    b1 = [["y", i] for i in range(NX)] + [["z", i] for i in range(NZ)] + [["unique", 8]]
    with cgroups("udedup-test-audit-a", "udedup-test-audit-b") as (mount, (cg_a, cg_b)):
        kids = start([(a1, cg_a, None), (a2, cg_a, None), (b1, cg_b, None)])
        try:
            r, code = real_audit(kids, {"use_zero_pages": 0}, NIN + NX + 2 * NZ)
        finally:
            for c in kids:
                c.kill()
    out = json.loads(capsys.readouterr().out)
    da, db = rel(mount, cg_a), rel(mount, cg_b)
    assert code == AUDIT_FINDINGS_EXIT and not r.ok and out["offender_frames"] == NX + NZ
    assert r.ksm_frames == NIN + NX + NZ
    assert r.offender_frames == NX + NZ and r.offender_pages == 2 * NX + 3 * NZ
    assert [(g.domains, g.frames, g.pages) for g in r.groups] == [((da, db), NX + NZ,
                                                                   2 * NX + 3 * NZ)]
    a1_pid, a2_pid, b1_pid = (c.pid for c in kids)
    pages = {p[0]: (p[2], p[3]) for p in r.groups[0].processes}
    assert pages == {a1_pid: (da, NX + NZ), a2_pid: (da, NZ), b1_pid: (db, NX + NZ)}
    # each offender is one content: its mappings are exactly the pages that hold it
    where = {}
    for c, layout in zip(kids, (a1, a2, b1)):
        for i, (kind, n) in enumerate(layout):
            where.setdefault((kind, n), set()).add((c.pid, c.address + i * PS))
    want = sorted(sorted(v) for k, v in where.items() if k[0] in "yz")
    got = sorted(sorted((p, a) for _, p, _, a in o.mappings) for o in r.offenders)
    assert got == want and not any(o.zero for o in r.offenders)
    assert {o.domains for o in r.offenders} == {(da, db)}


@pytest.mark.ksm
def test_real_zero_pages_across_groups_allowed_unless_strict(capsys):
    need_root()
    zeros = [["zero", i] for i in range(N0)]
    with cgroups("udedup-test-audit-a", "udedup-test-audit-b") as (mount, (cg_a, cg_b)):
        kids = start([(zeros + [["unique", 9]], cg_a, None), (zeros + [["unique", 10]], cg_b, None)])
        try:
            lax, code_lax = real_audit(kids, {"use_zero_pages": 0}, 2 * N0 - 1)
            capsys.readouterr()
            strict, code_strict = real_audit(kids, {"use_zero_pages": 0}, 2 * N0 - 1,
                                             zero_pages_across_domains=False)
            capsys.readouterr()
            kernel_zero, code_kz = real_audit(kids, {"use_zero_pages": 1}, 2 * N0,
                                              zero_pages_across_domains=False)
        finally:
            for c in kids:
                c.kill()
    # use_zero_pages=0: the 2 * N0 zero pages merge into KSM frames (one per 256 mappings)
    assert lax.ok and code_lax == 0 and lax.zero_frames_across >= 1 and lax.offender_frames == 0
    assert code_strict == AUDIT_FINDINGS_EXIT and strict.offender_frames == strict.zero_frames_across
    assert strict.offender_pages == 2 * N0 and all(o.zero for o in strict.offenders)
    # use_zero_pages=1: they map the kernel's zero page, no KSM frame: nothing to find
    assert kernel_zero.ok and code_kz == 0 and kernel_zero.ksm_frames == 0
    assert kernel_zero.zero_page_mappings == 2 * N0


@pytest.mark.ksm
def test_real_uid_domains_with_children_running_as_another_uid(capsys):
    need_root()
    other = 65534
    with_x = [["x", i] for i in range(NIN)]
    with_y = [["y", i] for i in range(NX)]
    kids = start([(with_y + [["unique", 1]], None, None),            # root
                  (with_x + with_y, None, other),                    # both as `other`
                  (with_x + [["unique", 2]], None, other)])
    try:
        by_uid, code_uid = real_audit(kids, {"use_zero_pages": 0}, NIN + NX, kind="uid")
        capsys.readouterr()
        by_cgroup, code_cg = real_audit(kids, {"use_zero_pages": 0}, NIN + NX, kind="cgroup")
    finally:
        for c in kids:
            c.kill()
    root_pid, o1, o2 = (c.pid for c in kids)
    assert by_uid.domains == {"uid:0": [root_pid], f"uid:{other}": [o1, o2]}
    assert code_uid == AUDIT_FINDINGS_EXIT and by_uid.offender_frames == NX
    assert [(g.domains, g.frames, g.pages) for g in by_uid.groups] == [
        (("uid:0", f"uid:{other}"), NX, 2 * NX)]
    assert {p[0] for p in by_uid.groups[0].processes} == {root_pid, o1}
    assert by_uid.ksm_frames == NIN + NX
    assert by_cgroup.ok and code_cg == 0            # one cgroup: all of them in the same domain
