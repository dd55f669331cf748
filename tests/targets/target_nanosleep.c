/* Injection target: in nanosleep(2). An interrupted nanosleep returns -ERESTART_RESTARTBLOCK and
 * must continue through restart_syscall with the *remaining* time: every sleep is timed, and one
 * that returns early (or with EINTR) is counted. The longest overshoot is reported too (a restart
 * that began the full interval again would show as up to one extra interval per injection).
 * argv[2]: sleep length in ms (default 20). */
#include "common.c"

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    stdin_nonblocking();
    const long long sleep_ns = (argc > 2 ? atoll(argv[2]) : 20) * 1000000ll;
    ready("tids=%d sleep_ns=%lld", (int)getpid(), sleep_ns);
    uint64_t sleeps = 0, eintr = 0, short_sleeps = 0, errors = 0;
    int64_t max_over = 0;
    while (!stdin_closed()) {
        struct timespec req = {.tv_sec = sleep_ns / 1000000000, .tv_nsec = sleep_ns % 1000000000};
        struct timespec rem = {0, 0};
        uint64_t t0 = now_ns();
        int rc = nanosleep(&req, &rem);
        int64_t took = (int64_t)(now_ns() - t0);
        sleeps++;
        if (rc < 0 && errno == EINTR)
            eintr++;
        else if (rc < 0)
            errors++;
        if (took < sleep_ns)
            short_sleeps++;
        if (took - sleep_ns > max_over)
            max_over = took - sleep_ns;
    }
    return report(eintr, short_sleeps + errors, "sleeps=%llu short=%llu max_overshoot_us=%lld",
                  (unsigned long long)sleeps, (unsigned long long)short_sleeps,
                  (long long)(max_over / 1000));
}
