/* Bytes tier "syscall": for kernels without sock:sock_{send,recv}_length.
 *
 * Syscall tracepoints give the fd and the return value in the caller's context, but an fd is not
 * a socket pointer, and resolving one would mean reading the task's file table (R0 forbids it).
 * So fds are linked to flows where both are visible at once:
 *   connect(): CLOSE->SYN_SENT fires inside the syscall, on the same thread that entered it;
 *   accept():  the peer address the kernel writes to user memory matches the 4-tuple seen at
 *              SYN_RECV->ESTABLISHED.
 * Then read/write/readv/writev/recvfrom/sendto/recvmsg/sendmsg on a linked fd add their return
 * value to the flow. Not seen by this tier: accept() called with a NULL address, fds passed to
 * other processes or dup()ed, sendfile/splice, sendmmsg/recvmmsg, io_uring.
 */

struct io_ctx {
    u64 sk;
    u32 is_send;
    u32 pad;
};

struct acc_key {
    u16 family;
    u16 port;        /* peer port, host order */
    u32 pad;
    u8 addr[16];     /* peer address */
};

BPF_HASH(fdsk, u64, u64, MAX_FLOWS);            /* (tgid << 32 | fd) -> socket pointer */
BPF_HASH(cur_conn, u32, u32, 4096);             /* tid -> fd inside connect() */
BPF_HASH(cur_acc, u32, u64, 4096);              /* tid -> user sockaddr pointer inside accept() */
BPF_HASH(cur_io, u32, struct io_ctx, 4096);     /* tid -> flow of the I/O syscall in flight */
BPF_HASH(pending_acc, struct acc_key, u64, MAX_FLOWS); /* peer address -> accepted socket */

static __always_inline u64 fd_key(u64 fd)
{
    return (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (u32)fd;
}

static __always_inline void acc_key_of(struct acc_key *k, struct flow *f)
{
    k->family = f->family;
    k->port = f->dport;
    __builtin_memcpy(k->addr, f->daddr, 16);
}

static __always_inline void hook_connect_start(u64 sk, struct flow *f)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 *fd = cur_conn.lookup(&tid);
    if (!fd)
        return;
    u64 key = fd_key(*fd);
    if (fdsk.update(&key, &sk) == 0)
        f->fdkey = key;
    else
        count_map_loss(sk);
}

static __always_inline void hook_passive_established(u64 sk, struct flow *f)
{
    struct acc_key k = {};
    acc_key_of(&k, f);
    if (pending_acc.update(&k, &sk) != 0)
        count_map_loss(sk);
}

static __always_inline void hook_flow_end(u64 sk, struct flow *f)
{
    if (f->fdkey) {
        u64 *cur = fdsk.lookup(&f->fdkey);
        if (cur && *cur == sk)
            fdsk.delete(&f->fdkey);
    }
    if (f->direction == DIR_ACCEPT) {
        struct acc_key k = {};
        acc_key_of(&k, f);
        u64 *cur = pending_acc.lookup(&k);
        if (cur && *cur == sk)
            pending_acc.delete(&k);
    }
}

/* Hook: connect() entry: remember the fd so CLOSE->SYN_SENT (inside this call) can link it. */
int bst_conn_enter(struct sys_enter_args *args)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 fd = (u32)args->arg[0];
    cur_conn.update(&tid, &fd);
    return 0;
}

int bst_conn_exit(struct sys_exit_args *args)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    cur_conn.delete(&tid);
    return 0;
}

static __always_inline void acc_enter(u64 uaddr)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    cur_acc.update(&tid, &uaddr);
}

/* accept()/accept4() exit: read the peer address the kernel just wrote for the caller, find the
 * flow established with that peer, link the new fd to it and attribute it (process context). */
static __always_inline void acc_exit(long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *uaddr = cur_acc.lookup(&tid);
    if (!uaddr)
        return;
    u64 ua = *uaddr;
    cur_acc.delete(&tid);
    if (ret < 0 || ua == 0)
        return;
    struct bst_sockaddr sa = {};
    if (bpf_probe_read_user(&sa, sizeof(sa), (void *)ua) != 0)
        return;
    struct acc_key k = {};
    k.family = sa.family;
    k.port = __builtin_bswap16(sa.port);
    if (sa.family == BST_AF_INET) {
        __builtin_memcpy(k.addr, &sa.addr4, 4);
    } else if (sa.family == BST_AF_INET6) {
        __builtin_memcpy(k.addr, sa.addr6, 16);
    } else {
        return;
    }
    u64 *skp = pending_acc.lookup(&k);
    if (!skp)
        return;
    u64 sk = *skp;
    pending_acc.delete(&k);
    struct flow *f = flows.lookup(&sk);
    if (!f)
        return;
    u64 key = fd_key((u64)ret);
    if (fdsk.update(&key, &sk) == 0)
        f->fdkey = key;
    else
        count_map_loss(sk);
    flow_attribute_and_open(sk, f);
}

int bst_acc_enter(struct sys_enter_args *args)
{
    acc_enter(args->arg[1]);
    return 0;
}

int bst_acc_exit(struct sys_exit_args *args)
{
    acc_exit(args->ret);
    return 0;
}

int bst_acc4_enter(struct sys_enter_args *args)
{
    acc_enter(args->arg[1]);
    return 0;
}

int bst_acc4_exit(struct sys_exit_args *args)
{
    acc_exit(args->ret);
    return 0;
}

/* close(): the fd number may be reused for anything; unlink it. */
int bst_close_enter(struct sys_enter_args *args)
{
    u64 key = fd_key(args->arg[0]);
    fdsk.delete(&key);
    return 0;
}

static __always_inline void io_enter(u64 fd, u32 is_send, u64 flags)
{
    if (flags & BST_MSG_PEEK)
        return;
    u64 key = fd_key(fd);
    u64 *sk = fdsk.lookup(&key);
    if (!sk)
        return;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct io_ctx c = {};
    c.sk = *sk;
    c.is_send = is_send;
    cur_io.update(&tid, &c);
}

static __always_inline void io_exit(long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct io_ctx *c = cur_io.lookup(&tid);
    if (!c)
        return;
    u64 sk = c->sk;
    u32 is_send = c->is_send;
    cur_io.delete(&tid);
    if (ret <= 0)
        return;
#ifdef HAVE_PLAINTEXT
    plaintext_on_sock_io(sk, is_send);  /* joins TLS library calls to this socket */
#endif
    struct flow *f = flows.lookup(&sk);
    if (f)
        flow_count(f, ret, is_send);
}

/* Hooks: the eight byte-moving socket syscalls, entry (which fd, is it ours?) and exit (how many
 * bytes). Entry/exit pairs are matched per thread through cur_io. */
int bst_write_in(struct sys_enter_args *a) { io_enter(a->arg[0], 1, 0); return 0; }
int bst_writev_in(struct sys_enter_args *a) { io_enter(a->arg[0], 1, 0); return 0; }
int bst_sendto_in(struct sys_enter_args *a) { io_enter(a->arg[0], 1, 0); return 0; }
int bst_sendmsg_in(struct sys_enter_args *a) { io_enter(a->arg[0], 1, 0); return 0; }
int bst_read_in(struct sys_enter_args *a) { io_enter(a->arg[0], 0, 0); return 0; }
int bst_readv_in(struct sys_enter_args *a) { io_enter(a->arg[0], 0, 0); return 0; }
int bst_recvfrom_in(struct sys_enter_args *a) { io_enter(a->arg[0], 0, a->arg[3]); return 0; }
int bst_recvmsg_in(struct sys_enter_args *a) { io_enter(a->arg[0], 0, a->arg[2]); return 0; }

/* Hook: the exit of all eight syscalls above; cur_io says which flow and direction. */
int bst_io_out(struct sys_exit_args *a)
{
    io_exit(a->ret);
    return 0;
}
