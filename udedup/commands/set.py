"""``udedup set KNOB=VALUE ...``: change KSM and THP knobs, all validated first, applied
all-or-nothing."""
from __future__ import annotations

from ..errors import UsageError
from ..ksm import DEFAULT_ROOT, Ksm
from ..console import print_json

NAME = "set"
HELP = "set KSM and THP knobs (KNOB=VALUE ...), all or nothing"
DESCRIPTION = """\
Set one or more KSM knobs (/sys/kernel/mm/ksm) or THP knobs (thp. + a file under
/sys/kernel/mm/transparent_hugepage: thp.enabled, thp.khugepaged/defrag, also spelled
thp.khugepaged.defrag). Every value is checked before anything is written; if the kernel refuses
one of them, the knobs already written are put back. Booleans take 0/1, y/n, on/off.

max_page_sharing and merge_across_nodes can only change while nothing is merged: with
--allow-unmerge, every KSM page on the machine is unmerged first (run=2), then run is set back.

examples:
  udedup set run=1 pages_to_scan=5000 sleep_millisecs=0
  udedup set --allow-unmerge max_page_sharing=512
  udedup set thp.enabled=never thp.khugepaged/defrag=0
"""
ORDER = 20


def add_arguments(parser) -> None:
    parser.add_argument("assignments", nargs="+", metavar="KNOB=VALUE")
    parser.add_argument("--allow-unmerge", action="store_true",
                        help="unmerge everything first when a knob needs it")
    parser.add_argument("--sysfs", default=DEFAULT_ROOT, metavar="PATH",
                        help=f"KSM sysfs directory (default {DEFAULT_ROOT})")
    parser.add_argument("--thp-sysfs", default=None, metavar="PATH",
                        help="THP sysfs directory (default: transparent_hugepage beside --sysfs)")


def parse_assignments(items) -> dict[str, str]:
    knobs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UsageError(f"{item!r}: expected KNOB=VALUE, e.g. pages_to_scan=1000 or "
                             "thp.enabled=never")
        if name in knobs:
            raise UsageError(f"{name} is given twice")
        knobs[name] = value
    return knobs


def run(args) -> int:
    wanted = parse_assignments(args.assignments)
    ksm = Ksm(args.sysfs, thp_root=args.thp_sysfs)
    before = ksm.apply(wanted, allow_unmerge=args.allow_unmerge)
    after = ksm.knobs()
    changed = {name: [before[name], after[name]] for name in after
               if name in before and before[name] != after[name]}
    if args.json:
        print_json({"changed": changed, "knobs": after})
    elif not args.quiet:
        if not changed:
            print("no change: every knob already had that value")
        for name, (old, new) in changed.items():
            print(f"{name}: {old} -> {new}")
    return 0
