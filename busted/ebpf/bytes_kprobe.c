/* Bytes tier "kprobe": tcp_sendmsg()/tcp_recvmsg() return values, for kernels that have neither
 * the sock:* length tracepoints nor usable syscall tracepoints. Both run in the caller's context;
 * the socket pointer (first argument) is only a key. Compile-tested where kprobes are missing.
 */
#include <uapi/linux/ptrace.h>  /* PT_REGS_* for kprobe contexts */

static __always_inline void hook_connect_start(u64 sk, struct flow *f) {}
static __always_inline void hook_passive_established(u64 sk, struct flow *f) {}
static __always_inline void hook_flow_end(u64 sk, struct flow *f) {}

BPF_HASH(kp_io, u32, u64, 4096);   /* tid -> socket pointer of the call in flight */

static __always_inline void kp_io_enter(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 sk = PT_REGS_PARM1(ctx);
    kp_io.update(&tid, &sk);
}

static __always_inline void kp_io_exit(struct pt_regs *ctx, int is_send)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *skp = kp_io.lookup(&tid);
    if (!skp)
        return;
    u64 sk = *skp;
    kp_io.delete(&tid);
    long ret = PT_REGS_RC(ctx);
    if (ret <= 0)
        return;
    struct flow *f = flows.lookup(&sk);
    if (f)
        flow_count(f, ret, is_send);
}

int bst_kp_send_in(struct pt_regs *ctx) { kp_io_enter(ctx); return 0; }
int bst_kp_send_out(struct pt_regs *ctx) { kp_io_exit(ctx, 1); return 0; }
int bst_kp_recv_in(struct pt_regs *ctx) { kp_io_enter(ctx); return 0; }
int bst_kp_recv_out(struct pt_regs *ctx) { kp_io_exit(ctx, 0); return 0; }
