//! What can go wrong in the datapath, by kind, with the map, program, cgroup or interface named.

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    /// The kernel's verifier refused a program: the end of its log, not the whole dump (which
    /// is logged at debug level).
    #[error(
        "the kernel's verifier (Linux {kernel}) refused eBPF program `{name}`: {errno}: {summary} (the whole verifier log is logged with RUST_LOG=egress=debug; README's kernel table lists the kernels this build loads on)"
    )]
    Verifier {
        name: &'static str,
        kernel: String,
        errno: std::io::Error,
        summary: String,
    },
    /// The running kernel lacks a feature the datapath needs (see `features`).
    #[error("{0}")]
    KernelFeature(String),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("interface {iface}: {message}")]
    Iface { iface: String, message: String },
    #[error("pinning: {0}")]
    Pin(String),
    #[error("turning on the kernel's BPF run-time statistics (BPF_ENABLE_STATS, Linux 5.8+): {0}")]
    Stats(#[source] aya::sys::SyscallError),
    #[error("the kernel's log ring (aya-log): {0}")]
    KernelLog(#[from] aya_log::Error),
    #[error("tracepoint {0}")]
    Tracepoint(String),
    /// The kernel's BTF is missing or lacks a member the exec tracker reads.
    #[error("kernel BTF: {0}")]
    Btf(String),
    #[error(
        "policy too large: {v4} IPv4 and {v6} IPv6 prefixes, {rulesets} rule sets (at most 4194304 prefixes per family and 65536 rule sets)"
    )]
    TooLarge {
        v4: usize,
        v6: usize,
        rulesets: usize,
    },
}
