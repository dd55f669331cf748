/* The avx2 level on CPUs that also have VPCLMULQDQ without AVX-512 (AMD Zen 3 and later, Intel
 * client parts): the avx2 kernels, plus crc32c_pages by 256-bit carry-less folds. Selected at run
 * time only where the CPU has all of it (dispatch.c). */
#if defined(__x86_64__)
#pragma GCC target("sse4.2,avx2,bmi2,pclmul,vpclmulqdq")
#define UD_LEVEL avx2c
#define UD_VEC256 1
#define UD_HWCRC 1
#define UD_CLMUL256 1
#include "kernels.h"
#else
#include "udedup.h"
const ud_kernels ud_kernels_avx2c = {0};
#endif
