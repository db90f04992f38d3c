//! Approved services by name, in the controller: the DNS proxy runs while the policy uses names
//! (`hosts` anywhere, or a `[dns]` table that says something), the kernel steers the enforced
//! processes' queries to it, and its grants go into the kernel before each answer.
//!
//! Where it listens ([`DnsListen`], `egress run --dns-listen`): by default `127.0.0.153:53` and
//! `[::1]:53` (a port below 1024, so that no unprivileged process can take it while the
//! controller restarts), each falling back to a free port when 53 is taken there (a local
//! resolver on `::1`). A restarted controller binds the same addresses again and points the
//! kernel at them; the grants are pinned and survive it.
//!
//! On loopback the proxy is reachable from its own network namespace only, so only sockets of
//! that namespace are steered. On addresses that are all other than loopback (a node address
//! that every pod routes to, such as a link-local 169.254.x.y on the node), sockets of every
//! namespace are steered to it. Their queries are answered; but the proxy finds the asking
//! socket with sock_diag in its own namespace, which does not see sockets of other namespaces:
//! such a query gets its answer and no grant (`sink.unknown_client`), so names approve nothing
//! for processes in other network namespaces yet (their address rules apply as always).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::{
    datapath::{Datapath, DnsMaps, DnsSteering, GRANT_CAPACITY},
    dns::{
        DnsProxy, ProxyConfig, ProxyHandle, ProxyPolicy,
        grants::{KernelGrants, RefusedQuery},
        tunnel::{ActiveDnsBlock, DnsBlockKey, DnsFiring, LiftedBlock},
    },
    policy::{Policy, compile::CompiledPolicy},
    report::{DnsStatus, GrantRow},
    sys::sockdiag,
};

/// The proxy's IPv4 address: a loopback address of its own (systemd-resolved has .53 and .54).
pub const LISTEN_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 153);
/// The port it tries first, on both addresses.
pub const LISTEN_PORT: u16 = 53;

/// Where the proxy listens: one IPv4 address (queries to IPv4 servers are steered there, and to
/// IPv6 servers too when there is no IPv6 one, for dual-stack sockets) and at most one IPv6
/// address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsListen {
    pub v4: SocketAddr,
    pub v6: Option<SocketAddr>,
    /// Given on the command line: a failure to bind is an error, and a port given is kept (no
    /// free-port fallback).
    pub explicit: bool,
    /// Whether each address was given with its port (v4, v6); without one, 53 is tried, then a
    /// free port.
    port_given: (bool, bool),
}

impl Default for DnsListen {
    /// `127.0.0.153:53` and `[::1]:53`, each on a free port when 53 is taken; no `::1` is no
    /// error.
    fn default() -> Self {
        DnsListen {
            v4: SocketAddr::new(IpAddr::V4(LISTEN_V4), LISTEN_PORT),
            v6: Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                LISTEN_PORT,
            )),
            explicit: false,
            port_given: (false, false),
        }
    }
}

impl DnsListen {
    /// From `--dns-listen` values (`ADDR` or `ADDR:PORT`, `[V6]:PORT`), at most one of each
    /// family and an IPv4 one among them; none: the default.
    pub fn parse(values: &[String]) -> Result<DnsListen, String> {
        if values.is_empty() {
            return Ok(DnsListen::default());
        }
        let (mut v4, mut v6) = (None, None);
        for v in values {
            let (addr, port_given) = match v.parse::<SocketAddr>() {
                Ok(a) => (a, true),
                Err(_) => match v.parse::<IpAddr>() {
                    Ok(ip) => (SocketAddr::new(ip, LISTEN_PORT), false),
                    Err(_) => {
                        return Err(format!(
                            "--dns-listen {v}: expected ADDR or ADDR:PORT (IPv6 as [ADDR]:PORT)"
                        ));
                    }
                },
            };
            let ip = addr.ip();
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(format!(
                    "--dns-listen {v}: queries are steered to this address: give one address of this host, not {ip}"
                ));
            }
            let slot = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
            if slot.is_some() {
                return Err(format!(
                    "--dns-listen {v}: one IPv4 and one IPv6 address at most"
                ));
            }
            *slot = Some((addr, port_given));
        }
        let Some((v4, v4_port)) = v4 else {
            return Err(
                "--dns-listen: an IPv4 address is needed (queries to IPv4 servers are steered there)"
                    .into(),
            );
        };
        Ok(DnsListen {
            v4,
            v6: v6.map(|(a, _)| a),
            explicit: true,
            port_given: (v4_port, v6.is_some_and(|(_, p)| p)),
        })
    }

    /// Whether sockets of other network namespaces can reach the proxy: no address is loopback.
    pub fn reaches_other_namespaces(&self) -> bool {
        !self.v4.ip().is_loopback() && !self.v6.is_some_and(|a| a.ip().is_loopback())
    }
}

/// The running proxy and its sink.
pub struct Names {
    proxy: Arc<DnsProxy<Arc<KernelGrants>>>,
    pub sink: Arc<KernelGrants>,
    _handles: Vec<ProxyHandle>,
    /// Where it listens.
    pub listen: Vec<SocketAddr>,
    /// What the kernel is told.
    steering: DnsSteering,
    /// Where it forwards (the policy's, or the system's).
    upstreams: Vec<SocketAddr>,
}

impl Names {
    /// Starts the proxy for `policy` and steers the enforced sockets' DNS to it.
    pub async fn start(
        dp: &mut Datapath,
        policy: &Policy,
        compiled: &CompiledPolicy,
        listen: &DnsListen,
    ) -> anyhow::Result<Names> {
        let names = Names::spawn(dp.dns_maps()?, policy, compiled, listen).await?;
        names.steer(dp)?;
        Ok(names)
    }

    /// Starts the proxy on `maps` without touching the steering: a restarting controller does
    /// this before it loads the datapath (the pinned steering already points here).
    pub async fn spawn(
        maps: DnsMaps,
        policy: &Policy,
        compiled: &CompiledPolicy,
        at: &DnsListen,
    ) -> anyhow::Result<Names> {
        let sink = Arc::new(KernelGrants::new(maps, compiled).context("opening sock_diag")?);
        let proxy_policy =
            ProxyPolicy::with_system_resolvers(policy).context("finding the DNS upstreams")?;
        if proxy_policy.upstreams().is_empty() {
            warn!(
                "no DNS upstream: [dns] upstream is empty and the system names none; every name fails to resolve"
            );
        }
        let upstreams = proxy_policy.upstreams().to_vec();
        let proxy = DnsProxy::new(ProxyConfig::default(), proxy_policy, Arc::clone(&sink));
        let v4 = bind(&proxy, at.v4, at.port_given.0)
            .await
            .with_context(|| format!("starting the DNS proxy on {}", at.v4))?;
        let v6 = match at.v6 {
            None => None,
            Some(addr) => match bind(&proxy, addr, at.port_given.1).await {
                Ok(h) => Some(h),
                Err(e) if at.explicit => {
                    return Err(e).with_context(|| format!("starting the DNS proxy on {addr}"));
                }
                Err(e) => {
                    warn!(error = %e, "no DNS proxy on ::1: IPv6 servers are steered to the IPv4 proxy (dual-stack sockets only)");
                    None
                }
            },
        };
        let v4_addr = v4.local_addr;
        let IpAddr::V4(v4_ip) = v4_addr.ip() else {
            unreachable!("bound on an IPv4 address")
        };
        let (v6_ip, v6_port) = match &v6 {
            Some(h) => match h.local_addr.ip() {
                IpAddr::V6(ip) => (ip, h.local_addr.port()),
                IpAddr::V4(_) => unreachable!("bound on an IPv6 address"),
            },
            None => (v4_ip.to_ipv6_mapped(), v4_addr.port()),
        };
        let mut listen = vec![v4_addr];
        let mut handles = vec![v4];
        if let Some(h) = v6 {
            listen.push(h.local_addr);
            handles.push(h);
        }
        sink.set_listen(listen.clone());
        let steering = DnsSteering {
            v4: v4_ip,
            port: v4_addr.port(),
            v6: v6_ip,
            port6: v6_port,
            // On loopback, its own namespace only; elsewhere, every namespace (0).
            netns_cookie: if at.reaches_other_namespaces() {
                0
            } else {
                sockdiag::netns_cookie().context("the network namespace's cookie")?
            },
        };
        info!(listen = ?listen, upstreams = ?upstreams, "DNS proxy started");
        Ok(Names {
            proxy,
            sink,
            _handles: handles,
            listen,
            steering,
            upstreams,
        })
    }

    /// Points the kernel's steering at this proxy.
    pub fn steer(&self, dp: &mut Datapath) -> anyhow::Result<()> {
        dp.set_dns(Some(self.steering))?;
        Ok(())
    }

    /// A reload: the proxy and the sink follow the new policy.
    pub fn set_policy(&mut self, policy: &Policy, compiled: &CompiledPolicy) -> anyhow::Result<()> {
        let proxy_policy =
            ProxyPolicy::with_system_resolvers(policy).context("finding the DNS upstreams")?;
        self.upstreams = proxy_policy.upstreams().to_vec();
        self.sink.set_policy(compiled);
        self.proxy.set_policy(proxy_policy);
        Ok(())
    }

    /// Stops steering (the proxy stops when dropped).
    pub fn stop(self, dp: &mut Datapath) -> anyhow::Result<()> {
        dp.set_dns(None)?;
        info!("DNS proxy stopped: the policy uses no names");
        Ok(())
    }

    pub fn take_refused(&self) -> Vec<RefusedQuery> {
        self.sink.take_refused()
    }

    pub fn stats(&self) -> crate::dns::DnsStats {
        self.proxy.counters().snapshot()
    }

    /// The `dns` part of status (`grants_live` counted now) and of each tick's stats (as
    /// counted at the last prune, a few seconds old at most: counting walks the whole map).
    pub fn status(&self, steered: u64, count_now: bool) -> DnsStatus {
        DnsStatus {
            proxy_running: true,
            listen: self.listen.iter().map(ToString::to_string).collect(),
            upstreams: self.upstreams.iter().map(ToString::to_string).collect(),
            grants_live: if count_now {
                self.sink.live_now(crate::sys::clock::boot_ns())
            } else {
                self.sink.live_at_prune()
            },
            grants_capacity: GRANT_CAPACITY,
            steered,
            proxy: Some(self.stats()),
            sink: Some(self.sink.counters()),
            tunnel: Some(self.proxy.tunnel().stats()),
        }
    }

    /// The DNS alerts fired and their blocks ended since the last call (blocks whose time is
    /// up end here).
    pub fn take_tunnel(&self) -> (Vec<DnsFiring>, Vec<LiftedBlock>) {
        let mut t = self.proxy.tunnel();
        t.sweep(std::time::Instant::now());
        t.take()
    }

    /// Ends a DNS alert's block (`egress unblock`); false if there was none.
    pub fn lift_dns_block(&self, key: &DnsBlockKey) -> bool {
        self.proxy.tunnel().lift(key, "egress unblock")
    }

    /// The DNS alerts' blocks in force.
    pub fn dns_blocks(&self) -> Vec<ActiveDnsBlock> {
        self.proxy.tunnel().blocks(std::time::Instant::now())
    }
}

/// The proxy on `addr`; when its port was not given and is taken there, on a free port.
async fn bind(
    proxy: &Arc<DnsProxy<Arc<KernelGrants>>>,
    addr: SocketAddr,
    port_given: bool,
) -> std::io::Result<ProxyHandle> {
    let ip = addr.ip();
    match proxy.start(addr).await {
        Ok(h) => Ok(h),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && !port_given => {
            warn!(%ip, "port 53 is taken: the DNS proxy listens on a free port there");
            proxy.start(SocketAddr::new(ip, 0)).await
        }
        Err(e) => Err(e),
    }
}

/// The `"event": "dns"` line: a query the policy refused (a blocked name, or an unlisted one
/// under `unlisted = "refuse"`), answered NXDOMAIN by the proxy.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DnsEvent {
    pub ts: String,
    pub event: String,
    #[serde(flatten, default)]
    pub meta: crate::events::EventMeta,
    /// The name asked.
    pub name: String,
    /// The query type (`A`, `AAAA`, `TXT`, ...).
    pub qtype: String,
    /// The block that covers it, or `unlisted`.
    pub rule: String,
    /// For a block that covers a CNAME target of the answer: that target.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    /// When `rule` is a `[[blocklist]]` of names: the feed's entry that covers the name (or the
    /// target).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub feed_entry: Option<String>,
    /// For a query refused by a DNS alert's block (`rule` is the alert): the block's key, as
    /// `egress unblock` takes it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    /// The asking process, when its socket is known (0 and empty otherwise).
    pub pid: u32,
    pub comm: String,
    /// The asking process's executable, when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exe: Option<String>,
    pub uid: u32,
    pub cgroup_id: u64,
}

impl DnsEvent {
    fn of(q: &RefusedQuery, policy: &crate::policy::compile::CompiledPolicy) -> DnsEvent {
        use crate::dns::RefusalReason;
        let rule_name = |id: u32| policy.rule_name(id).to_string();
        let feed_entry = |id: u32, name: &str| policy.feeds.get(&id)?.host_entry_of(name);
        let (rule, target, feed_entry) = match &q.refusal.reason {
            RefusalReason::Blocked { rule_id } => (
                rule_name(*rule_id),
                None,
                feed_entry(*rule_id, &q.refusal.name),
            ),
            RefusalReason::BlockedTarget { rule_id, target } => (
                rule_name(*rule_id),
                Some(target.clone()),
                feed_entry(*rule_id, target),
            ),
            RefusalReason::Unlisted => ("unlisted".to_string(), None, None),
            RefusalReason::Tunnel { alert_rule, .. } => (alert_rule.clone(), None, None),
        };
        let o = q.owner.unwrap_or_default();
        DnsEvent {
            ts: crate::events::timestamp(std::time::SystemTime::now()),
            event: "dns".into(),
            meta: crate::events::EventMeta::current(),
            name: q.refusal.name.clone(),
            qtype: q.refusal.qtype.clone(),
            rule,
            target,
            feed_entry,
            key: match &q.refusal.reason {
                RefusalReason::Tunnel { key, .. } => Some(key.clone()),
                _ => None,
            },
            pid: o.tgid,
            comm: egress_common::user::comm_str(&o.comm),
            exe: (o.tgid != 0)
                .then(|| crate::sys::proc::exe_of(o.tgid))
                .flatten(),
            uid: o.uid,
            cgroup_id: o.cgroup_id,
        }
    }
}

impl crate::events::EventLine for DnsEvent {
    fn ecs(&self) -> crate::events::ecs::Document {
        use crate::events::ecs::{Dns, DnsQuestion, Document, Rule, process, user};
        let mut d = Document::new(self, &self.ts, &self.meta, "event", &self.event);
        d.event.category = vec!["network"];
        d.event.type_ = vec!["protocol", "denied"];
        d.event.outcome = Some("failure");
        d.message = format!(
            "refused DNS query {} {} by rule {}",
            self.qtype, self.name, self.rule
        );
        d.process = process(Some(self.pid), &self.comm, self.exe.as_deref(), None);
        if self.pid != 0 {
            d.user = Some(user(self.uid, None));
        }
        d.network = Some(crate::events::ecs::Network {
            protocol: Some("dns".into()),
            ..Default::default()
        });
        d.dns = Some(Dns {
            question: DnsQuestion {
                name: self.name.clone(),
                type_: self.qtype.clone(),
            },
        });
        d.rule = Some(Rule {
            name: self.rule.clone(),
            ruleset: None,
            version: None,
        });
        d
    }
}

/// How often expired grants are removed from the kernel (a tick is a second or less).
const PRUNE_EVERY_TICKS: u32 = 10;

impl super::Controller {
    /// Starts, reconfigures or stops the DNS proxy to match the policy in force. With no names
    /// in the policy, steering is off (also when adopted pins say otherwise: their proxy died
    /// with its controller).
    pub(super) async fn follow_names(&mut self) -> anyhow::Result<()> {
        let wants = self.policy.policy.uses_names();
        match (self.names.take(), wants) {
            (None, false) => self.dp.set_dns(None)?,
            (None, true) => {
                let n = Names::start(
                    &mut self.dp,
                    &self.policy.policy,
                    &self.policy.compiled,
                    &self.dns_listen,
                )
                .await?;
                self.events.set_hosts(Some(Arc::clone(&n.sink)));
                self.names = Some(n);
                self.share_host_exceptions();
            }
            (Some(mut n), true) => {
                n.set_policy(&self.policy.policy, &self.policy.compiled)?;
                // Started before the datapath on a restart: point the (adopted) steering at it.
                n.steer(&mut self.dp)?;
                self.events.set_hosts(Some(Arc::clone(&n.sink)));
                self.names = Some(n);
                self.share_host_exceptions();
            }
            (Some(n), false) => {
                self.events.set_hosts(None);
                n.stop(&mut self.dp)?;
            }
        }
        Ok(())
    }

    /// The rows of `egress grants`, cgroups named. Without a proxy (the policy uses no names)
    /// the kernel may still hold grants (adopted, not yet expired): listed without names.
    pub(super) fn grant_rows(&self, all: bool) -> anyhow::Result<Vec<GrantRow>> {
        let mut rows = match &self.names {
            Some(n) => n.sink.rows(all),
            None => crate::dns::grants::grant_rows(
                &self.dp.grants()?,
                &[],
                |_| None,
                crate::sys::clock::boot_ns(),
                std::time::SystemTime::now(),
                all,
            ),
        };
        let mut paths =
            crate::sys::cgroup::CgroupPaths::new(&self.target.root, &self.target.cgroup);
        for r in &mut rows {
            r.cgroup_path = paths.path(r.cgroup_id, r.pid);
        }
        Ok(rows)
    }

    /// Writes the `"dns"` events of refused queries and delivers the DNS alerts and their ended
    /// blocks; now and then, removes expired grants.
    pub(super) async fn names_tick(&mut self, tick: u32) {
        let Some(n) = &self.names else { return };
        if tick.is_multiple_of(PRUNE_EVERY_TICKS) {
            n.sink.prune(crate::sys::clock::boot_ns());
        }
        self.deliver_names().await;
    }

    /// What the DNS proxy has to report since the last call: refused queries, DNS alerts fired,
    /// their blocks ended. Also on the way out, so that nothing counted is left unsaid.
    pub(super) async fn deliver_names(&mut self) {
        let Some(n) = &self.names else { return };
        let refused = n.take_refused();
        let (fired, lifted) = n.take_tunnel();
        for q in refused {
            let compiled = Arc::clone(&self.policy.compiled);
            let event = DnsEvent::of(&q, &compiled);
            self.emit(&event).await;
        }
        for f in fired {
            self.fire_dns(f).await;
        }
        for l in lifted {
            self.report_dns_unblock(l).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DnsListen;

    fn parse(v: &[&str]) -> Result<DnsListen, String> {
        DnsListen::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn no_flag_is_loopback_on_port_53_with_fallback_in_this_namespace_only() {
        let d = parse(&[]).unwrap();
        assert_eq!(d, DnsListen::default());
        assert_eq!(d.v4.to_string(), "127.0.0.153:53");
        assert_eq!(d.v6.unwrap().to_string(), "[::1]:53");
        assert!(!d.explicit);
        assert!(!d.reaches_other_namespaces());
    }

    #[test]
    fn addresses_with_and_without_ports_one_per_family() {
        let d = parse(&["169.254.20.10"]).unwrap();
        assert_eq!(d.v4.to_string(), "169.254.20.10:53");
        assert_eq!(d.v6, None);
        assert_eq!(d.port_given, (false, false));
        assert!(d.explicit && d.reaches_other_namespaces());

        let d = parse(&["[fd00::53]:5353", "10.0.0.1:5300"]).unwrap();
        assert_eq!(d.v4.to_string(), "10.0.0.1:5300");
        assert_eq!(d.v6.unwrap().to_string(), "[fd00::53]:5353");
        assert_eq!(d.port_given, (true, true));
        assert!(d.reaches_other_namespaces());

        let d = parse(&["127.0.0.154:5353", "fd00::53"]).unwrap();
        assert_eq!(d.v6.unwrap().to_string(), "[fd00::53]:53");
        assert_eq!(d.port_given, (true, false));
        // One loopback address: only this namespace reaches it.
        assert!(!d.reaches_other_namespaces());
        let d = parse(&["10.0.0.1", "::1"]).unwrap();
        assert!(!d.reaches_other_namespaces());
    }

    #[test]
    fn bad_values_are_refused_with_the_value() {
        for (v, says) in [
            (
                &["nope"][..],
                "--dns-listen nope: expected ADDR or ADDR:PORT",
            ),
            (&["0.0.0.0"][..], "not 0.0.0.0"),
            (&["[::]:53", "10.0.0.1"][..], "not ::"),
            (&["224.0.0.1"][..], "not 224.0.0.1"),
            (
                &["10.0.0.1", "10.0.0.2"][..],
                "--dns-listen 10.0.0.2: one IPv4 and one IPv6",
            ),
            (&["fd00::53"][..], "an IPv4 address is needed"),
            (&["10.0.0.1:99999"][..], "expected ADDR or ADDR:PORT"),
        ] {
            let e = parse(v).unwrap_err();
            assert!(e.contains(says), "{v:?}: {e}");
        }
    }
}
