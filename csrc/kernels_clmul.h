/* CRC-32C by carry-less multiplication folding; included by kernels.h only, where the table has
 * VPCLMULQDQ on ymm (UD_CLMUL256: AVX2 CPUs that have it without AVX-512, e.g. Zen 3) or on zmm
 * (UD_CLMUL512).
 *
 * W accumulators of one vector each cover W consecutive vectors of the page and each 128-bit lane
 * is folded forward D bits (W vectors) per block; at the end the accumulators are folded into the
 * last one and its bytes are reduced with crc32 instructions. Fold constants are x^(64+D-1) and
 * x^(D-1) mod P, bit-reflected, in the high half of a qword (the -1 makes up for the one-bit shift
 * of a reflected carry-less product; tests/test_pages.py derives them); the initial register value
 * is xored into the first four bytes. Each line is loaded once into a register that feeds the fold,
 * the hash lanes and the zero accumulator. Needs page_size % (W * vector bytes) == 0. */
#define UD_K2048_LO 0xe9a5d8be00000000ull /* x^2111 mod P */
#define UD_K2048_HI 0x1426a81500000000ull /* x^2047 mod P */
#define UD_K1024_LO 0x6577b24500000000ull /* x^1087 mod P */
#define UD_K1024_HI 0x7417153f00000000ull /* x^1023 mod P */
#define UD_K512_LO 0x1c19243b00000000ull  /* x^575 mod P */
#define UD_K512_HI 0x75bba45b00000000ull  /* x^511 mod P */
#define UD_K256_LO 0x33ccbbbc00000000ull  /* x^319 mod P */
#define UD_K256_HI 0xa2158b3400000000ull  /* x^255 mod P */

#if UD_CLMUL512
#define UD_CLMUL_VEC 64
typedef __m512i cvec;
#define CV_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define CV_KBLOCK _mm512_set_epi64(UD_K2048_HI, UD_K2048_LO, UD_K2048_HI, UD_K2048_LO, \
                                   UD_K2048_HI, UD_K2048_LO, UD_K2048_HI, UD_K2048_LO)
#define CV_KSTEP _mm512_set_epi64(UD_K512_HI, UD_K512_LO, UD_K512_HI, UD_K512_LO, \
                                  UD_K512_HI, UD_K512_LO, UD_K512_HI, UD_K512_LO)
#define CV_INIT _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, 0xffffffffull)
static inline cvec cv_fold(cvec acc, cvec k, cvec data)
{
    cvec lo = _mm512_clmulepi64_epi128(acc, k, 0x00);
    cvec hi = _mm512_clmulepi64_epi128(acc, k, 0x11);
    return _mm512_ternarylogic_epi64(lo, hi, data, 0x96);
}
#define CV_XOR _mm512_xor_si512
#define CV_OR _mm512_or_si512
#define CV_STORE(p, v) _mm512_storeu_si512((void *)(p), v)
#define CV_IS_ZERO(v) (_mm512_test_epi64_mask(v, v) == 0)

#elif UD_CLMUL256
#define UD_CLMUL_VEC 32
typedef __m256i cvec;
#define CV_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define CV_KBLOCK _mm256_set_epi64x(UD_K1024_HI, UD_K1024_LO, UD_K1024_HI, UD_K1024_LO)
#define CV_KSTEP _mm256_set_epi64x(UD_K256_HI, UD_K256_LO, UD_K256_HI, UD_K256_LO)
#define CV_INIT _mm256_set_epi64x(0, 0, 0, 0xffffffffll)
static inline cvec cv_fold(cvec acc, cvec k, cvec data)
{
    cvec lo = _mm256_clmulepi64_epi128(acc, k, 0x00);
    cvec hi = _mm256_clmulepi64_epi128(acc, k, 0x11);
    return _mm256_xor_si256(_mm256_xor_si256(lo, hi), data);
}
#define CV_XOR _mm256_xor_si256
#define CV_OR _mm256_or_si256
#define CV_STORE(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define CV_IS_ZERO(v) _mm256_testz_si256(v, v)

#endif

/* four accumulators: one block is four vectors */
#define UD_CLMUL_BLOCK (4 * UD_CLMUL_VEC)

static inline uint32_t cv_reduce(cvec c0, cvec c1, cvec c2, cvec c3)
{
    const cvec k = CV_KSTEP;
    cvec s = cv_fold(cv_fold(cv_fold(c0, k, c1), k, c2), k, c3);
    uint64_t w[UD_CLMUL_VEC / 8];
    CV_STORE(w, s);
    uint64_t c = 0;
    for (int i = 0; i < UD_CLMUL_VEC / 8; i++)
        c = _mm_crc32_u64(c, w[i]);
    return ~(uint32_t)c;
}

/* The fused scan by folding: at 512 bits only. With 256-bit folds (measured on Zen 3, 2026-12-04)
 * the vector units carry both the hash and the CRC and the scan ran at 0.88-0.93x memory read, below
 * the crc32-instruction scan (kernels.h) that keeps the integer unit busy beside them (0.92-1.02x);
 * the crc32c_pages kernel alone takes the 256-bit folds (1.05-1.16x against 0.78-0.85x). */
#if UD_CLMUL512
static inline void scan_page_clmul(const uint8_t *p, size_t page_size, uint32_t *crc,
                                   uint64_t *hash, uint8_t *zero)
{
    const cvec kblock = CV_KBLOCK;
    __m512i h = _mm512_loadu_si512((const void *)hash_init_lanes);
    cvec d[4], c[4];
    for (int i = 0; i < 4; i++)
        d[i] = CV_LOAD(p + i * UD_CLMUL_VEC);
    cvec any = CV_OR(CV_OR(d[0], d[1]), CV_OR(d[2], d[3]));
    for (int i = 0; i < 4; i++)
        h = hash_stripe512(h, d[i], (size_t)i);
    c[0] = CV_XOR(d[0], CV_INIT);
    c[1] = d[1];
    c[2] = d[2];
    c[3] = d[3];
    for (size_t off = UD_CLMUL_BLOCK; off < page_size; off += UD_CLMUL_BLOCK) {
        size_t s = off / UD_STRIPE;
        UD_PREFETCH_256(p + off);
        for (int i = 0; i < 4; i++)
            d[i] = CV_LOAD(p + off + i * UD_CLMUL_VEC);
        for (int i = 0; i < 4; i++)
            c[i] = cv_fold(c[i], kblock, d[i]);
        any = CV_OR(any, CV_OR(CV_OR(d[0], d[1]), CV_OR(d[2], d[3])));
        for (int i = 0; i < 4; i++)
            h = hash_stripe512(h, d[i], s + (size_t)i);
    }
    uint64_t acc[8];
    _mm512_storeu_si512((void *)acc, h);
    *hash = hash_final(acc, page_size);
    *crc = cv_reduce(c[0], c[1], c[2], c[3]);
    *zero = CV_IS_ZERO(any);
}

static size_t scan_pages_clmul(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *crc,
                               uint64_t *hash, uint8_t *zero)
{
    if (page_size % UD_CLMUL_BLOCK)
        return scan_pages_hwcrc(buf, page_size, npages, crc, hash, zero);
    size_t nzero = 0;
    for (size_t n = 0; n < npages; n++) {
        scan_page_clmul(buf + n * page_size, page_size, crc + n, hash + n, zero + n);
        nzero += zero[n];
    }
    return nzero;
}
#endif

static void crc32c_pages_clmul(const uint8_t *buf, size_t page_size, size_t npages, uint32_t *out)
{
    if (page_size % UD_CLMUL_BLOCK) {
        crc32c_pages_hw(buf, page_size, npages, out);
        return;
    }
    const cvec kblock = CV_KBLOCK;
    for (size_t n = 0; n < npages; n++) {
        const uint8_t *p = buf + n * page_size;
        cvec c[4];
        for (int i = 0; i < 4; i++)
            c[i] = CV_LOAD(p + i * UD_CLMUL_VEC);
        c[0] = CV_XOR(c[0], CV_INIT);
        for (size_t off = UD_CLMUL_BLOCK; off < page_size; off += UD_CLMUL_BLOCK) {
#if UD_CLMUL_BLOCK >= 256
            UD_PREFETCH_256(p + off);
#else
            __builtin_prefetch(p + off + UD_PREFETCH, 0, 3);
            __builtin_prefetch(p + off + UD_PREFETCH + 64, 0, 3);
#endif
            for (int i = 0; i < 4; i++)
                c[i] = cv_fold(c[i], kblock, CV_LOAD(p + off + i * UD_CLMUL_VEC));
        }
        out[n] = cv_reduce(c[0], c[1], c[2], c[3]);
    }
}
