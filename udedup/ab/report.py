"""Reports of an A/B run: terminal table, JSON, CSV and a PNG figure.

matplotlib is imported only when a figure is drawn (backend Agg: no display needed); without it the
figure is skipped with a one-line warning and everything else is still written.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import textwrap

from .records import ABResult
from .sampler import SERIES_COLUMNS
from .stats import METRICS, arm_label, fmt_knobs

log = logging.getLogger(__name__)

MIB = 2**20

#: metric -> (label with its unit, unit kind). Kinds pick the formatting.
LABELS: dict[str, tuple[str, str]] = {
    "saved_bytes": ("saved, MiB (true: change from trial start)", "bytes"),
    "counter_saved_bytes": ("saved by KSM counters (general_profit), MiB", "bytes"),
    "zero_mapped_pages": ("zero pages mapped outside KSM", "count"),
    "saved_pages": ("saved pages (sharing + zero)", "count"),
    "pages_shared": ("pages_shared", "count"),
    "pages_sharing": ("pages_sharing", "count"),
    "ksm_zero_pages": ("ksm_zero_pages", "count"),
    "general_profit": ("general_profit, MiB", "bytes"),
    "rmap_items": ("rmap items", "count"),
    "settle_seconds": ("time to settle, s", "s"),
    "t99_seconds": ("time to 99 % of saving, s", "s"),
    "ksmd_cpu_seconds": ("ksmd CPU to settle, s", "s"),
    "cpu_t99_seconds": ("ksmd CPU to 99 %, s", "s"),
    "saved_mib_per_cpu_second": ("saved MiB per ksmd CPU-s", "ratio"),
    "cow_ns_per_page": ("COW write, merged page, ns", "ns"),
    "cow_ns_ksm_page": ("COW write, KSM page, ns", "ns"),
    "cow_ns_zero_page": ("COW write, zero page, ns", "ns"),
    "write_ns_per_page": ("plain write (baseline), ns", "ns"),
}

TRIAL_COLUMNS = ("index", "block", "arm", "status", "timed_out", "populate_seconds", "full_scans",
                 "pages_unshared", "pages_volatile", "foreign_pages", "foreign_rmap_items") + METRICS + (
                     "error",)


def fmt(value, kind: str, signed: bool = False) -> str:
    """A number in the unit its label names (bytes are shown in MiB)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    sign = "+" if signed else ""
    if kind == "bytes":
        return f"{value / MIB:{sign}.2f}"
    if kind == "count":
        return f"{value:{sign},.0f}"
    if kind == "s":
        return f"{value:{sign}.3f}" if abs(value) < 1 else f"{value:{sign}.2f}"
    if kind == "ns":
        return f"{value:{sign},.0f}"
    return f"{value:{sign}.1f}"


def _cell(stats: dict, kind: str) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    if stats["n"] == 1 or stats["q1"] == stats["q3"]:
        return fmt(stats["median"], kind)
    return f"{fmt(stats['median'], kind)} [{fmt(stats['q1'], kind)}..{fmt(stats['q3'], kind)}]"


def diff_cell(d: dict, kind: str) -> str:
    """A difference as the table writes it: ``+1.00 (+5.0 %) [+0.50..+1.50] *`` (``*``: the 95 %
    interval excludes 0)."""
    if not d or d.get("diff") is None:
        return "-"
    text = fmt(d["diff"], kind, signed=True)
    if d.get("relative") is not None:
        text += f" ({d['relative'] * 100:+.1f} %)"
    if d.get("ci_low") is not None:
        text += f" [{fmt(d['ci_low'], kind, True)}..{fmt(d['ci_high'], kind, True)}]"
        text += " *" if d.get("clear") else ""
    return text


def describe_run(result: ABResult) -> str:
    c = result.config
    fixed = fmt_knobs(c.get("fixed", {})) or "none"
    return (f"workload {c['workload']['name']}; {c['trials_per_arm']} trial(s) per arm; seed "
            f"{c['seed']}; fixed knobs: {fixed}; kernel {c.get('kernel', '?')}, {c.get('cpus', '?')} CPUs")


def format_table(result: ABResult, metrics=METRICS) -> str:
    """The summary as a text table: per arm median [IQR], then each arm minus the first [95 % CI]."""
    s = result.summary or result.summarize()
    names = result.arm_names
    arms = s["arms"]
    diffs = s.get("differences", [])
    header = ["metric"] + [arm_label(n, result.config["arms"][n]) for n in names]
    header += [f"{d['arm']} - {d['baseline']} [95 % CI]" for d in diffs]
    rows = [header]
    for m in metrics:
        label, kind = LABELS[m]
        row = [label] + [_cell(arms[n]["metrics"].get(m), kind) for n in names]
        row += [diff_cell(d["metrics"].get(m), kind) for d in diffs]
        if all(cell == "-" for cell in row[1:]):
            continue
        rows.append(row)
    counts = ["trials ok / timed out / died"] + [
        f"{arms[n]['n']} / {arms[n]['timed_out']} / {arms[n]['died'] + arms[n]['failed']}"
        for n in names] + [""] * len(diffs)
    rows.append(counts)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("median [quartiles] per arm; difference of medians [bootstrap 95 % CI], "
                 "* = the interval excludes 0")
    fewest = min((arms[n]["n"] for n in names), default=0)
    if 0 < fewest < 6:
        lines.append(f"({fewest} trial(s) in the smallest arm: intervals are rough; --trials 8 or more "
                     "for firm conclusions on noisy metrics such as CPU and time)")
    if result.interrupted:
        lines.append(f"INTERRUPTED: {len(result.trials)} trial(s) finished before the stop")
    timed_out = [t for t in result.trials if t.timed_out]
    if timed_out:
        lines.append(f"note: {len(timed_out)} trial(s) did not settle within "
                     f"{result.config.get('settle_timeout')} s and are left out of the medians "
                     "(raise --settle-timeout or pages_to_scan)")
    foreign = [t.foreign_pages for t in result.trials if t.foreign_pages]
    if foreign:
        lines.append(f"note: other processes had up to {max(foreign):,} merged pages in the global "
                     "counters during the run")
    for t in result.trials:
        own = (t.process or {}).get("rmap_items") or 0
        if t.foreign_rmap_items and t.foreign_rmap_items > max(256, own // 50):
            lines.append(f"note: trial {t.index + 1} ({t.arm}): ksmd also tracked up to "
                         f"{t.foreign_rmap_items:,} pages of other processes (their merging is in the "
                         "global counters, their scanning in ksmd's CPU time)")
    for t in result.trials:
        if t.status == "disturbed":
            lines.append(f"note: trial {t.index + 1} ({t.arm}) left out: {t.error}")
    died = [t for t in result.trials if t.status in ("workload-died", "workload-failed")]
    for t in died:
        lines.append(f"trial {t.index + 1} ({t.arm}): {t.status}: {t.error}")
    lines.append("verdict: " + s["verdict"])
    return "\n".join(lines)


# --- files ----------------------------------------------------------------------------------------
def write_json(result: ABResult, path: str) -> str:
    with open(path, "w") as f:
        json.dump(result.to_dict(), f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_trials_csv(result: ABResult, path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRIAL_COLUMNS)
        for t in result.trials:
            d = t.as_dict(series=False)
            w.writerow(["" if d.get(c) is None else d.get(c) for c in TRIAL_COLUMNS])
    return path


def write_series_csv(result: ABResult, path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("index", "arm") + SERIES_COLUMNS)
        for t in result.trials:
            cols = [t.series.get(c, []) for c in SERIES_COLUMNS]
            for row in zip(*cols):
                w.writerow((t.index, t.arm) + tuple(row))
    return path


def write_report(result: ABResult, folder: str, figure: bool = True) -> dict[str, str]:
    """Write result.json, trials.csv, series.csv, summary.txt and ab.png into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    paths = {
        "json": write_json(result, os.path.join(folder, "result.json")),
        "trials_csv": write_trials_csv(result, os.path.join(folder, "trials.csv")),
        "series_csv": write_series_csv(result, os.path.join(folder, "series.csv")),
    }
    summary = os.path.join(folder, "summary.txt")
    with open(summary, "w") as f:
        f.write(describe_run(result) + "\n\n" + format_table(result) + "\n")
    paths["summary"] = summary
    if figure:
        png = plot(result, os.path.join(folder, "ab.png"))
        if png:
            paths["figure"] = png
    return paths


# --- the figure -----------------------------------------------------------------------------------
PANELS = ("saved_bytes", "ksmd_cpu_seconds", "settle_seconds", "cow_ns_per_page")


def plot(result: ABResult, path: str) -> str | None:
    """Saved MiB over time for every trial (top), and the key metrics per arm with their medians,
    quartiles and the difference's 95 % CI (bottom). None (and a warning) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping the figure (pip install matplotlib)")
        return None
    s = result.summary or result.summarize()
    names = result.arm_names
    colors = {n: c for n, c in zip(names, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b"))}
    fig = plt.figure(figsize=(13, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, len(PANELS), height_ratios=(1.25, 1))
    top = fig.add_subplot(grid[0, :])
    for t in result.trials:
        ser = t.series or {}
        if not ser.get("t"):
            continue
        style = "-" if t.status in ("ok", "timeout") else ":"
        # the headline dot is the true saving: plot its series where the trial recorded one
        true = ser.get("true_saved_bytes") or []
        line = true if true and all(v is not None for v in true) else ser["saved_bytes"]
        top.plot(ser["t"], [v / MIB for v in line], style, color=colors[t.arm],
                 alpha=0.75, lw=1.3)
        if t.settle_seconds is not None and t.saved_bytes is not None:
            top.plot([t.settle_seconds], [t.saved_bytes / MIB], "o", color=colors[t.arm], ms=4)
    for n in names:
        top.plot([], [], "-", color=colors[n], label=arm_label(n, result.config["arms"][n]))
    top.plot([], [], "o", color="0.3", ms=4, label="settled (detected)")
    top.set_xlabel("seconds since ksmd started (run=1)")
    top.set_ylabel("saved (general_profit), MiB")
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=9)
    top.set_title("saved memory over time, every trial", fontsize=11)
    diff = s["differences"][0] if s.get("differences") else None
    for k, metric in enumerate(PANELS):
        label, kind = LABELS[metric]
        scale = 1 / MIB if kind == "bytes" else 1.0
        ax = fig.add_subplot(grid[1, k])
        for i, n in enumerate(names):
            vals = [getattr(t, metric) for t in result.trials
                    if t.arm == n and t.status in ("ok", "timeout") and getattr(t, metric) is not None]
            xs = [i - 0.15 + 0.05 * ((j % 5) - 2) for j in range(len(vals))]
            ax.plot(xs, [v * scale for v in vals], "o", color=colors[n], alpha=0.6, ms=5)
            st = s["arms"][n]["metrics"].get(metric, {})
            if st.get("median") is not None:
                ax.errorbar([i + 0.2], [st["median"] * scale],
                            yerr=[[(st["median"] - st["q1"]) * scale], [(st["q3"] - st["median"]) * scale]],
                            fmt="s", color=colors[n], capsize=4, ms=6)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if diff is not None:
            d = diff["metrics"].get(metric, {})
            ax.set_xlabel(_panel_note(d, kind, diff), fontsize=8.5)
    title = f"udedup ab - {result.config['workload']['name']}, " \
            f"{result.config['trials_per_arm']} trial(s) per arm"
    if result.interrupted:
        title += " (INTERRUPTED)"
    fig.suptitle(title + "\n" + "\n".join(textwrap.wrap(s["verdict"], 150)), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel_note(d: dict, kind: str, diff: dict) -> str:
    if not d or d.get("diff") is None:
        return ""
    rel = f" ({d['relative'] * 100:+.1f} %)" if d.get("relative") is not None else ""
    text = f"{diff['arm']} - {diff['baseline']}: {fmt(d['diff'], kind, True)}{rel}"
    if d.get("ci_low") is not None:
        text += f"\n95 % CI {fmt(d['ci_low'], kind, True)} .. {fmt(d['ci_high'], kind, True)}"
    return text
