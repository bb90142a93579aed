/* Policy enforcement, loaded only with --enforce (busted/enforce.py). Decisions are made here,
 * in the kernel, because a trip through user space loses the race against a client on loopback.
 *
 *   pol_connect4/6 (cgroup sock_addr connect) - refuse connect() to a denied address: EPERM; with
 *                  exe rules, note the caller's exe bits per socket for the ClientHello judge.
 *   pol_dns_*      (cgroup skb ingress)       - a UDP DNS answer (source port 53) arriving for a
 *                  socket in the scope is parsed here, before it is queued to the socket: when its
 *                  question or a CNAME on its chain matches pol_names, its A/AAAA addresses enter
 *                  pol_learn4/6 for the socket owner's uid only, so that user's very next connect()
 *                  is already judged and no other user's is changed. Only packets that arrived count
 *                  (a read() on an fd that is no longer the socket is not an answer).
 *   pol_egress     (cgroup skb egress)        - a TLS ClientHello is reassembled per socket across
 *                  records and segments (pol_hello, bounded) and its SNI judged; a denied hello is
 *                  dropped (and every later data segment of that socket): no request byte leaves
 *                  the host. The verdict is about that socket only (its cookie), never its address.
 *   pol_exe_*      (sched/task tracepoints)   - the program each process runs, by tgid
 *                  (pol_exe_proc): set from the exec'd filename, inherited at fork, dropped at the
 *                  process's exit; connect looks it up in the exe trie (pol_exe) for exe rules.
 *   pol_cg_*       (cgroup_mkdir/rmdir tp)    - a new cgroup's id and path go to user space, which
 *                  adds a container's cgroups to pol_ctr (container rules, checked against the
 *                  caller's or socket's cgroup ancestry); a removed cgroup leaves pol_ctr here.
 *   pol_sockops    (cgroup sock_ops)          - a socket marked by pol_egress gets a 1 ms
 *                  TCP_USER_TIMEOUT at its next send attempt, so the client fails in well under
 *                  a second (ETIMEDOUT) instead of retrying for minutes; a closing socket's
 *                  entries (pol_denied_sk, pol_hello, pol_sk_exe) are removed.
 *
 * Rules: pol_rules[0..nrules) in policy order; each carries the bit of its policy rule. A
 * destination's mask (pol_addr*, pol_names) holds the bits of the rules whose provider/hostname
 * keys it satisfies, POL_ANY_BIT for "some provider" and POL_AMBIG_BIT for an address that names
 * with different masks resolve to (a shared CDN address: left to the SNI check).
 * R0: only user ABI structs (bpf_sock_addr, __sk_buff, bpf_sock_ops), user memory and helpers.
 */

/* The verifier follows one path through every loop pass (at most 8192 jumps). Names are judged
 * by their last POL_NAME_MAX bytes (every suffix entry fits; an exact entry cannot match a longer
 * name); answers past POL_ANSWERS_MAX are not learned. */
#define POL_NAME_MAX    128  /* a power of two: also used as a mask */
#define POL_DNS_NAME_MAX 255
#define POL_ANSWERS_MAX 8
#define POL_HELLO_BUF   2048 /* ClientHello bytes kept per socket until the SNI is whole (power of two) */
/* Why an SNI could not be judged (pol_tls_ext.reason); 0: it was. */
#define POL_R_TOO_BIG   1    /* the SNI is not within the first POL_HELLO_BUF bytes of the hello */
#define POL_R_MALFORMED 2    /* not a well-formed hello, record or name */
#define POL_R_GAP       3    /* a segment past a gap: bytes of the hello not seen */
#define POL_R_NO_STATE  4    /* no room to keep the partial hello */
#define POL_V_PASS 0
#define POL_V_DROP 1
#define POL_ANY_BIT   63
#define POL_AMBIG_BIT 62
#define BST_SOCK_STREAM 1
/* the destination-mask bits of the kernel budgets: POL_BUDGET_TOP_BIT - j for budget j */
#define POL_BUDGET_BITS (((1ULL << POL_MAX_BUDGETS) - 1) << (POL_BUDGET_TOP_BIT + 1 - POL_MAX_BUDGETS))

/* LPM keys start with the policy generation (pol_gen): its 32 bits are part of every prefix. */
struct pol_lpm4 {
    u32 prefixlen;
    u32 gen;
    u32 addr;
};
struct pol_lpm6 {
    u32 prefixlen;
    u32 gen;
    u8 addr[16];
};
/* Names are matched by longest prefix over the lower-cased name written backwards: the entry
 * for "api.x.com" is "moc.x.ipa\0" (exactly that name), the entry for "*.x.com" is "moc.x."
 * (anything under it). User space folds into each entry the bits of every shorter entry that is
 * a prefix of it, because an LPM lookup returns only the longest. */
struct pol_nkey {
    u32 prefixlen;
    u32 gen;
    u8 name[POL_NAME_MAX];
};
struct pol_buf {
    u8 d[1024];   /* a DNS message (first 512 bytes) */
    u8 nm[512];   /* a dotted name: byte k at nm[k % POL_NAME_MAX] (its last POL_NAME_MAX bytes) */
    struct pol_nkey key;
    /* Loop state lives here, read and written through volatile: the verifier does not track map
     * memory, so the paths through a loop body meet again in one state at the loop's head
     * (registers would keep each path's exact values apart and double the paths per pass). */
    u64 mask;
    u32 off;
    u32 n;
    u32 nl;       /* the name's length (up to POL_DNS_NAME_MAX) */
    u32 an;
    u32 a;        /* the answer being read */
    u32 family;   /* egress: the packet's peer */
    u32 dport;
    u32 uid;      /* ingress: the receiving socket's owner */
    u32 stage;    /* DNS: 0 question name, 1 a CNAME's target */
    u32 pos;      /* name decoder: input offset, output length, label bytes left, jumps, end */
    u32 out;
    u32 left;
    u32 jumps;
    u32 nend;
    u32 bad;
    u32 p;        /* egress: payload offset of this segment's unread hello bytes */
    u32 reason;   /* egress: POL_R_* */
    u32 gen;      /* DNS: the policy generation read when the answer arrived (all stages use it) */
    u64 exe;      /* egress: the socket's exe bits (pol_sk_exe) and the bits not known, for pol_eval */
    u64 exe_unknown;
    u8 daddr[16];
};
/* A ClientHello being reassembled, per socket cookie. */
struct pol_hello {
    u32 have;      /* handshake bytes in buf */
    u32 rec_left;  /* bytes of the current TLS record still to come */
    u32 next_seq;  /* TCP sequence number of the next hello byte */
    u32 pad;
    u8 buf[2 * POL_HELLO_BUF];  /* the second half: slack for masked offsets plus lengths */
};
/* Learned addresses carry the policy generation whose name masks they hold (gen, below). */
struct pol_lkey4 {
    u32 uid;
    u32 addr;
    u32 gen;
};
struct pol_lkey6 {
    u32 uid;
    u8 addr[16];
    u32 gen;
};
struct pol_tls_rec {
    struct pol_rec r;
    struct pol_tls_ext x;
};
#define V32(x) (*(volatile u32 *)&(x))
#define V64(x) (*(volatile u64 *)&(x))
#define BARRIER_VAR(x) asm volatile("" : "+r"(x))
/* 1 if a != b, else 0, without a branch (the barrier keeps the compiler from making one). */
static __always_inline u64 pol_ne(u64 a, u64 b)
{
    u64 x = a ^ b;
    BARRIER_VAR(x);
    x |= -x;  /* top bit set iff x != 0 */
    BARRIER_VAR(x);
    return x >> 63;
}

/* 1 if flag bit `bit` (a power of two) is set in f, without a branch. */
#define pol_flag(f, bit) (((f) / (bit)) & 1)

/* Two generations of everything the policy writes (conf, rules, address and name masks, learned
 * addresses), and one switch: pol_gen[0] names the generation in force. A reload writes the other
 * generation completely, then flips pol_gen (one 4-byte write); a decision reads pol_gen once and
 * uses that generation throughout, so it sees the old policy or the new one, never a mix. */
BPF_ARRAY(pol_gen, u32, 1);
BPF_ARRAY(pol_conf, struct pol_conf, 2);
/* Slot i holds rule i of both generations (the pair is rewritten whole; the half in force keeps
 * its bytes): one lookup, then the generation's half at a bounded offset (no fork per generation). */
struct pol_rule2 {
    struct pol_rule g[2];
};
BPF_ARRAY(pol_rules, struct pol_rule2, POL_MAX_RULES);
BPF_LPM_TRIE(pol_addr4, struct pol_lpm4, u64, 2 * POL_MAX_ADDRS);
BPF_LPM_TRIE(pol_addr6, struct pol_lpm6, u64, 2 * POL_MAX_ADDRS);
BPF_LPM_TRIE(pol_names, struct pol_nkey, u64, 2 * POL_MAX_NAMES);
/* Addresses learned from DNS answers, per (uid of the socket that received them, address). LRU:
 * a full map forgets the least recently used (the SNI check still sees those flows). */
BPF_TABLE("lru_hash", struct pol_lkey4, u64, pol_learn4, POL_MAX_ADDRS);
BPF_TABLE("lru_hash", struct pol_lkey6, u64, pol_learn6, POL_MAX_ADDRS);
/* socket cookie -> deciding rule (SNI); removed when the socket closes (pol_sockops), LRU besides */
BPF_TABLE("lru_hash", u64, u32, pol_denied_sk, 16384);
/* socket cookie -> its ClientHello while it is read; removed once judged (or at close) */
BPF_TABLE("lru_hash", u64, struct pol_hello, pol_hello, 1024);
BPF_PERCPU_ARRAY(pol_hello_zero, struct pol_hello, 1);  /* never written: a zeroed value to insert */
/* [0] the DNS parser (ingress), [1] the hello parser (egress): a softirq ingress must not overwrite
 * an egress program's names on the same CPU. */
BPF_PERCPU_ARRAY(pol_scratch, struct pol_buf, 2);
/* [0] pol_denied_sk entries taken, [1] hellos not judged (POL_R_*), [2] learned addresses,
 * [3] decision records the ring had no room for (the verdict stood), [4] learned addresses the
 * map refused, [5] denied sockets the map refused (their next segment is judged again), [6]
 * processes pol_exe_proc refused (their exe unknown): [3]-[6] are reported as EventsLost
 * (busted/policy/enforce.py, POL_COUNTS); [7] connect decisions whose caller's exe was not known */
BPF_PERCPU_ARRAY(pol_counts, u64, 8);
/* 512 KiB: user space aggregates repeated decisions, but every record must reach it to be counted
 * (a connect record carries the caller's exe: 216 bytes) */
BPF_RINGBUF_OUTPUT(pol_events, 128);

static __always_inline void pol_ring_full(void)
{
    u32 i = 3;
    u64 *v = pol_counts.lookup(&i);
    if (v)
        *v += 1;
}
static __always_inline void pol_count(u32 i)
{
    u64 *v = pol_counts.lookup(&i);
    if (v)
        *v += 1;
}

/* Stages run as tail calls, each verified on its own: one program walking a name, hashing it and
 * then the answers exceeds the verifier's 8192-jump path history. The loader fills the slots. */
BPF_PROG_ARRAY(pol_dns_tail, 3);
BPF_PROG_ARRAY(pol_skb_tail, 4);
#define TAIL_DNS_MASK    0
#define TAIL_DNS_ANSWERS 1
#define TAIL_DNS_NAME    2
#define TAIL_SKB_JUDGE   0
#define TAIL_SKB_HELLO   1
#define TAIL_SKB_PARSE   2
#define TAIL_SKB_NAME    3
#define SCRATCH_DNS 0
#define SCRATCH_TLS 1

/* The generation in force, read once per decision. A missing pol_gen entry (never: an array)
 * ends the program at once rather than forking the verifier's walk into two generations. */
static __always_inline u32 *pol_gen_ptr(void)
{
    u32 z = 0;
    return pol_gen.lookup(&z);
}

static __always_inline struct pol_conf *pol_cfg(u32 gen)
{
    u32 k = gen & 1;
    return pol_conf.lookup(&k);
}

/* Exe rules. The program a process runs, by tgid: the filename its last exec was given (the
 * sched_process_exec tracepoint's argument, as exec'd: absolute or relative, a symbolic link not
 * resolved), inherited at fork, dropped at the process's exit; processes older than the monitor
 * are seeded by user space from /proc/PID/exe (only where the kernel has written nothing yet).
 * At most POL_EXE_MAX - 1 bytes are kept: user space compiles only exact paths shorter than that.
 * Not preallocated: a host runs far fewer processes than the bound. */
struct pol_eproc {
    u8 path[POL_EXE_MAX];
};
struct pol_ekey {
    u32 prefixlen;
    u32 gen;
    u8 path[POL_EXE_MAX];
};
BPF_F_TABLE("hash", u32, struct pol_eproc, pol_exe_proc, POL_MAX_PROCS, BPF_F_NO_PREALLOC);
/* Exe patterns as user space compiles them (exact "path\0", or a prefix "dir/" or "/usr/bin/python3"
 * from a trailing '*'), per generation -> the bits (rule indices) of the rules they satisfy; each
 * entry carries the bits of every shorter entry that prefixes it (a lookup returns the longest). */
BPF_LPM_TRIE(pol_exe, struct pol_ekey, u64, 2 * POL_MAX_EXES);
BPF_PERCPU_ARRAY(pol_exe_tmp, struct pol_ekey, 1);

/* The caller's exe-rule bits in generation gen: 0 when its process is not known (no rule with an
 * exe key holds for it: a value busted does not know does not match). */
static __always_inline u64 pol_exe_mask(u32 gen)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32, z = 0;
    struct pol_eproc *p = pol_exe_proc.lookup(&tgid);
    if (!p) {
        pol_count(7);
        return 0;
    }
    struct pol_ekey *k = pol_exe_tmp.lookup(&z);
    if (!k)
        return 0;
    k->prefixlen = 32 + POL_EXE_MAX * 8;
    k->gen = gen & 1;
    __builtin_memcpy(k->path, p->path, POL_EXE_MAX);
    u64 *m = pol_exe.lookup(k);
    return m ? *m : 0;
}

/* Socket cookie -> the exe bits (generation gen) of the process that connected it: at the
 * ClientHello no process can be asked. Written at every TCP connect the rules let through while the
 * policy has kernel exe rules; removed at close (pol_sockops), LRU besides. */
struct pol_skexe {
    u64 mask;
    u32 gen;
    u32 pad;
};
BPF_TABLE("lru_hash", u64, struct pol_skexe, pol_sk_exe, 16384);

static __always_inline void pol_note_sk_exe(struct bpf_sock_addr *ctx, u32 gen, u64 exe)
{
    struct pol_skexe v = {exe, gen & 1, 0};
    u64 ck = bpf_get_socket_cookie(ctx);
    pol_sk_exe.update(&ck, &v);
}

/* Why these hooks: the exec tracepoint carries the new program's filename as an argument (R0: no
 * task struct read), fires once per successful exec after the old threads are gone, in the
 * process that now runs it; task_newtask (parent context) gives the child's pid and clone flags,
 * so threads are skipped; sched_process_exit's group_dead marks the last thread of a process. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 z = 0;
    struct pol_ekey *k = pol_exe_tmp.lookup(&z);
    if (!k)
        return 0;
    u32 loc = (u32)args->data_loc_filename;
    if (bpf_probe_read_kernel_str(k->path, POL_EXE_MAX, (void *)args + (loc & 0xFFFF)) <= 0)
        k->path[0] = 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (pol_exe_proc.update(&tgid, (struct pol_eproc *)k->path) != 0) {
        pol_count(6);
        return 0;
    }
    if (k->path[0] == '/')
        return 0;
    /* A relative filename ("./curl"): the kernel cannot resolve it without the task's cwd; user
     * space rewrites the entry from /proc/PID/exe when it reads this record. */
    struct pol_rec *r = pol_events.ringbuf_reserve(sizeof(struct pol_rec));
    if (!r) {
        pol_ring_full();
        return 0;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->point = POINT_EXE;
    r->pid = tgid;
    __builtin_memcpy(r->exe, k->path, POL_EXE_MAX);
    pol_events.ringbuf_submit(r, 0);
    return 0;
}

TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & 0x00010000ULL)  /* CLONE_THREAD: same process, same program */
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32, child = (u32)args->pid;
    struct pol_eproc *p = pol_exe_proc.lookup(&parent);
    if (!p)
        return 0;
    if (pol_exe_proc.update(&child, p) != 0)
        pol_count(6);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    if (!args->group_dead)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    pol_exe_proc.delete(&tgid);
    return 0;
}

/* Container rules (busted/policy/enforce.py, docs/policy.md): the cgroups of the containers a rule names
 * (their top cgroup: what is below is found through the ancestry), per generation, -> the bits
 * (policy rule indices) of the rules naming them. Written by user space from a cgroupfs walk at
 * load and from pol_cg_mkdir's records as containers start; pol_cg_rmdir deletes. */
struct pol_ckey {
    u64 id;
    u32 gen;
    u32 pad;
};
/* mask: the rule bits; scope: the container id's hash (busted.policy.budgets.scope_hash), for budgets per
 * container (user space then adds every container's top cgroup, named by a rule or not). */
struct pol_cval {
    u64 mask;
    u64 scope;
};
BPF_HASH(pol_ctr, struct pol_ckey, struct pol_cval, 2 * POL_MAX_CTR_CGROUPS);

/* The container-rule bits of the caller's cgroup (skb == 0) or the socket's: every ancestor level
 * up to POL_CG_LEVELS looked up in pol_ctr (a level past the cgroup's depth has id 0: the end).
 * *scope: the deepest container's id hash (the container a nested one runs in is its own). */
static __always_inline u64 pol_ctr_mask(u32 gen, struct __sk_buff *skb, u64 *scope)
{
    u64 m = 0;
    struct pol_ckey k = {0, gen & 1, 0};
    for (u32 l = 1; l <= POL_CG_LEVELS; l++) {
        k.id = skb ? bpf_skb_ancestor_cgroup_id(skb, l) : bpf_get_current_ancestor_cgroup_id(l);
        if (!k.id)
            break;
        struct pol_cval *v = pol_ctr.lookup(&k);
        if (v) {
            m |= v->mask;
            *scope = v->scope;
        }
    }
    return m;
}

/* The deciding action for a destination mask; *rule gets the policy rule index (or POL_DEFAULT).
 * skb != 0: judged at egress, where comm is not known (such rules count as unverifiable).
 * exe: the bits of the rules whose exe holds for the caller (pol_exe_mask); exe_unknown: the bits
 * whose exe is not known here (egress without a noted socket: all), unverifiable like comm. Two
 * scalars, not a pointer that may be NULL: the verifier's paths through the rule loop stay few. */
static __always_inline u32 pol_eval(u32 gen, u64 mask, u32 uid, const u64 *comm, u64 exe, u64 exe_unknown,
                                    struct __sk_buff *skb, u32 *rule)
{
    struct pol_conf *c = pol_cfg(gen);
    if (!c)
        return POL_ALLOW;
    u64 scope = 0;
    u64 ctr = (c->flags & POL_CF_CTR) ? pol_ctr_mask(gen, skb, &scope) : 0;
    for (u32 i = 0; i < POL_MAX_RULES; i++) {
        /* Read each pass, not once before the loop: a bound kept in a register is narrowed by
         * every pass's compare, and the verifier then carries one loop state per narrowing. */
        if (i >= V32(c->nrules))
            break;
        u32 k = i;
        struct pol_rule2 *rr = pol_rules.lookup(&k);
        if (!rr)
            break;
        struct pol_rule *r = &rr->g[gen & 1];
        if (!(mask & (1ULL << (r->bit & 63))))
            continue;
        /* The rule's other keys, without a branch each (the verifier then walks one path through
         * them, not one per outcome): skip when a key does not hold; unsure when the kernel
         * cannot check it (comm at egress, an exe not known, a user-space-only key). */
        u64 f = r->flags, idx = r->index & 63;
        u64 skip = pol_flag(f, PR_UID) & pol_ne(r->uid, uid);
        u64 unsure = pol_flag(f, PR_USER_ONLY);
        if (comm)
            skip |= pol_flag(f, PR_COMM) & (pol_ne(comm[0], r->comm_lo) | pol_ne(comm[1], r->comm_hi));
        else
            unsure |= pol_flag(f, PR_COMM);
        skip |= pol_flag(f, PR_CTR) & (((ctr >> idx) & 1) ^ 1);
        u64 eu = (exe_unknown >> idx) & 1;
        unsure |= pol_flag(f, PR_EXE) & eu;
        skip |= pol_flag(f, PR_EXE) & (eu ^ 1) & (((exe >> idx) & 1) ^ 1);
        /* A rule with keys the kernel cannot check: never deny on it; an allow/audit stops here
         * (over-allowing is the safe side). */
        skip |= unsure & (pol_ne(r->action, POL_DENY) ^ 1);
        if (skip)
            continue;
        if (r->flags & PR_CGROUP) {  /* a helper call: only for a rule that holds otherwise */
            u64 id = skb ? bpf_skb_ancestor_cgroup_id(skb, r->cg_level)
                         : bpf_get_current_ancestor_cgroup_id(r->cg_level);
            if (id != r->cg_id)
                continue;
        }
        *rule = r->index;
        return r->action;
    }
    if (mask & (1ULL << POL_ANY_BIT)) {
        *rule = POL_DEFAULT;
        return c->dflt;
    }
    return POL_ALLOW;
}

/* A refused connect(): the destination is read again from ctx here, after the rule and budget
 * loops, so no address buffer (4 bytes or 16, by family) is carried through them. v6: the
 * program is pol_connect6 (ctx->user_ip6; an IPv4-mapped address is reported as IPv4). */
static __always_inline void pol_emit_connect(struct bpf_sock_addr *ctx, const int v6, u32 rule, u32 uid)
{
    struct pol_rec *r = pol_events.ringbuf_reserve(sizeof(struct pol_rec));
    if (!r) {
        pol_ring_full();
        return;
    }
    u64 pt = bpf_get_current_pid_tgid();
    r->ts_ns = bpf_ktime_get_ns();
    r->cgroup = bpf_get_current_cgroup_id();
    r->cookie = 0;
    r->pid = pt >> 32;
    r->tid = (u32)pt;
    r->uid = uid;
    r->rule = rule;
    r->point = POINT_CONNECT;
    r->dport = __builtin_bswap16((u16)ctx->user_port);
    __builtin_memset(r->daddr, 0, 16);
    if (v6) {
        u32 w[4];
        w[0] = ctx->user_ip6[0];
        w[1] = ctx->user_ip6[1];
        w[2] = ctx->user_ip6[2];
        w[3] = ctx->user_ip6[3];
        if (w[0] == 0 && w[1] == 0 && w[2] == __builtin_bswap32(0xffff)) {  /* ::ffff:a.b.c.d */
            r->family = 4;
            __builtin_memcpy(r->daddr, &w[3], 4);
        } else {
            r->family = 6;
            __builtin_memcpy(r->daddr, w, 16);
        }
    } else {
        u32 a = ctx->user_ip4;
        r->family = 4;
        __builtin_memcpy(r->daddr, &a, 4);
    }
    __builtin_memset(r->comm, 0, 16);
    __builtin_memset(r->exe, 0, POL_EXE_MAX);
    bpf_get_current_comm(r->comm, 16);
    u32 tgid = pt >> 32;
    struct pol_eproc *p = pol_exe_proc.lookup(&tgid);
    if (p)
        __builtin_memcpy(r->exe, p->path, POL_EXE_MAX);
    pol_events.ringbuf_submit(r, 0);
}

/* An address's mask: the policy's (catalog CIDRs, written by user space) and what DNS answers
 * received by sockets of this uid taught. */
static __always_inline u64 pol_addr4_mask(u32 gen, u32 uid, u32 addr)
{
    struct pol_lpm4 k = {64, gen & 1, addr};
    struct pol_lkey4 lk = {uid, addr, gen & 1};
    u64 *m = pol_addr4.lookup(&k);
    u64 *l = pol_learn4.lookup(&lk);
    return (m ? *m : 0) | (l ? *l : 0);
}

static __always_inline u64 pol_addr6_mask(u32 gen, u32 uid, const u8 *addr)
{
    struct pol_lpm6 k = {160, gen & 1};
    struct pol_lkey6 lk = {uid};
    lk.gen = gen & 1;
    __builtin_memcpy(k.addr, addr, 16);
    __builtin_memcpy(lk.addr, addr, 16);
    u64 *m = pol_addr6.lookup(&k);
    u64 *l = pol_learn6.lookup(&lk);
    return (m ? *m : 0) | (l ? *l : 0);
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

/* The caller's exe scope for budgets per exe: 64-bit FNV-1a over its exec'd filename as
 * pol_exe_proc holds it (busted.policy.budgets.scope_hash); 0 when the process is not known. */
static __always_inline u64 pol_exe_hash(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct pol_eproc *p = pol_exe_proc.lookup(&tgid);
    if (!p)
        return 0;
    u64 h = 0xcbf29ce484222325ULL;
    for (u32 i = 0; i < POL_EXE_MAX - 1; i++) {
        u8 c = p->path[i];
        if (!c)
            break;
        h = (h ^ c) * 0x100000001b3ULL;
    }
    return h;
}

/* 1 and *rule = POL_BUDGET_BASE + j when an exhausted budget holds this destination for the
 * caller; a mask without budget bits (the common case) costs one test. The scopes (exe hash,
 * container) are worked out once, before the loop, only when the mask has a budget bit and the
 * policy has a kernel budget of that kind (POL_CF_BEXE, POL_CF_BCTR); for each budget j the
 * first entry found (uid, cgroup, host, exe, container) decides: live until its window ends.
 * Worked out up front, not on first need: "done" flags carried through the loop made the verifier
 * walk it once per combination of them. */
static __always_inline int pol_budget_hit(u32 gen, u64 mask, u32 uid, u32 flags, u32 *rule)
{
    if (!(mask & POL_BUDGET_BITS))
        return 0;
    u64 exe = 0, ctr = 0;
    if (flags & POL_CF_BEXE)
        exe = pol_exe_hash();
    if (flags & POL_CF_BCTR)
        pol_ctr_mask(gen, 0, &ctr);
    u64 now = bpf_ktime_get_ns(), cg = bpf_get_current_cgroup_id();
    for (u32 j = 0; j < POL_MAX_BUDGETS; j++) {
        if (!(mask & (1ULL << (POL_BUDGET_TOP_BIT - j))))
            continue;
        struct pol_bkey k = {j, BK_UID, uid};
        u64 *until = pol_budget.lookup(&k);
        if (!until) {
            k.kind = BK_CGROUP;
            k.value = cg;
            until = pol_budget.lookup(&k);
        }
        if (!until) {
            k.kind = BK_HOST;
            k.value = 0;
            until = pol_budget.lookup(&k);
        }
        if (!until && exe) {
            k.kind = BK_EXE;
            k.value = exe;
            until = pol_budget.lookup(&k);
        }
        if (!until && ctr) {
            k.kind = BK_CONTAINER;
            k.value = ctr;
            until = pol_budget.lookup(&k);
        }
        if (until && now < *until) {
            *rule = POL_BUDGET_BASE + j;
            return 1;
        }
    }
    return 0;
}

/* The destination's mask (policy CIDRs and learned addresses) for this connect(). */
static __always_inline u64 pol_connect_mask(struct bpf_sock_addr *ctx, const int v6, u32 gen, u32 uid)
{
    if (!v6)
        return pol_addr4_mask(gen, uid, ctx->user_ip4);
    u32 w[4];
    w[0] = ctx->user_ip6[0];
    w[1] = ctx->user_ip6[1];
    w[2] = ctx->user_ip6[2];
    w[3] = ctx->user_ip6[3];
    if (w[0] == 0 && w[1] == 0 && w[2] == __builtin_bswap32(0xffff))  /* ::ffff:a.b.c.d */
        return pol_addr4_mask(gen, uid, w[3]);
    return pol_addr6_mask(gen, uid, (u8 *)w);
}

/* pol_connect4 and pol_connect6 are this one body (v6 a constant in each): one walk of the rule
 * and budget loops per program, whichever family or mapping the address has. */
static __always_inline int pol_connect(struct bpf_sock_addr *ctx, const int v6)
{
    if (ctx->type != BST_SOCK_STREAM)
        return 1;
    u32 *gp = pol_gen_ptr();
    if (!gp)
        return 1;
    u32 gen = *gp & 1;
    u32 uid = (u32)bpf_get_current_uid_gid();
    u64 mask = pol_connect_mask(ctx, v6, gen, uid);
    struct pol_conf *c = pol_cfg(gen);
    if (!c)
        return 1;
    if (!mask || (mask & (1ULL << POL_AMBIG_BIT))) {
        if (c->flags & POL_CF_EXE)  /* the SNI may decide: it will need the caller's exe */
            pol_note_sk_exe(ctx, gen, pol_exe_mask(gen));
        return 1;
    }
    if ((bpf_get_current_pid_tgid() >> 32) == c->own_tgid)
        return 1;
    u64 comm[2] = {};
    bpf_get_current_comm(comm, sizeof(comm));
    u64 exe = 0;
    if (c->flags & POL_CF_EXE)
        exe = pol_exe_mask(gen);
    u32 rule = 0;
    if (pol_eval(gen, mask, uid, comm, exe, 0, 0, &rule) != POL_DENY && !pol_budget_hit(gen, mask, uid, c->flags, &rule)) {
        if (c->flags & POL_CF_EXE)
            pol_note_sk_exe(ctx, gen, exe);
        return 1;
    }
    pol_emit_connect(ctx, v6, rule, uid);
    return 0;  /* connect() fails with EPERM */
}

int pol_connect4(struct bpf_sock_addr *ctx)
{
    return pol_connect(ctx, 0);
}

int pol_connect6(struct bpf_sock_addr *ctx)
{
    return pol_connect(ctx, 1);
}

/* The rule mask of the dotted name of length n (1..POL_DNS_NAME_MAX) whose byte k is at
 * b->nm[k % POL_NAME_MAX]: looked up by its last POL_NAME_MAX bytes, written backwards. The loop
 * is branch-free (arithmetic masks instead of ifs), so the verifier walks one path. */
static __always_inline u64 pol_name_mask(u32 gen, struct pol_buf *b, u32 n)
{
    struct pol_nkey *k = &b->key;
    k->prefixlen = 32 + POL_NAME_MAX * 8;
    k->gen = gen & 1;
    for (u32 i = 0; i < POL_NAME_MAX; i++) {
        /* The barriers keep the compiler from turning the masks back into compares and jumps
         * (a jump per byte is a fork per byte for the verifier: ~0.2 s of it for this loop). */
        u64 d = (u64)((s64)i - (s64)n);  /* negative (top bit set) if i < n */
        BARRIER_VAR(d);
        u64 live = -(d >> 63);           /* all ones if i < n */
        BARRIER_VAR(live);
        u64 c = b->nm[(n - 1 - i) & (POL_NAME_MAX - 1)] & live;
        u64 lo = c - 'A', hi = c - ('Z' + 1);
        BARRIER_VAR(lo);
        BARRIER_VAR(hi);
        u64 up = (hi >> 63) & ((lo >> 63) ^ 1);  /* 'A' <= c <= 'Z' */
        k->name[i] = (u8)(c | (up << 5));
    }
    u64 *m = pol_names.lookup(k);
    return m ? *m : 0;
}

static __always_inline void pol_learn_a4(u32 gen, u32 uid, u32 addr, u64 mask)
{
    struct pol_lkey4 k = {uid, addr, gen & 1};
    u64 v = mask;
    u64 *old = pol_learn4.lookup(&k);
    if (old && *old) {
        if ((*old & ~(1ULL << POL_AMBIG_BIT)) == mask)
            return;
        v = *old | mask | (1ULL << POL_AMBIG_BIT);
    }
    if (pol_learn4.update(&k, &v) != 0) {
        pol_count(4);
        return;
    }
    pol_count(2);
}

static __always_inline void pol_learn_a6(u32 gen, u32 uid, const u8 *addr, u64 mask)
{
    struct pol_lkey6 k = {uid};
    k.gen = gen & 1;
    __builtin_memcpy(k.addr, addr, 16);
    u64 v = mask;
    u64 *old = pol_learn6.lookup(&k);
    if (old && *old) {
        if ((*old & ~(1ULL << POL_AMBIG_BIT)) == mask)
            return;
        v = *old | mask | (1ULL << POL_AMBIG_BIT);
    }
    if (pol_learn6.update(&k, &v) != 0) {
        pol_count(4);
        return;
    }
    pol_count(2);
}

/* Ingress: a UDP datagram from port 53 for a socket in the scope, i.e. a DNS answer that really
 * arrived. Stage 1: copy it (first 512 bytes) and decode the question's name. */
int pol_dns_ingress(struct __sk_buff *skb)
{
    u8 ip[40];
    u32 ihl, proto;
    if (bpf_skb_load_bytes(skb, 0, ip, 20) != 0)
        return 1;
    if ((ip[0] >> 4) == 4) {
        ihl = (ip[0] & 0x0f) * 4;
        proto = ip[9];
    } else if ((ip[0] >> 4) == 6) {
        ihl = 40;
        proto = ip[6];
    } else {
        return 1;
    }
    if (proto != 17 || ihl < 20 || ihl > 60)
        return 1;
    u8 uh[4];
    if (bpf_skb_load_bytes(skb, ihl, uh, 4) != 0 || uh[0] != 0 || uh[1] != 53)
        return 1;
    u32 p = ihl + 8;
    if (skb->len <= p + 12)
        return 1;
    u32 n = skb->len - p;
    if (n > 512)
        n = 512;
    n = ((n - 1) & 511) + 1;
    u32 z = SCRATCH_DNS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    if (bpf_skb_load_bytes(skb, p, b->d, n) != 0)
        return 1;
    u8 *d = b->d;
    if (!(d[2] & 0x80) || (d[3] & 0x0f) != 0 || d[4] != 0 || d[5] != 1)
        return 1;  /* not a NOERROR response with one question */
    V32(b->an) = ((u32)d[6] << 8) | d[7];
    V32(b->n) = n;
    V32(b->uid) = bpf_get_socket_uid(skb);
    u32 *gp = pol_gen_ptr();
    if (!gp)
        return 1;
    u32 gen = *gp & 1;
    V32(b->gen) = gen;
    V64(b->mask) = 0;
    V32(b->stage) = 0;
    V32(b->a) = 0;
    V32(b->pos) = 12;
    pol_dns_tail.call(skb, TAIL_DNS_NAME);
    return 1;
}

/* Stage: decode the (possibly compressed) name at b->pos into b->nm, its length into b->nl and
 * the offset past it into b->nend; then its mask (stage TAIL_DNS_MASK). */
int pol_dns_name(struct __sk_buff *skb)
{
    u32 z = SCRATCH_DNS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    u32 n = V32(b->n);
    if (n > 512)
        return 1;
    V32(b->out) = 0;
    V32(b->left) = 0;
    V32(b->jumps) = 0;
    V32(b->nend) = 0;
    V32(b->bad) = 1;  /* until the root label is read */
    for (u32 i = 0; i < POL_DNS_NAME_MAX + 16; i++) {
        u32 pos = V32(b->pos);
        if (pos >= n)
            break;
        u8 c = b->d[pos & 511];
        u32 left = V32(b->left);
        u32 out = V32(b->out);
        if (left) {
            b->nm[out & (POL_NAME_MAX - 1)] = c;
            V32(b->out) = out + 1;
            V32(b->left) = left - 1;
            V32(b->pos) = pos + 1;
            continue;
        }
        if (c == 0) {
            if (!V32(b->nend))
                V32(b->nend) = pos + 1;
            V32(b->bad) = 0;
            break;
        }
        if ((c & 0xc0) == 0xc0) {
            u32 j = V32(b->jumps);
            if (j >= 8 || pos + 1 >= n)
                break;
            if (!V32(b->nend))
                V32(b->nend) = pos + 2;
            V32(b->jumps) = j + 1;
            V32(b->pos) = (((u32)c & 0x3f) << 8) | b->d[(pos + 1) & 511];
            continue;
        }
        if (c & 0xc0)
            break;
        if (out) {
            b->nm[out & (POL_NAME_MAX - 1)] = '.';
            out += 1;
        }
        if (out + c > POL_DNS_NAME_MAX)
            break;
        V32(b->out) = out;
        V32(b->left) = c;
        V32(b->pos) = pos + 1;
    }
    if (V32(b->bad))
        return 1;
    u32 out = V32(b->out);
    if (out == 0 || out > POL_DNS_NAME_MAX)
        return 1;
    V32(b->nl) = out;
    pol_dns_tail.call(skb, TAIL_DNS_MASK);
    return 1;
}

/* Stage: the decoded name's mask joins the answer's; then the answers. */
int pol_dns_mask(struct __sk_buff *skb)
{
    u32 z = SCRATCH_DNS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    u32 nl = V32(b->nl);
    if (nl == 0 || nl > POL_DNS_NAME_MAX)
        return 1;
    V64(b->mask) = V64(b->mask) | pol_name_mask(V32(b->gen), b, nl);
    if (V32(b->stage) == 0)
        V32(b->off) = V32(b->nend) + 4;  /* past the question's qtype, qclass */
    pol_dns_tail.call(skb, TAIL_DNS_ANSWERS);
    return 1;
}

/* Stage: answer b->a. A CNAME's target is decoded and judged (stage TAIL_DNS_NAME), so a chain
 * to a policy name marks the addresses that follow it; an A/AAAA record is learned with the mask
 * of the question and every CNAME target before it. Then the next answer. */
int pol_dns_answers(struct __sk_buff *skb)
{
    u32 z = SCRATCH_DNS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    u8 *d = b->d;
    u32 n = V32(b->n), a = V32(b->a);
    u64 mask = V64(b->mask);
    if (n > 512 || a >= V32(b->an) || a >= POL_ANSWERS_MAX)
        return 1;
    u32 off = V32(b->off);
    for (u32 j = 0; j < 8; j++) {  /* the owner name: labels, then 0 or a pointer */
        if (off >= n)
            return 1;
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
        return 1;
    u32 o = off & 511;
    u32 type = ((u32)d[o] << 8) | d[o + 1];
    u32 rdl = ((u32)d[o + 8] << 8) | d[o + 9];
    off += 10;
    if (off + rdl > n)
        return 1;
    o = off & 511;
    V32(b->off) = off + rdl;
    V32(b->a) = a + 1;
    if (type == 5) {
        V32(b->stage) = 1;
        V32(b->pos) = off;
        pol_dns_tail.call(skb, TAIL_DNS_NAME);
        return 1;
    }
    if (mask && type == 1 && rdl == 4) {
        u32 a4;
        __builtin_memcpy(&a4, &d[o], 4);
        pol_learn_a4(V32(b->gen), V32(b->uid), a4, mask);
    } else if (mask && type == 28 && rdl == 16) {
        u8 a6[16];
        __builtin_memcpy(a6, &d[o], 16);
        pol_learn_a6(V32(b->gen), V32(b->uid), a6, mask);
    }
    pol_dns_tail.call(skb, TAIL_DNS_ANSWERS);  /* the next answer (one program per answer) */
    return 1;
}

/* An egress segment's IP header into ip[40], its family (4/6) and IP header length (20..60) and
 * the first 16 bytes of its TCP header into th[16]; anything else (not IPv4/IPv6 TCP, unreadable)
 * passes (return 1). A macro, not a function: the verifier must see the bounds of ihl in the
 * caller's registers (a helper filling it through a pointer lost them: the program was refused).
 * pol_egress and policy_model.c's mdl_egress read a segment with it. */
#define POL_TCP_HEADERS(skb, ip, th, family, ihl)                       \
    u8 ip[40], th[16];                                                  \
    u32 ihl, family, ihl##_proto;                                       \
    if (bpf_skb_load_bytes(skb, 0, ip, 20) != 0)                        \
        return 1;                                                       \
    if ((ip[0] >> 4) == 4) {                                            \
        ihl = (ip[0] & 0x0f) * 4;                                       \
        ihl##_proto = ip[9];                                            \
        family = 4;                                                     \
    } else if ((ip[0] >> 4) == 6) {                                     \
        if (bpf_skb_load_bytes(skb, 0, ip, 40) != 0)                    \
            return 1;                                                   \
        ihl = 40;                                                       \
        ihl##_proto = ip[6];                                            \
        family = 6;                                                     \
    } else {                                                            \
        return 1;                                                       \
    }                                                                   \
    if (ihl##_proto != 6 || ihl < 20 || ihl > 60)                       \
        return 1;                                                       \
    if (bpf_skb_load_bytes(skb, ihl, th, 16) != 0)                      \
        return 1;

/* Egress: TLS ClientHellos. A segment that starts one, or continues one of this socket still
 * being reassembled, goes to pol_egress_hello; every data segment of a denied socket is dropped. */
int pol_egress(struct __sk_buff *skb)
{
    POL_TCP_HEADERS(skb, ip, th, family, ihl)
    u32 p = ihl + (th[12] >> 4) * 4;
    if (skb->len <= p)
        return 1;  /* no payload (ACK, SYN, FIN): nothing of a request */
    /* Every data segment of a socket whose hello was denied (its retransmissions, TLS 1.3 early
     * data) is dropped too. */
    u64 ck = bpf_get_socket_cookie(skb);
    if (pol_denied_sk.lookup(&ck))
        return 0;
    u32 seq = ((u32)th[4] << 24) | ((u32)th[5] << 16) | ((u32)th[6] << 8) | th[7];
    u32 plen = skb->len - p;
    u32 z = SCRATCH_TLS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    V32(b->reason) = 0;
    struct pol_hello *st = pol_hello.lookup(&ck);
    if (st) {
        s32 ahead = (s32)(st->next_seq - seq);
        if (ahead < 0) {
            V32(b->reason) = POL_R_GAP;  /* bytes of the hello we never saw */
        } else {
            if ((u32)ahead >= plen)
                return 1;  /* a retransmission of bytes already read (no whole SNI in them) */
            p += ahead;
            plen -= ahead;
        }
    } else {
        u8 h[6];
        if (bpf_skb_load_bytes(skb, p, h, 1) != 0 || h[0] != 0x16)
            return 1;  /* not a handshake record: the common case, decided with one map lookup */
        if (plen < 6 || bpf_skb_load_bytes(skb, p, h, 6) != 0) {
            V32(b->reason) = POL_R_MALFORMED;  /* a record header cut short */
        } else {
            if (h[1] != 3 || h[5] != 1)
                return 1;  /* a handshake, not a ClientHello */
            u32 zz = 0;
            struct pol_hello *zero = pol_hello_zero.lookup(&zz);
            if (!zero || pol_hello.update(&ck, zero) != 0) {
                V32(b->reason) = POL_R_NO_STATE;
            } else {
                st = pol_hello.lookup(&ck);
                if (!st)
                    V32(b->reason) = POL_R_NO_STATE;
                else
                    st->next_seq = seq;
            }
        }
    }
    V32(b->family) = family;
    V32(b->dport) = ((u32)th[2] << 8) | th[3];
    __builtin_memcpy(b->daddr, family == 4 ? &ip[16] : &ip[24], 16);
    V32(b->p) = p;
    V32(b->nl) = 0;
    if (V32(b->reason)) {
        pol_skb_tail.call(skb, TAIL_SKB_JUDGE);
        return 1;  /* the judge could not run: allow, never block by accident */
    }
    pol_skb_tail.call(skb, TAIL_SKB_HELLO);
    return 1;
}

/* Egress stage 2: append this segment's hello bytes (TLS record headers removed) to the socket's
 * pol_hello, then look for the SNI in what is there. Found: the judge decides. Not yet: the
 * segment holds no whole SNI and passes (the server cannot answer a partial hello). Past the
 * buffer, a gap or malformed: the judge applies the rule for hellos it cannot read. */
int pol_egress_hello(struct __sk_buff *skb)
{
    u32 z = SCRATCH_TLS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    u64 ck = bpf_get_socket_cookie(skb);
    struct pol_hello *st = pol_hello.lookup(&ck);
    if (!st)
        return 1;
    u32 p = V32(b->p), end = skb->len;
    u32 start = p;
    u32 reason = 0;
    for (u32 i = 0; i < 4; i++) {  /* at most 4 records per segment */
        if (p >= end)
            break;
        u32 left = st->rec_left;
        if (left == 0) {
            u8 rh[5];
            if (bpf_skb_load_bytes(skb, p & 0xffff, rh, 5) != 0 || rh[0] != 0x16 || rh[1] != 3) {
                reason = POL_R_MALFORMED;  /* the hello's record header cut or another record */
                break;
            }
            left = ((u32)rh[3] << 8) | rh[4];
            if (left == 0 || left > 16384) {
                reason = POL_R_MALFORMED;
                break;
            }
            p += 5;
            if (p >= end) {
                st->rec_left = left;
                break;
            }
        }
        u32 have = st->have;
        if (have >= POL_HELLO_BUF)
            break;
        u32 cnt = end - p;
        if (cnt > left)
            cnt = left;
        if (cnt > POL_HELLO_BUF - have)
            cnt = POL_HELLO_BUF - have;
        if (cnt == 0)
            break;
        cnt = ((cnt - 1) & (POL_HELLO_BUF - 1)) + 1;
        if (bpf_skb_load_bytes(skb, p & 0xffff, &st->buf[have & (POL_HELLO_BUF - 1)], cnt) != 0) {
            reason = POL_R_MALFORMED;
            break;
        }
        st->have = have + cnt;
        st->rec_left = left - cnt;
        p += cnt;
        if (cnt < left && p < end)
            break;  /* the buffer is full */
    }
    st->next_seq += end - start;
    if (reason) {
        V32(b->reason) = reason;
        pol_skb_tail.call(skb, TAIL_SKB_JUDGE);
        return 1;
    }
    pol_skb_tail.call(skb, TAIL_SKB_PARSE);
    return 1;
}

/* Egress stage 3: look for the SNI in the socket's reassembled hello. */
int pol_egress_parse(struct __sk_buff *skb)
{
    u32 z = SCRATCH_TLS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    u64 ck = bpf_get_socket_cookie(skb);
    struct pol_hello *st = pol_hello.lookup(&ck);
    if (!st)
        return 1;
    /* Walk the hello in st->buf[0..have): header (4), version (2), random (32), session id,
     * cipher suites, compression methods, extensions. */
    u8 *d = st->buf;
    u32 have = st->have;
    if (have > POL_HELLO_BUF)
        return 1;
    u32 full = have >= POL_HELLO_BUF;
    u32 hlen = 0, q = 38;
    if (have < 39)
        goto more;
    if (d[0] != 1) {
        V32(b->reason) = POL_R_MALFORMED;
        goto judge;
    }
    hlen = 4 + (((u32)d[1] << 16) | ((u32)d[2] << 8) | d[3]);
    q += 1 + d[q & (POL_HELLO_BUF - 1)];  /* session id */
    if (q + 2 > have)
        goto more;
    q += 2 + (((u32)d[q & (POL_HELLO_BUF - 1)] << 8) | d[(q + 1) & (POL_HELLO_BUF - 1)]);  /* suites */
    if (q + 1 > have)
        goto more;
    q += 1 + d[q & (POL_HELLO_BUF - 1)] + 2;  /* compression methods, extensions length */
    for (u32 i = 0; i < 32; i++) {
        if (q >= hlen)
            goto none;  /* the whole hello read: no server_name */
        if (q + 4 > have)
            goto more;
        u32 e0 = d[q & (POL_HELLO_BUF - 1)], e1 = d[(q + 1) & (POL_HELLO_BUF - 1)];
        u32 elen = ((u32)d[(q + 2) & (POL_HELLO_BUF - 1)] << 8) | d[(q + 3) & (POL_HELLO_BUF - 1)];
        if (e0 == 0 && e1 == 0) {  /* server_name: list len (2), type (1), name len (2), name */
            if (q + 9 > have)
                goto more;
            if (d[(q + 6) & (POL_HELLO_BUF - 1)] != 0) {
                V32(b->reason) = POL_R_MALFORMED;
                goto judge;
            }
            u32 nl = ((u32)d[(q + 7) & (POL_HELLO_BUF - 1)] << 8) | d[(q + 8) & (POL_HELLO_BUF - 1)];
            u32 s = q + 9;
            if (s + nl > have)
                goto more;
            V32(b->nl) = nl;
            V32(b->off) = s;
            pol_skb_tail.call(skb, TAIL_SKB_NAME);
            return 1;
        }
        q += 4 + elen;
    }
    V32(b->reason) = POL_R_TOO_BIG;  /* more extensions before server_name than we walk */
    goto judge;
none:
    pol_hello.delete(&ck);
    return 1;
more:
    if (!full)
        return 1;  /* the SNI is not whole yet: wait for the next segment */
    V32(b->reason) = POL_R_TOO_BIG;
judge:
    pol_skb_tail.call(skb, TAIL_SKB_JUDGE);
    return 1;
}

static __always_inline void pol_emit_tls(struct __sk_buff *skb, struct pol_buf *b, struct pol_hello *st,
                                         u32 rule, u32 uid, u64 ck, u32 verdict)
{
    struct pol_tls_rec *r = pol_events.ringbuf_reserve(sizeof(struct pol_tls_rec));
    if (!r) {
        pol_ring_full();
        return;
    }
    u64 pt = bpf_get_current_pid_tgid();
    r->r.ts_ns = bpf_ktime_get_ns();
    r->r.cgroup = bpf_skb_cgroup_id(skb);
    r->r.cookie = ck;
    r->r.pid = pt >> 32;
    r->r.tid = (u32)pt;
    r->r.uid = uid;
    r->r.rule = rule;
    r->r.point = POINT_TLS;
    r->r.family = V32(b->family);
    r->r.dport = V32(b->dport);
    __builtin_memcpy(r->r.daddr, b->daddr, 16);
    __builtin_memset(r->r.comm, 0, 16);
    r->x.reason = V32(b->reason);
    r->x.verdict = verdict;
    r->x.pad = 0;
    r->x.nl = 0;
    if (st && V32(b->nl)) {  /* the name as sent (user space cuts it at nl) */
        r->x.nl = V32(b->nl);
        __builtin_memcpy(r->x.name, &st->buf[V32(b->off) & (POL_HELLO_BUF - 1)], 256);
    } else {
        __builtin_memset(r->x.name, 0, 256);
    }
    pol_events.ringbuf_submit(r, 0);
}

/* Egress stage 4: the SNI at st->buf[b->off..+b->nl) as a name: one trailing dot dropped (the
 * fully qualified spelling names the same host), its last POL_NAME_MAX bytes into b->nm; a name
 * with NUL or non-ASCII bytes, an empty label at the end or over 255 bytes is unreadable. */
int pol_egress_name(struct __sk_buff *skb)
{
    u32 z = SCRATCH_TLS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    u64 ck = bpf_get_socket_cookie(skb);
    struct pol_hello *st = pol_hello.lookup(&ck);
    u32 nl = V32(b->nl), s = V32(b->off);
    if (!st || nl == 0 || nl > POL_HELLO_BUF)
        return 1;
    u8 *d = st->buf;
    if (nl > 1 && d[(s + nl - 1) & (POL_HELLO_BUF - 1)] == '.')
        nl -= 1;
    u64 bad = nl > POL_DNS_NAME_MAX || d[(s + nl - 1) & (POL_HELLO_BUF - 1)] == '.';
    u32 take = nl > POL_NAME_MAX ? POL_NAME_MAX : nl;
    u32 from = nl - take;
    for (u32 k = 0; k < POL_NAME_MAX; k++) {
        /* Branch-free (the barriers keep it so): a compare and jump on k < take here forked the
         * verifier's walk once per byte, and the forks each walked the rest of the loop. */
        u64 dk = (u64)((s64)k - (s64)take);
        BARRIER_VAR(dk);
        u64 valid = dk >> 63;  /* k < take */
        u64 c = d[(s + from + k) & (POL_HELLO_BUF - 1)];
        b->nm[(from + k) & (POL_NAME_MAX - 1)] = (u8)c;
        u64 c1 = c - 1;
        BARRIER_VAR(c1);
        bad |= valid & ((c >> 7) | (c1 >> 63));  /* >= 0x80 or NUL */
    }
    V32(b->nl) = nl;
    if (bad)
        V32(b->reason) = POL_R_MALFORMED;
    pol_skb_tail.call(skb, TAIL_SKB_JUDGE);
    return 1;
}

/* Egress stage 5: judge the SNI, or apply the rule for a hello that could not be read
 * (b->reason): drop it when its address is ambiguous or denied to this socket's owner, else let
 * it pass; reported either way. A verdict acts on this socket only (its cookie). */
int pol_egress_judge(struct __sk_buff *skb)
{
    u32 z = SCRATCH_TLS;
    struct pol_buf *b = pol_scratch.lookup(&z);
    if (!b)
        return 1;
    u32 *gp = pol_gen_ptr();
    if (!gp)
        return 1;
    u32 gen = *gp & 1;
    struct pol_conf *c = pol_cfg(gen);
    if (c && (bpf_get_current_pid_tgid() >> 32) == c->own_tgid)
        return 1;
    u64 ck = bpf_get_socket_cookie(skb);
    struct pol_hello *st = pol_hello.lookup(&ck);
    u32 uid = bpf_get_socket_uid(skb);
    u32 rule = POL_DEFAULT;
    u32 drop;
    /* The exe of the process that connected this socket, if noted in this generation: exe rules
     * then hold here as at connect; otherwise they are unknown (a deny with exe does not act). */
    u64 ex = 0, ex_unknown = ~0ULL;
    struct pol_skexe *se = pol_sk_exe.lookup(&ck);
    if (se && se->gen == gen) {
        ex = se->mask;
        ex_unknown = 0;
    }
    /* Through map memory: read back as unknown scalars, so the verifier walks one path through
     * pol_eval instead of one per constant. */
    V64(b->exe) = ex;
    V64(b->exe_unknown) = ex_unknown;
    /* The destination's mask: the address's for a hello that could not be read (b->reason), the
     * SNI's otherwise. Through map memory too, and one pol_eval after both: one walk of it. */
    if (V32(b->reason)) {
        pol_count(1);
        if (V32(b->family) == 4) {
            u32 a4;
            __builtin_memcpy(&a4, b->daddr, 4);
            V64(b->mask) = pol_addr4_mask(gen, uid, a4);
        } else {
            V64(b->mask) = pol_addr6_mask(gen, uid, b->daddr);
        }
    } else {
        u32 nl = V32(b->nl);
        if (nl == 0 || nl > POL_DNS_NAME_MAX)
            return 1;
        V64(b->mask) = pol_name_mask(gen, b, nl);
    }
    u64 mask = V64(b->mask);
    u32 act = mask ? pol_eval(gen, mask, uid, 0, V64(b->exe), V64(b->exe_unknown), skb, &rule) : POL_ALLOW;
    if (V32(b->reason)) {
        drop = (V64(b->mask) & (1ULL << POL_AMBIG_BIT)) || act == POL_DENY;
        if (!drop)
            rule = POL_DEFAULT;
    } else {
        if (act != POL_DENY) {
            pol_hello.delete(&ck);  /* judged: later segments pass without a look */
            return 1;
        }
        drop = 1;
    }
    BARRIER_VAR(drop);
    if (drop) {
        if (pol_denied_sk.update(&ck, &rule) != 0)
            pol_count(5);
        else
            pol_count(0);
    }
    pol_emit_tls(skb, b, st, rule, uid, ck, drop ? POL_V_DROP : POL_V_PASS);
    pol_hello.delete(&ck);
    return drop ? 0 : 1;
}

/* A new cgroup (any hierarchy): its id and path to user space, which adds it to pol_ctr when it is
 * the top cgroup of a container a rule names (busted/classify/containers.py parses the path), so
 * a container started after the policy loaded is covered (sent whatever the policy: a reload that
 * brings container rules must not miss one made during its cgroupfs walk). Why this hook: the tracepoint's arguments carry the id and path (R0), at creation, before
 * any process can be moved in. */
TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
    struct pol_tls_rec *r = pol_events.ringbuf_reserve(sizeof(struct pol_tls_rec));
    if (!r) {
        pol_ring_full();
        return 0;
    }
    __builtin_memset(&r->r, 0, sizeof(r->r));
    r->r.ts_ns = bpf_ktime_get_ns();
    r->r.point = POINT_CGROUP;
    r->r.cookie = args->id;
    r->r.uid = (u32)args->root;
    r->x.reason = 0;
    r->x.verdict = 0;
    r->x.pad = 0;
    u32 loc = (u32)args->data_loc_path;
    long n = bpf_probe_read_kernel_str(r->x.name, sizeof(r->x.name), (void *)args + (loc & 0xFFFF));
    r->x.nl = n > 0 ? (u32)n - 1 : 0;
    pol_events.ringbuf_submit(r, 0);
    return 0;
}

/* A removed cgroup leaves pol_ctr (ids are not reused): the map holds live containers only. */
TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
    struct pol_ckey k = {args->id, 0, 0};
    pol_ctr.delete(&k);
    k.gen = 1;
    pol_ctr.delete(&k);
    return 0;
}

/* sock_ops: make a socket whose hello pol_egress dropped fail fast. A dropped segment is never
 * "in flight", so TCP retries it from its probe timer, not the retransmission timer; the header
 * option callback runs at each try, and there the socket gets TCP_USER_TIMEOUT = 1 ms, so the next
 * timer aborts it (ETIMEDOUT). The callback is asked for at connect and given up after the first
 * few data segments (the hello is past by then), so established flows pay nothing. The state
 * callback stays: at close the socket's pol_denied_sk, pol_hello and pol_sk_exe entries go. */
int pol_sockops(struct bpf_sock_ops *ops)
{
    u32 op = ops->op;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    }
    if (op == BPF_SOCK_OPS_HDR_OPT_LEN_CB) {
        u64 ck = bpf_get_socket_cookie(ops);
        if (pol_denied_sk.lookup(&ck)) {
            int ms = 1;
            bpf_setsockopt(ops, 6 /* SOL_TCP */, 18 /* TCP_USER_TIMEOUT */, &ms, sizeof(ms));
            bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
        } else if (ops->data_segs_out > 8) {
            bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
        }
        return 1;
    }
    if (op == BPF_SOCK_OPS_STATE_CB && ops->args[1] == BPF_TCP_CLOSE) {
        u64 ck = bpf_get_socket_cookie(ops);
        pol_denied_sk.delete(&ck);
        pol_hello.delete(&ck);
        pol_sk_exe.delete(&ck);
    }
    return 1;
}
