//! egress: the userspace controller of a kernel-enforced egress firewall.
//!
//! Data flows one way, and the modules follow it:
//! `policy` (TOML -> validated `Policy` -> pure `compile` to map entries; `diff`, `explain`) ->
//! `datapath` (the only aya user: maps, programs, cgroup and TC attachments, pins, the event
//! ring) -> `events` (JSON lines; `feed` keeps the recent ones and broadcasts them to `egress events`) / `accounting` (per-process totals) / `alerts` (sliding
//! windows, byte budgets) -> `report` (typed stats and status) -> `cli`, `metrics`, `api` (the
//! control socket), `webhook`. The `controller` runs `run` and `exec` on top of all of it;
//! `sys` is the host (cgroup2, interfaces, /proc, the boot clock). `dns` is the DNS proxy of
//! approved names: it matches queries with `policy::names` and hands the addresses it learns to a
//! grant sink before it replies. `kube` is pod awareness on Kubernetes nodes: this node's pods
//! from the API server, and which pod a cgroup belongs to, for the reports.

pub mod accounting;
pub mod alerts;
pub mod api;
pub mod cli;
pub mod controller;
pub mod datapath;
pub mod dns;
pub mod events;
pub mod exceptions;
pub mod exit;
pub mod feed;
pub mod kube;
pub mod learn;
pub mod metrics;
pub mod policy;
pub mod report;
pub mod sys;
pub mod webhook;
