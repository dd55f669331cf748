/* Injection target: signals all the time.
 * - a 1 ms ITIMER_REAL with an SA_RESTART SIGALRM handler;
 * - a sender thread queueing SIGRTMIN to the process every 200 us with sigqueue values 1, 2, 3...
 *   Real-time signals are never merged, and one signal number is delivered in queue order, so the
 *   handler can check that none is lost, duplicated or reordered and that siginfo (the value)
 *   survived being passed through a tracer;
 * - the main thread (the only one accepting the signals) blocked alternately in read(2) on the
 *   tester's pipe, which SA_RESTART must restart (an EINTR is counted), and in epoll_wait(2) on the
 *   same pipe, which returns EINTR whenever a handler runs: one without a handler having run
 *   during the call is a spurious EINTR (counted). */
#include "common.c"

#include <pthread.h>
#include <sys/epoll.h>
#include <sys/time.h>

static volatile sig_atomic_t alarms;
static volatile uint64_t rt_received, rt_bad;
static volatile int rt_expected = 1;
static atomic_ullong rt_sent;
static atomic_int stop_flag;
static atomic_int sender_tid;

static void on_alarm(int sig)
{
    (void)sig;
    alarms++;
}

static void on_rt(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (si->si_value.sival_int != rt_expected || si->si_code != SI_QUEUE)
        rt_bad++;
    rt_expected = si->si_value.sival_int + 1;
    rt_received++;
}

static void *sender(void *arg)
{
    (void)arg;
    sender_tid = (int)gettid();
    int value = 1;
    while (!atomic_load(&stop_flag)) {
        union sigval v = {.sival_int = value};
        if (sigqueue(getpid(), SIGRTMIN, v) == 0) {
            value++;
            atomic_fetch_add(&rt_sent, 1);
        }
        struct timespec ts = {0, 200000};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_rt;
    sa.sa_flags = SA_RESTART | SA_SIGINFO;
    sigaction(SIGRTMIN, &sa, NULL);

    /* the sender inherits a mask blocking both signals: they all go to the main thread */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGALRM);
    sigaddset(&block, SIGRTMIN);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    pthread_t th;
    if (pthread_create(&th, NULL, sender, NULL))
        die("pthread_create");
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    while (!atomic_load(&sender_tid))
        sched_yield();
    struct itimerval it = {{0, 1000}, {0, 1000}};
    setitimer(ITIMER_REAL, &it, NULL);
    ready("tids=%d,%d", (int)getpid(), atomic_load(&sender_tid));

    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = 0};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) < 0)
        die("epoll");
    struct stream s = {0};
    uint64_t errors = 0, epoll_eintr = 0, spurious = 0;
    for (uint64_t round = 0;; round++) {
        if (round & 1) {
            uint64_t handled = (uint64_t)alarms + rt_received;
            struct epoll_event out;
            int n = epoll_wait(ep, &out, 1, -1);
            if (n < 0 && errno == EINTR) {
                epoll_eintr++;
                if ((uint64_t)alarms + rt_received == handled)
                    spurious++;
                continue;
            }
            if (n < 0) {
                errors++;
                break;
            }
        }
        if (!stream_read(&s))
            break;
    }
    atomic_store(&stop_flag, 1);
    pthread_join(th, NULL);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    /* every queued signal must arrive; allow them 2 s */
    uint64_t deadline = now_ns() + 2000000000ull;
    while (rt_received < atomic_load(&rt_sent) && now_ns() < deadline)
        sched_yield();
    uint64_t sent = atomic_load(&rt_sent);
    uint64_t lost = sent > rt_received ? sent - rt_received : rt_received - sent;
    return report(s.eintr + spurious, errors + stream_failures(&s) + lost + rt_bad + (alarms == 0),
                  "reads=%llu alarms=%d rt_sent=%llu rt_received=%llu rt_bad=%llu "
                  "epoll_eintr_with_handler=%llu spurious_eintr=%llu",
                  (unsigned long long)s.reads, (int)alarms, (unsigned long long)sent,
                  (unsigned long long)rt_received, (unsigned long long)rt_bad,
                  (unsigned long long)(epoll_eintr - spurious), (unsigned long long)spurious);
}
