"""The daemon configuration: defaults, example file, precedence, warnings and errors."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from udedup import cli

from udedup.daemon import config
from udedup.daemon.config import Config, ConfigError, load_config
from udedup.units import parse_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "udedup.toml.example")


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch, tmp_path):
    # the tests must not pick up a real /etc/udedup/udedup.toml
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))


def write(tmp_path, text: str, name="udedup.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_example_file_lists_every_key_at_its_default():
    with open(EXAMPLE) as f:
        text = f.read()
    assert text == config.render_example(), "regenerate: python -m udedup.config > udedup.toml.example"


def test_example_file_parses_to_the_defaults(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(EXAMPLE, env={})
    assert cfg == Config()
    assert not caplog.records, "the example must not contain unknown keys"
    for section, f in config.all_keys():
        assert cfg.sources[f"{section}.{f.name}"].startswith("file "), f"{section}.{f.name} missing"


def test_defaults_without_any_file():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.ksmd.cpu_budget_percent == 20.0 and cfg.candidates.min_anon_rss == 64 << 20


def test_precedence_defaults_file_env_cli(tmp_path):
    path = write(tmp_path, "[ksmd]\ncpu_budget_percent = 30\nfast_scan_seconds = 2\n"
                           "[daemon]\ninterval = 5\n")
    env = {"UDEDUP_KSMD_CPU_BUDGET_PERCENT": "40", "UDEDUP_DAEMON_INTERVAL": "3"}
    cfg = load_config(path, env=env, overrides={"ksmd.cpu_budget_percent": "50"})
    assert cfg.ksmd.cpu_budget_percent == 50.0          # CLI beats env beats file
    assert cfg.daemon.interval == 3.0                    # env beats file
    assert cfg.ksmd.fast_scan_seconds == 2.0             # file beats default
    assert cfg.ksmd.slow_scan_seconds == 300.0           # default
    assert cfg.sources["ksmd.cpu_budget_percent"] == "command line (ksmd.cpu_budget_percent)"
    assert cfg.sources["daemon.interval"] == "environment UDEDUP_DAEMON_INTERVAL"
    assert cfg.sources["ksmd.fast_scan_seconds"] == f"file {path}"


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, "[daemon]\ninterval = 7\n")
    assert load_config(env={"UDEDUP_CONFIG": path}).daemon.interval == 7.0


def test_default_path_is_read_when_present(tmp_path, monkeypatch):
    path = write(tmp_path, "[daemon]\ninterval = 9\n", name="system.toml")
    monkeypatch.setattr(config, "DEFAULT_PATH", path)
    assert load_config(env={}).daemon.interval == 9.0


def test_environment_lists_sizes_and_booleans():
    env = {"UDEDUP_CANDIDATES_NAMES": "qemu-*, java", "UDEDUP_CANDIDATES_UIDS": "0,1000",
           "UDEDUP_CANDIDATES_MIN_ANON_RSS": "1.5G", "UDEDUP_REGISTRATION_ALLOW_INJECTION": "yes",
           "UDEDUP_FORCE_SOFTWARE": "1"}   # not a config variable: silently someone else's
    cfg = load_config(env=env)
    assert cfg.candidates.names == ["qemu-*", "java"]
    assert cfg.candidates.uids == [0, 1000]
    assert cfg.candidates.min_anon_rss == int(1.5 * (1 << 30))
    assert cfg.registration.allow_injection is True


@pytest.mark.parametrize("text,expected", [
    (4096, 4096), ("4096", 4096), ("64 MiB", 64 << 20), ("64M", 64 << 20), ("64mb", 64 << 20),
    ("1G", 1 << 30), ("2 GiB", 2 << 30), ("1.5k", 1536), ("3T", 3 << 40), (0, 0)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12 parsecs", "-5", "MiB", "", True, -1, "1e3"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_unknown_keys_and_sections_are_warned_not_fatal(tmp_path, caplog):
    path = write(tmp_path, "[ksmd]\ncpu_budget_precent = 5\n[deamon]\ninterval = 1\n")
    with caplog.at_level(logging.WARNING, logger="udedup.config"):
        cfg = load_config(path, env={"UDEDUP_KSMD_TURBO": "1"})
    text = caplog.text
    assert f"{path}: unknown key [ksmd] cpu_budget_precent" in text
    assert "cpu_budget_percent" in text                  # the known keys are listed
    assert f"{path}: unknown section [deamon]" in text
    assert "UDEDUP_KSMD_TURBO: unknown key [ksmd] turbo" in text
    assert cfg == Config()


@pytest.mark.parametrize("toml,key,words", [
    ("[ksmd]\ncpu_budget_percent = \"lots\"\n", "ksmd.cpu_budget_percent", "expected a number"),
    ("[ksmd]\ncpu_budget_percent = 0\n", "ksmd.cpu_budget_percent", "at least 0.1"),
    ("[ksmd]\ncpu_budget_percent = 101\n", "ksmd.cpu_budget_percent", "at most 100"),
    ("[ksmd]\nsettle_scans = 2.5\n", "ksmd.settle_scans", "expected an integer"),
    ("[ksmd]\nstop_when_idle = \"yes\"\n", "ksmd.stop_when_idle", "expected true or false"),
    ("[ksmd]\nuse_zero_pages = \"maybe\"\n", "ksmd.use_zero_pages", "keep, on, off"),
    ("[daemon]\non_exit = \"explode\"\n", "daemon.on_exit", "restore, leave"),
    ("[candidates]\nnames = \"qemu\"\n", "candidates.names", "expected a list"),
    ("[candidates]\ncmdline = [\"(unclosed\"]\n", "candidates.cmdline", "bad regular expression"),
    ("[candidates]\nuids = [-1]\n", "candidates.uids", "non-negative integer uids"),
    ("[candidates]\nmin_anon_rss = \"big\"\n", "candidates.min_anon_rss", "expected a size"),
    ("[metrics]\naddress = \"9847\"\n", "metrics.address", "HOST:PORT"),
    ("[metrics]\naddress = \"0.0.0.0:9847\"\n", "metrics.address", "not a loopback address"),
    ("[ksmd]\nfast_scan_seconds = 600\n", "ksmd.fast_scan_seconds", "slow_scan_seconds"),
    ("[daemon]\nstate_file = \"\"\n", "daemon.state_file", "must not be empty"),
    ("ksmd = 3\n", "ksmd", "must be a table"),
])
def test_bad_values_name_file_and_key(tmp_path, toml, key, words):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert path in str(err) and err.key == key and words in str(err)
    assert err.exit_code == 10 and "\n" not in str(err)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"environment UDEDUP_DAEMON_INTERVAL: \[daemon\] interval"):
        load_config(env={"UDEDUP_DAEMON_INTERVAL": "soon"})


def test_non_loopback_metrics_allowed_when_asked(tmp_path):
    path = write(tmp_path, "[metrics]\naddress = \"0.0.0.0:9847\"\nallow_non_loopback = true\n")
    assert load_config(path, env={}).metrics.address == "0.0.0.0:9847"
    for ok in ("127.0.0.1:1", "[::1]:9847", "localhost:80", ""):
        assert load_config(env={}, overrides={"metrics.address": ok}).metrics.address == ok


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.toml"), env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[ksmd\n"), env={})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path), env={})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(env={}, overrides={"ksmd.turbo": "1"})


def test_every_field_has_help_and_a_kind():
    kinds = {"size", "int", "float", "bool", "str", "choice", "globs", "regexes", "uids"}
    for section, f in config.all_keys():
        assert f.metadata["kind"] in kinds and f.metadata["help"], f"{section}.{f.name}"
        default = getattr(getattr(Config(), section), f.name)
        assert config.convert(f, default) == default    # every default passes its own validation


# --- the command line -----------------------------------------------------------------------------
def test_cli_print_config_json(capsys, tmp_path):
    path = write(tmp_path, "[ksmd]\ncpu_budget_percent = 12\n")
    rc = cli.main(["daemon", "--config", path, "--print-config", "--json", "--interval", "2",
                   "--set", "candidates.names=qemu-*,java"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ksmd"]["cpu_budget_percent"] == 12.0
    assert out["daemon"]["interval"] == 2.0
    assert out["candidates"]["names"] == ["qemu-*", "java"]
    assert set(out) == set(config.SECTIONS)


@pytest.mark.parametrize("argv,code,words", [
    (["--set", "ksmd.cpu_budget_percent=abc"], 10, "expected a number"),
    (["--set", "nonsense"], 2, "SECTION.KEY=VALUE"),
    (["--set", "ksmd.turbo=1"], 10, "unknown key"),
    (["--config", "/nonexistent/udedup.toml"], 10, "not found"),
    (["--metrics-address", "10.0.0.1:80"], 10, "not a loopback address"),
])
def test_cli_bad_input_one_line(capsys, argv, code, words):
    rc = cli.main(["daemon", "--print-config", *argv])
    err = capsys.readouterr().err
    assert rc == code
    assert err.startswith("udedup: error: ") and words in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_dataclass_defaults_are_independent():
    a, b = Config(), Config()
    a.candidates.names.append("x")
    assert b.candidates.names == [] and dataclasses.fields(Config)
