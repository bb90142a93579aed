/* Policy enforcement, loaded only with --enforce (busted/enforce.py). Decisions are made here,
 * in the kernel, because a trip through user space loses the race against a client on loopback.
 *
 *   pol_connect4/6 (cgroup sock_addr connect) - refuse connect() to a denied address: EPERM.
 *   pol_dns_*      (syscall tracepoints)      - a DNS answer read by any process is parsed here:
 *                  when its question's name matches pol_names, its A/AAAA addresses enter pol_addr4/6 before
 *                  the read() returns, so the client's very next connect() is already judged.
 *   pol_egress     (cgroup skb egress)        - a TLS ClientHello whose SNI is denied is dropped
 *                  (and every later data segment of that socket): no request byte leaves the host.
 *   pol_sockops    (cgroup sock_ops)          - a socket marked by pol_egress gets a 1 ms
 *                  TCP_USER_TIMEOUT at its next send attempt, so the client fails in well under
 *                  a second (ETIMEDOUT) instead of retrying for minutes.
 *
 * Rules: pol_rules[0..nrules) in policy order; each carries the bit of its policy rule. A
 * destination's mask (pol_addr*, pol_names) holds the bits of the rules whose provider/hostname
 * keys it satisfies, POL_ANY_BIT for "some provider" and POL_AMBIG_BIT for an address that names
 * with different masks resolve to (a shared CDN address: left to the SNI check).
 * R0: only user ABI structs (bpf_sock_addr, __sk_buff, bpf_sock_ops), user memory and helpers.
 */

/* The verifier follows one path through every loop pass (at most 8192 jumps): names longer than
 * POL_NAME_MAX and answers past POL_ANSWERS_MAX are left to user space (DnsAnswer events). */
#define POL_NAME_MAX    128  /* a power of two: also used as a mask */
#define POL_ANSWERS_MAX 8
#define POL_ANY_BIT   63
#define POL_AMBIG_BIT 62
#define BST_SOCK_STREAM 1

struct pol_lpm4 {
    u32 prefixlen;
    u32 addr;
};
struct pol_lpm6 {
    u32 prefixlen;
    u8 addr[16];
};
/* Names are matched by longest prefix over the lower-cased name written backwards: the entry
 * for "api.x.com" is "moc.x.ipa\0" (exactly that name), the entry for "*.x.com" is "moc.x."
 * (anything under it). User space folds into each entry the bits of every shorter entry that is
 * a prefix of it, because an LPM lookup returns only the longest. */
struct pol_nkey {
    u32 prefixlen;
    u8 name[POL_NAME_MAX];
};
struct pol_io {
    u64 buf;
    u64 iov;
    u32 fd;
    u32 pad;
};
struct pol_buf {
    u8 d[1024];   /* a DNS message (first 512 bytes) */
    u8 nm[512];   /* a name, dotted, at most POL_NAME_MAX - 1 bytes */
    struct pol_nkey key;
    /* Loop state lives here, read and written through volatile: the verifier does not track map
     * memory, so the paths through a loop body meet again in one state at the loop's head
     * (registers would keep each path's exact values apart and double the paths per pass). */
    u64 mask;
    u32 off;
    u32 n;
    u32 nl;
    u32 an;
    u32 a;        /* the answer being read */
    u32 family;   /* egress: the packet's peer */
    u32 dport;
    u8 daddr[16];
};
#define V32(x) (*(volatile u32 *)&(x))
#define V64(x) (*(volatile u64 *)&(x))
#define BARRIER_VAR(x) asm volatile("" : "+r"(x))
struct pol_addrsa {
    u16 family;
    u16 port;
};

BPF_ARRAY(pol_conf, struct pol_conf, 1);
BPF_ARRAY(pol_rules, struct pol_rule, POL_MAX_RULES);
BPF_LPM_TRIE(pol_addr4, struct pol_lpm4, u64, POL_MAX_ADDRS);
BPF_LPM_TRIE(pol_addr6, struct pol_lpm6, u64, POL_MAX_ADDRS);
BPF_LPM_TRIE(pol_names, struct pol_nkey, u64, POL_MAX_NAMES);
BPF_HASH(pol_denied_sk, u64, u32, 16384);      /* socket cookie -> deciding rule (SNI) */
BPF_HASH(pol_dns_fd, u64, u32, 16384);         /* (tgid<<32|fd) of sockets connected to :53 */
BPF_HASH(pol_io_ctx, u32, struct pol_io, 4096); /* tid -> DNS read in flight */
BPF_PERCPU_ARRAY(pol_scratch, struct pol_buf, 1);
BPF_RINGBUF_OUTPUT(pol_events, 16);
/* Stages run as tail calls, each verified on its own: one program walking a name, hashing it and
 * then the answers exceeds the verifier's 8192-jump path history. The loader fills the slots. */
BPF_PROG_ARRAY(pol_dns_tail, 2);
BPF_PROG_ARRAY(pol_skb_tail, 1);
#define TAIL_DNS_MASK    0
#define TAIL_DNS_ANSWERS 1
#define TAIL_SKB_JUDGE   0

static __always_inline struct pol_conf *pol_cfg(void)
{
    u32 z = 0;
    return pol_conf.lookup(&z);
}

/* The deciding action for a destination mask; *rule gets the policy rule index (or POL_DEFAULT).
 * skb != 0: judged at egress, where comm is not known (such rules count as unverifiable). */
static __always_inline u32 pol_eval(u64 mask, u32 uid, const u64 *comm, struct __sk_buff *skb, u32 *rule)
{
    struct pol_conf *c = pol_cfg();
    if (!c)
        return POL_ALLOW;
    u32 n = c->nrules;
    for (u32 i = 0; i < POL_MAX_RULES; i++) {
        if (i >= n)
            break;
        u32 k = i;
        struct pol_rule *r = pol_rules.lookup(&k);
        if (!r)
            break;
        if (!(mask & (1ULL << (r->bit & 63))))
            continue;
        if ((r->flags & PR_UID) && r->uid != uid)
            continue;
        u32 unsure = r->flags & PR_USER_ONLY;
        if (r->flags & PR_COMM) {
            if (!comm)
                unsure = 1;
            else if (comm[0] != r->comm_lo || comm[1] != r->comm_hi)
                continue;
        }
        if (r->flags & PR_CGROUP) {
            u64 id = skb ? bpf_skb_ancestor_cgroup_id(skb, r->cg_level)
                         : bpf_get_current_ancestor_cgroup_id(r->cg_level);
            if (id != r->cg_id)
                continue;
        }
        /* A rule with keys the kernel cannot check: never deny on it; an allow/audit stops here
         * (over-allowing is the safe side). */
        if (unsure && r->action == POL_DENY)
            continue;
        *rule = r->index;
        return r->action;
    }
    if (mask & (1ULL << POL_ANY_BIT)) {
        *rule = POL_DEFAULT;
        return c->dflt;
    }
    return POL_ALLOW;
}

static __always_inline void pol_emit(u32 point, u32 rule, u32 uid, u32 family, u32 port,
                                     const void *addr, u64 cgid, u64 cookie)
{
    struct pol_rec *r = pol_events.ringbuf_reserve(sizeof(struct pol_rec));
    if (!r)
        return;
    u64 pt = bpf_get_current_pid_tgid();
    r->ts_ns = bpf_ktime_get_ns();
    r->cgroup = cgid;
    r->cookie = cookie;
    r->pid = pt >> 32;
    r->tid = (u32)pt;
    r->uid = uid;
    r->rule = rule;
    r->point = point;
    r->family = family;
    r->dport = port;
    __builtin_memset(r->daddr, 0, 16);
    if (family == 4)
        __builtin_memcpy(r->daddr, addr, 4);
    else
        __builtin_memcpy(r->daddr, addr, 16);
    __builtin_memset(r->comm, 0, 16);
    if (point == POINT_CONNECT)
        bpf_get_current_comm(r->comm, 16);
    pol_events.ringbuf_submit(r, 0);
}

/* Budgets (busted/budgets.py): user space counts spend from LLM calls; when a scope exhausts a
 * deny budget it writes (budget j, scope kind, scope value) -> window end (ktime ns) here, and the
 * connect programs refuse that scope's connections to destinations carrying bit
 * POL_BUDGET_TOP_BIT - j until then. Scope kinds: the caller's uid, its own cgroup, the host. */
struct pol_bkey {
    u32 budget;
    u32 kind;
    u64 value;
};
BPF_HASH(pol_budget, struct pol_bkey, u64, POL_MAX_BUDGET_SCOPES);

/* 1 and *rule = POL_BUDGET_BASE + j when an exhausted budget holds this destination for the
 * caller; no map entry (the common case) costs one mask test per kernel budget. */
static __always_inline int pol_budget_hit(u64 mask, u32 uid, u32 *rule)
{
    u64 now = 0;
    for (u32 j = 0; j < POL_MAX_BUDGETS; j++) {
        if (!(mask & (1ULL << (POL_BUDGET_TOP_BIT - j))))
            continue;
        struct pol_bkey k = {j, BK_UID, uid};
        u64 *until = pol_budget.lookup(&k);
        if (!until) {
            k.kind = BK_CGROUP;
            k.value = bpf_get_current_cgroup_id();
            until = pol_budget.lookup(&k);
        }
        if (!until) {
            k.kind = BK_HOST;
            k.value = 0;
            until = pol_budget.lookup(&k);
        }
        if (!until)
            continue;
        if (!now)
            now = bpf_ktime_get_ns();
        if (now < *until) {
            *rule = POL_BUDGET_BASE + j;
            return 1;
        }
    }
    return 0;
}

static __always_inline int pol_connect_common(struct bpf_sock_addr *ctx, u64 mask, u32 family,
                                              const void *addr)
{
    struct pol_conf *c = pol_cfg();
    if (!c || !mask || (mask & (1ULL << POL_AMBIG_BIT)))
        return 1;
    if ((bpf_get_current_pid_tgid() >> 32) == c->own_tgid)
        return 1;
    u32 uid = (u32)bpf_get_current_uid_gid();
    u64 comm[2] = {};
    bpf_get_current_comm(comm, sizeof(comm));
    u32 rule = 0;
    if (pol_eval(mask, uid, comm, 0, &rule) != POL_DENY && !pol_budget_hit(mask, uid, &rule))
        return 1;
    pol_emit(POINT_CONNECT, rule, uid, family, __builtin_bswap16((u16)ctx->user_port), addr,
             bpf_get_current_cgroup_id(), 0);
    return 0;  /* connect() fails with EPERM */
}

int pol_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != BST_SOCK_STREAM)
        return 1;
    struct pol_lpm4 k = {32, ctx->user_ip4};
    u64 *m = pol_addr4.lookup(&k);
    if (!m)
        return 1;
    u32 a = k.addr;
    return pol_connect_common(ctx, *m, 4, &a);
}

int pol_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != BST_SOCK_STREAM)
        return 1;
    struct pol_lpm6 k = {128};
    u32 w[4];
    w[0] = ctx->user_ip6[0];
    w[1] = ctx->user_ip6[1];
    w[2] = ctx->user_ip6[2];
    w[3] = ctx->user_ip6[3];
    u64 *m;
    if (w[0] == 0 && w[1] == 0 && w[2] == __builtin_bswap32(0xffff)) {  /* ::ffff:a.b.c.d */
        struct pol_lpm4 k4 = {32, w[3]};
        m = pol_addr4.lookup(&k4);
        if (!m)
            return 1;
        return pol_connect_common(ctx, *m, 4, &w[3]);
    }
    __builtin_memcpy(k.addr, w, 16);
    m = pol_addr6.lookup(&k);
    if (!m)
        return 1;
    return pol_connect_common(ctx, *m, 6, w);
}

/* The rule mask of the dotted name in b->nm[0..n), n < POL_NAME_MAX. The loop is branch-free
 * (arithmetic masks instead of ifs), so the verifier walks one path. */
static __always_inline u64 pol_name_mask(struct pol_buf *b, u32 n)
{
    struct pol_nkey *k = &b->key;
    k->prefixlen = POL_NAME_MAX * 8;
    for (u32 i = 0; i < POL_NAME_MAX; i++) {
        u64 valid = ((u64)((s64)i - (s64)n)) >> 63;       /* i < n */
        u64 c = b->nm[(n - 1 - i) & (POL_NAME_MAX - 1)] * valid;
        s64 x = (s64)c - 'A';
        u64 up = (((u64)(x - 26)) >> 63) & ((((u64)x) >> 63) ^ 1);  /* 'A' <= c <= 'Z' */
        k->name[i] = (u8)(c | (up << 5));
    }
    u64 *m = pol_names.lookup(k);
    return m ? *m : 0;
}

static __always_inline void pol_learn4(u32 addr, u64 mask)
{
    struct pol_lpm4 k = {32, addr};
    u64 v = mask;
    u64 *old = pol_addr4.lookup(&k);
    if (old && *old) {
        if ((*old & ~(1ULL << POL_AMBIG_BIT)) == mask)
            return;
        v = *old | mask | (1ULL << POL_AMBIG_BIT);
    }
    pol_addr4.update(&k, &v);
}

static __always_inline void pol_learn6(const u8 *addr, u64 mask)
{
    struct pol_lpm6 k = {128};
    __builtin_memcpy(k.addr, addr, 16);
    u64 v = mask;
    u64 *old = pol_addr6.lookup(&k);
    if (old && *old) {
        if ((*old & ~(1ULL << POL_AMBIG_BIT)) == mask)
            return;
        v = *old | mask | (1ULL << POL_AMBIG_BIT);
    }
    pol_addr6.update(&k, &v);
}

/* A DNS response in b->d[0..n): if its question names a policy host, learn its A/AAAA addresses
 * (whatever the CNAME chain between). */
static __always_inline void pol_dns_parse(void *ctx, struct pol_buf *b, u32 n)
{
    u8 *d = b->d;
    if (n < 17 || !(d[2] & 0x80) || (d[3] & 0x0f) != 0 || d[4] != 0 || d[5] != 1)
        return;
    V32(b->an) = ((u32)d[6] << 8) | d[7];
    V32(b->n) = n;
    /* The question's name: copy the wire bytes after the first length, then turn every later
     * length byte into a dot ("\3api\6openai\3com\0" -> "api.openai.com"). */
    __builtin_memcpy(b->nm, &d[13], POL_NAME_MAX);
    u64 off = 12;  /* u64: a u32 copy's zero-extension would lose the verifier's bounds */
    for (u32 l = 0; l < 64; l++) {
        if (off >= n || off >= 12 + POL_NAME_MAX)
            return;
        u64 at = off & 511;
        BARRIER_VAR(at);  /* keep clang from folding the index into another base */
        u8 c = b->d[at];
        if (c == 0)
            break;
        if (c & 0xc0)
            return;
        if (off > 12) {
            u64 dot = (off - 13) & (POL_NAME_MAX - 1);
            BARRIER_VAR(dot);
            b->nm[dot] = '.';
        }
        off += c + 1;
    }
    u32 nl = (u32)off - 13;
    if (off <= 13 || nl >= POL_NAME_MAX)
        return;
    V32(b->nl) = nl;
    V32(b->a) = 0;
    V32(b->off) = off + 1 + 4;  /* the root label, qtype, qclass */
    pol_dns_tail.call(ctx, TAIL_DNS_MASK);
}

/* Stage 2: the question's name -> rule mask. */
int pol_dns_mask(struct sys_exit_args *a)
{
    u32 z = 0;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 0;
    u32 nl = V32(b->nl);
    if (nl == 0 || nl >= POL_NAME_MAX)
        return 0;
    u64 mask = pol_name_mask(b, nl);
    V64(b->mask) = mask;
    if (mask)
        pol_dns_tail.call(a, TAIL_DNS_ANSWERS);
    return 0;
}

/* Stage 3: learn the A/AAAA address of answer b->a, then go on with the next. */
int pol_dns_answers(struct sys_exit_args *args)
{
    u32 z = 0;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 0;
    u8 *d = b->d;
    u32 n = V32(b->n), a = V32(b->a);
    u64 mask = V64(b->mask);
    if (n > 512 || !mask || a >= V32(b->an) || a >= POL_ANSWERS_MAX)
        return 0;
    u32 off = V32(b->off);
    for (u32 j = 0; j < 8; j++) {  /* the owner name: labels, then 0 or a pointer */
        if (off >= n)
            return 0;
        u8 c = d[off & 511];
        if (c == 0) {
            off += 1;
            break;
        }
        if ((c & 0xc0) == 0xc0) {
            off += 2;
            break;
        }
        off += c + 1;
    }
    if (off + 10 > n)
        return 0;
    u32 o = off & 511;
    u32 type = ((u32)d[o] << 8) | d[o + 1];
    u32 rdl = ((u32)d[o + 8] << 8) | d[o + 9];
    off += 10;
    if (off + rdl > n)
        return 0;
    o = off & 511;
    if (type == 1 && rdl == 4) {
        u32 a4;
        __builtin_memcpy(&a4, &d[o], 4);
        pol_learn4(a4, mask);
    } else if (type == 28 && rdl == 16) {
        u8 a6[16];
        __builtin_memcpy(a6, &d[o], 16);
        pol_learn6(a6, mask);
    }
    V32(b->off) = off + rdl;
    V32(b->a) = a + 1;
    pol_dns_tail.call(args, TAIL_DNS_ANSWERS);  /* the next answer (one program per answer) */
    return 0;
}

static __always_inline u64 pol_fdkey(u64 fd)
{
    return (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (u32)fd;
}

int pol_dns_conn(struct sys_enter_args *a)
{
    struct pol_addrsa sa = {};
    u64 key = pol_fdkey(a->arg[0]);
    if (!a->arg[1] || bpf_probe_read_user(&sa, sizeof(sa), (void *)a->arg[1]) != 0)
        return 0;
    if ((sa.family == 2 || sa.family == 10) && __builtin_bswap16(sa.port) == 53) {
        u32 one = 1;
        pol_dns_fd.update(&key, &one);
    } else {
        pol_dns_fd.delete(&key);
    }
    return 0;
}

int pol_dns_close(struct sys_enter_args *a)
{
    u64 key = pol_fdkey(a->arg[0]);
    pol_dns_fd.delete(&key);
    return 0;
}

static __always_inline void pol_read_in(u64 fd, u64 buf, u64 iov)
{
    u64 key = pol_fdkey(fd);
    if (!pol_dns_fd.lookup(&key))
        return;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pol_io io = {};
    io.buf = buf;
    io.iov = iov;
    io.fd = (u32)fd;
    pol_io_ctx.update(&tid, &io);
}

int pol_dns_read_in(struct sys_enter_args *a) { pol_read_in(a->arg[0], a->arg[1], 0); return 0; }
int pol_dns_recvfrom_in(struct sys_enter_args *a) { pol_read_in(a->arg[0], a->arg[1], 0); return 0; }
int pol_dns_recvmsg_in(struct sys_enter_args *a)
{
    u64 m[3] = {};  /* struct msghdr: name, namelen(+pad), iov */
    if (!a->arg[1] || bpf_probe_read_user(m, sizeof(m), (void *)a->arg[1]) != 0)
        return 0;
    pol_read_in(a->arg[0], 0, m[2]);
    return 0;
}

int pol_dns_out(struct sys_exit_args *a)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pol_io *p = pol_io_ctx.lookup(&tid);
    if (!p)
        return 0;
    struct pol_io io = *p;
    pol_io_ctx.delete(&tid);
    if (a->ret <= 0)
        return 0;
    u64 buf = io.buf;
    if (!buf && io.iov) {
        u64 v[2] = {};
        if (bpf_probe_read_user(v, sizeof(v), (void *)io.iov) != 0)
            return 0;
        buf = v[0];
    }
    if (!buf)
        return 0;
    u32 z = 0;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 0;
    u32 n = a->ret > 512 ? 512 : (u32)a->ret;
    n &= 1023;
    if (n == 0 || n > 512)
        return 0;
    if (bpf_probe_read_user(b->d, n, (void *)buf) != 0)
        return 0;
    pol_dns_parse(a, b, n);
    return 0;
}

/* Egress: find the SNI of a ClientHello starting this segment's payload. */
int pol_egress(struct __sk_buff *skb)
{
    u8 ip[40];
    u32 ihl, proto, family;
    if (bpf_skb_load_bytes(skb, 0, ip, 20) != 0)
        return 1;
    if ((ip[0] >> 4) == 4) {
        ihl = (ip[0] & 0x0f) * 4;
        proto = ip[9];
        family = 4;
    } else if ((ip[0] >> 4) == 6) {
        if (bpf_skb_load_bytes(skb, 0, ip, 40) != 0)
            return 1;
        ihl = 40;
        proto = ip[6];
        family = 6;
    } else {
        return 1;
    }
    if (proto != 6 || ihl < 20 || ihl > 60)
        return 1;
    u8 th[16];
    if (bpf_skb_load_bytes(skb, ihl, th, 16) != 0)
        return 1;
    u32 p = ihl + (th[12] >> 4) * 4;
    if (skb->len <= p)
        return 1;  /* no payload (ACK, SYN, FIN): nothing of a request */
    /* Every data segment of a socket whose hello was denied (its retransmissions, TLS 1.3 early
     * data) is dropped too. */
    u64 ck = bpf_get_socket_cookie(skb);
    if (pol_denied_sk.lookup(&ck))
        return 0;
    u8 h[11];
    /* TLS record header (5), handshake header (4), client_version (2) */
    if (bpf_skb_load_bytes(skb, p, h, 11) != 0)
        return 1;
    if (h[0] != 0x16 || h[1] != 3 || h[5] != 1)
        return 1;  /* not a ClientHello: the common case, decided without a map lookup */
    u32 q = p + 11 + 32;  /* random */
    u8 l[2];
    if (bpf_skb_load_bytes(skb, q, l, 1) != 0)
        return 1;
    q += 1 + l[0];  /* session id */
    if (bpf_skb_load_bytes(skb, q, l, 2) != 0)
        return 1;
    q += 2 + (((u32)l[0] << 8) | l[1]);  /* cipher suites */
    if (bpf_skb_load_bytes(skb, q, l, 1) != 0)
        return 1;
    q += 1 + l[0] + 2;  /* compression methods, extensions length */
    u32 z = 0;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    for (u32 i = 0; i < 32; i++) {
        u8 e[4];
        if (bpf_skb_load_bytes(skb, q & 0xffff, e, 4) != 0)
            return 1;
        u32 elen = ((u32)e[2] << 8) | e[3];
        if (e[0] == 0 && e[1] == 0) {  /* server_name: list len (2), type (1), name len (2) */
            u8 s[5];
            if (bpf_skb_load_bytes(skb, (q + 4) & 0xffff, s, 5) != 0 || s[2] != 0)
                return 1;
            u32 nl = ((u32)s[3] << 8) | s[4];
            if (nl == 0 || nl >= POL_NAME_MAX)
                return 1;
            u64 len = ((nl - 1) & (POL_NAME_MAX - 1)) + 1;  /* 1..POL_NAME_MAX, = nl */
            if (bpf_skb_load_bytes(skb, (q + 9) & 0xffff, b->nm, len) != 0)
                return 1;
            V32(b->nl) = nl;
            V32(b->family) = family;
            V32(b->dport) = ((u32)th[2] << 8) | th[3];
            __builtin_memcpy(b->daddr, family == 4 ? &ip[16] : &ip[24], 16);
            pol_skb_tail.call(skb, TAIL_SKB_JUDGE);
            return 1;  /* the judge could not run: allow, never block by accident */
        }
        q += 4 + elen;
    }
    return 1;
}

/* Egress stage 2: judge the SNI found by pol_egress. */
int pol_egress_judge(struct __sk_buff *skb)
{
    u32 z = 0;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    u32 nl = V32(b->nl);
    if (nl == 0 || nl >= POL_NAME_MAX)
        return 1;
    u64 mask = pol_name_mask(b, nl);
    if (!mask)
        return 1;
    struct pol_conf *c = pol_cfg();
    if (c && (bpf_get_current_pid_tgid() >> 32) == c->own_tgid)
        return 1;
    u32 uid = bpf_get_socket_uid(skb);
    u32 rule = 0;
    if (pol_eval(mask, uid, 0, skb, &rule) != POL_DENY)
        return 1;
    u64 ck = bpf_get_socket_cookie(skb);
    pol_denied_sk.update(&ck, &rule);
    u8 addr[16];
    __builtin_memcpy(addr, b->daddr, 16);
    pol_emit(POINT_TLS, rule, uid, V32(b->family), V32(b->dport), addr, bpf_skb_cgroup_id(skb), ck);
    return 0;
}

/* sock_ops: make a socket whose hello pol_egress dropped fail fast. A dropped segment is never
 * "in flight", so TCP retries it from its probe timer, not the retransmission timer; the header
 * option callback runs at each try, and there the socket gets TCP_USER_TIMEOUT = 1 ms, so the next
 * timer aborts it (ETIMEDOUT). The callback is asked for at connect and given up after the first
 * few data segments (the hello is past by then), so established flows pay nothing. */
int pol_sockops(struct bpf_sock_ops *ops)
{
    u32 op = ops->op;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
        return 1;
    }
    if (op == BPF_SOCK_OPS_HDR_OPT_LEN_CB) {
        u64 ck = bpf_get_socket_cookie(ops);
        if (pol_denied_sk.lookup(&ck)) {
            int ms = 1;
            bpf_setsockopt(ops, 6 /* SOL_TCP */, 18 /* TCP_USER_TIMEOUT */, &ms, sizeof(ms));
            bpf_sock_ops_cb_flags_set(ops, 0);
        } else if (ops->data_segs_out > 8) {
            bpf_sock_ops_cb_flags_set(ops, 0);
        }
    }
    return 1;
}
