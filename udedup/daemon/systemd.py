"""systemd ``Type=notify`` without libsystemd: READY, STATUS, WATCHDOG, RELOADING, STOPPING as
datagrams on ``$NOTIFY_SOCKET``."""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SdNotify:
    """sd_notify(3) without libsystemd: one datagram per message to ``$NOTIFY_SOCKET``."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or ""
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else (addr or None)
        usec, wpid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        self.watchdog_seconds = None
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self._sock = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                # non-blocking: a datagram socket whose reader lags blocks the sender once ten
                # messages queue up, and the daemon must never stall on its supervisor
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as err:
            # systemd gone, lagging, or the socket not ours to use: the daemon keeps working
            log.debug("sd_notify %s failed: %s", lines[0] if lines else "", err)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
