"""``udedup audit``: page by page proof that no KSM page is mapped from two trust domains."""
from __future__ import annotations

from ..console import print_json
from ..errors import AUDIT_FINDINGS_EXIT, UsageError
from ..host.domains import KINDS
from ..ksm import DEFAULT_PROCFS
from ..ksm.audit import audit

NAME = "audit"
HELP = "check that no KSM page is mapped from two trust domains (cgroups or uids)"
DESCRIPTION = f"""\
Walk the mergeable memory of every process (or only --pid ...), find the KSM page behind each of
its shared pages (pagemap and /proc/kpageflags: needs root, else exit code 4) and list every KSM
page mapped from two or more trust domains: cgroup v2 paths (cut to their first N components with
--cgroup-depth N) or effective uids. Such a page is a copy-on-write timing channel between them.

Zero-filled KSM pages (use_zero_pages=0 merges every zero page into a few KSM pages) are told
apart by reading their bytes; across domains they are allowed, as the daemon's
security.zero_pages_across_domains = true allows them, unless --strict-zero. With
use_zero_pages=1 zero pages map the kernel's zero page, which is no KSM page.

Exact with ksmd stopped (run=0); while it runs pages merge and break during the walk. Exit code 0
when no KSM page is mapped across domains, {AUDIT_FINDINGS_EXIT} when some are (the full list with
--json, at most --limit frames listed, counts always complete).
"""
ORDER = 15


def add_arguments(parser) -> None:
    parser.add_argument("--domains", choices=KINDS, default="cgroup", metavar="|".join(KINDS),
                        help="what a trust domain is: a cgroup v2 path (default) or a uid")
    parser.add_argument("--cgroup-depth", type=int, default=0, metavar="N",
                        help="cut cgroup paths to their first N components (default 0: the "
                             "whole path)")
    parser.add_argument("--strict-zero", action="store_true",
                        help="zero-filled KSM pages mapped across domains are findings too")
    parser.add_argument("--pid", type=int, nargs="+", action="extend", metavar="PID",
                        help="audit only these processes")
    parser.add_argument("--limit", type=int, default=20, metavar="N",
                        help="list at most N offending KSM frames (default 20; counts are "
                             "always complete)")
    parser.add_argument("--procfs", default=DEFAULT_PROCFS, metavar="PATH",
                        help=f"procfs mount (default {DEFAULT_PROCFS})")


def _hex(addrs) -> str:
    return ", ".join(f"{a:#x}" for a in addrs)


def _text(report, strict: bool, limit: int) -> list[str]:
    what = (f"cgroup (depth {report.depth})" if report.kind == "cgroup" and report.depth
            else report.kind)
    lines = [f"audit by {what}: {report.processes} processes with mergeable memory in "
             f"{len(report.domains)} domains, {report.ksm_frames} shared KSM frames, read in "
             f"{report.read_seconds:.3f} s"]
    if report.unreadable_processes:
        lines.append(f"  {report.unreadable_processes} processes could not be read (not audited)")
    if report.ok:
        lines.append("ok: no KSM page is mapped from two domains")
    else:
        lines.append(f"FOUND: {report.offender_frames} KSM frames ({report.offender_pages} pages) "
                     "are mapped from two or more domains")
        for g in report.groups:
            zero = f", {g.zero_frames} zero-filled" if g.zero_frames else ""
            lines.append(f"  {' + '.join(g.domains)}: {g.frames} frames{zero}, {g.pages} pages")
            for pid, comm, domain, pages, addrs in g.processes:
                lines.append(f"    pid {pid} ({comm}) in {domain}: {pages} pages, e.g. "
                             f"{_hex(addrs)}")
        for o in report.offenders[:limit]:
            lines.append(f"  frame {o.pfn:#x}{' (zero-filled)' if o.zero else ''}: " + "; ".join(
                f"{pid} {domain} {addr:#x}" for domain, pid, _, addr in o.mappings[:6])
                + (" ..." if len(o.mappings) > 6 else ""))
        if report.offender_frames > len(report.offenders):
            lines.append(f"  ({len(report.offenders)} of {report.offender_frames} frames listed; "
                         "--limit N or --json for more)")
    if report.zero_frames_across:
        how = ("counted above (--strict-zero)" if strict else
               "allowed: zero pages carry no data (--strict-zero counts them)")
        lines.append(f"zero-filled KSM frames mapped across domains: {report.zero_frames_across}"
                     f", {how}")
    if report.zero_page_mappings:
        lines.append(f"mappings of the kernel's zero page (not KSM frames): "
                     f"{report.zero_page_mappings}")
    return lines


def run(args) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit must be 0 or more, not {args.limit}")
    report = audit(args.domains, args.cgroup_depth, procfs=args.procfs, pids=args.pid,
                   zero_pages_across_domains=not args.strict_zero, limit=args.limit)
    if args.json:
        print_json(report.as_dict())
    else:
        print("\n".join(_text(report, args.strict_zero, args.limit)))
    return 0 if report.ok else AUDIT_FINDINGS_EXIT
