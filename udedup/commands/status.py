"""``udedup status``: knobs, counters, savings, ksmd CPU and the processes KSM tracks."""
from __future__ import annotations

import time

from ..daemon.state import DEFAULT_STATE_FILE, describe_daemon_state, read_daemon_state
from ..errors import KsmError, ProcessError, UsageError
from ..host.fs import ProcFs
from ..ksm import DEFAULT_PROCFS, DEFAULT_ROOT, Ksm
from ..ksm.accounting import RMAP_ITEM_BYTES, profit_overcount_bytes
from ..ksm.attribution import GROUPINGS, attribute
from ..ksm.process import process_ksm, top_processes
from ..ksm.truth import true_savings
from ..units import human_bytes
from ..console import print_json

NAME = "status"
HELP = "show KSM knobs, counters, savings, ksmd CPU use and the top merging processes"
DESCRIPTION = """\
Show every KSM knob and counter of this kernel, the memory saved, ksmd's CPU use and the
processes KSM tracks, largest profit first.

Saved memory is what the host really gets back: pages_sharing + ksm_zero_pages, plus the pages of
mergeable memory that map the zero page outside KSM (when KSM merges a subpage of a transparent
huge page it splits it, and the split maps the THP's zero-filled subpages to the zero page, which
no KSM counter sees). Pages a program read but never wrote map the zero page too; an A/B trial,
which counts the change from its start, is exact. The kernel's own figure, general_profit
(counters minus 64 bytes of kernel memory per tracked page), is shown beside it. Process profits
count every mapping of a KSM page, its own one too, so their sum exceeds the real saving by
pages_shared pages.

--by cgroup|uid|process splits the saving exactly (needs root, else exit code 4): each present
mapping of a KSM page mapped k times saves 1 - 1/k pages, each mapping of the zero page in
mergeable memory one page (from pagemap, /proc/kpageflags and /proc/kpagecount). The total is
checked against the counters: a few pages apart while ksmd runs, equal with ksmd stopped.
"""
ORDER = 10


def add_arguments(parser) -> None:
    parser.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                        help="measure ksmd CPU over this interval (default 0.5); 0 = average "
                             "since ksmd started")
    parser.add_argument("--top", type=int, default=5, metavar="N",
                        help="show the N processes with the largest KSM profit (default 5, 0 = none)")
    parser.add_argument("--pid", metavar="PID", help="also show the KSM figures of this process")
    parser.add_argument("--by", choices=tuple(GROUPINGS), metavar="cgroup|uid|process",
                        help="split the true saving exactly per cgroup v2 path, uid or process "
                             "(needs root: page frame numbers, kpageflags, kpagecount)")
    parser.add_argument("--sysfs", default=DEFAULT_ROOT, metavar="PATH",
                        help=f"KSM sysfs directory (default {DEFAULT_ROOT})")
    parser.add_argument("--procfs", default=DEFAULT_PROCFS, metavar="PATH",
                        help=f"procfs mount (default {DEFAULT_PROCFS})")
    parser.add_argument("--state-file", default=DEFAULT_STATE_FILE, metavar="PATH",
                        help="the daemon's state file, as its daemon.state_file (default "
                             f"{DEFAULT_STATE_FILE})")


def _ksmd_cpu(ksm: Ksm, interval: float) -> dict:
    try:
        if interval > 0:
            cpu0, t0 = ksm.ksmd_cpu_seconds(), time.monotonic()
            time.sleep(interval)
            cpu1, t1 = ksm.ksmd_cpu_seconds(), time.monotonic()
            window = t1 - t0
            return {"pid": ksm.ksmd_pid(), "cpu_seconds": cpu1, "window": "interval",
                    "window_seconds": window, "cpu_percent": 100.0 * (cpu1 - cpu0) / window}
        cpu = ksm.ksmd_cpu_seconds()
        text = ProcFs(ksm.procfs).global_text("uptime")
        if not text:
            raise ValueError(f"cannot read {ksm.procfs}/uptime")
        uptime = float(text.split()[0])
        window = max(uptime - ksm.ksmd_start_seconds(), 1e-9)
        return {"pid": ksm.ksmd_pid(), "cpu_seconds": cpu, "window": "since_start",
                "window_seconds": window, "cpu_percent": 100.0 * cpu / window}
    except (KsmError, OSError, ValueError) as err:
        return {"pid": None, "error": str(err)}


#: THP knobs the text output always shows
_THP_SHOWN = ("thp.enabled", "thp.defrag", "thp.shrink_underused", "thp.use_zero_page",
              "thp.khugepaged/defrag", "thp.khugepaged/max_ptes_none")


def _true_lines(truth) -> list[str]:
    counted = (f"KSM counters {human_bytes(truth.ksm_counter_bytes)}")
    if truth.method is None:
        return [f"saved: {human_bytes(truth.saved_bytes)} = {counted}; zero-page mappings of "
                "mergeable memory outside KSM unknown (needs root, or PAGEMAP_SCAN on Linux 6.7+)"]
    return [f"saved: {human_bytes(truth.saved_bytes)} really = {counted} + "
            f"{human_bytes(truth.zero_mapped_bytes)} of mergeable memory mapping the zero page "
            f"outside KSM ({truth.zero_mapped_pages} pages in {len(truth.processes)} processes: "
            "zero subpages of THPs KSM split; read in "
            f"{truth.read_seconds * 1e3:.1f} ms)",
            "  note: pages read but never written map the zero page too and count here; the change "
            "from before KSM ran (udedup ab) is exact"] + (
        [f"  {truth.unreadable_processes} processes with mergeable memory could not be read "
         "(not counted): run as root"] if truth.unreadable_processes else [])


def _attribution_lines(attribution, by: str) -> list[str]:
    check, ps = attribution.check(), attribution.page_size
    lines = [f"saved per {by} (exact: 1 - 1/k per mapping of a KSM page mapped k times, 1 per "
             f"zero-page mapping; read in {attribution.read_seconds * 1e3:.1f} ms):",
             f"  {'SAVED':>10} {'KSM PAGES':>11} {'ZERO':>9} {'PROCS':>5}  {by.upper()}"]
    for g in attribution.groups(by):
        name = (f"{g.key} ({g.processes[0].comm})" if by == "process"
                else "(no cgroup v2)" if g.key == "" else str(g.key))
        lines.append(f"  {human_bytes(round(g.saved_pages * ps)):>10} {g.ksm_saved_pages:>11.1f} "
                     f"{g.zero_mapped_pages:>9} {len(g.processes):>5}  {name}")
    diff = check["difference_pages"]
    lines.append(f"  total {human_bytes(attribution.saved_bytes)} = {check['attributed_pages']:.0f}"
                 f" pages; the counters' true saving {check['true_saved_pages']} pages: "
                 + ("equal" if check["matches"] else f"{diff:+.0f} pages apart"))
    if not check["matches"]:
        moved = check["counters_moved_pages"]
        during = "" if moved is None else f"the counters moved {moved:+d} pages during the read; "
        lines.append(f"  ({during}{check['why']})")
    return lines


def _fmt(value) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def run(args) -> int:
    if args.interval < 0:
        raise UsageError(f"--interval {args.interval:g}: must be >= 0")
    if args.top < 0:
        raise UsageError(f"--top {args.top}: must be >= 0")
    ksm = Ksm(args.sysfs, procfs=args.procfs)
    process = process_ksm(args.pid, args.procfs) if args.pid is not None else None
    knobs = ksm.knobs()
    stats = ksm.stats()
    truth = true_savings(ksm, procfs=args.procfs, stats=stats)
    attribution = attribute(ksm, procfs=args.procfs, stats=stats) if args.by else None
    cpu = _ksmd_cpu(ksm, args.interval)
    try:
        top = top_processes(args.top, args.procfs) if args.top else []
    except ProcessError as err:
        top, cpu["top_error"] = [], str(err)
    overcount = profit_overcount_bytes(stats.pages_shared, stats.page_size)
    daemon = read_daemon_state(args.state_file, args.procfs)

    if args.json:
        breakdown = truth.breakdown()
        breakdown["rmap_items_bytes"] = stats.rmap_items * RMAP_ITEM_BYTES
        out = {"knobs": knobs, "counters": stats.counters, "page_size": stats.page_size,
               "saved_pages": stats.saved_pages, "saved_bytes": truth.saved_bytes,
               "saved_bytes_source": "true_savings", "true_saved_pages": truth.saved_pages,
               "breakdown": breakdown, "general_profit_bytes": stats.saved_bytes,
               "general_profit_source": stats.as_dict()["saved_bytes_source"],
               "zero_page_processes": [p.as_dict() for p in truth.processes
                                       if p.outside_ksm_pages],
               "sharing_ratio": stats.sharing_ratio, "ksmd": cpu,
               "top_processes": [p.as_dict() for p in top],
               "process_profit_overcount_bytes": overcount}
        if process is not None:
            out["process"] = process.as_dict()
        out["daemon"] = daemon
        if attribution is not None:
            split = attribution.as_dict(args.by)
            out["groups"] = split.pop("groups")
            out["attribution"] = split
        print_json(out)
        return 0

    state = {0: "stopped (run=0)", 1: "running (run=1)", 2: "stopped, unmerged (run=2)"}
    print(f"KSM: {state.get(knobs.get('run'), knobs.get('run'))}   {ksm.root}")
    print("knobs:")
    folded = []
    for name, value in knobs.items():
        # THP has ~30 knobs (per-size folders, shmem, khugepaged): the text shows those that shape
        # what KSM sees; --json and -v list every one
        if name.startswith("thp.") and name not in _THP_SHOWN and not args.verbose:
            folded.append(name)
            continue
        print(f"  {name:36} {_fmt(value)}")
    if folded:
        print(f"  ({len(folded)} more thp.* knobs: -v or --json lists them)")
    print("counters:")
    for name, value in stats.counters.items():
        print(f"  {name:36} {value}")
    source = "general_profit" if stats.general_profit is not None else "computed from counters"
    for line in _true_lines(truth):
        print(line)
    print(f"kernel figure: {human_bytes(stats.saved_bytes)} ({source}); "
          f"{stats.saved_pages} pages merged away = pages_sharing {stats.pages_sharing} + "
          f"ksm_zero_pages {stats.ksm_zero_pages} ({human_bytes(stats.saved_pages * stats.page_size)})"
          f", minus {human_bytes(stats.rmap_items * 64)} of rmap items")
    if stats.pages_shared:
        print(f"sharing ratio: {stats.sharing_ratio:.1f} mappings per KSM page")
    if cpu.get("pid") is None:
        print(f"ksmd CPU: unknown ({cpu.get('error')})")
    elif cpu["window"] == "interval":
        print(f"ksmd CPU: {cpu['cpu_percent']:.1f} % of one core over the last "
              f"{cpu['window_seconds']:.2f} s (pid {cpu['pid']}, {cpu['cpu_seconds']:.2f} CPU-s "
              "since start)")
    else:
        print(f"ksmd CPU: {cpu['cpu_percent']:.3f} % of one core on average since ksmd started "
              f"{cpu['window_seconds']:.0f} s ago ({cpu['cpu_seconds']:.2f} CPU-s)")
    if process is not None:
        print(f"process {process.pid} ({process.comm}): merge_any={process.merge_any} "
              f"mergeable={process.mergeable} rmap_items={process.rmap_items} "
              f"merging_pages={process.merging_pages} zero_pages={process.zero_pages} "
              f"profit={human_bytes(process.process_profit)} "
              f"mergeable mappings={len(process.mappings or ())}")
    for line in describe_daemon_state(daemon):
        print(line)
    if attribution is not None:
        for line in _attribution_lines(attribution, args.by):
            print(line)
    if args.top:
        if not top:
            print("processes: none registered with KSM")
        else:
            print(f"top {len(top)} processes by ksm_process_profit:")
            print(f"  {'PID':>7} {'COMM':16} {'PROFIT':>10} {'MERGING':>9} {'ZERO':>8} "
                  f"{'RMAP':>8} MERGE_ANY")
            for p in top:
                print(f"  {p.pid:>7} {p.comm[:16]:16} {human_bytes(p.process_profit):>10} "
                      f"{p.merging_pages:>9} {p.zero_pages:>8} {p.rmap_items:>8} "
                      f"{'yes' if p.merge_any else 'no'}")
            if overcount:
                print(f"  note: ksm_merging_pages counts each KSM page's own mapping too: summed, "
                      f"these profits exceed the real saving by pages_shared x page size = "
                      f"{human_bytes(overcount)}")
    return 0
