/* Lifecycle tier "kprobe": for kernels without sock:inet_sock_set_state (before 4.16).
 *
 * tcp_connect(), inet_csk_accept() (return) and tcp_close() all run in the owning process's
 * context, so attribution is direct. Their only useful argument is the socket pointer, which R0
 * lets us use as a key but not read, so the 4-tuple's peer side comes from the sockaddr the
 * application passed to connect() (user memory); the local address/port are not known in this
 * tier (events carry "" and 0), nor is the peer of an accepted flow. Only used where kprobes
 * exist: this VM has none, so the tier is compile- and verifier-tested only.
 */
#include <uapi/linux/ptrace.h>  /* PT_REGS_* for kprobe contexts */

BPF_HASH(kp_addr, u32, u64, 4096);   /* tid -> user sockaddr pointer in connect()/accept() */

static __always_inline void peer_from_user(struct flow *f)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *ua = kp_addr.lookup(&tid);
    if (!ua || *ua == 0)
        return;
    struct bst_sockaddr sa = {};
    if (bpf_probe_read_user(&sa, sizeof(sa), (void *)*ua) != 0)
        return;
    f->family = sa.family;
    f->dport = __builtin_bswap16(sa.port);
    if (sa.family == BST_AF_INET)
        __builtin_memcpy(f->daddr, &sa.addr4, 4);
    else
        __builtin_memcpy(f->daddr, sa.addr6, 16);
    f->flags |= FL_HAVE_TUPLE;
}

int bst_kp_conn_in(struct sys_enter_args *args)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 ua = args->arg[1];
    kp_addr.update(&tid, &ua);
    return 0;
}

int bst_kp_acc_in(struct sys_enter_args *args)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 ua = args->arg[1];
    kp_addr.update(&tid, &ua);
    return 0;
}

/* Hook: tcp_connect() sends the SYN from inside connect(): caller's context. */
int bst_kp_connect(struct pt_regs *ctx)
{
    u64 sk = PT_REGS_PARM1(ctx);
    struct flow init = {};
    init.open_ns = bpf_ktime_get_ns();
    init.direction = DIR_CONNECT;
    attribute(&init);
    peer_from_user(&init);
    if ((init.flags & FL_HAVE_TUPLE) && peer_quiet(init.family, init.daddr, init.dport, DIR_CONNECT))
        init.flags |= FL_AGGREGATED;
    struct flow *f = flow_insert(sk, &init);
    if (f) {
        hook_connect_start(sk, f);
#ifdef HAVE_CAPTURE
        cap_on_syn_sent(sk, f->flags & FL_AGGREGATED);
#endif
        if (f->flags & FL_AGGREGATED)
            return 0;
        f->flags |= FL_OPEN_SENT;
        emit(REC_OPEN, sk, f);
    }
    return 0;
}

/* Hook: inet_csk_accept() returns the new socket to accept()'s caller. The sockaddr is written
 * after this returns, so the peer is read at the syscall's exit (user space completes it). */
int bst_kp_accept_ret(struct pt_regs *ctx)
{
    u64 sk = PT_REGS_RC(ctx);
    if (!sk)
        return 0;
    struct flow init = {};
    init.open_ns = bpf_ktime_get_ns();
    init.direction = DIR_ACCEPT;
    attribute(&init);
    init.flags |= FL_OPEN_SENT;
    struct flow *f = flow_insert(sk, &init);
    if (f)
        emit(REC_OPEN, sk, f);
    return 0;
}

/* Hook: tcp_close() is the application's last close(): every byte it read was counted. */
int bst_kp_close(struct pt_regs *ctx)
{
    u64 sk = PT_REGS_PARM1(ctx);
#ifdef HAVE_CAPTURE_SK
    capc_forget(sk);  /* capture_cgroup.c: the socket's address may be reused */
#endif
    struct flow *f = flows.lookup(&sk);
    if (!f) {
        lost_socks.delete(&sk);
        return 0;
    }
    if (f->flags & FL_AGGREGATED)
        flow_summarize(f);  /* busy-host mode: summed, not announced */
    else
        emit(REC_CLOSE, sk, f);
    hook_flow_end(sk, f);
    flows.delete(&sk);
    return 0;
}
