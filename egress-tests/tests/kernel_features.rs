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

/// The kernel memory of every map this process holds (the `memlock` of each map fd's fdinfo):
/// what the datapath costs, charged to the controller's memory cgroup. Each map as (memlock,
/// name, type, max_entries), by map id (a map held by two fds counted once).
fn maps_memlock() -> std::collections::BTreeMap<u32, (u64, String)> {
    let mut maps = std::collections::BTreeMap::new();
    for fd in std::fs::read_dir("/proc/self/fdinfo").expect("fdinfo") {
        let Ok(info) = std::fs::read_to_string(fd.expect("fd").path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        let id: u32 = id.parse().expect("map_id");
        let name = aya::maps::MapInfo::from_id(id)
            .ok()
            .and_then(|m| m.name_as_str().map(str::to_string))
            .unwrap_or_default();
        let what = format!(
            "{name} (type {}, {} entries)",
            field("map_type:").unwrap_or_default(),
            field("max_entries:").unwrap_or_default()
        );
        maps.insert(id, (memlock.parse().expect("memlock"), what));
    }
    maps
}

/// Per-CPU maps are preallocated for every *possible* CPU: on a many-core host (or a VM booted
/// with `maxcpus`, as `cargo xtask test --kernels --possible-cpus N` does) the flow table is
/// sized down so the datapath's kernel memory stays bounded, and per-CPU counters are still
/// read across every possible CPU.
#[test]
fn the_datapath_memory_stays_bounded_with_many_possible_cpus() {
    let cpus = aya::util::nr_cpus().expect("possible CPUs");
    let before = maps_memlock();
    let policy = egress::policy::Policy::parse(
        "memory.toml",
        "[[service]]\nname = \"x\"\ndestinations = [\"10.0.0.0/8\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let compiled =
        egress::policy::compile::CompiledPolicy::compile(&policy).unwrap_or_else(|e| panic!("{e}"));
    let dp = egress::datapath::Datapath::load(&compiled)
        .unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"));
    let flows = dp
        .map_fill()
        .into_iter()
        .find(|m| m.map == "flows")
        .expect("the flow table");
    assert_eq!(
        flows.capacity,
        egress::datapath::flows_capacity(cpus),
        "{cpus} possible CPUs"
    );
    let mut maps: Vec<(u64, String)> = maps_memlock()
        .into_iter()
        .filter(|(id, _)| !before.contains_key(id))
        .map(|(_, m)| m)
        .collect();
    maps.sort();
    let used: u64 = maps.iter().map(|(m, _)| m).sum();
    eprintln!(
        "{cpus} possible CPUs: {} flows, the datapath's maps hold {} MiB; the largest:",
        flows.capacity,
        used >> 20
    );
    for (memlock, what) in maps.iter().rev().take(8) {
        eprintln!("  {:>6} KiB {what}", memlock >> 10);
    }
    // The flow table's entries are preallocated with counters for every possible CPU: within
    // its 32 MiB budget plus the entries' own 100-odd bytes, whatever the number of CPUs.
    let flows_memlock: u64 = maps
        .iter()
        .filter(|(_, what)| what.starts_with("FLOWS "))
        .map(|(m, _)| m)
        .sum();
    assert!(
        flows_memlock > 0 && flows_memlock < 40 << 20,
        "{cpus} possible CPUs: the flow table holds {} KiB",
        flows_memlock >> 10
    );
    // From Linux 6.4 fdinfo's memlock is what each map really uses (before, a map that is not
    // preallocated, as the policy tries and rule sets, reports max_entries times its entry,
    // hundreds of MiB it never allocates). 2 possible CPUs: about 70 MiB (owners, both range
    // tables, the flow table).
    let (major, minor) = release();
    if (major, minor) >= (6, 4) {
        assert!(
            used < 112 << 20,
            "{cpus} possible CPUs: the datapath's maps hold {} MiB",
            used >> 20
        );
    }
    // The per-CPU counters are read across every possible CPU.
    dp.stats().expect("reading the per-CPU counters");
}
