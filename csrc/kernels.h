/* Page kernels, compiled once per instruction-set level. Each kernels_<level>.c sets the target with
 * `#pragma GCC target` and defines UD_LEVEL (the table's suffix), then UD_HWCRC (SSE4.2 crc32),
 * UD_VEC256 (AVX2 intrinsics) or UD_VEC512 (AVX-512 + VPCLMULQDQ intrinsics) as the level allows, and
 * includes this file. The dispatcher (dispatch.c) picks one table at run time.
 *
 * hash64 is an accumulate-and-scramble design in the XXH3 family, re-derived here with our own keys:
 * eight 64-bit lanes; each 64-byte stripe adds lo32(d^k)*hi32(d^k) to a lane and the raw word to its
 * neighbour (so no input bit is lost to the multiply); the key slides by one word per stripe (so
 * swapping two stripes changes the result); every 16 stripes the lanes are scrambled by a bijective
 * xorshift-multiply; the final merge folds 128-bit products and avalanches. The scalar, AVX2 and
 * AVX-512 versions compute the same function bit for bit (tests check it on every level). */
#include <string.h>

#include "udedup.h"

#if UD_HWCRC
#include <nmmintrin.h>
#endif
#if UD_VEC256 || UD_VEC512
#include <immintrin.h>
#endif

/* Software prefetch a page ahead: the hardware prefetchers stop at 4 KiB boundaries, and a loop
 * doing real work per line keeps too few misses in flight on its own (measured: fused scan from
 * DRAM 17 -> 31 GB/s on Zen 4). */
#ifndef UD_PREFETCH
#define UD_PREFETCH 4096
#endif
#define UD_PREFETCH_256(p)                                                    \
    do {                                                                      \
        __builtin_prefetch((const char *)(p) + UD_PREFETCH, 0, 3);            \
        __builtin_prefetch((const char *)(p) + UD_PREFETCH + 64, 0, 3);       \
        __builtin_prefetch((const char *)(p) + UD_PREFETCH + 128, 0, 3);      \
        __builtin_prefetch((const char *)(p) + UD_PREFETCH + 192, 0, 3);      \
    } while (0)

#define UD_CAT_(a, b) a##_##b
#define UD_CAT(a, b) UD_CAT_(a, b)

#define UD_PRIME32_1 0x9E3779B1u
#define UD_PRIME64_1 0x9E3779B185EBCA87ull
#define UD_STRIPE 64
#define UD_STRIPES_PER_BLOCK 16
#define UD_SCRAMBLE_KEY 24
#define UD_FINAL_KEY 32

static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static const uint64_t hash_init_lanes[8] = {
    0x00000000C2B2AE3Dull, 0x9E3779B185EBCA87ull, 0xC2B2AE3D27D4EB4Full, 0x165667B19E3779F9ull,
    0x85EBCA77C2B2AE63ull, 0x0000000085EBCA77ull, 0x27D4EB2F165667C5ull, 0x000000009E3779B1ull,
};

static inline uint64_t mix2(uint64_t a, uint64_t b)
{
    __extension__ unsigned __int128 m = (unsigned __int128)a * b;
    return (uint64_t)m ^ (uint64_t)(m >> 64);
}

static inline uint64_t hash_final(const uint64_t *acc, size_t len)
{
    const uint64_t *key = ud_hash_keys + UD_FINAL_KEY;
    uint64_t h = (uint64_t)len * UD_PRIME64_1;
    for (int i = 0; i < 4; i++)
        h += mix2(acc[2 * i] ^ key[2 * i], acc[2 * i + 1] ^ key[2 * i + 1]);
    h ^= h >> 37;
    h *= 0x165667919E3779F9ull;
    h ^= h >> 32;
    return h;
}

/* ---- scalar hash (every level; the reference the vector versions must equal) ---------------- */
static inline void hash_stripe(uint64_t *acc, const uint8_t *p, size_t s)
{
    const uint64_t *key = ud_hash_keys + (s % UD_STRIPES_PER_BLOCK);
    uint64_t d[8];
    memcpy(d, p, sizeof d);
    for (int i = 0; i < 8; i++) {
        uint64_t dk = d[i] ^ key[i];
        acc[i] += d[i ^ 1] + (dk & 0xffffffffu) * (dk >> 32);
    }
    if (s % UD_STRIPES_PER_BLOCK == UD_STRIPES_PER_BLOCK - 1) {
        const uint64_t *skey = ud_hash_keys + UD_SCRAMBLE_KEY;
        for (int i = 0; i < 8; i++) {
            uint64_t a = acc[i];
            a ^= a >> 47;
            a ^= skey[i];
            acc[i] = a * UD_PRIME32_1;
        }
    }
}

static inline uint64_t hash_page_scalar(const uint8_t *p, size_t page_size)
{
    uint64_t acc[8];
    memcpy(acc, hash_init_lanes, sizeof acc);
    for (size_t s = 0; s < page_size / UD_STRIPE; s++)
        hash_stripe(acc, p + s * UD_STRIPE, s);
    return hash_final(acc, page_size);
}

/* ---- AVX2: two ymm of four lanes ---------------------------------------------------------------- */
#if UD_VEC256
static inline __m256i mul32_256(__m256i a, __m256i k32)
{
    /* a * k for a 32-bit k, in 64-bit lanes, without AVX-512DQ's vpmullq */
    __m256i lo = _mm256_mul_epu32(a, k32);
    __m256i hi = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), k32);
    return _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
}

static inline __m256i stripe256(__m256i acc, __m256i d, const uint64_t *key)
{
    __m256i dk = _mm256_xor_si256(d, _mm256_loadu_si256((const __m256i *)key));
    __m256i prod = _mm256_mul_epu32(dk, _mm256_srli_epi64(dk, 32));
    __m256i swapped = _mm256_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2));
    return _mm256_add_epi64(acc, _mm256_add_epi64(prod, swapped));
}

static inline __m256i scramble256(__m256i acc, const uint64_t *key)
{
    acc = _mm256_xor_si256(acc, _mm256_srli_epi64(acc, 47));
    acc = _mm256_xor_si256(acc, _mm256_loadu_si256((const __m256i *)key));
    return mul32_256(acc, _mm256_set1_epi64x(UD_PRIME32_1));
}

static inline void hash_stripe256(__m256i *a0, __m256i *a1, __m256i d0, __m256i d1, size_t s)
{
    const uint64_t *key = ud_hash_keys + (s % UD_STRIPES_PER_BLOCK);
    *a0 = stripe256(*a0, d0, key);
    *a1 = stripe256(*a1, d1, key + 4);
    if (s % UD_STRIPES_PER_BLOCK == UD_STRIPES_PER_BLOCK - 1) {
        *a0 = scramble256(*a0, ud_hash_keys + UD_SCRAMBLE_KEY);
        *a1 = scramble256(*a1, ud_hash_keys + UD_SCRAMBLE_KEY + 4);
    }
}

static inline uint64_t hash_page_vec(const uint8_t *p, size_t page_size)
{
    __m256i a0 = _mm256_loadu_si256((const __m256i *)hash_init_lanes);
    __m256i a1 = _mm256_loadu_si256((const __m256i *)(hash_init_lanes + 4));
    for (size_t s = 0; s < page_size / UD_STRIPE; s++) {
        const uint8_t *q = p + s * UD_STRIPE;
        __builtin_prefetch(q + UD_PREFETCH, 0, 3);
        hash_stripe256(&a0, &a1, _mm256_loadu_si256((const __m256i *)q),
                       _mm256_loadu_si256((const __m256i *)(q + 32)), s);
    }
    uint64_t acc[8];
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
    return hash_final(acc, page_size);
}

static uint64_t sum64_vec(const uint8_t *buf, size_t len)
{
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t off = 0;
    for (; off + 128 <= len; off += 128) {
        __builtin_prefetch(buf + off + UD_PREFETCH, 0, 3);
        __builtin_prefetch(buf + off + UD_PREFETCH + 64, 0, 3);
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(buf + off)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(buf + off + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(buf + off + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(buf + off + 96)));
    }
    uint64_t w[4], total = 0;
    _mm256_storeu_si256((__m256i *)w, _mm256_add_epi64(_mm256_add_epi64(s0, s1),
                                                       _mm256_add_epi64(s2, s3)));
    for (int i = 0; i < 4; i++)
        total += w[i];
    for (; off + 8 <= len; off += 8)
        total += ld64(buf + off);
    return total;
}
#endif

/* ---- AVX-512: one zmm of eight lanes ------------------------------------------------------------ */
#if UD_VEC512
static inline __m512i hash_stripe512(__m512i acc, __m512i d, size_t s)
{
    __m512i key = _mm512_loadu_si512((const void *)(ud_hash_keys + (s % UD_STRIPES_PER_BLOCK)));
    __m512i dk = _mm512_xor_si512(d, key);
    __m512i prod = _mm512_mul_epu32(dk, _mm512_srli_epi64(dk, 32));
    __m512i swapped = _mm512_shuffle_epi32(d, _MM_PERM_BADC);
    acc = _mm512_add_epi64(acc, _mm512_add_epi64(prod, swapped));
    if (s % UD_STRIPES_PER_BLOCK == UD_STRIPES_PER_BLOCK - 1) {
        __m512i skey = _mm512_loadu_si512((const void *)(ud_hash_keys + UD_SCRAMBLE_KEY));
        acc = _mm512_xor_si512(acc, _mm512_srli_epi64(acc, 47));
        acc = _mm512_xor_si512(acc, skey);
        acc = _mm512_mullo_epi64(acc, _mm512_set1_epi64(UD_PRIME32_1));
    }
    return acc;
}

static inline uint64_t hash_page_vec(const uint8_t *p, size_t page_size)
{
    __m512i h = _mm512_loadu_si512((const void *)hash_init_lanes);
    for (size_t s = 0; s < page_size / UD_STRIPE; s++) {
        _mm_prefetch((const char *)(p + s * UD_STRIPE + UD_PREFETCH), _MM_HINT_T0);
        h = hash_stripe512(h, _mm512_loadu_si512((const void *)(p + s * UD_STRIPE)), s);
    }
    uint64_t acc[8];
    _mm512_storeu_si512((void *)acc, h);
    return hash_final(acc, page_size);
}

static uint64_t sum64_vec(const uint8_t *buf, size_t len)
{
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t off = 0;
    for (; off + 256 <= len; off += 256) {
        UD_PREFETCH_256(buf + off);
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512((const void *)(buf + off)));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512((const void *)(buf + off + 64)));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512((const void *)(buf + off + 128)));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512((const void *)(buf + off + 192)));
    }
    uint64_t total = (uint64_t)_mm512_reduce_add_epi64(
        _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    for (; off + 8 <= len; off += 8)
        total += ld64(buf + off);
    return total;
}
#endif

#if UD_VEC256 || UD_VEC512
#define HASH_PAGE hash_page_vec
#define SUM64 sum64_vec
#else
#define HASH_PAGE hash_page_scalar
#define SUM64 sum64_scalar

static uint64_t sum64_scalar(const uint8_t *buf, size_t len)
{
    uint64_t acc[8] = {0};
    size_t off = 0;
    for (; off + 64 <= len; off += 64) {
        uint64_t w[8];
        memcpy(w, buf + off, 64);
        for (int i = 0; i < 8; i++)
            acc[i] += w[i];
    }
    uint64_t total = 0;
    for (int i = 0; i < 8; i++)
        total += acc[i];
    for (; off + 8 <= len; off += 8)
        total += ld64(buf + off);
    return total;
}
#endif

static void hash64_pages(const uint8_t *buf, size_t page_size, size_t npages, uint64_t *out)
{
    for (size_t n = 0; n < npages; n++)
        out[n] = HASH_PAGE(buf + n * page_size, page_size);
}

static inline uint64_t or_line(const uint8_t *p)
{
    uint64_t w[8], any = 0;
    memcpy(w, p, 64);
    for (int i = 0; i < 8; i++)
        any |= w[i];
    return any;
}

/* Exact zero check, every byte, leaving a page at its first non-zero word. A non-zero page almost
 * always shows it in its first word, so checking random pages costs one cache line each, and then
 * the bottleneck is how many of those scattered misses are in flight: the first line of the page
 * 64 pages ahead is prefetched into L2 (locality 2: the L2 tracks more misses than L1; measured on
 * Zen 4, 16 ahead into L1: 14 ns/page, 64 ahead into L2: 10-11 ns/page). A zero page is read whole
 * with the same page-ahead prefetch as the other kernels. */
#define UD_ZERO_AHEAD 64
static size_t zero_pages(const uint8_t *buf, size_t page_size, size_t npages, uint8_t *out)
{
    size_t nzero = 0;
    for (size_t n = 0; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        if (n + UD_ZERO_AHEAD < npages)
            __builtin_prefetch(p + UD_ZERO_AHEAD * page_size, 0, 2);
        uint8_t is_zero = ld64(p) == 0 && or_line(p) == 0;
        for (size_t off = 64; is_zero && off < page_size; off += 256) {
            UD_PREFETCH_256(p + off);
            uint64_t any = or_line(p + off);
            if (off + 64 < page_size)
                any |= or_line(p + off + 64);
            if (off + 128 < page_size)
                any |= or_line(p + off + 128);
            if (off + 192 < page_size)
                any |= or_line(p + off + 192);
            is_zero = any == 0;
        }
        out[n] = is_zero;
        nzero += is_zero;
    }
    return nzero;
}

static inline uint8_t all_zero(const uint8_t *p, size_t len)
{
    uint64_t any = 0;
    for (size_t off = 0; off < len; off += 64)
        any |= or_line(p + off);
    return any == 0;
}

/* Fused scan with the portable CRC: hash and zero check, then the checksum while the page (a few
 * KiB) is still in L1, so memory is still read once. */
static size_t scan_pages_swcrc(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *crc,
                               uint64_t *hash, uint8_t *zero)
{
    size_t nzero = 0;
    for (size_t n = 0; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        hash[n] = HASH_PAGE(p, page_size);
        zero[n] = all_zero(p, page_size);
        crc[n] = ~ud_crc32c_sw_update(0xffffffffu, p, page_size);
        nzero += zero[n];
    }
    return nzero;
}

#if !UD_HWCRC
static void crc32c_pages_sw(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *out)
{
    for (size_t n = 0; n < npages; n++)
        out[n] = ~ud_crc32c_sw_update(0xffffffffu, buf + n * page_size, page_size);
}
#endif

/* ---- SSE4.2 crc32 instruction ---------------------------------------------------------------- */
#if UD_HWCRC
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c = crc;
    while (len && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        c = _mm_crc32_u64(c, ld64(p));
        p += 8;
        len -= 8;
    }
    while (len--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return (uint32_t)c;
}

/* crc32 has a 3-cycle latency and a 1-per-cycle throughput: three pages in flight keep the unit
 * busy without the shift-and-combine step that splitting one page into three streams would need. */
static void crc32c_pages_hw(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *out)
{
    size_t n = 0;
    for (; n + 3 <= npages; n += 3) {
        const uint8_t *p0 = buf + n * page_size, *p1 = p0 + page_size, *p2 = p1 + page_size;
        uint64_t c0 = 0xffffffffu, c1 = 0xffffffffu, c2 = 0xffffffffu;
        for (size_t off = 0; off < page_size; off += 8) {
            c0 = _mm_crc32_u64(c0, ld64(p0 + off));
            c1 = _mm_crc32_u64(c1, ld64(p1 + off));
            c2 = _mm_crc32_u64(c2, ld64(p2 + off));
        }
        out[n] = ~(uint32_t)c0;
        out[n + 1] = ~(uint32_t)c1;
        out[n + 2] = ~(uint32_t)c2;
    }
    for (; n < npages; n++)
        out[n] = ~crc32c_hw(0xffffffffu, buf + n * page_size, page_size);
}

/* Fused scan, three pages interleaved for the crc32 latency. The crc32 and zero words are read
 * from L1 after the first touch of each line; memory is read once. */
static size_t scan_pages_hwcrc(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *crc,
                               uint64_t *hash, uint8_t *zero)
{
    size_t nzero = 0, n = 0;
    for (; n + 3 <= npages; n += 3) {
        const uint8_t *p0 = buf + n * page_size, *p1 = p0 + page_size, *p2 = p1 + page_size;
        uint64_t c0 = 0xffffffffu, c1 = 0xffffffffu, c2 = 0xffffffffu, z0 = 0, z1 = 0, z2 = 0;
        for (size_t off = 0; off < page_size; off += 8) {
            uint64_t w0 = ld64(p0 + off), w1 = ld64(p1 + off), w2 = ld64(p2 + off);
            c0 = _mm_crc32_u64(c0, w0);
            c1 = _mm_crc32_u64(c1, w1);
            c2 = _mm_crc32_u64(c2, w2);
            z0 |= w0;
            z1 |= w1;
            z2 |= w2;
        }
        /* the three pages (3 x page_size) are in L1/L2 now: hashing reads them from cache */
        hash[n] = HASH_PAGE(p0, page_size);
        hash[n + 1] = HASH_PAGE(p1, page_size);
        hash[n + 2] = HASH_PAGE(p2, page_size);
        crc[n] = ~(uint32_t)c0;
        crc[n + 1] = ~(uint32_t)c1;
        crc[n + 2] = ~(uint32_t)c2;
        zero[n] = z0 == 0;
        zero[n + 1] = z1 == 0;
        zero[n + 2] = z2 == 0;
        nzero += (z0 == 0) + (z1 == 0) + (z2 == 0);
    }
    for (; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        crc[n] = ~crc32c_hw(0xffffffffu, p, page_size);
        hash[n] = HASH_PAGE(p, page_size);
        zero[n] = all_zero(p, page_size);
        nzero += zero[n];
    }
    return nzero;
}
#endif

#if UD_CLMUL512

/* CRC-32C by carry-less multiplication folding (VPCLMULQDQ, 4 x 128-bit lanes per zmm), four zmm
 * accumulators folded forward 2048 bits per 256-byte block; the final 64-byte state is reduced with
 * eight crc32 instructions. Fold constants are x^(64+D-1) and x^(D-1) mod P, bit-reflected (the -1
 * makes up for the one-bit shift of a reflected carry-less product); the initial register value is
 * xored into the first four bytes. Derivation and a bit-exact model: tests/test_pages.py. */
#define UD_K2048_LO 0xe9a5d8be00000000ull /* x^2111 mod P */
#define UD_K2048_HI 0x1426a81500000000ull /* x^2047 mod P */
#define UD_K512_LO 0x1c19243b00000000ull  /* x^575 mod P */
#define UD_K512_HI 0x75bba45b00000000ull  /* x^511 mod P */

static inline __m512i fold512(__m512i acc, __m512i k, __m512i data)
{
    __m512i lo = _mm512_clmulepi64_epi128(acc, k, 0x00);
    __m512i hi = _mm512_clmulepi64_epi128(acc, k, 0x11);
    return _mm512_ternarylogic_epi64(lo, hi, data, 0x96);
}

static inline uint32_t crc_reduce(__m512i c0, __m512i c1, __m512i c2, __m512i c3)
{
    const __m512i k512 = _mm512_set_epi64(UD_K512_HI, UD_K512_LO, UD_K512_HI, UD_K512_LO,
                                          UD_K512_HI, UD_K512_LO, UD_K512_HI, UD_K512_LO);
    __m512i s = fold512(fold512(fold512(c0, k512, c1), k512, c2), k512, c3);
    uint64_t w[8];
    _mm512_storeu_si512((void *)w, s);
    uint64_t c = 0;
    for (int i = 0; i < 8; i++)
        c = _mm_crc32_u64(c, w[i]);
    return ~(uint32_t)c;
}

static inline __m512i crc_first(const uint8_t *p)
{
    return _mm512_xor_si512(_mm512_loadu_si512((const void *)p),
                            _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, 0xffffffffull));
}

/* One page: each 64-byte line is loaded once into a register that feeds the CRC fold, the hash
 * lanes and the zero accumulator. Needs page_size % 256 == 0 (every real page size). */
static inline void scan_page512(const uint8_t *p, size_t page_size, uint32_t *crc, uint64_t *hash,
                                uint8_t *zero)
{
    const __m512i k2048 = _mm512_set_epi64(UD_K2048_HI, UD_K2048_LO, UD_K2048_HI, UD_K2048_LO,
                                           UD_K2048_HI, UD_K2048_LO, UD_K2048_HI, UD_K2048_LO);
    __m512i h = _mm512_loadu_si512((const void *)hash_init_lanes);
    __m512i d0 = crc_first(p), d1 = _mm512_loadu_si512((const void *)(p + 64));
    __m512i d2 = _mm512_loadu_si512((const void *)(p + 128));
    __m512i d3 = _mm512_loadu_si512((const void *)(p + 192));
    __m512i c0 = d0, c1 = d1, c2 = d2, c3 = d3;
    __m512i any = _mm512_or_si512(_mm512_or_si512(d1, d2), d3);
    any = _mm512_or_si512(any, _mm512_loadu_si512((const void *)p));
    h = hash_stripe512(h, _mm512_loadu_si512((const void *)p), 0);
    h = hash_stripe512(h, d1, 1);
    h = hash_stripe512(h, d2, 2);
    h = hash_stripe512(h, d3, 3);
    for (size_t off = 256; off < page_size; off += 256) {
        size_t s = off / UD_STRIPE;
        UD_PREFETCH_256(p + off);
        d0 = _mm512_loadu_si512((const void *)(p + off));
        d1 = _mm512_loadu_si512((const void *)(p + off + 64));
        d2 = _mm512_loadu_si512((const void *)(p + off + 128));
        d3 = _mm512_loadu_si512((const void *)(p + off + 192));
        c0 = fold512(c0, k2048, d0);
        c1 = fold512(c1, k2048, d1);
        c2 = fold512(c2, k2048, d2);
        c3 = fold512(c3, k2048, d3);
        any = _mm512_ternarylogic_epi64(any, d0, d1, 0xfe);
        any = _mm512_ternarylogic_epi64(any, d2, d3, 0xfe);
        h = hash_stripe512(h, d0, s);
        h = hash_stripe512(h, d1, s + 1);
        h = hash_stripe512(h, d2, s + 2);
        h = hash_stripe512(h, d3, s + 3);
    }
    uint64_t acc[8];
    _mm512_storeu_si512((void *)acc, h);
    *hash = hash_final(acc, page_size);
    *crc = crc_reduce(c0, c1, c2, c3);
    *zero = _mm512_test_epi64_mask(any, any) == 0;
}

static size_t scan_pages_clmul(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *crc,
                               uint64_t *hash, uint8_t *zero)
{
    if (page_size % 256)
        return scan_pages_hwcrc(buf, page_size, npages, crc, hash, zero);
    size_t nzero = 0;
    for (size_t n = 0; n < npages; n++) {
        scan_page512(buf + n * page_size, page_size, crc + n, hash + n, zero + n);
        nzero += zero[n];
    }
    return nzero;
}

static void crc32c_pages_clmul(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *out)
{
    if (page_size % 256) {
        crc32c_pages_hw(buf, page_size, npages, out);
        return;
    }
    const __m512i k2048 = _mm512_set_epi64(UD_K2048_HI, UD_K2048_LO, UD_K2048_HI, UD_K2048_LO,
                                           UD_K2048_HI, UD_K2048_LO, UD_K2048_HI, UD_K2048_LO);
    for (size_t n = 0; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        __m512i c0 = crc_first(p), c1 = _mm512_loadu_si512((const void *)(p + 64));
        __m512i c2 = _mm512_loadu_si512((const void *)(p + 128));
        __m512i c3 = _mm512_loadu_si512((const void *)(p + 192));
        for (size_t off = 256; off < page_size; off += 256) {
            UD_PREFETCH_256(p + off);
            c0 = fold512(c0, k2048, _mm512_loadu_si512((const void *)(p + off)));
            c1 = fold512(c1, k2048, _mm512_loadu_si512((const void *)(p + off + 64)));
            c2 = fold512(c2, k2048, _mm512_loadu_si512((const void *)(p + off + 128)));
            c3 = fold512(c3, k2048, _mm512_loadu_si512((const void *)(p + off + 192)));
        }
        out[n] = crc_reduce(c0, c1, c2, c3);
    }
}
#endif

const ud_kernels UD_CAT(ud_kernels, UD_LEVEL) = {
#if UD_CLMUL512
    .crc32c_pages = crc32c_pages_clmul,
    .scan_pages_hwcrc = scan_pages_clmul,
    .crc32c_hw = crc32c_hw,
#elif UD_HWCRC
    .crc32c_pages = crc32c_pages_hw,
    .scan_pages_hwcrc = scan_pages_hwcrc,
    .crc32c_hw = crc32c_hw,
#else
    .crc32c_pages = crc32c_pages_sw,
    .scan_pages_hwcrc = 0,
    .crc32c_hw = 0,
#endif
    .hash64_pages = hash64_pages,
    .zero_pages = zero_pages,
    .scan_pages_swcrc = scan_pages_swcrc,
    .sum64 = SUM64,
};
