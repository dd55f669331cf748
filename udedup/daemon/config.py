"""The daemon's configuration: one dataclass of defaults per TOML section, loaded with the precedence
defaults < file < environment (``UDEDUP_<SECTION>_<KEY>``) < command line (``--set section.key=value``).

Every key has its default, type, limits and help text in one place (the field metadata below);
``udedup.toml.example`` at the repository root is :func:`render_example` and lists every key at its
default. Unknown keys are warned about (a typo should not stop a host daemon from starting, but it
must not pass silently); a bad value raises :class:`ConfigError` naming where it came from and the key.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from .configvalues import convert, is_loopback, parse_address

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as _toml

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/udedup/udedup.toml"
_DOCUMENTED_PATH = DEFAULT_PATH   # what the example file says, whatever DEFAULT_PATH becomes in tests
ENV_PATH = "UDEDUP_CONFIG"
ENV_PREFIX = "UDEDUP_"



def _f(default, kind: str, help: str, *, lo=None, hi=None, choices=None):
    """A config field: ``kind`` is one of size, int, float, bool, str, choice, globs, regexes, uids."""
    meta = {"kind": kind, "help": help, "lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Candidates:
    """Which processes the daemon considers. Deny lists (exclude_*) always win."""

    names: list = _f([], "globs", "shell patterns on the process name (comm), e.g. \"qemu-*\"")
    cmdline: list = _f([], "regexes", "regular expressions searched in the command line (args joined by spaces)")
    exe: list = _f([], "globs", "shell patterns on the executable path")
    cgroups: list = _f([], "globs", "shell patterns on the cgroup v2 path, e.g. \"/machine.slice/*\"")
    uids: list = _f([], "uids", "if not empty, only processes whose real uid is listed")
    include_registered: bool = _f(
        True, "bool", "processes that already have KSM enabled (udedup run, madvise) are candidates "
        "even when no pattern matches")
    min_anon_rss: int = _f(64 << 20, "size", "minimum anonymous resident memory of a candidate", lo=0)
    exclude_names: list = _f([], "globs", "never these process names")
    exclude_cmdline: list = _f([], "regexes", "never these command lines")
    exclude_exe: list = _f([], "globs", "never these executables")
    exclude_cgroups: list = _f([], "globs", "never these cgroups")
    exclude_uids: list = _f([], "uids", "never these uids")


@dataclass
class Registration:
    """How worthwhile processes get registered with KSM."""

    allow_injection: bool = _f(
        False, "bool", "opt running processes in by making them call madvise/prctl through ptrace "
        "(udedup enable); if false only processes started under 'udedup run' or that register "
        "themselves are merged")
    inject_mode: str = _f("auto", "choice", "injection mode for whole-process registration",
                          choices=("auto", "prctl", "madvise"))
    granularity: str = _f(
        "ranges", "choice", "ranges: madvise only the address ranges the estimate predicts to save, "
        "so ksmd never scans the rest; process: the whole process (inject_mode)",
        choices=("ranges", "process"))
    range_gap: int = _f(2 << 20, "size", "join saving ranges closer than this (fewer, larger ranges)",
                        lo=0)
    max_ranges: int = _f(64, "int", "at most this many ranges per process (each becomes a mapping "
                         "of its own in the target)", lo=1, hi=4096)
    min_saving: int = _f(32 << 20, "size", "register only if the predicted saving is at least this", lo=0)
    min_saving_percent: float = _f(
        5.0, "float", "... and at least this percent of the process's scanned memory", lo=0.0, hi=100.0)


@dataclass
class Estimate:
    """The userspace estimator that decides what is worth merging before ksmd pays for it."""

    scan_budget: int = _f(256 << 20, "size", "estimator read budget per second (bytes/s, averaged)",
                          lo=1 << 20)
    passes: int = _f(2, "int", "passes per estimate (later ones find volatile pages and confirm "
                     "duplicates byte by byte)", lo=2, hi=10)
    pass_interval: float = _f(0.5, "float", "seconds between estimator passes", lo=0.0, hi=60.0)
    screen: bool = _f(True, "bool", "sample candidates first and read in full only those whose sample "
                      "could reach registration.min_saving (unique or volatile memory is not read "
                      "in full)")
    recheck: str = _f("candidates", "choice", "what later passes re-read: candidates (zero pages and "
                      "duplicate candidates, the only pages whose change alters the prediction) or all",
                      choices=("candidates", "all"))
    reestimate_seconds: float = _f(600.0, "float", "re-estimate a process after this many seconds",
                                   lo=1.0)
    confirm_pages: int = _f(1024, "int", "pages sampled per process after a full estimate (their "
                            "crc32c): a re-estimate whose sample reads back the same, with RssAnon grown "
                            "at most 1 %, keeps the last estimate instead of reading everything "
                            "again; 0: always estimate in full", lo=0, hi=1 << 20)
    confirm_max_seconds: float = _f(3600.0, "float", "a full estimate at least this often, "
                                    "whatever the sample says", lo=1.0)


@dataclass
class Ksmd:
    """How fast ksmd scans, and within what CPU budget."""

    cpu_budget_percent: float = _f(20.0, "float", "CPU for ksmd plus the daemon, percent of one CPU, "
                                   "averaged over cpu_budget_window", lo=0.1, hi=100.0)
    cpu_budget_window: float = _f(
        60.0, "float", "seconds the budget is averaged over: unspent budget (up to one window's "
        "worth) lets a fast scan burst (0: no averaging, never above the budget)", lo=0.0, hi=86400.0)
    burst_percent: float = _f(
        100.0, "float", "ksmd's CPU while bursting, percent of one CPU (flat out merges in seconds for "
        "the CPU of large slow batches: docs/results/bench_ksmd_rate.txt)", lo=0.1, hi=100.0)
    fast_scan_seconds: float = _f(
        5.0, "float", "target time for one full scan of registered memory while predicted saving is "
        "not yet realized", lo=0.1)
    slow_scan_seconds: float = _f(300.0, "float", "target full-scan time once the saving is realized",
                                  lo=1.0)
    fast_sleep_millisecs: int = _f(20, "int", "sleep_millisecs while scanning fast", lo=0, hi=10000)
    slow_sleep_millisecs: int = _f(200, "int", "sleep_millisecs while scanning slowly", lo=0, hi=60000)
    max_pages_to_scan: int = _f(100000, "int", "never set pages_to_scan above this", lo=1)
    min_batch_pages: int = _f(
        4000, "int", "scan at least this many pages per ksmd wake-up: sleep_millisecs grows to keep "
        "the rate (ksmd pays per wake-up: 500 pages per 20 ms cost 38 % more CPU than 5000 per "
        "200 ms for the same merge, docs/results/bench_ksmd_rate.txt)", lo=1)
    realized_percent: float = _f(
        95.0, "float", "slow down once realized savings reach this percent of the prediction",
        lo=1.0, hi=100.0)
    settle_scans: int = _f(3, "int", "full scans without saving growth after which merging counts "
                           "as settled (slow down even if short of the prediction)", lo=1, hi=100)
    stop_when_idle: bool = _f(True, "bool", "set run=0 (merged pages stay) when nothing is worth merging")
    use_zero_pages: str = _f("keep", "choice", "set use_zero_pages while running", choices=("keep", "on", "off"))


@dataclass
class Pressure:
    """Memory-pressure inputs: under pressure ksmd scans faster, still within the CPU budget."""

    mem_available_percent: float = _f(10.0, "float", "pressure when MemAvailable is below this percent "
                                      "of MemTotal", lo=0.0, hi=100.0)
    psi_some_avg10: float = _f(10.0, "float", "pressure when /proc/pressure/memory 'some avg10' is above "
                               "this (0 disables)", lo=0.0, hi=100.0)
    speedup: float = _f(4.0, "float", "scan-rate multiplier under pressure", lo=1.0, hi=1000.0)


@dataclass
class Metrics:
    """Prometheus text exposition."""

    address: str = _f("127.0.0.1:9847", "str", "HOST:PORT to serve /metrics on (empty: no metrics)")
    allow_non_loopback: bool = _f(False, "bool", "allow a non-loopback metrics address (exposes process "
                                  "names and memory figures to the network)")
    max_process_series: int = _f(50, "int", "per-process series at most: the processes with the largest "
                                 "saving first, the rest summed in one pid=\"other\" series", lo=0,
                                 hi=100000)
    per_cgroup: bool = _f(False, "bool", "export the exact saving per cgroup every round "
                          "(udedup_cgroup_saved_bytes; needs root: reads pagemap and kpageflags)")
    max_cgroup_series: int = _f(50, "int", "per-cgroup series at most: the cgroups saving most first, "
                                "the rest summed in one cgroup=\"other\" series", lo=0, hi=100000)


@dataclass
class Security:
    """Trust domains: KSM merges any identical registered pages, and a page shared by two tenants is
    a copy-on-write timing side channel between them. With domains on, the daemon registers only
    pages whose identical twins are in the same domain (see the README's threat model)."""

    trust_domains: str = _f(
        "none", "choice", "none: merge across everything; cgroup: a domain per cgroup v2 path (cut "
        "at cgroup_depth); uid: a domain per effective uid. With domains the daemon registers only "
        "each process's domain ranges (by injection, madvise: needs registration.granularity = "
        "\"ranges\" and an inject_mode other than prctl), unregisters registered pages whose content "
        "saves more in another domain, and audits the candidates' KSM frames every round, "
        "unregistering any frame mapped from two domains in the domain that maps it less",
        choices=("none", "cgroup", "uid"))
    cgroup_depth: int = _f(
        0, "int", "with trust_domains = cgroup, the domain is the first this many components of the "
        "cgroup path (0: the whole path; e.g. 3 gives one domain per pod under "
        "/kubepods.slice/kubepods-burstable.slice/...)", lo=0, hi=64)
    zero_pages_across_domains: bool = _f(
        True, "bool", "zero-filled pages may merge across domains (they carry no tenant data; the "
        "kernel's zero page is shared by everyone anyway); false treats them like any content (one "
        "winning domain, and the audit counts zero-filled KSM frames shared across domains)")


@dataclass
class Daemon:
    """The loop, the state file, and what happens to the knobs on exit."""

    interval: float = _f(10.0, "float", "seconds between policy rounds", lo=0.05, hi=3600.0)
    fast_interval: float = _f(1.0, "float", "seconds between rounds while ksmd scans fast (how soon "
                              "a realized saving slows it down)", lo=0.05, hi=3600.0)
    idle_interval: float = _f(60.0, "float", "seconds between rounds once nothing moved for 3 rounds "
                              "in slow or stopped mode; between them a cheap check every interval "
                              "(KSM's counters, new processes, the candidates' memory) calls a round "
                              "as soon as one moves; at most interval means no idle spacing",
                              lo=0.05, hi=3600.0)
    state_file: str = _f("/run/udedup/state.json", "str", "original knobs for crash recovery, and the "
                         "daemon's view for 'udedup status'")
    on_exit: str = _f("restore", "choice", "knobs the daemon changed, on SIGTERM/SIGINT",
                      choices=("restore", "leave"))
    ksm_root: str = _f("/sys/kernel/mm/ksm", "str", "KSM sysfs directory")
    procfs: str = _f("/proc", "str", "procfs mount")


SECTIONS: dict[str, type] = {"candidates": Candidates, "registration": Registration,
                             "estimate": Estimate, "ksmd": Ksmd, "pressure": Pressure,
                             "metrics": Metrics, "security": Security, "daemon": Daemon}


@dataclass
class Config:
    candidates: Candidates = field(default_factory=Candidates)
    registration: Registration = field(default_factory=Registration)
    estimate: Estimate = field(default_factory=Estimate)
    ksmd: Ksmd = field(default_factory=Ksmd)
    pressure: Pressure = field(default_factory=Pressure)
    metrics: Metrics = field(default_factory=Metrics)
    security: Security = field(default_factory=Security)
    daemon: Daemon = field(default_factory=Daemon)
    #: where each value came from (``"section.key" -> "file /etc/...``"), for messages and status
    sources: dict = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def all_keys() -> list[tuple[str, dataclasses.Field]]:
    return [(sec, f) for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _field(section: str, key: str) -> dataclasses.Field | None:
    cls = SECTIONS.get(section)
    if cls is None:
        return None
    return {f.name: f for f in dataclasses.fields(cls)}.get(key)


# --- loading --------------------------------------------------------------------------------------
def _apply(cfg: Config, section: str, key: str, value, source: str, from_text: bool,
           warn: Callable[[str], None], where_unknown: str) -> None:
    f = _field(section, key)
    if f is None:
        known = ", ".join(x.name for x in dataclasses.fields(SECTIONS[section]))
        warn(f"{where_unknown}: unknown key [{section}] {key}: ignored (known keys: {known})")
        return
    try:
        out = convert(f, value, from_text)
    except ValueError as err:
        raise ConfigError(f"{source}: [{section}] {key}: {err}", path=source, key=f"{section}.{key}") from None
    setattr(getattr(cfg, section), key, out)
    cfg.sources[f"{section}.{key}"] = source


def _read_file(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            return _toml.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found (pass --config PATH, or remove it "
                          f"to run on defaults)", path=path, key=None) from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read the configuration file (permission denied)",
                          path=path, key=None) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file", path=path, key=None) from None
    except _toml.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}", path=path, key=None) from None


def _check(cfg: Config) -> None:
    """Rules across keys, checked once everything is merged."""
    def fail(key, msg):
        src = cfg.sources.get(key, "defaults")
        sec, k = key.split(".")
        raise ConfigError(f"{src}: [{sec}] {k}: {msg}", path=src, key=key)

    if cfg.ksmd.fast_scan_seconds > cfg.ksmd.slow_scan_seconds:
        fail("ksmd.fast_scan_seconds", f"must not exceed slow_scan_seconds "
             f"({cfg.ksmd.slow_scan_seconds}), got {cfg.ksmd.fast_scan_seconds}")
    if cfg.metrics.address:
        try:
            host, _port = parse_address(cfg.metrics.address)
        except ValueError as err:
            fail("metrics.address", str(err))
        if not is_loopback(host) and not cfg.metrics.allow_non_loopback:
            fail("metrics.address", f"{host} is not a loopback address; metrics name processes and "
                 "their memory: set allow_non_loopback = true to serve them on the network anyway")
    if not cfg.daemon.state_file:
        fail("daemon.state_file", "must not be empty (crash recovery needs it)")
    if cfg.security.trust_domains != "none":
        # whole-process registration registers every page, foreign ones too: refused rather
        # than overridden, so that a config never means something else than it says
        td = f'trust_domains = "{cfg.security.trust_domains}"'
        if cfg.registration.granularity != "ranges":
            fail("registration.granularity", f'"{cfg.registration.granularity}" cannot keep trust '
                 f'domains apart (security.{td} registers page ranges only): set granularity = '
                 '"ranges" or trust_domains = "none"')
        if cfg.registration.inject_mode == "prctl":
            fail("registration.inject_mode", f'"prctl" registers whole processes, which cannot keep '
                 f'trust domains apart (security.{td}): set inject_mode = "auto" or "madvise", or '
                 'trust_domains = "none"')


def load_config(path: str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None,
                warn: Callable[[str], None] | None = None) -> Config:
    """Defaults < file < environment < ``overrides`` (``{"section.key": value}`` from the CLI).

    ``path`` None means ``$UDEDUP_CONFIG`` or else :data:`DEFAULT_PATH`, the latter silently skipped
    when absent; a path that was asked for explicitly must exist.
    """
    env = os.environ if env is None else env
    warn = warn or log.warning
    cfg = Config()
    if path is None and env.get(ENV_PATH):
        path = env[ENV_PATH]
    elif path is None and os.path.exists(DEFAULT_PATH):
        path = DEFAULT_PATH
    if path is not None:
        data = _read_file(path)
        for section, table in data.items():
            if section not in SECTIONS:
                warn(f"{path}: unknown section [{section}]: ignored (known: {', '.join(SECTIONS)})")
                continue
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section} must be a table ([{section}]), got {table!r}",
                                  path=path, key=section)
            for key, value in table.items():
                _apply(cfg, section, key, value, f"file {path}", False, warn, path)
        cfg.sources["_file"] = path

    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == ENV_PATH:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # other UDEDUP_* variables belong to other parts of udedup
        _apply(cfg, section, rest[len(section) + 1:], env[name], f"environment {name}", True, warn,
               f"environment {name}")

    for dotted, value in (overrides or {}).items():
        section, dot, key = dotted.partition(".")
        if not dot or _field(section, key) is None:
            raise ConfigError(f"--set {dotted}: unknown key; keys are SECTION.KEY, e.g. "
                              "ksmd.cpu_budget_percent (see udedup.toml.example)", path="--set", key=dotted)
        _apply(cfg, section, key, value, f"command line ({dotted})", isinstance(value, str), warn, "--set")
    _check(cfg)
    return cfg


# --- the example file -----------------------------------------------------------------------------
def _toml_value(f: dataclasses.Field, value) -> str:
    kind = f.metadata["kind"]
    if kind == "size":
        for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value and value % mult == 0:
                return f'"{value // mult} {unit}"'
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(f, v) if not isinstance(v, str) else f'"{v}"' for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def render_example() -> str:
    """The text of ``udedup.toml.example``: every key at its default, with its help."""
    lines = ["# udedup daemon configuration: every key at its default.",
             f"# Default location {_DOCUMENTED_PATH} (or --config PATH, or ${ENV_PATH}).",
             "# Precedence: defaults < this file < environment UDEDUP_<SECTION>_<KEY> < --set SECTION.KEY=VALUE.",
             "# Sizes accept bytes or units: 4096, \"64 MiB\", \"1G\" (binary units).",
             ""]
    defaults = Config()
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        doc = " ".join((cls.__doc__ or "").split())
        if doc:
            lines.append(f"# {doc}")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            extra = ""
            if meta["choices"]:
                extra = f" ({' | '.join(meta['choices'])})"
            lines.append(f"# {meta['help']}{extra}")
            lines.append(f"{f.name} = {_toml_value(f, getattr(getattr(defaults, section), f.name))}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m udedup.config > udedup.toml.example
    print(render_example(), end="")
