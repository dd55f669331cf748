"""Signals held while state that must stay whole is written (the knobs, the A/B trials): the one
deferral helper for the controller, the A/B engine and the daemon.

A KeyboardInterrupt between two knob writes would leave a half-applied state with nothing to
restore it, so SIGINT/SIGTERM arriving inside :func:`held` are recorded and, by :func:`deferred`,
delivered once the block is done. Only the main thread can own signal handlers; elsewhere both are
no-ops.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Sequence

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def held(signals: Sequence[int] = DEFAULT_SIGNALS) -> Iterator[list[int]]:
    """Record ``signals`` instead of acting on them; yields the list of those that arrived (the
    caller decides what to do with them). The previous handlers are back afterwards."""
    if not main_thread():
        yield []
        return
    pending: list[int] = []
    previous: dict = {}
    # Block the signals while the handlers change hands: a signal (or a KeyboardInterrupt from a
    # handler) landing between two signal.signal() calls would leave one of ours installed,
    # recording into a list nobody reads, and every later Ctrl-C would be lost.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    except (ValueError, OSError):  # pragma: no cover - e.g. embedded interpreters
        for sig, old in previous.items():
            signal.signal(sig, old)
        previous.clear()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield pending
    finally:
        # a signal arriving while the handlers go back is delivered, on unblocking, to the
        # restored handler: as if it came just after the block
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            for sig, old in previous.items():
                signal.signal(sig, old)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def deliver(pending: Sequence[int]) -> None:
    """Act on signals recorded by :func:`held` as the handlers now installed would have."""
    for sig in dict.fromkeys(pending):
        handler = signal.getsignal(sig)
        if callable(handler):
            handler(sig, None)
        elif handler == signal.SIG_DFL and sig == signal.SIGINT:
            raise KeyboardInterrupt
        elif handler == signal.SIG_DFL:
            signal.raise_signal(sig)


@contextlib.contextmanager
def deferred(signals: Sequence[int] = (signal.SIGINT,)) -> Iterator[None]:
    """Hold ``signals`` for the block, then deliver those that came."""
    pending: list[int] = []
    try:
        with held(signals) as pending:
            yield
    finally:
        deliver(pending)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt("SIGTERM") for the duration, so every ``finally`` runs."""
    if not main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exec_defaults() -> None:
    """Before exec: Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec, so the
    command would inherit them; give it the defaults."""
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
