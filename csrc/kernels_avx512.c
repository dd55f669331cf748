/* Kernels compiled for sse4.2,avx2,bmi2,avx512f,avx512bw,avx512dq,avx512vl,pclmul,vpclmulqdq; selected at run time only where the CPU has it (dispatch.c). */
#if defined(__x86_64__)
#pragma GCC target("sse4.2,avx2,bmi2,avx512f,avx512bw,avx512dq,avx512vl,pclmul,vpclmulqdq")
#define UD_LEVEL avx512
#define UD_HWCRC 1
#define UD_CLMUL512 1
#define UD_VEC512 1
#define UD_VEC256 1 /* the ymm hash state of the crc32-instruction fallback */
#include "kernels.h"
#else
#include "udedup.h"
const ud_kernels ud_kernels_avx512 = {0};
#endif
