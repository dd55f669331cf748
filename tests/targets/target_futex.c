/* Injection target: futex waits with several threads.
 * - main thread: raw FUTEX_WAIT on a word a ticker thread bumps every 2 ms (returns 0 or EAGAIN;
 *   EINTR is counted);
 * - ticker thread: bumps the word, FUTEX_WAKE, and sleeps;
 * - WORKERS threads: pass a token round a ring with one mutex and pthread_cond_wait; each checks
 *   the shared counter equals the value it expects when its turn comes.
 * The READY line lists every thread id so the tester can inject into any of them. */
#include "common.c"

#include <linux/futex.h>
#include <pthread.h>

#define WORKERS 4

static _Atomic uint32_t tick_word;
static atomic_int stop_flag;
static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ring_cond = PTHREAD_COND_INITIALIZER;
static int turn;
static uint64_t ring_counter, ring_bad;
static atomic_int tids[WORKERS + 2];
static atomic_int started;

static long futex(_Atomic uint32_t *uaddr, int op, uint32_t val)
{
    return syscall(SYS_futex, (uint32_t *)uaddr, op, val, NULL, NULL, 0);
}

static void *ticker(void *arg)
{
    (void)arg;
    tids[1] = (int)gettid();
    atomic_fetch_add(&started, 1);
    while (!atomic_load(&stop_flag)) {
        atomic_fetch_add(&tick_word, 1);
        futex(&tick_word, FUTEX_WAKE_PRIVATE, 1);
        struct timespec ts = {0, 2000000};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    atomic_fetch_add(&tick_word, 1);
    futex(&tick_word, FUTEX_WAKE_PRIVATE, 1);
    return NULL;
}

static void *worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    tids[2 + id] = (int)gettid();
    atomic_fetch_add(&started, 1);
    uint64_t mine = 0;
    pthread_mutex_lock(&ring_lock);
    for (;;) {
        while (turn != id && !atomic_load(&stop_flag))
            pthread_cond_wait(&ring_cond, &ring_lock);
        if (atomic_load(&stop_flag))
            break;
        /* the counter advanced exactly once per turn since our last one */
        if (ring_counter != mine * WORKERS + (uint64_t)id)
            ring_bad++;
        ring_counter++;
        mine++;
        turn = (id + 1) % WORKERS;
        pthread_cond_broadcast(&ring_cond);
        pthread_mutex_unlock(&ring_lock);
        struct timespec ts = {0, 200000};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
        pthread_mutex_lock(&ring_lock);
    }
    pthread_mutex_unlock(&ring_lock);
    return NULL;
}

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    stdin_nonblocking();
    tids[0] = (int)getpid();
    pthread_t th[WORKERS + 1];
    if (pthread_create(&th[0], NULL, ticker, NULL))
        die("pthread_create");
    for (int i = 0; i < WORKERS; i++)
        if (pthread_create(&th[1 + i], NULL, worker, (void *)(intptr_t)i))
            die("pthread_create");
    while (atomic_load(&started) < WORKERS + 1)
        sched_yield();
    ready("tids=%d,%d,%d,%d,%d,%d", tids[0], tids[1], tids[2], tids[3], tids[4], tids[5]);

    uint64_t waits = 0, woken = 0, eintr = 0, errors = 0;
    while (!stdin_closed()) {
        uint32_t seen = atomic_load(&tick_word);
        long rc = futex(&tick_word, FUTEX_WAIT_PRIVATE, seen);
        waits++;
        if (rc == 0)
            woken++;
        else if (errno == EINTR)
            eintr++;
        else if (errno != EAGAIN)
            errors++;
    }
    atomic_store(&stop_flag, 1);
    pthread_mutex_lock(&ring_lock);
    pthread_cond_broadcast(&ring_cond);
    pthread_mutex_unlock(&ring_lock);
    for (int i = 0; i < WORKERS + 1; i++)
        pthread_join(th[i], NULL);
    return report(eintr, errors + ring_bad + (ring_counter == 0),
                  "waits=%llu woken=%llu ring_turns=%llu ring_bad=%llu",
                  (unsigned long long)waits, (unsigned long long)woken,
                  (unsigned long long)ring_counter, (unsigned long long)ring_bad);
}
