"""Trust domains: which tenant a process belongs to, as one string key per process.

A domain is a cgroup v2 path (the ``0::`` line of /proc/PID/cgroup), cut to its first ``depth``
components when ``depth`` > 0 (``depth=3`` on ``/kubepods.slice/kubepods-burstable.slice/
kubepods-burstable-pod12.slice/cri-containerd-ab.scope`` gives the pod), or an effective uid
(``uid:1000``, the uid :mod:`udedup.ksm.attribution` groups by). With ``"none"`` every process is
in the one domain ``""``. The key is what the estimator, the daemon and ``udedup audit`` compare:
two processes may share a KSM page only when their keys are equal.
"""
from __future__ import annotations

from .fs import ProcFs, as_procfs
from .parse import parse_cgroup, status_ids

KINDS = ("none", "cgroup", "uid")
#: the key of a process whose domain cannot be read (it exited, or /proc hides it): a domain of its
#: own per pid, so that it never shares with anyone
UNKNOWN = "?"


def check_kind(kind: str) -> str:
    from ..errors import UsageError
    if kind not in KINDS:
        raise UsageError(f"unknown trust domain kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind


def cut_cgroup(path: str, depth: int = 0) -> str:
    """``path`` cut to its first ``depth`` components (0: all of it); ``"/"`` stays ``"/"``."""
    if depth <= 0:
        return path or "/"
    parts = [p for p in (path or "/").split("/") if p]
    return "/" + "/".join(parts[:depth])


def domain_key(kind: str, cgroup: str | None, uid: int | None, depth: int = 0) -> str:
    """The domain key of a process with cgroup v2 path ``cgroup`` and effective uid ``uid``."""
    if kind == "none":
        return ""
    if kind == "cgroup":
        return UNKNOWN if cgroup is None else cut_cgroup(cgroup, depth)
    if kind == "uid":
        return UNKNOWN if uid is None else f"uid:{uid}"
    check_kind(kind)
    raise AssertionError(kind)  # pragma: no cover


def process_domain(pid: int, kind: str, depth: int = 0, procfs: ProcFs | str | None = None) -> str:
    """The domain key of one process (``UNKNOWN + str(pid)`` if it cannot be read)."""
    fs = as_procfs(procfs)
    if kind == "none":
        return ""
    if kind == "cgroup":
        text = fs.maybe_text(pid, "cgroup")
        path = None if text is None else parse_cgroup(text)
        if not path:       # unreadable, or no cgroup v2 line (a cgroup v1 only host)
            return f"{UNKNOWN}{pid}"
        return domain_key(kind, path, None, depth)
    status = fs.maybe_status(pid)
    uids = status_ids(status or {}, "Uid")
    if len(uids) < 2:
        return f"{UNKNOWN}{pid}"
    return domain_key(kind, None, uids[1], depth)


def process_domains(pids, kind: str, depth: int = 0,
                    procfs: ProcFs | str | None = None) -> dict[int, str]:
    """{pid: domain key} for ``pids`` (see :func:`process_domain`)."""
    check_kind(kind)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        from ..errors import UsageError
        raise UsageError(f"cgroup depth must be a whole number >= 0 (0: the whole path), got "
                         f"{depth!r}")
    fs = as_procfs(procfs)
    return {int(pid): process_domain(int(pid), kind, depth, fs) for pid in pids}
