//! Approved services by name, in the controller: the DNS proxy runs while the policy uses names
//! (`hosts` anywhere, or a `[dns]` table that says something), the kernel steers the enforced
//! processes' queries to it, and its grants go into the kernel before each answer.
//!
//! Where it listens: `127.0.0.153:53` and `[::1]:53` (a port below 1024, so that no
//! unprivileged process can take it while the controller restarts), each falling back to a free
//! port when 53 is taken there (a local resolver on `::1`). A restarted controller binds the same
//! addresses again and points the kernel at them; the grants are pinned and survive it.

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
    },
    policy::{Policy, compile::CompiledPolicy},
    report::{DnsStatus, GrantRow},
    sys::sockdiag,
};

/// The proxy's IPv4 address: a loopback address of its own (systemd-resolved has .53 and .54).
pub const LISTEN_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 153);
/// The port it tries first, on both addresses.
pub const LISTEN_PORT: u16 = 53;

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
    ) -> anyhow::Result<Names> {
        let names = Names::spawn(dp.dns_maps()?, policy, compiled).await?;
        names.steer(dp)?;
        Ok(names)
    }

    /// Starts the proxy on `maps` without touching the steering: a restarting controller does
    /// this before it loads the datapath (the pinned steering already points here).
    pub async fn spawn(
        maps: DnsMaps,
        policy: &Policy,
        compiled: &CompiledPolicy,
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
        let v4 = bind(&proxy, IpAddr::V4(LISTEN_V4))
            .await
            .context("starting the DNS proxy on 127.0.0.153")?;
        let v6 = match bind(&proxy, IpAddr::V6(Ipv6Addr::LOCALHOST)).await {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(error = %e, "no DNS proxy on ::1: IPv6 servers are steered to the IPv4 proxy (dual-stack sockets only)");
                None
            }
        };
        let v4_addr = v4.local_addr;
        let (v6_ip, v6_port) = match &v6 {
            Some(h) => match h.local_addr.ip() {
                IpAddr::V6(ip) => (ip, h.local_addr.port()),
                IpAddr::V4(_) => unreachable!("bound on ::1"),
            },
            None => (LISTEN_V4.to_ipv6_mapped(), v4_addr.port()),
        };
        let mut listen = vec![v4_addr];
        let mut handles = vec![v4];
        if let Some(h) = v6 {
            listen.push(h.local_addr);
            handles.push(h);
        }
        sink.set_listen(listen.clone());
        let steering = DnsSteering {
            v4: LISTEN_V4,
            port: v4_addr.port(),
            v6: v6_ip,
            port6: v6_port,
            netns_cookie: sockdiag::netns_cookie().context("the network namespace's cookie")?,
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
        }
    }
}

/// The proxy on `ip`, port 53, or a free port when 53 is taken there.
async fn bind(
    proxy: &Arc<DnsProxy<Arc<KernelGrants>>>,
    ip: IpAddr,
) -> std::io::Result<ProxyHandle> {
    match proxy.start(SocketAddr::new(ip, LISTEN_PORT)).await {
        Ok(h) => Ok(h),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
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
    /// The name asked.
    pub name: String,
    /// The query type (`A`, `AAAA`, `TXT`, ...).
    pub qtype: String,
    /// The block that covers it, or `unlisted`.
    pub rule: String,
    /// For a block that covers a CNAME target of the answer: that target.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    /// The asking process, when its socket is known (0 and empty otherwise).
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
}

impl DnsEvent {
    fn of(q: &RefusedQuery, rule_name: impl Fn(u32) -> String) -> DnsEvent {
        use crate::dns::RefusalReason;
        let (rule, target) = match &q.refusal.reason {
            RefusalReason::Blocked { rule_id } => (rule_name(*rule_id), None),
            RefusalReason::BlockedTarget { rule_id, target } => {
                (rule_name(*rule_id), Some(target.clone()))
            }
            RefusalReason::Unlisted => ("unlisted".to_string(), None),
        };
        let o = q.owner.unwrap_or_default();
        DnsEvent {
            ts: crate::events::timestamp(std::time::SystemTime::now()),
            event: "dns".into(),
            name: q.refusal.name.clone(),
            qtype: q.refusal.qtype.clone(),
            rule,
            target,
            pid: o.tgid,
            comm: egress_common::user::comm_str(&o.comm),
            uid: o.uid,
            cgroup_id: o.cgroup_id,
        }
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
                let n =
                    Names::start(&mut self.dp, &self.policy.policy, &self.policy.compiled).await?;
                self.events.set_hosts(Some(Arc::clone(&n.sink)));
                self.names = Some(n);
            }
            (Some(mut n), true) => {
                n.set_policy(&self.policy.policy, &self.policy.compiled)?;
                // Started before the datapath on a restart: point the (adopted) steering at it.
                n.steer(&mut self.dp)?;
                self.events.set_hosts(Some(Arc::clone(&n.sink)));
                self.names = Some(n);
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

    /// Writes the `"dns"` events of refused queries and, now and then, removes expired grants.
    pub(super) async fn names_tick(&mut self, tick: u32) {
        let Some(n) = &self.names else { return };
        let refused = n.take_refused();
        if tick.is_multiple_of(PRUNE_EVERY_TICKS) {
            n.sink.prune(crate::sys::clock::boot_ns());
        }
        for q in refused {
            let compiled = Arc::clone(&self.policy.compiled);
            let event = DnsEvent::of(&q, |id| compiled.rule_name(id).to_string());
            self.emit(&event).await;
        }
    }
}
