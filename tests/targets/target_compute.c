/* Injection target: a pure compute loop, interrupted in user mode. Every round recomputes an
 * integer and a floating-point checksum over the same data and compares them with the values
 * computed at start: a register or FPU/SSE state not restored exactly shows as a mismatch (or a
 * crash). */
#include "common.c"

#define WORDS 4096

static uint64_t data[WORDS];

__attribute__((noinline)) static uint64_t int_round(const uint64_t *d, size_t n)
{
    uint64_t a = 0x9e3779b97f4a7c15ull, b = 0, c = 1, e = 7;
    for (size_t i = 0; i < n; i++) {
        a ^= d[i] + (a << 6) + (a >> 2);
        b += a * 0xff51afd7ed558ccdull;
        c = (c << 1 | c >> 63) ^ b;
        e += c >> 17;
    }
    return a ^ b ^ c ^ e;
}

__attribute__((noinline)) static double fp_round(const uint64_t *d, size_t n)
{
    double s = 0.0, t = 1.0;
    for (size_t i = 0; i < n; i++) {
        s += (double)(d[i] & 0xffff) * 0.5;
        t = t * 0.999 + (double)(d[i] >> 48) * 1e-6;
    }
    return s + t;
}

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    stdin_nonblocking();
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < WORDS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data[i] = x;
    }
    const uint64_t want_int = int_round(data, WORDS);
    const double want_fp = fp_round(data, WORDS);
    ready("tids=%d", (int)getpid());

    uint64_t rounds = 0, bad = 0;
    for (;;) {
        for (int k = 0; k < 200; k++) {
            volatile uint64_t got_int = int_round(data, WORDS);
            volatile double got_fp = fp_round(data, WORDS);
            if (got_int != want_int || got_fp != want_fp)
                bad++;
            rounds++;
        }
        if (stdin_closed())
            break;
    }
    return report(0, bad, "rounds=%llu", (unsigned long long)rounds);
}
