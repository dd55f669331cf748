/* Thin syscall wrappers: the errno goes back through *err, never through a global the caller
 * might read too late. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <sys/prctl.h>
#include <sys/uio.h>

#include "udedup.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* Reads n remote ranges into local, back to back. Returns the bytes read; a short count with
 * *err set says where it stopped (EFAULT: a range vanished; ESRCH: the process is gone). */
int64_t ud_remote_readv(int pid, const uint64_t *addrs, const uint64_t *lens, size_t n,
                        void *local, size_t local_len, int *err)
{
    struct iovec remote[IOV_MAX];
    uint8_t *dst = local;
    size_t done = 0;
    *err = 0;
    for (size_t i = 0; i < n;) {
        size_t batch = 0, want = 0;
        while (i + batch < n && batch < IOV_MAX) {
            remote[batch].iov_base = (void *)(uintptr_t)addrs[i + batch];
            remote[batch].iov_len = lens[i + batch];
            want += lens[i + batch];
            batch++;
        }
        if (done + want > local_len) {
            *err = EINVAL;
            return (int64_t)done;
        }
        struct iovec l = {.iov_base = dst + done, .iov_len = want};
        ssize_t got = process_vm_readv(pid, &l, 1, remote, batch, 0);
        if (got < 0) {
            *err = errno;
            return (int64_t)done;
        }
        done += (size_t)got;
        if ((size_t)got < want) {
            *err = EFAULT;
            return (int64_t)done;
        }
        i += batch;
    }
    return (int64_t)done;
}

int ud_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5,
             int *err)
{
    int rc = prctl(option, a2, a3, a4, a5);
    *err = rc < 0 ? errno : 0;
    return rc;
}
