"""``udedup ab``: run a workload with a KSM knob off and on, repeatedly, and say what changed."""
from __future__ import annotations

import logging
import os
import sys
import time

from ..errors import KsmTimeout, UsageError, WorkloadError
from ..console import Progress, print_json

NAME = "ab"
HELP = "A/B test a KSM knob (default: use_zero_pages off vs on) on a workload, with statistics"
DESCRIPTION = """\
Run the same workload under each arm's KSM settings, several times each, in an order drawn from the
seed, and report per arm the median and quartiles of the memory saved, ksmd CPU time, time to
settle and copy-on-write cost, the difference between arms with a bootstrap 95 % interval, and a
one-line verdict. Every trial starts from nothing (run=2 unmerges every page on the machine), and
every knob is restored at the end, also after Ctrl-C or SIGTERM. Needs root.

Without arguments: the built-in 'mixed' workload (256 MiB), use_zero_pages=0 vs 1, 3 trials per arm;
about 20-40 s on 2 cores. A report folder (result.json, trials.csv, series.csv, summary.txt, ab.png)
is written to ./udedup-ab-<time>/ unless --out is given or --no-out.

workloads (one of):
  --preset NAME [--size 256M]     built-in: mixed, zero-heavy, vm-like, no-zero (the control)
  --zero/--dup/--unique/--volatile FRACTION, --groups 2,4,16, --volatile-hz HZ   tune the built-in
  --cmd "PROG ARGS"                any command, run with process-wide merging (like 'udedup run');
                                   --ready-file PATH or --ready-delay SEC says when it has its memory
  --pid PID[,PID...]               processes already running with mergeable memory, e.g. running
                                   VMs (each trial unmerges, sets the arm, merges and measures them;
                                   never written to, never stopped)
  --preset vms, --vms N            the VM lab: N QEMU guests (default 2) from a minimal image built
                                   on first use from Debian packages (linux-image-amd64,
                                   busybox-static; cached); --vm-memory and the guest content
                                   options size them; KVM when it runs guests, else TCG (said in the
                                   report)

examples:
  udedup ab
  udedup ab --preset vm-like --size 1G --trials 5 --out report/
  udedup ab --size 64M --arm slow:pages_to_scan=1000 --arm fast:pages_to_scan=8000 --fix sleep_millisecs=20
  udedup ab --cmd "python3 myapp.py" --ready-file /tmp/ready --trials 4 --json
  udedup ab --preset vms --trials 3
  udedup ab --vms 4 --vm-memory 256M --vm-shared 64M --trials 5
  udedup ab --pid $(pgrep -d, qemu-system) --trials 4

The run holds the machine's KSM experiment lock (/tmp/udedup-ksm.lock, which udedup's KSM tests
and experiment scripts take too) from its first knob read to the restore: while another holder has
it, the command says so and waits (--lock-timeout SEC to give up; --no-lock when the caller holds
it). Trials that did not settle, or during which someone else changed a knob, are left out of the
summary.

exit codes: 0 done; 2 bad arguments; 3 no KSM; 4 not root; 5 the experiment lock stayed busy past
--lock-timeout; 6 bad knob value; 7 no verdict: an arm has no usable trial (each one did not settle
or was disturbed); 11 a workload failed or died (trials finished so far are still written); 130
interrupted (likewise).
"""
ORDER = 30

log = logging.getLogger(__name__)

#: The preset that boots the VM lab's guests instead of the synthetic workload.
VM_PRESET = "vms"


def add_arguments(parser) -> None:
    w = parser.add_argument_group("workload")
    w.add_argument("--preset", default=None,
                   help="built-in workload mix (default: mixed), or vms for the VM lab")
    w.add_argument("--size", default=None, help="built-in workload size (default: 256M)")
    w.add_argument("--zero", type=float, help="fraction of zero pages")
    w.add_argument("--dup", type=float, help="fraction of duplicate pages")
    w.add_argument("--unique", type=float, help="fraction of unique pages (default: the rest)")
    w.add_argument("--volatile", type=float, help="fraction of volatile (constantly rewritten) pages")
    w.add_argument("--groups", help="duplicate group sizes to draw from, e.g. 2,4,16,64")
    w.add_argument("--volatile-hz", type=float, help="rewrites of the volatile pages per second")
    w.add_argument("--cmd", help="run this command as the workload (process-wide merging)")
    w.add_argument("--ready-file", help="with --cmd: the command creates this file when ready")
    w.add_argument("--ready-delay", type=float, default=None,
                   help="with --cmd: seconds to wait after start (default 1, or 0 with --ready-file); "
                        "with VMs: instead of the ready marker (for a --vm-initrd without it)")
    w.add_argument("--ready-timeout", type=float, default=None,
                   help="seconds a workload may take to become ready (default 120; VMs 300)")
    w.add_argument("--pid", action="append", default=[],
                   help="observe these already-mergeable processes (repeat or comma-separate)")
    v = parser.add_argument_group("virtual machines (--preset vms, --vms N)")
    v.add_argument("--vms", type=int, default=None, metavar="N",
                   help="boot N guests of the VM lab (--preset vms: 2)")
    v.add_argument("--vm-memory", default="384M", help="RAM per guest (default 384M)")
    v.add_argument("--vm-shared", default="96M",
                   help="files every guest holds, byte for byte (default 96M)")
    v.add_argument("--vm-unique", default="48M", help="data unique to each guest (default 48M)")
    v.add_argument("--vm-zero", default="32M",
                   help="memory each guest writes and frees, left zero (default 32M; the initrd the "
                        "guest frees after unpacking it is zeroed too)")
    v.add_argument("--vm-volatile", default="1M",
                   help="memory each guest rewrites every second (default 1M)")
    v.add_argument("--vm-accel", default="auto", choices=("auto", "kvm", "tcg"),
                   help="accelerator (default auto: KVM if a probe guest boots under it, else TCG)")
    v.add_argument("--vm-kernel", metavar="PATH",
                   help="boot this kernel instead of Debian's (fetched from linux-image-amd64)")
    v.add_argument("--vm-initrd", metavar="PATH",
                   help="boot this initramfs; its init prints UDEDUP-VM-READY on the serial "
                        "console when ready, or give --ready-delay")
    a = parser.add_argument_group("arms and knobs")
    a.add_argument("--arm", action="append", default=[], metavar="NAME:KNOB=V[,KNOB=V]",
                   help="an arm; give two or more (default: off:use_zero_pages=0 on:use_zero_pages=1)")
    a.add_argument("--fix", action="append", default=[], metavar="KNOB=V",
                   help="pin a knob in every arm (on top of the defaults advisor_mode=none "
                        "pages_to_scan=4000 sleep_millisecs=10 smart_scan=0)")
    a.add_argument("--no-default-fix", action="store_true",
                   help="pin only the --fix knobs, not the defaults")
    r = parser.add_argument_group("run")
    r.add_argument("--trials", type=int, default=3, help="trials per arm (default 3)")
    r.add_argument("--seed", type=int, default=None, help="seed of the arm order (default: random)")
    r.add_argument("--settle-timeout", type=float, default=60.0,
                   help="seconds to wait for merging to settle per trial (default 60)")
    r.add_argument("--settle-tolerance", type=float, default=None, metavar="FRACTION",
                   help="how much the saving may still move per full scan, as a fraction of it, for "
                        "a trial to count as settled (default: the settle detector's, 0.002)")
    r.add_argument("--sample-interval", type=float, default=0.1,
                   help="seconds between counter samples (default 0.1)")
    r.add_argument("--cow-sample", type=int, default=4096,
                   help="merged pages written to time copy-on-write (default 4096, 0 = skip)")
    r.add_argument("--lock-timeout", type=float, default=None, metavar="SEC",
                   help="give up (exit 5) when the KSM experiment lock is still busy after SEC "
                        "seconds (default: wait as long as it takes)")
    r.add_argument("--no-lock", action="store_true",
                   help="do not take the KSM experiment lock (the caller holds it)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=None, help="report folder (default ./udedup-ab-<time>)")
    o.add_argument("--no-out", action="store_true", help="write no report folder")
    o.add_argument("--no-figure", action="store_true", help="skip the PNG figure")


def parse_knobs(text: str, what: str) -> dict[str, str]:
    from ..ksm.thp import canonical
    knobs = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise UsageError(f"{what} {text!r}: expected KNOB=VALUE[,KNOB=VALUE], e.g. use_zero_pages=1")
        # one spelling per THP knob (thp.khugepaged.defrag is thp.khugepaged/defrag), as recorded
        knobs[canonical(name.strip())] = value.strip()
    if not knobs:
        raise UsageError(f"{what} {text!r} sets no knob")
    return knobs


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """``"on:use_zero_pages=1,pages_to_scan=100"`` -> ``("on", {...})``; no name: the knobs are it."""
    name, colon, rest = text.partition(":")
    if colon and "=" not in name:
        if not name.strip():
            raise UsageError(f"--arm {text!r}: empty arm name before ':'")
        return name.strip(), parse_knobs(rest, "--arm")
    return text.strip(), parse_knobs(text, "--arm")


def build_arms(specs) -> dict[str, dict[str, str]] | None:
    if not specs:
        return None
    arms = {}
    for spec in specs:
        name, knobs = parse_arm(spec)
        if name in arms:
            raise UsageError(f"two arms are named {name!r}")
        arms[name] = knobs
    if len(arms) < 2:
        raise UsageError("give at least two --arm options (e.g. --arm off:use_zero_pages=0 "
                         "--arm on:use_zero_pages=1)")
    return arms


def build_workload(args):
    from ..ab.synthetic import PRESETS, SyntheticSpec, parse_size
    from ..ab.workloads import CommandWorkload, PidWorkload, SyntheticWorkload

    custom = [args.zero, args.dup, args.unique, args.volatile, args.groups, args.volatile_hz]
    vms = args.preset == VM_PRESET or args.vms is not None
    synthetic = (bool(args.preset) and not vms) or args.size is not None or any(
        v is not None for v in custom)
    chosen = [bool(args.cmd), bool(args.pid), synthetic, vms]
    if sum(chosen) > 1:
        raise UsageError("choose one workload: the built-in one (--preset/--size/fractions), --cmd, "
                         "--pid, or VMs (--preset vms / --vms N)")
    if (args.ready_file and not args.cmd) or (args.ready_delay is not None and not (args.cmd or vms)):
        raise UsageError("--ready-file and --ready-delay apply to --cmd only (and --ready-delay to "
                         "VMs: --preset vms, --vms N)")
    timeout = args.ready_timeout
    if vms:
        return build_vm_workload(args)
    timeout = 120.0 if timeout is None else timeout
    if args.cmd:
        delay = args.ready_delay if args.ready_delay is not None else (0.0 if args.ready_file else 1.0)
        return CommandWorkload(args.cmd, ready_file=args.ready_file, ready_delay=delay,
                               ready_timeout=timeout)
    if args.pid:
        from .scan import parse_pids
        return PidWorkload(parse_pids(p for item in args.pid for p in item.split(",")))
    name = args.preset or "mixed"
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}, {VM_PRESET}")
    params = dict(PRESETS[name])
    if any(v is not None for v in custom):
        name = f"{name}+custom"
        for key, value in (("zero", args.zero), ("duplicate", args.dup), ("volatile", args.volatile)):
            if value is not None:
                params[key] = value
        if args.unique is not None:
            params["unique"] = args.unique
        elif any(v is not None for v in (args.zero, args.dup, args.volatile)):
            params["unique"] = round(1.0 - params["zero"] - params["duplicate"] - params["volatile"], 9)
        if args.groups:
            try:
                params["group_sizes"] = tuple(int(g) for g in args.groups.split(",") if g.strip())
            except ValueError:
                raise UsageError(f"--groups {args.groups!r}: expected sizes like 2,4,16") from None
        if args.volatile_hz is not None:
            params["volatile_hz"] = args.volatile_hz
    spec = SyntheticSpec(size=parse_size(args.size or "256M"), name=name, **params)
    return SyntheticWorkload(spec, ready_timeout=timeout)   # it validates the spec


def _vm_size(text: str, option: str, unit: int) -> int:
    from ..units import parse_size as parse_bytes
    try:
        value = parse_bytes(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a size; write e.g. 384M or 1G") from None
    if value % unit:
        raise UsageError(f"{option} {text!r}: give a whole number of {'MiB' if unit >> 20 else 'KiB'}")
    return value


def build_vm_workload(args):
    """The VM lab from ``--preset vms`` / ``--vms N`` and the ``--vm-*`` options."""
    from ..ab.vms import VmSpec, VmWorkload

    mib = 1 << 20
    spec = VmSpec(guests=2 if args.vms is None else args.vms,
                  memory=_vm_size(args.vm_memory, "--vm-memory", mib),
                  shared=_vm_size(args.vm_shared, "--vm-shared", 4096),
                  unique=_vm_size(args.vm_unique, "--vm-unique", mib),
                  zero=_vm_size(args.vm_zero, "--vm-zero", mib),
                  volatile=_vm_size(args.vm_volatile, "--vm-volatile", 1024),
                  accel=args.vm_accel, kernel=args.vm_kernel, initrd=args.vm_initrd)
    timeout = 300.0 if args.ready_timeout is None else args.ready_timeout
    return VmWorkload(spec, ready_timeout=timeout, ready_delay=args.ready_delay)   # validates


def describe_vms(result) -> str | None:
    """One line on the guests: which accelerator ran and why, the kernel, boot-to-ready times."""
    workload = result.config.get("workload", {})
    if workload.get("kind") != "vms":
        return None
    image = workload.get("image") or {}
    kernel = image.get("kernel_package") or image.get("kernel")
    boot = [t.populate_seconds for t in result.trials if t.populate_seconds is not None]
    span = f"{min(boot):.1f}-{max(boot):.1f} s" if boot else "-"
    return (f"VM lab: accelerator {workload.get('accelerator')} ({workload.get('accelerator_reason')}); "
            f"kernel {kernel}; all guests ready in {span} per trial")


def run(args) -> int:
    from ..ab.engine import DEFAULT_ARMS, default_fixed, run_ab
    from ..ab.records import ABInterrupted
    from ..ab.report import describe_run, format_table, write_json, write_report, write_trials_csv
    from ..ksm import Ksm, experiment_lock

    if args.trials < 1:
        raise UsageError(f"--trials {args.trials}: need at least 1 trial per arm")
    if args.no_out and args.out:
        raise UsageError("--out and --no-out contradict each other")
    if args.lock_timeout is not None and (args.no_lock or not args.lock_timeout >= 0):
        raise UsageError(f"--lock-timeout {args.lock_timeout:g}: give seconds >= 0, and not "
                         "together with --no-lock")
    arms = build_arms(args.arm)
    fixed_extra = {}
    for item in args.fix:
        fixed_extra.update(parse_knobs(item, "--fix"))
    workload = build_workload(args)
    tolerance = {}
    if args.settle_tolerance is not None:
        if not 0 <= args.settle_tolerance < 1:
            raise UsageError(f"--settle-tolerance {args.settle_tolerance:g}: give a fraction in [0, 1) "
                             "of the saving per full scan, e.g. 0.002")
        tolerance["settle_tolerance"] = args.settle_tolerance
    ksm = Ksm()   # no KSM: one line, exit 3, before anything starts
    if args.no_default_fix:
        fixed = fixed_extra
    else:
        varied = set(next(iter((arms or DEFAULT_ARMS).values())))
        fixed = {**default_fixed(varied, ksm.knob_names()), **fixed_extra}

    out = None if args.no_out else (args.out or f"udedup-ab-{time.strftime('%Y%m%d-%H%M%S')}")
    progress = Progress(enabled=None if not args.quiet else False)

    def on_trial(record, result):
        # keep what is finished on disk: a SIGKILL of the harness still leaves the data
        if out:
            os.makedirs(out, exist_ok=True)
            write_json(result, os.path.join(out, "result.json"))
            write_trials_csv(result, os.path.join(out, "trials.csv"))

    def waiting(line):
        if not args.quiet:
            progress.done()
            print(f"udedup ab: {line}; --lock-timeout SEC gives up", file=sys.stderr, flush=True)

    # close-on-exec: neither the workloads nor the VMs inherit the lock's descriptor
    lock = experiment_lock(enabled=not args.no_lock, timeout=args.lock_timeout, on_wait=waiting,
                           procfs=ksm.procfs)
    interrupted = None
    try:
        result = run_ab(workload, arms=arms, fixed=fixed, trials=args.trials, seed=args.seed,
                        settle_timeout=args.settle_timeout, sample_interval=args.sample_interval,
                        cow_sample=args.cow_sample, ksm=ksm, progress=progress.update,
                        on_trial=on_trial, lock=lock, **tolerance)
    except ABInterrupted as err:
        interrupted, result = err, err.result
    finally:
        progress.done()
    paths = {}
    if out and (result.trials or not interrupted):
        paths = write_report(result, out, figure=not args.no_figure)
    if args.json:
        doc = result.to_dict(series=False)
        doc["report"] = paths
        print_json(doc)
    elif not args.quiet:
        print(describe_run(result))
        vm_line = describe_vms(result)
        if vm_line:
            print(vm_line)
        print(format_table(result))
        if paths:
            print(f"report: {out}/ ({', '.join(os.path.basename(p) for p in paths.values())})")
    if interrupted is not None:
        raise interrupted
    bad = [t for t in result.trials if t.status in ("workload-died", "workload-failed")]
    if bad:
        print(f"udedup: error: the workload failed or died in {len(bad)} of {len(result.trials)} "
              f"trials (first: {bad[0].error})", file=sys.stderr)
        return WorkloadError.exit_code
    reason = no_verdict_reason(result)
    if reason:
        print(f"udedup: error: {reason}", file=sys.stderr)
        return KsmTimeout.exit_code
    return 0


def no_verdict_reason(result) -> str | None:
    """One line when an arm has no usable trial (so there is no verdict), saying why; else None.

    Exit 7 (:class:`KsmTimeout`, "did not settle") goes with it: no trial of that arm gave a
    settled measurement under the arm's knobs, and it is a condition of the machine, not of the
    arguments (a busier ksmd, another tool writing knobs), worth a retry."""
    arms = result.summary.get("arms", {})
    empty = [name for name, arm in arms.items() if arm.get("n") == 0 and arm.get("trials")]
    if not empty:
        return None
    left = [t for t in result.trials if t.arm in empty]
    timed_out = sum(t.status == "timeout" for t in left)
    disturbed = sum(t.status == "disturbed" for t in left)
    why = []
    if timed_out:
        why.append(f"{timed_out} did not settle within {result.config.get('settle_timeout'):g} s "
                   "(raise --settle-timeout or pages_to_scan)")
    if disturbed:
        why.append(f"{disturbed} disturbed: someone else changed KSM knobs mid-trial (first: "
                   f"{next(t.error for t in left if t.status == 'disturbed')})")
    return (f"no verdict: every trial of arm {', '.join(repr(n) for n in empty)} was left out: "
            + "; ".join(why or [f"{len(left)} unusable"]))
