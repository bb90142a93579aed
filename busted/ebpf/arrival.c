/* Capability "arrival": when the bytes an application reads arrived at its socket, so that time to
 * first token is what the host saw, not when the client got round to reading (docs/llm.md).
 *
 * Only sockets whose plaintext is followed have a state: it is made (or re-armed) when plaintext.c
 * copies a write on the socket (a request going out). Then:
 *   tcp:tcp_probe (softirq, at arrival: each TCP segment the socket receives, with its payload
 *     length) appends (cumulative end offset, time) to a small per-socket FIFO of segments;
 *   sock:sock_recv_length (the bytes tier, in the reader's context) consumes the FIFO by the byte
 *     count read, and reports the arrival time of the first byte of that read (REC_ARRIVAL), at
 *     most RX_EMITS times per write. User space joins it to the plaintext the read delivered.
 * R0 holds: tracepoint arguments (skaddr as an opaque key, data_len) and the helpers only.
 *
 * Approximate by design, and bounded: counts start when the state is made (bytes already queued
 * then are unknown; a read that drains everything counted resynchronises), retransmitted copies
 * are counted twice by tcp_probe, and a full FIFO grows its newest segment (its first byte's time
 * stays). An arrival before the socket's last write is not reported (it cannot be the answer).
 */

#define HAVE_ARRIVAL 1
#define RX_SEGS 8        /* a power of two */
#define RX_EMITS 32      /* REC_ARRIVAL records per write at most */

struct rx_state {
    u64 arrived;         /* payload bytes that arrived since the state (re)started */
    u64 consumed;        /* bytes the application read since then */
    u64 wts;             /* the socket's last write seen (plaintext.c) */
    u64 open_ns;         /* the flow it was made for: a socket address reused by a new flow starts over */
    u64 end[RX_SEGS];    /* FIFO of arrived segments: cumulative end offset ... */
    u64 ts[RX_SEGS];     /* ... and arrival time */
    u32 head;
    u32 n;
    u32 emits;
    u32 pad;
};

BPF_TABLE("lru_hash", u64, struct rx_state, rx_st, 8192);

/* plaintext.c: the process wrote on a followed socket. */
static __always_inline void rx_on_write(u64 sk)
{
    u64 now = bpf_ktime_get_ns();
    struct flow *f = flows.lookup(&sk);
    u64 open_ns = f ? f->open_ns : 0;
    struct rx_state *s = rx_st.lookup(&sk);
    if (s && s->open_ns == open_ns) {
        s->wts = now;
        s->emits = 0;
        return;
    }
    struct rx_state z = {};
    z.wts = now;
    z.open_ns = open_ns;
    rx_st.update(&sk, &z);
}

/* Hook: a TCP segment reached an established socket (before it is queued for the reader). */
int bst_rx_probe(struct tracepoint__tcp__tcp_probe *args)
{
    u32 len = args->data_len;
    if (!len)
        return 0;  /* a bare ACK */
    u64 sk = (u64)args->skaddr;
    struct rx_state *s = rx_st.lookup(&sk);
    if (!s)
        return 0;
    s->arrived += len;
    u32 n = s->n;
    if (n < RX_SEGS) {
        u32 i = (s->head + n) & (RX_SEGS - 1);
        s->end[i] = s->arrived;
        s->ts[i] = bpf_ktime_get_ns();
        s->n = n + 1;
    } else {
        u32 i = (s->head + RX_SEGS - 1) & (RX_SEGS - 1);
        s->end[i] = s->arrived;
    }
    return 0;
}

/* The bytes tier: the application read ret bytes from the socket (process context). */
static __always_inline void rx_on_recv(u64 sk, int ret)
{
    struct rx_state *s = rx_st.lookup(&sk);
    if (!s)
        return;
    u64 off = s->consumed;
    u64 arrival = 0;
#pragma unroll
    for (int k = 0; k < RX_SEGS; k++) {
        if (!s->n)
            break;
        u32 i = s->head & (RX_SEGS - 1);
        if (s->end[i] > off) {
            arrival = s->ts[i];
            break;
        }
        s->head = (i + 1) & (RX_SEGS - 1);
        s->n -= 1;
    }
    s->consumed = off + (u64)ret;
    if (s->consumed >= s->arrived) {
        /* read up to what we counted (or past it: bytes queued before the state began): the queue
         * is taken as empty, counting starts over */
        s->consumed = 0;
        s->arrived = 0;
        s->head = 0;
        s->n = 0;
    }
    if (!arrival || arrival < s->wts || s->emits >= RX_EMITS)
        return;
    s->emits += 1;
    struct rx_rec *r = events.ringbuf_reserve(sizeof(struct rx_rec));
    if (!r) {
        count_loss(LOSS_RING);
        return;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->type = REC_ARRIVAL;
    r->ts_ns = bpf_ktime_get_ns();
    r->sk = sk;
    r->arrival_ns = arrival;
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}
