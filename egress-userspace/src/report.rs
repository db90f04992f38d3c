//! The typed reports egress gives about itself: what `egress stats` and `exec --report` show
//! ([`StatsReport`]), what `egress status` shows ([`StatusReport`], from a running controller or
//! from the pins alone). One shape shared by the controller that builds them, the control socket
//! that carries them, the CLI that prints them, and the metrics exporter.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    accounting::ProcTotals,
    datapath::{
        Counters, HOOKS, LinkStatus, OWNER_HOOKS, PinnedStatus, SOCK_CREATE_HOOK, SOCKOPT_HOOK,
        TC_PROGRAM,
    },
};

/// What `egress stats` shows, and what `egress exec --report` writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsReport {
    /// RFC 3339 time of the reading.
    pub generated_at: String,
    /// The policy in force.
    pub policy: String,
    pub mode: String,
    /// Per process, highest rate first, each with its destinations.
    pub processes: Vec<ProcTotals>,
    /// Datapath counters.
    pub counters: Counters,
    /// Deny (and audit) events by deciding rule, as received by this controller.
    pub denies_by_rule: BTreeMap<String, u64>,
    /// Alerts raised, by alert rule.
    #[serde(default)]
    pub alerts_by_rule: BTreeMap<String, u64>,
    /// Byte-budget blocks in force.
    #[serde(default)]
    pub blocks: Vec<BlockInfo>,
}

/// A byte-budget block in force.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BlockInfo {
    pub key: String,
    pub rule: String,
    pub until: String,
    /// Live processes the blocked process created after the block (and theirs), refused too.
    #[serde(default)]
    pub descendants: usize,
    /// The blocked process has exited: the block stays for its descendants only.
    #[serde(default)]
    pub process_exited: bool,
}

/// What `egress status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub controller: ControllerInfo,
    pub policy: PolicyInfo,
    pub attached: Attachment,
    /// Every pinned link and the program it runs (`null`: nothing is pinned).
    pub links: Option<Vec<LinkStatus>>,
    pub counters: Counters,
}

/// Whether a controller runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ControllerInfo {
    pub running: bool,
    /// The running controller.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uptime_secs: Option<u64>,
    /// The controller that last ran (when none runs).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_pid: Option<u32>,
}

/// The policy in force.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyInfo {
    pub source: String,
    pub generation: u32,
    pub hash: String,
    pub applied_at: String,
    pub mode: String,
    pub default: String,
}

/// Where the programs are attached.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub cgroup: String,
    pub hooks: Vec<String>,
    pub tc: TcAttachment,
    /// The pin directory (`null`: nothing outlives the controller).
    pub pinned: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TcAttachment {
    pub program: String,
    pub ifaces: Vec<String>,
}

impl Attachment {
    pub fn new(cgroup: String, ifaces: Vec<String>, pinned: Option<String>) -> Attachment {
        Attachment {
            cgroup,
            hooks: HOOKS
                .iter()
                .chain([&SOCK_CREATE_HOOK, &SOCKOPT_HOOK])
                .chain(&OWNER_HOOKS)
                .map(|h| h.to_string())
                .collect(),
            tc: TcAttachment {
                program: TC_PROGRAM.into(),
                ifaces,
            },
            pinned,
        }
    }
}

impl StatusReport {
    /// `egress status` with no controller: what the pins and the state file say.
    pub fn from_pins(pinned: PinnedStatus, pin_dir: String) -> StatusReport {
        let PinnedStatus {
            state,
            config,
            counters,
            links,
        } = pinned;
        StatusReport {
            controller: ControllerInfo {
                running: false,
                last_pid: Some(state.controller_pid),
                ..ControllerInfo::default()
            },
            policy: PolicyInfo {
                source: state.policy,
                generation: config.generation,
                // A record of another generation (its controller died between a switch and its
                // record) does not know the hash of the one in force.
                hash: if state.generation == config.generation {
                    state.policy_hash
                } else {
                    String::new()
                },
                applied_at: state.applied_at,
                mode: if config.mode == egress_common::MODE_AUDIT {
                    "audit"
                } else {
                    "enforce"
                }
                .into(),
                default: if config.default_verdict == egress_common::DEFAULT_ALLOW {
                    "allow"
                } else {
                    "deny"
                }
                .into(),
            },
            attached: Attachment::new(state.cgroup, state.ifaces, Some(pin_dir)),
            links: Some(links),
            counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::State;

    fn pinned_status() -> PinnedStatus {
        PinnedStatus {
            state: State {
                cgroup: "/sys/fs/cgroup".into(),
                ifaces: vec!["eth0".into()],
                policy: "/etc/egress/policy.toml".into(),
                policy_hash: "00ff".into(),
                generation: 3,
                controller_pid: 42,
                ..State::default()
            },
            config: egress_common::Config {
                generation: 3,
                mode: egress_common::MODE_AUDIT,
                ..Default::default()
            },
            counters: Counters {
                denied: 5,
                ..Counters::default()
            },
            links: vec![LinkStatus {
                name: "connect4".into(),
                prog_id: 9,
                attached: true,
            }],
        }
    }

    #[test]
    fn a_record_of_another_generation_gives_no_hash() {
        let mut pinned = pinned_status();
        pinned.config.generation = 4;
        let s = StatusReport::from_pins(pinned, "/sys/fs/bpf/egress".into());
        assert_eq!(s.policy.generation, 4);
        assert_eq!(s.policy.hash, "");
    }

    /// `egress status --json` is read by scripts: the shape of both sources stays the same.
    #[test]
    fn status_from_pins_has_the_documented_shape() {
        let pinned = pinned_status();
        let v = serde_json::to_value(StatusReport::from_pins(pinned, "/sys/fs/bpf/egress".into()))
            .unwrap();
        assert_eq!(
            v["controller"],
            serde_json::json!({"running": false, "last_pid": 42})
        );
        assert_eq!(v["policy"]["generation"], 3);
        assert_eq!(v["policy"]["hash"], "00ff");
        assert_eq!(v["policy"]["mode"], "audit");
        assert_eq!(v["policy"]["default"], "deny");
        assert_eq!(v["attached"]["hooks"].as_array().unwrap().len(), 8);
        assert_eq!(v["attached"]["tc"]["ifaces"][0], "eth0");
        assert_eq!(v["attached"]["pinned"], "/sys/fs/bpf/egress");
        assert_eq!(v["links"][0]["prog_id"], 9);
        assert_eq!(v["counters"]["denied"], 5);
        assert_eq!(v["counters"]["budget_dropped"], 0);
        let back: StatusReport = serde_json::from_value(v).unwrap();
        assert_eq!(back.controller.last_pid, Some(42));
    }
}
