"""Trust domains in the daemon, as pure functions: address-range arithmetic for what is registered,
the pages a round's audit says must be unregistered, and the start warning when domains are off.

KSM has no partition: with ``security.trust_domains`` on, a content found in several domains may be
registered in one of them only (the estimator picks it, :func:`udedup.estimate.estimate` with
``domains=``), and a KSM frame the audit (:func:`udedup.ksm.audit.audit`) finds mapped from two
domains is resolved by unregistering it in the domains that map it less (:func:`losing_ranges`).
"""
from __future__ import annotations

from .model import Decision, Unregister


def merged(ranges) -> tuple:
    """``ranges`` sorted, with overlapping or touching ranges joined."""
    out: list = []
    for s, e in sorted((int(a), int(b)) for a, b in ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return tuple(out)


def subtract(ranges, holes) -> tuple:
    """The parts of ``ranges`` outside every range of ``holes`` (sorted, joined)."""
    holes = merged(holes)
    out = []
    for s, e in merged(ranges):
        pos = s
        for hs, he in holes:
            if he <= pos or hs >= e:
                continue
            if hs > pos:
                out.append((pos, hs))
            pos = max(pos, he)
            if pos >= e:
                break
        if pos < e:
            out.append((pos, e))
    return tuple(out)


def pages_in(ranges, page_size: int) -> int:
    return sum(e - s for s, e in ranges) // page_size


def winner(counts: dict) -> str:
    """The domain a shared frame stays merged in: the one mapping it most (ties: the smallest
    key, the estimator's last tie-break too)."""
    return min(counts, key=lambda k: (-counts[k], k))


def losing_ranges(audit, page_size: int) -> dict:
    """{pid: (page ranges to unregister, {other domain: frames})} from an AuditReport: for each
    offender (a KSM frame mapped from two or more domains) every mapping outside the domain that
    maps the frame most. Unregistering those pages (MADV_UNMERGEABLE) gives their processes
    private copies; the frame stays merged inside the winning domain."""
    pages: dict = {}
    others: dict = {}
    for off in audit.offenders:
        counts: dict = {}
        for domain, _pid, _comm, _address in off.mappings:
            counts[domain] = counts.get(domain, 0) + 1
        keep = winner(counts)
        for domain, pid, _comm, address in off.mappings:
            if domain == keep:
                continue
            start = int(address) - int(address) % page_size
            pages.setdefault(pid, []).append((start, start + page_size))
            seen = others.setdefault(pid, {})
            seen[keep] = seen.get(keep, 0) + 1
    return {pid: (merged(rs), others[pid]) for pid, rs in pages.items()}


def domains_text(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def span_warning(procs) -> str | None:
    """With ``security.trust_domains = "none"``: the warning to log when the candidates span two or
    more cgroups or uids (None when they do not)."""
    cgroups = {p.cgroup for p in procs}
    uids = {p.uid for p in procs}
    if len(cgroups) < 2 and len(uids) < 2:
        return None
    return (f"the {len(procs)} candidates span {len(cgroups)} cgroup{'s' if len(cgroups) != 1 else ''}"
            f" and {len(uids)} uid{'s' if len(uids) != 1 else ''}, and security.trust_domains is "
            "\"none\": KSM may merge identical pages across them, a copy-on-write timing side "
            "channel between tenants; set security.trust_domains = \"cgroup\" or \"uid\" to merge "
            "only inside each")


def resolve_audit(cfg, procs, audit, page_size: int, plan) -> None:
    """Every KSM frame the round's audit found mapped from two domains is unregistered (planned in
    ``plan.unregister``) in the domains mapping it less; those pages are withheld from registration
    until a newer estimate."""
    by_pid = {p.info.pid: p for p in procs}
    for pid, (ranges, winners) in sorted(losing_ranges(audit, page_size).items()):
        n = pages_in(ranges, page_size)
        p = by_pid.get(pid)
        what = (f"{n} page{'s' if n != 1 else ''} on KSM frames that the round's audit found "
                f"mapped from domain{'s' if len(winners) != 1 else ''} {domains_text(winners)} "
                f"too, which map{'s' if len(winners) == 1 else ''} them more (cross-domain KSM "
                "frames found by the round's audit)")
        if p is None:
            plan.decisions.append(Decision("register", "cannot-unregister", f"{what}; not a "
                                           "candidate: left as it is", pid))
            continue
        what = f"{p.info.name}: {what}"
        p.withheld = merged(p.withheld + ranges)
        if not cfg.registration.allow_injection:
            p.note(plan, "register", "would-unregister", f"{what}; unregistering them needs "
                   "injection, not allowed by config (registration.allow_injection = false)")
            continue
        plan.unregister.append(Unregister(p.info, ranges, what))
        p.note(plan, "register", "unregister", f"{what}: unregistering them by injection (madvise)")
