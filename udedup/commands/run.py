"""``udedup run [--] CMD ARGS...``: run CMD with KSM merge-any on (PR_SET_MEMORY_MERGE), same pid."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from ..errors import KsmUnavailableError, UdedupError, UsageError
from ..ksm.memory import enable_process_merge, kernel_version
from ..signals import exec_defaults

NAME = "run"
HELP = "run a command with KSM enabled for all its memory (prctl PR_SET_MEMORY_MERGE + exec)"
DESCRIPTION = """\
Turn on KSM merge-any for this process (prctl PR_SET_MEMORY_MERGE), then exec CMD in its place:
same pid, CMD's exit code and signals are its own. Every compatible mapping of CMD and of its
children becomes mergeable. Needs Linux 6.7+ (6.4-6.6 have the prctl but drop it at exec); no
privilege on current kernels (some kernels or security policies want CAP_SYS_RESOURCE). ksmd
must be running (udedup set run=1) for anything to merge.

exit codes: CMD's own; 127 CMD not found; 126 CMD not executable; udedup's codes before the exec.

example:
  udedup run -- python3 -m http.server
"""
ORDER = 40

log = logging.getLogger(__name__)

#: Before 6.7 the merge-any flag lived on the mm and was lost at exec.
INHERIT_ACROSS_EXEC = (6, 7)


def add_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="exec even when the kernel version says the flag will not survive exec "
                             "(for kernels with the fix backported)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD ARGS",
                        help="the command to run (put -- before it if it starts with '-')")


def run(args) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given: udedup run [--] CMD ARGS...")
    version = kernel_version()
    enable_process_merge()
    if version < INHERIT_ACROSS_EXEC and not args.force:
        raise KsmUnavailableError(
            f"kernel {os.uname().release} drops PR_SET_MEMORY_MERGE at exec (inherited from Linux "
            f"6.7): {cmd[0]} would run without KSM; use a newer kernel, or --force if the fix is "
            "backported")
    exec_defaults()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError as err:
        raise UdedupError(f"{cmd[0]}: command not found", exit_code=127) from err
    except PermissionError as err:
        raise UdedupError(f"{cmd[0]}: permission denied (not executable?)", exit_code=126) from err
    except OSError as err:
        code = 126 if err.errno in (errno.ENOEXEC, errno.EISDIR, errno.ENOTDIR) else 127
        raise UdedupError(f"{cmd[0]}: cannot execute: {err.strerror}", exit_code=code) from err
    return 0  # pragma: no cover - execvp does not return
