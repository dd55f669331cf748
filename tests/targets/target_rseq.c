/* Injection target: spends most of its time inside an rseq (restartable sequence) critical
 * section, using the rseq area glibc registered for the thread. Inside the section the loop checks
 * that rseq_cs still points at the section: the kernel clears it only when it aborts the section
 * (jumping to the abort handler, counted as an abort) or when the thread is outside it. Finding
 * it cleared inside the section means the thread was resumed there after its rseq state had been
 * settled for another instruction pointer: a violation. Exit 77 when glibc did not register
 * rseq (old glibc, or GLIBC_TUNABLES=glibc.pthread.rseq=0). */
#include "common.c"

#include <stddef.h>
#include <sys/rseq.h>

static uint64_t aborts, violations;

static uint64_t section(volatile uint64_t *rseq_cs, uint64_t iters)
{
    uint64_t n = iters;
    __asm__ __volatile__(
        ".pushsection __rseq_cs, \"aw\"\n\t"
        ".balign 32\n\t"
        "3:\n\t"
        ".long 0, 0\n\t"
        ".quad 1f, 2f - 1f, 4f\n\t"
        ".popsection\n\t"
        "leaq 3b(%%rip), %%rax\n\t"
        "movq %%rax, %[cs]\n\t"
        "1:\n\t"
        "cmpq $0, %[cs]\n\t"
        "je 5f\n\t"
        "decq %[n]\n\t"
        "jnz 1b\n\t"
        "2:\n\t"
        "movq $0, %[cs]\n\t"
        "jmp 6f\n\t"
        ".long %c[sig]\n\t"
        "4:\n\t"
        "incq %[ab]\n\t"
        "jmp 6f\n\t"
        "5:\n\t"
        "incq %[vi]\n\t"
        "movq $0, %[cs]\n\t"
        "6:\n\t"
        : [n] "+r"(n), [ab] "+m"(aborts), [vi] "+m"(violations), [cs] "+m"(*rseq_cs)
        : [sig] "i"(RSEQ_SIG)
        : "rax", "memory", "cc");
    return iters - n;
}

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    stdin_nonblocking();
    if (__rseq_size == 0) {
        printf("RESULT ok=1 skipped=rseq_not_registered\n");
        fflush(stdout);
        return 77;
    }
    volatile uint64_t *rseq_cs =
        (volatile uint64_t *)((char *)__builtin_thread_pointer() + __rseq_offset +
                              offsetof(struct rseq, rseq_cs));
    ready("tids=%d", (int)getpid());
    uint64_t rounds = 0, spins = 0;
    while (!stdin_closed()) {
        spins += section(rseq_cs, 5000000);
        rounds++;
    }
    return report(0, violations, "rounds=%llu aborts=%llu violations=%llu spins=%llu",
                  (unsigned long long)rounds, (unsigned long long)aborts,
                  (unsigned long long)violations, (unsigned long long)spins);
}
