/* Kernels compiled for sse4.2 (SSE2 hash lanes, crc32 instruction); selected at run time only where
 * the CPU has it (dispatch.c). */
#if defined(__x86_64__)
#pragma GCC target("sse4.2")
#define UD_LEVEL sse42
#define UD_HWCRC 1
#define UD_VEC128 1
#include "kernels.h"
#else
#include "udedup.h"
const ud_kernels ud_kernels_sse42 = {0};
#endif
