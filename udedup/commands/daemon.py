"""``udedup daemon``: the host daemon (foreground, for systemd Type=notify)."""
from __future__ import annotations

import json
import logging

from ..errors import UsageError

NAME = "daemon"
HELP = "run the host daemon: estimate, register what is worth it, tune ksmd, export metrics"
DESCRIPTION = """\
Run in the foreground (systemd Type=notify): discover candidate processes, estimate what KSM would
save for them, register the worthwhile ones, and set ksmd's speed from measured yield: fast while
predicted saving is unrealized, slow once it is realized, stopped when nothing is worth merging,
faster under memory pressure, always within a CPU budget.

Logging (stderr, the journal under systemd): every decision with its reason at the daemon's default
level, INFO: registrations (which process, the predicted saving, how), skips and why, ksmd's speed
(run, pages_to_scan, sleep_millisecs and why), knobs changed by someone else (WARNING). A decision is
logged when it changes, and one subject at most once a minute (the latest one when the minute ends;
the others at DEBUG). -q: warnings and errors only; -v: detail (DEBUG: estimate timings, held-back
decisions).

Trust domains (security.trust_domains = "cgroup" or "uid"): KSM merges any identical registered
pages, and a page shared by two tenants is a copy-on-write timing side channel between them. With
domains on, a content found in several domains is registered in one of them only (where it saves
most): the daemon registers each process's domain ranges by injection (madvise), unregisters
registered pages whose content saves more in another domain, and audits the candidates' KSM frames
every round, unregistering a frame mapped from two domains in the domain that maps it less. With
domains off and candidates in two or more cgroups or uids, the daemon warns once at start (and on
reload). metrics.per_cgroup reads each process's exact saving every round (per-cgroup metrics).

Configuration: /etc/udedup/udedup.toml (or --config), then UDEDUP_<SECTION>_<KEY> environment
variables, then --set SECTION.KEY=VALUE; udedup.toml.example lists every key at its default.

Signals: SIGHUP reloads the configuration; SIGTERM/SIGINT restore the knobs the daemon changed
(daemon.on_exit = "restore") and exit 0. After a crash or SIGKILL the next start restores them
from the state file (daemon.state_file).

exit codes: 0 stopped by a signal or --once done; 2 bad arguments; 3 no KSM; 4 no permission (the
startup self-test writes each knob to its current value); 10 bad configuration; 12 another daemon
runs or the state file is unusable.

examples:
  udedup daemon --dry-run --once             # what would it do here, now?
  udedup daemon --set candidates.names='qemu-*' --set registration.allow_injection=true
  udedup daemon --allow-injection --set security.trust_domains=cgroup   # merge inside cgroups only
"""
ORDER = 70

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help="TOML configuration file (default $UDEDUP_CONFIG, else "
                             "/etc/udedup/udedup.toml if it exists)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key (repeatable); lists are comma-separated")
    parser.add_argument("--dry-run", action="store_true",
                        help="decide and log, change nothing (no knob, registration or state file)")
    parser.add_argument("--once", action="store_true",
                        help="run one round and exit; the knobs stay as decided (cron-style use)")
    parser.add_argument("--interval", type=float, metavar="SECONDS", help="= --set daemon.interval=")
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        help='= --set metrics.address= ("" disables metrics)')
    parser.add_argument("--state-file", metavar="PATH", help="= --set daemon.state_file=")
    parser.add_argument("--allow-injection", action="store_true",
                        help="= --set registration.allow_injection=true")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (with --json: as JSON) and exit")


def _overrides(args) -> dict:
    out = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. "
                             "--set ksmd.cpu_budget_percent=10")
        out[key.strip()] = value
    if args.interval is not None:
        out["daemon.interval"] = str(args.interval)
    if args.metrics_address is not None:
        out["metrics.address"] = args.metrics_address
    if args.state_file is not None:
        out["daemon.state_file"] = args.state_file
    if args.allow_injection:
        out["registration.allow_injection"] = "true"
    return out


def log_level(args) -> int:
    """The daemon's own default: its decisions show without -v (other commands warn only)."""
    if getattr(args, "quiet", False):
        return logging.WARNING
    return logging.DEBUG if getattr(args, "verbose", 0) else logging.INFO


def run(args) -> int:
    # on the "udedup" logger, put back afterwards: the CLI's handler passes what this level lets by
    logger = logging.getLogger("udedup")
    before = logger.level
    logger.setLevel(log_level(args))
    try:
        return _run(args)
    finally:
        logger.setLevel(before)


def _run(args) -> int:
    from ..daemon.config import load_config
    from ..daemon.loop import Daemon, Options

    overrides = _overrides(args)

    def loader():
        return load_config(args.config, overrides=overrides)

    cfg = loader()
    if args.print_config:
        if args.json:
            print(json.dumps(cfg.as_dict(), indent=2))
        else:
            for section, values in cfg.as_dict().items():
                print(f"[{section}]")
                for key, value in values.items():
                    src = cfg.sources.get(f"{section}.{key}", "default")
                    print(f"{key} = {json.dumps(value)}    # {src}")
                print()
        return 0
    return Daemon(cfg, loader=loader, options=Options(dry_run=args.dry_run, once=args.once)).run()
