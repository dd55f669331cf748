"""TRANSITIONAL: the native wrappers under their old module name, re-exported from
:mod:`.lib`, :mod:`.kernels`, :mod:`.syscalls` and :mod:`.ptrace` so callers that still say
``from ..native import pages`` keep working until they import from those modules."""
from __future__ import annotations

from .kernels import (HAS_HW_CRC32C, ISA_NAMES, ISA_SUPPORTED, ScanResult, compare_pages,
                      crc32c, crc32c_impl, crc32c_pages, hash64_pages, implementation, isa,
                      scan_pages, sum64, zero_pages)
from .lib import PAGE_SIZE
from .ptrace import INJECT_SUPPORTED, InjectOutcome, find_syscall_insn, inject_syscalls
from .syscalls import prctl, remote_readv

__all__ = ["PAGE_SIZE", "ISA_NAMES", "ISA_SUPPORTED", "HAS_HW_CRC32C", "ScanResult", "isa",
           "crc32c_impl", "implementation", "crc32c", "crc32c_pages", "hash64_pages", "zero_pages",
           "scan_pages", "compare_pages", "sum64", "remote_readv", "prctl", "INJECT_SUPPORTED",
           "InjectOutcome", "find_syscall_insn", "inject_syscalls"]
