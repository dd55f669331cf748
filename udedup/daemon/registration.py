"""Which estimated candidates are worth registering, and the registrations to do (pure).

A process is worthwhile when its predicted saving clears ``registration.min_saving`` and
``registration.min_saving_percent``. Registering one that is not registered yet needs injection
(``registration.allow_injection``); with ``registration.granularity = "ranges"`` only the address
ranges holding the predicted saving are registered, and a newer estimate that finds saving outside
them registers the rest (registered ranges are never unregistered: that would unmerge them).

With ``security.trust_domains`` on, the ranges are the estimate's domain ranges (page precise, by
injection, madvise: never a page whose content saves more in another domain), empty domain ranges
register nothing, and the pages a registered mapping holds that a newer estimate gives to another
domain (its ``conflict_ranges``) are unregistered, whether the process is worth merging or not.
"""
from __future__ import annotations

from ..units import mib
from .config import Config
from .domains import domains_text, merged, pages_in, subtract
from .model import EstimateResult, Plan, Register, TrackedProcess, Unregister


def covers(outer, inner) -> bool:
    """Does the union of ``outer`` ranges contain every range of ``inner``?"""
    return all(any(a <= s and e <= b for a, b in outer) for s, e in inner)


def ranges_text(ranges, est: EstimateResult) -> str:
    n = len(ranges)
    return (f"{n} range{'s' if n != 1 else ''} holding the predicted saving "
            f"({mib(est.range_bytes)} of {mib(est.scanned_bytes)} resident)")


def classify(cfg: Config, procs, now: float, plan: Plan, page_size: int = 4096) -> None:
    """Mark each tracked process worthwhile or not by its estimate, and put the registrations
    due into ``plan`` (with a decision for each change)."""
    r = cfg.registration
    domains = cfg.security.trust_domains != "none"
    for p in procs:
        info = p.info
        if p.estimate is None:
            p.worthwhile = False
            if p.estimate_failed:
                p.note(plan, "estimate", "skip", f"{info.name}: cannot estimate: "
                       f"{p.estimate_failed}")
            continue
        est = p.estimate
        if domains:
            unregister_conflicts(cfg, p, plan, page_size)
        enough = est.saved_bytes >= r.min_saving and est.saved_percent >= r.min_saving_percent
        p.worthwhile = enough
        predicted = (f"predicted saving {mib(est.saved_bytes)} ({est.saved_percent:.1f}% of "
                     f"{mib(est.scanned_bytes)})")
        if est.screened:
            predicted = f"predicted saving at most about {mib(est.saved_bytes)} ({est.screened})"
        if not enough:
            why = ("below registration.min_saving " + mib(r.min_saving)
                   if est.saved_bytes < r.min_saving else
                   f"below registration.min_saving_percent {r.min_saving_percent:g}%")
            if info.registered:
                p.note(plan, "register", "not-worth", f"{info.name}: {predicted}, {why}; "
                       "it is registered anyway, so ksmd scans it for little (udedup disable "
                       f"{info.pid}, or exclude it)")
            else:
                p.note(plan, "register", "skip", f"{info.name}: {predicted}, {why}")
            continue
        ranges = ranges_to_register(cfg, est, p.withheld)
        if domains and not ranges and not info.registered:
            p.note(plan, "register", "skip", f"{info.name}: {predicted}, but no page of it is "
                   f"registrable in its trust domain {est.domain!r} (its duplicates save more in "
                   "another domain, or the audit found them merged with one)")
            continue
        if info.registered:
            how = "merge-any (prctl)" if info.merge_any else f"{mib(info.registered_bytes)} madvised"
            p.note(plan, "register", "registered", f"{info.name}: {predicted}; already "
                   f"registered ({how})")
            if ranges:
                if (r.allow_injection and not info.merge_any and p.registered_ranges is not None
                        and not covers(p.registered_ranges, ranges) and not p.registration_failed):
                    # a newer estimate found saving outside what we registered: add it (the
                    # old ranges stay registered: unregistering would unmerge their pages)
                    plan.register.append(Register(info, "madvise", ranges))
                    p.registered_at = now
                    p.registered_ranges = merged(p.registered_ranges + tuple(ranges))
                    p.note(plan, "register", "register", f"{info.name}: the new estimate "
                           f"puts saving outside the registered ranges: registering "
                           f"{ranges_text(ranges, est)}")
            elif (ranges is None and not info.merge_any and r.allow_injection and info.eligible_bytes
                    and info.registered_bytes < 0.8 * info.eligible_bytes
                    and p.registered_at is not None
                    and now - p.registered_at >= cfg.estimate.reestimate_seconds):
                # madvise covers the mappings that existed then: newer ones need another pass
                plan.register.append(Register(info, r.inject_mode))
                p.registered_at = now
                p.note(plan, "register", "register", f"{info.name}: only "
                       f"{mib(info.registered_bytes)} of {mib(info.eligible_bytes)} eligible "
                       "is registered (new mappings since the last injection)")
            continue
        if not r.allow_injection:
            p.note(plan, "register", "would-register", f"{info.name}: {predicted}; would "
                   "need injection; not allowed by config (registration.allow_injection = "
                   "false): start it under 'udedup run' instead")
            continue
        if p.registration_failed:
            p.note(plan, "register", "failed", f"{info.name}: {predicted}; injection "
                   f"failed: {p.registration_failed} (not retried until reload)")
            continue
        if p.registered_at is not None:
            continue  # injected, waiting to see mg flags in the next round
        p.registered_at = now
        if ranges is not None:
            plan.register.append(Register(info, "madvise", ranges))
            p.registered_ranges = ranges
            p.note(plan, "register", "register", f"{info.name}: {predicted}; opting "
                   f"{ranges_text(ranges, est)} in by injection (madvise)")
        else:
            plan.register.append(Register(info, r.inject_mode))
            p.note(plan, "register", "register", f"{info.name}: {predicted}; opting it "
                   f"in by injection (mode {r.inject_mode})")


def ranges_to_register(cfg: Config, est: EstimateResult, withheld=()) -> tuple | None:
    """The ranges to register, or None for the whole process. With trust domains: the domain
    ranges less ``withheld`` (what the audit unregistered since the estimate), maybe none."""
    if cfg.security.trust_domains != "none":
        return subtract(est.ranges, withheld)
    if cfg.registration.granularity != "ranges" or not est.ranges:
        return None
    return tuple(tuple(x) for x in est.ranges)


def other_domains_text(est: EstimateResult) -> str:
    others = [d for d in est.other_domains if d != est.domain]
    if len(others) == 1:
        return f"domain {others[0]!r}"
    if others:
        return f"another domain (of {domains_text(others)})"
    return "another domain"


def unregister_conflicts(cfg: Config, p: TrackedProcess, plan: Plan, page_size: int) -> None:
    """Plan the unregistering of the estimate's conflict ranges (foreign pages in registered
    mappings), once per estimate."""
    est, info = p.estimate, p.info
    if not est.conflict_ranges or p.conflicts_of == est.at:
        return
    p.conflicts_of = est.at
    ranges = merged(est.conflict_ranges)
    n = pages_in(ranges, page_size)
    what = (f"{info.name}: {n} registered page{'s' if n != 1 else ''} in {len(ranges)} "
            f"range{'s' if len(ranges) != 1 else ''} hold content also in "
            f"{other_domains_text(est)}, which saves more there")
    if not cfg.registration.allow_injection:
        p.note(plan, "register", "would-unregister", f"{what}; unregistering them needs injection, "
               "not allowed by config (registration.allow_injection = false): they may merge "
               f"across trust domains (udedup disable {info.pid})")
        return
    plan.unregister.append(Unregister(info, ranges, what))
    if p.registered_ranges is not None:
        p.registered_ranges = subtract(p.registered_ranges, ranges)
    p.note(plan, "register", "unregister", f"{what}: unregistering them by injection (madvise)")

