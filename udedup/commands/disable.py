"""``udedup disable PID...``: undo ``udedup enable`` inside running processes."""
from __future__ import annotations

from .. import inject
from .enable import add_arguments as _enable_arguments
from .enable import run_action

NAME = "disable"
HELP = "disable KSM inside running processes (prctl 0 / MADV_UNMERGEABLE, by ptrace injection)"
DESCRIPTION = """\
Undo 'udedup enable': the process executes prctl(PR_SET_MEMORY_MERGE, 0) (when merge-any is on
and the kernel lets it) or madvise(MADV_UNMERGEABLE) over its registered mappings (or the
given --range). Merged pages are copied back, so this needs free memory. Same refusals and exit
codes as 'udedup enable'.
"""
ORDER = 41


def add_arguments(parser) -> None:
    _enable_arguments(parser)


def run(args) -> int:
    return run_action(args, inject.disable, "disabled")
