/* Capability "plaintext": what a process hands its TLS library (or a plain-HTTP socket), joined to
 * the flow it travels on, so user space can read LLM API calls out of it.
 *
 * Hooks (uprobes, attached per library *file*, so every process mapping that file is covered,
 * including processes started later):
 *   OpenSSL and forks:  SSL_write, SSL_write_ex, SSL_read, SSL_read_ex
 *   GnuTLS:             gnutls_record_send, gnutls_record_recv
 * The byte count is known at return (SSL_*_ex write it through an out-parameter), so each call
 * has an entry probe that remembers its arguments per thread and a return probe that copies the
 * plaintext. Writes are copied at return too: the buffer is still the caller's.
 *
 * The join (R0: no SSL or socket struct is read): at a library call's entry we note the thread's
 * SSL* (or session) pointer; the socket send/receive the library makes inside that call fires the
 * bytes tier's hook in the same thread with the socket pointer (sock:sock_{send,recv}_length, or
 * the syscall tier's fd->socket link), and plaintext_on_sock_io() records (tgid, SSL ptr) -> socket.
 * Stacks that use memory BIOs (node) do the socket I/O outside the library call: a write whose
 * call made no socket I/O is bound to the next send on that thread, and a read with no binding yet
 * to the socket that thread received from last. Each binding is reported once (REC_BIND), so
 * chunks seen before it can be joined in user space.
 *
 * Plain HTTP: a TCP connection whose first write starts with an HTTP method (capture.c decides)
 * has its writes (at entry) and reads (at exit) copied the same way, with ssl = 0.
 *
 * Cheap by verdict: user space writes a socket into pt_skip once it has judged the flow neither an
 * LLM API nor MCP; its plaintext then stops here. The entry names the flow by its open time too:
 * a verdict that arrives after its socket died must not silence the next socket that reuses the
 * address (user space decides ~20 ms after the fact; loopback sockets are reused within that).
 */

/* Uprobe programs read the probed function's arguments from the user registers: struct pt_regs is
 * the architecture's uapi register layout (user ABI, R0 holds). */
#include <uapi/linux/ptrace.h>

#define HAVE_PLAINTEXT 1
#define PT_CHUNK   PT_CHUNK_BYTES   /* bytes per record (power of two), set by the loader */
#define PT_PIECES  4                /* records per call at most: PT_PIECES * PT_CHUNK bytes */

#define PT_OPENSSL 1
#define PT_GNUTLS  2
#define PT_SOCKET  3
#define PT_PACKET  4   /* plain HTTP from packets (capture_cgroup.c): timed at arrival */

#define PT_WRITE 0
#define PT_READ  1

struct pt_rec {
    struct pt_hdr h;
    u8 data[PT_CHUNK];
};

struct pt_call {
    u64 ssl;
    u64 buf;
    u64 outlen;       /* SSL_*_ex: where the library writes the byte count */
    u32 lib;
    u32 pad;
};

struct pt_key {
    u64 ssl;
    u32 tgid;
    u32 pad;
};

BPF_HASH(pt_wcall, u64, struct pt_call, 8192);          /* pid_tgid -> write call in flight */
BPF_HASH(pt_rcall, u64, struct pt_call, 8192);          /* pid_tgid -> read call in flight */
BPF_HASH(pt_cur, u32, u64, 8192);                       /* tid -> SSL* of the call in flight */
BPF_HASH(pt_bind, struct pt_key, u64, 65536);           /* (tgid, SSL ptr) -> socket */
BPF_HASH(pt_wpending, u32, u64, 8192);                  /* tid -> SSL* whose write made no socket I/O */
BPF_HASH(pt_lastrecv, u32, u64, 8192);                  /* tid -> socket it received from last */
BPF_HASH(pt_skip, u64, u64, 65536);                     /* socket -> open_ns of the judged flow */
/* Processes that called a probed TLS function: only their socket I/O is looked at for the join,
 * so the per-send/receive cost for every other process is one lookup. */
BPF_TABLE("lru_hash", u32, u8, pt_tgids, 16384);
BPF_PERCPU_ARRAY(pt_scratch, struct pt_rec, 1);

static __always_inline void pt_emit_bind(u64 ssl, u64 sk)
{
    struct pt_hdr *r = events.ringbuf_reserve(sizeof(struct pt_hdr));
    if (!r) {
        count_loss(LOSS_RING);
        return;
    }
    u64 pt = bpf_get_current_pid_tgid();
    __builtin_memset(r, 0, sizeof(*r));
    r->type = REC_BIND;
    r->ts_ns = bpf_ktime_get_ns();
    r->sk = sk;
    r->ssl = ssl;
    r->pid = pt >> 32;
    r->tid = (u32)pt;
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

static __always_inline void pt_bind_to(u64 ssl, u64 sk)
{
    struct pt_key k = {};
    k.ssl = ssl;
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    u64 *cur = pt_bind.lookup(&k);
    if (cur && *cur == sk)
        return;
    if (pt_bind.update(&k, &sk) != 0)
        count_loss(LOSS_MAP);
    pt_emit_bind(ssl, sk);
}

/* Called by the bytes tier for every socket send/receive in process context (see the header). */
static __always_inline void plaintext_on_sock_io(u64 sk, int is_send)
{
    u64 pt = bpf_get_current_pid_tgid();
    u32 tgid = pt >> 32;
    if (!pt_tgids.lookup(&tgid))
        return;
    u32 tid = (u32)pt;
    u64 *ssl = pt_cur.lookup(&tid);
    if (ssl) {
        pt_bind_to(*ssl, sk);
    } else if (is_send) {
        u64 *pending = pt_wpending.lookup(&tid);
        if (pending) {
            pt_bind_to(*pending, sk);
            pt_wpending.delete(&tid);
#ifdef HAVE_ARRIVAL
            rx_on_write(sk);  /* the request copied before its socket was known goes out now */
#endif
        }
    }
    if (!is_send)
        pt_lastrecv.update(&tid, &sk);
}

/* The socket's current flow was judged uninteresting (not a stale verdict for a reused address). */
static __always_inline int pt_skipped(u64 sk)
{
#ifdef BUSY_HOST
    struct flow *af = flows.lookup(&sk);
    if (af && (af->flags & FL_AGGREGATED))
        return 1;  /* busy-host mode: its peer was judged already (docs/kernel.md) */
#endif
    u64 *open_ns = pt_skip.lookup(&sk);
    if (!open_ns)
        return 0;
    struct flow *f = flows.lookup(&sk);
    return f && f->open_ns == *open_ns;
}

static __always_inline u64 pt_sock_of(u64 ssl)
{
    struct pt_key k = {};
    k.ssl = ssl;
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    u64 *sk = pt_bind.lookup(&k);
    return sk ? *sk : 0;
}

/* Piece i of a call of `total` bytes: its offset and length (1..PT_CHUNK); 0 when there is none.
 * The first PT_PIECES - 1 pieces are the call's head; the last is its next piece, or for a call
 * longer than PT_PIECES * PT_CHUNK its tail (a gap of off - (PT_PIECES - 1) * PT_CHUNK bytes before
 * it). Shared by the copies from user memory (here) and from packets (capture_cgroup.c). */
static __always_inline int pt_piece(int i, u64 total, u64 *off, u32 *n)
{
    u64 o = (u64)i * PT_CHUNK;
    if (o >= total)
        return 0;
    if (i == PT_PIECES - 1 && total > (u64)PT_PIECES * PT_CHUNK)
        o = total - PT_CHUNK;
    u64 left = total - o;
    u32 k = left > PT_CHUNK ? PT_CHUNK : (u32)left;
    *off = o;
    *n = ((k - 1) & (PT_CHUNK - 1)) + 1;  /* 1..PT_CHUNK, in a form the verifier keeps */
    return 1;
}

/* Emit a call's bytes as up to PT_PIECES records: the call's head, and for a call longer than
 * that, its last PT_CHUNK bytes instead of the next head piece. Every record carries the call's
 * full length and its own offset, so user space knows each gap exactly and can skip it inside a
 * body (a big request's prompt, the middle of a long answer) while the message heads, the JSON
 * body's start (model, stream) and a response's end (usage) stay readable.
 *   The bytes come from user memory at src (skb NULL: a library call or a socket syscall), or
 * from the packet skb at offset src (capture_cgroup.c); with a constant NULL the compiler drops
 * the packet branch, so uprobe programs never name a helper they may not call.
 *   total: bytes readable there (contiguous); wire: bytes the call moved in all (more when a
 * plain-HTTP writev/sendmsg/readv/recvmsg used several buffers: only the first is copied);
 * hole: bytes of the stream before this call that were never seen (a packet after a gap). */
static __always_inline void pt_emit_pieces(struct __sk_buff *skb, u64 src, u64 total, u64 wire, u32 hole,
                                           u64 sk, u64 ssl, u32 pid, u32 tid, u8 dir, u8 source)
{
    u32 zero = 0;
    struct pt_rec *r = pt_scratch.lookup(&zero);
    if (!r || total == 0)
        return;
    if (wire < total)
        wire = total;
    wire += hole;
    u64 ts = bpf_ktime_get_ns();
#pragma unroll
    for (int i = 0; i < PT_PIECES; i++) {
        u64 off;
        u32 n;
        if (!pt_piece(i, total, &off, &n))
            break;
        long err = skb ? bpf_skb_load_bytes(skb, src + off, r->data, n)
                       : bpf_probe_read_user(r->data, n, (void *)(src + off));
        if (err != 0)
            return;
        r->h.type = REC_PLAIN;
        r->h.len = n;
        r->h.ts_ns = ts;
        r->h.sk = sk;
        r->h.ssl = ssl;
        r->h.pid = pid;
        r->h.tid = tid;
        r->h.wire_len = wire > 0xffffffffULL ? 0xffffffff : (u32)wire;
        r->h.offset = hole + (u32)off;
        r->h.direction = dir;
        r->h.source = source;
        /* 1: bytes before this piece were skipped; 2: the call's bytes after this piece never come;
         * 4: a new call after `hole` bytes of the stream never seen */
        r->h.cut = ((i == PT_PIECES - 1 && off > (u64)i * PT_CHUNK) ? 1 : 0) |
                   ((off + n >= total && hole + off + n < wire) ? 2 : 0) | ((i == 0 && hole) ? 4 : 0);
        if (events.ringbuf_output(r, sizeof(struct pt_hdr) + n, BPF_RB_NO_WAKEUP) != 0)
            count_loss(LOSS_RING);
    }
}

/* A call's bytes in user memory at ubuf (see pt_emit_pieces), by the calling thread. */
static __always_inline void pt_copy_part(u64 sk, u64 ssl, u64 ubuf, u64 total, u64 wire, u8 dir, u8 lib)
{
    u64 pt = bpf_get_current_pid_tgid();
#ifdef HAVE_ARRIVAL
    if (sk && total && dir == PT_WRITE)
        rx_on_write(sk);  /* arrival.c: an answer's bytes may come now */
#endif
    pt_emit_pieces(0, ubuf, total, wire, 0, sk, ssl, pt >> 32, (u32)pt, dir, lib);
}

static __always_inline void pt_copy(u64 sk, u64 ssl, u64 ubuf, u64 total, u8 dir, u8 lib)
{
    pt_copy_part(sk, ssl, ubuf, total, total, dir, lib);
}

static __always_inline void pt_call_enter(int is_read, u64 ssl, u64 buf, u64 outlen, u32 lib)
{
    u64 pt = bpf_get_current_pid_tgid();
    u32 tid = (u32)pt;
    struct pt_call c = {};
    c.ssl = ssl;
    c.buf = buf;
    c.outlen = outlen;
    c.lib = lib;
    if (is_read)
        pt_rcall.update(&pt, &c);
    else
        pt_wcall.update(&pt, &c);
    pt_cur.update(&tid, &ssl);
    u32 tgid = pt >> 32;
    if (!pt_tgids.lookup(&tgid)) {
        u8 one = 1;
        pt_tgids.update(&tgid, &one);
    }
}

/* ret: the library's return value; for *_ex calls the count comes from *outlen when ret == 1. */
static __always_inline void pt_call_return(int is_read, long ret, int is_ex)
{
    u64 pt = bpf_get_current_pid_tgid();
    u32 tid = (u32)pt;
    struct pt_call *cp = is_read ? pt_rcall.lookup(&pt) : pt_wcall.lookup(&pt);
    if (!cp)
        return;
    struct pt_call c = *cp;
    if (is_read)
        pt_rcall.delete(&pt);
    else
        pt_wcall.delete(&pt);
    pt_cur.delete(&tid);
    u64 n = 0;
    if (is_ex) {
        if (ret != 1 || !c.outlen)
            return;
        if (bpf_probe_read_user(&n, sizeof(n), (void *)c.outlen) != 0)
            return;
    } else {
        if (ret <= 0)
            return;
        n = (u64)ret;
    }
    u64 sk = pt_sock_of(c.ssl);
    if (!sk) {
        if (is_read) {
            u64 *last = pt_lastrecv.lookup(&tid);
            if (last) {
                sk = *last;
                pt_bind_to(c.ssl, sk);
            }
        } else {
            pt_wpending.update(&tid, &c.ssl);  /* memory BIO: the send comes after */
        }
    }
    if (sk && pt_skipped(sk))
        return;
    pt_copy(sk, c.ssl, c.buf, n, is_read ? PT_READ : PT_WRITE, (u8)c.lib);
}

/* Hooks: OpenSSL. SSL_write(ssl, buf, num) / SSL_read(ssl, buf, num) return the count;
 * SSL_write_ex(ssl, buf, num, &written) / SSL_read_ex(ssl, buf, num, &readbytes) return 1. They
 * return an int: only the low 32 bits of the return register are the value (-1 arrives as
 * 0x00000000ffffffff), hence the casts. GnuTLS returns ssize_t: the whole register. */
int bst_ssl_write_in(struct pt_regs *ctx) { pt_call_enter(0, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, PT_OPENSSL); return 0; }
int bst_ssl_write_out(struct pt_regs *ctx) { pt_call_return(0, (int)PT_REGS_RC(ctx), 0); return 0; }
int bst_ssl_write_ex_in(struct pt_regs *ctx) { pt_call_enter(0, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM4(ctx), PT_OPENSSL); return 0; }
int bst_ssl_write_ex_out(struct pt_regs *ctx) { pt_call_return(0, (int)PT_REGS_RC(ctx), 1); return 0; }
int bst_ssl_read_in(struct pt_regs *ctx) { pt_call_enter(1, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, PT_OPENSSL); return 0; }
int bst_ssl_read_out(struct pt_regs *ctx) { pt_call_return(1, (int)PT_REGS_RC(ctx), 0); return 0; }
int bst_ssl_read_ex_in(struct pt_regs *ctx) { pt_call_enter(1, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM4(ctx), PT_OPENSSL); return 0; }
int bst_ssl_read_ex_out(struct pt_regs *ctx) { pt_call_return(1, (int)PT_REGS_RC(ctx), 1); return 0; }

/* Hooks: GnuTLS. gnutls_record_send/recv(session, data, size) return the count. */
int bst_gnutls_send_in(struct pt_regs *ctx) { pt_call_enter(0, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, PT_GNUTLS); return 0; }
int bst_gnutls_send_out(struct pt_regs *ctx) { pt_call_return(0, PT_REGS_RC(ctx), 0); return 0; }
int bst_gnutls_recv_in(struct pt_regs *ctx) { pt_call_enter(1, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, PT_GNUTLS); return 0; }
int bst_gnutls_recv_out(struct pt_regs *ctx) { pt_call_return(1, PT_REGS_RC(ctx), 0); return 0; }

/* Plain HTTP (capture.c): a socket write/read of a connection judged to carry HTTP. */
/* n bytes are at ubuf (the first buffer); the syscall moved wire bytes in all. */
static __always_inline void plaintext_socket(u64 sk, u64 ubuf, u64 n, u64 wire, int is_read)
{
    if (!sk || pt_skipped(sk))
        return;
    pt_copy_part(sk, 0, ubuf, n, wire, is_read ? PT_READ : PT_WRITE, PT_SOCKET);
}
