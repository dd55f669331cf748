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
    "PAGE_SIZE": "pages",
    "Ksm": "ksm", "KsmStats": "ksm",
    "MergeableBuffer": "memory", "mergeable_array": "memory", "enable_process_merge": "memory",
    "disable_process_merge": "memory", "process_merge_enabled": "memory",
    "process_ksm": "procksm", "top_processes": "procksm",
    "enable": "inject", "disable": "inject",
    "Estimate": "estimate", "Prediction": "estimate",
    "Mapping": "procmem", "RemoteReader": "procmem", "present_pages": "procmem",
    "read_mappings": "procmem",
    "Config": "config", "load_config": "config",
    "read_daemon_state": "daemon",
    "run_ab": "abtest", "ABResult": "abtest", "ABInterrupted": "abtest",
    "SyntheticSpec": "workloads", "SyntheticWorkload": "workloads", "CommandWorkload": "workloads",
    "PidWorkload": "workloads",
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
