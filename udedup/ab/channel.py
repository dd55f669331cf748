"""The one protocol between the harness and its synthetic child: JSON objects, one per line, the
child writing to its stdout and reading its stdin, the parent the other way round; and the
environment variable naming the parent, so that a child whose parent died first exits."""
from __future__ import annotations

import json
import os
import select
import subprocess
import time

#: Set by the parent to its PID; the child checks it after PR_SET_PDEATHSIG.
PARENT_ENV = "UDEDUP_AB_PARENT"


def encode(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def write_message(fd: int, obj: dict) -> None:
    """One message to ``fd`` in full (a pipe may take it in parts)."""
    data = encode(obj)
    while data:
        data = data[os.write(fd, data):]


class LineBuffer:
    """Bytes in as they come (:meth:`feed`), whole lines out (:meth:`next`, without the newline)."""

    def __init__(self):
        self._buf = b""

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk

    def next(self) -> bytes | None:
        """The next whole line received, or None until one is complete."""
        if b"\n" not in self._buf:
            return None
        line, self._buf = self._buf.split(b"\n", 1)
        return line


class Channel:
    """The parent's end: messages from a child's stdout read with a timeout (select), never
    blocking forever; commands to its stdin."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._lines = LineBuffer()

    def read(self, timeout: float) -> dict | None:
        """The next message, or None at the timeout or once the child closed its stdout."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        line = self._lines.next()
        while line is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None            # EOF: the child exited
            self._lines.feed(chunk)
            line = self._lines.next()
        return json.loads(line)

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(encode(obj))
        self.proc.stdin.flush()
