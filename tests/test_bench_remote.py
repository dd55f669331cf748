"""scripts/bench_remote.py: the remote read path per level against a plain process_vm_readv loop,
at a tiny size (reads a child process it starts and kills: needs ptrace access, as root has)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from udedup import pages
from udedup.bench import levels

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_remote.py")
TINY = ["--size", "1M", "--runs", "1", "--buffer", "256K"]


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process needs ptrace access")
def test_every_level_against_the_plain_read_loop():
    out = run(*TINY, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    here = levels()[:levels().index(pages.isa()) + 1]
    assert [(r["method"], r["isa"]) for r in rows] == [("readv", None)] + [
        (m, lv) for lv in here for m in ("readv+scan", "read_ahead+scan")]
    assert rows[0]["ratio_to_readv"] == 1.0
    for r in rows:
        assert r["gbps"] > 0 and r["bytes"] == 1 << 20 and r["buffer_bytes"] == 256 << 10
    text = run(*TINY, "--levels", here[-1]).stdout
    assert "x readv" in text and f"read_ahead+scan   {here[-1]}" in text


def test_bad_level_is_one_line():
    out = run(*TINY, "--levels", "sse9")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "level 'sse9' is not one this CPU runs" in out.stderr
