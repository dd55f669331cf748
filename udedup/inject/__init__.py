"""Enabling KSM inside a running process: the target checks (:mod:`.target`), the ranges and the
``syscall`` instruction to borrow (:mod:`.ranges`), the injected calls and their records
(:mod:`.session`, the syscalls themselves are in :mod:`udedup.native`), and ``enable``/``disable``
on top (:mod:`.api`)."""
from .api import MODES, NR_MADVISE, NR_PRCTL, disable, enable
from .ranges import find_syscall_address
from .session import InjectResult, SyscallRecord
from .target import Target, check_target

__all__ = ["MODES", "NR_MADVISE", "NR_PRCTL", "InjectResult", "SyscallRecord", "Target",
           "check_target", "disable", "enable", "find_syscall_address"]
