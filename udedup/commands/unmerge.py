"""``udedup unmerge``: break every KSM merge on the machine (run=2), then put run back."""
from __future__ import annotations

import time

from ..ksm import DEFAULT_ROOT, Ksm
from ..units import human_bytes
from ..console import print_json

NAME = "unmerge"
HELP = "unmerge every KSM page on the machine (run=2), then restore run"
DESCRIPTION = """\
Unmerge every KSM page (write run=2), then set run back to its previous value. Registrations
stay: with run=1, ksmd starts merging again. Needs a free page for every merged one; the kernel
may pick this process for the OOM killer when memory is short.
"""
ORDER = 30


def add_arguments(parser) -> None:
    parser.add_argument("--sysfs", default=DEFAULT_ROOT, metavar="PATH",
                        help=f"KSM sysfs directory (default {DEFAULT_ROOT})")


def run(args) -> int:
    ksm = Ksm(args.sysfs)
    before = ksm.stats()
    t0 = time.monotonic()
    ksm.unmerge_all()
    seconds = time.monotonic() - t0
    after = ksm.stats()
    if args.json:
        print_json({"before": before.as_dict(), "after": after.as_dict(), "seconds": seconds,
                    "run": ksm.get("run")})
    elif not args.quiet:
        print(f"unmerged {before.saved_pages} pages ({human_bytes(before.saved_bytes)} saved before) "
              f"in {seconds:.2f} s; run={ksm.get('run')}")
    return 0
