#!/usr/bin/env python3
"""The VM study: use_zero_pages off/on x THP (thp.enabled madvise/never) on live QEMU guests of the
VM lab, per guest count, one report folder:

  OUT/README.md          method, machine, the table per cell, the contrasts, the recommendation data
  OUT/overview.csv       one row per cell (guests x THP x use_zero_pages): medians, ranges, n
  OUT/contrasts.csv      uzp on - off within each THP setting, never - madvise within each uzp,
                         bootstrap 95 % CI of the difference of medians
  OUT/overview.png       every trial's value per cell, for the key metrics
  OUT/<N>guests/         the full `udedup ab` report of that guest count (result.json, trials.csv,
                         series.csv, summary.txt, ab.png) and hugepages.json (per trial: the guests'
                         AnonHugePages before ksmd ran and once merging settled)

One run_ab per guest count whose four arms set both knobs: the engine applies an arm's knobs with
ksmd stopped BEFORE it starts the workload, so every trial's guests boot (and fault their RAM in)
under that trial's thp.enabled, and the four cells interleave in seeded random order. The guests'
memory is not the harness's to write, so it measures no copy-on-write cost on VMs (see the synthetic
study, docs/results/ab_use_zero_pages/). Needs root, qemu-system-x86 and the VM lab image (built on
first use); holds the experiment lock (udedup.ksm.LOCK_PATH) for each run; every knob is restored.

  sudo python3 scripts/ab_vms.py --guests 2 --trials 3 --out docs/results/ab_vms
  python3 scripts/ab_vms.py --plan --guests 2,4        # the cells and trial order, no boot
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import statistics
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from udedup.ab.engine import default_fixed, run_ab  # noqa: E402
from udedup.ab.records import ABInterrupted, ABResult  # noqa: E402
from udedup.ab.report import format_table, write_report  # noqa: E402
from udedup.ab.stats import (SUMMARISED_STATUS, bootstrap_diff, fmt_knobs, median_iqr,  # noqa: E402
                             trial_order)
from udedup.ab.synthetic import parse_size  # noqa: E402
from udedup.ab.vms import VmSpec, VmWorkload  # noqa: E402
from udedup.commands.ab import parse_knobs  # noqa: E402
from udedup.errors import ProcessError, UdedupError, UsageError  # noqa: E402
from udedup.host.maps import read_mappings  # noqa: E402
from udedup.ksm import LOCK_PATH, Ksm, experiment_lock  # noqa: E402
from udedup.signals import sigterm_raises  # noqa: E402

log = logging.getLogger("ab_vms")
MIB = 1 << 20
THP_SETTINGS = ("always", "madvise", "never")
#: (key, label, scale, format) of the per-cell table and figure; values per trial (cell_values)
CELL_METRICS = (("saved_bytes", "real saving, MiB", 1 / MIB, "{:.1f}"),
                ("counter_bytes", "KSM counters (sharing + zero), MiB", 1 / MIB, "{:.1f}"),
                ("general_profit", "general_profit, MiB", 1 / MIB, "{:.1f}"),
                ("zero_mapped_pages", "zero pages mapped outside KSM", 1, "{:,.0f}"),
                ("ksmd_cpu_seconds", "ksmd CPU to settle, s", 1, "{:.2f}"),
                ("settle_seconds", "time to settle, s", 1, "{:.1f}"),
                ("thp_before", "guests' THPs before merging", 1, "{:,.0f}"),
                ("thp_lost", "huge pages lost (THPs split)", 1, "{:,.0f}"))
#: The method paragraph of the study's README.
METHOD = textwrap.dedent("""\
    Method: per guest count, one `run_ab` of the VM lab (`udedup.ab.vms.VmWorkload`: TCG guests,
    Debian kernel, busybox initramfs whose tmpfs holds files common to every guest, unique data,
    zero-filled freed memory and 1 MiB rewritten every second; QEMU registers guest RAM with KSM
    and asks for THP) with four arms, use_zero_pages 0/1 x thp.enabled, interleaved in seeded
    random order. Each trial unmerges everything, sets the arm's knobs with ksmd stopped, boots
    fresh guests under them, starts ksmd and waits for the plateau (no trend of the KSM counters
    over `stable_scans` full scans), then kills the guests. *Real saving* is the change of the
    true saving (KSM counters plus mergeable pages mapped to the zero page outside KSM) from the
    trial's start, the median of the samples of the last `stable_scans` full scans; *KSM
    counters* is (pages_sharing + ksm_zero_pages) x page size at the plateau, general_profit the
    same less 64 B per rmap item. *Huge pages lost*: the guests' AnonHugePages (smaps of their
    mergeable mappings) when ready minus once settled, in 2 MiB pages. No COW cost: the harness
    does not write guest memory.""")
#: per trial in overview.csv only: the engine's saved_bytes (its plateau median; see plateau_truth)
EXTRA_METRICS = (("engine_saved_bytes", "engine's saved_bytes, MiB", 1 / MIB, "{:.1f}"),)


def arm_name(uzp: int, thp: str) -> str:
    return f"uzp{uzp}-{thp}"


def study_arms(thps) -> dict[str, dict]:
    return {arm_name(u, t): {"use_zero_pages": u, "thp.enabled": t} for t in thps for u in (0, 1)}


# --- huge pages: the guests' AnonHugePages before ksmd runs and once merging settled --------------
def anon_huge_bytes(pids) -> int:
    """AnonHugePages of the mergeable mappings (guest RAM) of ``pids``, from smaps."""
    total = 0
    for pid in pids:
        try:
            total += sum(m.anon_huge for m in read_mappings(pid) if m.registered)
        except ProcessError:
            pass
    return total


class _WatchedRunning:
    def __init__(self, inner, entry: dict):
        self._inner, self._entry = inner, entry

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def stop(self, grace: float = 2.0) -> None:
        if "after" not in self._entry and self._inner.alive():
            self._entry["after"] = anon_huge_bytes(self._inner.pids())
        self._inner.stop(grace)


class HugePageWatch:
    """A workload that is ``inner`` plus, per started run, the guests' AnonHugePages when they are
    ready (ksmd stopped, nothing merged) and when the engine stops them (merging settled)."""

    def __init__(self, inner):
        self._inner = inner
        self.entries: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def start(self, seed: int = 0):
        running = self._inner.start(seed)
        entry = {"seed": seed, "before": anon_huge_bytes(running.pids())}
        self.entries.append(entry)
        return _WatchedRunning(running, entry)


# --- the per-cell figures ----------------------------------------------------------------------
def plateau_truth(trial, stable_scans: int = 2) -> tuple[int | None, int | None]:
    """The true saving's change and the zero-mapped pages' change over the plateau, from the
    trial's series: the median over the samples of its last ``stable_scans`` full-scan counts (the
    settle detector saw no trend over them). The engine's own ``saved_bytes`` takes the samples of
    every full-scan count its plateau window touches, the whole first one included: on guests that
    merge during their first full scan that median falls in the growth (see the study's notes)."""
    s = trial.series or {}
    true, scans = s.get("true_saved_bytes") or [], s.get("full_scans") or []
    rows = [i for i, v in enumerate(true)
            if v is not None and i < len(scans) and scans[i] is not None]
    if not rows:
        return trial.saved_bytes, trial.zero_mapped_pages
    last = scans[rows[-1]]
    rows = [i for i in rows if scans[i] > last - stable_scans]
    zero = [s["zero_mapped_pages"][i] for i in rows if s.get("zero_mapped_pages")
            and s["zero_mapped_pages"][i] is not None]
    return (int(statistics.median(true[i] for i in rows)),
            int(statistics.median(zero)) if zero else None)


def cell_values(result: ABResult, huge: dict, arm: str) -> dict[str, list]:
    """Every summarised trial's value of each CELL_METRICS key, for ``arm``."""
    pmd = huge.get("pmd_bytes", 2 * MIB)
    out: dict[str, list] = {k: [] for k, *_ in CELL_METRICS + EXTRA_METRICS}
    for t in result.trials:
        if t.arm != arm or t.status not in SUMMARISED_STATUS:
            continue
        h = huge.get("trials", {}).get(str(t.index), {})
        real, zero = plateau_truth(t, result.config.get("stable_scans", 2))
        out["saved_bytes"].append(real)
        out["zero_mapped_pages"].append(zero)
        out["engine_saved_bytes"].append(t.saved_bytes)
        out["counter_bytes"].append(None if t.saved_pages is None
                                    else t.saved_pages * result.config["page_size"])
        for key in ("general_profit", "ksmd_cpu_seconds", "settle_seconds"):
            out[key].append(getattr(t, key))
        before, after = h.get("before"), h.get("after")
        out["thp_before"].append(None if before is None else before / pmd)
        out["thp_lost"].append(None if before is None or after is None else (before - after) / pmd)
    return out


def contrasts(result: ABResult, huge: dict, thps) -> list[dict]:
    """uzp 1 - 0 within each THP setting; each other THP setting - the first, within each uzp."""
    pairs = [(arm_name(0, t), arm_name(1, t), f"use_zero_pages 1 - 0, thp {t}") for t in thps]
    pairs += [(arm_name(u, thps[0]), arm_name(u, t), f"thp {t} - {thps[0]}, use_zero_pages={u}")
              for t in thps[1:] for u in (0, 1)]
    rows = []
    for k, (a, b, label) in enumerate(pairs):
        va, vb = cell_values(result, huge, a), cell_values(result, huge, b)
        row = {"guests": result.config["workload"]["spec"]["guests"], "contrast": label}
        for i, (key, *_) in enumerate(CELL_METRICS):
            d = bootstrap_diff(va[key], vb[key], seed=result.config.get("seed", 0) + 31 * k + i)
            row.update({f"{key}_diff": d["diff"], f"{key}_ci_low": d["ci_low"],
                        f"{key}_ci_high": d["ci_high"], f"{key}_clear": d["clear"]})
        rows.append(row)
    return rows


def _fmt(v, scale, f) -> str:
    return "-" if v is None else f.format(v * scale)


def write_study(results: dict, huge: dict, out: str, meta: dict, figure: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(meta, f, indent=1)
    thps = meta["args"]["thp"]
    cells, diffs = [], []
    for n, r in results.items():
        for arm in study_arms(thps):
            vals = cell_values(r, huge[n], arm)
            row = {"guests": n, "thp": r.config["arms"][arm]["thp.enabled"],
                   "use_zero_pages": int(r.config["arms"][arm]["use_zero_pages"]),
                   "n": len(vals["saved_bytes"]),
                   "trials": sum(t.arm == arm for t in r.trials)}
            for key, *_ in CELL_METRICS + EXTRA_METRICS:
                s = median_iqr(vals[key])
                row.update({f"{key}_median": s["median"], f"{key}_min": s["min"],
                            f"{key}_max": s["max"]})
            cells.append(row)
        diffs += contrasts(r, huge[n], thps)
    for name, rows in (("overview.csv", cells), ("contrasts.csv", diffs)):
        if rows:
            with open(os.path.join(out, name), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    first = next(iter(results.values()))
    a = meta["args"]
    made = "; ".join(
        f"`scripts/ab_vms.py --guests {n} --trials {r.config['trials_per_arm']} --vm-memory "
        f"{r.config['workload']['spec']['memory'] // MIB}M --thp {','.join(thps)} "
        f"--seed {a['seed']}"
        + (f" --stable-scans {r.config['stable_scans']}" if r.config.get("stable_scans", 2) != 2
           else "") + "`" for n, r in results.items())
    lines = ["# use_zero_pages x THP on live VMs: the study", "",
             f"Made by {made} ({meta['seconds'] / 60:.1f} minutes in all, last "
             f"{meta.get('finished', '')}).",
             ""]
    findings = os.path.join(out, "findings.md")    # hand-written, kept across re-renders
    if os.path.exists(findings):
        with open(findings) as f:
            lines += [f.read().rstrip(), ""]
    lines += [METHOD, "",
             f"Machine: kernel {first.config['kernel']}, {first.config['cpus']} CPUs, page size "
             f"{first.config['page_size']} B; accelerator "
             f"{first.config['workload'].get('accelerator')}; pinned knobs: "
             + fmt_knobs(first.config["fixed"], ", ") + ". Other KSM users while it ran: "
             + (", ".join(o["comm"] for o in first.config.get("other_mergeable_processes", []))
                or "none") + ".", "",
             "## Per cell: median [min - max] over the trials", "",
             "| guests | thp | uzp | n | " + " | ".join(lbl for _, lbl, *_ in CELL_METRICS) + " |",
             "|" + "---|" * (4 + len(CELL_METRICS))]
    for c in cells:
        vals = [f"{_fmt(c[k + '_median'], s, f)} [{_fmt(c[k + '_min'], s, f)} - "
                f"{_fmt(c[k + '_max'], s, f)}]" for k, _, s, f in CELL_METRICS]
        lines.append(f"| {c['guests']} | {c['thp']} | {c['use_zero_pages']} | "
                     f"{c['n']}/{c['trials']} | " + " | ".join(vals) + " |")
    lines += ["", "## Contrasts: difference of medians [bootstrap 95 % CI] "
              "(* the CI excludes 0; no "
              "CI under 3 trials a side)", "",
              "| guests | contrast | " + " | ".join(lbl for _, lbl, *_ in CELL_METRICS) + " |",
              "|" + "---|" * (2 + len(CELL_METRICS))]
    for d in diffs:
        vals = []
        for k, _, s, f in CELL_METRICS:
            v = d[f"{k}_diff"]
            cell = "-" if v is None else ("+" if v >= 0 else "") + f.format(v * s)
            if d[f"{k}_ci_low"] is not None:
                cell += (f" [{_fmt(d[k + '_ci_low'], s, f)}, {_fmt(d[k + '_ci_high'], s, f)}]"
                         + ("*" if d[f"{k}_clear"] else ""))
            vals.append(cell)
        lines.append(f"| {d['guests']} | {d['contrast']} | " + " | ".join(vals) + " |")
    lines += ["", "## Per guest count: the engine's report", ""]
    for n, r in results.items():
        lines += [f"### {n} guests", "", f"![{n} guests]({n}guests/ab.png)" if figure else "", "",
                  "```", format_table(r), "```", ""]
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {x}" for x in meta["notes"]] + [""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if figure:
        overview_figure(results, huge, thps, os.path.join(out, "overview.png"))


def overview_figure(results: dict, huge: dict, thps, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping overview.png")
        return
    panels = [m for m in CELL_METRICS if m[0] != "thp_before"]
    cols = (len(panels) + 1) // 2
    fig, grid = plt.subplots(2, cols, figsize=(3.6 * cols, 7.4), layout="constrained")
    axes = list(grid.flat)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    labels, x = [], 0
    for n, r in results.items():
        for arm in study_arms(thps):
            vals = cell_values(r, huge[n], arm)
            color = "#1f77b4" if arm.startswith("uzp0") else "#d62728"
            for ax, (key, _, scale, _) in zip(axes, panels):
                ys = [v * scale for v in vals[key] if v is not None]
                ax.plot([x] * len(ys), ys, "o", color=color, alpha=0.6, ms=5)
                if ys:
                    ys.sort()
                    ax.plot([x - 0.3, x + 0.3], [ys[len(ys) // 2]] * 2, color="0.1", lw=1.5)
            labels.append(f"{n}g\n{arm.split('-')[1][:4]}\nuzp{arm[3]}")
            x += 1
    for ax, (_, label, _, _) in zip(axes, panels):
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Each trial (dots; bar: median) per cell: guests, thp.enabled, use_zero_pages "
                 "(blue 0, red 1)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- running -------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", default="2",
                    help="comma-separated guest counts (default 2), e.g. 2,4")
    ap.add_argument("--trials", type=int, default=3, help="trials per cell (default 3)")
    ap.add_argument("--thp", default="madvise,never",
                    help="comma-separated thp.enabled settings, the first the baseline "
                         "(default madvise,never)")
    ap.add_argument("--vm-memory", default="384M", help="RAM per guest (default 384M)")
    ap.add_argument("--ready-timeout", type=float, default=300.0,
                    help="seconds all guests may take to boot (default 300)")
    ap.add_argument("--seed", type=int, default=2026, help="seed of the arm orders (default 2026)")
    ap.add_argument("--settle-timeout", type=float, default=120.0)
    ap.add_argument("--settle-tolerance", type=float, default=None,
                    help="see `udedup ab --settle-tolerance` (default: the engine's)")
    ap.add_argument("--stable-scans", type=int, default=2,
                    help="full scans the plateau must hold (default 2, as `udedup ab`)")
    ap.add_argument("--fix", action="append", default=[], metavar="KNOB=V",
                    help="override a pinned knob (default: the engine's pins)")
    ap.add_argument("--out", default=None, help="report folder (default ./ab-vms-<time>)")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--lock", default=LOCK_PATH,
                    help=f"flock held around each run (default {LOCK_PATH}, the experiment lock)")
    ap.add_argument("--no-lock", action="store_true",
                    help="do not take the lock (the caller holds it, e.g. a test marked ksm)")
    ap.add_argument("--plan", action="store_true",
                    help="print the cells and trial order; boot nothing")
    ap.add_argument("--rerender", metavar="DIR",
                    help="no run: rewrite DIR's README.md, CSVs and overview.png from its files")
    args = ap.parse_args(argv)
    try:
        args.guest_counts = [int(g) for g in args.guests.split(",") if g.strip()]
        if not args.guest_counts or min(args.guest_counts) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--guests {args.guests!r}: give positive guest counts, e.g. 2,4")
    args.thps = [t.strip() for t in args.thp.split(",") if t.strip()]
    if len(args.thps) < 1 or any(t not in THP_SETTINGS for t in args.thps) or \
            len(set(args.thps)) < len(args.thps):
        ap.error(f"--thp {args.thp!r}: give distinct settings among {', '.join(THP_SETTINGS)}")
    if args.trials < 1:
        ap.error("--trials must be at least 1")
    if args.stable_scans < 1:
        ap.error("--stable-scans must be at least 1")
    try:
        args.memory = parse_size(args.vm_memory)
        args.overrides = {}
        for item in args.fix:
            args.overrides.update(parse_knobs(item, "--fix"))
        for n in args.guest_counts:
            VmSpec(guests=n, memory=args.memory).validate()
    except UsageError as err:
        ap.error(str(err))
    return args


def plan(args) -> int:
    arms = study_arms(args.thps)
    for k, n in enumerate(args.guest_counts):
        order = trial_order(list(arms), args.trials, args.seed + n)
        print(f"{n} guests x {args.memory // MIB} MiB: {len(arms)} cells x {args.trials} trials "
              f"= {len(order)} trials")
        for arm, knobs in arms.items():
            print(f"  cell {arm}: {fmt_knobs(knobs)}")
        print("  order: " + " ".join(arm for _, arm in order))
    return 0


def rerender(folder: str, figure: bool = True) -> int:
    try:
        with open(os.path.join(folder, "study.json")) as f:
            meta = json.load(f)
    except OSError as err:
        print(f"error: {folder}: no study.json ({err.strerror}); give a folder this script wrote",
              file=sys.stderr)
        return 2
    results, huge = {}, {}
    for n in meta["guests"]:
        sub = os.path.join(folder, f"{n}guests")
        with open(os.path.join(sub, "result.json")) as f:
            results[n] = ABResult.from_dict(json.load(f))
        with open(os.path.join(sub, "hugepages.json")) as f:
            huge[n] = json.load(f)
        write_report(results[n], sub, figure=figure)
    write_study(results, huge, folder, meta, figure=figure)
    log.info("report: %s/ (re-rendered)", folder)
    return 0


def run_one(n: int, k: int, args, out: str, lock_path: str | None):
    ksm = Ksm()
    workload = HugePageWatch(VmWorkload(VmSpec(guests=n, memory=args.memory),
                                        ready_timeout=args.ready_timeout))
    arms = study_arms(args.thps)
    fixed = {**default_fixed(next(iter(arms.values())), ksm.knob_names()), **args.overrides}
    extra = {} if args.settle_tolerance is None else {"settle_tolerance": args.settle_tolerance}
    pmd = 2 * MIB
    with contextlib.suppress(OSError, ValueError):
        pmd = int(open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read())
    interrupted = False
    with experiment_lock(lock_path, enabled=lock_path is not None):
        try:
            result = run_ab(workload, arms=arms, fixed=fixed, trials=args.trials,
                            seed=args.seed + k, settle_timeout=args.settle_timeout, ksm=ksm,
                            stable_scans=args.stable_scans, **extra)
        except ABInterrupted as err:
            result, interrupted = err.result, True
    seeds = {e["seed"]: e for e in workload.entries}
    trials = {}
    for t in result.trials:   # the engine starts trial i's workload with seed + 1000 * (i + 1)
        e = seeds.get(result.config["seed"] + 1000 * (t.index + 1))
        if e is not None:
            trials[str(t.index)] = {"arm": t.arm, "before": e.get("before"),
                                    "after": e.get("after")}
    huge = {"pmd_bytes": pmd, "trials": trials}
    sub = os.path.join(out, f"{n}guests")
    write_report(result, sub, figure=not args.no_figure)
    with open(os.path.join(sub, "hugepages.json"), "w") as f:
        json.dump(huge, f, indent=1)
    return result, huge, interrupted


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.rerender:
        return rerender(args.rerender, figure=not args.no_figure)
    if args.plan:
        return plan(args)
    out = args.out or f"ab-vms-{time.strftime('%Y%m%d-%H%M%S')}"
    results, huge, status, started = {}, {}, 0, time.monotonic()
    prior = {}
    if os.path.exists(os.path.join(out, "study.json")):   # a later guest count joins the folder
        with open(os.path.join(out, "study.json")) as f:
            prior = json.load(f)
    with sigterm_raises():
        try:
            for k, n in enumerate(args.guest_counts):
                log.info("[%d/%d] %d guests x %d MiB, %d cells x %d trials ...", k + 1,
                         len(args.guest_counts), n, args.memory // MIB, 2 * len(args.thps),
                         args.trials)
                lock = None if args.no_lock else args.lock
                results[n], huge[n], stopped = run_one(n, n, args, out, lock)
                log.info("  %s", results[n].verdict)
                if stopped:
                    status = 130
                    break
        except UdedupError as err:
            print(f"error: {err}", file=sys.stderr)
            status = err.exit_code
        except KeyboardInterrupt:
            status = 130
    if results:
        for n in prior.get("guests", []):   # keep the guest counts an earlier run wrote
            if n not in results and os.path.exists(os.path.join(out, f"{n}guests", "result.json")):
                with open(os.path.join(out, f"{n}guests", "result.json")) as f:
                    results[n] = ABResult.from_dict(json.load(f))
                with open(os.path.join(out, f"{n}guests", "hugepages.json")) as f:
                    huge[n] = json.load(f)
        results = dict(sorted(results.items()))
        huge = {n: huge[n] for n in results}
        seconds = time.monotonic() - started + prior.get("seconds", 0)
        meta = {"guests": list(results), "seconds": seconds,
                "finished": time.strftime("%Y-%m-%d %H:%M"), "notes": prior.get("notes", []),
                "args": {"trials": args.trials, "vm_memory": args.vm_memory, "thp": args.thps,
                         "seed": args.seed, "stable_scans": args.stable_scans}}
        write_study(results, huge, out, meta, figure=not args.no_figure)
        log.info("report: %s/", out)
    return status


if __name__ == "__main__":
    sys.exit(main())
