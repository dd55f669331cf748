"""Enabling KSM inside a running process: the target checks, then ``prctl``/``madvise`` run by the
process itself through ptrace (the syscalls are in :mod:`udedup.native`)."""
from .core import InjectResult, SyscallRecord, Target, check_target, disable, enable

__all__ = ["InjectResult", "SyscallRecord", "Target", "check_target", "disable", "enable"]
