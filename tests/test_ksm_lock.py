"""udedup.ksm.experiment_lock: the machine-wide lock of KSM tests and experiment scripts."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys


LOCK_HOLDER = r"""
import os, subprocess, sys
from udedup.ksm import experiment_lock
with experiment_lock(sys.argv[1]):
    # close_fds=False: only close-on-exec on the lock's descriptor keeps it out of the child
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             stdout=subprocess.DEVNULL, close_fds=False)
    print(child.pid, flush=True)
    os._exit(0)   # die holding the lock, as a killed test run or script does
"""


def test_a_child_started_under_the_lock_does_not_hold_it(tmp_path):
    path = str(tmp_path / "ksm.lock")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, path], stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        assert holder.wait(timeout=30) == 0
        os.kill(child, 0)                   # the child outlives the holder ...
        with open(path) as f:               # ... and must not keep the lock alive
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()
