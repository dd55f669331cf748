"""``python -m udedup.bench``: runs on every instruction-set level this CPU has, skipping (and
saying so) the rows a level cannot run, and reports in one line what it cannot do."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from udedup import pages

# every level up to the best this CPU runs, lowest first (ISA_NAMES is keyed by level number)
LEVELS = [name for level, name in sorted(pages.ISA_NAMES.items())
          if level <= max(lv for lv, n in pages.ISA_NAMES.items() if n == pages.ISA_SUPPORTED)]
TINY = ["--quick", "--size", "1M", "--runs", "1"]   # the smallest buffer and run count


def bench(*args, isa: str | None = None):
    env = dict(os.environ)
    env.pop("UDEDUP_CRC32C", None)
    if isa is not None:
        env["UDEDUP_ISA"] = isa
    return subprocess.run([sys.executable, "-m", "udedup.bench", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("isa", LEVELS)
def test_benchmark_runs_on_every_level(isa):
    out = bench(*TINY, isa=isa)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert f"kernels {isa}," in out.stdout and "x memory_read" in out.stdout
    if isa == "portable":
        # no hardware CRC at this level: the row says why it is missing instead of crashing
        assert "crc32c_hw: skipped (hardware crc32c needs SSE4.2" in out.stdout
        assert "\ncrc32c_hw " not in out.stdout
    else:
        assert "\ncrc32c_hw " in out.stdout and "skipped" not in out.stdout


def test_portable_json_keeps_its_shape_and_notes_the_skip_on_stderr():
    out = bench(*TINY, "--json", isa="portable")
    assert out.returncode == 0 and "Traceback" not in out.stderr
    rows = json.loads(out.stdout)
    assert "crc32c_hw" not in {r["name"] for r in rows}
    assert {r["isa"] for r in rows} == {"portable"} and {r["crc32c_impl"] for r in rows} == {"sw"}
    assert "crc32c_hw: skipped" in out.stderr


def test_benchmark_runs_at_tiny_size():
    out = bench("--size", "1M", "--runs", "1", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    names = {r["name"] for r in results}
    assert {"fused_scan", "memory_read", "crc32c_package_per_page", "zero_check", "hash64",
            "crc32c_sw", "zlib_crc32_per_page", "blake2b_per_page"} <= names
    assert {r["content"] for r in results} == {"random", "zero"}
    for r in results:
        assert r["gbps"] > 0 and r["ns_per_page"] > 0 and r["ratio_to_memory_read"] > 0
    text = bench("--size", "1M", "--runs", "1").stdout
    assert "x memory_read" in text and "fused_scan vs memory_read" in text
    # the limit is memory read: no target against the crc32c package (no machine met its 30x)
    assert "crc32c package" not in text and "30.0x" not in text


def test_benchmark_bad_size_is_one_line():
    out = bench("--size", "lots")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "size 'lots' is not a number" in out.stderr


def test_all_levels_in_one_run_each_against_its_own_memory_read():
    best = pages.ISA_SUPPORTED   # not capped by the UDEDUP_ISA this suite may run under
    out = bench(*TINY, "--all-levels", "--no-python", isa=best)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    text = out.stdout
    for isa in LEVELS:
        assert f"\nlevel {isa} (crc32c " in text
    summary = text[text.index("per level, random pages"):]
    assert [line.split()[0] for line in summary.splitlines()[2:2 + len(LEVELS)]] == LEVELS
    if "sse4.2" in LEVELS:
        assert "fused_scan vs memory_read [sse4.2]:" in text and "(target >= 0.7x)" in text
    if "avx2" in LEVELS:
        assert "fused_scan vs memory_read [avx2]:" in text and "(target >= 0.85x)" in text
    rows = json.loads(bench(*TINY, "--all-levels", "--no-python", "--json", isa=best).stdout)
    assert {r["isa"] for r in rows} == set(LEVELS)
    for r in rows:
        if r["name"] == "memory_read":
            assert r["ratio_to_memory_read"] == 1.0
        assert r["crc32c_impl"] in {"sw", "sse4.2", "vpclmulqdq256", "vpclmulqdq"}
    assert {r["crc32c_impl"] for r in rows if r["isa"] == "portable"} == {"sw"}


def test_all_levels_stops_at_the_cap():
    out = bench(*TINY, "--all-levels", "--no-python", isa="portable")
    assert out.returncode == 0, out.stderr
    assert "\nlevel portable (crc32c sw" in out.stdout and "\nlevel sse4.2" not in out.stdout
