/* Declarations read by cffi's cdef (udedup/_build.py) for the ptrace syscall injector (inject.c).
 * No preprocessor logic here: inject.h includes this file, so the C compiler checks these against
 * the definitions. Status codes are positive; 0 is success. */

#define UD_INJECT_OK 0
#define UD_INJECT_E_ARCH 1      /* this CPU architecture is not supported: nothing was done */
#define UD_INJECT_E_SEIZE 2     /* PTRACE_SEIZE failed (err): the target was not touched */
#define UD_INJECT_E_COMPAT 3    /* the thread runs 32-bit code: detached untouched */
#define UD_INJECT_E_INSN 4      /* no syscall instruction at syscall_ip: detached untouched */
#define UD_INJECT_E_BUSY 5      /* kept being interrupted (signals), or stopped inside an rseq
                                   section with a bad signature: registers restored */
#define UD_INJECT_E_GONE 6      /* the thread exited or was killed (wait_status) */
#define UD_INJECT_E_PTRACE 7    /* a ptrace request failed (err, request); registers restored
                                   unless the thread is gone */
#define UD_INJECT_E_FAULT 8     /* executing at syscall_ip faulted: registers restored, the fault's
                                   signal suppressed (it never existed for the program) */
#define UD_INJECT_E_STATE 9     /* an unexpected stop (wait_status): registers restored */

/* Flags */
#define UD_INJECT_F_KEEP_ZOMBIE 1   /* the thread is our own child's leader: if it dies, leave its
                                       exit status for our other waiter (subprocess) */
#define UD_INJECT_F_KEEP_EINTR 2    /* tests only: leave an interrupted call's -EINTR alone */
#define UD_INJECT_F_NO_RSEQ 4       /* tests only: skip the rseq critical-section check */

typedef struct {
    int64_t nr;            /* syscall number */
    uint64_t args[6];
    int64_t result;        /* raw return value: >= 0, or -errno */
    int32_t done;          /* 1 once result is valid */
    int32_t restarts;      /* times the call returned -ERESTART* (a signal came) and was re-run */
} ud_syscall;

typedef struct {
    int32_t err;               /* errno of the failing request */
    int32_t request;           /* the ptrace request that failed */
    int32_t wait_status;       /* raw waitpid status of the last stop or of the exit */
    int32_t stops;             /* ptrace stops seen */
    int32_t signals_forwarded; /* signal-delivery-stops passed on to the program unchanged */
    int32_t retries;           /* injections abandoned before the syscall ran (signal, group
                                  stop) and tried again */
    int32_t rseq_aborts;       /* the thread was stopped inside an rseq critical section and
                                  was moved to its abort handler, as the kernel does */
    int32_t eintr_fixup;       /* 1: an -EINTR caused by our interrupt became -ERESTARTNOHAND */
    int32_t group_stop;        /* 1: the process was in a group stop (SIGSTOP) when we stopped it */
    int32_t first_stop_sig;    /* WSTOPSIG of the stop the registers were saved at */
    int64_t saved_orig_rax;    /* what the thread was doing: syscall number or -1 */
    int64_t saved_rax;         /* its pending return value (e.g. -512 ERESTARTSYS) */
    uint64_t saved_ip;
    int64_t elapsed_ns;        /* from PTRACE_SEIZE to PTRACE_DETACH */
} ud_inject_info;

/* 1 when injection works on this build's architecture (x86_64). */
int ud_inject_supported(void);
/* Offset of the first syscall instruction in buf, or -1. */
int64_t ud_inject_find_insn(const void *buf, size_t len);
/* Runs calls[0..ncalls) one after the other in thread tid, using the syscall instruction at
 * syscall_ip in its address space. Returns a UD_INJECT_* status; per-call results in calls[i]. */
int ud_inject_syscalls(int tid, uint64_t syscall_ip, ud_syscall *calls, size_t ncalls,
                       uint32_t flags, ud_inject_info *info);
