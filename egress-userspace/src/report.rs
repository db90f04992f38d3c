//! The typed reports egress gives about itself: what `egress stats` and `exec --report` show
//! ([`StatsReport`]), what `egress status` shows ([`StatusReport`], from a running controller or
//! from the pins alone), what `egress grants` lists ([`GrantRow`]), and the DNS proxy's part of
//! status and stats ([`DnsStatus`]). One shape shared by the controller that builds them, the
//! control socket that carries them, the CLI that prints them, and the metrics exporter.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    accounting::ProcTotals,
    datapath::{
        ACCOUNTING_HOOK, Counters, HOOKS, LinkStatus, OWNER_HOOKS, PinnedStatus, SOCK_CREATE_HOOK,
        SOCKOPT_HOOK, TC_PROGRAM,
    },
    dns::{DnsStats, grants::GrantCounters},
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
    /// The DNS proxy, while the policy uses names (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dns: Option<DnsStatus>,
    /// Bytes sent per pod of this node, pods that still exist only (`--kubernetes`; absent
    /// otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub pods: Vec<crate::kube::PodTotals>,
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

/// What `egress reload` did, or with `--dry-run` would do (`-o json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadReport {
    /// Only described, nothing applied.
    pub dry_run: bool,
    /// Whether enforcement changes (or would): mode, default, rules, alerts, prefixes, as the
    /// message lists them. A new hash alone (comments, order) is no change. Absent when the
    /// controller did not say (one older than this CLI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// For people: what was applied, and what changes.
    pub message: String,
}

/// What `egress stop` did (`-o json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StopReport {
    pub pin_dir: String,
    /// The links detached.
    pub links: Vec<String>,
    /// How many map pins were removed.
    pub maps: usize,
    /// A running controller was told to exit.
    pub controller_told: bool,
}

/// The answer of a command that only reports what was done (`unblock`, `mount-bpffs`) under
/// `-o json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MessageReport {
    pub message: String,
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
    /// Names (issue 11): present when the policy in force uses them, or, without a controller,
    /// when the pinned config still steers DNS.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dns: Option<DnsStatus>,
    /// The policy's `[[blocklist]]` feeds: the copy in force of each, and how its last read or
    /// fetch went (absent: the policy has none, or no controller runs).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub feeds: Vec<crate::policy::feeds::FeedStatus>,
    /// Live break-glass exceptions (`egress allow`); without a controller, those recorded beside
    /// the pins that the pinned map still holds.
    #[serde(default)]
    pub exceptions: Vec<crate::exceptions::Exception>,
    /// The running kernel: its release, how TC is attached, and what is degraded on it (absent
    /// from a controller older than this CLI).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kernel: Option<KernelStatus>,
}

/// The running kernel as the datapath sees it (`egress status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KernelStatus {
    /// `uname -r`.
    pub release: String,
    /// `tcx` (a pinned link, 6.6+) or `clsact` (a netlink filter, not pinned: detached by a
    /// clean stop, left behind by a controller that was killed until the next start replaces
    /// it).
    pub tc_attach: String,
    /// One line per feature whose absence degrades enforcement, and what is lost.
    pub degraded: Vec<String>,
    /// Required features the kernel lacks (a controller would refuse to start).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub missing: Vec<String>,
}

/// The DNS proxy and the kernel's grants, in `egress status` and `egress stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsStatus {
    /// A controller's proxy answers. False (read from the pins): the kernel still steers the
    /// enforced processes' DNS to where the proxy listened, and nothing answers there, so names
    /// do not resolve until a controller is back (address rules and live grants keep working).
    pub proxy_running: bool,
    /// Where the proxy listens (`127.0.0.153:53`, `[::1]:53`), as the kernel steers to it.
    pub listen: Vec<String>,
    /// Where it forwards (empty when read from the pins).
    pub upstreams: Vec<String>,
    /// Unexpired (cgroup, address) grants in the kernel map, and how many it holds at most.
    pub grants_live: u64,
    pub grants_capacity: u32,
    /// DNS queries of enforced sockets the kernel steered to the proxy (`counters.dns_steered`).
    pub steered: u64,
    /// What the proxy did since it started (absent without a controller).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub proxy: Option<DnsStats>,
    /// What the grant sink did since it started (absent without a controller).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sink: Option<GrantCounters>,
    /// The DNS alerts (tunnel detection): what they counted, refused and had to forget (absent
    /// without a controller).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tunnel: Option<crate::dns::tunnel::TunnelStats>,
}

/// One row of `egress grants`: an address one cgroup may reach because it resolved a name a
/// service covers (or, with `--all`, resolved a name nothing approves: `granted` false).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantRow {
    /// The name asked. `null` when unknown: read from the pins without a controller, or granted
    /// by an earlier controller (the kernel keeps grants across restarts, the names are not).
    pub name: Option<String>,
    pub address: IpAddr,
    /// The cgroup2 inode of the process that asked, as events give it.
    pub cgroup_id: u64,
    /// Its path, when it could be found cheaply (`null` otherwise, e.g. the cgroup is gone).
    pub cgroup_path: Option<String>,
    /// The service whose ports and protocols the grant carries (`null`: not granted, or read
    /// from the pins).
    pub service: Option<String>,
    /// A kernel grant exists: new connects from that cgroup to `address` are judged by
    /// `service`. False only under `--all`.
    pub granted: bool,
    /// When it ends (RFC 3339, seconds), and in how many seconds (rounded up).
    pub expires: String,
    pub expires_in_secs: u64,
    /// The process that asked (`null` when unknown, as for `name`).
    pub pid: Option<u32>,
    pub comm: Option<String>,
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
    /// Read without a controller on a kernel without TCX (its clsact filters are not pinned):
    /// whether a TC program of ours is still loaded, i.e. the filter of a controller that was
    /// killed rather than stopped is still attached (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attached: Option<bool>,
}

impl Attachment {
    pub fn new(cgroup: String, ifaces: Vec<String>, pinned: Option<String>) -> Attachment {
        Attachment {
            cgroup,
            hooks: HOOKS
                .iter()
                .chain([&SOCK_CREATE_HOOK, &SOCKOPT_HOOK])
                .chain(&OWNER_HOOKS)
                .chain([&ACCOUNTING_HOOK])
                .map(|h| h.to_string())
                .collect(),
            tc: TcAttachment {
                program: TC_PROGRAM.into(),
                ifaces,
                attached: None,
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
            grants_live,
        } = pinned;
        let dns = DnsStatus::from_pins(&config, grants_live, counters.dns_steered);
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
            attached: {
                let mut a = Attachment::new(state.cgroup, state.ifaces, Some(pin_dir));
                if !crate::datapath::features::has_tcx() && !a.tc.ifaces.is_empty() {
                    a.tc.attached = Some(crate::datapath::tc_program_loaded());
                }
                a
            },
            links: Some(links),
            counters,
            dns,
            feeds: Vec::new(),
            exceptions: Vec::new(),
            kernel: Some(crate::datapath::features::kernel_status()),
        }
    }
}

impl DnsStatus {
    /// What the pins say of names: present when the config in force steers DNS or grants are
    /// live. No proxy answers without a controller.
    fn from_pins(
        config: &egress_common::Config,
        grants_live: u64,
        steered: u64,
    ) -> Option<DnsStatus> {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
        let steering = config.dns_flags & egress_common::DNS_STEER != 0;
        if !steering && grants_live == 0 {
            return None;
        }
        let mut listen = Vec::new();
        if steering {
            listen.push(
                SocketAddr::from((Ipv4Addr::from(config.dns_v4), config.dns_port)).to_string(),
            );
            let v6 = Ipv6Addr::from(config.dns_v6);
            // A v4-mapped address: no proxy of its own on ::1, IPv6 queries went to the IPv4 one.
            if v6.to_ipv4_mapped().is_none() {
                listen.push(SocketAddr::from((v6, config.dns_port6)).to_string());
            }
        }
        Some(DnsStatus {
            proxy_running: false,
            listen,
            upstreams: Vec::new(),
            grants_live,
            grants_capacity: crate::datapath::GRANT_CAPACITY,
            steered,
            proxy: None,
            sink: None,
            tunnel: None,
        })
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
                feeds_hash: String::new(),
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
            grants_live: 0,
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
        // connect, sendmsg, recvmsg and getpeername (v4 and v6), sock_create, setsockopt,
        // sock_release, sock_ops, skb_egress.
        assert_eq!(v["attached"]["hooks"].as_array().unwrap().len(), 13);
        assert_eq!(v["attached"]["tc"]["ifaces"][0], "eth0");
        assert_eq!(v["attached"]["pinned"], "/sys/fs/bpf/egress");
        assert_eq!(v["links"][0]["prog_id"], 9);
        assert_eq!(v["counters"]["denied"], 5);
        assert_eq!(v["counters"]["budget_dropped"], 0);
        let back: StatusReport = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.controller.last_pid, Some(42));
        // No names in use: no `dns` section at all.
        assert!(v.get("dns").is_none(), "{v}");
    }

    /// Without a controller, a config that still steers DNS shows where to, that nothing
    /// answers there, and the live grants.
    #[test]
    fn status_from_pins_shows_steering_without_a_proxy() {
        let mut pinned = pinned_status();
        pinned.config.dns_flags = egress_common::DNS_STEER | egress_common::DNS_GRANTS;
        pinned.config.dns_v4 = [127, 0, 0, 153];
        pinned.config.dns_port = 53;
        pinned.config.dns_v6 = std::net::Ipv6Addr::LOCALHOST.octets();
        pinned.config.dns_port6 = 53;
        pinned.counters.dns_steered = 9;
        pinned.grants_live = 2;
        let v = serde_json::to_value(StatusReport::from_pins(pinned, "/sys/fs/bpf/egress".into()))
            .unwrap();
        assert_eq!(
            v["dns"],
            serde_json::json!({
                "proxy_running": false,
                "listen": ["127.0.0.153:53", "[::1]:53"],
                "upstreams": [],
                "grants_live": 2,
                "grants_capacity": 131072,
                "steered": 9
            })
        );
    }

    /// A running controller's `dns` section: every counter of the proxy and the sink by name.
    #[test]
    fn the_dns_section_has_the_documented_shape() {
        let status = StatusReport {
            dns: Some(DnsStatus {
                proxy_running: true,
                listen: vec!["127.0.0.153:53".into()],
                upstreams: vec!["10.0.0.2:53".into()],
                grants_live: 3,
                grants_capacity: 131072,
                steered: 12,
                proxy: Some(DnsStats {
                    queries_udp: 10,
                    grants: 3,
                    ..DnsStats::default()
                }),
                sink: Some(GrantCounters {
                    written: 4,
                    ..GrantCounters::default()
                }),
                tunnel: None,
            }),
            ..StatusReport::default()
        };
        let v = serde_json::to_value(&status).unwrap();
        let d = &v["dns"];
        assert_eq!(d["proxy_running"], true);
        assert_eq!(d["upstreams"][0], "10.0.0.2:53");
        assert_eq!(d["grants_live"], 3);
        assert_eq!(d["steered"], 12);
        assert_eq!(d["proxy"]["queries_udp"], 10);
        assert_eq!(d["proxy"]["grants"], 3);
        for counter in [
            "queries_tcp",
            "relayed",
            "blocked",
            "blocked_target",
            "refused_unlisted",
            "grant_failures",
            "upstream_failures",
            "limit_in_flight",
            "limit_tcp_clients",
            "limit_addresses",
        ] {
            assert_eq!(d["proxy"][counter], 0, "{counter} in {d}");
        }
        assert_eq!(
            d["sink"],
            serde_json::json!({"written": 4, "unknown_client": 0, "full": 0})
        );
        let back: StatusReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, status);
    }
}
