"""``udedup scan``: predict what KSM would save on some processes, before turning it on."""
from __future__ import annotations

from ..errors import UsageError
from ..estimate import estimate
from ..host.domains import KINDS, process_domains
from ..units import human_bytes
from ..console import Progress, print_json

NAME = "scan"
HELP = "predict what KSM would save on processes (reads their memory, changes nothing)"
DESCRIPTION = """\
Read the memory of the given processes and predict the KSM counters once ksmd has merged it and
settled: pages_shared, pages_sharing, ksm_zero_pages, rmap items and general_profit, for
use_zero_pages=0 and =1 under the current max_page_sharing. Duplicates across the processes count,
as KSM merges across processes.

By default only memory KSM would scan today (registered: the mg flag) is read; --all-eligible
also predicts for KSM-compatible memory that is not registered yet. Pages not in RAM are never
touched. Each page is read --passes times, --interval seconds apart at least: a page whose
checksum changes is volatile and left out, as ksmd does; every duplicate is confirmed byte by
byte.

--domains cgroup|uid splits the prediction by trust domain (a cgroup v2 path, cut at
--cgroup-depth components, or an effective uid): KSM merges across tenants, so udedup registers a
content found in several domains in one of them only (where it saves most). The output adds what
KSM would save that way, how much is lost, and the exposure if everything were merged: the
contents shared across domains (each a copy-on-write timing side channel between tenants) and the
zero pages that merge across domains with use_zero_pages=0 (--zero-pages-within makes zero pages
one content like any other, registered in one domain only).
"""
ORDER = 30


def add_arguments(parser) -> None:
    parser.add_argument("pids", nargs="+", metavar="PID", help="processes to scan together")
    parser.add_argument("--all-eligible", action="store_true",
                        help="also scan KSM-compatible memory that is not registered yet")
    parser.add_argument("--max-page-sharing", type=int, metavar="N",
                        help="predict for this max_page_sharing (default: the kernel's)")
    parser.add_argument("--top", type=int, default=5, metavar="N",
                        help="show the N mappings saving most (default 5)")
    parser.add_argument("--domains", choices=KINDS, default="none", metavar="|".join(KINDS),
                        help="split the prediction by trust domain: a cgroup v2 path or a uid "
                             "(default none)")
    parser.add_argument("--cgroup-depth", type=int, default=0, metavar="N",
                        help="with --domains cgroup, cut cgroup paths to their first N components "
                             "(default 0: the whole path)")
    parser.add_argument("--zero-pages-within", action="store_true",
                        help="with --domains, zero pages are content like any other: merged "
                             "within one domain only (default: across domains)")
    add_read_arguments(parser)


def add_read_arguments(parser) -> None:
    """How 'scan' and 'why' read process memory: --passes, --interval, --procfs."""
    parser.add_argument("--passes", type=int, default=2, metavar="N",
                        help="reads of every page (default 2, at least 2)")
    parser.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                        help="least time between two reads of a page (default 0.5)")
    parser.add_argument("--procfs", default="/proc", metavar="PATH",
                        help="procfs mount (default /proc)")


def parse_pids(values) -> list:
    pids = []
    for value in values:
        try:
            pid = int(value)
        except ValueError:
            raise UsageError(f"{value!r} is not a PID: pass process IDs as numbers") from None
        if pid <= 0:
            raise UsageError(f"{pid} is not a PID: process IDs are positive")
        pids.append(pid)
    return pids


def progress_callback(progress: Progress):
    def report(pass_no, passes, done, total):
        if total:
            progress.update(f"scanning: pass {pass_no}/{passes} {100 * done // total:3d} % "
                            f"({done}/{total} pages)")
    return report


def estimate_with_progress(args, targets, **kwargs):
    """estimate() with the options of :func:`add_read_arguments` and a progress line on a
    terminal (none under --json or -q)."""
    if args.passes < 2:
        raise UsageError(f"--passes {args.passes}: at least 2 are needed (the first hashes, a "
                         "later one confirms duplicates and finds volatile pages)")
    if args.interval < 0:
        raise UsageError(f"--interval {args.interval}: must be >= 0 seconds")
    progress = Progress(enabled=None if not (args.json or args.quiet) else False)
    try:
        return estimate(targets, passes=args.passes, interval=args.interval, procfs=args.procfs,
                        progress=progress_callback(progress), **kwargs)
    finally:
        progress.done()


def domain_options(args) -> dict:
    """The estimate() keywords of --domains, --cgroup-depth and --zero-pages-within."""
    kind, depth = args.domains, args.cgroup_depth
    if depth < 0:
        raise UsageError(f"--cgroup-depth {depth}: must be >= 0 (0: the whole cgroup path)")
    if depth and kind != "cgroup":
        raise UsageError(f"--cgroup-depth applies to --domains cgroup, not --domains {kind}")
    if args.zero_pages_within and kind == "none":
        raise UsageError("--zero-pages-within applies with --domains cgroup or uid")
    return {"kind": kind, "depth": depth, "zero_across": not args.zero_pages_within}


def run(args) -> int:
    pids = parse_pids(args.pids)
    dom = domain_options(args)
    kw = {}
    if dom["kind"] != "none":
        kw = {"domains": process_domains(pids, dom["kind"], dom["depth"], args.procfs),
              "zero_pages_across_domains": dom["zero_across"]}
    est = estimate_with_progress(args, pids, all_eligible=args.all_eligible,
                                 max_page_sharing=args.max_page_sharing, **kw)
    if args.json:
        d = est.as_dict(top=args.top)
        if est.domains is not None:
            d["domains"] = {"kind": dom["kind"], "cgroup_depth": dom["depth"], **d["domains"]}
        print_json(d)
        return 0
    print_estimate(est, args.top)
    if est.domains is not None:
        print_domains(est, dom["kind"])
    return 0


def print_domains(est, kind: str) -> None:
    """The trust-domain section: saving inside domains, exposure, one row per domain."""
    ds, ps = est.domains, est.page_size
    k = int(bool(est.current_use_zero_pages))
    kept, everything = ds.saved_pages_kept[k] * ps, ds.saved_pages_all[k] * ps
    share = f"{100.0 * kept / everything:.1f} %" if everything else "-"
    zero = "zero pages merge across domains" if ds.zero_pages_across else \
        "zero pages merge within one domain"
    print(f"\nTrust domains ({kind}): {len(ds.per_domain)} domains; inside domains KSM would "
          f"save {human_bytes(kept)} of {human_bytes(everything)} ({share}, "
          f"use_zero_pages={k}, {zero})")
    print(f"  exposure if everything were merged: {ds.cross_groups} contents in "
          f"{ds.exposed_pages} pages shared across domains (+{ds.exposed_zero_pages} zero pages "
          "with use_zero_pages=0)")
    print(f"  {'domain':<40} {'processes':>9} {'saved inside':>13} {'saved if all':>13} "
          f"{'exposed':>9} {'foreign':>9}")
    for d in sorted(ds.per_domain, key=lambda d: (-d.saved_pages_kept[k], d.key)):
        name = d.key if len(d.key) <= 40 else "..." + d.key[-37:]
        print(f"  {name:<40} {len(d.pids):>9} {human_bytes(d.saved_pages_kept[k] * ps):>13} "
              f"{human_bytes(d.saved_pages_all[k] * ps):>13} {d.exposed_pages:>9} "
              f"{d.foreign_pages:>9}")
    print("  (exposed: pages whose content is also in another domain; foreign: of them, those "
          "registered\n   in another domain, where it saves more: never registered here)")


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f} %" if whole else "    - "


def print_estimate(est, top: int = 5) -> None:
    ps = est.page_size
    n = est.pages_scanned
    scope = "KSM-compatible memory (registered or not)" if est.all_eligible else \
        "registered memory (mg)"
    procs = sum(1 for t in est.targets if t.kind == "process")
    print(f"Scanned {n} pages ({human_bytes(n * ps)}) of {scope} in {procs} process(es): "
          f"{est.elapsed_seconds:.2f} s, {est.cpu_seconds:.2f} CPU-s, {est.passes} passes")
    rows = [("zero pages", est.zero_pages), ("duplicate pages", est.duplicate_pages),
            ("unique pages", est.unique_pages), ("volatile pages", est.volatile_pages)]
    if est.unreadable_pages:
        rows.append(("vanished mid-scan", est.unreadable_pages))
    for label, value in rows:
        print(f"  {label:<18} {value:>12}  {_pct(value, n)}")
    if est.duplicate_groups:
        print(f"  {est.duplicate_groups} duplicate contents, the largest held by "
              f"{est.largest_group} pages")
    if est.zero_mapped_pages:
        print(f"  {est.zero_mapped_pages} more pages already map the kernel's zero page (free, "
              "ksmd skips them)")
    current = est.current_use_zero_pages
    print(f"\nPredicted KSM counters once settled (max_page_sharing {est.max_page_sharing}), "
          "and the real saving:")
    preds = est.predictions
    head = [f"use_zero_pages={int(p.use_zero_pages)}" + (" (now)" if current is not None and
                                                        p.use_zero_pages == current else "")
            for p in preds]
    print(f"  {'':<16}" + "".join(f"{h:>24}" for h in head))
    for key in ("pages_shared", "pages_sharing", "ksm_zero_pages", "rmap_items"):
        print(f"  {key:<16}" + "".join(f"{getattr(p, key):>24}" for p in preds))
    print(f"  {'general_profit':<16}" + "".join(
        f"{human_bytes(p.general_profit):>24}" for p in preds))
    print(f"  {'real saving':<16}" + "".join(
        f"{human_bytes(p.real_saved_bytes) + f' ({p.saved_percent:.1f} %)':>24}" for p in preds))
    if est.thp is not None and est.thp.thps:
        print(f"  {'THPs split':<16}" + "".join(
            f"{f'{p.thps_split} of {p.thps}':>24}" for p in preds))
        print(f"  {'split zero pages':<16}" + "".join(
            f"{human_bytes(p.thp_zero_pages * ps):>24}" for p in preds))
        print("  (predicted: ksmd splits a THP when it merges one of its subpages; the split maps "
              "its zero\n   subpages to the zero page outside every KSM counter: 'real saving' "
              "counts them, the counters do not)")
    k = int(bool(current))
    tops = [m for m in est.top_mappings(top) if m.saved_pages[k] >= 1]
    if tops and top > 0:
        print(f"\nMappings saving most (use_zero_pages={k}):")
        for m in tops:
            mp = m.mapping
            print(f"  pid {m.pid:<7} {mp.start:#014x}-{mp.end:#014x} {mp.name[:40]:<40} "
                  f"{human_bytes(m.saved_pages[k] * ps):>10} of {human_bytes(m.scanned_pages * ps)}")
    if len(est.targets) > 1:
        print(f"\nProcesses (use_zero_pages={k}):")
        for t in est.top_processes(len(est.targets)):
            print(f"  pid {t.pid:<7} {t.name[:24]:<24} {human_bytes(t.saved_pages[k] * ps):>10} "
                  f"saved of {human_bytes(t.scanned_pages * ps)}" +
                  ("  (exited)" if t.exited else ""))
    for note in est.notes:
        print(f"note: {note}")
