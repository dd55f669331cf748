/* hash64 and the memory-read baseline at each vector width; included by kernels.h only.
 *
 * hash64 is an accumulate-and-scramble design in the XXH3 family, re-derived here with our own keys:
 * eight 64-bit lanes; each 64-byte stripe adds lo32(d^k)*hi32(d^k) to a lane and the raw word to its
 * neighbour (so no input bit is lost to the multiply); the key slides by one word per stripe (so
 * swapping two stripes changes the result); every 16 stripes the lanes are scrambled by a bijective
 * xorshift-multiply; the final merge folds 128-bit products and avalanches. The scalar, SSE2, AVX2
 * and AVX-512 versions compute the same function bit for bit (tests check it on every level).
 *
 * Each width gives the same small interface, so the fused scans in kernels.h are written once:
 * hstate (the eight lanes), zacc (an OR of every byte seen), hs_init, hs_stripe (one 64-byte stripe:
 * hashed, and ORed into a zacc), hs_final, z_init, z_is_zero. */
#define UD_PRIME32_1 0x9E3779B1u
#define UD_PRIME64_1 0x9E3779B185EBCA87ull
#define UD_STRIPE 64
#define UD_STRIPES_PER_BLOCK 16
#define UD_SCRAMBLE_KEY 24
#define UD_FINAL_KEY 32
#define UD_SCRAMBLES(s) ((s) % UD_STRIPES_PER_BLOCK == UD_STRIPES_PER_BLOCK - 1)

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

static inline uint64_t or_line(const uint8_t *p)
{
    uint64_t w[8], any = 0;
    memcpy(w, p, 64);
    for (int i = 0; i < 8; i++)
        any |= w[i];
    return any;
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
    if (UD_SCRAMBLES(s)) {
        const uint64_t *skey = ud_hash_keys + UD_SCRAMBLE_KEY;
        for (int i = 0; i < 8; i++) {
            uint64_t a = acc[i];
            a ^= a >> 47;
            a ^= skey[i];
            acc[i] = a * UD_PRIME32_1;
        }
    }
}

#if UD_VEC256
/* ---- AVX2: two ymm of four lanes ---------------------------------------------------------------- */
typedef struct { __m256i a[2]; } hstate;
typedef __m256i zacc;

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

/* one stripe already in two registers (the CLMUL scans load each line once for every consumer) */
static inline void hs_stripe_regs(hstate *h, __m256i d0, __m256i d1, size_t s)
{
    const uint64_t *key = ud_hash_keys + (s % UD_STRIPES_PER_BLOCK);
    h->a[0] = stripe256(h->a[0], d0, key);
    h->a[1] = stripe256(h->a[1], d1, key + 4);
    if (UD_SCRAMBLES(s)) {
        h->a[0] = scramble256(h->a[0], ud_hash_keys + UD_SCRAMBLE_KEY);
        h->a[1] = scramble256(h->a[1], ud_hash_keys + UD_SCRAMBLE_KEY + 4);
    }
}

static inline void hs_init(hstate *h)
{
    h->a[0] = _mm256_loadu_si256((const __m256i *)hash_init_lanes);
    h->a[1] = _mm256_loadu_si256((const __m256i *)(hash_init_lanes + 4));
}

static inline void hs_stripe(hstate *h, const uint8_t *q, size_t s, zacc *z)
{
    __m256i d0 = _mm256_loadu_si256((const __m256i *)q);
    __m256i d1 = _mm256_loadu_si256((const __m256i *)(q + 32));
    *z = _mm256_or_si256(*z, _mm256_or_si256(d0, d1));
    hs_stripe_regs(h, d0, d1, s);
}

static inline uint64_t hs_final(const hstate *h, size_t len)
{
    uint64_t acc[8];
    _mm256_storeu_si256((__m256i *)acc, h->a[0]);
    _mm256_storeu_si256((__m256i *)(acc + 4), h->a[1]);
    return hash_final(acc, len);
}

static inline zacc z_init(void) { return _mm256_setzero_si256(); }
static inline int z_is_zero(zacc z) { return _mm256_testz_si256(z, z); }

#elif UD_VEC128
/* ---- SSE2: four xmm of two lanes (the sse4.2 level) ------------------------------------------- */
typedef struct { __m128i a[4]; } hstate;
typedef __m128i zacc;

static inline __m128i stripe128(__m128i acc, __m128i d, const uint64_t *key)
{
    __m128i dk = _mm_xor_si128(d, _mm_loadu_si128((const __m128i *)key));
    /* the high dwords by a (non-destructive) pshufd, one instruction where psrlq needs a copy
     * first: +5% for the fused scan at this level, in L2 and from DRAM (Zen 3) */
    __m128i prod = _mm_mul_epu32(dk, _mm_shuffle_epi32(dk, _MM_SHUFFLE(3, 3, 1, 1)));
    __m128i swapped = _mm_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2));
    return _mm_add_epi64(acc, _mm_add_epi64(prod, swapped));
}

static inline __m128i scramble128(__m128i acc, const uint64_t *key)
{
    const __m128i k32 = _mm_set1_epi64x(UD_PRIME32_1);
    acc = _mm_xor_si128(acc, _mm_srli_epi64(acc, 47));
    acc = _mm_xor_si128(acc, _mm_loadu_si128((const __m128i *)key));
    __m128i lo = _mm_mul_epu32(acc, k32);
    __m128i hi = _mm_mul_epu32(_mm_srli_epi64(acc, 32), k32);
    return _mm_add_epi64(lo, _mm_slli_epi64(hi, 32));
}

static inline void hs_init(hstate *h)
{
    for (int i = 0; i < 4; i++)
        h->a[i] = _mm_loadu_si128((const __m128i *)(hash_init_lanes + 2 * i));
}

static inline void hs_stripe_regs(hstate *h, const __m128i *d, size_t s)
{
    const uint64_t *key = ud_hash_keys + (s % UD_STRIPES_PER_BLOCK);
    for (int i = 0; i < 4; i++)
        h->a[i] = stripe128(h->a[i], d[i], key + 2 * i);
    if (UD_SCRAMBLES(s))
        for (int i = 0; i < 4; i++)
            h->a[i] = scramble128(h->a[i], ud_hash_keys + UD_SCRAMBLE_KEY + 2 * i);
}

static inline void hs_stripe(hstate *h, const uint8_t *q, size_t s, zacc *z)
{
    __m128i d[4];
    for (int i = 0; i < 4; i++)
        d[i] = _mm_loadu_si128((const __m128i *)(q + 16 * i));
    *z = _mm_or_si128(*z, _mm_or_si128(_mm_or_si128(d[0], d[1]), _mm_or_si128(d[2], d[3])));
    hs_stripe_regs(h, d, s);
}

static inline uint64_t hs_final(const hstate *h, size_t len)
{
    uint64_t acc[8];
    for (int i = 0; i < 4; i++)
        _mm_storeu_si128((__m128i *)(acc + 2 * i), h->a[i]);
    return hash_final(acc, len);
}

static inline zacc z_init(void) { return _mm_setzero_si128(); }
static inline int z_is_zero(zacc z)
{
    return _mm_movemask_epi8(_mm_cmpeq_epi8(z, _mm_setzero_si128())) == 0xffff;
}

#else
/* ---- scalar: the portable level, and the AVX-512 level's fallbacks ---------------------------- */
typedef struct { uint64_t a[8]; } hstate;
typedef uint64_t zacc;

static inline void hs_init(hstate *h) { memcpy(h->a, hash_init_lanes, sizeof h->a); }
static inline void hs_stripe(hstate *h, const uint8_t *q, size_t s, zacc *z)
{
    *z |= or_line(q);
    hash_stripe(h->a, q, s);
}
static inline uint64_t hs_final(const hstate *h, size_t len) { return hash_final(h->a, len); }
static inline zacc z_init(void) { return 0; }
static inline int z_is_zero(zacc z) { return z == 0; }
#endif

static inline uint64_t hash_page_hs(const uint8_t *p, size_t page_size)
{
    hstate h;
    zacc z = z_init();
    hs_init(&h);
    for (size_t s = 0; s < page_size / UD_STRIPE; s++) {
        __builtin_prefetch(p + s * UD_STRIPE + UD_PREFETCH, 0, 3);
        hs_stripe(&h, p + s * UD_STRIPE, s, &z);
    }
    return hs_final(&h, page_size);
}

#if UD_VEC512
/* ---- AVX-512: one zmm of eight lanes ------------------------------------------------------------ */
static inline __m512i hash_stripe512(__m512i acc, __m512i d, size_t s)
{
    __m512i key = _mm512_loadu_si512((const void *)(ud_hash_keys + (s % UD_STRIPES_PER_BLOCK)));
    __m512i dk = _mm512_xor_si512(d, key);
    __m512i prod = _mm512_mul_epu32(dk, _mm512_srli_epi64(dk, 32));
    __m512i swapped = _mm512_shuffle_epi32(d, _MM_PERM_BADC);
    acc = _mm512_add_epi64(acc, _mm512_add_epi64(prod, swapped));
    if (UD_SCRAMBLES(s)) {
        __m512i skey = _mm512_loadu_si512((const void *)(ud_hash_keys + UD_SCRAMBLE_KEY));
        acc = _mm512_xor_si512(acc, _mm512_srli_epi64(acc, 47));
        acc = _mm512_xor_si512(acc, skey);
        acc = _mm512_mullo_epi64(acc, _mm512_set1_epi64(UD_PRIME32_1));
    }
    return acc;
}

static inline uint64_t hash_page_512(const uint8_t *p, size_t page_size)
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
#define HASH_PAGE hash_page_512

static uint64_t sum64(const uint8_t *buf, size_t len)
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

#else
#define HASH_PAGE hash_page_hs

#if UD_VEC256
static uint64_t sum64(const uint8_t *buf, size_t len)
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
#else
static uint64_t sum64(const uint8_t *buf, size_t len)
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
#endif
