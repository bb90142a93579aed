/* Capability "capture", tier "cgroup": the same records as capture.c (DNS answers, TLS
 * ClientHellos, plain-HTTP bytes), read from packets at the cgroup v2 root instead of at the
 * syscall boundary.
 *
 * Why: a syscall tracepoint, once registered, puts every syscall of every process of the host on
 * the tracing slow path (~60-90 ns each here, docs/benchmarks.md), whether or not it touches the
 * network. These hooks run only for sockets: per packet (skb), per connect or unconnected UDP
 * send (sock_addr), and a socket this tier does not follow costs one map lookup per packet.
 *
 *   DNS answers  - cgroup skb ingress: UDP or TCP segments from port 53, as they are delivered to
 *                  the receiving socket, so every resolver library is covered. The asking process
 *                  is the one that connected or sent to port 53 (sock_addr hooks, by socket cookie:
 *                  ingress runs in softirq, where "current" is whoever the CPU was running).
 *   TLS hellos   - cgroup skb egress: the first data segments of a connection this host opened
 *                  (the lifecycle tier calls cap_on_syn_sent), kept only if they start a TLS
 *                  handshake record; up to CAP_PKTS segments so a hello split over segments is whole.
 *   Plain HTTP   - a connection whose first bytes are an HTTP request has its segments copied both
 *                  ways (egress: requests; ingress: responses) as plaintext records (plaintext.c's
 *                  layout, one "call" per segment).
 *
 * Order and retransmits: each followed direction remembers the next TCP sequence number it
 * expects; bytes already seen (retransmits) are dropped, and a segment beyond it (one we never
 * saw: reordered, or before we attached) is passed on with the hole's size, so user space
 * counts a gap rather than reading bytes out of order.
 *
 * R0 holds: __sk_buff and bpf_sock_addr are user ABI contexts, the packet bytes are wire formats
 * (IP, UDP, TCP headers), socket pointers (skb->sk, ctx->sk: the same pointer the flow
 * tracepoints carry as skaddr) are opaque keys. Nothing reads a kernel struct.
 */

#define CAP_MAX    4096   /* bytes copied per DNS/hello record (power of two: used as a mask) */
#define CAP_PKTS   4      /* data segments inspected per new connection for a ClientHello */
#define CAP_TOTAL  16384  /* hello bytes per connection after which we stop looking */

/* struct cap_hdr, REC_DNS/REC_TLS and CAP_DNS_* come from busted/wire/layout.py. */
#define CAPC_NEW  0   /* opened by this host, no data seen yet */
#define CAPC_TLS  1   /* its first bytes start a TLS handshake: copy until the hello is whole */
#define CAPC_HTTP 2   /* plain HTTP: every segment both ways goes to plaintext records */
#define CAPC_DNS  3   /* DNS over TCP (port 53): answers copied at ingress */

#define CAPC_TX 1
#define CAPC_RX 2

struct cap_rec {
    struct cap_hdr h;
    u8 data[CAP_MAX];
};

/* Who asked: taken in the process's context when the socket connected or sent to port 53. */
struct capc_who {
    u32 pid;
    u32 tid;
    u32 uid;
    u32 pad;
    char comm[16];
};

/* A TCP connection this host opened, followed until we know what it carries. */
struct capc_sk {
    u32 kind;        /* CAPC_* */
    u32 have;        /* CAPC_TX / CAPC_RX: the next sequence number of that direction is known */
    u32 tx_next;     /* next TCP sequence number expected, egress */
    u32 rx_next;     /* ... ingress */
    u32 pkts;        /* hello segments copied */
    u32 bytes;       /* hello bytes copied */
    u32 no_hello;    /* busy-host mode: an aggregated flow (quiet peer): DNS only */
    u32 pad;
    struct capc_who who;
};

/* A parsed IP + UDP/TCP header. */
struct capc_pkt {
    u32 payload;     /* offset of the payload from the IP header */
    u32 plen;        /* payload bytes */
    u32 seq;         /* TCP */
    u16 sport;
    u16 dport;
    u8 proto;        /* 6 TCP, 17 UDP */
    u8 family;       /* BST_AF_INET / BST_AF_INET6 */
    u8 pad[2];
    u8 saddr[16];
};

/* socket -> followed connection: made at SYN_SENT, deleted when it is known to carry nothing of
 * ours (or its hello is whole) and at the flow's end, so a full map is a counted KERNEL_MAP loss
 * (an LRU map would evict a followed connection silently). */
BPF_HASH(capc_sk, u64, struct capc_sk, 16384);
/* socket cookie -> who asked port 53. Cookies are never reused, and nothing says when a UDP socket
 * closes, so the oldest entries give way (a DNS socket asks and reads within milliseconds). */
BPF_TABLE("lru_hash", u64, struct capc_who, capc_who, 16384);
BPF_PERCPU_ARRAY(capc_scratch, struct cap_rec, 1);

static __always_inline void capc_who_now(struct capc_who *w)
{
    u64 pt = bpf_get_current_pid_tgid();
    w->pid = pt >> 32;
    w->tid = (u32)pt;
    w->uid = (u32)bpf_get_current_uid_gid();
    bpf_get_current_comm(&w->comm, sizeof(w->comm));
}

/* Called by the lifecycle tier at CLOSE->SYN_SENT, inside connect() on the calling thread: the
 * connection is ours to follow, and this is the process that opened it. */
#define HAVE_CAPTURE 1
#define HAVE_CAPTURE_SK 1
static __always_inline void cap_on_syn_sent(u64 sk, u32 aggregated)
{
    struct capc_sk c = {};
    c.no_hello = aggregated;
    capc_who_now(&c.who);
    if (capc_sk.update(&sk, &c) != 0)
        count_loss(LOSS_MAP);
}

/* Called by the lifecycle tier when the flow ends: the socket's address may be reused. */
static __always_inline void capc_forget(u64 sk)
{
    capc_sk.delete(&sk);
}

/* Parse the IP and transport headers (skb data starts at the IP header in cgroup skb programs).
 * IPv6 extension headers are not walked: DNS and TCP come right after the fixed header. */
static __always_inline int capc_parse(struct __sk_buff *skb, struct capc_pkt *pk)
{
    u8 ip[40];
    u32 ihl;
    if (bpf_skb_load_bytes(skb, 0, ip, 20) != 0)
        return -1;
    if ((ip[0] >> 4) == 4) {
        ihl = (ip[0] & 0x0f) * 4;
        pk->proto = ip[9];
        pk->family = BST_AF_INET;
        __builtin_memcpy(pk->saddr, &ip[12], 4);
    } else if ((ip[0] >> 4) == 6) {
        if (bpf_skb_load_bytes(skb, 0, ip, 40) != 0)
            return -1;
        ihl = 40;
        pk->proto = ip[6];
        pk->family = BST_AF_INET6;
        __builtin_memcpy(pk->saddr, &ip[8], 16);
    } else {
        return -1;
    }
    if (ihl < 20 || ihl > 60)
        return -1;
    u8 th[16];
    if (pk->proto == 17) {
        if (bpf_skb_load_bytes(skb, ihl, th, 8) != 0)
            return -1;
        pk->payload = ihl + 8;
    } else if (pk->proto == BST_IPPROTO_TCP) {
        if (bpf_skb_load_bytes(skb, ihl, th, 16) != 0)
            return -1;
        pk->payload = ihl + (th[12] >> 4) * 4;
        pk->seq = ((u32)th[4] << 24) | ((u32)th[5] << 16) | ((u32)th[6] << 8) | th[7];
    } else {
        return -1;
    }
    pk->sport = ((u16)th[0] << 8) | th[1];
    pk->dport = ((u16)th[2] << 8) | th[3];
    pk->plen = skb->len > pk->payload ? skb->len - pk->payload : 0;
    return 0;
}

/* Copy up to CAP_MAX payload bytes into a capture record and send it. */
static __always_inline void capc_emit(struct __sk_buff *skb, u32 type, u64 sk, struct capc_pkt *pk,
                                      u32 skip, u8 transport, struct capc_who *who, int peer)
{
    u32 zero = 0;
    struct cap_rec *r = capc_scratch.lookup(&zero);
    if (!r || pk->plen <= skip)
        return;
    u32 left = pk->plen - skip;
    u32 n = left > CAP_MAX ? CAP_MAX : left;
    n = ((n - 1) & (CAP_MAX - 1)) + 1;  /* 1..CAP_MAX, in a form the verifier keeps */
    if (bpf_skb_load_bytes(skb, pk->payload + skip, r->data, n) != 0)
        return;
    r->h.type = type;
    r->h.len = n;
    r->h.wire_len = left;
    r->h.ts_ns = bpf_ktime_get_ns();
    r->h.sk = sk;
    r->h.pid = who ? who->pid : 0;
    r->h.tid = who ? who->tid : 0;
    r->h.uid = who ? who->uid : 0;
    r->h.fd = 0;
    r->h.transport = transport;
    r->h.family = 0;
    r->h.port = 0;
    __builtin_memset(r->h.comm, 0, sizeof(r->h.comm));
    if (who)
        __builtin_memcpy(r->h.comm, who->comm, sizeof(r->h.comm));
    if (peer) {  /* DNS: the server the answer came from */
        r->h.family = pk->family;
        r->h.port = pk->sport;
        __builtin_memcpy(r->h.addr, pk->saddr, 16);
    }
    if (events.ringbuf_output(r, sizeof(struct cap_hdr) + n, BPF_RB_NO_WAKEUP) != 0)
        count_loss(LOSS_RING);
}

/* Where this segment stands against the direction's expected sequence number. Returns the
 * bytes to skip at its start (already seen), or -1 to drop it whole (a retransmit); *hole gets
 * the bytes never seen before it. Advances the expectation past the segment. */
static __always_inline int capc_order(struct capc_sk *c, struct capc_pkt *pk, u32 dir, u32 *hole)
{
    *hole = 0;
    u32 *next = dir == CAPC_TX ? &c->tx_next : &c->rx_next;
    u32 skip = 0;
    if (c->have & dir) {
        s32 ahead = (s32)(*next - pk->seq);
        if (ahead > 0) {
            if ((u32)ahead >= pk->plen)
                return -1;
            skip = (u32)ahead;
        } else if (ahead < 0) {
            *hole = (u32)(-ahead);
        }
    }
    *next = pk->seq + pk->plen;
    c->have |= dir;
    return (int)skip;
}

/* The first bytes of a connection start an HTTP/1.x request, or the HTTP/2 cleartext preface. */
static __always_inline int capc_http_start(u8 *h)
{
    u32 w = (u32)h[0] | (u32)h[1] << 8 | (u32)h[2] << 16 | (u32)h[3] << 24;
    return w == 0x20544547 /* "GET " */ || w == 0x54534f50 /* "POST" */ || w == 0x20545550 /* "PUT " */ ||
           w == 0x44414548 /* "HEAD" */ || w == 0x43544150 /* "PATC" */ || w == 0x454c4544 /* "DELE" */ ||
           w == 0x4954504f /* "OPTI" */ || w == 0x20495250 /* "PRI " */;
}

#ifdef HAVE_PLAINTEXT
/* A plain-HTTP segment as plaintext records (plaintext.c's layout and piece rule): the segment is
 * one "call" of hole + plen bytes whose first `hole` bytes were never seen (cut bit 4). */
static __always_inline void capc_plain(struct __sk_buff *skb, u64 sk, struct capc_pkt *pk, u32 skip,
                                       u32 hole, u8 dir, struct capc_who *who)
{
    if (pt_skipped(sk) || pk->plen <= skip)
        return;
    u64 total = pk->plen - skip;
    pt_emit_pieces(skb, pk->payload + skip, total, total, hole, sk, 0, who->pid, who->tid, dir, PT_PACKET);
}
#endif

/* Hook: cgroup skb egress on the cgroup v2 root. Every packet a socket of this host sends passes
 * here before segmentation (a hello written at once is usually one skb); only connections this
 * host opened have state, so every other packet costs one lookup. Always lets the packet go. */
int bst_capc_egress(struct __sk_buff *skb)
{
    struct bpf_sock *s = skb->sk;
    if (!s)
        return 1;
    u64 sk = (u64)s;
    struct capc_sk *c = capc_sk.lookup(&sk);
    if (!c || c->kind == CAPC_DNS)
        return 1;
    struct capc_pkt pk = {};
    if (capc_parse(skb, &pk) != 0 || pk.proto != BST_IPPROTO_TCP || pk.plen == 0)
        return 1;  /* SYN, ACK, FIN: no bytes */
    u32 hole = 0;
    int skip = capc_order(c, &pk, CAPC_TX, &hole);
    if (skip < 0)
        return 1;
    if (c->kind == CAPC_NEW) {
        u8 h[5] = {};
        if (hole != 0 || bpf_skb_load_bytes(skb, pk.payload + skip, h, 5) != 0) {
            capc_sk.delete(&sk);  /* the connection's start is not here: nothing to classify */
            return 1;
        }
        if (pk.dport == 53) {
            c->kind = CAPC_DNS;  /* DNS over TCP: its answers come at ingress */
            return 1;
        }
        if (h[0] == 0x16 && !c->no_hello) {
            c->kind = CAPC_TLS;
#ifdef HAVE_PLAINTEXT
        } else if (capc_http_start(h) && !c->no_hello) {
            c->kind = CAPC_HTTP;
#endif
        } else {
            capc_sk.delete(&sk);
            return 1;
        }
    }
#ifdef HAVE_PLAINTEXT
    if (c->kind == CAPC_HTTP) {
        struct capc_who who = c->who;
        capc_plain(skb, sk, &pk, (u32)skip, hole, PT_WRITE, &who);
        return 1;
    }
#endif
    if (c->kind != CAPC_TLS)
        return 1;
    u32 whole = 0;
    if (c->pkts == 0) {
        /* The first record is whole in this segment: the hello is complete, stop after it. */
        u8 h[5] = {};
        bpf_skb_load_bytes(skb, pk.payload + skip, h, 5);
        whole = pk.plen - skip >= 5 + (((u32)h[3] << 8) | h[4]);
    }
    struct capc_who who = c->who;
    capc_emit(skb, REC_TLS, sk, &pk, (u32)skip, 0, &who, 0);
    c->pkts += 1;
    c->bytes += pk.plen - skip;
    if (whole || c->pkts >= CAP_PKTS || c->bytes >= CAP_TOTAL)
        capc_sk.delete(&sk);
    return 1;
}

/* Hook: cgroup skb ingress on the cgroup v2 root: where a packet is delivered to its socket
 * (sk_filter), so it is exactly what the resolver or HTTP client will read. UDP from port 53 is a
 * DNS answer for whichever socket receives it; TCP is looked at only for followed connections. */
int bst_capc_ingress(struct __sk_buff *skb)
{
    struct capc_pkt pk = {};
    if (capc_parse(skb, &pk) != 0 || pk.plen == 0)
        return 1;
    if (pk.proto == 17) {
        if (pk.sport != 53)
            return 1;
        u64 ck = bpf_get_socket_cookie(skb);
        struct capc_who *w = capc_who.lookup(&ck);
        struct capc_who who = {};
        if (w)
            who = *w;
        capc_emit(skb, REC_DNS, 0, &pk, 0, CAP_DNS_UDP, &who, 1);
        return 1;
    }
    struct bpf_sock *s = skb->sk;
    if (!s)
        return 1;
    u64 sk = (u64)s;
    struct capc_sk *c = capc_sk.lookup(&sk);
    if (!c || (c->kind != CAPC_DNS && c->kind != CAPC_HTTP))
        return 1;
    u32 hole = 0;
    int skip = capc_order(c, &pk, CAPC_RX, &hole);
    if (skip < 0)
        return 1;
    struct capc_who who = c->who;
    if (c->kind == CAPC_DNS) {
        capc_emit(skb, REC_DNS, sk, &pk, (u32)skip, CAP_DNS_TCP, &who, 1);
        return 1;
    }
#ifdef HAVE_PLAINTEXT
    capc_plain(skb, sk, &pk, (u32)skip, hole, PT_READ, &who);
#endif
    return 1;
}

/* Hooks: sock_addr connect4/6 and udp sendmsg4/6, which run in the calling process: the process
 * that asks port 53 is remembered by socket cookie for the answers ingress will see. connect
 * covers connected UDP (glibc, musl) and TCP; sendmsg covers unconnected UDP (sendto with an
 * address). They never refuse: return 1. */
static __always_inline int capc_ask(struct bpf_sock_addr *ctx)
{
    if (ctx->user_port != __builtin_bswap16(53))
        return 1;
    u64 ck = bpf_get_socket_cookie(ctx);
    struct capc_who w = {};
    capc_who_now(&w);
    capc_who.update(&ck, &w);
    return 1;
}

int bst_capc_connect4(struct bpf_sock_addr *ctx) { return capc_ask(ctx); }
int bst_capc_connect6(struct bpf_sock_addr *ctx) { return capc_ask(ctx); }
int bst_capc_sendmsg4(struct bpf_sock_addr *ctx) { return capc_ask(ctx); }
int bst_capc_sendmsg6(struct bpf_sock_addr *ctx) { return capc_ask(ctx); }
