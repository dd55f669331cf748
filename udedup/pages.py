"""The hot path's public face: batched per-page kernels over any contiguous buffer.

Kept at ``udedup.pages`` for users and scripts; the wrappers live in :mod:`udedup.native`, the only
package that touches the compiled extension."""
from .native.kernels import (HAS_HW_CRC32C, ISA_NAMES, ISA_SUPPORTED, ScanResult,  # noqa: F401
                             compare_pages, crc32c, crc32c_impl, crc32c_pages, hash64_pages,
                             implementation, isa, scan_pages, sum64, zero_pages)
from .native.lib import PAGE_SIZE  # noqa: F401
from .native.ptrace import (INJECT_SUPPORTED, InjectOutcome, find_syscall_insn,  # noqa: F401
                            inject_syscalls)
from .native.syscalls import prctl, remote_readv  # noqa: F401

__all__ = ["PAGE_SIZE", "ISA_NAMES", "ISA_SUPPORTED", "HAS_HW_CRC32C", "ScanResult", "isa",
           "crc32c_impl", "implementation", "crc32c", "crc32c_pages", "hash64_pages", "zero_pages",
           "scan_pages", "compare_pages", "sum64", "remote_readv", "prctl", "INJECT_SUPPORTED",
           "InjectOutcome", "find_syscall_insn", "inject_syscalls"]
