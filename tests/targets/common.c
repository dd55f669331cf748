/* Shared by the injection targets: #included by each target_*.c, never compiled alone.
 *
 * Protocol with the tester (tests/test_inject.py, scripts/stress_inject.py):
 * - argv[1]: MiB of duplicate memory to allocate (default 4): anonymous private pages, THP off,
 *   every page identical, for KSM to merge once the target is enabled;
 * - stdout: "READY pid=... dup_addr=... dup_len=... nx_syscall=... tids=..." once set up, then
 *   at the end "RESULT ok=0|1 dup_intact=0|1 eintr=N failures=N ..."; exit status 0 only if ok;
 * - stdin: a pipe from the tester. Its EOF tells the target to stop and report. Targets that
 *   read it verify a stream of little-endian uint64 counters 0, 1, 2, ... written by the tester.
 * Anything the program can observe of an injection (EINTR, a short sleep, a wrong checksum, a lost
 * or reordered signal, an rseq section resumed unaborted) is counted and makes ok=0. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* A syscall instruction's bytes in non-executable memory: the tester points the injector at it to
 * check that the resulting fault is suppressed and the program never sees a SIGSEGV. */
static const volatile uint8_t nx_syscall[8] = {0x0f, 0x05, 0x0f, 0x05};

static uint8_t *dup_mem;
static size_t dup_len;
static uint64_t dup_hash;

__attribute__((unused)) static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void die(const char *what)
{
    printf("RESULT ok=0 setup_failed=%s errno=%d\n", what, errno);
    fflush(stdout);
    exit(2);
}

static void dup_alloc(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 4;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    dup_len = mib << 20;
    dup_mem = mmap(NULL, dup_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (dup_mem == MAP_FAILED)
        die("mmap");
    madvise(dup_mem, dup_len, MADV_NOHUGEPAGE);
    for (size_t off = 0; off < dup_len; off += page) {
        memset(dup_mem + off, 0x5a, page);
        memcpy(dup_mem + off, "udedup duplicate page", 21);
    }
    dup_hash = fnv1a(dup_mem, dup_len);
}

__attribute__((unused)) static int dup_intact(void)
{
    return fnv1a(dup_mem, dup_len) == dup_hash;
}

static void ready(const char *fmt, ...)
{
    printf("READY pid=%d dup_addr=%#lx dup_len=%zu nx_syscall=%#lx ", (int)getpid(),
           (unsigned long)dup_mem, dup_len, (unsigned long)nx_syscall);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

/* Exit status 0 only when nothing went wrong and the duplicate memory is unchanged. */
static int report(uint64_t eintr, uint64_t failures, const char *fmt, ...)
{
    int intact = dup_intact();
    int ok = intact && eintr == 0 && failures == 0;
    printf("RESULT ok=%d dup_intact=%d eintr=%llu failures=%llu ", ok, intact,
           (unsigned long long)eintr, (unsigned long long)failures);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    return ok ? 0 : 1;
}

__attribute__((unused)) static void stdin_nonblocking(void)
{
    int fl = fcntl(0, F_GETFL);
    if (fl < 0 || fcntl(0, F_SETFL, fl | O_NONBLOCK) < 0)
        die("fcntl");
}

/* With stdin non-blocking: 1 once the tester closed it. */
__attribute__((unused)) static int stdin_closed(void)
{
    char buf[256];
    ssize_t n = read(0, buf, sizeof(buf));
    return n == 0;
}

/* The tester's counter stream: every complete 8-byte word must be the next counter. */
struct stream {
    uint64_t next;
    uint64_t bad;
    uint8_t partial[8];
    size_t have;
    uint64_t reads, eintr, errors; /* by stream_read */
};

__attribute__((unused)) static void stream_feed(struct stream *s, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        s->partial[s->have++] = p[i];
        if (s->have == 8) {
            uint64_t v;
            memcpy(&v, s->partial, 8);
            if (v != s->next)
                s->bad++;
            s->next = v + 1;
            s->have = 0;
        }
    }
}

/* One blocking read(2) of the stream on stdin: 1 to read on, 0 at EOF or after an error. A read
 * failing with EINTR (what an injection must never cause) is counted and the caller reads on. */
__attribute__((unused)) static int stream_read(struct stream *s)
{
    uint8_t buf[4096];
    ssize_t n = read(0, buf, sizeof(buf));
    if (n > 0) {
        s->reads++;
        stream_feed(s, buf, (size_t)n);
        return 1;
    }
    if (n < 0 && errno == EINTR) {
        s->eintr++;
        return 1;
    }
    s->errors += n < 0;
    return 0;
}

/* Everything wrong with the stream: a wrong word, a failed read, a partial word at EOF. */
__attribute__((unused)) static uint64_t stream_failures(const struct stream *s)
{
    return s->bad + s->errors + (s->have != 0);
}
