//! What a controller enforces when it finds enforcement pinned. A restart must never weaken what
//! the kernel holds by accident, so a bare `egress run` keeps the policy in force: it reads back
//! the file the pins record and takes it only if its content hash is still the recorded one. When
//! the file changed, vanished or no longer loads, the controller keeps enforcing what the kernel
//! holds and says so at WARN; it never falls back to the embedded default over pinned
//! enforcement. Moving to another file, or to a weaker mode or default, takes an explicit
//! `--policy` (or `egress reload`), and is logged at WARN naming the old and the new policy.
//!
//! The policy of the adopted generation also names the events that generation decided while no
//! controller ran (still in the ring buffer): by its own rules and hash, or, when it cannot be
//! read back, by rule id (`rule#3`) and the recorded hash, never by another policy's names.

use std::path::{Path, PathBuf};

use egress_common::{
    Config, DEFAULT_ALLOW, MODE_AUDIT, SOCK_ALLOW, SOCK_AUDIT, SOCK_POLICY, SOCKETS_ICMP,
    SOCKETS_OTHER, SOCKETS_PACKET, SOCKETS_RAW,
};
use tracing::warn;

use super::reload::PolicyInForce;
use crate::{
    datapath::{State, pins::Pins},
    policy::{
        DEFAULT_POLICY_NAME, DefaultVerdict, Mode, Policy, SocketRule, Sockets,
        compile::CompiledPolicy,
    },
};

/// What a starting controller enforces, decided in two steps around loading the datapath: only
/// then is it known whether the pinned maps could be adopted.
pub(super) struct Plan {
    /// What the pins hold (None: nothing is attached there).
    pinned: Option<Pinned>,
    /// The `--policy` given; with nothing pinned and none given, the embedded default.
    requested: Option<Loaded>,
}

impl Plan {
    /// Reads back what `pins` hold and loads (so validates) the requested policy, before
    /// anything in the kernel changes.
    pub fn new(policy: Option<&Path>, pins: Option<&Pins>) -> anyhow::Result<Plan> {
        let pinned = pins
            .filter(|p| p.adoptable())
            .map(|p| Pinned::recall(p.read_state()));
        let requested = match (policy, &pinned) {
            (Some(path), _) => Some(Loaded::load(Some(path))?),
            (None, None) => Some(Loaded::load(None)?),
            (None, Some(_)) => None,
        };
        let plan = Plan { pinned, requested };
        if let (None, Some(pins), Some(p)) = (plan.fresh(), pins, &plan.pinned)
            && !pins.maps_complete()
        {
            anyhow::bail!(
                "enforcement is pinned under {} but its maps are incomplete, and its policy cannot be read back ({}): start with --policy FILE",
                pins.dir.display(),
                p.policy.as_ref().err().map_or("", String::as_str),
            );
        }
        Ok(plan)
    }

    /// What fresh maps get when the pinned ones cannot be adopted (None: adopt, or fail).
    /// The policy [`Plan::fresh`] compiles, whole.
    pub fn fresh_loaded(&self) -> Option<&Loaded> {
        self.requested
            .as_ref()
            .or_else(|| self.pinned.as_ref().and_then(|p| p.policy.as_ref().ok()))
    }

    pub fn fresh(&self) -> Option<&CompiledPolicy> {
        self.requested
            .as_ref()
            .or_else(|| self.pinned.as_ref().and_then(|p| p.policy.as_ref().ok()))
            .map(|l| &l.compiled)
    }

    /// The policy in force once the datapath is loaded (`adopted`: the pinned maps were, and
    /// `config` is the kernel's), and the one to switch to once everything is attached.
    pub fn resolve(
        self,
        adopted: bool,
        config: &Config,
    ) -> anyhow::Result<(PolicyInForce, Option<Loaded>)> {
        Ok(match (self.pinned, self.requested) {
            (Some(pinned), requested) if adopted => {
                let a = PolicyInForce::adopted(Adopted::new(pinned, config));
                if let Some(why) = a.unknown.as_ref().filter(|_| requested.is_none()) {
                    warn!(
                        generation = config.generation,
                        policy = %a.policy.source,
                        hash = %a.policy.hash,
                        mode = %a.policy.mode,
                        default = %a.policy.default,
                        reason = %why,
                        "adopted pinned enforcement whose policy cannot be read back as applied: enforcing what the kernel holds; `egress reload` or --policy applies a file"
                    );
                }
                (a, requested)
            }
            // Not adopted: the fresh maps hold what `fresh` gave.
            (pinned, Some(requested)) => {
                if let Some(record) = pinned.as_ref().and_then(|p| p.record.as_ref()) {
                    warn_switch(&record.into(), &(&requested.policy).into());
                }
                (PolicyInForce::new(requested), None)
            }
            (Some(Pinned { policy: Ok(l), .. }), None) => (PolicyInForce::new(l), None),
            // The datapath refuses to load fresh maps without a policy; this is not reached.
            (_, None) => anyhow::bail!("no policy for fresh maps"),
        })
    }
}

/// A policy read from its source, ready to apply.
pub(super) struct Loaded {
    pub origin: Origin,
    pub policy: Policy,
    pub compiled: CompiledPolicy,
}

/// Where the policy in force comes from, and so what a reload without `--policy` re-reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Origin {
    /// A policy file (absolute).
    File(PathBuf),
    /// The policy embedded in the binary.
    Embedded,
    /// Nobody recorded it (a controller died before recording what it applied): a reload must
    /// name a file.
    Unrecorded,
}

impl Origin {
    /// The file to re-read, if a file.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Origin::File(p) => Some(p),
            _ => None,
        }
    }
}

impl Loaded {
    /// Reads, validates and compiles `path` (made absolute), or the embedded default.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Loaded> {
        let path = path.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
        let (policy, compiled) = crate::policy::load_with(path.as_deref(), &super::feeds::store())?;
        let origin = path.map_or(Origin::Embedded, Origin::File);
        Ok(Loaded {
            origin,
            policy,
            compiled,
        })
    }
}

/// What the pins say is in force, read back before the datapath is loaded.
pub(super) struct Pinned {
    /// What the last controller recorded (None: nothing, e.g. it died before recording).
    pub record: Option<State>,
    /// The recorded policy read back with the recorded hash, or why it could not be.
    pub policy: Result<Loaded, String>,
}

impl Pinned {
    /// Reads back the policy `record` names, and checks that it is still what was applied.
    pub fn recall(record: Option<State>) -> Pinned {
        let policy = match &record {
            None => Err("nothing was recorded beside the pins".to_string()),
            Some(r) => read_back(r),
        };
        Pinned { record, policy }
    }

    /// Where the recorded policy came from.
    fn origin(&self) -> Origin {
        self.record
            .as_ref()
            .map_or(Origin::Unrecorded, recorded_origin)
    }
}

/// Where a record says its policy came from. A record written before `policy_path` existed
/// names the file in `policy`.
fn recorded_origin(r: &State) -> Origin {
    match &r.policy_path {
        Some(p) => Origin::File(p.clone()),
        None if r.policy == DEFAULT_POLICY_NAME => Origin::Embedded,
        None if r.policy.is_empty() => Origin::Unrecorded,
        None => Origin::File(PathBuf::from(&r.policy)),
    }
}

fn read_back(r: &State) -> Result<Loaded, String> {
    if r.policy_hash.is_empty() {
        return Err("its hash was not known to the controller that recorded it".into());
    }
    let path = match recorded_origin(r) {
        Origin::File(p) => Some(p),
        Origin::Embedded => None,
        Origin::Unrecorded => return Err("its source was not recorded".into()),
    };
    let loaded = Loaded::load(path.as_deref()).map_err(|e| format!("{e:#}"))?;
    if loaded.policy.hash != r.policy_hash {
        return Err(format!(
            "{} has changed since it was applied (hash {} then, {} now)",
            loaded.policy.source, r.policy_hash, loaded.policy.hash
        ));
    }
    // Its blocklists' feeds too: the kernel holds the entries of then, not of now.
    if loaded.policy.feeds_hash != r.feeds_hash {
        return Err(format!(
            "the blocklists of {} have changed since it was applied (feeds hash {} then, {} now)",
            loaded.policy.source, r.feeds_hash, loaded.policy.feeds_hash
        ));
    }
    Ok(loaded)
}

/// The policy of the adopted generation, as this controller knows it.
pub(super) struct Adopted {
    pub origin: Origin,
    pub policy: Policy,
    pub compiled: CompiledPolicy,
    /// When it was applied (RFC 3339), as recorded.
    pub applied_at: Option<String>,
    /// Why its rules are not known (None: they are): `policy` is then a stand-in with the
    /// kernel's mode, default and loopback setting, the recorded source and hash, and no rules.
    pub unknown: Option<String>,
}

impl Adopted {
    /// What the kernel holds (`config`, of the buffer in force) as far as the pins tell: the
    /// policy read back, if it is the one recorded for the kernel's generation and agrees with
    /// the kernel's mode, default and loopback setting; else a stand-in.
    pub fn new(pinned: Pinned, config: &Config) -> Adopted {
        let origin = pinned.origin();
        let record = pinned.record;
        let applied_at = record.as_ref().map(|r| r.applied_at.clone());
        // The record describes the kernel's generation only if that is the one it names: a
        // controller that died between a switch and its record leaves an older one.
        let current = record
            .as_ref()
            .filter(|r| r.generation == config.generation);
        let why = match (pinned.policy, current) {
            (Ok(l), Some(_)) if agrees(&l.compiled.config, config) => {
                return Adopted {
                    origin,
                    policy: l.policy,
                    compiled: l.compiled,
                    applied_at,
                    unknown: None,
                };
            }
            (Ok(l), Some(_)) => format!(
                "{} does not match the mode, default or loopback setting the kernel holds",
                l.policy.source
            ),
            (_, None) if record.is_some() => format!(
                "the record is of generation {}, the kernel holds generation {}",
                record.as_ref().map_or(0, |r| r.generation),
                config.generation
            ),
            (Err(why), _) => why,
            (Ok(_), None) => "nothing was recorded beside the pins".to_string(),
        };
        let policy = stand_in(current, config);
        let compiled = CompiledPolicy::compile(&policy)
            .expect("a policy without rules always compiles (unit-tested)");
        Adopted {
            origin,
            policy,
            compiled,
            applied_at,
            unknown: Some(why),
        }
    }
}

/// True when the compiled `ours` sets what the kernel's `config` holds.
fn agrees(ours: &Config, kernel: &Config) -> bool {
    ours.mode == kernel.mode
        && ours.default_verdict == kernel.default_verdict
        && ours.allow_loopback == kernel.allow_loopback
        && ours.nat64_count == kernel.nat64_count
        && ours.nat64 == kernel.nat64
        && ours.sockets == kernel.sockets
}

/// The `[sockets]` rule a kernel config holds.
fn socket_rule(v: u8) -> SocketRule {
    match v {
        SOCK_ALLOW => SocketRule::Allow,
        SOCK_AUDIT => SocketRule::Audit,
        SOCK_POLICY => SocketRule::Policy,
        _ => SocketRule::Deny,
    }
}

/// A policy standing in for one whose rules are unknown: what the kernel's config says, and the
/// source and hash of `record` when it describes the kernel's generation.
fn stand_in(record: Option<&State>, config: &Config) -> Policy {
    Policy {
        source: record.map_or_else(|| "<unrecorded>".into(), |r| r.policy.clone()),
        mode: if config.mode == MODE_AUDIT {
            Mode::Audit
        } else {
            Mode::Enforce
        },
        default: if config.default_verdict == DEFAULT_ALLOW {
            DefaultVerdict::Allow
        } else {
            DefaultVerdict::Deny
        },
        allow_loopback: config.allow_loopback != 0,
        nat64_prefixes: config.nat64[..(config.nat64_count as usize).min(config.nat64.len())]
            .iter()
            .map(|p| {
                let mut a = [0u8; 16];
                a[..12].copy_from_slice(p);
                std::net::Ipv6Addr::from(a)
            })
            .collect(),
        sockets: Sockets {
            raw: socket_rule(config.sockets[SOCKETS_RAW]),
            icmp: socket_rule(config.sockets[SOCKETS_ICMP]),
            other: socket_rule(config.sockets[SOCKETS_OTHER]),
            packet: socket_rule(config.sockets[SOCKETS_PACKET]),
        },
        rules: Vec::new(),
        alerts: Vec::new(),
        blocklists: Vec::new(),
        feeds: Vec::new(),
        feeds_hash: String::new(),
        dns: Default::default(),
        hash: record.map(|r| r.policy_hash.clone()).unwrap_or_default(),
        warnings: Vec::new(),
    }
}

/// A policy as a switch names it.
pub(super) struct Described<'a> {
    pub source: &'a str,
    pub hash: &'a str,
    pub mode: String,
    pub default: String,
}

impl<'a> From<&'a Policy> for Described<'a> {
    fn from(p: &'a Policy) -> Self {
        Described {
            source: &p.source,
            hash: &p.hash,
            mode: p.mode.to_string(),
            default: p.default.to_string(),
        }
    }
}

impl<'a> From<&'a State> for Described<'a> {
    fn from(s: &'a State) -> Self {
        Described {
            source: &s.policy,
            hash: &s.policy_hash,
            mode: s.mode.clone(),
            default: s.default.clone(),
        }
    }
}

/// What makes a switch from `old` to `new` worth a WARN: another file, a weaker mode (enforce
/// to audit) or a weaker default (deny to allow). Empty: none.
pub(super) fn notable(old: &Described, new: &Described) -> Vec<&'static str> {
    let mut why = Vec::new();
    if old.source != new.source {
        why.push("another policy");
    }
    if old.mode == "enforce" && new.mode == "audit" {
        why.push("weaker mode");
    }
    if old.default == "deny" && new.default == "allow" {
        why.push("weaker default");
    }
    why
}

/// Logs at WARN a switch from `old` to `new` that goes to another file or weakens enforcement.
pub(super) fn warn_switch(old: &Described, new: &Described) {
    let why = notable(old, new);
    if why.is_empty() {
        return;
    }
    warn!(
        old_policy = %old.source,
        old_hash = %old.hash,
        old_mode = %old.mode,
        old_default = %old.default,
        new_policy = %new.source,
        new_hash = %new.hash,
        new_mode = %new.mode,
        new_default = %new.default,
        change = %why.join(", "),
        "switched the policy in force"
    );
}

#[cfg(test)]
mod tests;
