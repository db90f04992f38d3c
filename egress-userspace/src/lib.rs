//! egress: the userspace controller of a kernel-enforced egress firewall.
//!
//! Data flows one way:
//! `policy` (TOML -> validated [`policy::Policy`]) -> `compile` (pure: map entries) ->
//! `datapath` (aya: maps, programs, cgroup attach) -> `events` (ring buffer -> JSON lines).
//! `cgroup` finds the cgroup2 hierarchy and manages child cgroups; `control` runs the `run` and
//! `exec` commands on top of all of it.

pub mod accounting;
pub mod alerts;
pub mod bpfsys;
pub mod cgroup;
pub mod compile;
pub mod control;
pub mod ctlsock;
pub mod datapath;
pub mod diff;
pub mod display;
pub mod events;
pub mod explain;
pub mod iface;
pub mod metrics;
pub mod pins;
pub mod policy;
pub mod webhook;

use std::path::Path;

use anyhow::Context as _;

use crate::{compile::CompiledPolicy, policy::Policy};

/// Reads, validates and compiles a policy file, or the embedded default when `path` is `None`.
/// Errors carry the file:line:column: field: message text.
pub fn load_policy(path: Option<&Path>) -> anyhow::Result<(Policy, CompiledPolicy)> {
    let policy = match path {
        Some(p) => Policy::load(p)?,
        None => Policy::embedded_default(),
    };
    let compiled = CompiledPolicy::compile(&policy)
        .with_context(|| format!("compiling policy {}", policy.source))?;
    Ok((policy, compiled))
}
