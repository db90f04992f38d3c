//! egress datapath: thin entry points only. The decision lives in `sock_addr.rs` (reading the
//! hook context, emitting events) and `policy.rs` (map lookups); `fork.rs` follows what blocked
//! processes create; socket owners (recorded, forgotten) in `owners.rs`; byte accounting in `skb_egress.rs`
//! (sockets with an owner) and `tc_egress.rs` (the rest); DNS steering and grants
//! in `dns.rs`; break-glass exceptions in `exception.rs`; every map is in `maps.rs`.
// Host builds (`cargo clippy --workspace`, `cargo test --workspace`) compile this crate as an
// empty program; only the bpfel build carries the hooks' sections into the object.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod dns;
mod exception;
mod exec;
mod fork;
mod maps;
mod owners;
mod policy;
mod report;
mod scope;
mod skb_egress;
mod sock_addr;
mod sock_create;
mod sockopt;
mod tc_egress;

use aya_ebpf::{
    macros::{
        cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, classifier, raw_tracepoint,
        sock_ops, tracepoint,
    },
    programs::{
        RawTracePointContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext,
        SockoptContext, TcContext, TracePointContext,
    },
};
use egress_common::{HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6};

/// TCP connect() and connected UDP on AF_INET sockets.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    sock_addr::decide_v4(&ctx, HOOK_CONNECT4)
}

/// connect() on AF_INET6 sockets, including v4-mapped destinations.
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    sock_addr::decide_v6(&ctx, HOOK_CONNECT6)
}

/// Unconnected UDP sendto()/sendmsg() on AF_INET sockets.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr::decide_v4(&ctx, HOOK_SENDMSG4)
}

/// Unconnected UDP sendto()/sendmsg() on AF_INET6 sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr::decide_v6(&ctx, HOOK_SENDMSG6)
}

/// recvfrom()/recvmsg() on AF_INET UDP sockets: answers of the DNS proxy show the server asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::restore_v4(&ctx)
}

/// recvfrom()/recvmsg() on AF_INET6 UDP sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::restore_v6(&ctx)
}

/// getpeername() on AF_INET sockets steered to the DNS proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    dns::restore_v4(&ctx)
}

/// getpeername() on AF_INET6 sockets steered to the DNS proxy.
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    dns::restore_v6(&ctx)
}

/// socket(): refuses the sockets `[sockets]` does not allow.
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    sock_create::sock_create(&ctx)
}

/// close() of a socket's last reference: forgets its owner (TCP sockets still sending: at
/// TCP_CLOSE, below).
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    owners::released(&ctx)
}

/// TCP sockets: forgets a socket's owner when it reaches TCP_CLOSE.
#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    owners::sock_ops(&ctx)
}

/// setsockopt(): refuses source routes and routing headers.
#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    sockopt::setsockopt(&ctx)
}

/// Every task created on the host (`task/task_newtask`): records the processes that blocked
/// processes create, so that their blocks cover them.
#[tracepoint]
pub fn track_fork(ctx: TracePointContext) -> u32 {
    fork::task_newtask(&ctx)
}

/// Every exec on the host (`sched_process_exec`): records what the process now runs, for the
/// `executables` selectors.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn track_exec(ctx: RawTracePointContext) -> i32 {
    exec::sched_process_exec(&ctx)
}

/// Every IP packet a socket of the cgroup sends, in its own network namespace: byte accounting per
/// owner and destination. Never drops.
#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    skb_egress::count(&ctx)
}

/// TC egress: byte accounting of packets without a recorded owner; budget drops; drops
/// unattributed traffic to blocked destinations.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    tc_egress::classify(&ctx)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
