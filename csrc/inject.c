/* Running one system call inside another process, through ptrace, without the process noticing.
 *
 * The kernel only lets a process opt itself into KSM (PR_SET_MEMORY_MERGE acts on the caller,
 * process_madvise refuses MADV_MERGEABLE), so we make the target execute the call.
 *
 * How (x86_64):
 *  1. PTRACE_SEIZE + PTRACE_INTERRUPT, never PTRACE_ATTACH: no SIGSTOP is sent, so nothing is
 *     queued that the program (or its parent's waitpid) could see. The thread stops in
 *     get_signal() on its way back to user space, the one place where the kernel still has to
 *     decide whether an interrupted system call restarts; a signal-delivery-stop or a group stop
 *     is the same place.
 *  2. Save its registers. Point rip at an existing `syscall` instruction (0f 05) in its executable
 *     mappings (vdso, libc: found by the caller, re-checked here while the thread is stopped; code
 *     is never written, other threads may be running it), set rax = nr and the arguments, and
 *     orig_rax = -1 so the kernel does not apply restart processing to our registers when it
 *     leaves get_signal().
 *  3. PTRACE_SYSCALL to the entry stop, again to the exit stop: read rax. No instruction after the
 *     syscall runs in user space.
 *  4. PTRACE_INTERRUPT + PTRACE_CONT to come back to a get_signal() stop, put the saved registers
 *     back there, PTRACE_DETACH. Because the registers are restored *inside* get_signal(), the
 *     kernel then does for the original call exactly what it would have done without us: with
 *     orig_rax = nr and rax = -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND it rewinds rip and
 *     re-issues the call, with -ERESTART_RESTARTBLOCK it enters restart_syscall, and
 *     current->restart_block (nanosleep's absolute expiry) is untouched by madvise/prctl. Restoring
 *     at the exit stop instead would skip that logic and hand -512 to the program.
 *
 * Signals are never swallowed and never see our registers. A signal-delivery-stop while the
 * original registers are in place is passed on unchanged (PTRACE_CONT with the signal keeps its
 * siginfo), with a PTRACE_INTERRUPT queued so we stop again right after the handler frame is
 * built. One that comes while our registers are in place (before the syscall ran) gets the original
 * registers back first, then is passed on, and the injection is tried again. We do not block
 * signals with PTRACE_SETSIGMASK as CRIU does: that clears TIF_RESTORE_SIGMASK, which breaks a
 * thread sitting in sigsuspend/ppoll/pselect/epoll_pwait, and delays process-directed signals.
 *
 * Other threads keep running. prctl(PR_SET_MEMORY_MERGE) and madvise(MADV_(UN)MERGEABLE) act on the
 * shared mm under mmap_lock, exactly as if the program had called them from this thread; no other
 * thread's registers or memory contents change, and stopping them all would interrupt every
 * blocking call in the process instead of one. What they can do meanwhile: unmap a range we were
 * about to madvise (madvise returns ENOMEM, the rest is applied), signal this thread (handled
 * above), exit or exec (the thread dies: reported), unmap the code page holding our syscall
 * instruction (the fault is recognised, suppressed, reported).
 *
 * Two refinements keep "as if nothing happened" true:
 *  - A few calls return -EINTR, not a restart code, when merely interrupted (epoll_wait,
 *    epoll_pwait(2), semop/semtimedop, rt_sigtimedwait). Our PTRACE_INTERRUPT would make that EINTR
 *    visible. At the stop we change it to -ERESTARTNOHAND: if a real signal handler runs next, the
 *    kernel turns it back into -EINTR (what the program would have seen); otherwise the call is
 *    re-issued. Only these calls, because some others (close) return EINTR when re-issuing them
 *    would be wrong. A relative timeout restarts whole: a wakeup is never missed, a timeout may
 *    arrive late by at most the time already waited, as after being descheduled.
 *  - rseq: a thread stopped inside a restartable-sequence critical section must resume at its
 *    abort handler. The kernel's rseq fix-up would run while our rip is in place, find it outside
 *    the section and clear rseq_cs, and the thread would resume inside the section unaborted. So we
 *    do the kernel's abort ourselves in the saved registers (rip = abort_ip, after checking the
 *    signature), which is what the kernel would do at the next return to user space anyway.
 *
 * A group-stopped (SIGSTOP) process: the stop is reported as PTRACE_EVENT_STOP too; PTRACE_SYSCALL
 * runs the thread for the one call despite the group stop, and PTRACE_DETACH puts it back into the
 * group stop (ptrace_unlink re-arms JOBCTL_STOP_PENDING). We never wait in a group stop, so
 * PTRACE_LISTEN is not needed.
 *
 * If this process dies between steps 2 and 4, the kernel detaches the thread with our registers
 * in place: it would execute the syscall and continue with wrong registers. PTRACE_O_EXITKILL would
 * kill it instead; neither is acceptable, so the window is kept to microseconds and Python keeps
 * Ctrl-C out of it (the call runs with the GIL released and EINTR from waitpid is retried). */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>

#include "inject.h"

/* UD_INJECT_NO_ARCH builds the unsupported-architecture path on x86_64, to check it compiles. */
#if defined(__x86_64__) && !defined(UD_INJECT_NO_ARCH)

int ud_inject_supported(void)
{
    return 1;
}

int64_t ud_inject_find_insn(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    for (size_t i = 0; i + 1 < len; i++) {
        const uint8_t *hit = memchr(p + i, 0x0f, len - 1 - i);
        if (!hit)
            return -1;
        i = (size_t)(hit - p);
        if (p[i + 1] == 0x05)
            return (int64_t)i;
    }
    return -1;
}

/* Kernel-internal return codes seen by a tracer at a stop (include/linux/errno.h). */
#define K_ERESTARTSYS 512
#define K_ERESTARTNOINTR 513
#define K_ERESTARTNOHAND 514
#define K_ERESTART_RESTARTBLOCK 516

#define X86_EFLAGS_TF 0x100UL
#define UD_PTRACE_GET_RSEQ_CONFIGURATION 0x420f

/* Bounds that turn a pathological target (signal storm, a call interrupted forever) into an error
 * with the registers restored, instead of a hang. */
#define MAX_RETRIES 1000
#define MAX_RESTARTS 1000
#define MAX_FORWARDS 100000

typedef struct user_regs_struct regs_t;

struct ctx {
    pid_t tid;
    uint32_t flags;
    uint64_t syscall_ip;
    ud_inject_info *info;
    regs_t saved;   /* the thread's own registers, as they must be when it is released */
    int have_saved; /* saved is valid (else nothing was changed and there is nothing to restore) */
};

enum stop { ST_GONE, ST_EVENT, ST_SIGNAL, ST_SYSCALL, ST_OTHER, ST_ERROR };

static long pt(struct ctx *c, int request, uintptr_t addr, uintptr_t data)
{
    long rc = ptrace((enum __ptrace_request)request, c->tid, (void *)addr, (void *)data);
    if (rc < 0 && !c->info->err) {
        c->info->err = errno;
        c->info->request = request;
    }
    return rc;
}

/* 0, or -1 with info->err set; *is_compat for a 32-bit register set. */
static int get_regs(struct ctx *c, regs_t *regs, int *is_compat)
{
    struct iovec iov = {.iov_base = regs, .iov_len = sizeof(*regs)};
    if (pt(c, PTRACE_GETREGSET, NT_PRSTATUS, (uintptr_t)&iov) < 0)
        return -1;
    if (is_compat)
        *is_compat = iov.iov_len != sizeof(*regs);
    return 0;
}

static int set_regs(struct ctx *c, const regs_t *regs)
{
    struct iovec iov = {.iov_base = (void *)regs, .iov_len = sizeof(*regs)};
    return pt(c, PTRACE_SETREGSET, NT_PRSTATUS, (uintptr_t)&iov) < 0 ? -1 : 0;
}

static int restore(struct ctx *c)
{
    return c->have_saved ? set_regs(c, &c->saved) : 0;
}

static int remote_read(pid_t tid, uint64_t addr, void *out, size_t len)
{
    struct iovec local = {.iov_base = out, .iov_len = len};
    struct iovec remote = {.iov_base = (void *)(uintptr_t)addr, .iov_len = len};
    return process_vm_readv(tid, &local, 1, &remote, 1, 0) == (ssize_t)len ? 0 : -1;
}

static enum stop classify(struct ctx *c, int status, int *sig)
{
    c->info->wait_status = status;
    *sig = 0;
    if (WIFEXITED(status) || WIFSIGNALED(status))
        return ST_GONE;
    if (!WIFSTOPPED(status))
        return ST_OTHER;
    c->info->stops++;
    int event = status >> 16;
    if (event == PTRACE_EVENT_STOP) {
        *sig = WSTOPSIG(status);
        return ST_EVENT;
    }
    if (event)
        return ST_OTHER;
    if (WSTOPSIG(status) == (SIGTRAP | 0x80))
        return ST_SYSCALL;
    *sig = WSTOPSIG(status);
    return ST_SIGNAL;
}

static enum stop wait_stop(struct ctx *c, int *sig)
{
    int status = 0;
    for (;;) {
        if (c->flags & UD_INJECT_F_KEEP_ZOMBIE) {
            /* Peek first: the exit status of our own child belongs to its real waiter. */
            siginfo_t si;
            memset(&si, 0, sizeof(si));
            if (waitid(P_PID, (id_t)c->tid, &si, WEXITED | WSTOPPED | WNOWAIT | __WALL) < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == ECHILD)
                    return ST_GONE;
                c->info->err = errno;
                return ST_ERROR;
            }
            if (si.si_code == CLD_EXITED) {
                c->info->wait_status = (si.si_status & 0xff) << 8;
                return ST_GONE;
            }
            if (si.si_code == CLD_KILLED || si.si_code == CLD_DUMPED) {
                c->info->wait_status =
                    (si.si_status & 0x7f) | (si.si_code == CLD_DUMPED ? 0x80 : 0);
                return ST_GONE;
            }
        }
        pid_t got = waitpid(c->tid, &status, __WALL);
        if (got == c->tid)
            return classify(c, status, sig);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && errno == ECHILD)
            return ST_GONE;
        c->info->err = errno;
        return ST_ERROR;
    }
}

/* At a signal-delivery-stop with the thread's own registers in place: deliver the signal as it
 * came (same siginfo) and stop again right after, until a PTRACE_EVENT_STOP. */
static enum stop forward_signals(struct ctx *c, enum stop st, int *sig)
{
    while (st == ST_SIGNAL) {
        if (++c->info->signals_forwarded > MAX_FORWARDS)
            return ST_SIGNAL;
        if (pt(c, PTRACE_INTERRUPT, 0, 0) < 0 || pt(c, PTRACE_CONT, 0, (uintptr_t)*sig) < 0)
            return ST_ERROR;
        st = wait_stop(c, sig);
    }
    return st;
}

static int is_restart(int64_t rv)
{
    return rv == -K_ERESTARTSYS || rv == -K_ERESTARTNOINTR || rv == -K_ERESTARTNOHAND ||
           rv == -K_ERESTART_RESTARTBLOCK;
}

/* Calls that return a plain -EINTR when interrupted without a handler running, and that are safe
 * to re-issue with the same arguments (see the top of the file). x86_64 numbers. */
static int eintr_restartable(int64_t nr)
{
    switch (nr) {
    case 65:  /* semop */
    case 128: /* rt_sigtimedwait */
    case 220: /* semtimedop */
    case 232: /* epoll_wait */
    case 281: /* epoll_pwait */
    case 441: /* epoll_pwait2 */
        return 1;
    default:
        return 0;
    }
}

struct ud_rseq_conf {
    uint64_t rseq_abi_pointer;
    uint32_t rseq_abi_size;
    uint32_t signature;
    uint32_t flags;
    uint32_t pad;
};

struct ud_rseq_cs {
    uint32_t version;
    uint32_t flags;
    uint64_t start_ip;
    uint64_t post_commit_offset;
    uint64_t abort_ip;
};

/* If the saved rip is inside the thread's current rseq critical section, move it to the abort
 * handler as the kernel would. -1 when the section's signature is wrong (the kernel would kill the
 * process on abort: we leave that to it and do nothing). */
static int rseq_abort_if_inside(struct ctx *c)
{
    struct ud_rseq_conf conf;
    memset(&conf, 0, sizeof(conf));
    if (ptrace((enum __ptrace_request)UD_PTRACE_GET_RSEQ_CONFIGURATION, c->tid,
               (void *)sizeof(conf), &conf) < 0 || !conf.rseq_abi_pointer)
        return 0; /* no rseq, or a kernel older than 5.13 that cannot tell us */
    uint64_t cs_ptr = 0;
    if (remote_read(c->tid, conf.rseq_abi_pointer + 8, &cs_ptr, sizeof(cs_ptr)) < 0 || !cs_ptr)
        return 0;
    struct ud_rseq_cs cs;
    if (remote_read(c->tid, cs_ptr, &cs, sizeof(cs)) < 0)
        return 0;
    if (c->saved.rip - cs.start_ip >= cs.post_commit_offset)
        return 0;
    uint32_t sig = 0;
    if (remote_read(c->tid, cs.abort_ip - 4, &sig, sizeof(sig)) < 0 || sig != conf.signature)
        return -1;
    c->saved.rip = cs.abort_ip;
    c->info->rseq_aborts++;
    return 0;
}

/* Read the registers at a get_signal() stop where they are the thread's own. */
static int snapshot(struct ctx *c, int *is_compat)
{
    c->have_saved = 0;
    if (get_regs(c, &c->saved, is_compat) < 0)
        return -1;
    if (*is_compat)
        return 0;
    c->have_saved = 1;
    if (!c->info->saved_ip) {
        c->info->saved_ip = c->saved.rip;
        c->info->saved_orig_rax = (int64_t)c->saved.orig_rax;
        c->info->saved_rax = (int64_t)c->saved.rax;
    }
    if (!(c->flags & UD_INJECT_F_KEEP_EINTR) && (int64_t)c->saved.orig_rax >= 0 &&
        (int64_t)c->saved.rax == -EINTR && eintr_restartable((int64_t)c->saved.orig_rax)) {
        c->saved.rax = (unsigned long long)(int64_t)-K_ERESTARTNOHAND;
        c->info->eintr_fixup = 1;
    }
    if (!(c->flags & UD_INJECT_F_NO_RSEQ) && rseq_abort_if_inside(c) < 0)
        return -2;
    return 0;
}

/* The syscall faulted before running (its code page vanished): that signal exists only because
 * of us. */
static int fault_is_ours(struct ctx *c, int sig)
{
    if (sig != SIGSEGV && sig != SIGBUS && sig != SIGILL)
        return 0;
    siginfo_t si;
    regs_t now;
    if (pt(c, PTRACE_GETSIGINFO, 0, (uintptr_t)&si) < 0 || get_regs(c, &now, NULL) < 0)
        return 0;
    return si.si_code > 0 && now.rip == c->syscall_ip;
}

static int64_t elapsed_ns(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (int64_t)(t1.tv_sec - t0->tv_sec) * 1000000000 + (t1.tv_nsec - t0->tv_nsec);
}

/* Release the thread: its own registers back, detach delivering sig (0 from an event stop). */
static int finish(struct ctx *c, int rc, int sig, const struct timespec *t0)
{
    int err = c->info->err, req = c->info->request;
    if (restore(c) < 0 && rc == UD_INJECT_OK)
        rc = UD_INJECT_E_PTRACE;
    if (pt(c, PTRACE_DETACH, 0, (uintptr_t)sig) < 0 && rc == UD_INJECT_OK)
        rc = UD_INJECT_E_PTRACE;
    if (err) { /* report the first failure, not a consequence of it */
        c->info->err = err;
        c->info->request = req;
    }
    c->info->elapsed_ns = elapsed_ns(t0);
    return rc;
}

/* Come back from a stop with unknown registers to a get_signal() stop and resave there. After a
 * signal-delivery-stop the registers must be the thread's own before calling. */
static int to_event_stop(struct ctx *c, enum stop st, int *sig, const struct timespec *t0)
{
    st = forward_signals(c, st, sig);
    if (st == ST_GONE)
        return UD_INJECT_E_GONE;
    if (st == ST_SIGNAL) /* forwarding cap hit: still at a signal-delivery-stop */
        return finish(c, UD_INJECT_E_BUSY, *sig, t0);
    if (st == ST_ERROR) /* a ptrace request or wait failed: the thread may still be stopped */
        return finish(c, UD_INJECT_E_PTRACE, 0, t0);
    if (st != ST_EVENT)
        return finish(c, UD_INJECT_E_STATE, 0, t0);
    return -1;
}

/* At a signal-delivery-stop with the thread's own registers back in place: pass the signal on,
 * come back to a get_signal() stop and save the registers there again. -1 to go on, else the
 * status to return. */
static int resave(struct ctx *c, enum stop st, int *sig, const struct timespec *t0)
{
    int rc, is_compat = 0;
    if ((rc = to_event_stop(c, st, sig, t0)) >= 0)
        return rc;
    int snap = snapshot(c, &is_compat);
    if (snap < 0)
        return finish(c, snap == -2 ? UD_INJECT_E_BUSY : UD_INJECT_E_PTRACE, 0, t0);
    return -1;
}

int ud_inject_syscalls(int tid, uint64_t syscall_ip, ud_syscall *calls, size_t ncalls,
                       uint32_t flags, ud_inject_info *info)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    memset(info, 0, sizeof(*info));
    struct ctx c = {.tid = tid, .flags = flags, .syscall_ip = syscall_ip, .info = info};
    int sig = 0, is_compat = 0, rc;
    enum stop st;

    if (ptrace(PTRACE_SEIZE, tid, NULL, (void *)(uintptr_t)PTRACE_O_TRACESYSGOOD) < 0) {
        info->err = errno;
        info->request = PTRACE_SEIZE;
        return UD_INJECT_E_SEIZE;
    }
    if (pt(&c, PTRACE_INTERRUPT, 0, 0) < 0) {
        /* only fails once the thread is already exiting: collect it */
        st = wait_stop(&c, &sig);
        return st == ST_GONE ? UD_INJECT_E_GONE : UD_INJECT_E_PTRACE;
    }
    st = wait_stop(&c, &sig);
    if ((rc = to_event_stop(&c, st, &sig, &t0)) >= 0)
        return rc;
    info->first_stop_sig = sig;
    info->group_stop = sig != SIGTRAP;

    int snap = snapshot(&c, &is_compat);
    if (snap == -1)
        return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
    if (is_compat) { /* nothing was changed: leave its registers alone */
        pt(&c, PTRACE_DETACH, 0, 0);
        info->elapsed_ns = elapsed_ns(&t0);
        return UD_INJECT_E_COMPAT;
    }
    if (snap == -2)
        return finish(&c, UD_INJECT_E_BUSY, 0, &t0);
    errno = 0;
    long word = ptrace(PTRACE_PEEKTEXT, tid, (void *)(uintptr_t)syscall_ip, NULL);
    if (errno || (word & 0xffff) != 0x050f)
        return finish(&c, UD_INJECT_E_INSN, 0, &t0);

    int retries = 0;
    for (size_t i = 0; i < ncalls; i++) {
        ud_syscall *call = &calls[i];
        call->done = 0;
        call->restarts = 0;
        for (;;) {
            regs_t r = c.saved;
            r.rip = syscall_ip;
            r.rax = (unsigned long long)call->nr;
            r.orig_rax = (unsigned long long)-1LL;
            r.rdi = call->args[0];
            r.rsi = call->args[1];
            r.rdx = call->args[2];
            r.r10 = call->args[3];
            r.r8 = call->args[4];
            r.r9 = call->args[5];
            r.eflags &= ~X86_EFLAGS_TF;
            if (set_regs(&c, &r) < 0 || pt(&c, PTRACE_SYSCALL, 0, 0) < 0)
                return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
            st = wait_stop(&c, &sig);

            if (st == ST_SYSCALL) { /* entry of our call */
                if (get_regs(&c, &r, NULL) < 0)
                    return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
                /* Not our call (cannot happen): skip it (nr -1) and still leave through
                 * get_signal(), since detaching at a syscall stop would bypass the restart. */
                int bogus = (int64_t)r.orig_rax != call->nr || r.rip != syscall_ip + 2;
                if (bogus) {
                    r.orig_rax = (unsigned long long)-1LL;
                    if (set_regs(&c, &r) < 0)
                        return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
                }
                if (pt(&c, PTRACE_SYSCALL, 0, 0) < 0)
                    return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
                st = wait_stop(&c, &sig);
                if (st == ST_GONE)
                    return UD_INJECT_E_GONE;
                if (st != ST_SYSCALL)
                    return finish(&c, UD_INJECT_E_STATE, 0, &t0);
                if (get_regs(&c, &r, NULL) < 0)
                    return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
                int64_t result = (int64_t)r.rax;
                /* back into get_signal() before anything returns to user space */
                if (pt(&c, PTRACE_INTERRUPT, 0, 0) < 0 || pt(&c, PTRACE_CONT, 0, 0) < 0)
                    return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
                st = wait_stop(&c, &sig);
                if (st == ST_SIGNAL && restore(&c) < 0)
                    return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
                if (st == ST_SIGNAL) {
                    if ((rc = resave(&c, st, &sig, &t0)) >= 0)
                        return rc;
                } else if (st == ST_GONE) {
                    return UD_INJECT_E_GONE;
                } else if (st != ST_EVENT) {
                    return finish(&c, UD_INJECT_E_STATE, 0, &t0);
                }
                if (bogus)
                    return finish(&c, UD_INJECT_E_STATE, 0, &t0);
                if (is_restart(result)) { /* a signal cut it short: run it again */
                    if (++call->restarts > MAX_RESTARTS)
                        return finish(&c, UD_INJECT_E_BUSY, 0, &t0);
                    continue;
                }
                call->result = result;
                call->done = 1;
                break;
            }

            /* Our syscall did not run: the thread stopped again in get_signal(). */
            if (st == ST_GONE)
                return UD_INJECT_E_GONE;
            if (st == ST_SIGNAL && fault_is_ours(&c, sig))
                return finish(&c, UD_INJECT_E_FAULT, 0, &t0);
            if (st != ST_SIGNAL && st != ST_EVENT)
                return finish(&c, UD_INJECT_E_STATE, 0, &t0);
            if (restore(&c) < 0)
                return finish(&c, UD_INJECT_E_PTRACE, 0, &t0);
            if (st == ST_SIGNAL && (rc = resave(&c, st, &sig, &t0)) >= 0)
                return rc;
            info->retries++;
            if (++retries > MAX_RETRIES)
                return finish(&c, UD_INJECT_E_BUSY, 0, &t0);
        }
    }
    return finish(&c, UD_INJECT_OK, 0, &t0);
}

#else /* not x86_64 */

/* aarch64 is left out on purpose: ptrace cannot restore orig_x0, so an interrupted call could not
 * be restarted with its first argument intact after we ran ours. */
int ud_inject_supported(void)
{
    return 0;
}

int64_t ud_inject_find_insn(const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    return -1;
}

int ud_inject_syscalls(int tid, uint64_t syscall_ip, ud_syscall *calls, size_t ncalls,
                       uint32_t flags, ud_inject_info *info)
{
    (void)tid;
    (void)syscall_ip;
    (void)calls;
    (void)ncalls;
    (void)flags;
    memset(info, 0, sizeof(*info));
    return UD_INJECT_E_ARCH;
}

#endif
