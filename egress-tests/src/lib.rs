//! The one test harness of egress, shared by every real-kernel and end-to-end test in `tests/`
//! and by `egress-bench` (the shape of aya's `test/integration-test` crate).
//!
//! Everything it makes belongs to the test and is removed on drop, also when the test panics:
//! temporary directories ([`TempDir`]), child cgroups of the cgroup2 root ([`TestCgroup`], never
//! the root itself), network namespaces ([`LoopNs`], [`NetPair`]), traffic sinks inside them
//! ([`sinks`]), child processes ([`ChildGuard`]) and controllers ([`Egress`]: `egress run` or
//! `exec` started inside a test namespace, stopped on drop, its pins removed). Traffic goes to
//! loopback or to addresses that exist only inside the test namespaces (198.18.0.0/24 and
//! fd00:e9e5::/64).
//!
//! Tests panic with a clear message rather than return errors, as aya's do. The binaries they run
//! are found next to the test executable ([`bins`]): `cargo xtask test` builds them first.

pub mod bins;
pub mod cgroup;
pub mod controller;
pub mod dns;
pub mod events;
pub mod kubeapi;
pub mod netns;
pub mod probe;
pub mod process;
pub mod sinks;
mod tmp;

use std::time::{Duration, Instant};

pub use cgroup::TestCgroup;
pub use controller::{Egress, EgressCmd};
pub use netns::{LoopNs, NetPair, in_netns};
pub use probe::{Line, Probe, Verdict, probe, probe_with_pid};
pub use process::ChildGuard;
pub use sinks::{HttpServer, TcpSink, UdpSink};
pub use tmp::TempDir;

/// The factor `EGRESS_TEST_TIMEOUT_SCALE` (a whole number, 1 to 100; 1 when unset) stretches
/// every [`wait_for`] by: `cargo xtask test --kernels` sets it in its VMs, whose TCG emulation is
/// 10 to 30 times slower than the host (a datapath load takes minutes there, not seconds). Waits
/// for something to happen only: a wait that proves something does not happen is unchanged.
pub fn timeout_scale() -> u32 {
    std::env::var("EGRESS_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(1, |n| n.clamp(1, 100))
}

/// Polls `f` every 20 ms until it returns true; panics naming `what` after `timeout` (times
/// [`timeout_scale`]).
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let timeout = timeout * timeout_scale();
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
