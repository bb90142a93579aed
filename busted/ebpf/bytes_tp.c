/* Bytes tier "tracepoint": sock:sock_send_length / sock:sock_recv_length.
 *
 * They fire in sock_sendmsg()/sock_recvmsg() for every socket send/receive path (send, write,
 * writev, sendmsg, io_uring, ...), in the calling process's context, with the socket pointer and
 * the byte count: one map update per call, summed per flow, nothing sent to user space per call.
 * Process context is also what lets an accepted flow be attributed to its owner here.
 */

/* This tier needs no fd bookkeeping: the lifecycle hooks are empty. */
static __always_inline void hook_connect_start(u64 sk, struct flow *f) {}
static __always_inline void hook_passive_established(u64 sk, struct flow *f) {}
static __always_inline void hook_flow_end(u64 sk, struct flow *f) {}

static __always_inline void count_bytes(u64 sk, int ret, int flags, int is_send)
{
    if (ret <= 0 || (flags & BST_MSG_PEEK))
        return;
#ifdef HAVE_PLAINTEXT
    plaintext_on_sock_io(sk, is_send);  /* joins TLS library calls to this socket */
#endif
#ifdef HAVE_ARRIVAL
    if (!is_send)
        rx_on_recv(sk, ret);  /* when the first byte of this read arrived (arrival.c) */
#endif
    struct flow *f = flows.lookup(&sk);
    if (!f) {
        f = flow_midstream(sk);
        if (!f)
            return;
    }
    flow_attribute_and_open(sk, f);
    flow_count(f, ret, is_send);
}

/* Hook: a socket send completed (ret = bytes accepted by the socket). */
int bst_send_len(struct tracepoint__sock__sock_send_length *args)
{
    if (args->protocol != BST_IPPROTO_TCP)
        return 0;
    count_bytes((u64)args->sk, args->ret, args->flags, 1);
    return 0;
}

/* Hook: a socket receive completed (ret = bytes copied to the application). */
int bst_recv_len(struct tracepoint__sock__sock_recv_length *args)
{
    if (args->protocol != BST_IPPROTO_TCP)
        return 0;
    count_bytes((u64)args->sk, args->ret, args->flags, 0);
    return 0;
}
