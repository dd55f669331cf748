"""Which processes are candidates: the ``[candidates]`` patterns against one process (pure)."""
from __future__ import annotations

from ..units import mib
from .config import Config
from .configvalues import glob_match, regex_search
from .model import ProcessInfo


def match_process(cfg: Config, proc: ProcessInfo) -> tuple[bool, str]:
    """Is ``proc`` a candidate, and why (deny lists win; size is checked last)."""
    c = cfg.candidates
    denied = (("exclude_names", glob_match(c.exclude_names, proc.name)),
              ("exclude_cmdline", regex_search(c.exclude_cmdline, proc.cmdline)),
              ("exclude_exe", glob_match(c.exclude_exe, proc.exe)),
              ("exclude_cgroups", glob_match(c.exclude_cgroups, proc.cgroup)),
              ("exclude_uids", proc.uid in c.exclude_uids))
    for key, hit in denied:
        if hit:
            return False, f"denied by candidates.{key}"
    if c.uids and proc.uid not in c.uids:
        return False, f"uid {proc.uid} not in candidates.uids"
    hits = [key for key, hit in (("names", glob_match(c.names, proc.name)),
                                 ("cmdline", regex_search(c.cmdline, proc.cmdline)),
                                 ("exe", glob_match(c.exe, proc.exe)),
                                 ("cgroups", glob_match(c.cgroups, proc.cgroup))) if hit]
    if not hits:
        if c.include_registered and (proc.registered or proc.mergeable):
            hits = ["include_registered"]
        else:
            return False, "matches no candidates pattern"
    if proc.anon_rss < c.min_anon_rss:
        return False, (f"{mib(proc.anon_rss)} anonymous resident, below candidates.min_anon_rss "
                       f"({mib(c.min_anon_rss)})")
    return True, "matched candidates." + ", ".join(hits)
