/* Run-time selection of the kernel table: probe the CPU once, honour UDEDUP_ISA (cap the level:
 * portable, sse4.2, avx2, avx512) and UDEDUP_CRC32C (sw forces the table-driven CRC, sse4.2 the
 * crc32 instruction where the level would fold by carry-less multiplication). One table per level,
 * and at the avx2 level a second one (avx2c) for CPUs with VPCLMULQDQ but no AVX-512. */
#include <stdlib.h>
#include <string.h>

#include "udedup.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "udedup's page kernels assume a little-endian machine"
#endif

uint64_t ud_hash_keys[UD_NKEYS];

static const ud_kernels *active = &ud_kernels_portable;
static int active_level = UD_ISA_PORTABLE;
static int hw_crc = UD_CRC_OFF;

static int has_vpclmul256(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("vpclmulqdq");
#else
    return 0;
#endif
}

/* The table for a level and CRC mode: the carry-less-multiplication one where the CPU has it,
 * unless the crc32 instruction is asked for. */
static const ud_kernels *table_for(int level, int crc_mode)
{
    switch (level) {
    case UD_ISA_SSE42: return &ud_kernels_sse42;
    case UD_ISA_AVX2:
        return crc_mode != UD_CRC_INSN && has_vpclmul256() ? &ud_kernels_avx2c : &ud_kernels_avx2;
    case UD_ISA_AVX512: return &ud_kernels_avx512;
    default: return &ud_kernels_portable;
    }
}

int ud_isa_supported(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") &&
        __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("vpclmulqdq"))
        return UD_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") &&
        __builtin_cpu_supports("sse4.2"))
        return UD_ISA_AVX2;
    if (__builtin_cpu_supports("sse4.2"))
        return UD_ISA_SSE42;
#endif
    return UD_ISA_PORTABLE;
}

int ud_isa_active(void) { return active_level; }

int ud_isa_select(int level)
{
    if (level < UD_ISA_PORTABLE || level > ud_isa_supported())
        return -1;
    if (table_for(level, hw_crc)->crc32c_hw == 0)
        hw_crc = UD_CRC_OFF;
    if (hw_crc == UD_CRC_INSN && level == UD_ISA_AVX512)
        hw_crc = UD_CRC_BEST; /* the avx512 table has no crc32-instruction-only variant */
    active = table_for(level, hw_crc);
    active_level = level;
    return 0;
}

int ud_crc32c_hw_supported(void) { return active->crc32c_hw != 0; }
int ud_crc32c_hw_active(void) { return hw_crc; }

int ud_crc32c_select_hw(int mode)
{
    if (mode < UD_CRC_OFF || mode > UD_CRC_INSN)
        return -1;
    if (mode != UD_CRC_OFF && active->crc32c_hw == 0)
        return -1;
    if (mode == UD_CRC_INSN && active_level == UD_ISA_AVX512)
        return -1;
    hw_crc = mode;
    active = table_for(active_level, hw_crc);
    return 0;
}

int ud_crc32c_kind(void)
{
    if (hw_crc == UD_CRC_OFF)
        return UD_CRC_KIND_SW;
    if (active == &ud_kernels_avx512)
        return UD_CRC_KIND_VPCLMUL512;
    if (active == &ud_kernels_avx2c)
        return UD_CRC_KIND_VPCLMUL256;
    return UD_CRC_KIND_INSN;
}

int ud_abi_version(void) { return UD_ABI_VERSION; }

/* Fixed keys from splitmix64: the hash must be the same in every process and every run. */
static void keys_init(void)
{
    uint64_t x = 0x7564656475703634ull; /* "udedup64" */
    for (int i = 0; i < UD_NKEYS; i++) {
        uint64_t z = (x += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        ud_hash_keys[i] = z ^ (z >> 31);
    }
}

static int level_from_env(const char *v)
{
    if (!v || !*v) return -1;
    if (!strcmp(v, "portable")) return UD_ISA_PORTABLE;
    if (!strcmp(v, "sse4.2") || !strcmp(v, "sse42")) return UD_ISA_SSE42;
    if (!strcmp(v, "avx2")) return UD_ISA_AVX2;
    if (!strcmp(v, "avx512")) return UD_ISA_AVX512;
    return -1;
}

__attribute__((constructor)) static void ud_init(void)
{
    keys_init();
    ud_crc32c_sw_init();
    int level = ud_isa_supported();
    int cap = level_from_env(getenv("UDEDUP_ISA"));
    if (cap >= 0 && cap < level)
        level = cap;
    ud_isa_select(level);
    const char *crc = getenv("UDEDUP_CRC32C");
    int mode = UD_CRC_BEST;
    if (crc && !strcmp(crc, "sw"))
        mode = UD_CRC_OFF;
    else if (crc && (!strcmp(crc, "sse4.2") || !strcmp(crc, "sse42")))
        mode = UD_CRC_INSN;
    if (ud_crc32c_select_hw(mode) != 0)
        ud_crc32c_select_hw(UD_CRC_BEST);
}

uint32_t ud_crc32c(uint32_t crc, const void *buf, size_t len)
{
    crc = ~crc;
    crc = hw_crc ? active->crc32c_hw(crc, buf, len) : ud_crc32c_sw_update(crc, buf, len);
    return ~crc;
}

void ud_crc32c_pages(const void *buf, size_t page_size, size_t npages, uint32_t *out)
{
    (hw_crc ? active : &ud_kernels_portable)->crc32c_pages(buf, page_size, npages, out);
}

void ud_hash64_pages(const void *buf, size_t page_size, size_t npages, uint64_t *out)
{
    active->hash64_pages(buf, page_size, npages, out);
}

size_t ud_zero_pages(const void *buf, size_t page_size, size_t npages, uint8_t *out)
{
    return active->zero_pages(buf, page_size, npages, out);
}

size_t ud_scan_pages(const void *buf, size_t page_size, size_t npages, uint32_t *crc,
                     uint64_t *hash, uint8_t *zero)
{
    if (hw_crc)
        return active->scan_pages_hwcrc(buf, page_size, npages, crc, hash, zero);
    return active->scan_pages_swcrc(buf, page_size, npages, crc, hash, zero);
}

uint64_t ud_sum64(const void *buf, size_t len) { return active->sum64(buf, len); }

int ud_compare_pages(const void *a, size_t a_pages, const void *b, size_t b_pages,
                     size_t page_size, const int64_t *ia, const int64_t *ib, size_t npairs,
                     uint8_t *equal)
{
    for (size_t k = 0; k < npairs; k++)
        if (ia[k] < 0 || (uint64_t)ia[k] >= a_pages || ib[k] < 0 || (uint64_t)ib[k] >= b_pages)
            return -1;
    const uint8_t *pa = a, *pb = b;
    for (size_t k = 0; k < npairs; k++)
        equal[k] = memcmp(pa + (size_t)ia[k] * page_size, pb + (size_t)ib[k] * page_size,
                          page_size) == 0;
    return 0;
}
