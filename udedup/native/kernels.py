"""The page kernels: crc32c, hash64, zero check, the fused scan, page compare and the memory-read
baseline, over any contiguous buffer, and the instruction-set level they run at.

Inputs are never copied; results are numpy arrays, or fill arrays the caller passes. One native
call covers a whole run of pages: the per-call cost (~100 ns) must be paid per batch, never per
page.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from ..errors import PageBufferError, UsageError
from .lib import c_array, check_buffer, check_output, check_pages, lib

ISA_NAMES = {lib.UD_ISA_PORTABLE: "portable", lib.UD_ISA_SSE42: "sse4.2",
             lib.UD_ISA_AVX2: "avx2", lib.UD_ISA_AVX512: "avx512"}
_ISA_LEVELS = {name: level for level, name in ISA_NAMES.items()}

#: Best instruction set this CPU runs ("portable", "sse4.2", "avx2", "avx512").
ISA_SUPPORTED: str = ISA_NAMES[lib.ud_isa_supported()]
#: The CPU has the SSE4.2 crc32 instruction (whether the kernels in use may take it: see
#: :func:`crc32c_impl`, and UDEDUP_ISA may cap the level below it).
HAS_HW_CRC32C: bool = lib.ud_isa_supported() >= lib.UD_ISA_SSE42


class ScanResult(NamedTuple):
    crc: np.ndarray   # uint32 per page: crc32c, for change detection only
    hash: np.ndarray  # uint64 per page: equality candidates, to be confirmed by compare_pages
    zero: np.ndarray  # bool per page: every byte is zero (exact)


def isa() -> str:
    """Instruction set of the kernels in use."""
    return ISA_NAMES[lib.ud_isa_active()]


_CRC_KINDS = {lib.UD_CRC_KIND_SW: "sw", lib.UD_CRC_KIND_INSN: "sse4.2",
              lib.UD_CRC_KIND_VPCLMUL256: "vpclmulqdq256", lib.UD_CRC_KIND_VPCLMUL512: "vpclmulqdq"}
_CRC_MODES = {"sw": lib.UD_CRC_OFF, "hw": lib.UD_CRC_BEST, "sse4.2": lib.UD_CRC_INSN}


def crc32c_impl() -> str:
    """Which CRC-32C path the page kernels use: ``"vpclmulqdq"`` (carry-less-multiplication folds
    on zmm, the avx512 level), ``"vpclmulqdq256"`` (the avx2 level on a CPU with VPCLMULQDQ and no
    AVX-512: crc32c_pages folds on ymm, the fused scan interleaves the crc32 instruction with the
    vector hash, which measured faster there), ``"sse4.2"`` (crc32 instruction) or ``"sw"``
    (portable tables)."""
    return _CRC_KINDS[lib.ud_crc32c_kind()]


@contextlib.contextmanager
def implementation(isa: str | None = None, crc32c: str | None = None):
    """Temporarily switch kernels: ``isa`` in ISA_NAMES values, ``crc32c`` "hw" (the fastest
    hardware path), "sse4.2" (the crc32 instruction, never carry-less folds) or "sw".

    Process-wide (the benchmark and the tests use it to measure and check every path)."""
    old_level, old_hw = lib.ud_isa_active(), lib.ud_crc32c_hw_active()
    try:
        if isa is not None:
            if isa not in _ISA_LEVELS:
                raise UsageError(f"unknown instruction set {isa!r}; use one of {sorted(_ISA_LEVELS)}")
            if lib.ud_isa_select(_ISA_LEVELS[isa]) != 0:
                raise UsageError(f"this CPU cannot run {isa!r} kernels (best: {ISA_SUPPORTED})")
        if crc32c is not None:
            if crc32c not in _CRC_MODES:
                raise UsageError(f"unknown crc32c path {crc32c!r}; use one of {sorted(_CRC_MODES)}")
            if lib.ud_crc32c_select_hw(_CRC_MODES[crc32c]) != 0:
                if lib.ud_crc32c_hw_supported():
                    raise UsageError(f"the {ISA_NAMES[lib.ud_isa_active()]} kernels have no "
                                     f"{crc32c!r} crc32c path; use 'hw'")
                raise UsageError("hardware crc32c needs SSE4.2 kernels, not available here")
        yield
    finally:
        lib.ud_isa_select(old_level)
        lib.ud_crc32c_select_hw(old_hw)


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``crc`` (0 to start), as the crc32c package computes it."""
    ptr, nbytes = check_buffer(data, "data")
    return int(lib.ud_crc32c(crc & 0xFFFFFFFF, ptr, nbytes))


def _per_page(kernel, buf, page_size, out, dtype, ctype) -> np.ndarray:
    ptr, ps, n = check_pages(buf, page_size)
    out = check_output(out, n, dtype, "out")
    if n:
        kernel(ptr, ps, n, c_array(out, ctype))
    return out


def crc32c_pages(buf, page_size=None, out=None) -> np.ndarray:
    """crc32c of every page: a change detector, never an equality test."""
    return _per_page(lib.ud_crc32c_pages, buf, page_size, out, np.uint32, "uint32_t[]")


def hash64_pages(buf, page_size=None, out=None) -> np.ndarray:
    """64-bit hash of every byte of every page: equal pages hash equal; confirm matches by bytes."""
    return _per_page(lib.ud_hash64_pages, buf, page_size, out, np.uint64, "uint64_t[]")


def zero_pages(buf, page_size=None, out=None) -> np.ndarray:
    """Exact per-page "all bytes are zero" (bool), leaving each page at its first non-zero word."""
    return _per_page(lib.ud_zero_pages, buf, page_size, out, np.bool_, "uint8_t[]")


def scan_pages(buf, page_size=None, crc_out=None, hash_out=None, zero_out=None) -> ScanResult:
    """One pass per page giving crc32c, hash64 and is_zero together."""
    ptr, ps, n = check_pages(buf, page_size)
    crc = check_output(crc_out, n, np.uint32, "crc_out")
    hsh = check_output(hash_out, n, np.uint64, "hash_out")
    zero = check_output(zero_out, n, np.bool_, "zero_out")
    if n:
        lib.ud_scan_pages(ptr, ps, n, c_array(crc, "uint32_t[]"), c_array(hsh, "uint64_t[]"),
                          c_array(zero, "uint8_t[]"))
    return ScanResult(crc, hsh, zero)


def compare_pages(a, index_a, index_b, b=None, page_size=None, out=None) -> np.ndarray:
    """Byte-compare page ``index_a[k]`` of ``a`` with page ``index_b[k]`` of ``b`` (default ``a``).

    Returns a bool array: True where the two pages are identical."""
    pa, ps, na = check_pages(a, page_size, "a")
    pb, _, nb = (pa, ps, na) if b is None else check_pages(b, ps, "b")
    ia = np.ascontiguousarray(index_a, dtype=np.int64)
    ib = np.ascontiguousarray(index_b, dtype=np.int64)
    if ia.ndim != 1 or ia.shape != ib.shape:
        raise PageBufferError(f"index arrays must be 1-D and the same length, got {ia.shape} "
                              f"and {ib.shape}")
    out = check_output(out, ia.size, np.bool_, "out")
    if ia.size == 0:
        return out
    rc = lib.ud_compare_pages(pa, na, pb, nb, ps, c_array(ia, "int64_t[]"),
                              c_array(ib, "int64_t[]"), ia.size, c_array(out, "uint8_t[]"))
    if rc != 0:
        raise PageBufferError(f"a page index is out of range (a has {na} pages, b has {nb})")
    return out


def sum64(buf) -> int:
    """Sum of the buffer's 64-bit words (mod 2**64): the plain memory-read baseline."""
    ptr, nbytes = check_buffer(buf)
    return int(lib.ud_sum64(ptr, nbytes))


__all__ = ["ISA_NAMES", "ISA_SUPPORTED", "HAS_HW_CRC32C", "ScanResult", "isa", "crc32c_impl",
           "implementation", "crc32c", "crc32c_pages", "hash64_pages", "zero_pages", "scan_pages",
           "compare_pages", "sum64"]
