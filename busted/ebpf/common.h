/* busted: definitions shared by every BPF capability file.
 *
 * Rule R0: nothing here, or in any busted .c file, reads a kernel-internal struct. Socket pointers
 * are opaque map keys; addresses come from tracepoint arguments or user memory; process identity
 * from helpers (bpf_get_current_*). That is why busted compiles against headers of another kernel.
 *
 * The loader concatenates: this header, optional capability files (capture*.c), one bytes-tier
 * file, one lifecycle-tier file. The lifecycle tier comes last because it calls hooks the others
 * define (hook_connect_start, hook_passive_established, hook_flow_end; cap_on_syn_sent, capc_forget).
 */

/* User ABI constants and the sockaddr layout, declared here rather than included: they are fixed
 * by the ABI, and <uapi/linux/in.h> alone costs ~0.7 s of compile time (it pulls in the kernel's
 * socket headers). */
#define BST_AF_INET     2
#define BST_AF_INET6    10
#define BST_IPPROTO_TCP 6

/* sockaddr_in and sockaddr_in6 share family and port; the IPv4 address sits at offset 4, the
 * IPv6 one at offset 8. */
struct bst_sockaddr {
    u16 family;
    u16 port;       /* network order */
    u32 addr4;      /* sockaddr_in.sin_addr, or sockaddr_in6.sin6_flowinfo */
    u8 addr6[16];   /* sockaddr_in6.sin6_addr */
    u32 scope_id;
};

/* TCP states (include/net/tcp_states.h, stable uapi-visible numbering). */
#define BST_TCP_ESTABLISHED 1
#define BST_TCP_SYN_SENT    2
#define BST_TCP_SYN_RECV    3
#define BST_TCP_FIN_WAIT1   4
#define BST_TCP_CLOSE       7
#define BST_TCP_LAST_ACK    9
#define BST_TCP_LISTEN      10

#define BST_MSG_PEEK 2

/* The record layouts (struct flow, struct rec, struct cap_hdr), record types REC_*, flow flags
 * FL_* and loss places LOSS_* are generated from busted/wire/layout.py and precede this file. */

#define DIR_CONNECT 1
#define DIR_ACCEPT  2

/* Syscall tracepoint records have one fixed layout (see any events/syscalls/sys_enter_x/format):
 * 8 bytes of common fields, the syscall number, then each argument in an 8-byte slot; exits carry
 * the return value. Declaring it once lets several capability files hook the same syscall (BCC
 * would otherwise generate one struct per function and fail on the duplicate). */
struct sys_enter_args {
    u64 common;
    s32 nr;
    s32 pad;
    u64 arg[6];
};
struct sys_exit_args {
    u64 common;
    s32 nr;
    s32 pad;
    s64 ret;
};

/* Most records are submitted without waking the reader: it drains the ring on a short timer
 * (Monitor's drain_interval), so a burst costs one wake-up, not one per record. */
#ifndef BPF_RB_NO_WAKEUP
#define BPF_RB_NO_WAKEUP 1
#endif
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(flows, u64, struct flow, MAX_FLOWS);
BPF_PERCPU_ARRAY(losses, u64, 4);
/* Sockets whose map-full loss was counted: one loss per flow, not one per send/receive. */
BPF_TABLE("lru_hash", u64, u8, lost_socks, 4096);

static __always_inline void count_loss(int place)
{
    u32 k = place;
    u64 *v = losses.lookup(&k);
    if (v)
        *v += 1;
}

/* The flows map is full: count the socket once, however often it sends or receives. */
static __always_inline void count_map_loss(u64 sk)
{
    u8 one = 1;
    if (lost_socks.insert(&sk, &one) == 0)
        count_loss(LOSS_MAP);
}

/* Take process identity from the current task: only valid in the owning process's context. */
static __always_inline void attribute(struct flow *f)
{
    u64 pt = bpf_get_current_pid_tgid();
    f->pid = pt >> 32;
    f->tid = (u32)pt;
    f->uid = (u32)bpf_get_current_uid_gid();
    f->cgroup = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&f->comm, sizeof(f->comm));
    f->flags |= FL_ATTRIBUTED;
}

static __always_inline void emit(u32 type, u64 sk, struct flow *f)
{
    struct rec *r = events.ringbuf_reserve(sizeof(struct rec));
    if (!r) {
        count_loss(LOSS_RING);
        return;
    }
    r->h.type = type;
    r->h.pad = 0;
    r->h.ts_ns = bpf_ktime_get_ns();
    r->h.sk = sk;
    __builtin_memcpy(&r->f, f, sizeof(struct flow));
    /* Opens wake the reader (it reads /proc while short-lived processes still exist); ends and
     * payload captures wait for its next timed drain. */
    events.ringbuf_submit(r, type == REC_OPEN ? 0 : BPF_RB_NO_WAKEUP);
}

/* Insert a new flow; a full map is a counted loss, never silent. */
static __always_inline struct flow *flow_insert(u64 sk, struct flow *init)
{
    if (flows.insert(&sk, init) != 0) {
        /* EEXIST (pointer reused without us seeing the end): overwrite; else the map is full. */
        if (flows.update(&sk, init) != 0) {
            count_map_loss(sk);
            return 0;
        }
    }
    return flows.lookup(&sk);
}

/* A flow first seen mid-stream (it predates the monitor): track bytes from now on. */
static __always_inline struct flow *flow_midstream(u64 sk)
{
    struct flow init = {};
    init.flags = FL_MIDSTREAM;
    return flow_insert(sk, &init);
}

/* Count a completed send/receive on a flow (every bytes tier ends here). */
static __always_inline void flow_count(struct flow *f, long n, int is_send)
{
    if (is_send)
        __sync_fetch_and_add(&f->sent, n);
    else
        __sync_fetch_and_add(&f->recv, n);
}

/* Attribute an accepted flow in process context and announce it (once; an aggregated flow is
 * attributed for its summary, never announced). */
static __always_inline void flow_attribute_and_open(u64 sk, struct flow *f)
{
    if (f->flags & FL_ATTRIBUTED)
        return;
    attribute(f);
    if ((f->flags & FL_HAVE_TUPLE) && !(f->flags & (FL_OPEN_SENT | FL_AGGREGATED))) {
        f->flags |= FL_OPEN_SENT;
        emit(REC_OPEN, sk, f);
    }
}

/* Busy-host mode (BUSY_HOST, docs/kernel.md): user space writes quiet_peers, the peers it judged
 * "not an LLM provider, not MCP", each with an expiry. A new flow to a quiet peer is flagged
 * FL_AGGREGATED: it stays in `flows` (bytes are counted as usual) but emits no open/close record;
 * at its end it is added into `summaries` (per process x peer), which user space drains. */
#ifdef BUSY_HOST
BPF_HASH(quiet_peers, struct quiet_key, u64, QUIET_MAX);
BPF_HASH(summaries, struct sum_key, struct sum_val, SUM_MAX);

/* Whether a new flow's peer is quiet now. `port` is the service port in host order (the peer's
 * for a connect, ours for an accept); `addr` the 16-byte field of a tuple (IPv4 in 4 bytes). */
static __always_inline int peer_quiet(u16 family, u8 *addr, u16 port, u8 direction)
{
    struct quiet_key k = {};
    k.family = family;
    k.port = port;
    k.direction = direction;
    if (family == BST_AF_INET)
        __builtin_memcpy(k.addr, addr, 4);
    else
        __builtin_memcpy(k.addr, addr, 16);
    u64 *exp = quiet_peers.lookup(&k);
    return exp && *exp > bpf_ktime_get_ns();
}

/* An aggregated flow ended: add it to its process x peer summary. A full map is a counted loss. */
static __always_inline void flow_summarize(struct flow *f)
{
    struct sum_key k = {};
    k.tgid = f->pid;
    k.family = f->family;
    k.direction = f->direction;
    k.port = f->direction == DIR_ACCEPT ? f->sport : f->dport;
    __builtin_memcpy(k.addr, f->daddr, 16);
    u64 now = bpf_ktime_get_ns();
    struct sum_val *v = summaries.lookup(&k);
    if (!v) {
        struct sum_val init = {};
        init.first_ns = f->open_ns ? f->open_ns : now;
        init.uid = f->uid;
        init.cgroup = f->cgroup;
        __builtin_memcpy(init.comm, f->comm, sizeof(init.comm));
        summaries.insert(&k, &init);  /* EEXIST: another CPU inserted it first, fine */
        v = summaries.lookup(&k);
        if (!v) {
            count_loss(LOSS_MAP);
            return;
        }
    }
    __sync_fetch_and_add(&v->count, 1);
    __sync_fetch_and_add(&v->sent, f->sent);
    __sync_fetch_and_add(&v->recv, f->recv);
    if (f->open_ns && f->open_ns < v->first_ns)
        v->first_ns = f->open_ns;
    if (now > v->last_ns)
        v->last_ns = now;
}
#else
static __always_inline int peer_quiet(u16 family, u8 *addr, u16 port, u8 direction) { return 0; }
static __always_inline void flow_summarize(struct flow *f) {}
#endif
