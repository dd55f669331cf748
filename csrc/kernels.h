/* Page kernels, compiled once per instruction-set level. Each kernels_<level>.c sets the target with
 * `#pragma GCC target` and defines UD_LEVEL (the table's suffix), then UD_HWCRC (SSE4.2 crc32),
 * UD_VEC128 (SSE2 hash lanes), UD_VEC256 (AVX2) or UD_VEC512 (AVX-512), and UD_CLMUL256/512
 * (CRC by carry-less multiplication) as the table allows, and includes this file. The dispatcher
 * (dispatch.c) picks one table at run time. The hash and the memory-read baseline are in
 * kernels_hash.h, the carry-less-multiplication CRC in kernels_clmul.h. */
#include <string.h>

#include "udedup.h"

#if UD_HWCRC
#include <nmmintrin.h>
#endif
#if UD_VEC128 || UD_VEC256 || UD_VEC512
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

#include "kernels_hash.h"

static void hash64_pages(const uint8_t *buf, size_t page_size, size_t npages, uint64_t *out)
{
    for (size_t n = 0; n < npages; n++)
        out[n] = HASH_PAGE(buf + n * page_size, page_size);
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
        for (size_t off = 0; off < page_size; off += 64) {
            /* three pages ahead (measured on Zen 3: 0.78-0.88x -> 1.05-1.09x memory read) */
            __builtin_prefetch(p0 + off + 3 * page_size, 0, 3);
            __builtin_prefetch(p1 + off + 3 * page_size, 0, 3);
            __builtin_prefetch(p2 + off + 3 * page_size, 0, 3);
            for (size_t k = off; k < off + 64; k += 8) {
                c0 = _mm_crc32_u64(c0, ld64(p0 + k));
                c1 = _mm_crc32_u64(c1, ld64(p1 + k));
                c2 = _mm_crc32_u64(c2, ld64(p2 + k));
            }
        }
        out[n] = ~(uint32_t)c0;
        out[n + 1] = ~(uint32_t)c1;
        out[n + 2] = ~(uint32_t)c2;
    }
    for (; n < npages; n++)
        out[n] = ~crc32c_hw(0xffffffffu, buf + n * page_size, page_size);
}

/* Fused scan, three pages interleaved for the crc32 latency, in one loop: each 64-byte stripe of
 * each page is loaded into vector registers for the hash and the zero check and read again (from
 * L1) as eight words for crc32, so the integer unit (crc32) and the vector units (hash) work on the
 * same lines at the same time and memory is read once. The three pages are contiguous, so the
 * prefetch runs UD_SCAN_AHEAD pages ahead of the first one. */
#ifndef UD_SCAN_AHEAD
#define UD_SCAN_AHEAD 3
#endif
static size_t scan_pages_hwcrc(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *crc,
                               uint64_t *hash, uint8_t *zero)
{
    size_t nzero = 0, n = 0;
    const size_t ahead = UD_SCAN_AHEAD * page_size;
    for (; n + 3 <= npages; n += 3) {
        const uint8_t *p0 = buf + n * page_size, *p1 = p0 + page_size, *p2 = p1 + page_size;
        uint64_t c0 = 0xffffffffu, c1 = 0xffffffffu, c2 = 0xffffffffu;
        hstate h0, h1, h2;
        zacc z0 = z_init(), z1 = z_init(), z2 = z_init();
        hs_init(&h0);
        hs_init(&h1);
        hs_init(&h2);
        for (size_t off = 0, s = 0; off < page_size; off += UD_STRIPE, s++) {
            __builtin_prefetch(p0 + off + ahead, 0, 3);
            __builtin_prefetch(p1 + off + ahead, 0, 3);
            __builtin_prefetch(p2 + off + ahead, 0, 3);
            const uint8_t *q0 = p0 + off, *q1 = p1 + off, *q2 = p2 + off;
            hs_stripe(&h0, q0, s, &z0);
            hs_stripe(&h1, q1, s, &z1);
            hs_stripe(&h2, q2, s, &z2);
            /* Hide that these are the lines just loaded into vector registers: otherwise the
             * compiler takes the crc32 words out of them (pextrq, a slow vector-to-integer move
             * per word) instead of reloading them from L1 (measured at the sse4.2 level). */
            __asm__("" : "+r"(q0), "+r"(q1), "+r"(q2));
            for (size_t k = 0; k < UD_STRIPE; k += 8) {
                c0 = _mm_crc32_u64(c0, ld64(q0 + k));
                c1 = _mm_crc32_u64(c1, ld64(q1 + k));
                c2 = _mm_crc32_u64(c2, ld64(q2 + k));
            }
        }
        hash[n] = hs_final(&h0, page_size);
        hash[n + 1] = hs_final(&h1, page_size);
        hash[n + 2] = hs_final(&h2, page_size);
        crc[n] = ~(uint32_t)c0;
        crc[n + 1] = ~(uint32_t)c1;
        crc[n + 2] = ~(uint32_t)c2;
        zero[n] = z_is_zero(z0);
        zero[n + 1] = z_is_zero(z1);
        zero[n + 2] = z_is_zero(z2);
        nzero += zero[n] + zero[n + 1] + zero[n + 2];
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


#if UD_CLMUL256 || UD_CLMUL512
#include "kernels_clmul.h"
#endif

const ud_kernels UD_CAT(ud_kernels, UD_LEVEL) = {
#if UD_CLMUL512
    .crc32c_pages = crc32c_pages_clmul,
    .scan_pages_hwcrc = scan_pages_clmul,
    .crc32c_hw = crc32c_hw,
#elif UD_CLMUL256
    .crc32c_pages = crc32c_pages_clmul,
    .scan_pages_hwcrc = scan_pages_hwcrc,
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
    .sum64 = sum64,
};
