/* Capability "capture": the few payload bytes classification needs, copied from user memory.
 *
 *   DNS answers  - what a process reads from a socket connected to port 53 (UDP or TCP), or
 *                  from recvfrom()/recvmsg() whose source address has port 53 (unconnected UDP).
 *                  Any resolver library works: only the syscall boundary is watched.
 *   TLS hellos   - the first bytes a client writes on a new TCP connection, only if they start a
 *                  TLS handshake record (0x16), continued over up to CAP_WRITES writes so a hello
 *                  split across writes (post-quantum key shares make them ~1.5-2 KB) is whole.
 *
 * Syscall tracepoints run in the caller's context, so the pid is the asking process. Answers are
 * read at the syscall's exit, where the return value says how many bytes are valid; writes at
 * entry, from the buffer about to be sent (plain-HTTP writes at exit, see cap_http_write). Every record says how many bytes the syscall really
 * moved (wire_len), so a copy cut at CAP_MAX is a counted truncation in user space. Only user
 * memory and the user ABI layouts of sockaddr/iovec/msghdr are read (R0).
 */

#define CAP_MAX    4096   /* bytes copied per record (power of two: used as a mask) */
#define CAP_WRITES 4      /* writes inspected per new connection for a ClientHello */
#define CAP_TOTAL  16384  /* bytes per connection after which we stop looking */

/* struct cap_hdr, REC_DNS/REC_TLS and CAP_DNS_* come from busted/wire/layout.py. */
#define CAP_HTTP 3   /* cap_rfd kind: a plain-HTTP connection (plaintext.c copies its bytes) */

struct cap_rec {
    struct cap_hdr h;
    u8 data[CAP_MAX];
};

struct cap_conn_ctx {
    u64 uaddr;       /* connect()'s sockaddr */
    u32 fd;
    u32 is_tcp;      /* set by the SYN_SENT transition inside this connect() */
    u32 no_hello;    /* busy-host mode: an aggregated flow (quiet peer): no ClientHello capture */
    u32 pad;
    u64 sk;
};

struct cap_tls {
    u64 sk;
    u32 writes;
    u32 bytes;
    u32 http;        /* a plain-HTTP connection: every write is copied (plaintext.c) */
    u32 pad;
};

struct cap_io {
    u64 buf;         /* read()/recvfrom()/write()/sendto() buffer, or first iovec's base */
    u64 iov;         /* readv/writev/recvmsg/sendmsg: user iovec array (first entry is read) */
    u64 name;        /* recvfrom/recvmsg: where the kernel writes the source address */
    u32 fd;
    u32 kind;        /* 2 = DNS read, 3 = plain-HTTP read, 4 = plain-HTTP write (exit-time capture) */
    u64 sk;          /* kind 3: the connection's socket */
};

/* User ABI layouts (they are what user space passes; stable by definition). */
struct bst_iovec {
    u64 base;
    u64 len;
};
struct bst_msghdr {
    u64 name;
    s32 namelen;
    s32 pad;
    u64 iov;
    u64 iovlen;
};

BPF_HASH(cap_conn, u32, struct cap_conn_ctx, 4096);   /* tid -> connect() in flight */
struct cap_dns {
    u64 sk;          /* TCP: the connection's socket (DNS reassembly state is per connection) */
    u32 kind;        /* CAP_DNS_UDP / CAP_DNS_TCP / CAP_HTTP */
    u32 pad;
};

BPF_HASH(cap_rfd, u64, struct cap_dns, 16384);       /* (tgid<<32|fd) -> socket whose reads are copied: DNS, plain HTTP */
BPF_HASH(cap_tls_fd, u64, struct cap_tls, 16384);    /* (tgid<<32|fd) -> new TCP connection */
BPF_HASH(cap_io_ctx, u32, struct cap_io, 4096);      /* tid -> I/O syscall in flight */
BPF_PERCPU_ARRAY(cap_scratch, struct cap_rec, 1);

static __always_inline u64 cap_key(u64 fd)
{
    return (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (u32)fd;
}

/* Copy len bytes of user memory at ubuf into a record and send it. */
static __always_inline void cap_emit(u32 type, u64 sk, u32 fd, u64 ubuf, long len, u8 transport,
                                     struct bst_sockaddr *peer, u64 wire_len)
{
    u32 zero = 0;
    struct cap_rec *r = cap_scratch.lookup(&zero);
    if (!r || len <= 0)
        return;
    u32 n = len > CAP_MAX ? CAP_MAX : (u32)len;
    n &= (CAP_MAX - 1) | CAP_MAX;
    if (n > CAP_MAX)
        return;
    if (bpf_probe_read_user(r->data, n, (void *)ubuf) != 0)
        return;
    u64 pt = bpf_get_current_pid_tgid();
    r->h.type = type;
    r->h.len = n;
    r->h.wire_len = wire_len > 0xffffffffULL ? 0xffffffff : (u32)wire_len;
    r->h.ts_ns = bpf_ktime_get_ns();
    r->h.sk = sk;
    r->h.pid = pt >> 32;
    r->h.tid = (u32)pt;
    r->h.uid = (u32)bpf_get_current_uid_gid();
    r->h.fd = fd;
    r->h.transport = transport;
    r->h.family = 0;
    r->h.port = 0;
    if (peer) {
        r->h.family = peer->family;
        r->h.port = __builtin_bswap16(peer->port);
        if (peer->family == BST_AF_INET)
            __builtin_memcpy(r->h.addr, &peer->addr4, 4);
        else
            __builtin_memcpy(r->h.addr, peer->addr6, 16);
    }
    bpf_get_current_comm(&r->h.comm, sizeof(r->h.comm));
    /* No wake-up from here: a wake-up is an irq_work (a self-IPI) raised inside this program, in
     * process context, and the softirq that may run on its way out (loopback receive: socket
     * state changes) would find this CPU busy with BPF and skip our programs (counted as
     * KERNEL_MISS). The reader drains every drain_interval anyway. */
    if (events.ringbuf_output(r, sizeof(struct cap_hdr) + n, BPF_RB_NO_WAKEUP) != 0)
        count_loss(LOSS_RING);
}

/* Hook: connect() entry: remember the target; port 53 makes the fd a DNS socket at exit. */
int bst_cap_conn_in(struct sys_enter_args *args)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct cap_conn_ctx c = {};
    c.uaddr = args->arg[1];
    c.fd = (u32)args->arg[0];
    cap_conn.update(&tid, &c);
    return 0;
}

/* Called by the lifecycle tier at CLOSE->SYN_SENT, which runs inside connect() on the calling
 * thread: it tells us the fd is TCP and gives the socket pointer the flow events carry. */
#define HAVE_CAPTURE 1
static __always_inline void cap_on_syn_sent(u64 sk, u32 aggregated)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct cap_conn_ctx *c = cap_conn.lookup(&tid);
    if (!c)
        return;
    c->is_tcp = 1;
    c->no_hello = aggregated;
    c->sk = sk;
}

/* Hook: connect() exit. Success or EINPROGRESS (non-blocking) both count. */
int bst_cap_conn_out(struct sys_exit_args *args)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct cap_conn_ctx *c = cap_conn.lookup(&tid);
    if (!c)
        return 0;
    struct cap_conn_ctx cc = *c;
    cap_conn.delete(&tid);
    if (args->ret != 0 && args->ret != -115 /* EINPROGRESS */)
        return 0;
    struct bst_sockaddr sa = {};
    if (cc.uaddr == 0 || bpf_probe_read_user(&sa, sizeof(u32), (void *)cc.uaddr) != 0)
        return 0;
    if (sa.family != BST_AF_INET && sa.family != BST_AF_INET6)
        return 0;
    u64 key = cap_key(cc.fd);
    if (__builtin_bswap16(sa.port) == 53) {
        struct cap_dns d = {};
        d.kind = cc.is_tcp ? CAP_DNS_TCP : CAP_DNS_UDP;
        d.sk = cc.is_tcp ? cc.sk : 0;
        cap_rfd.update(&key, &d);
    } else {
        cap_rfd.delete(&key);
    }
    if (cc.is_tcp && !cc.no_hello) {  /* DNS stays on for every flow: it re-judges peers */
        struct cap_tls t = {};
        t.sk = cc.sk;
        cap_tls_fd.update(&key, &t);
    }
    return 0;
}

/* Hook: close(): forget the fd (its number will be reused). */
int bst_cap_close(struct sys_enter_args *args)
{
    u64 key = cap_key(args->arg[0]);
    cap_rfd.delete(&key);
    cap_tls_fd.delete(&key);
    return 0;
}

/* A write on a new connection: captured at syscall entry, from the buffer being written (its
 * length is what the caller asked to write; the first write on a fresh socket is sent whole).
 * Capturing at entry spares an exit hook on every write of every process. */
/* The first bytes of a connection start an HTTP/1.x request, or the HTTP/2 cleartext preface. */
static __always_inline int looks_like_http(u8 *h)
{
    u32 w = (u32)h[0] | (u32)h[1] << 8 | (u32)h[2] << 16 | (u32)h[3] << 24;
    return w == 0x20544547 /* "GET " */ || w == 0x54534f50 /* "POST" */ || w == 0x20545550 /* "PUT " */ ||
           w == 0x44414548 /* "HEAD" */ || w == 0x43544150 /* "PATC" */ || w == 0x454c4544 /* "DELE" */ ||
           w == 0x4954504f /* "OPTI" */ || w == 0x20495250 /* "PRI " */;
}

/* A plain-HTTP write is copied at the syscall's exit, where the return value says how many bytes
 * the kernel took: a non-blocking send() may take fewer than asked, and the caller sends the rest
 * again (copying what was asked at entry would repeat those bytes). */
static __always_inline void cap_http_write(u64 sk, u64 fd, u64 buf, u64 iov)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct cap_io io = {};
    io.buf = buf;
    io.iov = iov;
    io.fd = (u32)fd;
    io.kind = 4;
    io.sk = sk;
    cap_io_ctx.update(&tid, &io);
}

static __always_inline void cap_write_in(u64 fd, u64 buf, u64 iov, u64 len)
{
    u64 key = cap_key(fd);
    struct cap_tls *t = cap_tls_fd.lookup(&key);
    if (!t)
        return;
    u64 ubuf = buf;  /* 0 for gathered writes: the exit reads the iovec again */
    if (!buf && iov) {
        struct bst_iovec v = {};
        if (bpf_probe_read_user(&v, sizeof(v), (void *)iov) != 0)
            return;
        buf = v.base;
        len = v.len;
    }
    if (!buf || len == 0)
        return;
#ifdef HAVE_PLAINTEXT
    if (t->http) {  /* a later write of a plain-HTTP connection: copied at exit (cap_io_out) */
        cap_http_write(t->sk, fd, ubuf, iov);
        return;
    }
#endif
    u32 whole = 0;
    if (t->writes == 0) {
        u8 h[5] = {};
        bpf_probe_read_user(h, sizeof(h), (void *)buf);
        if (h[0] != 0x16) {  /* not a TLS handshake record: nothing to classify here */
#ifdef HAVE_PLAINTEXT
            if (looks_like_http(h)) {  /* plain HTTP: follow the connection's plaintext */
                struct cap_dns r = {};
                r.sk = t->sk;
                r.kind = CAP_HTTP;
                cap_rfd.update(&key, &r);  /* its reads too */
                t->http = 1;
                cap_http_write(t->sk, fd, ubuf, iov);
                return;
            }
#endif
            cap_tls_fd.delete(&key);
            return;
        }
        /* The first record is whole in this write: the hello is complete, stop after it. */
        whole = len >= 5 + (((u32)h[3] << 8) | h[4]);
    }
    cap_emit(REC_TLS, t->sk, (u32)fd, buf, (long)(len > CAP_MAX ? CAP_MAX : len), 0, 0, len);
    t->writes += 1;
    t->bytes += len;
    if (whole || t->writes >= CAP_WRITES || t->bytes >= CAP_TOTAL)
        cap_tls_fd.delete(&key);
}

static __always_inline void cap_read_in(u64 fd, u64 buf, u64 iov, u64 name)
{
    u64 key = cap_key(fd);
    struct cap_dns *r = cap_rfd.lookup(&key);
    if (!r && name == 0)
        return;  /* not a DNS or HTTP socket, and no source address to check */
    u32 kind = r && r->kind == CAP_HTTP ? 3 : 2;
    u64 sk = r ? r->sk : 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct cap_io io = {};
    io.buf = buf;
    io.iov = iov;
    io.name = name;
    io.fd = (u32)fd;
    io.kind = kind;
    io.sk = sk;
    cap_io_ctx.update(&tid, &io);
}

static __always_inline void cap_io_out(long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct cap_io *p = cap_io_ctx.lookup(&tid);
    if (!p)
        return;
    struct cap_io io = *p;
    cap_io_ctx.delete(&tid);
    if (ret <= 0)
        return;
    u64 buf = io.buf;
    u64 wire = (u64)ret;
    if (!buf) {
        struct bst_iovec v = {};
        if (!io.iov || bpf_probe_read_user(&v, sizeof(v), (void *)io.iov) != 0)
            return;
        buf = v.base;
        if ((u64)ret > v.len)
            ret = (long)v.len;  /* only the first iovec is copied: never past its end */
    }
    (void)wire;
    if (!buf)
        return;
#ifdef HAVE_PLAINTEXT
    if (io.kind == 3 || io.kind == 4) {  /* plain HTTP read / write; other buffers' bytes: a known gap */
        plaintext_socket(io.sk, buf, ret, wire, io.kind == 3);
        return;
    }
#endif
    u64 key = cap_key(io.fd);

    struct cap_dns *d = cap_rfd.lookup(&key);
    if (d) {
        cap_emit(REC_DNS, d->sk, io.fd, buf, ret, (u8)d->kind, 0, ret);
        return;
    }
    /* Unconnected UDP: keep it only if the answer came from port 53. */
    struct bst_sockaddr sa = {};
    if (bpf_probe_read_user(&sa, sizeof(sa), (void *)io.name) != 0)
        return;
    if ((sa.family == BST_AF_INET || sa.family == BST_AF_INET6) && __builtin_bswap16(sa.port) == 53)
        cap_emit(REC_DNS, 0, io.fd, buf, ret, CAP_DNS_UDP, &sa, ret);
}

static __always_inline u64 msg_iov(u64 umsg)
{
    struct bst_msghdr m = {};
    if (!umsg || bpf_probe_read_user(&m, sizeof(m), (void *)umsg) != 0)
        return 0;
    return m.iov;
}

static __always_inline u64 msg_name(u64 umsg)
{
    struct bst_msghdr m = {};
    if (!umsg || bpf_probe_read_user(&m, sizeof(m), (void *)umsg) != 0)
        return 0;
    return m.name;
}

/* Hooks: writes on new TCP connections (ClientHello) and reads on DNS sockets (answers). */
int bst_cap_write_in(struct sys_enter_args *a) { cap_write_in(a->arg[0], a->arg[1], 0, a->arg[2]); return 0; }
int bst_cap_writev_in(struct sys_enter_args *a) { cap_write_in(a->arg[0], 0, a->arg[1], 0); return 0; }
int bst_cap_sendto_in(struct sys_enter_args *a) { cap_write_in(a->arg[0], a->arg[1], 0, a->arg[2]); return 0; }
int bst_cap_sendmsg_in(struct sys_enter_args *a) { cap_write_in(a->arg[0], 0, msg_iov(a->arg[1]), 0); return 0; }
int bst_cap_read_in(struct sys_enter_args *a) { cap_read_in(a->arg[0], a->arg[1], 0, 0); return 0; }
int bst_cap_readv_in(struct sys_enter_args *a) { cap_read_in(a->arg[0], 0, a->arg[1], 0); return 0; }
int bst_cap_recvfrom_in(struct sys_enter_args *a) { cap_read_in(a->arg[0], a->arg[1], 0, a->arg[4]); return 0; }
int bst_cap_recvmsg_in(struct sys_enter_args *a) { u64 m = a->arg[1]; cap_read_in(a->arg[0], 0, msg_iov(m), msg_name(m)); return 0; }

/* Hook: the exit of the four reading syscalls above, and of the four writing ones (plain-HTTP
 * writes: one program attached eight times; the exit record layout is the same and the per-thread
 * context says what the call was). */
int bst_cap_out(struct sys_exit_args *a)
{
    cap_io_out(a->ret);
    return 0;
}
