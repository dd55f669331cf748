"""``udedup why PID``: why a process's pages do or do not merge, mapping by mapping, with the fix."""
from __future__ import annotations

from ..estimate.why import explain, observe
from ..units import human_bytes
from ..console import print_json
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


def add_arguments(parser) -> None:
    parser.add_argument("pid", metavar="PID", help="the process to explain")
    parser.add_argument("--no-scan", action="store_true",
                        help="do not read page contents: flags and sizes only")
    parser.add_argument("--all", action="store_true",
                        help="list every mapping, also those with nothing in RAM")
    add_read_arguments(parser)


def run(args) -> int:
    (pid,) = parse_pids([args.pid])
    facts = observe(pid, procfs=args.procfs)
    est = None
    if not args.no_scan:
        est = estimate_with_progress(args, pid, all_eligible=True, ksm=facts.ksm)
    diagnosis = explain(facts, est)
    if args.json:
        print_json(diagnosis.as_dict())
        return 0
    _print(diagnosis, args.all)
    return 0


def _print(diagnosis, show_all: bool) -> None:
    est, ps, uzp = diagnosis.estimate, diagnosis.page_size, diagnosis.use_zero_pages
    print(f"PID {diagnosis.pid}:")
    for text, fix in diagnosis.notes:
        print(f"  {text}" + (f"\n    fix: {fix}" if fix else ""))
    if est is not None:
        pred = est.predicted(uzp)
        print(f"  if all its compatible memory were registered (predicted): "
              f"{human_bytes(pred.saved_bytes)} saved ({pred.saved_percent:.1f} % of "
              f"{human_bytes(est.readable_pages * ps)} scanned; use_zero_pages={int(uzp)})")
        if pred.thps:
            print(f"  of it {human_bytes(pred.thp_zero_pages * ps)} are zero subpages of "
                  f"{pred.thps_split} THPs ksmd will split (of {pred.thps}): outside the KSM "
                  f"counters, which will show {human_bytes(pred.general_profit)}")
    ineligible: dict = {}
    quiet = 0
    fixes_shown: set = set()
    for m, rep, reasons in diagnosis.rows:
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
