//! Real-kernel test of the feature probes run before the datapath loads: on the running kernel
//! (the host's, or Debian's 6.1 and 6.12 in `cargo xtask test --kernels`), nothing required is
//! missing, and what is degraded matches the kernel's version as read here, independently of
//! aya: no TCX before 6.6, nothing degraded from 6.6 on.

use egress::datapath::features::{self, FEATURES, Need};

/// (major, minor) from /proc/sys/kernel/osrelease, e.g. "6.1.0-56-amd64" -> (6, 1).
fn release() -> (u32, u32) {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("reading osrelease");
    let mut parts = text.trim().split(['.', '-']);
    let major = parts
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a major version");
    let minor = parts
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a minor version");
    (major, minor)
}

#[test]
fn the_running_kernel_has_every_required_feature() {
    let report = features::probe();
    if let Some(refusal) = report.refusal() {
        panic!("the datapath would be refused here: {refusal}");
    }
    assert_eq!(report.results.len(), FEATURES.len());
    let required = report
        .results
        .iter()
        .filter(|(f, _)| f.need == Need::Required)
        .count();
    assert!(required >= 10, "{required} required features probed");
}

#[test]
fn what_is_degraded_matches_the_kernel_version() {
    let (major, minor) = release();
    let degraded = features::probe().degraded();
    let tcx = degraded.iter().any(|d| d.contains("TCX"));
    assert_eq!(
        tcx,
        (major, minor) < (6, 6),
        "kernel {major}.{minor}: degraded = {degraded:?}"
    );
    let ping = degraded.iter().any(|d| d.contains("ping sockets"));
    assert_eq!(ping, (major, minor) < (5, 19), "{degraded:?}");
    if (major, minor) >= (6, 6) {
        assert!(degraded.is_empty(), "{degraded:?}");
    }
}
