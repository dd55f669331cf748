"""The native hot path against Python references, on every instruction-set level this CPU runs.

The crc32c package is the reference CRC; bytes equality and a Python all-zero check are the
references for compare and zero; the scalar (portable) hash is the reference for the vector ones.
CI runs this file twice: as is, and with UDEDUP_CRC32C=sw, which makes the portable CRC the default.
"""
from __future__ import annotations

import mmap
import os
import subprocess
import sys

import crc32c as crc32c_pkg
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udedup import pages
from udedup.errors import BufferTypeError, PageBufferError, UdedupError, UsageError

PS = pages.PAGE_SIZE
LEVELS = [lv for lv in ("portable", "sse4.2", "avx2", "avx512")
          if list(pages.ISA_NAMES.values()).index(lv)
          <= list(pages.ISA_NAMES.values()).index(pages.ISA_SUPPORTED)]
# (isa, crc path) pairs: every level with the table CRC, and with the hardware CRC where it has one;
# where the fastest hardware CRC is not the crc32 instruction (carry-less folds at the avx2 level on
# a CPU with VPCLMULQDQ), with the crc32 instruction too


def _crc_differs(lv):
    with pages.implementation(isa=lv, crc32c="hw"):
        hw = pages.crc32c_impl()
    with pages.implementation(isa=lv, crc32c="sse4.2"):
        return hw != pages.crc32c_impl()


IMPLS = ([(lv, "sw") for lv in LEVELS] + [(lv, "hw") for lv in LEVELS if lv != "portable"]
         + [(lv, "sse4.2") for lv in LEVELS if lv in ("sse4.2", "avx2") and _crc_differs(lv)])


@pytest.fixture(params=IMPLS, ids=[f"{lv}-{c}" for lv, c in IMPLS])
def impl(request):
    lv, crc = request.param
    with pages.implementation(isa=lv, crc32c=crc):
        yield request.param


def random_pages(n, seed=0, page_size=PS):
    return np.random.default_rng(seed).integers(0, 256, n * page_size, dtype=np.uint8)


def py_zero(buf, page_size=PS):
    b = bytes(buf)
    return [b[i:i + page_size] == bytes(page_size) for i in range(0, len(b), page_size)]


def py_crc(buf, page_size=PS):
    b = bytes(buf)
    return [crc32c_pkg.crc32c(b[i:i + page_size]) for i in range(0, len(b), page_size)]


def scalar_hash(buf, page_size=PS):
    with pages.implementation(isa="portable"):
        return pages.hash64_pages(buf, page_size)


# --- known answers ------------------------------------------------------------------------------
def test_known_answers(impl):
    assert pages.crc32c(b"123456789") == 0xE3069283
    assert pages.crc32c(b"") == 0
    assert pages.crc32c(b"56789", pages.crc32c(b"1234")) == 0xE3069283
    zero = bytes(PS)
    assert pages.crc32c_pages(zero)[0] == crc32c_pkg.crc32c(zero)
    r = pages.scan_pages(zero)
    assert r.zero.tolist() == [True] and r.crc[0] == crc32c_pkg.crc32c(zero)
    assert r.hash[0] == scalar_hash(zero)[0]


def test_empty_input(impl):
    for fn in (pages.crc32c_pages, pages.hash64_pages, pages.zero_pages):
        assert fn(b"").size == 0
    r = pages.scan_pages(bytearray())
    assert r.crc.size == r.hash.size == r.zero.size == 0
    assert pages.sum64(b"") == 0
    assert pages.compare_pages(b"", [], []).size == 0


def test_hash_is_stable_across_runs():
    # a fixed function: the same page must hash the same in every process (estimates across runs)
    code = ("from udedup import pages; import numpy as np; "
            "print(pages.hash64_pages(np.arange(%d, dtype=np.uint8))[0])" % PS)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == int(pages.hash64_pages(np.arange(PS, dtype=np.uint8))[0])


# --- properties against the references ------------------------------------------------------------
page_counts = st.integers(min_value=0, max_value=9)


@st.composite
def page_buffers(draw, page_size=PS):
    n = draw(page_counts)
    seed = draw(st.integers(0, 2**32 - 1))
    buf = random_pages(n, seed, page_size)
    # some pages zero, some sparse (one non-zero byte anywhere), some duplicated
    for i in range(n):
        kind = draw(st.sampled_from(["random", "zero", "sparse", "dup"]))
        page = buf[i * page_size:(i + 1) * page_size]
        if kind == "zero":
            page[:] = 0
        elif kind == "sparse":
            page[:] = 0
            page[draw(st.integers(0, page_size - 1))] = draw(st.integers(1, 255))
        elif kind == "dup" and i:
            page[:] = buf[:page_size]
    return buf


@settings(max_examples=60, deadline=None)
@given(buf=page_buffers())
def test_scan_matches_references_on_every_path(buf):
    want_crc, want_zero, want_hash = py_crc(buf), py_zero(buf), scalar_hash(buf)
    for lv, crc in IMPLS:
        with pages.implementation(isa=lv, crc32c=crc):
            r = pages.scan_pages(buf)
            assert r.crc.tolist() == want_crc, (lv, crc)
            assert r.zero.tolist() == want_zero, (lv, crc)
            assert r.hash.tolist() == want_hash.tolist(), (lv, crc)
            assert pages.crc32c_pages(buf).tolist() == want_crc, (lv, crc)
            assert pages.zero_pages(buf).tolist() == want_zero, (lv, crc)
            assert pages.hash64_pages(buf).tolist() == want_hash.tolist(), (lv, crc)
            assert pages.sum64(buf) == int(buf.view(np.uint64).sum(dtype=np.uint64)), (lv, crc)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), start=st.integers(0, 2**32 - 1))
def test_crc32c_any_length_and_alignment(data, start):
    for lv, crc in IMPLS:
        with pages.implementation(isa=lv, crc32c=crc):
            assert pages.crc32c(data, start) == crc32c_pkg.crc32c(data, start), (lv, crc)
            # misaligned view into a larger buffer
            padded = bytearray(b"\x01" + data)
            assert pages.crc32c(memoryview(padded)[1:]) == crc32c_pkg.crc32c(data)


@pytest.mark.parametrize("page_size", [64, 192, 1024, 4096, 16384, 65536])
def test_other_page_sizes(impl, page_size):
    n = 5
    buf = random_pages(n, 7, page_size)
    buf[page_size:2 * page_size] = 0
    buf[3 * page_size:4 * page_size] = buf[:page_size]
    r = pages.scan_pages(buf, page_size)
    assert r.crc.tolist() == py_crc(buf, page_size)
    assert r.zero.tolist() == py_zero(buf, page_size)
    assert r.hash.tolist() == scalar_hash(buf, page_size).tolist()
    assert r.hash[0] == r.hash[3] and len(set(r.hash.tolist())) == 4


@settings(max_examples=40, deadline=None)
@given(buf=page_buffers(), pairs=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)),
                                           max_size=20))
def test_compare_matches_bytes_equality(buf, pairs):
    n = buf.size // PS
    pairs = [(i, j) for i, j in pairs if i < n and j < n]
    ia, ib = [i for i, _ in pairs], [j for _, j in pairs]
    got = pages.compare_pages(buf, ia, ib)
    b = bytes(buf)
    assert got.tolist() == [b[i * PS:(i + 1) * PS] == b[j * PS:(j + 1) * PS] for i, j in pairs]


def test_compare_across_two_buffers():
    a = random_pages(4, 1)
    b = np.concatenate([a[2 * PS:3 * PS], random_pages(1, 2), a[:PS]])
    got = pages.compare_pages(a, [2, 0, 1, 0], [0, 2, 1, 1], b=b)
    assert got.tolist() == [True, True, False, False]


# --- single-bit flips ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_single_bit_flip_changes_hash_and_clears_zero(impl, where):
    zero = np.zeros(PS, dtype=np.uint8)
    base = random_pages(1, 3)
    pos = {"first": 0, "middle": PS // 2 + 3, "last": PS - 1}[where]
    for bit in range(8):
        for page in (zero, base):
            flipped = page.copy()
            flipped[pos] ^= 1 << bit
            both = np.concatenate([page, flipped])
            r = pages.scan_pages(both)
            assert r.hash[0] != r.hash[1]
            assert r.crc[0] != r.crc[1]
            assert not r.zero[1] or page is base
            if page is zero:
                assert r.zero.tolist() == [True, False]
                assert pages.zero_pages(both).tolist() == [True, False]


def test_swapped_stripes_hash_differently(impl):
    page = random_pages(1, 4)
    swapped = page.copy()
    swapped[:64], swapped[64:128] = page[64:128], page[:64]
    assert pages.hash64_pages(np.concatenate([page, swapped])).tolist()[0] != \
        pages.hash64_pages(swapped)[0]


# --- collisions ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_no_collision_among_a_million_random_pages():
    n, batch = 1_000_000, 50_000
    hashes = np.empty(n, dtype=np.uint64)
    rng = np.random.default_rng(99)
    for start in range(0, n, batch):
        buf = rng.integers(0, 2**64, batch * PS // 8, dtype=np.uint64)
        pages.hash64_pages(buf, out=hashes[start:start + batch])
    assert np.unique(hashes).size == n


def _single_bit_neighbour_hashes(base, bits, page_size):
    hashes = np.empty(len(bits), dtype=np.uint64)
    batch = max(1, (64 << 20) // page_size)
    for start in range(0, len(bits), batch):
        chunk = bits[start:start + batch]
        block = np.tile(base, len(chunk))
        offsets = np.arange(len(chunk)) * page_size + chunk // 8
        block[offsets] ^= (1 << (chunk % 8)).astype(np.uint8)
        pages.hash64_pages(block, page_size, out=hashes[start:start + len(chunk)])
    return hashes


def test_no_collision_among_single_bit_neighbours():
    # 10^5 pages that each differ from one page in one bit: a 4 KiB page has only 32768 bits, so
    # the 10^5 come from a 16 KiB page; every single-bit neighbour of a zero and a random system
    # page is checked too.
    big = 16384
    base = random_pages(1, 5, big)
    bits = np.random.default_rng(6).choice(big * 8, size=100_000, replace=False)
    hashes = _single_bit_neighbour_hashes(base, bits, big)
    hashes = np.append(hashes, pages.hash64_pages(base, big))
    assert np.unique(hashes).size == 100_001
    for page in (np.zeros(PS, np.uint8), random_pages(1, 13)):
        every_bit = np.arange(PS * 8)
        hashes = np.append(_single_bit_neighbour_hashes(page, every_bit, PS),
                           pages.hash64_pages(page))
        assert np.unique(hashes).size == PS * 8 + 1


# --- buffer types and bad inputs ----------------------------------------------------------------
def test_accepts_every_buffer_type_without_copying():
    data = random_pages(3, 8)
    want = pages.scan_pages(data)
    m = mmap.mmap(-1, data.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:] = data.tobytes()
    for buf in (data.tobytes(), bytearray(data.tobytes()), memoryview(data.tobytes()), m, data,
                data.view(np.uint64), data.reshape(3, PS)):
        r = pages.scan_pages(buf)
        assert r.crc.tolist() == want.crc.tolist()
        assert r.hash.tolist() == want.hash.tolist()
    del r
    m.close()


def test_fills_caller_arrays():
    data = random_pages(4, 9)
    crc = np.zeros(4, np.uint32)
    hsh = np.zeros(4, np.uint64)
    zero = np.ones(4, np.bool_)
    r = pages.scan_pages(data, crc_out=crc, hash_out=hsh, zero_out=zero)
    assert r.crc is crc and r.hash is hsh and r.zero is zero
    assert crc.tolist() == py_crc(data) and not zero.any()


def test_scanning_never_writes_the_input():
    data = random_pages(6, 10)
    data[PS:2 * PS] = 0
    before = data.copy()
    for lv, crc in IMPLS:
        with pages.implementation(isa=lv, crc32c=crc):
            pages.scan_pages(data)
            pages.crc32c_pages(data)
            pages.hash64_pages(data)
            pages.zero_pages(data)
            pages.compare_pages(data, [0, 1], [1, 0])
    assert np.array_equal(data, before)


BAD_INPUTS = [
    (lambda: pages.scan_pages(b"x" * (PS + 1)), PageBufferError, ValueError, "whole number"),
    (lambda: pages.hash64_pages(b"x" * 100), PageBufferError, ValueError, "whole number"),
    (lambda: pages.scan_pages(np.zeros((4, PS), np.uint8)[:, ::2]), BufferTypeError, TypeError,
     "non-contiguous"),
    (lambda: pages.scan_pages(memoryview(bytes(2 * PS))[::2]), BufferTypeError, TypeError,
     "contiguous"),
    (lambda: pages.scan_pages(12345), BufferTypeError, TypeError, "not a buffer"),
    (lambda: pages.crc32c_pages(bytes(PS), out=_readonly(np.zeros(1, np.uint32))),
     BufferTypeError, TypeError, "read-only"),
    (lambda: pages.crc32c_pages(bytes(PS), out=np.zeros(1, np.uint64)), BufferTypeError, TypeError,
     "dtype"),
    (lambda: pages.crc32c_pages(bytes(PS), out=np.zeros(2, np.uint32)), PageBufferError, ValueError,
     "shape"),
    (lambda: pages.zero_pages(bytes(PS), out=[0]), BufferTypeError, TypeError, "numpy array"),
    (lambda: pages.scan_pages(bytes(PS), page_size=100), PageBufferError, ValueError,
     "multiple of 64"),
    (lambda: pages.compare_pages(bytes(PS), [0], [1]), PageBufferError, ValueError, "out of range"),
    (lambda: pages.compare_pages(bytes(PS), [0, 0], [0]), PageBufferError, ValueError,
     "same length"),
    (lambda: pages.remote_readv(os.getpid(), [0], [1], b"x"), BufferTypeError, TypeError,
     "read-only"),
]


def _readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("call,cls,builtin,words", BAD_INPUTS)
def test_bad_inputs_raise_one_line_errors(call, cls, builtin, words):
    with pytest.raises(cls) as info:
        call()
    err = info.value
    assert isinstance(err, UdedupError) and isinstance(err, builtin)
    assert words in str(err) and "\n" not in str(err)


def test_implementation_switch_errors_and_restores():
    before = (pages.isa(), pages.crc32c_impl())
    with pytest.raises(UsageError):
        with pages.implementation(isa="sse9"):
            pass
    with pytest.raises(UsageError):
        with pages.implementation(crc32c="fast"):
            pass
    with pytest.raises(UsageError):
        with pages.implementation(isa="portable", crc32c="hw"):
            pass
    assert (pages.isa(), pages.crc32c_impl()) == before


def test_environment_forces_portable_crc():
    code = "from udedup import pages; print(pages.crc32c_impl(), pages.crc32c(b'123456789'))"
    env = dict(os.environ, UDEDUP_CRC32C="sw")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["sw", str(0xE3069283)]
    env = dict(os.environ, UDEDUP_ISA="portable")
    env.pop("UDEDUP_CRC32C", None)
    code = "from udedup import pages; print(pages.isa(), pages.crc32c_impl())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["portable", "sw"]


def test_default_path_reports_what_the_environment_asked():
    want_sw = (os.environ.get("UDEDUP_CRC32C") == "sw" or not pages.HAS_HW_CRC32C
               or pages.isa() == "portable")
    hw = {"avx512": {"vpclmulqdq"}, "avx2": {"sse4.2", "vpclmulqdq256"}}.get(pages.isa(), {"sse4.2"})
    assert pages.crc32c_impl() in ({"sw"} if want_sw else hw)


def test_environment_picks_the_crc32_instruction():
    code = "from udedup import pages; print(pages.isa(), pages.crc32c_impl())"
    env = dict(os.environ, UDEDUP_CRC32C="sse4.2")
    env.pop("UDEDUP_ISA", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    want = "vpclmulqdq" if pages.ISA_SUPPORTED == "avx512" else (
        "sse4.2" if pages.HAS_HW_CRC32C else "sw")
    assert out == [pages.ISA_SUPPORTED, want]


def test_crc_paths_switch_and_restore():
    with pages.implementation(isa="portable"):
        with pytest.raises(UsageError, match="needs SSE4.2"):
            with pages.implementation(crc32c="sse4.2"):
                pass
    for lv in LEVELS[1:]:
        with pages.implementation(isa=lv, crc32c="hw"):
            hw = pages.crc32c_impl()
            assert hw in {"sse4.2", "vpclmulqdq256", "vpclmulqdq"}
            if lv in ("sse4.2", "avx2"):
                with pages.implementation(crc32c="sse4.2"):
                    assert pages.crc32c_impl() == "sse4.2" and pages.isa() == lv
                assert pages.crc32c_impl() == hw


# --- CRC folding constants --------------------------------------------------------------------------
def _xpow_mod_p(n):
    # x^n mod P (CRC-32C, P = 0x11EDC6F41), bit-reflected to the kernels' convention, high half of
    # a qword: folding a 128-bit lane forward D bits multiplies its low qword by x^(64+D-1), its high
    # qword by x^(D-1) (the -1 for the one-bit shift of a reflected carry-less product)
    r = 1
    for _ in range(n):
        r <<= 1
        if r >> 32:
            r ^= 0x11EDC6F41
    return int(f"{r:032b}"[::-1], 2) << 32


def test_fold_constants_are_the_powers_of_x_they_claim():
    import re
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "kernels_clmul.h")).read()
    consts = re.findall(r"#define UD_K(\d+)_(LO|HI) (0x[0-9a-f]+)ull\s+/\* x\^(\d+) mod P", src)
    assert len(consts) >= 8
    for dist, half, value, power in consts:
        assert int(power) == int(dist) - 1 + (64 if half == "LO" else 0)
        assert int(value, 16) == _xpow_mod_p(int(power)), (dist, half)


@pytest.mark.parametrize("npages", [1, 2, 3, 4, 5, 6, 7, 31, 64])
def test_every_group_and_tail_of_the_interleaved_scan(impl, npages):
    # the crc32-instruction scan works on groups of three pages with a tail, and prefetches pages
    # ahead of the group (past the end for the last ones): every count, zero pages at every slot
    buf = random_pages(npages, 11 + npages)
    for i in range(0, npages, 3):
        buf[i * PS:(i + 1) * PS] = 0
    buf[-1] ^= 1
    r = pages.scan_pages(buf)
    assert r.crc.tolist() == py_crc(buf) and r.zero.tolist() == py_zero(buf)
    assert r.hash.tolist() == scalar_hash(buf).tolist()
    assert pages.crc32c_pages(buf).tolist() == py_crc(buf)


# --- syscalls -----------------------------------------------------------------------------------
def test_remote_readv_of_own_memory():
    src = random_pages(3, 11)
    out = bytearray(3 * PS)
    addr = src.ctypes.data
    got, err = pages.remote_readv(os.getpid(), [addr, addr + 2 * PS], [PS, PS], out)
    assert (got, err) == (2 * PS, 0)
    assert out[:PS] == src[:PS].tobytes() and out[PS:2 * PS] == src[2 * PS:].tobytes()


def test_remote_readv_reports_vanished_range():
    m = mmap.mmap(-1, 2 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(m, dtype=np.uint8)
    addr = arr.ctypes.data
    del arr
    m.close()  # the range is gone now
    src = random_pages(1, 12)
    out = bytearray(2 * PS)
    got, err = pages.remote_readv(os.getpid(), [src.ctypes.data, addr], [PS, PS], out)
    assert got == PS and err == 14  # EFAULT after the first, readable range


def test_remote_readv_of_missing_process():
    pid = 2**22 + 12345  # above pid_max's default ceiling
    got, err = pages.remote_readv(pid, [4096], [PS], bytearray(PS))
    assert got == 0 and err == 3  # ESRCH


def test_prctl_errors_carry_errno():
    from udedup.errors import NativeError
    with pytest.raises(NativeError) as info:
        pages.prctl(-1)
    assert info.value.errno == 22 and isinstance(info.value, OSError)
