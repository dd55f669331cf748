"""``udedup why PID``: why a process's pages do or do not merge, mapping by mapping, with the fix."""
from __future__ import annotations

from ..errors import KsmError
from ..native.pages import PAGE_SIZE
from ..host.procmem import ksm_stat, read_mappings
from ..units import human_bytes
from ._util import print_json
from .scan import add_read_arguments, estimate_with_progress, parse_pids

NAME = "why"
HELP = "explain, per mapping, why a process's pages merge or not, and what to change"
DESCRIPTION = """\
For every mapping of the process: can KSM use it at all (shared, hugetlb, device and special
mappings cannot), is it registered (the mg flag; ksmd scans nothing else), is it backed by
transparent huge pages (KSM splits them to merge), and what its pages in RAM are: zero, duplicate,
volatile (changing between scans) or unique. Each reason comes with its fix.

The content is read like 'udedup scan --all-eligible' (nothing is changed); --no-scan gives the
flags-only answer at once.
"""
ORDER = 31

REGISTER_FIX = ("register it: madvise(MADV_MERGEABLE) in the program, start it under "
                "'udedup run', or 'udedup enable PID' for a running process")
_KIND_FIX = {
    "shared": "keep data meant to merge in private anonymous memory (MAP_PRIVATE|MAP_ANONYMOUS)",
    "hugetlb": "use ordinary or transparent huge pages instead of hugetlbfs for data meant to merge",
}


def add_arguments(parser) -> None:
    parser.add_argument("pid", metavar="PID", help="the process to explain")
    parser.add_argument("--no-scan", action="store_true",
                        help="do not read page contents: flags and sizes only")
    parser.add_argument("--all", action="store_true",
                        help="list every mapping, also those with nothing in RAM")
    add_read_arguments(parser)


def _ksm_state() -> dict:
    try:
        from ..ksm.controller import Ksm
        ksm = Ksm()
        return {"run": ksm.get("run"), "use_zero_pages": bool(ksm.get("use_zero_pages")),
                "max_page_sharing": ksm.get("max_page_sharing")}
    except (ImportError, KsmError, OSError) as err:
        return {"error": str(err)}


def _reasons(report, mapping, ps: int, scanned: bool, uzp: bool) -> list:
    """[(reason, pages or None, fix or None)] for one mapping."""
    out = []
    if not mapping.eligible:
        return [(mapping.reason, None, _KIND_FIX.get(mapping.kind) or
                 "none: KSM cannot merge this kind of memory")]
    if not mapping.registered:
        out.append(("not registered (no mg flag): ksmd never scans it", None, REGISTER_FIX))
    if mapping.anon_huge:
        out.append((f"THP-backed ({human_bytes(mapping.anon_huge)}): KSM splits huge pages to "
                    "merge them, trading THP speed for memory", None,
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
    if report.zero_pages:
        if uzp:
            out.append(("zero pages: will be mapped to the kernel's zero page "
                        "(use_zero_pages=1)", report.zero_pages, None))
        else:
            out.append(("zero pages: merge into shared KSM pages (use_zero_pages=0)",
                        report.zero_pages, "use_zero_pages=1 maps them to the zero page instead: "
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


def run(args) -> int:
    (pid,) = parse_pids([args.pid])
    maps = read_mappings(pid, args.procfs)     # one-line errors for bad PIDs come from here
    state = _ksm_state()
    stat = ksm_stat(pid, args.procfs)
    est = None
    if not args.no_scan:
        est = estimate_with_progress(args, pid, all_eligible=True)
    uzp = bool(state.get("use_zero_pages"))
    ps = est.page_size if est else PAGE_SIZE
    reports = {(r.mapping.start, r.mapping.end): r for r in est.mappings} if est else {}
    rows = []
    for m in [r.mapping for r in est.mappings] if est else maps:
        rep = reports.get((m.start, m.end))
        rows.append((m, rep, _reasons(rep, m, ps, est is not None, uzp)))
    process_notes = _process_notes(state, stat, maps)
    if args.json:
        print_json({
            "pid": pid, "ksm": state, "ksm_stat": stat, "notes": process_notes,
            "predictions": [p.as_dict() for p in est.predictions] if est else None,
            "mappings": [{**(rep.as_dict() if rep else {
                "start": hex(m.start), "end": hex(m.end), "path": m.path, "kind": m.kind,
                "registered": m.registered, "eligible": m.eligible, "reason": m.reason}),
                "why": [{"reason": r, "pages": n, "fix": f} for r, n, f in reasons]}
                for m, rep, reasons in rows]})
        return 0
    _print(pid, rows, process_notes, est, ps, args.all, uzp)
    return 0


def _process_notes(state: dict, stat: dict, maps) -> list:
    notes = []
    run = state.get("run")
    if "error" in state:
        notes.append(("KSM state unknown: " + state["error"], None))
    elif run != 1:
        notes.append((f"ksmd is not running (run={run}): nothing merges anywhere",
                      "'udedup set run=1' (or echo 1 > /sys/kernel/mm/ksm/run)"))
    if not any(m.registered for m in maps):
        notes.append(("no mapping of this process is registered with KSM", REGISTER_FIX))
    if stat.get("ksm_merge_any") == "yes":
        notes.append(("PR_SET_MEMORY_MERGE is on: every compatible mapping is registered, new "
                      "ones too", None))
    return notes


def _print(pid, rows, notes, est, ps, show_all, uzp) -> None:
    print(f"PID {pid}:")
    for text, fix in notes:
        print(f"  {text}" + (f"\n    fix: {fix}" if fix else ""))
    if est is not None:
        pred = est.predicted(uzp)
        print(f"  if all its compatible memory were registered: {human_bytes(pred.general_profit)}"
              f" saved ({pred.saved_percent:.1f} % of {human_bytes(est.readable_pages * ps)} "
              f"scanned; use_zero_pages={int(uzp)})")
    ineligible: dict = {}
    quiet = 0
    fixes_shown: set = set()
    for m, rep, reasons in rows:
        if not m.eligible:
            size, count = ineligible.get(m.reason, (0, 0))
            ineligible[m.reason] = (size + m.size, count + 1)
            continue
        in_ram = m.anonymous > 0 or (rep is not None and rep.present_pages > 0)
        if not in_ram and not show_all:
            quiet += 1
            continue
        flag = "registered" if m.registered else "not registered"
        print(f"\n  {m.start:#014x}-{m.end:#014x} {m.kind:<5} {human_bytes(m.size):>10} "
              f"{flag:<15} {m.name}")
        for text, n, fix in reasons:
            count = f"{n} pages ({human_bytes(n * ps)}): " if n else ""
            print(f"    - {count}{text}")
            if fix and fix not in fixes_shown:
                print(f"      fix: {fix}")
                fixes_shown.add(fix)
    if quiet:
        print(f"\n  {quiet} more compatible mappings hold no anonymous pages in RAM, nothing to "
              "merge (--all lists them)")
    if ineligible:
        print("\n  mappings KSM cannot use:")
        for reason, (size, count) in sorted(ineligible.items(), key=lambda kv: -kv[1][0]):
            print(f"    - {count} x ({human_bytes(size)}): {reason}")
