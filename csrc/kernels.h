/* Page kernels, compiled once per instruction-set level. Each kernels_<level>.c sets the target with
 * `#pragma GCC target`, defines UD_LEVEL (the table's suffix) and UD_HWCRC (SSE4.2 crc32 available),
 * then includes this file: one C source, vectorized by the compiler for SSE2, AVX2 and AVX-512, and
 * the dispatcher (dispatch.c) picks a table at run time.
 *
 * hash64 is an accumulate-and-scramble design in the XXH3 family, re-derived here with our own keys:
 * eight 64-bit lanes, each 64-byte stripe adds lo32(d^k)*hi32(d^k) to a lane and the raw word to its
 * neighbour (so no input bit is lost to the multiply), the key slides by one word per stripe (so
 * swapping two stripes changes the result), and every 16 stripes the lanes are scrambled by a
 * bijective xorshift-multiply. The 32x32->64 multiply is what SSE2/AVX2/AVX-512 do natively. */
#include <string.h>

#include "udedup.h"

#if UD_HWCRC
#include <nmmintrin.h>
#endif

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

static inline void hash_init(uint64_t *acc)
{
    static const uint64_t init[8] = {
        0x00000000C2B2AE3Dull, 0x9E3779B185EBCA87ull, 0xC2B2AE3D27D4EB4Full, 0x165667B19E3779F9ull,
        0x85EBCA77C2B2AE63ull, 0x0000000085EBCA77ull, 0x27D4EB2F165667C5ull, 0x000000009E3779B1ull,
    };
    memcpy(acc, init, sizeof init);
}

static inline void accumulate(uint64_t *restrict acc, const uint8_t *restrict p,
                              const uint64_t *restrict key)
{
    uint64_t d[8];
    memcpy(d, p, sizeof d);
    for (int i = 0; i < 8; i++) {
        uint64_t dk = d[i] ^ key[i];
        acc[i] += d[i ^ 1] + (dk & 0xffffffffu) * (dk >> 32);
    }
}

static inline void scramble(uint64_t *acc)
{
    const uint64_t *key = ud_hash_keys + UD_SCRAMBLE_KEY;
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= key[i];
        acc[i] = a * UD_PRIME32_1;
    }
}

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

static inline void hash_stripe(uint64_t *acc, const uint8_t *p, size_t s)
{
    accumulate(acc, p, ud_hash_keys + (s % UD_STRIPES_PER_BLOCK));
    if (s % UD_STRIPES_PER_BLOCK == UD_STRIPES_PER_BLOCK - 1)
        scramble(acc);
}

static void hash64_pages(const uint8_t *buf, size_t page_size, size_t npages, uint64_t *out)
{
    size_t nstripes = page_size / UD_STRIPE;
    for (size_t n = 0; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        uint64_t acc[8];
        hash_init(acc);
        for (size_t s = 0; s < nstripes; s++)
            hash_stripe(acc, p + s * UD_STRIPE, s);
        out[n] = hash_final(acc, page_size);
    }
}

/* Exact zero check, every byte, leaving at the first non-zero 256-byte chunk: a random page costs
 * one or two cache lines, a zero page the whole page. */
static size_t zero_pages(const uint8_t *buf, size_t page_size, size_t npages, uint8_t *out)
{
    size_t nzero = 0;
    for (size_t n = 0; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        uint8_t is_zero = 1;
        for (size_t off = 0; off < page_size; off += 256) {
            uint64_t w[32], any = 0;
            size_t chunk = page_size - off < 256 ? page_size - off : 256;
            if (chunk < 256) {
                memset(w, 0, sizeof w);
                memcpy(w, p + off, chunk);
            } else {
                memcpy(w, p + off, 256);
            }
            for (int i = 0; i < 32; i++)
                any |= w[i];
            if (any) {
                is_zero = 0;
                break;
            }
        }
        out[n] = is_zero;
        nzero += is_zero;
    }
    return nzero;
}

static uint64_t sum64(const uint8_t *buf, size_t len)
{
    uint64_t acc[16] = {0};
    size_t n = len / 128;
    for (size_t b = 0; b < n; b++) {
        uint64_t w[16];
        memcpy(w, buf + b * 128, 128);
        for (int i = 0; i < 16; i++)
            acc[i] += w[i];
    }
    uint64_t total = 0;
    for (int i = 0; i < 16; i++)
        total += acc[i];
    for (size_t off = n * 128; off + 8 <= len; off += 8)
        total += ld64(buf + off);
    return total;
}

/* Fused scan with the portable CRC: the page (at most a few KiB) is hashed and zero-checked in one
 * pass, then checksummed while it is still in L1. */
static size_t scan_pages_swcrc(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *crc,
                               uint64_t *hash, uint8_t *zero)
{
    size_t nstripes = page_size / UD_STRIPE, nzero = 0;
    for (size_t n = 0; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        uint64_t acc[8], any = 0;
        hash_init(acc);
        for (size_t s = 0; s < nstripes; s++) {
            const uint8_t *q = p + s * UD_STRIPE;
            uint64_t w[8];
            memcpy(w, q, sizeof w);
            for (int i = 0; i < 8; i++)
                any |= w[i];
            hash_stripe(acc, q, s);
        }
        hash[n] = hash_final(acc, page_size);
        crc[n] = ~ud_crc32c_sw_update(0xffffffffu, p, page_size);
        zero[n] = any == 0;
        nzero += any == 0;
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

/* Fused scan, three pages interleaved for the crc32 latency; each cache line is loaded from memory
 * once and feeds the checksum, the hash lanes and the zero accumulator. */
static size_t scan_pages_hwcrc(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *crc,
                               uint64_t *hash, uint8_t *zero)
{
    size_t nstripes = page_size / UD_STRIPE, nzero = 0, n = 0;
    for (; n + 3 <= npages; n += 3) {
        const uint8_t *p[3] = {buf + n * page_size, buf + (n + 1) * page_size,
                               buf + (n + 2) * page_size};
        uint64_t acc[3][8], c[3] = {0xffffffffu, 0xffffffffu, 0xffffffffu}, any[3] = {0, 0, 0};
        hash_init(acc[0]);
        hash_init(acc[1]);
        hash_init(acc[2]);
        for (size_t s = 0; s < nstripes; s++) {
            size_t off = s * UD_STRIPE;
            for (int i = 0; i < 8; i++) {
                for (int k = 0; k < 3; k++) {
                    uint64_t w = ld64(p[k] + off + 8 * i);
                    c[k] = _mm_crc32_u64(c[k], w);
                    any[k] |= w;
                }
            }
            for (int k = 0; k < 3; k++)
                hash_stripe(acc[k], p[k] + off, s);
        }
        for (int k = 0; k < 3; k++) {
            crc[n + k] = ~(uint32_t)c[k];
            hash[n + k] = hash_final(acc[k], page_size);
            zero[n + k] = any[k] == 0;
            nzero += any[k] == 0;
        }
    }
    for (; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        uint64_t acc[8], c = 0xffffffffu, any = 0;
        hash_init(acc);
        for (size_t s = 0; s < nstripes; s++) {
            size_t off = s * UD_STRIPE;
            for (int i = 0; i < 8; i++) {
                uint64_t w = ld64(p + off + 8 * i);
                c = _mm_crc32_u64(c, w);
                any |= w;
            }
            hash_stripe(acc, p + off, s);
        }
        crc[n] = ~(uint32_t)c;
        hash[n] = hash_final(acc, page_size);
        zero[n] = any == 0;
        nzero += any == 0;
    }
    return nzero;
}
#endif

const ud_kernels UD_CAT(ud_kernels, UD_LEVEL) = {
#if UD_HWCRC
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
