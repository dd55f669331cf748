"""Why a process's pages do or do not merge, mapping by mapping, and what to change.

:func:`observe` reads the facts once (the mappings with their smaps flags, the KSM knobs,
/proc/PID/ksm_stat); :func:`explain` turns them, with an estimate of the process's memory where
one was made, into a :class:`Diagnosis`: pure, so every reason can be tested on made-up facts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import KsmError
from ..host.fs import ProcFs, as_procfs
from ..host.maps import Mapping, read_mappings
from ..native.lib import PAGE_SIZE
from ..units import human_bytes
from .kernel import controller, ksm_state
from .model import Estimate, MappingReport

REGISTER_FIX = ("register it: madvise(MADV_MERGEABLE) in the program, start it under "
                "'udedup run', or 'udedup enable PID' for a running process")
KIND_FIX = {
    "shared": "keep data meant to merge in private anonymous memory (MAP_PRIVATE|MAP_ANONYMOUS)",
    "hugetlb": "use ordinary or transparent huge pages instead of hugetlbfs for data meant to merge",
}


@dataclass
class Facts:
    """What :func:`explain` needs to know about a process, read once."""

    pid: int
    mappings: list                 # host.maps.Mapping, in address order
    ksm_state: dict                # run, use_zero_pages, max_page_sharing; or {"error": ...}
    ksm_stat: dict                 # /proc/PID/ksm_stat ({} on kernels without it)
    ksm: object = None             # the KSM controller read (or what was asked for): for estimate


def observe(pid: int, procfs: str | ProcFs = "/proc", ksm=None) -> Facts:
    """Read the facts about ``pid`` from ``procfs`` and the KSM directory ``ksm`` (a Ksm, a path,
    or None for the default). A process that does not exist or is a kernel thread raises, one
    line; KSM that cannot be read is a fact (``ksm_state["error"]``)."""
    procfs = as_procfs(procfs)
    maps = read_mappings(pid, procfs)     # one-line errors for bad PIDs come from here
    try:
        ctl = controller(ksm, procfs)
    except (KsmError, OSError) as err:
        state = {"error": str(err)}
    else:
        state, ksm = ksm_state(ctl), ctl
    return Facts(pid, maps, state, procfs.ksm_stat(pid), ksm)


def mapping_reasons(report: MappingReport | None, mapping: Mapping, page_size: int,
                    scanned: bool, use_zero_pages: bool) -> list:
    """[(reason, pages or None, fix or None)] for one mapping."""
    ps = page_size
    out = []
    if not mapping.eligible:
        return [(mapping.reason, None, KIND_FIX.get(mapping.kind) or
                 "none: KSM cannot merge this kind of memory")]
    if not mapping.registered:
        out.append(("not registered (no mg flag): ksmd never scans it", None, REGISTER_FIX))
    if mapping.anon_huge:
        out.append((thp_reason(report, mapping, ps, use_zero_pages), None,
                    "MADV_NOHUGEPAGE on it if merging matters more than huge pages; leave it "
                    "if THP speed matters more"))
    if report is None or not scanned:
        if mapping.ksm:
            out.append((f"{human_bytes(mapping.ksm)} already merged", mapping.ksm // ps, None))
        return out
    if report.present_pages == 0:
        what = ("only page-cache pages: a private file mapping merges only its copy-on-write "
                "pages" if mapping.kind == "file" else "nothing in RAM (never touched or swapped "
                "out)")
        out.append((what, 0, None))
        return out
    if report.zero_mapped_pages:
        out.append(("already map the kernel's zero page: free, nothing to merge",
                    report.zero_mapped_pages, None))
    back = report.thp_zero_pages[int(bool(use_zero_pages))]
    if back:
        out.append(("zero subpages of THPs ksmd will split (predicted): the split maps them to "
                    "the zero page, outside every KSM counter", back, None))
    small_zero = report.zero_pages - back
    if small_zero:
        if use_zero_pages:
            out.append(("zero pages: will be mapped to the kernel's zero page "
                        "(use_zero_pages=1)", small_zero, None))
        else:
            out.append(("zero pages: merge into shared KSM pages (use_zero_pages=0)",
                        small_zero, "use_zero_pages=1 maps them to the zero page instead: "
                        "no KSM page, and they leave ksmd's rmap tracking"))
    if report.duplicate_pages:
        out.append(("duplicate content: merges", report.duplicate_pages, None if
                    mapping.registered else REGISTER_FIX))
    if report.volatile_pages:
        out.append(("volatile: content changed between reads, ksmd skips such pages",
                    report.volatile_pages, "none needed: merging pages that keep changing would "
                    "be undone by the next write (copy-on-write)"))
    if report.unique_pages:
        out.append(("unique content: no identical page in this process", report.unique_pages,
                    "none: nothing to merge with (other processes may hold twins: "
                    "'udedup scan --all-eligible PID OTHER...')"))
    if report.unreadable_pages:
        out.append(("unmapped while being read", report.unreadable_pages, None))
    return out


def thp_reason(report: MappingReport | None, mapping: Mapping, page_size: int,
               use_zero_pages: bool) -> str:
    """What KSM will do to the THPs of one mapping, in words (predicted, from the estimate)."""
    text = (f"THP-backed ({human_bytes(mapping.anon_huge)}): KSM splits a huge page to merge any "
            "of its subpages, trading THP speed for memory")
    if report is None or not report.thps:
        return text
    k = int(bool(use_zero_pages))
    split, back = report.thps_split[k], report.thp_zero_pages[k]
    huge = 512 * page_size
    return (f"THP-backed: {report.thps} huge pages scanned; predicted (use_zero_pages={k}): ksmd "
            f"splits {split} of them (costs {split} huge pages, {human_bytes(split * huge)} no "
            f"longer THP-backed) and the splits hand back {back} zero subpages "
            f"({human_bytes(back * page_size)}, mapped to the zero page outside every KSM "
            f"counter); {report.thps - split} stay whole (no subpage to merge)")


def process_notes(state: dict, stat: dict, maps) -> list:
    """[(note, fix or None)] about the process as a whole and about ksmd."""
    notes = []
    run = state.get("run")
    if "error" in state:
        notes.append(("KSM state unknown: " + state["error"], None))
    elif run != 1:
        notes.append((f"ksmd is not running (run={run}): nothing merges anywhere",
                      "'udedup set run=1' (or echo 1 > /sys/kernel/mm/ksm/run)"))
    if not any(m.registered for m in maps):
        notes.append(("no mapping of this process is registered with KSM", REGISTER_FIX))
    if stat.get("ksm_merge_any") is True:
        notes.append(("PR_SET_MEMORY_MERGE is on: every compatible mapping is registered, new "
                      "ones too", None))
    return notes


@dataclass
class Diagnosis:
    """The answer for one process: ``rows`` are (mapping, report or None, reasons) in address
    order, ``notes`` (note, fix) about the whole process."""

    facts: Facts
    estimate: Estimate | None
    page_size: int
    use_zero_pages: bool
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.facts.pid

    def as_dict(self) -> dict:
        est = self.estimate
        return {
            "pid": self.pid, "ksm": self.facts.ksm_state, "ksm_stat": self.facts.ksm_stat,
            "notes": self.notes,
            "predictions": [p.as_dict() for p in est.predictions] if est else None,
            "mappings": [{**(rep.as_dict() if rep else {
                "start": hex(m.start), "end": hex(m.end), "path": m.path, "kind": m.kind,
                "registered": m.registered, "eligible": m.eligible, "reason": m.reason}),
                "why": [{"reason": r, "pages": n, "fix": f} for r, n, f in reasons]}
                for m, rep, reasons in self.rows]}


def explain(facts: Facts, est: Estimate | None = None) -> Diagnosis:
    """The reasons for every mapping (those the estimate saw, or the facts' without one) and the
    process notes. ``est``: an ``all_eligible`` estimate of the process, or None (flags only)."""
    uzp = bool(facts.ksm_state.get("use_zero_pages"))
    ps = est.page_size if est else PAGE_SIZE
    reports = {(r.mapping.start, r.mapping.end): r for r in est.mappings} if est else {}
    rows = []
    for m in [r.mapping for r in est.mappings] if est else facts.mappings:
        rep = reports.get((m.start, m.end))
        rows.append((m, rep, mapping_reasons(rep, m, ps, est is not None, uzp)))
    return Diagnosis(facts, est, ps, uzp, rows,
                     process_notes(facts.ksm_state, facts.ksm_stat, facts.mappings))
