"""``udedup`` entry point: builds the parser from the command modules, configures logging (the only
place that does), maps every :class:`UdedupError` to a one-line message and its exit code.

Each module in ``udedup/commands/`` is one subcommand: it defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Every subcommand gets ``--json``, ``-v`` and
``-q`` from here.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

#: thread-count variables of the BLAS builds numpy ships with (OpenBLAS) or may link (MKL, OpenMP)
_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _import_numpy_single_threaded() -> None:
    """numpy's OpenBLAS starts one busy-waiting thread per core when numpy is imported: about
    0.08 CPU-s here for linear algebra udedup never does, and the daemon's CPU counts against its
    budget. The variables are set for that import only, so the processes we start (workloads,
    ``udedup run``) still get the user's environment."""
    if "numpy" in sys.modules:
        return
    ours = [v for v in _BLAS_THREAD_VARS if v not in os.environ]
    for var in ours:
        os.environ[var] = "1"
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass    # reported by whichever command needs it
    finally:
        for var in ours:
            os.environ.pop(var, None)


_import_numpy_single_threaded()

from . import __version__, commands  # noqa: E402
from .errors import UdedupError  # noqa: E402

log = logging.getLogger("udedup")

EXIT_INTERRUPTED = 130


def _command_modules():
    mods = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"{commands.__name__}.{info.name}"))
    return sorted(mods, key=lambda m: getattr(m, "ORDER", 50))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, exit code 2, like every other usage error of ours
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat)")
    common.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")

    parser = _Parser(prog="udedup", description="Measure, predict and control Linux KSM.")
    parser.add_argument("--version", action="version", version=f"udedup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _configure_logging(args) -> None:
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.DEBUG if getattr(args, "verbose", 0) >= 2 else
        logging.INFO if getattr(args, "verbose", 0) == 1 else logging.WARNING)
    logging.basicConfig(level=level, format="udedup: %(levelname)s: %(message)s", stream=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(args)
    try:
        return int(args._run(args) or 0)
    except UdedupError as err:
        print(f"udedup: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("udedup: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # reader went away (udedup status | head): not an error of ours
        return 0


if __name__ == "__main__":
    sys.exit(main())
