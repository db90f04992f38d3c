//! The kernel features the datapath needs, probed before anything is loaded: a kernel without
//! one that is required is refused with its name and the Linux version that has it (not a
//! verifier dump); one whose absence only degrades something is logged as a warning and listed
//! by [`FeatureReport::degraded`].
//!
//! Probes ask the kernel itself (aya's feature probes load a tiny program or create a tiny map)
//! where that is possible; attach types and TCX are judged by the kernel version.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};

/// How a feature is checked.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    Program(ProgramType),
    Map(MapType),
    /// A helper, callable from sock_addr programs.
    Helper(BpfHelper),
    /// At least this kernel version (major, minor).
    Version(u32, u32),
}

/// What the datapath loses without a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// No enforcement without it: refused at start.
    Required,
    /// Enforcement works; this is what is lost.
    Degraded(&'static str),
}

#[derive(Debug, Clone, Copy)]
pub struct Feature {
    pub name: &'static str,
    /// The first Linux version with it.
    pub since: &'static str,
    /// What the datapath uses it for.
    pub used_for: &'static str,
    pub check: Check,
    pub need: Need,
}

/// Every feature checked, in the order a refusal lists them.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "cgroup sock_addr programs (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
        since: "4.17",
        used_for: "connect, sendmsg, recvmsg and getpeername decisions",
        check: Check::Program(ProgramType::CgroupSockAddr),
        need: Need::Required,
    },
    Feature {
        name: "cgroup sockopt programs (BPF_PROG_TYPE_CGROUP_SOCKOPT)",
        since: "5.3",
        used_for: "refusing source routes (setsockopt)",
        check: Check::Program(ProgramType::CgroupSockopt),
        need: Need::Required,
    },
    Feature {
        name: "cgroup sock programs (BPF_PROG_TYPE_CGROUP_SOCK)",
        since: "4.10",
        used_for: "[sockets] rules at socket creation and socket-owner cleanup",
        check: Check::Program(ProgramType::CgroupSock),
        need: Need::Required,
    },
    Feature {
        name: "sock_ops programs (BPF_PROG_TYPE_SOCK_OPS)",
        since: "4.13",
        used_for: "forgetting TCP sockets' owners at close",
        check: Check::Program(ProgramType::SockOps),
        need: Need::Required,
    },
    Feature {
        name: "cgroup skb programs (BPF_PROG_TYPE_CGROUP_SKB)",
        since: "4.10",
        used_for: "per-owner byte accounting",
        check: Check::Program(ProgramType::CgroupSkb),
        need: Need::Required,
    },
    Feature {
        name: "TC classifier programs (BPF_PROG_TYPE_SCHED_CLS)",
        since: "4.1",
        used_for: "the TC egress program on interfaces",
        check: Check::Program(ProgramType::SchedClassifier),
        need: Need::Required,
    },
    Feature {
        name: "raw tracepoint programs (BPF_PROG_TYPE_RAW_TRACEPOINT)",
        since: "4.17",
        used_for: "the exec tracker (program identity)",
        check: Check::Program(ProgramType::RawTracePoint),
        need: Need::Required,
    },
    Feature {
        name: "the BPF ring buffer (BPF_MAP_TYPE_RINGBUF)",
        since: "5.8",
        used_for: "decision events",
        check: Check::Map(MapType::RingBuf),
        need: Need::Required,
    },
    Feature {
        name: "the bpf_loop helper",
        since: "5.17",
        used_for: "the rule scan and the range-table search within the verifier's limits",
        check: Check::Helper(BpfHelper::BPF_FUNC_loop),
        need: Need::Required,
    },
    Feature {
        name: "the bpf_get_netns_cookie helper in sock_addr programs",
        since: "5.7",
        used_for: "steering DNS to the proxy per network namespace",
        check: Check::Helper(BpfHelper::BPF_FUNC_get_netns_cookie),
        need: Need::Required,
    },
    Feature {
        name: "the bpf_ktime_get_boot_ns helper",
        since: "5.8",
        used_for: "DNS grant expiry and event time stamps",
        check: Check::Helper(BpfHelper::BPF_FUNC_ktime_get_boot_ns),
        need: Need::Required,
    },
    Feature {
        name: "the bpf_get_current_ancestor_cgroup_id helper",
        since: "5.6",
        used_for: "per-cgroup scopes",
        check: Check::Helper(BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id),
        need: Need::Required,
    },
    Feature {
        name: "the getpeername and sock_release cgroup hooks",
        since: "5.9",
        used_for: "hiding DNS steering from getpeername, and socket-owner cleanup",
        check: Check::Version(5, 9),
        need: Need::Required,
    },
    Feature {
        name: "cgroup sock_addr hooks for ping sockets",
        since: "5.19",
        used_for: "judging ICMP echo sent from ping sockets at connect/sendmsg",
        check: Check::Version(5, 19),
        need: Need::Degraded(
            "ping sockets are judged by the TC program and `[sockets]` only, not at connect/sendmsg",
        ),
    },
    Feature {
        name: "TCX links (BPF_LINK_TYPE_TCX)",
        since: "6.6",
        used_for: "attaching the TC program as a pinnable link",
        check: Check::Version(6, 6),
        need: Need::Degraded(
            "TC is attached as a clsact filter, not a pinned link: a clean stop detaches it, so TC neither counts nor enforces while no controller runs (the cgroup hooks stay pinned); a killed controller's filter stays until the next start replaces it",
        ),
    },
];

/// Whether this kernel attaches TC programs as TCX links (6.6+), else as clsact filters.
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// What `egress status` says of the running kernel: its release and what is degraded on it.
/// Probed once per process (the kernel does not change under it).
pub fn kernel_status() -> crate::report::KernelStatus {
    static STATUS: std::sync::OnceLock<crate::report::KernelStatus> = std::sync::OnceLock::new();
    STATUS
        .get_or_init(|| {
            let release = rustix::system::uname()
                .release()
                .to_string_lossy()
                .into_owned();
            let report = probe();
            crate::report::KernelStatus {
                release,
                tc_attach: if has_tcx() { "tcx" } else { "clsact" }.into(),
                degraded: report.degraded(),
                missing: report
                    .missing()
                    .iter()
                    .map(|f| format!("{} (Linux {}+)", f.name, f.since))
                    .collect(),
            }
        })
        .clone()
}

/// The outcome of probing every feature.
#[derive(Debug, Clone)]
pub struct FeatureReport {
    /// The running kernel's version, when it could be read.
    pub kernel: Option<String>,
    /// Each feature with whether the kernel has it.
    pub results: Vec<(Feature, bool)>,
}

fn has(check: Check, version: Option<KernelVersion>) -> bool {
    match check {
        // A probe that cannot decide is not a refusal: the load itself will say.
        Check::Program(t) => is_program_supported(t).unwrap_or(true),
        Check::Map(t) => is_map_supported(t).unwrap_or(true),
        Check::Helper(h) => is_helper_supported(ProgramType::CgroupSockAddr, h).unwrap_or(true),
        Check::Version(major, minor) => {
            version.is_none_or(|v| v >= KernelVersion::new(major as u8, minor as u8, 0))
        }
    }
}

/// Probes the running kernel.
pub fn probe() -> FeatureReport {
    let version = KernelVersion::current().ok();
    FeatureReport {
        kernel: version.map(|v| v.to_string()),
        results: FEATURES
            .iter()
            .map(|f| (*f, has(f.check, version)))
            .collect(),
    }
}

impl FeatureReport {
    /// The required features the kernel lacks.
    pub fn missing(&self) -> Vec<&Feature> {
        self.results
            .iter()
            .filter(|(f, ok)| !ok && f.need == Need::Required)
            .map(|(f, _)| f)
            .collect()
    }

    /// What is degraded on this kernel, one line each.
    pub fn degraded(&self) -> Vec<String> {
        self.results
            .iter()
            .filter(|(_, ok)| !ok)
            .filter_map(|(f, _)| match f.need {
                Need::Degraded(what) => Some(format!("no {} (Linux {}+): {what}", f.name, f.since)),
                Need::Required => None,
            })
            .collect()
    }

    /// The refusal when a required feature is missing: every missing one, with the Linux
    /// version that has it and what it is for.
    pub fn refusal(&self) -> Option<String> {
        let missing = self.missing();
        if missing.is_empty() {
            return None;
        }
        let list: Vec<String> = missing
            .iter()
            .map(|f| format!("{} (Linux {}+, for {})", f.name, f.since, f.used_for))
            .collect();
        Some(format!(
            "this kernel ({}) lacks what the datapath needs: {}; egress needs Linux 5.17 or later with these enabled",
            self.kernel.as_deref().unwrap_or("version unknown"),
            list.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(missing: &[&str]) -> FeatureReport {
        FeatureReport {
            kernel: Some("5.15.0".into()),
            results: FEATURES
                .iter()
                .map(|f| (*f, !missing.iter().any(|m| f.name.contains(m))))
                .collect(),
        }
    }

    #[test]
    fn a_complete_kernel_is_neither_refused_nor_degraded() {
        let r = report(&[]);
        assert!(r.refusal().is_none());
        assert!(r.degraded().is_empty());
    }

    #[test]
    fn a_kernel_without_bpf_loop_is_refused_by_name_and_version() {
        let r = report(&["bpf_loop", "TCX"]);
        let msg = r.refusal().expect("refused");
        assert!(msg.contains("this kernel (5.15.0)"), "{msg}");
        assert!(
            msg.contains("the bpf_loop helper (Linux 5.17+, for the rule scan"),
            "{msg}"
        );
        assert!(
            !msg.contains("TCX"),
            "a degraded feature is no refusal: {msg}"
        );
        assert_eq!(r.degraded().len(), 1);
        assert!(r.degraded()[0].starts_with(
            "no TCX links (BPF_LINK_TYPE_TCX) (Linux 6.6+): TC is attached as a clsact filter"
        ));
    }

    #[test]
    fn every_missing_required_feature_is_listed() {
        let msg = report(&["RINGBUF", "SOCKOPT"]).refusal().expect("refused");
        assert!(
            msg.contains("BPF_PROG_TYPE_CGROUP_SOCKOPT) (Linux 5.3+"),
            "{msg}"
        );
        assert!(msg.contains("BPF_MAP_TYPE_RINGBUF) (Linux 5.8+"), "{msg}");
    }

    #[test]
    fn version_checks_compare_major_and_minor() {
        let v61 = Some(KernelVersion::new(6, 1, 192));
        assert!(!has(Check::Version(6, 6), v61));
        assert!(has(Check::Version(5, 19), v61));
        assert!(has(Check::Version(6, 1), v61));
        assert!(has(
            Check::Version(6, 6),
            Some(KernelVersion::new(6, 12, 0))
        ));
    }
}
