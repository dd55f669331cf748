"""The daemon's decisions in its log, rate-limited.

The policy reports a decision when it changes, not every round (:meth:`.model.TrackedProcess.note`);
what can still repeat is a decision that flaps: ksmd's mode and knobs while bursts start and end, a
process that keeps changing its mind. :class:`DecisionLog` logs each decision at INFO (a knob changed
by someone else at WARNING), the same action about the same subject (one process, or host-wide:
mode, knobs, estimate; for knobs, the same values written) at most once per ``repeat_seconds``. A repeat within the window goes to DEBUG
(``-v``) and is held; a different decision about the subject supersedes it, else the latest held
one is logged at INFO once its window ends, with how many were held back: the log always catches
up with what the daemon does now.
"""
from __future__ import annotations

import logging
import time

#: The same action about the same subject at most once at INFO in this many seconds.
REPEAT_SECONDS = 60.0


def subject(d) -> tuple:
    """What a decision is about: one process (its kind and pid) or, host-wide, its kind."""
    return (d.kind, d.pid)


def action(d) -> str:
    """What counts as the same decision again: the action; for knob writes, the values written
    (a write of other values is a speed change, always worth its line)."""
    return f"set {d.reason.split(' (', 1)[0]}" if d.kind == "knobs" else d.action


class DecisionLog:
    def __init__(self, logger: logging.Logger, clock=time.monotonic,
                 repeat_seconds: float = REPEAT_SECONDS):
        self.log = logger
        self.clock = clock
        self.repeat_seconds = repeat_seconds
        self._seen: dict = {}       # (subject, action) -> when it was last logged at INFO
        self._held: dict = {}       # subject -> (action, latest held-back text, how many)

    def emit(self, d, prefix: str = "") -> None:
        """Log decision ``d`` (``prefix``: e.g. "dry run: would ")."""
        self.flush()
        key, now, text = subject(d), self.clock(), f"{prefix}{d}"
        if d.kind == "external":
            self.log.warning("%s", text)
            return
        what = action(d)
        last = self._seen.get((key, what))
        if last is not None and now - last < self.repeat_seconds:
            _, _, n = self._held.get(key, (None, None, 0))
            self._held[key] = (what, text, n + 1)
            self.log.debug("%s", text)
            return
        self._held.pop(key, None)   # superseded by this newer decision
        self._seen[(key, what)] = now
        self.log.info("%s", text)

    def flush(self) -> None:
        """Log at INFO the latest held-back decision of each subject whose window has ended."""
        now = self.clock()
        for key, (action, text, n) in list(self._held.items()):
            if now - self._seen[(key, action)] >= self.repeat_seconds:
                del self._held[key]
                self._seen[(key, action)] = now
                more = f" ({n - 1} more like it held back)" if n > 1 else ""
                self.log.info("%s%s", text, more)
