#ifndef UDEDUP_H
#define UDEDUP_H
/* udedup native hot path: pure computation and syscalls, plain status codes, no Python.h. */
#include <stddef.h>
#include <stdint.h>

#include "udedup.cdef.h"

/* Internal: per-ISA kernel tables (kernels_*.c) and the portable CRC (crc32c_sw.c). */
typedef struct {
    void (*crc32c_pages)(const uint8_t *, size_t, size_t, uint32_t *);
    void (*hash64_pages)(const uint8_t *, size_t, size_t, uint64_t *);
    size_t (*zero_pages)(const uint8_t *, size_t, size_t, uint8_t *);
    size_t (*scan_pages_hwcrc)(const uint8_t *, size_t, size_t, uint32_t *, uint64_t *, uint8_t *);
    size_t (*scan_pages_swcrc)(const uint8_t *, size_t, size_t, uint32_t *, uint64_t *, uint8_t *);
    uint64_t (*sum64)(const uint8_t *, size_t);
    uint32_t (*crc32c_hw)(uint32_t, const uint8_t *, size_t);
} ud_kernels;

extern const ud_kernels ud_kernels_portable;
extern const ud_kernels ud_kernels_sse42;
extern const ud_kernels ud_kernels_avx2;
extern const ud_kernels ud_kernels_avx2c;
extern const ud_kernels ud_kernels_avx512;

/* Hash keys, filled once by ud_keys_init() (dispatch.c). */
#define UD_NKEYS 40
extern uint64_t ud_hash_keys[UD_NKEYS];

uint32_t ud_crc32c_sw_update(uint32_t crc, const uint8_t *p, size_t len);
void ud_crc32c_sw_init(void);

#endif
