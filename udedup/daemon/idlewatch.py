"""The idle watch: between the rounds of a quiet host, a check cheap enough to run every
``daemon.interval`` that calls a round as soon as something a round would act on moves.

Once nothing moved for a few rounds (KSM's counters, the candidates, no action of ours) in slow or
stopped mode, full rounds come every ``daemon.idle_interval`` instead of every ``daemon.interval``;
a round reads every process's status and the candidates' smaps, maps and pagemap, while this
check reads four KSM counters, the /proc listing and the candidates' status files. It calls a
round when:

- one of the counters (:data:`WATCHED_COUNTERS`) moved: a full scan ended (the policy's
  steadiness test wants a round soon after each), or pages merged or unmerged beyond
  :data:`COUNTER_SLACK_PAGES` or :data:`COUNTER_SLACK_FRACTION` (a running guest's kernel writes
  a few merged pages all the time: measured on idle TCG guests, tens of pages per minute);
- a candidate exited, or its anonymous resident memory moved by more than :data:`RSS_SLACK_BYTES`
  or :data:`RSS_SLACK_FRACTION` of it;
- a new process has at least ``candidates.min_anon_rss`` anonymous resident bytes (smaller new
  processes are remembered and not read again: most processes a host starts are short and small).

A process that grows past ``min_anon_rss`` long after it started waits for the next full round.
"""
from __future__ import annotations

from ..errors import KsmError, UdedupError
from ..host.fs import ProcFs, as_procfs
from ..host.parse import status_kib

#: The KSM counters whose change calls a round (the daemon's quiet test watches the same ones).
WATCHED_COUNTERS = ("pages_sharing", "pages_shared", "ksm_zero_pages", "full_scans")
#: The merge counters may drift this much (pages, or this fraction of the value) without a round.
COUNTER_SLACK_PAGES = 256
COUNTER_SLACK_FRACTION = 0.005
#: A candidate's RssAnon may drift this much (bytes, or this fraction of it) without a round.
RSS_SLACK_BYTES = 4 << 20
RSS_SLACK_FRACTION = 0.01


def counters_moved(old, new) -> bool:
    """``old`` and ``new``: the WATCHED_COUNTERS values (ints, or None where unreadable).
    full_scans moved at all, or a merge counter beyond the slack."""
    if old is None or new is None or len(old) != len(new):
        return True
    for name, a, b in zip(WATCHED_COUNTERS, old, new):
        if a is None or b is None:
            if a != b:
                return True
            continue
        if name == "full_scans":
            if a != b:
                return True
        elif abs(b - a) > max(COUNTER_SLACK_PAGES, COUNTER_SLACK_FRACTION * a):
            return True
    return False


def counter_values(counters) -> tuple:
    """The WATCHED_COUNTERS of a counters dict, as ints (None where missing)."""
    return tuple(int(counters[k]) if k in counters else None for k in WATCHED_COUNTERS)


class IdleWatch:
    """``arm(processes)`` after a round with the round's candidates; ``moved()`` between rounds:
    None, or why a round is due now."""

    def __init__(self, procfs: ProcFs | str, ksm, min_anon_rss: int = 0):
        self.procfs = as_procfs(procfs)
        self.ksm = ksm
        self.min_anon_rss = min_anon_rss
        self._counters: tuple | None = None
        self._candidates: dict = {}     # pid -> (start_time, anon_rss)
        self._known: set = set()        # pids seen at arm time or dismissed since

    def _read_counters(self) -> tuple | None:
        try:
            return tuple(int(self.ksm.read_raw(name).strip()) for name in WATCHED_COUNTERS)
        except (KsmError, UdedupError, OSError, ValueError):
            return None

    def arm(self, processes, min_anon_rss: int | None = None) -> None:
        """Remember the host as the round just left it: ``processes`` are its candidates
        (ProcessInfo: pid, start_time, anon_rss)."""
        if min_anon_rss is not None:
            self.min_anon_rss = min_anon_rss
        self._counters = self._read_counters()
        self._candidates = {p.pid: (p.start_time, p.anon_rss) for p in processes}
        try:
            self._known = set(self.procfs.pids())
        except (UdedupError, OSError):
            self._known = set()

    def moved(self) -> str | None:
        """Why a round is due now (a short phrase for the debug log), or None."""
        if self._counters is None:
            return "not armed"
        counters = self._read_counters()
        if counters_moved(self._counters, counters):
            return "KSM counters moved"
        try:
            pids = set(self.procfs.pids())
        except (UdedupError, OSError):
            return "/proc could not be listed"
        for pid, (start, anon) in self._candidates.items():
            if pid not in pids:
                return f"candidate {pid} exited"
            st = self.procfs.maybe_stat(pid)
            status = self.procfs.maybe_status(pid)
            if st is None or status is None or st.start_time != start:
                return f"candidate {pid} exited"
            now = status_kib(status, "RssAnon")
            if abs(now - anon) > max(RSS_SLACK_BYTES, RSS_SLACK_FRACTION * anon):
                return f"candidate {pid}'s anonymous memory moved ({anon >> 20} -> {now >> 20} MiB)"
        for pid in sorted(pids - self._known):
            st = self.procfs.maybe_stat(pid)
            if st is None or st.kernel_thread or st.exited:
                self._known.add(pid)
                continue
            status = self.procfs.maybe_status(pid)
            if status is not None and status_kib(status, "RssAnon") >= self.min_anon_rss:
                return f"new process {pid} ({st.comm})"
            self._known.add(pid)
        return None
