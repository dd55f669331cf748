"""udedup: measure, predict and control Linux KSM (Kernel Samepage Merging).

The public names below load on first use (PEP 562): ``import udedup`` stays cheap, so the CLI and
the daemon pay only for the modules they use (the daemon's own CPU counts against its budget).
"""
from __future__ import annotations

import importlib

from .errors import *  # noqa: F401,F403  (the exception tree is part of the public API)
from . import errors as _errors

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "PAGE_SIZE": "native.lib",
    "Ksm": "ksm", "KsmStats": "ksm",
    "true_savings": "ksm.truth", "TrueSavings": "ksm.truth", "TrueSavingsReader": "ksm.truth",
    "attribute": "ksm.attribution", "AttributionReader": "ksm.attribution",
    "Attribution": "ksm.attribution",
    "audit": "ksm.audit", "AuditReader": "ksm.audit", "AuditReport": "ksm.audit",
    "MergeableBuffer": "ksm.memory", "mergeable_array": "ksm.memory",
    "enable_process_merge": "ksm.memory", "disable_process_merge": "ksm.memory",
    "process_merge_enabled": "ksm.memory",
    "process_ksm": "ksm.process", "top_processes": "ksm.process",
    "enable": "inject", "disable": "inject",
    "Estimate": "estimate", "Prediction": "estimate",
    "Mapping": "host.maps", "RemoteReader": "host.remote", "present_pages": "host.pagemap",
    "read_mappings": "host.maps",
    "Config": "daemon.config", "load_config": "daemon.config",
    "read_daemon_state": "daemon.state",
    "run_ab": "ab.engine", "ABResult": "ab.records", "ABInterrupted": "ab.records",
    "SyntheticSpec": "ab.synthetic", "SyntheticWorkload": "ab.workloads",
    "CommandWorkload": "ab.workloads", "PidWorkload": "ab.workloads",
    "VmWorkload": "ab.vms", "VmSpec": "ab.vms",
}

__all__ = ["__version__", "estimate", *_LAZY,
           *(n for n, v in vars(_errors).items() if isinstance(v, type) and issubclass(v, Exception))]


def __getattr__(name: str):
    if name == "estimate":
        # the module is callable: udedup.estimate(pid) runs estimate.estimate
        return importlib.import_module(".estimate", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
