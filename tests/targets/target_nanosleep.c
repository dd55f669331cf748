/* Injection target: in nanosleep(2). An interrupted nanosleep returns -ERESTART_RESTARTBLOCK and
 * must continue through restart_syscall with the *remaining* time: every sleep is timed, and one
 * that returns early (or with EINTR) is counted. The longest overshoot is reported too (a restart
 * that began the full interval again would show as up to one extra interval). */
#include "common.c"

#define SLEEP_NS 20000000ll

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    stdin_nonblocking();
    ready("tids=%d sleep_ns=%lld", (int)getpid(), SLEEP_NS);
    uint64_t sleeps = 0, eintr = 0, short_sleeps = 0, errors = 0;
    int64_t max_over = 0;
    while (!stdin_closed()) {
        struct timespec req = {.tv_sec = 0, .tv_nsec = SLEEP_NS}, rem = {0, 0};
        uint64_t t0 = now_ns();
        int rc = nanosleep(&req, &rem);
        int64_t took = (int64_t)(now_ns() - t0);
        sleeps++;
        if (rc < 0 && errno == EINTR)
            eintr++;
        else if (rc < 0)
            errors++;
        if (took < SLEEP_NS)
            short_sleeps++;
        if (took - SLEEP_NS > max_over)
            max_over = took - SLEEP_NS;
    }
    return report(eintr, short_sleeps + errors, "sleeps=%llu short=%llu max_overshoot_us=%lld",
                  (unsigned long long)sleeps, (unsigned long long)short_sleeps,
                  (long long)(max_over / 1000));
}
