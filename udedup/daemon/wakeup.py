"""The daemon's signals as events: handlers only set flags, and the C-level wakeup fd (a socket
pair) makes a sleeping :meth:`Signals.wait` return at once, so the loop is
``while not signals.wait(timeout)``. SIGTERM/SIGINT ask it to stop, SIGHUP to reload."""
from __future__ import annotations

import select
import signal
import socket


class Signals:
    """Handlers only set flags; the C-level wakeup fd makes :meth:`wait` return at once."""

    def __init__(self):
        self.stop = False
        self.reload = False
        self.signame: str | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old: dict = {}
        self._old_fd = None

    def install(self) -> None:
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._on_stop)
        self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum, frame) -> None:
        self.stop = True
        self.signame = signal.Signals(signum).name

    def _on_reload(self, signum, frame) -> None:
        self.reload = True

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until a signal; True when asked to stop."""
        if not (self.stop or self.reload):
            try:
                select.select([self._r], [], [], max(0.0, timeout))
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                pass
        try:
            while self._r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        return self.stop

    def take_reload(self) -> bool:
        wanted, self.reload = self.reload, False
        return wanted

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
            self._old_fd = None
        self._r.close()
        self._w.close()
