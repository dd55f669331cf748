/* Injection target: in epoll_wait/epoll_pwait on the tester's pipe. These calls return a plain
 * -EINTR (not a restart code) when interrupted, so they are the hard case for "no visible EINTR".
 * It rotates: epoll_wait(-1), epoll_wait(30 ms), epoll_pwait(-1, mask {SIGUSR2}),
 * epoll_pwait(30 ms, mask {SIGUSR2}). Counted as failures: EINTR, a timeout return before 30 ms,
 * a signal mask not restored after epoll_pwait, a corrupted counter stream. */
#include "common.c"

#include <sys/epoll.h>

#define TIMEOUT_MS 30

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = 0};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) < 0)
        die("epoll");
    sigset_t pmask, cur;
    sigemptyset(&pmask);
    sigaddset(&pmask, SIGUSR2);
    ready("tids=%d timeout_ms=%d", (int)getpid(), TIMEOUT_MS);

    struct stream s = {0};
    uint8_t buf[4096];
    uint64_t calls = 0, events = 0, timeouts = 0, eintr = 0, early = 0, mask_bad = 0, errors = 0;
    int done = 0;
    while (!done) {
        int kind = (int)(calls++ % 4);
        int timeout = (kind & 1) ? TIMEOUT_MS : -1;
        struct epoll_event out[4];
        uint64_t t0 = now_ns();
        int n = kind < 2 ? epoll_wait(ep, out, 4, timeout)
                         : epoll_pwait(ep, out, 4, timeout, &pmask);
        uint64_t took = now_ns() - t0;
        if (kind >= 2) {
            pthread_sigmask(SIG_SETMASK, NULL, &cur);
            if (sigismember(&cur, SIGUSR2))
                mask_bad++;
        }
        if (n < 0) {
            if (errno == EINTR)
                eintr++;
            else
                errors++;
            continue;
        }
        if (n == 0) {
            timeouts++;
            if (timeout < 0 || took < (uint64_t)timeout * 1000000u)
                early++;
            continue;
        }
        events++;
        ssize_t got = read(0, buf, sizeof(buf));
        if (got > 0)
            stream_feed(&s, buf, (size_t)got);
        else if (got == 0)
            done = 1;
        else if (errno != EINTR && errno != EAGAIN)
            errors++;
    }
    return report(eintr, early + mask_bad + errors + s.bad + (s.have != 0),
                  "calls=%llu events=%llu timeouts=%llu early=%llu mask_bad=%llu words=%llu",
                  (unsigned long long)calls, (unsigned long long)events,
                  (unsigned long long)timeouts, (unsigned long long)early,
                  (unsigned long long)mask_bad, (unsigned long long)s.next);
}
