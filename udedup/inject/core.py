"""Transitional: the names of the old flat ``inject`` module, now in :mod:`udedup.inject` (api,
target, ranges, session). Callers import from ``udedup.inject``; the lead deletes this shim once
udedup/daemon/loop.py, tests/test_daemon.py and scripts/bench_*.py do."""
from ..errors import InjectError, InjectRefusedError  # noqa: F401
from ..ksm.memory import PR_SET_MEMORY_MERGE  # noqa: F401
from .api import MODES, NR_MADVISE, NR_PRCTL, disable, enable  # noqa: F401
from .ranges import find_syscall_address  # noqa: F401
from .session import InjectResult, SyscallRecord  # noqa: F401
from .target import Target, check_target  # noqa: F401
