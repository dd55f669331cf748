"""Trust domains in ``udedup daemon``: the pure policy (domain ranges only, conflict ranges and the
round's audit turned into unregistrations, each with its reason), the config refusals, the start
warning, the observation's audit and attribution; and end to end on the real kernel, with real
cgroup v2 groups (tests/cgroup_fixtures.py)."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from udedup.daemon.act import Actor, per_process_domains
from udedup.daemon.config import load_config
from udedup.daemon.domains import losing_ranges, merged, span_warning, subtract, winner
from udedup.daemon.model import EstimateResult, Plan, ProcessInfo, Unregister
from udedup.daemon.policy import Policy
from udedup.errors import ConfigError

from daemon_fakes import FakeAudit, FakeOffender, cfg, domain_target

PS = 4096
MiB, GiB = 1 << 20, 1 << 30
BASE = 0x7F0000000000


def page(n, base=BASE) -> int:
    return base + n * PS


def span(a, b, base=BASE) -> tuple:
    return (page(a, base), page(b, base))


# --- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, says", [
    ("registration.granularity", "process", '[registration] granularity: "process" cannot keep'),
    ("registration.inject_mode", "prctl", '[registration] inject_mode: "prctl" registers whole'),
])
def test_whole_process_registration_is_refused_with_trust_domains(key, value, says):
    with pytest.raises(ConfigError) as err:
        load_config("/dev/null", env={}, overrides={"security.trust_domains": "cgroup", key: value})
    text = str(err.value)
    assert says in text and 'security.trust_domains = "cgroup"' in text and "\n" not in text
    assert err.value.exit_code == 10
    # without domains the same keys are fine
    assert getattr(load_config("/dev/null", env={}, overrides={key: value}).registration,
                   key.split(".")[1]) == value


# --- range arithmetic and the audit's losers ------------------------------------------------------
def test_subtract_and_merged_are_page_precise():
    assert merged([span(4, 6), span(0, 2), span(2, 3)]) == (span(0, 3), span(4, 6))
    assert subtract([span(0, 10)], [span(2, 3), span(5, 7)]) == (span(0, 2), span(3, 5), span(7, 10))
    assert subtract([span(0, 4), span(8, 12)], [span(3, 9)]) == (span(0, 3), span(9, 12))
    assert subtract([span(0, 4)], []) == (span(0, 4),)
    assert subtract([span(0, 4)], [span(0, 4)]) == ()


def test_the_audit_loser_is_the_domain_mapping_the_frame_less():
    a, b = "/t/a", "/t/b"
    offenders = (
        FakeOffender(1, False, ((a, 10, "x", page(0)), (a, 11, "x", page(5)), (b, 20, "y", page(3)))),
        FakeOffender(2, False, ((a, 10, "x", page(1)), (b, 20, "y", page(4)), (b, 21, "y", page(9)),
                                (b, 21, "y", page(10)))),
        FakeOffender(3, False, ((a, 10, "x", page(7)), (b, 20, "y", page(7)))),   # tie: smallest key
    )
    got = losing_ranges(FakeAudit(offenders), PS)
    assert got == {20: ((span(3, 4), span(7, 8)), {a: 2}), 10: ((span(1, 2),), {b: 1})}
    assert winner({a: 1, b: 1}) == a and winner({a: 1, b: 2}) == b


def test_start_warning_names_the_counts_and_the_key():
    one = [ProcessInfo(1, 1, "a", cgroup="/x", uid=0), ProcessInfo(2, 2, "b", cgroup="/x", uid=0)]
    assert span_warning(one) is None
    two = one + [ProcessInfo(3, 3, "c", cgroup="/y", uid=1000)]
    text = span_warning(two)
    assert "3 candidates span 2 cgroups and 2 uids" in text and "security.trust_domains" in text


# --- the policy -----------------------------------------------------------------------------------
def proc(pid, cgroup, registered=False, **kw) -> ProcessInfo:
    base = dict(pid=pid, start_time=pid * 10, name=f"p{pid}", cgroup=cgroup, anon_rss=GiB,
                registered_bytes=GiB if registered else 0, eligible_bytes=GiB)
    base.update(kw)
    return ProcessInfo(**base)


def obs(now, *procs, audit=None):
    from udedup.daemon.model import Observation
    return Observation(now=now, processes=tuple(procs), counters={"full_scans": 0},
                       knobs={"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20}, saved_bytes=0,
                       page_size=PS, ksmd_cpu_seconds=0.0, daemon_cpu_seconds=0.0, audit=audit)


def est(at, ranges=(), conflicts=(), saved=200 * MiB, domain="/t/a", others=("/t/b",)):
    return EstimateResult(at=at, saved_bytes=saved, scanned_bytes=GiB,
                          saved_percent=100.0 * saved / GiB, ranges=tuple(ranges),
                          range_bytes=sum(e - s for s, e in ranges), domain=domain,
                          conflict_ranges=tuple(conflicts), other_domains=others)


def domain_policy(**registration):
    c = cfg(security={"trust_domains": "cgroup"},
            registration={"allow_injection": True, "min_saving": MiB, **registration})
    return Policy(c)


def test_domains_register_the_domain_ranges_only_and_nothing_when_there_are_none():
    pol = domain_policy()
    a, b = proc(10, "/t/a"), proc(20, "/t/b")
    pol.decide(obs(1.0, a, b))
    pol.record_estimate(a.key, est(1.0, [span(0, 8), span(9, 16)]))
    # saving predicted, but every duplicate of it saves more in the other domain
    pol.record_estimate(b.key, est(1.0, [], domain="/t/b", others=("/t/a",)))
    plan = pol.decide(obs(2.0, a, b))
    assert [(r.info.pid, r.mode, r.ranges) for r in plan.register] == [
        (10, "madvise", (span(0, 8), span(9, 16)))]
    said = [str(d) for d in plan.decisions if d.pid == 20]
    assert any("no page of it is registrable in its trust domain '/t/b'" in s for s in said)
    # a registered process with no registrable page is never re-registered whole
    b2 = dataclasses.replace(b, registered_bytes=GiB // 2)
    pol.procs[b.key].registered_at = 0.0
    plan = pol.decide(obs(10_000.0, a, b2))
    assert all(r.info.pid != 20 for r in plan.register)


def test_conflict_ranges_are_unregistered_once_per_estimate_and_leave_the_registered_ranges():
    pol = domain_policy()
    a = proc(10, "/t/a")
    pol.decide(obs(1.0, a))
    pol.record_estimate(a.key, est(1.0, [span(0, 16)]))
    plan = pol.decide(obs(2.0, a))
    assert plan.register[0].ranges == (span(0, 16),)
    a = dataclasses.replace(a, registered_bytes=16 * PS)
    pol.decide(obs(3.0, a))
    # a newer estimate: pages 4-5 now hold content that saves more in /t/b; they are registered
    pol.record_estimate(a.key, est(4.0, [span(0, 4), span(6, 16)], conflicts=[span(4, 6)]))
    plan = pol.decide(obs(5.0, a))
    assert plan.unregister == [Unregister(a, (span(4, 6),), plan.unregister[0].reason)]
    reason = plan.unregister[0].reason
    assert "2 registered pages in 1 range hold content also in domain '/t/b'" in reason
    assert "saves more there" in reason
    assert any(d.action == "unregister" and d.pid == 10 for d in plan.decisions)
    assert pol.procs[a.key].registered_ranges == (span(0, 4), span(6, 16))
    assert plan.register == []          # the rest is covered: nothing registered again
    # the same estimate again next round: planned once only
    assert pol.decide(obs(6.0, a)).unregister == []
    # a failed unregistration is planned again next round
    pol.record_unregistration(a.key, False, (span(4, 6),), "refused")
    assert pol.decide(obs(7.0, a)).unregister[0].ranges == (span(4, 6),)


def test_conflicts_without_injection_are_reported_not_acted_on():
    pol = domain_policy(allow_injection=False)
    a = proc(10, "/t/a", registered=True)
    pol.decide(obs(1.0, a))
    pol.record_estimate(a.key, est(1.0, [span(0, 4)], conflicts=[span(4, 6)], saved=0))
    plan = pol.decide(obs(2.0, a))
    assert plan.unregister == []
    said = [str(d) for d in plan.decisions if d.action == "would-unregister"]
    assert said and "registration.allow_injection = false" in said[0]


def test_the_rounds_audit_unregisters_the_losing_domain_and_withholds_it_until_a_new_estimate():
    pol = domain_policy()
    a, b = proc(10, "/t/a"), proc(20, "/t/b")
    pol.decide(obs(1.0, a, b))
    pol.record_estimate(a.key, est(1.0, [span(0, 8)]))
    pol.record_estimate(b.key, est(1.0, [span(0, 8, 0x7E0000000000)], domain="/t/b",
                                   others=("/t/a",)))
    pol.decide(obs(2.0, a, b))
    a, b = (dataclasses.replace(p, registered_bytes=8 * PS) for p in (a, b))
    # b's page 3 changed to content of a's, and ksmd merged it with a's two copies
    audit = FakeAudit((FakeOffender(99, False, (("/t/a", 10, "p10", page(1)),
                                                ("/t/a", 10, "p10", page(2)),
                                                ("/t/b", 20, "p20", page(3, 0x7E0000000000)))),),
                      ksm_frames=5)
    plan = pol.decide(obs(3.0, a, b, audit=audit))
    assert [(u.info.pid, u.ranges) for u in plan.unregister] == [(20, (span(3, 4, 0x7E0000000000),))]
    reason = plan.unregister[0].reason
    assert "cross-domain KSM frames found by the round's audit" in reason and "'/t/a'" in reason
    # the same audit object again (a later decide of the same round): acted on once
    assert pol.decide(obs(3.5, a, b, audit=audit)).unregister == []
    # the page stays out of registration until a newer estimate decides again
    pol.record_unregistration(b.key, True, (span(3, 4, 0x7E0000000000),), "ok")
    p = pol.procs[b.key]
    assert p.withheld == (span(3, 4, 0x7E0000000000),)
    assert p.registered_ranges == (span(0, 3, 0x7E0000000000), span(4, 8, 0x7E0000000000))
    assert pol.decide(obs(4.0, a, b)).register == []
    pol.record_estimate(b.key, est(5.0, [span(0, 8, 0x7E0000000000)], domain="/t/b"))
    assert pol.procs[b.key].withheld == ()


def test_reload_with_other_trust_domains_estimates_again():
    pol = domain_policy()
    a = proc(10, "/t/a")
    pol.decide(obs(1.0, a))
    pol.record_estimate(a.key, est(1.0, [span(0, 8)]))
    same = cfg(security={"trust_domains": "cgroup"}, registration={"allow_injection": True})
    pol.reconfigure(same)
    assert pol.procs[a.key].estimate is not None
    pol.reconfigure(cfg(security={"trust_domains": "uid"}, registration={"allow_injection": True}))
    assert pol.procs[a.key].estimate is None
    pol.tokens = 1 << 40          # budget to spare: the estimate is due now
    assert pol.decide(obs(2.0, a)).estimate == [a]


# --- act ------------------------------------------------------------------------------------------
def test_per_process_domains_reads_the_domain_fields_of_the_estimate():
    t = domain_target(7, "/t/a", ranges=[span(0, 100)], conflicts=[span(100, 102)],
                      saved=(60.0, 70.0), scanned=1000, zero=10, foreign=5)
    summary = type("S", (), {"per_domain": [type("D", (), {"key": k})() for k in ("/t/a", "/t/b")]})
    e = type("E", (), {"page_size": PS, "targets": [t], "domains": summary()})()
    got = per_process_domains(e, use_zero_pages=False)[7]
    assert got["saved"] == 60 * PS - 100 * 64          # an rmap item per page of the domain ranges
    assert got["ranges"] == (span(0, 100),) and got["range_bytes"] == 100 * PS
    assert got["conflict_ranges"] == (span(100, 102),) and got["foreign_pages"] == 5
    assert got["domain"] == "/t/a" and got["other_domains"] == ("/t/b",)
    assert per_process_domains(e, use_zero_pages=True)[7]["saved"] == 70 * PS - 90 * 64


def test_actor_unregisters_reports_back_and_says_a_repeated_failure_once(caplog):
    pol = domain_policy()
    a = proc(10, "/t/a")
    pol.decide(obs(1.0, a))
    pol.procs[a.key].registered_ranges = (span(0, 8),)
    calls, answers = [], [(False, "refused: traced"), (False, "refused: traced"), (True, "ok")]

    def unregistrar(info, ranges, procfs, ksm_root):
        calls.append((info.pid, tuple(ranges)))
        return answers.pop(0)

    actor = Actor(None, pol, unregistrar=unregistrar)
    plan = Plan(unregister=[Unregister(a, (span(2, 4),), "why")])
    c = pol.cfg
    with caplog.at_level(logging.DEBUG, logger="udedup.daemon.act"):
        for _ in range(3):
            actor.unregister(c, plan)
    assert calls == [(10, (span(2, 4),))] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "must not merge across trust domains failed" in warnings[0].message
    assert pol.procs[a.key].registered_ranges == (span(0, 2), span(4, 8))
    dry = Actor(None, pol, dry_run=True, unregistrar=unregistrar)
    with caplog.at_level(logging.INFO, logger="udedup.daemon.act"):
        dry.unregister(c, plan)
    assert len(calls) == 3 and "dry run: would unregister 2 pages of pid 10" in caplog.text
