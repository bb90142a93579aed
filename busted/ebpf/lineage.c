/* Capability "lineage", tiers "tracepoint", "sched-fork" and "syscall": who started whom, from the
 * kernel, as it happens.
 *
 * Records (layout struct lin_hdr, generated from layout.py) go to the same ring buffer as the flow
 * records, so user space reads a process's fork and exec before any flow it opens, and its exit
 * after: a process that lived 5 ms is still known when its flow is decoded.
 *
 * R0: nothing here reads a kernel-internal struct. The sources are tracepoint arguments
 * (task_newtask's pid and clone_flags, sched_process_exec's filename via its __data_loc field and
 * old_pid), user memory through its ABI (execve's argv: an array of user pointers, read with
 * bpf_probe_read_user) and helpers (pid/tgid, uid, comm, cgroup id, time).
 *
 *   task:task_newtask       parent context: new process (threads skipped via CLONE_THREAD)
 *     (or sched:sched_process_fork when task_newtask is missing: LIN_FORK_SCHED, threads too)
 *   sched:sched_process_exec            success: filename (+ stashed argv) -> REC_EXEC
 *   sched:sched_process_exit            the last thread of a process: REC_EXIT
 * Tier "syscall" only (LIN_ARGV_SYSCALL):
 *   syscalls:sys_enter_execve/execveat   argv copied into a per-thread stash
 *   syscalls:sys_exit_execve/execveat   the stash is dropped (failed execs leave nothing)
 *
 * Without LIN_ARGV_SYSCALL no syscall tracepoint is registered: any one of them puts every syscall
 * of every process on the kernel's tracing slow path (~60-90 ns each here, docs/benchmarks.md).
 * The exec record then carries no argv (LINF_NO_ARGV) and user space reads /proc/<pid>/cmdline
 * when it decodes the record (busted/lineage.py); a process that exited before that loses its argv
 * (counted), not its exe, parent or times.
 *
 * Records are submitted without a wake-up: the flow open that follows wakes the reader, and the
 * ring keeps their order. Except exec records where user space reads argv from /proc: they wake
 * the reader, so it reads /proc while the process still runs (the reader drains at most every few
 * ms however often it is woken, so a storm of execs costs no more wake-ups than a storm of flows).
 */

#ifdef LIN_ARGV_SYSCALL
#define LIN_EXEC_WAKEUP BPF_RB_NO_WAKEUP
#else
#define LIN_EXEC_WAKEUP 0
#endif

#define LIN_CLONE_THREAD 0x00010000ULL

#ifdef LIN_ARGV_SYSCALL
struct lin_args {
    u32 len;
    u32 argc;
    u32 flags;
    u32 pad;
    char buf[LIN_ARGS + LIN_ARGLEN]; /* slack: the last argument may start anywhere below LIN_ARGS */
};

BPF_PERCPU_ARRAY(lin_scratch, struct lin_args, 1);
/* execve in flight, by thread id. LRU: a thread killed inside execve leaves no stale entry for long. */
BPF_TABLE("lru_hash", u32, struct lin_args, lin_argv, 1024);
#endif
BPF_PERCPU_ARRAY(lin_out, struct lin_exec, 1);

static __always_inline void lin_hdr_fill(struct lin_hdr *h, u32 type)
{
    u64 pt = bpf_get_current_pid_tgid();
    h->type = type;
    h->pid = pt >> 32;
    h->tid = (u32)pt;
    h->ts_ns = bpf_ktime_get_ns();
    h->cgroup = bpf_get_current_cgroup_id();
    h->uid = (u32)bpf_get_current_uid_gid();
    h->ppid = 0;
    h->len = 0;
    h->flen = 0;
    h->flags = 0;
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

static __always_inline void lin_emit_small(struct lin_hdr *h)
{
    if (events.ringbuf_output(h, sizeof(*h), BPF_RB_NO_WAKEUP) != 0)
        count_loss(LOSS_RING);
}

/* A new process: the current task is its parent. */
static __always_inline void lin_fork(u32 child, u32 flags)
{
    struct lin_hdr h = {};
    lin_hdr_fill(&h, REC_FORK);
    h.ppid = h.pid; /* the parent's tgid */
    h.pid = child;
    h.flags = flags;
    lin_emit_small(&h);
}

#ifdef LIN_FORK_SCHED
int bst_lin_fork(struct tracepoint__sched__sched_process_fork *args)
{
    lin_fork((u32)args->child_pid, LINF_THREADS_TOO);
    return 0;
}
#else
int bst_lin_fork(struct tracepoint__task__task_newtask *args)
{
    if (args->clone_flags & LIN_CLONE_THREAD)
        return 0;
    lin_fork((u32)args->pid, 0);
    return 0;
}
#endif

#ifdef LIN_ARGV_SYSCALL
static __always_inline void lin_stash_argv(u64 uargv)
{
    u32 zero = 0;
    struct lin_args *a = lin_scratch.lookup(&zero);
    if (!a)
        return;
    a->len = 0;
    a->argc = 0;
    a->flags = 0;
    u32 off = 0;
    const char *const *argv = (const char *const *)uargv;
#pragma unroll
    for (int i = 0; i < LIN_MAXARGS; i++) {
        const char *p = 0;
        if (bpf_probe_read_user(&p, sizeof(p), &argv[i]) != 0 || !p)
            goto done;
        if (off >= LIN_ARGS) {
            a->flags |= LINF_ARGV_TRUNCATED;
            goto done;
        }
        long n = bpf_probe_read_user_str(&a->buf[off & (LIN_ARGS - 1)], LIN_ARGLEN, p);
        if (n <= 0) {
            /* Not resident (BPF cannot fault pages in: e.g. a string literal in a page the
             * freshly forked child never touched): keep its place as an empty argument. */
            a->buf[off & (LIN_ARGS - 1)] = 0;
            n = 1;
            a->flags |= LINF_ARGV_UNREAD;
        }
        if (n == LIN_ARGLEN)
            a->flags |= LINF_ARGV_TRUNCATED;
        off += n;
        a->argc++;
    }
    {
        const char *p = 0;
        if (bpf_probe_read_user(&p, sizeof(p), &argv[LIN_MAXARGS]) == 0 && p)
            a->flags |= LINF_ARGV_TRUNCATED;
    }
done:
    if (off > LIN_ARGS) {
        off = LIN_ARGS;
        a->flags |= LINF_ARGV_TRUNCATED;
    }
    a->len = off;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    lin_argv.update(&tid, a);
}

int bst_lin_execve_in(struct sys_enter_args *args)
{
    lin_stash_argv(args->arg[1]);
    return 0;
}

int bst_lin_execveat_in(struct sys_enter_args *args)
{
    lin_stash_argv(args->arg[2]);
    return 0;
}

/* Exec failed (or succeeded: the stash was consumed already). Either way, forget it. */
int bst_lin_execve_out(struct sys_exit_args *args)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    lin_argv.delete(&tid);
    return 0;
}
#endif

int bst_lin_exec(struct tracepoint__sched__sched_process_exec *args)
{
    u32 zero = 0;
    struct lin_exec *r = lin_out.lookup(&zero);
    if (!r)
        return 0;
    lin_hdr_fill(&r->h, REC_EXEC);
    u32 old = (u32)args->old_pid; /* the thread that called execve (a non-leader becomes the leader) */
    r->h.tid = old;
    u32 loc = (u32)args->data_loc_filename;
    /* At most LIN_FNAME - 1 bytes with the NUL, so the mask below is exact (and tells the
     * verifier the bound of the offset argv is copied to). */
    long fl = bpf_probe_read_kernel_str(r->data, LIN_FNAME - 1, (void *)args + (loc & 0xFFFF));
    if (fl <= 0) {
        r->data[0] = 0;
        fl = 1;
    }
    u32 fo = (u32)fl & (LIN_FNAME - 1);
    r->h.flen = fo;
    u32 n = 0;
#ifdef LIN_ARGV_SYSCALL
    struct lin_args *a = lin_argv.lookup(&old);
    if (a) {
        n = a->len;
        if (n > LIN_ARGS)
            n = LIN_ARGS;
        r->h.flags = a->flags;
        /* argv right after the filename: only the bytes used travel (a typical exec: ~120 B) */
        bpf_probe_read_kernel(&r->data[fo], LIN_ARGS, a->buf);
        lin_argv.delete(&old);
    } else {
        r->h.flags = LINF_NO_ARGV;
    }
#else
    r->h.flags = LINF_NO_ARGV; /* user space reads /proc/<pid>/cmdline */
#endif
    r->h.len = n;
    u64 size = sizeof(struct lin_hdr) + fo + n;
    if (size > sizeof(struct lin_exec))
        return 0; /* cannot happen (fo <= LIN_FNAME, n <= LIN_ARGS): the verifier wants the bound */
    if (events.ringbuf_output(r, size, LIN_EXEC_WAKEUP) != 0)
        count_loss(LOSS_RING);
    return 0;
}

int bst_lin_exit(struct tracepoint__sched__sched_process_exit *args)
{
    u64 pt = bpf_get_current_pid_tgid();
    struct lin_hdr h = {};
    if ((u32)pt != (u32)(pt >> 32)) {
#ifdef LIN_FORK_SCHED
        /* This tier reported the thread's creation as a fork: report its end too, so the
         * table forgets it first instead of holding it as a running process. */
        lin_hdr_fill(&h, REC_EXIT);
        h.pid = (u32)pt;
        lin_emit_small(&h);
#endif
        return 0; /* a thread, not the process (its leader's exit stands for it) */
    }
    lin_hdr_fill(&h, REC_EXIT);
    lin_emit_small(&h);
    return 0;
}
