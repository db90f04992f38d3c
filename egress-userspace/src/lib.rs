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
pub mod control;
pub mod ctlsock;
pub mod datapath;
pub mod display;
pub mod events;
pub mod iface;
pub mod metrics;
pub mod pins;
pub mod policy;
pub mod webhook;
