"""Hot-path benchmark: ``python -m udedup.bench [--size BYTES] [--quick] [--all-levels] [--json]``.

Every kernel runs over the same buffer of random pages and of zero pages; each figure is the median
of several runs and is printed beside its ratio to ``memory_read`` (a plain sum of 64-bit words over
the same buffer) measured in the same run, so the ratios hold on whatever machine runs this.
Repetitions are interleaved across kernels so that drift (another process, frequency changes) hits
them all alike. The Python baselines call a library once per page, as Python code scanning pages
without udedup would; they run on a prefix of the buffer (their per-page cost does not depend on
the buffer size) to keep the benchmark short. ``--all-levels`` measures every instruction-set
level this CPU runs in the same run, interleaved, each against its own memory_read.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import zlib

import numpy as np

from . import pages
from .console import Progress
from .units import parse_size
from .errors import UsageError
from .ksm.memory import MergeableBuffer

DEFAULT_SIZE = 1 << 30
QUICK_SIZE = 64 << 20
PYTHON_BASELINE_MAX = 64 << 20


def median_ms(fn, repeat: int) -> tuple[float, object]:
    """Call ``fn()`` ``repeat`` times: the median wall time in ms and the last call's result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, result


def _parse_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not a number of bytes (examples: 1073741824, 256M, 1G)") from None


def _buffer(nbytes: int, fill: str) -> tuple[MergeableBuffer, np.ndarray]:
    """Anonymous private pages, small pages (what KSM scans), every page really allocated."""
    m = MergeableBuffer(nbytes, merge=False)
    a = m.array(np.uint8)
    if fill == "random":
        rng = np.random.default_rng(12345)
        words = a.view(np.uint64)
        step = 1 << 24
        for start in range(0, words.size, step):
            words[start:start + step] = rng.integers(0, 2**64, min(step, words.size - start),
                                                     dtype=np.uint64)
    else:
        a[:] = 0  # write faults allocate real zeroed pages (reads would all hit the shared zero page)
    return m, a


def _kernels(page_size: int):
    """name -> (callable(buf), runs on a prefix (a Python baseline), kernels it needs: the
    :func:`udedup.pages.implementation` arguments, {} for the level in use)."""
    def py_crc32c(buf):
        import crc32c as crc32c_pkg
        mv = memoryview(buf)
        for off in range(0, len(mv), page_size):
            crc32c_pkg.crc32c(mv[off:off + page_size])

    def py_zlib(buf):
        mv = memoryview(buf)
        for off in range(0, len(mv), page_size):
            zlib.crc32(mv[off:off + page_size])

    def py_blake2b(buf):
        mv = memoryview(buf)
        for off in range(0, len(mv), page_size):
            hashlib.blake2b(mv[off:off + page_size], digest_size=8).digest()

    native = {
        "memory_read": (pages.sum64, False, {}),
        "fused_scan": (pages.scan_pages, False, {}),
        "crc32c_hw": (pages.crc32c_pages, False, {"crc32c": "hw"}),
        "crc32c_insn": (pages.crc32c_pages, False, {"crc32c": "sse4.2"}),
        "crc32c_sw": (pages.crc32c_pages, False, {"crc32c": "sw"}),
        "hash64": (pages.hash64_pages, False, {}),
        "zero_check": (pages.zero_pages, False, {}),
        "fused_scan_sw_crc": (pages.scan_pages, False, {"crc32c": "sw"}),
    }
    python = {"zlib_crc32_per_page": (py_zlib, True, {}),
              "blake2b_per_page": (py_blake2b, True, {})}
    try:
        import crc32c  # noqa: F401
        python = {"crc32c_package_per_page": (py_crc32c, True, {}), **python}
    except ImportError:
        pass
    return {**native, **python}


def unavailable(needs: dict) -> str | None:
    """Why the kernels ``needs`` names cannot run here (None: they can). The level in use counts,
    not only the CPU: under UDEDUP_ISA=portable the hardware CRC cannot be selected."""
    try:
        with pages.implementation(**needs):
            return None
    except UsageError as err:
        return str(err)


def _impl(needs: dict) -> str:
    with pages.implementation(**needs):
        return pages.crc32c_impl()


def plan(page_size: int, python_baselines: bool = True, isa: str | None = None) -> tuple[dict, dict]:
    """(the kernels to run at level ``isa`` (default: the level in use) as ``{name: (callable,
    is_python, crc32c implementation)}``, ``{name: why}`` of those this level cannot run).
    crc32c_insn (the crc32 instruction) is only there where the level's hardware CRC is another."""
    runnable, skipped = {}, {}
    level = {} if isa is None else {"isa": isa}
    for name, (fn, is_python, needs) in _kernels(page_size).items():
        if is_python and not python_baselines:
            continue
        needs = {**level, **needs}
        why = unavailable(needs)
        if name == "crc32c_insn" and (why or _impl(needs) == _impl({**level, "crc32c": "hw"})):
            continue
        if why is None:
            call = (lambda b, fn=fn, needs=needs: _with(fn, b, needs)) if needs else fn
            runnable[name] = (call, is_python, _impl(needs))
        else:
            skipped[name] = why
    return runnable, skipped


def levels() -> list[str]:
    """Every instruction-set level this CPU runs, lowest first."""
    best = next(lv for lv, name in pages.ISA_NAMES.items() if name == pages.ISA_SUPPORTED)
    return [name for lv, name in sorted(pages.ISA_NAMES.items()) if lv <= best]


_SW_CHILD = """
import os, sys, time, statistics, crc32c
n, ps, runs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
assert not crc32c.hardware_based
mv = memoryview(bytearray(os.urandom(n)))
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    for off in range(0, n, ps):
        crc32c.crc32c(mv[off:off + ps])
    times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""


def _crc32c_package_sw(nbytes: int, page_size: int, runs: int):
    """The crc32c package forced to its software path (CRC32C_SW_MODE=force is read at import, so
    this runs in a child process, on random pages of the same size)."""
    env = dict(os.environ, CRC32C_SW_MODE="force")
    try:
        out = subprocess.run([sys.executable, "-c", _SW_CHILD, str(nbytes), str(page_size),
                              str(runs)], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout)
    except (subprocess.CalledProcessError, ValueError):
        return None


def _with(fn, buf, needs):
    with pages.implementation(**needs):
        return fn(buf)


def _measure(buf, content, runs, page_size, kernels, python_baselines, progress) -> list[dict]:
    """``kernels``: ``{(isa, name): (callable, is_python, crc32c_impl)}``; one repetition runs
    every kernel of every level once, so drift hits them all alike."""
    prefix = buf[:min(buf.nbytes, PYTHON_BASELINE_MAX)]
    times = {key: [] for key in kernels}
    for fn, is_python, _ in kernels.values():  # warm up: code, page tables, caches
        fn(prefix if is_python else buf)
    for rep in range(runs):
        for (isa, name), (fn, is_python, _) in kernels.items():
            if progress:
                progress(f"{content}: run {rep + 1}/{runs} {isa} {name}")
            target = prefix if is_python else buf
            t0 = time.perf_counter()
            fn(target)
            times[(isa, name)].append((time.perf_counter() - t0, target.nbytes))

    def row(isa, name, impl, nbytes, secs):
        return {"name": name, "content": content, "bytes": nbytes, "runs": runs,
                "seconds": secs, "gbps": nbytes / secs / 1e9,
                "ns_per_page": secs / (nbytes // page_size) * 1e9, "isa": isa,
                "crc32c_impl": impl}

    results = [row(*key, kernels[key][2], samples[0][1],
                   statistics.median(s for s, _ in samples)) for key, samples in times.items()]
    py = [key for key in kernels if key[1] == "crc32c_package_per_page"]
    if python_baselines and py and content == "random":
        secs = _crc32c_package_sw(prefix.nbytes, page_size, runs)
        if secs:
            results.append(row(py[0][0], "crc32c_package_sw_per_page", "sw", prefix.nbytes, secs))
    base = {r["isa"]: r["gbps"] for r in results if r["name"] == "memory_read"}
    for r in results:
        r["ratio_to_memory_read"] = r["gbps"] / base[r["isa"]]
    return results


def run(size: int, runs: int, contents=("random", "zero"), python_baselines=True,
        progress=None, isas=None) -> list[dict]:
    """One row per kernel, content and level (``isas``, default: the level in use); kernels a
    level cannot run are left out (see :func:`plan` for which and why). Each row says its level
    (``isa``) and CRC path (``crc32c_impl``); the Python baselines run once, at the level in use."""
    page_size = pages.PAGE_SIZE
    size = max(page_size, size - size % page_size)
    here = pages.isa()
    kernels = {}
    for isa in isas or [here]:
        runnable, _ = plan(page_size, python_baselines and isa == here,
                           None if isa == here else isa)
        kernels.update({(isa, name): k for name, k in runnable.items()})
    results = []
    for content in contents:
        m, buf = _buffer(size, content)
        results.extend(_measure(buf, content, runs, page_size, kernels, python_baselines,
                                progress))
        # Unmapped only after a clean run: when a kernel raises, its frames (in the traceback)
        # still hold views of the buffer, and closing it then would hide that error behind a
        # BufferInUseError; the mapping goes with the last view instead.
        del buf
        m.close()
    for r in results:
        r["page_size"] = page_size
    return results


# Targets are ratios to memory_read, the limit of a one-pass scan (a ratio to the crc32c package
# per page was dropped: that package already runs at about a third of memory read, so no machine
# could reach the 30x it asked for).
TARGETS = [
    # (description, numerator name, denominator name, content, {level: minimum ratio}); issue 13
    # asks 0.7x at sse4.2 and 0.85x at avx2; the portable level keeps the old 0.8x, which its
    # table CRC cannot reach (it runs at about a tenth of memory read)
    ("fused_scan vs memory_read", "fused_scan", "memory_read", "random",
     {"portable": 0.8, "sse4.2": 0.7, "avx2": 0.85, "avx512": 0.8}),
    ("zero_check vs memory_read (random pages)", "zero_check", "memory_read", "random",
     {"portable": 10.0, "sse4.2": 10.0, "avx2": 10.0, "avx512": 10.0}),
]


def check_targets(results: list[dict]) -> list[dict]:
    by = {(r["isa"], r["name"], r["content"]): r for r in results}
    out = []
    for isa in dict.fromkeys(r["isa"] for r in results):
        for desc, num, den, content, minimums in TARGETS:
            if isa in minimums and (isa, num, content) in by and (isa, den, content) in by:
                ratio = by[(isa, num, content)]["gbps"] / by[(isa, den, content)]["gbps"]
                minimum = minimums[isa]
                out.append({"target": desc, "isa": isa, "ratio": ratio, "minimum": minimum,
                            "met": ratio >= minimum})
    return out


def format_table(results: list[dict]) -> str:
    lines = [f"{'kernel':<28}{'content':<8}{'GB/s':>9}{'ns/page':>11}{'x memory_read':>15}"]
    for r in results:
        lines.append(f"{r['name']:<28}{r['content']:<8}{r['gbps']:>9.2f}{r['ns_per_page']:>11.1f}"
                     f"{r['ratio_to_memory_read']:>15.3f}")
    return "\n".join(lines)


SUMMARY = ["fused_scan", "crc32c_hw", "crc32c_insn", "hash64", "fused_scan_sw_crc"]


def format_summary(results: list[dict]) -> str:
    """One line per level: memory_read GB/s and the main kernels' ratios to it (random pages)."""
    rows = [r for r in results if r["content"] == "random"]
    isas = list(dict.fromkeys(r["isa"] for r in rows))
    by = {(r["isa"], r["name"]): r for r in rows}
    cols = [c for c in SUMMARY if any((isa, c) in by for isa in isas)]
    lines = [f"{'level':<10}{'crc32c':<15}{'memory GB/s':>12}" + "".join(f"{c:>19}" for c in cols)]
    for isa in isas:
        impl = by[(isa, "fused_scan")]["crc32c_impl"] if (isa, "fused_scan") in by else "?"
        cells = "".join(f"{by[(isa, c)]['ratio_to_memory_read']:>19.3f}" if (isa, c) in by
                        else f"{'-':>19}" for c in cols)
        lines.append(f"{isa:<10}{impl:<15}{by[(isa, 'memory_read')]['gbps']:>12.2f}{cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m udedup.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=_parse_size, default=None,
                    help="bytes per buffer (default 1 GiB; 64 MiB with --quick); suffixes K, M, G")
    ap.add_argument("--quick", action="store_true", help="smaller buffer, 5 runs")
    ap.add_argument("--runs", type=int, default=None, help="runs per kernel (median; default 7, min 5)")
    ap.add_argument("--no-python", action="store_true", help="skip the per-page Python baselines")
    ap.add_argument("--all-levels", action="store_true",
                    help="measure every instruction-set level this CPU runs (UDEDUP_ISA caps "
                         "them), interleaved in one run")
    ap.add_argument("--json", action="store_true", help="print a JSON list of results")
    try:
        args = ap.parse_args(argv)
        size = args.size or (QUICK_SIZE if args.quick else DEFAULT_SIZE)
        runs = args.runs or (5 if args.quick else 7)
        if runs < 1:
            raise UsageError("--runs must be at least 1")
        if size < pages.PAGE_SIZE:
            raise UsageError(f"--size must be at least one page ({pages.PAGE_SIZE} bytes)")
    except UsageError as err:
        print(f"udedup.bench: error: {err}", file=sys.stderr)
        return err.exit_code
    here = pages.isa()
    isas = [lv for lv in levels() if levels().index(lv) <= levels().index(here)] \
        if args.all_levels else [here]
    notes = []
    for isa in isas:
        _, skipped = plan(pages.PAGE_SIZE, not args.no_python and isa == here,
                          None if isa == here else isa)
        where = f" at {isa}" if args.all_levels else ""
        notes += [f"{name}: skipped{where} ({why})" for name, why in skipped.items()]
    progress = Progress(enabled=False if args.json else None)
    try:
        results = run(size, runs, python_baselines=not args.no_python, progress=progress.update,
                      isas=isas)
    finally:
        progress.done()
    if args.json:
        # the JSON list keeps one shape (measured rows); what was skipped goes to stderr
        for note in notes:
            print(f"udedup.bench: {note}", file=sys.stderr)
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"udedup hot path: {size / 2**20:.0f} MiB per buffer, page {pages.PAGE_SIZE} B, "
          f"kernels {here}, crc32c {pages.crc32c_impl()}, median of {runs} runs")
    for isa in isas:
        if args.all_levels:
            impl = next(r["crc32c_impl"] for r in results
                        if r["isa"] == isa and r["name"] == "fused_scan")
            print(f"\nlevel {isa} (crc32c {impl}; ratios to this level's memory_read, same run)")
        print(format_table([r for r in results if r["isa"] == isa]))
    for note in notes:
        print(note)
    if args.all_levels:
        print("\nper level, random pages, x memory_read measured in the same run:")
        print(format_summary(results))
    print()
    for t in check_targets(results):
        where = f" [{t['isa']}]" if args.all_levels else ""
        print(f"{t['target']}{where}: {t['ratio']:.2f}x (target >= {t['minimum']}x) "
              f"{'met' if t['met'] else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
