/* Kernels compiled for sse4.2,avx2,bmi2; selected at run time only where the CPU has it (dispatch.c). */
#if defined(__x86_64__)
#pragma GCC target("sse4.2,avx2,bmi2")
#define UD_LEVEL avx2
#define UD_VEC256 1
#define UD_HWCRC 1
#include "kernels.h"
#else
#include "udedup.h"
const ud_kernels ud_kernels_avx2 = {0};
#endif
