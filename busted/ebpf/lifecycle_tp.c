/* Lifecycle tier "tracepoint": TCP flows from stable tracepoints.
 *
 * sock:inet_sock_set_state carries the socket pointer (an opaque key for us), both states and the
 * 4-tuple, for every TCP state change, so no struct is read (R0).
 * tcp:tcp_destroy_sock marks the end: it fires when the last reference to the socket goes, after
 * the application has read everything it will read, so byte counts are final there. (The CLOSE
 * state can come earlier, e.g. FIN_WAIT2 -> CLOSE on the peer's FIN, while unread data still sits
 * in the receive queue.) Kernels without it end flows at the CLOSE transition (END_AT_CLOSE).
 */

struct tuple {
    u16 family;
    u16 sport;
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
};

/* Tracepoint arrays are read with a helper: the verifier forbids loads through a pointer derived
 * from the context, which is what passing args->saddr to a function produces. */
#define READ_TUPLE(t, args)                                                              \
    do {                                                                                 \
        (t)->family = (args)->family;                                                    \
        (t)->sport = (args)->sport;                                                      \
        (t)->dport = (args)->dport;                                                      \
        if ((t)->family == BST_AF_INET) {                                                    \
            bpf_probe_read_kernel((t)->saddr, 4, (args)->saddr);                         \
            bpf_probe_read_kernel((t)->daddr, 4, (args)->daddr);                         \
        } else {                                                                         \
            bpf_probe_read_kernel((t)->saddr, 16, (args)->saddr_v6);                     \
            bpf_probe_read_kernel((t)->daddr, 16, (args)->daddr_v6);                     \
        }                                                                                \
    } while (0)

static __always_inline void copy_tuple(struct flow *f, struct tuple *t)
{
    f->family = t->family;
    f->sport = t->sport;
    f->dport = t->dport;
    __builtin_memcpy(f->saddr, t->saddr, 16);
    __builtin_memcpy(f->daddr, t->daddr, 16);
    f->flags |= FL_HAVE_TUPLE;
}

static __always_inline void flow_end(u64 sk, struct tuple *t)
{
#ifdef HAVE_CAPTURE_SK
    capc_forget(sk);  /* capture_cgroup.c: the socket's address may be reused */
#endif
    struct flow *f = flows.lookup(&sk);
    if (!f) {
        /* Never seen sending or receiving: if it predates us, user space may know it from its
         * sock_diag dump and wants to hear that it ended. */
        lost_socks.delete(&sk);
        struct flow tmp = {};
        tmp.flags = FL_UNTRACKED | FL_MIDSTREAM;
        copy_tuple(&tmp, t);
        emit(REC_CLOSE, sk, &tmp);
        return;
    }
    if (f->flags & FL_AGGREGATED) {
        /* Busy-host mode: summed, not announced (one that never got its tuple never connected). */
        if (f->flags & FL_HAVE_TUPLE)
            flow_summarize(f);
        hook_flow_end(sk, f);
        flows.delete(&sk);
#ifdef HAVE_PLAINTEXT
        pt_skip.delete(&sk);
#endif
        return;
    }
    /* A connect that never reached ESTABLISHED was never announced: drop it quietly. */
    if (!(f->flags & (FL_OPEN_SENT | FL_MIDSTREAM)) && f->direction == DIR_CONNECT) {
        hook_flow_end(sk, f);
        flows.delete(&sk);
        return;
    }
    copy_tuple(f, t);
    emit(REC_CLOSE, sk, f);
    hook_flow_end(sk, f);
    flows.delete(&sk);
#ifdef HAVE_PLAINTEXT
    pt_skip.delete(&sk);  /* the verdict ends with the socket */
#endif
}

/* Hook: every TCP state change. Connects are attributed at CLOSE->SYN_SENT, which runs inside
 * connect() in the caller's context; everything after may run in softirq (any pid). */
int bst_set_state(struct tracepoint__sock__inet_sock_set_state *args)
{
    if (args->protocol != BST_IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int os = args->oldstate;
    int ns = args->newstate;

    if (ns == BST_TCP_SYN_SENT) {
        struct flow init = {};
        init.open_ns = bpf_ktime_get_ns();
        init.direction = DIR_CONNECT;
        attribute(&init);
#ifdef BUSY_HOST
        /* The peer is set before SYN_SENT (the source port only after). */
        struct tuple pt = {};
        READ_TUPLE(&pt, args);
        if (peer_quiet(pt.family, pt.daddr, pt.dport, DIR_CONNECT))
            init.flags |= FL_AGGREGATED;
#endif
        struct flow *f = flow_insert(sk, &init);
        if (f)
            hook_connect_start(sk, f);
#ifdef HAVE_CAPTURE
        cap_on_syn_sent(sk, init.flags & FL_AGGREGATED);
#endif
        return 0;
    }

    if (ns == BST_TCP_ESTABLISHED && os == BST_TCP_SYN_SENT) {
        /* Source port is only final now (it is picked after SYN_SENT is set). */
        struct flow *f = flows.lookup(&sk);
        if (!f)
            return 0;
        struct tuple t = {};
        READ_TUPLE(&t, args);
        copy_tuple(f, &t);
        if (f->flags & FL_AGGREGATED)
            return 0;
        f->flags |= FL_OPEN_SENT;
        emit(REC_OPEN, sk, f);
        return 0;
    }

    if (ns == BST_TCP_ESTABLISHED && os == BST_TCP_SYN_RECV) {
        /* Passive open, in softirq: the pid here is whoever the CPU was running. Attribution
         * waits for the owner's first send/recv (bytes tier) or accept() (syscall tier). */
        struct flow init = {};
        init.open_ns = bpf_ktime_get_ns();
        init.direction = DIR_ACCEPT;
        struct tuple t = {};
        READ_TUPLE(&t, args);
        copy_tuple(&init, &t);
        if (peer_quiet(t.family, t.daddr, t.sport, DIR_ACCEPT))
            init.flags |= FL_AGGREGATED;
        struct flow *f = flow_insert(sk, &init);
        if (f)
            hook_passive_established(sk, f);
        return 0;
    }

    if (ns == BST_TCP_FIN_WAIT1 || ns == BST_TCP_LAST_ACK) {
        /* Only close()/shutdown() moves a socket into these states: process context, so an
         * accepted flow that never sent or received is attributed to whoever closed it. */
        struct flow *f = flows.lookup(&sk);
        if (f && f->direction == DIR_ACCEPT)
            flow_attribute_and_open(sk, f);
        return 0;
    }

#ifdef END_AT_CLOSE
    if (ns == BST_TCP_CLOSE && os != BST_TCP_LISTEN) {
        struct tuple t = {};
        READ_TUPLE(&t, args);
        flow_end(sk, &t);
    }
#endif
    return 0;
}

#ifndef END_AT_CLOSE
/* Hook: the socket is freed. Final byte counts; also reaches flows we only saw mid-stream. */
int bst_destroy(struct tracepoint__tcp__tcp_destroy_sock *args)
{
    u64 sk = (u64)args->skaddr;
    struct tuple t = {};
    READ_TUPLE(&t, args);
    flow_end(sk, &t);
    return 0;
}
#endif
