"""The daemon's /metrics of a realistic round pass ``promtool check metrics`` (when Debian's
``prometheus`` package is installed), follow the naming rules without it, cap the per-process
series, and are all listed in README's metrics table."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from udedup.daemon.config import Config
from udedup.daemon.metrics import DaemonCollector
from udedup.daemon.model import EstimateResult
from udedup.ksm import Ksm

from daemon_fakes import fake_proc
from fake_sysfs import COUNTERS_618
from test_truth import ZERO_PFNS
from test_truth_daemon import daemon_on_trees

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MiB = 1 << 20
TYPES = ("counter", "gauge", "histogram", "summary", "untyped", "info", "stateset")


def write_counter(sysfs, name, value) -> None:
    path = sysfs / name
    if path.exists():
        os.chmod(path, 0o644)
    path.write_text(f"{value}\n")
    os.chmod(path, 0o444)                               # read-only: a counter, not a knob


def busy_round(tmp_path, processes=8, cap=5):
    """A daemon on fake trees after two rounds: every counter 6.18 has, a true saving, ``processes``
    extra candidates with predictions (pid 100 + i predicts i + 1 MiB), and the series cap."""
    d, sysfs, procfs, clock = daemon_on_trees(tmp_path)
    for name in COUNTERS_618:
        if not (sysfs / name).exists():
            write_counter(sysfs, name, 0)
    for name, value in {"full_scans": 7, "pages_scanned": 123456, "pages_skipped": 99,
                        "pages_shared": 40, "pages_unshared": 2000, "stable_node_chains": 1,
                        "stable_node_dups": 3}.items():
        write_counter(sysfs, name, value)
    for i in range(processes):
        fake_proc(procfs, 100 + i, f"vm-{i}", [f"vm-{i}", "-m", "1G"], 1024 * (i + 1),
                  merge_any=i % 2 == 0, mappings=[(1024 * (i + 1), i % 2 == 0)])
    d.cfg.candidates.min_anon_rss = 0
    d.cfg.metrics.max_process_series = cap
    d.attach(Ksm(str(sysfs), procfs=str(procfs)))     # a controller that sees the new files
    d.observer.truth._zero_pfns = ZERO_PFNS

    def predict(infos, cfg_, use_zero, now):
        return {i.key: EstimateResult(now, (i.pid - 99) * MiB if i.pid >= 100 else 0,
                                      max(i.anon_rss, 1), 50.0) for i in infos}
    d.actor.estimator = predict
    d.run_round()
    clock[0] += 10
    d.run_round()
    return d


def exposition(d) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(lambda: d.latest, lambda: d.cfg.metrics.max_process_series))
    return generate_latest(registry).decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def type_lines(text: str) -> dict:
    """{name in the TYPE line: type}, as promtool reads them."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def test_promtool_finds_nothing(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install --no-install-recommends "
                    "prometheus); the naming rules are checked without it below")
    text = exposition(busy_round(tmp_path))
    got = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0 and not (got.stdout + got.stderr).strip(), got.stdout + got.stderr


def test_names_follow_the_conventions_without_promtool(tmp_path):
    text = exposition(busy_round(tmp_path))
    types = type_lines(text)
    helps = set(re.findall(r"^# HELP (\S+) ", text, flags=re.M))
    assert len(types) > 30 and set(types) == helps       # every family has its help
    for name, kind in types.items():
        assert re.fullmatch(r"udedup_[a-z0-9_]+", name), name
        # counters end in _total; nothing else does
        assert name.endswith("_total") == (kind == "counter"), (name, kind)
        base = name[:-len("_total")] if kind == "counter" else name
        # no type in a name (promtool: "metric name should not include type")
        assert not any(f"_{t}_" in base + "_" for t in TYPES), name
        # sizes in bytes, durations in seconds, base units only
        for word, unit in (("bytes", "_bytes"), ("seconds", "_seconds")):
            if word in base:
                assert base.endswith(unit) or f"{unit}_per_" in base, name
        assert not re.search(r"_(ms|msec|millisecs?|kb|kib|mib|gib|mb|gb)(_|$)", base), name
        if "profit" in base or "saved" in base:
            assert base.endswith("_bytes"), name
    samples = {s.name for f in families(text).values() for s in f.samples}
    # the renames of issue 15
    assert types["udedup_ksm_full_scans_total"] == "counter"
    assert "udedup_ksm_general_profit_bytes" in types and "udedup_ksm_counter" not in types
    assert types["udedup_ksm_pages_skipped_total"] == "counter"
    assert types["udedup_ksm_stable_node_dups"] == "gauge"
    assert families(text)["udedup_ksm_sleep_seconds"].samples[0].value == 0.02
    # the true saving beside the kernel's counters
    assert {"udedup_true_saved_bytes", "udedup_ksm_pages_sharing", "udedup_saved_bytes"} <= samples


def test_per_process_series_are_capped_largest_first(tmp_path):
    d = busy_round(tmp_path, processes=8, cap=5)
    fams = families(exposition(d))
    pred = {s.labels["pid"]: s.value for s in fams["udedup_process_predicted_saved_bytes"].samples}
    # 9 candidates (vm-b and 8 more; vm-a has no stat file: only the true-saving walk sees it):
    # the 5 largest predictions, the rest summed
    assert sorted(pred) == ["103", "104", "105", "106", "107", "other"]
    assert pred["107"] == 8 * MiB
    assert pred["other"] == (1 + 2 + 3) * MiB          # vm-b predicts nothing
    reg = {s.labels["pid"]: s.value for s in fams["udedup_process_registered"].samples}
    assert reg["other"] == 3.0                          # vm-b, 100 and 102
    assert fams["udedup_process_series_folded"].samples[0].value == 4
    assert fams["udedup_candidate_processes"].samples[0].value == 9
    for f in fams.values():
        if f.name.startswith("udedup_process_") and f.name != "udedup_process_series_folded":
            assert len(f.samples) <= 6, f.name
    d.cfg.metrics.max_process_series = 50               # SIGHUP: read at scrape time
    fams = families(exposition(d))
    assert "other" not in {s.labels["pid"] for s in fams["udedup_process_registered"].samples}
    assert fams["udedup_process_series_folded"].samples[0].value == 0


def test_the_cap_is_a_config_key_with_a_default():
    assert Config().metrics.max_process_series == 50


def test_every_family_is_in_the_readme_table(tmp_path):
    with open(README, encoding="utf-8") as fh:
        readme = fh.read()
    missing = [name for name in type_lines(exposition(busy_round(tmp_path)))
               if not re.search(rf"`{name}[`{{]", readme)]
    assert not missing, f"README's metrics table lacks {missing}"
