"""contrib/: the container recipe, the Kubernetes manifests and the Prometheus rules name what the
daemon really needs and uses: the manifests parse, the DaemonSet has hostPID, the KSM sysfs
writable, the capabilities the code needs and no more, the config at udedup's DEFAULT_PATH and
the metrics port of that config; the ConfigMap's TOML loads without warnings; the Containerfile
copies files that exist and runs ``udedup daemon``; the rules pass ``promtool check rules`` and
``promtool test rules`` and name only metrics the daemon exports."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from udedup.daemon.config import DEFAULT_PATH, load_config
from udedup.daemon.configvalues import glob_match, parse_address
from udedup.host.domains import cut_cgroup
from udedup.ksm.journal import DEFAULT_DIR as JOURNAL_DIR

yaml = pytest.importorskip("yaml", reason="pyyaml not installed (pip install pyyaml): the "
                                          "manifests are YAML")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "contrib", "kubernetes")
PROM = os.path.join(ROOT, "contrib", "prometheus")
CONTAINERFILE = os.path.join(ROOT, "contrib", "container", "Containerfile")


def manifests() -> dict:
    """{kind: object} of every document in contrib/kubernetes/*.yaml but the kustomization."""
    out = {}
    for name in sorted(os.listdir(K8S)):
        if name.endswith(".yaml") and name != "kustomization.yaml":
            with open(os.path.join(K8S, name), encoding="utf-8") as fh:
                for doc in yaml.safe_load_all(fh):
                    assert doc["kind"] not in out, f"two {doc['kind']}s"
                    out[doc["kind"]] = doc
    return out


def config(tmp_path):
    """The ConfigMap's udedup.toml loaded as the daemon loads it, and the warnings it gave."""
    cm = manifests()["ConfigMap"]
    path = tmp_path / os.path.basename(DEFAULT_PATH)
    path.write_text(cm["data"][os.path.basename(DEFAULT_PATH)])
    warnings = []
    return load_config(str(path), env={}, warn=warnings.append), warnings


def container():
    pod = manifests()["DaemonSet"]["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    return pod, c


def test_every_yaml_parses_and_the_kustomization_lists_every_manifest():
    files = [n for n in os.listdir(K8S) if n.endswith(".yaml")]
    with open(os.path.join(K8S, "kustomization.yaml"), encoding="utf-8") as fh:
        listed = yaml.safe_load(fh)["resources"]
    assert sorted(listed) == sorted(n for n in files if n != "kustomization.yaml")
    kinds = manifests()
    assert set(kinds) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"}
    ns = kinds["Namespace"]["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == ns for k, o in kinds.items() if k != "Namespace")
    # hostPID, hostPath and added capabilities: Pod Security "baseline" would reject the pod
    assert kinds["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == \
        "privileged"
    for name in os.listdir(PROM):
        if name.endswith(".yml"):
            with open(os.path.join(PROM, name), encoding="utf-8") as fh:
                assert isinstance(yaml.safe_load(fh), dict), name


def test_configmap_toml_loads_without_warnings_and_sets_pod_domains(tmp_path):
    cfg, warnings = config(tmp_path)
    assert warnings == []
    assert cfg.security.trust_domains == "cgroup" and cfg.security.cgroup_depth == 3
    assert cfg.metrics.per_cgroup and cfg.metrics.allow_non_loopback
    assert parse_address(cfg.metrics.address)[0] == "0.0.0.0"
    assert cfg.registration.allow_injection     # containers do not register themselves
    burstable = ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a.slice/"
                 "cri-containerd-c1.scope")
    besteffort = ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2b.slice/"
                  "cri-containerd-c2.scope")
    guaranteed = "/kubepods.slice/kubepods-pod3c.slice/cri-containerd-c3.scope"
    cgroupfs = "/kubepods/burstable/pod4d/0123abcd"
    d = cfg.security.cgroup_depth
    # Burstable and BestEffort: the pod (its containers, the pause container too, share it)
    assert cut_cgroup(burstable, d) == burstable.rsplit("/", 1)[0]
    assert cut_cgroup(burstable.replace("c1", "c9"), d) == cut_cgroup(burstable, d)
    assert cut_cgroup(besteffort, d) == besteffort.rsplit("/", 1)[0]
    # Guaranteed: one level shorter, so the container: finer than the pod, never two pods
    assert cut_cgroup(guaranteed, d) == guaranteed
    assert cut_cgroup(cgroupfs, d) == "/kubepods/burstable/pod4d"
    keys = {cut_cgroup(p, d) for p in (burstable, besteffort, guaranteed, cgroupfs)}
    assert len(keys) == 4
    # the candidate patterns take every pod, under either cgroup driver, and nothing else
    for path in (burstable, besteffort, guaranteed, cgroupfs):
        assert glob_match(cfg.candidates.cgroups, path), path
    for path in ("/system.slice/containerd.service", "/user.slice/user-0.slice", "/"):
        assert not glob_match(cfg.candidates.cgroups, path), path


def test_daemonset_names_what_the_daemon_needs(tmp_path):
    cfg, _ = config(tmp_path)
    pod, c = container()
    spec = pod["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # the node's processes: /proc of the host PID namespace, read at the configured procfs
    assert spec["hostPID"] is True and cfg.daemon.procfs == "/proc"
    # ... and its cgroup namespace: /proc/PID/cgroup paths from the root, not "/../.."
    argv = c["command"] + c["args"]
    assert argv[:3] == ["nsenter", "--cgroup=/proc/1/ns/cgroup", "--"]
    # udedup daemon, with the config the ConfigMap mounts at udedup's DEFAULT_PATH
    assert argv[3:] == ["udedup", "daemon", "--config", DEFAULT_PATH]
    etc = mounts[os.path.dirname(DEFAULT_PATH)]
    assert etc.get("readOnly") is True
    assert volumes[etc["name"]]["configMap"]["name"] == manifests()["ConfigMap"]["metadata"]["name"]
    # the KSM knobs: the host's directory at the configured ksm_root, writable
    ksm = mounts[cfg.daemon.ksm_root]
    assert not ksm.get("readOnly", False)
    assert volumes[ksm["name"]]["hostPath"]["path"] == "/sys/kernel/mm/ksm"
    # the state file and the knob journals: one host directory, so a replacement pod recovers
    run = mounts[os.path.dirname(cfg.daemon.state_file)]
    assert os.path.dirname(cfg.daemon.state_file) == JOURNAL_DIR
    assert not run.get("readOnly", False) and volumes[run["name"]]["hostPath"]["path"] == JOURNAL_DIR
    # least privilege that works: every capability dropped but the three the code needs
    sc = c["securityContext"]
    # SYS_PTRACE: the estimator reads candidates' memory (process_vm_readv) and smaps, and
    # injection runs madvise/prctl in them; DAC_READ_SEARCH: other uids' 0400 /proc files
    needed = {"SYS_PTRACE", "DAC_READ_SEARCH"}
    # SYS_ADMIN: PFNs, kpageflags, kpagecount (per-cgroup saving, the trust-domain audit), and
    # setns into the host cgroup namespace (nsenter above)
    assert cfg.metrics.per_cgroup and cfg.security.trust_domains != "none"
    needed.add("SYS_ADMIN")
    assert sc["capabilities"]["drop"] == ["ALL"] and set(sc["capabilities"]["add"]) == needed
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsUser"] == 0                            # the knobs are root's 0644 files
    assert sc["readOnlyRootFilesystem"] is True and "/tmp" in mounts
    assert sc["appArmorProfile"]["type"] == "Unconfined"
    assert pod["metadata"]["annotations"][
        "container.apparmor.security.beta.kubernetes.io/" + c["name"]] == "unconfined"
    assert spec["automountServiceAccountToken"] is False   # never talks to the API


def test_metrics_port_probe_and_scrape_match_the_config(tmp_path):
    cfg, _ = config(tmp_path)
    port = parse_address(cfg.metrics.address)[1]
    pod, c = container()
    (cport,) = c["ports"]
    assert cport["containerPort"] == port and cport["name"] == "metrics"
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == port
    assert ann["prometheus.io/path"] == "/metrics"
    probe = c["livenessProbe"]["httpGet"]
    assert probe == {"path": "/metrics", "port": "metrics"}
    svc = manifests()["Service"]["spec"]
    assert svc["selector"] == pod["metadata"]["labels"]
    assert svc["ports"][0]["targetPort"] == "metrics" and svc["ports"][0]["port"] == port
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    # the Prometheus scrape job keeps these pods and this port
    with open(os.path.join(PROM, "prometheus.yml"), encoding="utf-8") as fh:
        (job,) = [j for j in yaml.safe_load(fh)["scrape_configs"] if j["job_name"] == "udedup"]
    keeps = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
             if r.get("action") == "keep"}
    assert keeps["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == \
        pod["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keeps["__meta_kubernetes_pod_container_port_name"] == cport["name"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == \
        [manifests()["Namespace"]["metadata"]["name"]]


def containerfile_stages():
    """[(base image, [(instruction, argument text)])] of the Containerfile, line continuations
    joined, comments dropped."""
    with open(CONTAINERFILE, encoding="utf-8") as fh:
        text = re.sub(r"\\\n([ \t]*#[^\n]*\n)*", " ", fh.read())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, arg = line.partition(" ")
        if op.upper() == "FROM":
            stages.append((arg.split()[0], []))
        else:
            stages[-1][1].append((op.upper(), arg.strip()))
    return stages


def test_containerfile_copies_files_that_exist_and_runs_the_daemon():
    stages = containerfile_stages()
    assert len(stages) == 2 and all("python:3.11" in base and "bookworm" in base
                                    for base, _ in stages)
    build, run = stages[0][1], stages[1][1]
    copied = set()
    for _stage, steps in stages:
        for op, arg in steps:
            if op == "COPY" and not arg.startswith("--from"):
                *sources, _dest = shlex.split(arg)
                for src in sources:
                    assert os.path.exists(os.path.join(ROOT, src)), f"COPY {src}: no such file"
                    copied.add(src.rstrip("/"))
    # what building the wheel reads: the package metadata, the readme it names, MANIFEST.in's
    # files, the C sources and the Python package (CFFI compiles csrc/ into udedup/_native)
    assert {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "udedup.toml.example",
            "csrc", "udedup", "contrib/udedup.service"} <= copied
    assert any(op == "RUN" and "gcc" in arg for op, arg in build)
    assert any(op == "RUN" and "pip wheel" in arg for op, arg in build)
    assert not any(op == "RUN" and "gcc" in arg for op, arg in run)      # no compiler shipped
    assert any(op == "RUN" and "import udedup.pages" in arg for op, arg in run)  # the C loads
    import json
    entry = json.loads(dict(run)["ENTRYPOINT"])
    cmd = json.loads(dict(run)["CMD"])
    assert entry + cmd == ["udedup", "daemon", "--config", DEFAULT_PATH]
    _pod, c = container()
    assert c["command"][-1] == entry[-1] and c["args"] == cmd   # the DaemonSet runs the same


def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install --no-install-recommends "
                    "prometheus; CI installs it)")
    return path


def run(*argv, cwd=PROM):
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_and_tests_the_rules():
    tool = promtool()
    got = run(tool, "check", "rules", "udedup-rules.yml")
    assert got.returncode == 0, got.stdout + got.stderr
    got = run(tool, "test", "rules", "udedup-rules.test.yml")
    assert got.returncode == 0 and "SUCCESS" in got.stdout, got.stdout + got.stderr


def test_the_rule_tests_can_fail(tmp_path):
    """A cross-domain alert that no longer fires at 5 frames fails ``promtool test rules``."""
    tool = promtool()
    for name in ("udedup-rules.yml", "udedup-rules.test.yml"):
        shutil.copy(os.path.join(PROM, name), tmp_path / name)
    rules = tmp_path / "udedup-rules.yml"
    text = rules.read_text()
    assert "udedup_cross_domain_ksm_frames > 0" in text
    rules.write_text(text.replace("udedup_cross_domain_ksm_frames > 0",
                                  "udedup_cross_domain_ksm_frames > 10"))
    got = run(tool, "test", "rules", "udedup-rules.test.yml", cwd=tmp_path)
    assert got.returncode != 0 and "UdedupCrossDomainKsmPages" in got.stdout + got.stderr


def test_promtool_checks_the_prometheus_configs(tmp_path):
    tool = promtool()
    got = run(tool, "check", "config", "federation.yml")
    assert got.returncode == 0, got.stdout + got.stderr
    got = run(tool, "check", "config", "prometheus.yml")
    out = got.stdout + got.stderr
    if got.returncode != 0 and "field kubernetes_sd_configs not found" in out:
        # Debian's promtool is built without Kubernetes service discovery: check everything else
        # (the rules it loads, the relabelling) with the discovery swapped for a static target
        with open(os.path.join(PROM, "prometheus.yml"), encoding="utf-8") as fh:
            conf = yaml.safe_load(fh)
        for job in conf["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["node-1:9847"]}]
        shutil.copy(os.path.join(PROM, "udedup-rules.yml"), tmp_path / "udedup-rules.yml")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
        got = run(tool, "check", "config", "prometheus.yml", cwd=tmp_path)
        out = got.stdout + got.stderr
    assert got.returncode == 0 and "udedup-rules.yml" in out and "SUCCESS" in out, out


def rule_metric_names() -> set:
    with open(os.path.join(PROM, "udedup-rules.yml"), encoding="utf-8") as fh:
        groups = yaml.safe_load(fh)["groups"]
    exprs = " ".join(r["expr"] for g in groups for r in g["rules"])
    return set(re.findall(r"(?<![:\w])(udedup_[a-z0-9_]+)", exprs))


def test_rules_name_only_metrics_the_daemon_exports(tmp_path):
    from test_metrics_cgroups import FIVE, offenders, round_with
    from test_metrics_promtool import exposition, type_lines

    exported = set(type_lines(exposition(round_with(tmp_path, FIVE, offenders(0)))))
    names = rule_metric_names()
    assert {"udedup_cross_domain_ksm_frames", "udedup_cpu_budget_percent",
            "udedup_external_knob_changes_total", "udedup_true_saved_bytes"} <= names
    assert names <= exported, f"rules use {names - exported}, which the daemon does not export"


def test_readme_names_the_alerts_and_the_manifests():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    with open(os.path.join(PROM, "udedup-rules.yml"), encoding="utf-8") as fh:
        alerts = [r["alert"] for g in yaml.safe_load(fh)["groups"] for r in g["rules"]
                  if "alert" in r]
    assert len(alerts) == 6
    for name in alerts + ["contrib/kubernetes/", "contrib/container/Containerfile",
                          "contrib/prometheus/"]:
        assert name in readme, name
