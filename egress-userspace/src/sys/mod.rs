//! The host, as the controller sees it: the cgroup2 hierarchy, network interfaces, processes in
//! /proc, tracepoint formats in tracefs, the boot clock, sock_diag and user names (NSS); and the
//! service manager (`notify`: sd_notify and the watchdog; `journal`: whether stderr is the
//! journal). Thin wrappers over the kernel's interfaces (through `rustix` and `procfs`), with no
//! policy in them.

pub mod cgroup;
pub mod clock;
pub mod iface;
pub mod journal;
pub mod notify;
pub mod nss;
pub mod proc;
pub mod sockdiag;
pub mod tracefs;
