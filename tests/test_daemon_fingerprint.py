"""Sampled confirmation of estimates (udedup.daemon.fingerprint) on real processes: memory that
reads back the same keeps the last estimate, rewritten, volatile or grown memory does not, and
the sample reads only present pages."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from udedup.daemon import fingerprint
from udedup.daemon.act import Actor
from udedup.daemon.model import EstimateResult, Observation, Plan
from udedup.daemon.observe import process_start_time
from udedup.host.fs import ProcFs
from udedup.host.parse import status_kib

from daemon_fakes import cfg

PS = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
UNREGISTERED = {"register": False}


def rss_anon(pid: int) -> int:
    return status_kib(ProcFs().maybe_status(pid), "RssAnon")


def info_of(child) -> SimpleNamespace:
    pid = child["pid"]
    return SimpleNamespace(pid=pid, start_time=process_start_time(pid), anon_rss=rss_anon(pid),
                           key=(pid, process_start_time(pid)), name="child")


def rewrite(child, first: int, count: int, seed: int = 5) -> None:
    """Give ``count`` pages of the child's buffer from page ``first`` new random bytes (the test
    plays the program writing its own memory)."""
    data = np.random.default_rng(seed).integers(0, 256, count * PS, dtype=np.uint8).tobytes()
    with open(f"/proc/{child['pid']}/mem", "r+b", buffering=0) as mem:
        mem.seek(child["start"] + first * PS)
        mem.write(data)


def test_unchanged_memory_confirms_and_reading_faults_nothing_in(estimate_children):
    _, child = estimate_children({"regions": [{"kind": "unique", "pages": 16384},
                                              {"kind": "zero", "pages": 2048},
                                              {"kind": "absent", "pages": 8192},
                                              {"kind": "readzero", "pages": 2048}],
                                  "options": UNREGISTERED})
    info = info_of(child)
    fp = fingerprint.take(info, 1024, now=0.0)
    assert fp is not None and fp.pages == 1024
    assert np.all(np.diff(fp.addrs.astype(np.int64)) > 0)
    lo, hi = child["start"], child["start"] + child["pages"] * PS
    inside = (fp.addrs >= lo) & (fp.addrs < hi)
    pages = ((fp.addrs[inside] - lo) // PS).astype(np.int64)
    # never the absent pages nor those on the zero page (nothing to fault in, nothing to compare)
    assert not np.any((pages >= 18432) & (pages < 28672))
    assert fingerprint.changed(fp, info) is None
    assert rss_anon(child["pid"]) == info.anon_rss         # reading faulted nothing in
    # another process under the same pid, or memory that grew: the estimate no longer stands
    reused = SimpleNamespace(**{**vars(info), "start_time": info.start_time + 1})
    assert fingerprint.changed(fp, reused) == "another process"
    grown = SimpleNamespace(**{**vars(info), "anon_rss": info.anon_rss + 64 * MiB})
    assert fingerprint.changed(fp, grown).startswith("RssAnon grew")


def test_rewritten_and_volatile_memory_is_estimated_again(estimate_children):
    _, child = estimate_children({"regions": [{"kind": "unique", "pages": 16384}],
                                  "options": UNREGISTERED})
    _, churn = estimate_children({"regions": [{"kind": "volatile", "pages": 8192}],
                                  "options": UNREGISTERED})
    info = info_of(child)
    fp = fingerprint.take(info, 1024, now=0.0)
    rewrite(child, 0, 16384 // 10)                 # a tenth of the buffer: ~70 sampled pages
    why = fingerprint.changed(fp, info)
    assert why is not None and why.endswith("sampled pages changed")
    assert int(why.split()[0]) >= 30
    vinfo = info_of(churn)
    vfp = fingerprint.take(vinfo, 1024, now=0.0)
    assert fingerprint.changed(vfp, vinfo) is not None


class OnePolicy:
    """The policy's side the Actor's estimate step talks to, for one tracked process."""

    def __init__(self):
        self.estimates: dict = {}

    def last_estimate(self, key):
        return self.estimates.get(key)

    def record_estimate(self, key, result, error=None, now=0.0):
        if result is not None:
            self.estimates[key] = result


def test_the_actor_skips_a_reestimate_its_fingerprints_confirm(estimate_children):
    _, a = estimate_children({"regions": [{"kind": "unique", "pages": 8192}], "options": UNREGISTERED})
    _, b = estimate_children({"regions": [{"kind": "unique", "pages": 8192}], "options": UNREGISTERED})
    infos = [info_of(a), info_of(b)]
    calls = []

    def estimator(todo, cfg_, use_zero, now):
        # as the real one: each result carries the fingerprint of what was read
        calls.append(sorted(i.pid for i in todo))
        return {i.key: EstimateResult(now, 40 * MiB, i.anon_rss, 10.0,
                                      fingerprint=fingerprint.take(i, 1024, now)) for i in todo}

    c = cfg(estimate={"screen": False})
    policy = OnePolicy()
    actor = Actor(ksm=None, policy=policy, estimator=estimator)

    def round_at(now):
        obs = Observation(now=now, processes=tuple(infos), counters={}, knobs={}, saved_bytes=0,
                          page_size=PS, ksmd_cpu_seconds=0.0, daemon_cpu_seconds=0.0, memory=None)
        actor.estimate(c, Plan(estimate=list(infos)), obs, {}, seed=1)

    round_at(0.0)
    assert calls == [sorted(i.pid for i in infos)] and len(actor.fingerprints) == 2
    round_at(600.0)                                    # nothing changed: the last estimate stands
    assert len(calls) == 1 and actor.confirmations == 2
    assert all(policy.estimates[i.key].at == 600.0 for i in infos)
    rewrite(b, 0, 2048)                                # a quarter of b: both estimated again
    round_at(1200.0)
    assert calls[-1] == sorted(i.pid for i in infos)
    c.estimate.confirm_max_seconds = 100.0             # too old to confirm, whatever the sample
    round_at(1800.0)
    assert len(calls) == 3
    c.estimate.confirm_pages = 0                       # off: always in full
    round_at(1850.0)
    assert len(calls) == 4


def test_the_estimator_gives_the_fingerprint_of_what_it_read(estimate_children):
    """No extra read: the sample comes from the estimate's own crc32c of pages that read the same
    in every pass; the daemon's result carries it, and it confirms while nothing changes."""
    from udedup.estimate import estimate

    _, child = estimate_children({"regions": [{"kind": "unique", "pages": 8192},
                                              {"kind": "dup", "pages": 2048, "contents": 64},
                                              {"kind": "volatile", "pages": 1024}],
                                  "options": UNREGISTERED})
    info = info_of(child)
    est = estimate([info.pid], passes=2, interval=0.2, all_eligible=True, recheck="candidates",
                   fingerprint_pages=512)
    addrs, crcs = est.fingerprints[info.pid]
    assert addrs.size == 512 and np.all(np.diff(addrs.astype(np.int64)) > 0)
    fp = fingerprint.Fingerprint(info.pid, info.start_time, 0.0, info.anon_rss, addrs, crcs)
    # the volatile pages changed between the passes of the rechecked ones only (the duplicates);
    # the unique and duplicate pages read back as the estimate saw them
    lo = child["start"]
    vol = (addrs >= lo + 10240 * PS) & (addrs < lo + 11264 * PS)
    steady = fingerprint.Fingerprint(info.pid, info.start_time, 0.0, info.anon_rss,
                                     addrs[~vol], crcs[~vol])
    assert fingerprint.changed(steady, info) is None
    rewrite(child, 0, 4096)
    assert fingerprint.changed(steady, info) is not None
    assert fp.pages == 512
    assert estimate([info.pid], passes=2, interval=0.0).fingerprints is None
