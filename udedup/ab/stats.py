"""The statistics of an A/B run, pure (numbers in, numbers and words out): the trial order, median
and quartiles per arm, bootstrap intervals of the differences, the one-line verdict, and how an arm
and its knobs are written."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

#: Metrics summarised per arm and compared between arms, in report order.
METRICS = ("saved_bytes", "counter_saved_bytes", "zero_mapped_pages", "saved_pages", "pages_shared", "pages_sharing", "ksm_zero_pages",
           "general_profit", "rmap_items", "settle_seconds", "t99_seconds", "ksmd_cpu_seconds",
           "cpu_t99_seconds", "saved_mib_per_cpu_second", "cow_ns_per_page", "cow_ns_ksm_page",
           "cow_ns_zero_page", "write_ns_per_page")

#: Trials whose numbers enter the summary. A timed-out trial is left out: its counters are a moment
#: of an unfinished merge (it is counted and reported, and its series is plotted).
SUMMARISED_STATUS = ("ok",)


def trial_order(arm_names: Sequence[str], trials: int, seed: int) -> list[tuple[int, str]]:
    """``(block, arm)`` in run order: each block has every arm once, order shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    order = []
    for block in range(trials):
        for k in rng.permutation(len(arm_names)):
            order.append((block, arm_names[int(k)]))
    return order


def _finite(values) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def median_iqr(values) -> dict:
    """Median, quartiles (numpy's linear interpolation), min, max and n of the finite values."""
    arr = _finite(values)
    if arr.size == 0:
        return {"n": 0, "median": None, "q1": None, "q3": None, "min": None, "max": None}
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {"n": int(arr.size), "median": float(med), "q1": float(q1), "q3": float(q3),
            "min": float(arr.min()), "max": float(arr.max())}


def bootstrap_diff(a, b, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0,
                   statistic: Callable = np.median, min_n: int = 3) -> dict:
    """``statistic(b) - statistic(a)`` with a percentile bootstrap interval (each sample resampled
    with replacement on its own), and the same for the relative change against ``statistic(a)``.

    With fewer than ``min_n`` values on a side there is no interval (None): resampling two values
    gives an interval that looks sure and is not."""
    a, b = _finite(a), _finite(b)
    out = {"n_a": int(a.size), "n_b": int(b.size), "diff": None, "ci_low": None, "ci_high": None,
           "relative": None, "rel_ci_low": None, "rel_ci_high": None, "clear": False}
    if a.size == 0 or b.size == 0:
        return out
    sa, sb = float(statistic(a)), float(statistic(b))
    out["diff"] = sb - sa
    if sa != 0:
        out["relative"] = (sb - sa) / abs(sa)
    if a.size < max(2, min_n) or b.size < max(2, min_n):
        return out
    rng = np.random.default_rng(seed)
    ra = statistic(a[rng.integers(0, a.size, size=(n_boot, a.size))], axis=1)
    rb = statistic(b[rng.integers(0, b.size, size=(n_boot, b.size))], axis=1)
    diffs = rb - ra
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    out["ci_low"], out["ci_high"] = float(lo), float(hi)
    if sa != 0:
        rel = diffs / np.abs(ra) if np.all(ra != 0) else diffs / abs(sa)
        rlo, rhi = np.percentile(rel, [tail, 100 - tail])
        out["rel_ci_low"], out["rel_ci_high"] = float(rlo), float(rhi)
    # "clear": the whole interval is on one side of zero
    out["clear"] = bool(lo > 0 or hi < 0)
    return out


def summarize(trials: Sequence, arms: Mapping[str, Mapping], seed: int = 0,
              n_boot: int = 10000) -> dict:
    """Per arm median and IQR of every metric; every other arm minus the first, with 95 % CIs.

    ``trials`` are :class:`~udedup.ab.records.TrialRecord` (anything with their attributes)."""
    names = list(arms)
    per_arm: dict[str, dict] = {}
    values: dict[str, dict[str, list]] = {}
    for name in names:
        mine = [t for t in trials if t.arm == name]
        used = [t for t in mine if t.status in SUMMARISED_STATUS]
        values[name] = {m: [getattr(t, m) for t in used] for m in METRICS}
        per_arm[name] = {
            "knobs": dict(arms[name]), "trials": len(mine), "n": len(used),
            "timed_out": sum(t.timed_out for t in mine),
            "died": sum(t.status == "workload-died" for t in mine),
            "failed": sum(t.status == "workload-failed" for t in mine),
            "disturbed": sum(t.status == "disturbed" for t in mine),
            "metrics": {m: median_iqr(values[name][m]) for m in METRICS}}
    differences = []
    if names:
        base = names[0]
        for k, other in enumerate(names[1:], start=1):
            diffs = {m: bootstrap_diff(values[base][m], values[other][m], n_boot=n_boot,
                                       seed=(seed or 0) + 7919 * k + i)
                     for i, m in enumerate(METRICS)}
            differences.append({"arm": other, "baseline": base, "metrics": diffs})
    summary = {"arms": per_arm, "differences": differences}
    summary["verdict"] = verdict(summary)
    return summary


def t99(series: Mapping[str, list], final_saved_pages: int) -> tuple[float | None, float | None]:
    """(seconds, ksmd CPU-seconds) until saved pages first reached 99 % of their final value."""
    if not final_saved_pages or final_saved_pages <= 0:
        return None, None
    target = 0.99 * final_saved_pages
    for t, saved, cpu in zip(series.get("t", []), series.get("saved_pages", []),
                             series.get("ksmd_cpu_seconds", [])):
        if saved >= target:
            return float(t), float(cpu)
    return None, None


# --- words --------------------------------------------------------------------------------------
def fmt_knob(value) -> str:
    """A knob value as the kernel prints it (booleans as 0/1)."""
    return str(int(value)) if isinstance(value, bool) else str(value)


def fmt_knobs(knobs: Mapping, sep: str = " ") -> str:
    """``"a=1 b=none"``: knobs as written on a command line (``sep`` between them)."""
    return sep.join(f"{k}={fmt_knob(v)}" for k, v in knobs.items())


def arm_label(name: str, knobs: Mapping) -> str:
    return f"{name} ({fmt_knobs(knobs, ', ')})" if knobs else name


def _words(d: dict, what: str, up: str, down: str, unit_fmt: Callable[[float], str]) -> str | None:
    if d["diff"] is None:
        return None
    rel = d["relative"]
    rel_txt = f" ({rel * 100:+.1f} %)" if rel is not None else ""
    if d["ci_low"] is None:
        return f"{what} {unit_fmt(d['diff'])}{rel_txt} (too few trials for an interval)"
    ci = f"95 % CI {unit_fmt(d['ci_low'])} to {unit_fmt(d['ci_high'])}"
    if not d["clear"]:
        return f"{what}: no clear difference ({ci})"
    word = up if d["diff"] > 0 else down
    size = abs(rel) * 100 if rel is not None else None
    amount = f"{size:.1f} % " if size is not None else f"{unit_fmt(abs(d['diff']))} "
    return f"{amount}{word} {what} ({ci})"


def verdict(summary: dict) -> str:
    """One line in plain words: what the second arm changed against the first."""
    if not summary.get("differences"):
        return "only one arm: nothing to compare"
    d = summary["differences"][0]
    arms = summary["arms"]
    a, b = d["baseline"], d["arm"]
    if arms[a]["n"] == 0 or arms[b]["n"] == 0:
        return f"no finished trial in arm {a if arms[a]['n'] == 0 else b}: no verdict"
    m = d["metrics"]
    mib = lambda x: f"{x / 2**20:+.2f} MiB"  # noqa: E731
    parts = [
        _words(m["saved_bytes"], "saved memory", "more", "less", mib),
        _words(m["ksmd_cpu_seconds"], "ksmd CPU", "more", "less", lambda x: f"{x:+.3f} s"),
        _words(m["settle_seconds"], "time to settle", "longer", "shorter", lambda x: f"{x:+.2f} s"),
        _words(m["cow_ns_per_page"], "COW cost per merged page", "higher", "lower",
               lambda x: f"{x:+.0f} ns"),
    ]
    head = f"{arm_label(b, arms[b]['knobs'])} vs {arm_label(a, arms[a]['knobs'])}"
    zero = m["ksm_zero_pages"]
    tail = ""
    if zero["diff"]:
        tail = (f"; ksm_zero_pages {zero['diff']:+.0f}, pages_sharing "
                f"{m['pages_sharing']['diff']:+.0f}")
    return f"{head}: " + "; ".join(p for p in parts if p) + tail
