"""Trust domains in an estimate: which pages each domain may register so that no KSM page is ever
mapped from two domains, and what that costs in saving. Pure numpy, no I/O.

KSM has no partition: a content found in several domains may be registered in at most one of them,
the one where it saves most (ties: the domain with more of those pages already registered, then
the smallest key). A page is registrable in its domain when it belongs to a confirmed duplicate
group won by its domain, or (``zero_across``) when it is a zero page; with ``zero_across`` False
the zero pages are one content like any other, won by the domain with most of them. The pages of a
group won elsewhere (and, without ``zero_across``, the zero pages of the other domains) are
foreign: never registered, hard breaks of the domain ranges, and unregistered where they are
registered today (``conflict_ranges``).

Two passes over the per-page arrays in :data:`~.scope.STEP` chunks: the first collects one 8-byte
key (group head, domain, registered) per duplicate page, sorted in place to count the pages of
every group per domain (the 8 bytes per page of the hash array, freed before the summary, are the
budget); the second classifies the pages and builds the ranges.
"""
from __future__ import annotations

import time

import numpy as np

from ..host.domains import UNKNOWN
from .model import DomainReport, DomainSummary
from .ranges import SavingRanges
from .scope import NONE, STEP, UNREADABLE, VOLATILE, ZERO, Scope


def classes(f: np.ndarray, r: np.ndarray, sizes_by_head: np.ndarray):
    """(readable, zero, member of a confirmed group) masks of a chunk, as the summary counts."""
    unread = (f & UNREADABLE) != 0
    vol = ((f & VOLATILE) != 0) & ~unread
    zero = ((f & ZERO) != 0) & ~vol & ~unread
    member = r != NONE
    member[member] = sizes_by_head[r[member]] >= 2
    return ~unread, zero, member


def group_saving(n: np.ndarray, mps: int) -> np.ndarray:
    """Pages a group of ``n`` registered pages saves (pages_sharing) under max_page_sharing."""
    full, rest = np.divmod(np.asarray(n, dtype=np.int64), mps)
    return full * (mps - 1) + np.where(rest >= 2, rest - 1, 0)


def target_keys(scope: Scope, domains) -> tuple[list, np.ndarray]:
    """(sorted domain keys, domain index per target); a target missing from ``domains`` is its
    own domain ``?<pid>``."""
    keys = []
    for t in scope.targets:
        key = domains.get(t.pid)
        keys.append(f"{UNKNOWN}{t.pid}" if key is None else str(key))
    uniq = sorted(set(keys))
    index = {k: i for i, k in enumerate(uniq)}
    return uniq, np.array([index[k] for k in keys], dtype=np.int64)


class Groups:
    """Per confirmed group (heads ascending): the winning domain, its pages there, the domains
    holding the group, its size."""

    def __init__(self, heads, win, n_win, ndom, size):
        self.heads, self.win, self.n_win, self.ndom, self.size = heads, win, n_win, ndom, size

    def lookup(self, r: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.heads, r)


def _count(scope: Scope, sizes_by_head, tdom, ndomains):
    """First pass: the groups' winners, and zero pages per domain (all, registered)."""
    flags, rep = scope.flags, scope.rep
    members = int(sizes_by_head[sizes_by_head >= 2].sum())
    keys = np.empty(members, dtype=np.int64)
    zero = np.zeros((ndomains, 2), dtype=np.int64)
    at = 0
    for seg in scope.segments:
        d, reg = int(tdom[seg.target]), int(bool(seg.report.mapping.registered))
        a, b = seg.base, seg.base + seg.size
        for lo in range(a, b, STEP):
            hi = min(b, lo + STEP)
            _, zr, member = classes(flags[lo:hi], rep[lo:hi], sizes_by_head)
            h = rep[lo:hi][member].astype(np.int64)
            h *= ndomains
            h += d
            h *= 2
            h += reg
            keys[at:at + h.size] = h
            at += h.size
            nz = int(zr.sum())
            zero[d, 0] += nz
            zero[d, 1] += nz * reg
    keys = keys[:at]
    keys.sort()
    return _pairs(keys, ndomains), zero


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    if not sorted_keys.size:
        return np.zeros(0, dtype=np.int64)
    change = np.empty(sorted_keys.size, dtype=bool)
    change[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=change[1:])
    return np.flatnonzero(change)


def _pairs(keys: np.ndarray, ndomains: int):
    """Sorted keys -> per (group head, domain): head, domain, pages, registered pages."""
    starts = _runs(keys)
    cnt = np.diff(np.append(starts, keys.size))
    uk = keys[starts]
    reg, pair = uk & 1, uk >> 1
    ps = _runs(pair)
    n = np.add.reduceat(cnt, ps) if ps.size else cnt[:0]
    nreg = np.add.reduceat(cnt * reg, ps) if ps.size else cnt[:0]
    head, dom = pair[ps] // ndomains, pair[ps] % ndomains
    return head, dom, n, nreg


class Assign:
    """The domain step of :func:`~.summary.summarize` (see the module docstring)."""

    def __init__(self, scope: Scope, sizes_by_head, domains, zero_across: bool, mps: int,
                 range_gap: int, max_ranges: int):
        self.scope, self.sizes_by_head, self.mps = scope, sizes_by_head, mps
        self.zero_across = bool(zero_across)
        self.range_gap, self.max_ranges = range_gap, max_ranges
        self.keys, self.tdom = target_keys(scope, domains)

    def _resolve(self, pairs) -> Groups:
        """Per group the winning (head, domain) pair: most saving, most registered, smallest key."""
        head, dom, n, nreg = pairs
        save = group_saving(n, self.mps)
        order = np.lexsort((dom, -nreg, -save, head))
        hs = head[order]
        gstart = _runs(hs)
        best = order[gstart]
        ndom = np.diff(np.append(gstart, hs.size))
        size = np.add.reduceat(n[order], gstart) if gstart.size else n[:0]
        return Groups(head[best], dom[best], n[best], ndom, size)

    def zero_winner(self, zero: np.ndarray) -> int:
        """The domain with most zero pages (ties: most registered, then smallest key); -1: none."""
        if not zero[:, 0].any():
            return -1
        order = np.lexsort((np.arange(zero.shape[0]), -zero[:, 1], -zero[:, 0]))
        return int(order[0])

    def run(self, est, handed: dict) -> DomainSummary:
        t0 = time.perf_counter()
        scope, nd = self.scope, len(self.keys)
        pairs, zero = _count(scope, self.sizes_by_head, self.tdom, nd)
        groups = self._resolve(pairs)
        cross = groups.ndom >= 2
        zwin = self.zero_winner(zero)
        with_zero = int(np.count_nonzero(zero[:, 0]))
        exposed_zero = int(zero[:, 0].sum() - zero[zwin, 0]) if with_zero >= 2 else 0
        per = self._classify(est, groups, cross, zwin, handed)
        summary = DomainSummary(
            self.zero_across,
            {k: float(sum(t.saved_pages[k] for t in est.targets)) for k in (0, 1)},
            {k: float(sum(t.domain_saved_pages[k] for t in est.targets)) for k in (0, 1)},
            cross_groups=int(cross.sum()), exposed_pages=int(groups.size[cross].sum()),
            exposed_zero_pages=exposed_zero, per_domain=per,
            foreign_pages=sum(t.foreign_pages for t in est.targets))
        summary.seconds = time.perf_counter() - t0
        return summary

    def _classify(self, est, groups: Groups, cross, zwin: int, handed: dict) -> list:
        scope, mps = self.scope, self.mps
        flags, rep, ps = scope.flags, scope.rep, scope.page_size
        frac_win = np.divide(group_saving(groups.n_win, mps), groups.n_win,
                             out=np.zeros(groups.n_win.size), where=groups.n_win > 0)
        nt = len(scope.target_reports)
        builders = [SavingRanges(ps, self.range_gap, self.max_ranges) for _ in range(nt)]
        kept_members = np.zeros(nt)
        exposed = np.zeros(len(self.keys), dtype=np.int64)
        zero_kept: dict = {}        # (id(mapping report), target): [report, kept zero pages]
        conflicts: list = [[] for _ in range(nt)]
        for tr, d in zip(scope.target_reports, self.tdom):
            tr.domain, tr.foreign_pages = self.keys[int(d)], 0
            tr.conflict_ranges = []
        for seg in scope.segments:
            ti = seg.target
            d = int(self.tdom[ti])
            zero_ok = self.zero_across or d == zwin
            a, b = seg.base, seg.base + seg.size
            builder, tr = builders[ti], scope.target_reports[ti]
            builder.start_segment(seg)
            registered = bool(seg.report.mapping.registered)
            zk = zero_kept.setdefault((id(seg.report), ti), [seg.report, 0])
            for lo in range(a, b, STEP):
                hi = min(b, lo + STEP)
                readable, zr, member = classes(flags[lo:hi], rep[lo:hi], self.sizes_by_head)
                pos = np.flatnonzero(member)
                gi = groups.lookup(rep[lo:hi][pos])
                win = groups.win[gi] == d
                ok = zr.copy() if zero_ok else np.zeros(zr.size, dtype=bool)
                ok[pos[win]] = True
                foreign = np.zeros(zr.size, dtype=bool)
                foreign[pos[~win]] = True
                if zero_ok:
                    zk[1] += int(zr.sum())
                else:
                    foreign |= zr
                builder.add(lo - a, ok, readable, foreign)
                kept_members[ti] += float(frac_win[gi[win]].sum())
                exposed[d] += int(cross[gi].sum())
                nf = int(foreign.sum())
                tr.foreign_pages += nf
                if registered and nf:
                    _page_runs(conflicts[ti], seg.addresses(np.flatnonzero(foreign) + (lo - a)),
                               ps)
        zero_saved = self._zero_saving(zero_kept, handed, nt)
        for ti, tr in enumerate(scope.target_reports):
            tr.domain_ranges, tr.domain_range_pages, tr.domain_uncovered_pages = \
                builders[ti].result()
            tr.conflict_ranges = [tuple(x) for x in conflicts[ti]]
            tr.domain_saved_pages = {k: float(kept_members[ti] + zero_saved[k][ti]) +
                                     tr.existing_ksm_zero_pages for k in (0, 1)}
            if tr.domain_uncovered_pages:
                est.notes.append(f"{tr.name} (PID {tr.pid}): more spans between foreign pages "
                                 f"than max_ranges={self.max_ranges}; the domain ranges leave out "
                                 f"{tr.domain_uncovered_pages} registrable pages of the spans "
                                 "saving least")
        return self._per_domain(exposed)

    def _zero_saving(self, zero_kept: dict, handed: dict, nt: int) -> dict:
        """Per target, per use_zero_pages: what its registrable zero pages save (those a THP split
        hands back save one page each, the others merge into KSM pages with use_zero_pages=0)."""
        out = {0: np.zeros(nt), 1: np.zeros(nt)}
        back = {key: min(kept, handed.get(key[0], (0, 0))[0]) if kept else 0
                for key, (_, kept) in zero_kept.items()}
        small = sum(z[1] for z in zero_kept.values()) - sum(back.values())
        frac = float(group_saving(np.array([small]), self.mps)[0]) / small if small > 0 else 0.0
        for key, (_, kept) in zero_kept.items():
            ti = key[1]
            out[0][ti] += (kept - back[key]) * frac + back[key]
            out[1][ti] += kept
        return out

    def _per_domain(self, exposed) -> list:
        scope = self.scope
        per = []
        for d, key in enumerate(self.keys):
            mine = [t for t, td in zip(scope.target_reports, self.tdom) if td == d]
            pids = sorted({t.pid for t in mine})
            per.append(DomainReport(
                key, pids, {k: float(sum(t.domain_saved_pages[k] for t in mine)) for k in (0, 1)},
                int(exposed[d]), {k: float(sum(t.saved_pages[k] for t in mine)) for k in (0, 1)},
                sum(t.foreign_pages for t in mine), sum(t.scanned_pages for t in mine),
                sum(t.zero_pages for t in mine)))
        return per


def _page_runs(out: list, addresses: np.ndarray, ps: int) -> None:
    """Append the [start, end) runs of sorted page ``addresses`` to ``out`` (joining the last)."""
    addr = addresses.astype(np.int64)
    breaks = np.flatnonzero(np.diff(addr) != ps) + 1
    first = np.concatenate(([0], breaks))
    last = np.append(breaks - 1, addr.size - 1)
    starts, ends = addr[first].tolist(), (addr[last] + ps).tolist()
    if out and out[-1][1] == starts[0]:
        out[-1][1] = ends[0]
        starts, ends = starts[1:], ends[1:]
    out.extend([s, e] for s, e in zip(starts, ends))


def assign_domains(scope: Scope, est, sizes_by_head, handed: dict, domains, zero_across: bool,
                   mps: int, range_gap: int, max_ranges: int) -> DomainSummary:
    """Fill the domain fields of ``est``'s target reports; return its :class:`DomainSummary`."""
    return Assign(scope, sizes_by_head, domains, zero_across, mps, range_gap, max_ranges).run(
        est, handed)
