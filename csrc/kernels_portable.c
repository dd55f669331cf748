/* Portable kernels: the baseline instruction set of the compiler's target, table-driven CRC. */
#define UD_LEVEL portable
#define UD_HWCRC 0
#include "kernels.h"
