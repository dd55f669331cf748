#!/usr/bin/env python3
"""The full study: what does use_zero_pages change? Every built-in workload preset, a larger size and
more trials than the quick `udedup ab`, one report folder:

  OUT/README.md        method, machine, one table across presets, the verdicts
  OUT/overview.csv     one row per preset: each key metric's difference (on - off) with its 95 % CI
  OUT/overview.png     the relative differences with their intervals, per preset
  OUT/<preset>/        the full `udedup ab` report of that preset (result.json, trials.csv,
                       series.csv, summary.txt, ab.png)

Needs root (it changes KSM knobs; each is restored at the end, also after Ctrl-C or SIGTERM, and
what finished is still written). Typical: 512M x 6 trials x 4 presets in about 5 minutes on 2 cores.

  sudo python3 scripts/ab_use_zero_pages.py --size 512M --trials 6 --out ab_study/
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from udedup.ab.engine import DEFAULT_ARMS, DEFAULT_FIXED, default_fixed, run_ab  # noqa: E402
from udedup.ab.records import ABInterrupted, ABResult  # noqa: E402
from udedup.ab.report import LABELS, diff_cell, format_table, write_report  # noqa: E402
from udedup.ab.stats import fmt_knobs  # noqa: E402
from udedup.ab.synthetic import PRESETS, parse_size, preset  # noqa: E402
from udedup.ab.workloads import SyntheticWorkload  # noqa: E402
from udedup.commands.ab import parse_knobs  # noqa: E402
from udedup.errors import UdedupError, UsageError  # noqa: E402
from udedup.ksm import Ksm, experiment_lock  # noqa: E402
from udedup.signals import sigterm_raises  # noqa: E402

log = logging.getLogger("ab_use_zero_pages")

#: (metric, label, unit) of the overview, in order
KEY_METRICS = (("saved_bytes", "saved memory", "MiB"), ("ksmd_cpu_seconds", "ksmd CPU to settle", "s"),
               ("settle_seconds", "time to settle", "s"), ("cow_ns_per_page", "COW per merged page", "ns"),
               ("rmap_items", "rmap items", "items"), ("ksm_zero_pages", "ksm_zero_pages", "pages"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512M", help="workload size per preset (default 512M)")
    ap.add_argument("--trials", type=int, default=6, help="trials per arm and preset (default 6)")
    ap.add_argument("--presets", default=",".join(PRESETS),
                    help=f"comma-separated presets (default: all: {','.join(PRESETS)})")
    ap.add_argument("--seed", type=int, default=2024, help="seed of the arm orders (default 2024)")
    ap.add_argument("--settle-timeout", type=float, default=120.0)
    ap.add_argument("--fix", action="append", default=[], metavar="KNOB=V",
                    help="override a pinned knob (defaults: "
                         + " ".join(f"{k}={v}" for k, v in DEFAULT_FIXED.items()) + ")")
    ap.add_argument("--out", default=None, help="report folder (default ./ab-use-zero-pages-<time>)")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--lock", default=None,
                    help="hold an flock on this file for the whole run (to keep other KSM users out)")
    ap.add_argument("--rerender", metavar="DIR",
                    help="no run: rewrite DIR's README.md, overview.csv and overview.png from its "
                         "<preset>/result.json files")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.rerender:
        return rerender(args.rerender, figure=not args.no_figure)

    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    bad = [p for p in names if p not in PRESETS]
    if bad or not names:
        print(f"error: unknown preset(s) {', '.join(bad) or '(none)'}; choose from {', '.join(PRESETS)}",
              file=sys.stderr)
        return 2
    overrides = {}
    try:
        for item in args.fix:
            overrides.update(parse_knobs(item, "--fix"))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or f"ab-use-zero-pages-{time.strftime('%Y%m%d-%H%M%S')}"
    lock = contextlib.ExitStack()
    if args.lock:
        lock.enter_context(experiment_lock(args.lock))
    results = {}
    status = 0
    started = time.monotonic()
    with sigterm_raises():    # between presets too: stop, and write what finished
        try:
            size = parse_size(args.size)
            # as `udedup ab`: the default pins this kernel has, then the overrides
            fixed = {**default_fixed(DEFAULT_ARMS["on"], Ksm().knob_names()), **overrides}
            for k, name in enumerate(names):
                workload = SyntheticWorkload(preset(name, size))
                log.info("[%d/%d] %s, %d trial(s) per arm ...", k + 1, len(names), workload.name,
                         args.trials)
                try:
                    result = run_ab(workload, fixed=fixed, trials=args.trials, seed=args.seed + k,
                                    settle_timeout=args.settle_timeout)
                except ABInterrupted as err:
                    results[name] = err.result
                    write_report(err.result, os.path.join(out, name), figure=not args.no_figure)
                    status = 130
                    log.info("interrupted: writing what finished")
                    break
                results[name] = result
                write_report(result, os.path.join(out, name), figure=not args.no_figure)
                log.info("  %s", result.verdict)
        except UdedupError as err:
            print(f"error: {err}", file=sys.stderr)
            status = err.exit_code
        except KeyboardInterrupt:
            status = 130
            log.info("interrupted: writing what finished")
        finally:
            lock.close()
    if results:
        write_overview(results, out, args, time.monotonic() - started, figure=not args.no_figure)
        log.info("report: %s/", out)
    return status


def rerender(folder: str, figure: bool = True) -> int:
    with open(os.path.join(folder, "study.json")) as f:
        meta = json.load(f)
    results = {}
    for name in meta["presets"]:
        path = os.path.join(folder, name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = ABResult.from_dict(json.load(f))
            write_report(results[name], os.path.join(folder, name), figure=figure)
    if not results:
        print(f"error: no <preset>/result.json in {folder}", file=sys.stderr)
        return 2
    write_overview(results, folder, argparse.Namespace(**meta["args"]), meta["seconds"], figure=figure)
    log.info("report: %s/ (re-rendered)", folder)
    return 0


def _row(name, result) -> dict:
    row = {"preset": name, "size_mib": result.config["workload"]["spec"]["size"] >> 20,
           "trials_per_arm": result.config["trials_per_arm"], "interrupted": result.interrupted}
    diff = result.summary["differences"][0]["metrics"] if result.summary.get("differences") else {}
    for metric, _, _ in KEY_METRICS:
        d = diff.get(metric, {})
        for arm in result.arm_names:
            row[f"{metric}_{arm}_median"] = result.summary["arms"][arm]["metrics"][metric]["median"]
        for key in ("diff", "ci_low", "ci_high", "relative", "rel_ci_low", "rel_ci_high", "clear"):
            row[f"{metric}_{key}"] = d.get(key)
    row["verdict"] = result.verdict
    return row


def write_overview(results: dict, out: str, args, seconds: float, figure: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump({"presets": list(results), "seconds": seconds,
                   "args": {k: getattr(args, k) for k in ("size", "trials", "seed")}}, f, indent=1)
    rows = [_row(name, r) for name, r in results.items()]
    with open(os.path.join(out, "overview.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    first = next(iter(results.values()))
    lines = ["# What use_zero_pages changes: the full A/B study", "",
             f"Made by `scripts/ab_use_zero_pages.py --size {args.size} --trials {args.trials} "
             f"--presets {','.join(results)} --seed {args.seed}` in {seconds / 60:.1f} minutes.", "",
             "Method: for each workload preset, the built-in synthetic workload (a child process filling "
             "a MADV_MERGEABLE, MADV_NOHUGEPAGE buffer with zero, duplicate, unique and volatile pages) "
             "runs with use_zero_pages=0 (off) and =1 (on), alternating in seeded random order. Every "
             "trial starts from run=2 (nothing merged), starts ksmd once the workload is ready, waits "
             "until merging settles, then stops ksmd and times writes into a sample of merged pages "
             "(copy-on-write). Numbers are medians [quartiles] per arm; differences are on - off with "
             "bootstrap 95 % intervals; * marks an interval that excludes zero.", "",
             f"Machine: kernel {first.config['kernel']}, {first.config['cpus']} CPUs, page size "
             f"{first.config['page_size']} B; pinned knobs: "
             + fmt_knobs(first.config["fixed"], ", ") + ".", "",
             "| preset | saved, MiB off / on | saved on - off [95 % CI] | ksmd CPU-s off / on | "
             "CPU on - off [95 % CI] | settle s off / on | COW ns off / on | COW on - off [95 % CI] |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a = r.summary["arms"]
        d = r.summary["differences"][0]["metrics"] if r.summary.get("differences") else {}

        def med(metric, arm, scale=1.0, f="{:.2f}"):
            v = a[arm]["metrics"][metric]["median"]
            return "-" if v is None else f.format(v * scale)

        def ci(metric):   # as summary.txt writes it
            return diff_cell(d.get(metric, {}), LABELS[metric][1])

        mib = 1 / 2**20
        lines.append(f"| {name} | {med('saved_bytes', 'off', mib)} / {med('saved_bytes', 'on', mib)} | "
                     f"{ci('saved_bytes')} | {med('ksmd_cpu_seconds', 'off')} / "
                     f"{med('ksmd_cpu_seconds', 'on')} | {ci('ksmd_cpu_seconds')} | "
                     f"{med('settle_seconds', 'off')} / {med('settle_seconds', 'on')} | "
                     f"{med('cow_ns_per_page', 'off', f='{:.0f}')} / {med('cow_ns_per_page', 'on', f='{:.0f}')} | "
                     f"{ci('cow_ns_per_page')} |")
    lines += ["", "## Where the difference in saving comes from", "",
              "general_profit = (pages_sharing + ksm_zero_pages) x page size - rmap items x 64 B. "
              "Split of the on - off difference of the medians:", "",
              "| preset | zero pages moved to ksm_zero_pages | rmap items on - off (bytes) | "
              "saved pages on - off (saving) | total |", "|---|---|---|---|---|"]
    for name, r in results.items():
        a = r.summary["arms"]
        if not (a["off"]["n"] and a["on"]["n"]):
            continue
        med = lambda m, arm: a[arm]["metrics"][m]["median"] or 0  # noqa: E731
        ps = r.config["page_size"]
        d_rmap = med("rmap_items", "on") - med("rmap_items", "off")
        d_saved = med("saved_pages", "on") - med("saved_pages", "off")
        total = med("saved_bytes", "on") - med("saved_bytes", "off")
        lines.append(f"| {name} | {med('ksm_zero_pages', 'on'):,.0f} | {d_rmap:+,.0f} "
                     f"({-d_rmap * 64 / 2**20:+.2f} MiB) | {d_saved:+,.0f} ({d_saved * ps / 2**20:+.2f} MiB)"
                     f" | {total / 2**20:+.2f} MiB |")
    lines += ["", "## Verdicts", ""]
    for name, r in results.items():
        lines.append(f"- **{name}**: {r.verdict}")
    lines += ["", "## Per preset", ""]
    for name, r in results.items():
        lines += [f"### {name}", "", f"![{name}]({name}/ab.png)" if figure else "", "", "```",
                  format_table(r), "```", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if figure:
        overview_figure(results, os.path.join(out, "overview.png"))


def overview_figure(results: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping overview.png")
        return
    panels = KEY_METRICS[:4]
    names = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4.2), layout="constrained")
    for ax, (metric, label, _) in zip(axes, panels):
        for i, name in enumerate(names):
            r = results[name]
            if not r.summary.get("differences"):
                continue
            d = r.summary["differences"][0]["metrics"][metric]
            if d.get("relative") is None:
                continue
            y = d["relative"] * 100
            if d.get("rel_ci_low") is not None:
                ax.errorbar([i], [y], yerr=[[y - d["rel_ci_low"] * 100], [d["rel_ci_high"] * 100 - y]],
                            fmt="o", capsize=5, color="#d62728" if d["clear"] else "0.4")
            else:
                ax.plot([i], [y], "o", color="0.4")
        ax.axhline(0, color="0.2", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(f"{label}: on vs off (%)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("use_zero_pages=1 relative to 0: median difference with bootstrap 95 % CI "
                 "(red: the interval excludes 0)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
