/* Capability "model in the kernel" (issue 22): a request whose JSON body names a denied model is
 * stopped before its bytes leave the host. Compiled with --enforce, attached once the policy has
 * deny rules the kernel can check on `model` (busted/policy/model_enforce.py); compiled into the same object as
 * policy_enforce.c (its source follows that file's), so it shares pol_gen, pol_events and
 * pol_denied_sk.
 *
 *   mdl_ssl_write*, mdl_gnutls_send (uprobes at the TLS library's write entry) - the plaintext is
 *       the caller's buffer here, before the library encrypts it: the first MDL_SCAN bytes are
 *       scanned for the JSON key "model" with a string value, and the value looked up in
 *       mdl_names (stages mdl_scan, mdl_judge; mdl_path first for an HTTP/1.x POST, whose URL
 *       path may name the model, as Gemini's does). A denied model marks the calling thread
 *       (mdl_thread, an LRU: more than 4096 threads marked at once forget the oldest mark).
 *   mdl_egress (cgroup skb egress) - a data segment sent in a marked thread's context is that
 *       write's first segment: the thread's mark moves to the socket (pol_denied_sk, so this and
 *       every later segment of the socket are dropped, and pol_sockops makes the connection
 *       abort), and the decision is reported with the destination.
 *   mdl_send_done (sock:sock_send_length) - a send of a marked thread finished without a segment
 *       of it leaving in that thread's context (TCP queued it: it leaves later from softirq, where
 *       the thread is unknown): the mark is dropped and the miss reported, never silent.
 *
 * Why not stop it in the uprobe: a uprobe program cannot change the caller's registers on this
 * kernel (ctx writes are refused by the verifier), so the write itself cannot be failed; the
 * bytes are stopped on their way out instead. Why not bpf_send_signal: killing the client is
 * harsher than failing its connection.
 * R0: only user memory (the write's buffer), tracepoint args, __sk_buff and helpers.
 */

#include <uapi/linux/ptrace.h>

#define MDL_SCAN      4096   /* bytes of each write scanned for "model" (a power of two) */
#define MDL_NAME_MAX  64     /* a model name's bytes compared (longer: only prefix entries match) */
#define MDL_F_UID     1      /* the rule also has `uid` */
#define POINT_MODEL   3
#define MDL_MARK_NS   1000000000ULL  /* a mark not used by a send within 1 s is dropped */
/* mdl_counts slots (busted/policy/model_enforce.py MDL_COUNTS) */
#define MDL_C_MARKED    0    /* writes whose model was denied */
#define MDL_C_DROPPED   1    /* sockets stopped */
#define MDL_C_MISSED    2    /* marks whose bytes left outside the thread (not stopped) */
#define MDL_C_RING      3    /* decision records lost: ring full */
#define MDL_C_MAP       4    /* a mark or socket not recorded: map refused */
#define MDL_C_BEYOND    5    /* writes longer than MDL_SCAN with no "model" key in the window */

struct mdl_key {
    u32 prefixlen;
    u32 gen;
    u8 name[MDL_NAME_MAX + 4];   /* the value, NUL-terminated when it fits (exact entries) */
};
struct mdl_val {
    u32 rule;   /* policy rule index */
    u32 flags;  /* MDL_F_* */
    u32 uid;
    u32 pad;
};
struct mdl_mark {
    u64 ts_ns;
    u32 rule;
    u32 nl;
    u8 name[MDL_NAME_MAX];
};
struct mdl_scratch {
    u8 d[2 * MDL_SCAN];          /* the second half: slack for masked offsets */
    struct mdl_key key;
    /* Stage state, written and read through volatile (busted/ebpf/policy_enforce.c says why). */
    u32 at;          /* just past the key found (0: none yet) */
    u32 pos;         /* where the scan goes on */
    u32 n;           /* bytes read */
    u32 gen;         /* the policy generation read at the write */
    u32 long_write;  /* the write is longer than MDL_SCAN */
    u32 marked;      /* the path stage marked the thread */
};

/* Exact names ("gpt-4o" -> "gpt-4o\0") and prefixes ("gpt-4o*" -> "gpt-4o"), per generation. */
BPF_LPM_TRIE(mdl_names, struct mdl_key, struct mdl_val, 2 * 1024);
BPF_TABLE("lru_hash", u64, struct mdl_mark, mdl_thread, 4096);   /* pid_tgid -> its denied write */
BPF_PERCPU_ARRAY(mdl_scratch_buf, struct mdl_scratch, 1);
BPF_PERCPU_ARRAY(mdl_counts, u64, 6);

static __always_inline void mdl_count(u32 i)
{
    u64 *v = mdl_counts.lookup(&i);
    if (v)
        *v += 1;
}

/* Branch-free byte tests (1 or 0): the verifier then walks one path through the scan instead of
 * one per outcome. The barrier keeps the compiler from turning them back into compares and jumps.
 * JSON whitespace is ' ', '\t', '\n', '\r' (bits 32, 9, 10, 13). */
static __always_inline u64 mdl_is(u64 c, u64 want)
{
    u64 x = c ^ want;
    BARRIER_VAR(x);
    return (x - 1) >> 63;
}

static __always_inline u64 mdl_ws(u64 c)
{
    BARRIER_VAR(c);
    return ((0x100002600ULL >> (c & 63)) & 1) & (((c >> 6) - 1) >> 63);
}

/* 1 if the 8 bytes at p (any alignment: map memory, read unaligned as x86-64 allows) equal
 * those of `want` where `keep` has ones, else 0. One load per position instead of a load and a
 * test per byte: the scans below take about half the verifier's work they did. Little-endian:
 * byte k at p is bits 8k..8k+7. */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mdl_at compares little-endian words"
#endif
static __always_inline u64 mdl_at(const u8 *p, u64 want, u64 keep)
{
    u64 x = (*(const u64 *)p ^ want) & keep;
    BARRIER_VAR(x);
    x |= -x;  /* top bit set iff x != 0 */
    BARRIER_VAR(x);
    return (x >> 63) ^ 1;
}
#define MDL_B(c, k) ((u64)(u8)(c) << (8 * (k)))
#define MDL_KEY_MODEL (MDL_B('"', 0) | MDL_B('m', 1) | MDL_B('o', 2) | MDL_B('d', 3) | MDL_B('e', 4) | \
                       MDL_B('l', 5) | MDL_B('"', 6))                  /* "model" (7 bytes) */
#define MDL_KEY_PATH  (MDL_B('/', 0) | MDL_B('m', 1) | MDL_B('o', 2) | MDL_B('d', 3) | MDL_B('e', 4) | \
                       MDL_B('l', 5) | MDL_B('s', 6) | MDL_B('/', 7))  /* /models/ (8 bytes) */

#define MDL_M     (2 * MDL_SCAN - 1)
#define MDL_CHUNK 1024   /* bytes scanned per stage: what one verification of the loop allows */
#define MDL_PATH  256    /* request-line bytes looked at for a model in the URL path */
#define MDL_TAIL_SCAN  0
#define MDL_TAIL_JUDGE 1
#define MDL_TAIL_PATH  2
/* Stages run as tail calls, each verified on its own (the loader fills the slots). */
BPF_PROG_ARRAY(mdl_tail, 3);

/* The write's first MDL_SCAN bytes into the scratch buffer, then the scan stage. */
static __always_inline void mdl_on_write(struct pt_regs *ctx, u64 buf, u64 len)
{
    if (!buf || len < 12)
        return;
    u32 *gp = pol_gen_ptr();
    if (!gp)
        return;
    struct pol_conf *c = pol_cfg(*gp & 1);
    if (!c || (bpf_get_current_pid_tgid() >> 32) == c->own_tgid)
        return;
    u32 z = 0;
    struct mdl_scratch *s = mdl_scratch_buf.lookup(&z);
    if (!s)
        return;
    u32 n = len > MDL_SCAN ? MDL_SCAN : (u32)len;
    if (n < 12 || n > MDL_SCAN || bpf_probe_read_user(s->d, n & MDL_M, (void *)buf) != 0)
        return;
    V32(s->n) = n;
    V32(s->pos) = 0;
    V32(s->gen) = *gp & 1;
    V32(s->long_write) = len > MDL_SCAN;
    V32(s->marked) = 0;
    if (s->d[0] == 'P' && s->d[1] == 'O' && s->d[2] == 'S' && s->d[3] == 'T' && s->d[4] == ' ')
        mdl_tail.call(ctx, MDL_TAIL_PATH);
    mdl_tail.call(ctx, MDL_TAIL_SCAN);
}

/* Stage 1: the first "model" (with its quotes) at or after s->pos, within MDL_CHUNK bytes; not
 * there and bytes left: the next chunk (this stage again). An escaped quote inside a JSON string
 * is \" so a closing quote here is a real one: this is a key. */
int mdl_scan(struct pt_regs *ctx)
{
    u32 z = 0;
    struct mdl_scratch *s = mdl_scratch_buf.lookup(&z);
    if (!s)
        return 0;
    u32 pos = V32(s->pos), n = V32(s->n);
    if (pos >= MDL_SCAN || n > MDL_SCAN)
        return 0;
    V32(s->at) = 0;
    for (u32 i = 0; i < MDL_CHUNK; i++) {
        u32 j = pos + i;
        if (j + 8 > n)
            break;
        u64 m = mdl_at(&s->d[j & (MDL_SCAN - 1)], MDL_KEY_MODEL, 0x00ffffffffffffffULL);
        u64 at = V32(s->at);  /* through map memory: every path meets the next pass in one state */
        at |= m * (u64)(j + 7) * ((at - 1) >> 63);
        V32(s->at) = (u32)at;
    }
    if (V32(s->at)) {
        mdl_tail.call(ctx, MDL_TAIL_JUDGE);
        return 0;
    }
    if (pos + MDL_CHUNK + 8 <= n) {
        V32(s->pos) = pos + MDL_CHUNK;
        mdl_tail.call(ctx, MDL_TAIL_SCAN);
        return 0;
    }
    if (V32(s->long_write))
        mdl_count(MDL_C_BEYOND);
    return 0;
}

/* The value at s->d[at..]: the bytes before its end (JSON: the closing quote, an escape makes it
 * unreadable; a URL path: ':', '?', '/', ' ', and '%' makes it unreadable), compared up to
 * MDL_NAME_MAX, a value running past what was read unreadable too (user space still judges the
 * call); looked up in mdl_names; a denied model marks the thread. Branch-free, one path. */
static __always_inline void mdl_decide(struct mdl_scratch *s, u64 at, u32 n, u32 path)
{
    struct mdl_key *k = &s->key;
    u64 done = 0, bad = 0, nl = 0;
    u64 json = path ^ 1;
    for (u32 j = 0; j < MDL_NAME_MAX + 1; j++) {
        u64 p = at + j;
        u64 ch = s->d[p & MDL_M];
        u64 past = ((u64)((s64)n - 1 - (s64)p)) >> 63;  /* p >= n */
        u64 live = done ^ 1;
        bad |= live & (past | (json & mdl_is(ch, '\\')) | (path & mdl_is(ch, '%')));
        done |= (json & mdl_is(ch, '"')) | past |
                (path & (mdl_is(ch, ':') | mdl_is(ch, '?') | mdl_is(ch, '/') | mdl_is(ch, ' ')));
        live = done ^ 1;
        nl += live;
        if (j < MDL_NAME_MAX)
            k->name[j] = (u8)(ch * live);
    }
    if (bad || nl == 0)
        return;
    u64 cmp = nl > MDL_NAME_MAX ? MDL_NAME_MAX : nl;  /* longer: its first MDL_NAME_MAX bytes, no NUL */
    if (cmp <= MDL_NAME_MAX)
        k->name[cmp] = 0;  /* exact entries end in NUL */
    k->gen = V32(s->gen) & 1;
    k->prefixlen = 32 + 8 * (u32)(cmp + (nl <= MDL_NAME_MAX ? 1 : 0));
    struct mdl_val *v = mdl_names.lookup(k);
    if (!v)
        return;
    if ((v->flags & MDL_F_UID) && v->uid != (u32)bpf_get_current_uid_gid())
        return;
    struct mdl_mark m = {};
    m.ts_ns = bpf_ktime_get_ns();
    m.rule = v->rule;
    m.nl = (u32)cmp;
    __builtin_memcpy(m.name, k->name, MDL_NAME_MAX);
    mdl_count(MDL_C_MARKED);
    u64 pt = bpf_get_current_pid_tgid();
    if (mdl_thread.update(&pt, &m) != 0)
        mdl_count(MDL_C_MAP);
    V32(s->marked) = 1;
}

/* Stage 0, for a write that starts an HTTP/1.x POST: a model named in the URL path, as Gemini
 * (".../models/gemini-1.5-pro:generateContent") names it, within the request line's first
 * MDL_PATH bytes. Then the JSON scan of the same write, unless this marked it already. */
int mdl_path(struct pt_regs *ctx)
{
    u32 z = 0;
    struct mdl_scratch *s = mdl_scratch_buf.lookup(&z);
    if (!s)
        return 0;
    u32 n = V32(s->n);
    if (n > MDL_SCAN)
        return 0;
    V32(s->at) = 0;
    for (u32 i = 5; i < MDL_PATH; i++) {
        if (i + 9 > n)
            break;
        u64 m = mdl_at(&s->d[i & (MDL_SCAN - 1)], MDL_KEY_PATH, ~0ULL);
        u64 at = V32(s->at);
        at |= m * (u64)(i + 8) * ((at - 1) >> 63);
        V32(s->at) = (u32)at;
    }
    u32 at = V32(s->at);
    if (at && at < MDL_SCAN)
        mdl_decide(s, at, n, 1);
    if (V32(s->marked))
        return 0;
    mdl_tail.call(ctx, MDL_TAIL_SCAN);
    return 0;
}

/* Stage 2: after the key, ':' and '"' (up to 3 whitespace bytes before each); a key whose value
 * is not a string (a schema's "model": {...}) sends the scan on from there. Then the value: the
 * bytes before the closing quote, compared up to MDL_NAME_MAX (an escape or a value running
 * past what was read: not judged here, user space still judges the call), looked up in
 * mdl_names; a denied model marks the thread. A nested key with a string value before the
 * top-level one ("metadata": {"model": "x"}) decides: the first string-valued "model" counts. */
int mdl_judge(struct pt_regs *ctx)
{
    u32 z = 0;
    struct mdl_scratch *s = mdl_scratch_buf.lookup(&z);
    if (!s)
        return 0;
    u64 q = V32(s->at);
    u32 n = V32(s->n);
    if (q >= MDL_SCAN || n > MDL_SCAN)
        return 0;
    q += mdl_ws(s->d[q & MDL_M]);
    q += mdl_ws(s->d[q & MDL_M]);
    q += mdl_ws(s->d[q & MDL_M]);
    u64 ok = mdl_is(s->d[q & MDL_M], ':');
    q += 1;
    q += mdl_ws(s->d[q & MDL_M]);
    q += mdl_ws(s->d[q & MDL_M]);
    q += mdl_ws(s->d[q & MDL_M]);
    ok &= mdl_is(s->d[q & MDL_M], '"');
    if (!ok) {
        V32(s->pos) = V32(s->at);  /* not a string value: look further */
        mdl_tail.call(ctx, MDL_TAIL_SCAN);
        return 0;
    }
    mdl_decide(s, q + 1, n, 0);
    return 0;
}

/* Hooks: the TLS library's write entry, where the caller's plaintext is whole and not yet
 * encrypted (the same files and symbols the plaintext capture probes, busted/ebpf/tlslibs.py).
 * SSL_write(ssl, buf, int num), SSL_write_ex(ssl, buf, size_t num, &written),
 * gnutls_record_send(session, buf, size_t size). */
int mdl_ssl_write(struct pt_regs *ctx)
{
    int num = (int)PT_REGS_PARM3(ctx);
    if (num > 0)
        mdl_on_write(ctx, PT_REGS_PARM2(ctx), (u64)num);
    return 0;
}

int mdl_ssl_write_ex(struct pt_regs *ctx)
{
    mdl_on_write(ctx, PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
    return 0;
}

int mdl_gnutls_send(struct pt_regs *ctx)
{
    mdl_on_write(ctx, PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
    return 0;
}

static __always_inline void mdl_emit(struct __sk_buff *skb, struct mdl_mark *m, u32 verdict, u32 family,
                                     u32 dport, const u8 *daddr, u64 ck)
{
    struct pol_tls_rec *r = pol_events.ringbuf_reserve(sizeof(struct pol_tls_rec));
    if (!r) {
        mdl_count(MDL_C_RING);
        return;
    }
    u64 pt = bpf_get_current_pid_tgid();
    r->r.ts_ns = bpf_ktime_get_ns();
    r->r.cgroup = skb ? bpf_skb_cgroup_id(skb) : bpf_get_current_cgroup_id();
    r->r.cookie = ck;
    r->r.pid = pt >> 32;
    r->r.tid = (u32)pt;
    r->r.uid = skb ? bpf_get_socket_uid(skb) : (u32)bpf_get_current_uid_gid();
    r->r.rule = m->rule;
    r->r.point = POINT_MODEL;
    r->r.family = family;
    r->r.dport = dport;
    __builtin_memset(r->r.daddr, 0, 16);
    if (daddr)
        __builtin_memcpy(r->r.daddr, daddr, 16);
    bpf_get_current_comm(r->r.comm, 16);
    r->x.reason = verdict ? 0 : 1;
    r->x.verdict = verdict;
    r->x.nl = m->nl > MDL_NAME_MAX ? MDL_NAME_MAX : m->nl;
    r->x.pad = 0;
    __builtin_memset(r->x.name, 0, 256);
    __builtin_memcpy(r->x.name, m->name, MDL_NAME_MAX);
    pol_events.ringbuf_submit(r, 0);
}

/* Egress: the cgroup skb hook sees each segment before it leaves and can drop it; in the
 * sending thread's context for a segment TCP transmits at once (the usual case for a request on
 * an idle connection). A marked thread's first data segment names the socket. */
int mdl_egress(struct __sk_buff *skb)
{
    u64 pt = bpf_get_current_pid_tgid();
    struct mdl_mark *m = mdl_thread.lookup(&pt);
    if (!m)
        return 1;  /* the common case: one lookup */
    if (bpf_ktime_get_ns() - m->ts_ns > MDL_MARK_NS) {
        /* a write that never left in this thread (failed, or a memory BIO whose send never came):
         * the mark must not stop an unrelated later send */
        struct mdl_mark old = *m;
        mdl_thread.delete(&pt);
        mdl_count(MDL_C_MISSED);
        mdl_emit(0, &old, POL_V_PASS, 0, 0, 0, 0);
        return 1;
    }
    /* A segment of another user's or cgroup's socket transmitted from softirq while this thread
     * happened to run is not this write's. */
    if (bpf_get_socket_uid(skb) != (u32)bpf_get_current_uid_gid() ||
        bpf_skb_cgroup_id(skb) != bpf_get_current_cgroup_id())
        return 1;
    POL_TCP_HEADERS(skb, ip, th, family, ihl)  /* policy_enforce.c, which precedes this file */
    if (skb->len <= ihl + (th[12] >> 4) * 4)
        return 1;  /* no payload (an ACK): not the write */
    u64 ck = bpf_get_socket_cookie(skb);
    struct mdl_mark mk = *m;
    mdl_thread.delete(&pt);
    u32 rule = mk.rule;
    if (pol_denied_sk.update(&ck, &rule) != 0)
        mdl_count(MDL_C_MAP);  /* this segment is dropped; the socket's next ones are not */
    else
        mdl_count(MDL_C_DROPPED);
    u8 da[16];
    __builtin_memset(da, 0, 16);
    if (family == 4)
        __builtin_memcpy(da, &ip[12 + 4], 4);
    else
        __builtin_memcpy(da, &ip[24], 16);
    mdl_emit(skb, &mk, POL_V_DROP, family, ((u32)th[2] << 8) | th[3], da, ck);
    return 0;
}

/* sock:sock_send_length fires when a send returns, in the sender's context: a marked thread
 * whose send finished with no segment seen in its context had its bytes queued (they leave
 * later, from softirq): reported as not stopped. */
struct mdl_send_args {  /* sock:sock_send_length, from its format file */
    u64 common;
    u64 sk;
    u16 family;
    u16 protocol;
    s32 ret;
    s32 flags;
};

int mdl_send_done(struct mdl_send_args *args)
{
    u64 pt = bpf_get_current_pid_tgid();
    struct mdl_mark *m = mdl_thread.lookup(&pt);
    if (!m || args->ret <= 0)
        return 0;
    struct mdl_mark mk = *m;
    mdl_thread.delete(&pt);
    mdl_count(MDL_C_MISSED);
    mdl_emit(0, &mk, POL_V_PASS, 0, 0, 0, 0);
    return 0;
}
