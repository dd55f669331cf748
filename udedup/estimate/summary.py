"""The summary: from the per-page state the passes left (flags, confirmed group heads) to the
:class:`~.model.Estimate` — counts per mapping, per target and in total, each group's saving
shared among the pages holding it, the saving ranges, and the notes saying what was left out.
Pure: no I/O.
"""
from __future__ import annotations

import numpy as np

from ..ksm.accounting import sharing_fraction
from .domains import assign_domains
from .group import head_sizes
from .model import COUNT_FIELDS, Estimate, ThpSummary
from .ranges import SavingRanges
from .scope import NONE, STEP, UNREADABLE, VOLATILE, ZERO, Scope
from .thp import ThpLayout, per_thp_sum, thp_outcome


def summarize(scope: Scope, *, passes: int, interval: float, all_eligible: bool,
              max_page_sharing: int, use_zero_pages: bool | None, unconfirmed: int,
              range_gap: int, max_ranges: int, exited_in: dict, domains=None,
              zero_pages_across_domains: bool = True) -> Estimate:
    """The Estimate of a scanned scope. ``exited_in``: {pid: pass in which it exited}; the pages
    of those processes are left out (KSM will never see them). ``domains`` ({pid: key}): also
    the trust-domain split of :mod:`.domains` (``est.domains`` and the targets' domain fields)."""
    mps = max_page_sharing
    est = Estimate(page_size=scope.page_size, passes=passes, interval=interval,
                   all_eligible=all_eligible, max_page_sharing=mps,
                   current_use_zero_pages=use_zero_pages, targets=scope.target_reports,
                   mappings=scope.reports, notes=list(scope.notes),
                   index_bytes=scope.index_bytes)
    flags, rep = scope.flags, scope.rep
    for seg in scope.segments:
        if seg.pid in exited_in:   # gone: KSM will never see these pages
            flags[seg.base: seg.base + seg.size] |= UNREADABLE
            rep[seg.base: seg.base + seg.size] = NONE
    sizes_by_head = head_sizes(rep)
    group_sizes = sizes_by_head[sizes_by_head >= 2]
    est.group_sizes = group_sizes
    est.duplicate_groups = int(group_sizes.size)
    est.largest_group = int(group_sizes.max()) if group_sizes.size else 0
    est.unconfirmed_pages = int(unconfirmed)
    est.existing_ksm_zero_pages = sum(t.existing_ksm_zero_pages for t in scope.target_reports)

    # per mapping: classify pages chunk by chunk (bounded temporaries)
    zero_total = 0
    thp = _thp_summary(scope, sizes_by_head, sizes_by_head >= 2)
    est.thp = thp
    handed = _handed_back_per_report(scope, thp)
    ranges = [SavingRanges(est.page_size, range_gap, max_ranges) for _ in scope.target_reports]
    for seg in scope.segments:
        a, b = seg.base, seg.base + seg.size
        builder = ranges[seg.target]
        builder.start_segment(seg)
        rr = seg.report
        for lo in range(a, b, STEP):
            hi = min(b, lo + STEP)
            f, r = flags[lo:hi], rep[lo:hi]
            unread = (f & UNREADABLE) != 0
            vol = ((f & VOLATILE) != 0) & ~unread
            zr = ((f & ZERO) != 0) & ~vol & ~unread
            g = r != NONE
            gs = sizes_by_head[r[g]]
            dup = gs >= 2
            saving = zr.copy()
            saving[np.flatnonzero(g)[dup]] = True
            builder.add(lo - a, saving, ~unread)
            rr.unreadable_pages += int(unread.sum())
            rr.volatile_pages += int(vol.sum())
            rr.zero_pages += int(zr.sum())
            rr.duplicate_pages += int(dup.sum())
            saved = float(sharing_fraction(gs[dup], mps).sum())
            rr.saved_pages[0] += saved
            rr.saved_pages[1] += saved
        rr.unique_pages = rr.scanned_pages - rr.unreadable_pages - rr.volatile_pages - \
            rr.zero_pages - rr.duplicate_pages
        zero_total += rr.zero_pages
    # zero pages a THP split hands back save one page each; the others merge as before
    small = zero_total - sum(h[0] for h in handed.values())
    zero_fraction = float(sharing_fraction(np.array([small]), mps)[0]) if small > 0 else 0.0
    for rr in scope.reports:
        back = handed.get(id(rr), (0, 0))
        rr.saved_pages[0] += (rr.zero_pages - back[0]) * zero_fraction + back[0]
        rr.saved_pages[1] += rr.zero_pages
    for ti, tr in enumerate(scope.target_reports):
        tr.saving_ranges, tr.range_pages, tr.uncovered_pages = ranges[ti].result()
        if tr.uncovered_pages:
            est.notes.append(f"{tr.name} (PID {tr.pid}): more mappings save memory than "
                             f"max_ranges={max_ranges}; the saving ranges leave out "
                             f"{tr.uncovered_pages} saving pages of the mappings saving least")
        mine = [s.report for s in scope.segments if s.target == ti]
        for key in COUNT_FIELDS:
            setattr(tr, key, sum(getattr(m, key) for m in mine))
        tr.saved_pages = {k: sum(m.saved_pages[k] for m in mine) for k in (0, 1)}
        tr.saved_pages[1] += tr.existing_ksm_zero_pages
        tr.saved_pages[0] += tr.existing_ksm_zero_pages
    for key in ("zero_pages", "duplicate_pages", "unique_pages", "volatile_pages",
                "unreadable_pages"):
        setattr(est, key, sum(getattr(t, key) for t in scope.target_reports))
    est.pages_scanned = scope.total
    est.zero_mapped_pages = sum(r.zero_mapped_pages for r in scope.reports)
    _notes(est, scope, passes, all_eligible, exited_in)
    if domains is not None:
        est.domains = assign_domains(scope, est, sizes_by_head, handed, domains,
                                     zero_pages_across_domains, mps, range_gap, max_ranges)
    return est


def _thp_summary(scope: Scope, sizes_by_head: np.ndarray, in_group: np.ndarray):
    """What ksmd will do to the scanned THPs (:mod:`.thp`), or None when there are none."""
    layout = scope.thp_layout()
    if not layout.count:
        return None if scope.thp_known else ThpSummary(False, 0, 0, {})
    own = np.concatenate([np.arange(a, a + n, dtype=np.int64)
                          for a, n in zip(layout.start.tolist(), layout.length.tolist())])
    f, r = scope.flags[own], scope.rep[own]
    ok = (f & (UNREADABLE | VOLATILE)) == 0
    zero = ok & ((f & ZERO) != 0)
    member = r != NONE
    twin = np.zeros(own.size, dtype=bool)
    twin[member] = in_group[r[member]]
    # per THP sums over the gathered ordinals (THP i is positions cum[i] .. cum[i+1] - 1)
    cum = np.concatenate(([0], np.cumsum(layout.length)))
    packed = ThpLayout(cum[:-1], layout.length, layout.locked, layout.fails)
    zero_per, twin_per = per_thp_sum(packed, zero), per_thp_sum(packed, twin)
    zero_total = int(np.count_nonzero(((scope.flags & (UNREADABLE | VOLATILE)) == 0) &
                                      ((scope.flags & ZERO) != 0)))
    outcomes = {k: thp_outcome(layout, zero_per, twin_per, bool(k), zero_total) for k in (0, 1)}
    # pages held by THPs whose split fails (none unless the caller knows of pins)
    failed = outcomes[0].failed | outcomes[1].failed
    frozen_sizes = np.empty(0, dtype=np.int64)
    zero_frozen = 0
    if failed.any():
        held = np.repeat(failed, layout.length)
        zero_frozen = int(np.count_nonzero(zero & held))
        heads = r[held & twin]
        counts = np.bincount(heads, minlength=sizes_by_head.size) if heads.size else \
            np.zeros(sizes_by_head.size, dtype=np.int64)
        frozen_sizes = counts[in_group].astype(np.int64)
    return ThpSummary(scope.thp_known, layout.count, layout.pages, outcomes, zero_frozen,
                      frozen_sizes)


def _handed_back_per_report(scope: Scope, thp) -> dict:
    """{id(mapping report): (zero pages handed back with uzp 0, with uzp 1)}, and each report's
    THPs split (``thps_split``, ``thp_zero_pages``) filled in."""
    if thp is None or not thp.thps:
        return {}
    layout = scope.thp_layout()
    seg = np.searchsorted(scope.seg_base, layout.start, side="right") - 1
    out: dict = {}
    for k in (0, 1):
        o = thp.outcomes[k]
        back = np.bincount(seg, weights=o.handed_back, minlength=len(scope.segments))
        nsplit = np.bincount(seg, weights=o.split, minlength=len(scope.segments))
        for si, s in enumerate(scope.segments):
            rr = s.report
            rr.thp_zero_pages[k] += int(back[si])
            rr.thps_split[k] += int(nsplit[si])
    for rr in scope.reports:
        out[id(rr)] = (rr.thp_zero_pages[0], rr.thp_zero_pages[1])
    return out


def _notes(est: Estimate, scope: Scope, passes: int, all_eligible: bool, exited_in: dict):
    """What was left out of the prediction, and why nothing was scanned."""
    for pid, pass_no in sorted(exited_in.items()):
        tr = next((t for t in scope.target_reports if t.pid == pid), None)
        if tr is not None:
            tr.exited = True
        est.partial = True
        est.notes.append(f"partial: PID {pid} exited during pass {pass_no} of {passes}; its "
                         f"{scope.pages_of(pid)} pages are left out of the prediction")
    lost = est.unreadable_pages - sum(scope.pages_of(pid) for pid in exited_in)
    if lost > 0:
        est.partial = True
        est.notes.append(f"partial: {lost} pages were unmapped during the scan and are left out")
    if est.pages_scanned == 0:
        est.notes.append("nothing to scan: no present anonymous pages in scope" +
                         ("" if all_eligible else
                          " (only registered memory is scanned by default; --all-eligible "
                          "predicts for memory not registered yet)"))
