#ifndef UDEDUP_INJECT_H
#define UDEDUP_INJECT_H
/* Running a system call inside another process through ptrace (inject.c). */
#include <stddef.h>
#include <stdint.h>

#include "inject.cdef.h"

#endif
