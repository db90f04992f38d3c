//! The kernel side of the proxy's grants: [`KernelGrants`] finds which socket asked (sock_diag),
//! its owner (`SOCK_OWNERS`, recorded by the hook that steered the query), and writes the
//! answer's addresses into `GRANTS` for that owner's cgroup before the proxy replies. It also
//! remembers, per cgroup and address, the name they were learned from: deny events carry it
//! (`host`), and `egress grants` lists it.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError, RwLock},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use egress_common::{GRANT_SET_BASE, GrantKey, GrantValue, Owner};
use serde::Serialize;

use super::{ClientInfo, Grant, GrantError, GrantSink, Refusal, Transport};
use crate::{
    datapath::DnsMaps,
    policy::compile::CompiledPolicy,
    sys::{
        clock,
        sockdiag::{self, SockDiag},
    },
};

/// How many (cgroup, address) -> name entries are kept for events and `egress grants`; the
/// oldest go first.
const MAX_LEARNED: usize = 65_536;

/// What a grant was for, kept in userspace beside the kernel's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Learned {
    /// The name asked.
    pub name: String,
    /// The service that approved it; `None`: resolved, approved by nothing (no kernel grant).
    pub service: Option<String>,
    /// CLOCK_BOOTTIME nanoseconds when it ends.
    #[serde(skip)]
    pub until_ns: u64,
    /// The process that asked (its pid and comm at the time).
    pub pid: u32,
    pub comm: String,
}

/// A query refused by the policy, for the controller's `"dns"` event.
#[derive(Debug, Clone)]
pub struct RefusedQuery {
    pub refusal: Refusal,
    pub owner: Option<Owner>,
}

/// Counters of the sink.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct GrantCounters {
    /// Addresses written into `GRANTS`.
    pub written: u64,
    /// Answers whose asker has no owner record (not an enforced socket: nothing to grant).
    pub unknown_client: u64,
    /// Grants the kernel map had no room for (the client got SERVFAIL).
    pub full: u64,
}

pub struct KernelGrants {
    grants: Mutex<BpfHashMap<MapData, GrantKey, GrantValue>>,
    owners: BpfHashMap<MapData, u64, Owner>,
    diag: Mutex<SockDiag>,
    /// The proxy's own addresses, by family: the other end of every client socket.
    listen: RwLock<Vec<SocketAddr>>,
    /// Rule id -> (slot, service name) of the services that name `hosts`.
    services: RwLock<HashMap<u32, (u32, String)>>,
    learned: Mutex<BTreeMap<(u64, IpAddr), Learned>>,
    counters: Mutex<GrantCounters>,
    refused: Mutex<Vec<RefusedQuery>>,
}

impl KernelGrants {
    pub fn new(maps: DnsMaps, policy: &CompiledPolicy) -> std::io::Result<KernelGrants> {
        let sink = KernelGrants {
            grants: Mutex::new(maps.grants),
            owners: maps.owners,
            diag: Mutex::new(SockDiag::open()?),
            listen: RwLock::new(Vec::new()),
            services: RwLock::new(HashMap::new()),
            learned: Mutex::new(BTreeMap::new()),
            counters: Mutex::new(GrantCounters::default()),
            refused: Mutex::new(Vec::new()),
        };
        sink.set_policy(policy);
        Ok(sink)
    }

    /// Where the proxy listens (set once its sockets are bound).
    pub fn set_listen(&self, addrs: Vec<SocketAddr>) {
        *self.listen.write().unwrap_or_else(PoisonError::into_inner) = addrs;
    }

    /// The services of a new policy (a reload): grants point at their slots.
    pub fn set_policy(&self, policy: &CompiledPolicy) {
        let map = policy
            .host_sets
            .iter()
            .map(|h| (h.rule_id, (h.slot, policy.rule_name(h.rule_id).to_string())))
            .collect();
        *self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner) = map;
    }

    pub fn counters(&self) -> GrantCounters {
        *self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The queries refused since the last call.
    pub fn take_refused(&self) -> Vec<RefusedQuery> {
        std::mem::take(&mut *self.refused.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The name `addr` was learned from by `cgroup_id`, while its grant lives (or lived).
    pub fn host_of(&self, cgroup_id: u64, addr: IpAddr) -> Option<String> {
        self.learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(cgroup_id, addr))
            .map(|l| l.name.clone())
    }

    /// Every grant known here, with what it was for.
    pub fn learned(&self) -> Vec<((u64, IpAddr), Learned)> {
        self.learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Forgets what ended before `now_ns`, in the kernel and here; returns how many kernel
    /// entries went.
    pub fn prune(&self, now_ns: u64) -> usize {
        let mut grants = self.grants.lock().unwrap_or_else(PoisonError::into_inner);
        let expired: Vec<GrantKey> = grants
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.until_ns <= now_ns)
            .map(|(k, _)| k)
            .collect();
        for k in &expired {
            let _ = grants.remove(k);
        }
        self.learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, l| l.until_ns > now_ns);
        expired.len()
    }

    /// The owner of the socket a query came from.
    fn owner_of(&self, client: &ClientInfo) -> Option<Owner> {
        let proxy = self
            .listen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == client.source.is_ipv4())?;
        let transport = match client.transport {
            Transport::Udp => sockdiag::Transport::Udp,
            Transport::Tcp => sockdiag::Transport::Tcp,
        };
        let cookie = self
            .diag
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cookie(transport, client.source, proxy)
            .ok()
            .flatten()?;
        self.owners.get(&cookie, 0).ok()
    }

    /// Notes that `owner`'s cgroup learned `addrs` from `name` (a grant of `service`, or none).
    fn remember(
        &self,
        owner: &Owner,
        name: &str,
        addrs: &[IpAddr],
        service: Option<String>,
        until_ns: u64,
    ) {
        let mut learned = self.learned.lock().unwrap_or_else(PoisonError::into_inner);
        for addr in addrs {
            let key = (owner.cgroup_id, *addr);
            // A name approved by a service is not shadowed by a later unapproved one.
            if service.is_none()
                && learned
                    .get(&key)
                    .is_some_and(|l| l.service.is_some() && l.until_ns > until_ns)
            {
                continue;
            }
            if learned.len() >= MAX_LEARNED
                && !learned.contains_key(&key)
                && let Some(oldest) = learned
                    .iter()
                    .min_by_key(|(_, l)| l.until_ns)
                    .map(|(k, _)| *k)
            {
                learned.remove(&oldest);
            }
            learned.insert(
                key,
                Learned {
                    name: name.to_string(),
                    service: service.clone(),
                    until_ns,
                    pid: owner.tgid,
                    comm: egress_common::user::comm_str(&owner.comm),
                },
            );
        }
    }

    fn bump(&self, f: impl FnOnce(&mut GrantCounters)) {
        f(&mut self.counters.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

fn key_of(cgroup_id: u64, addr: IpAddr) -> GrantKey {
    let mut key = GrantKey {
        cgroup_id,
        ..GrantKey::default()
    };
    match addr {
        IpAddr::V4(a) => {
            key.family = 4;
            key.addr[..4].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            key.family = 6;
            key.addr = a.octets();
        }
    }
    key
}

impl GrantSink for KernelGrants {
    async fn grant(&self, client: ClientInfo, grant: Grant) -> Result<(), GrantError> {
        let Some(owner) = self.owner_of(&client) else {
            // Not a socket the hooks steered (a process outside enforcement asking the proxy
            // directly): it needs no grant.
            self.bump(|c| c.unknown_client += 1);
            return Ok(());
        };
        let services = self.services.read().unwrap_or_else(PoisonError::into_inner);
        let Some((slot, service)) = grant.services.iter().find_map(|id| services.get(id)) else {
            return Err(GrantError::Failed(format!(
                "no grant slot for the services of {}",
                grant.name
            )));
        };
        let until_ns = clock::boot_ns().saturating_add(duration_ns(grant.ttl));
        let value = GrantValue {
            until_ns,
            ruleset: GRANT_SET_BASE | slot,
            _pad: 0,
        };
        {
            let mut grants = self.grants.lock().unwrap_or_else(PoisonError::into_inner);
            for addr in &grant.addrs {
                if let Err(e) = grants.insert(key_of(owner.cgroup_id, *addr), value, 0) {
                    drop(grants);
                    self.bump(|c| c.full += 1);
                    return Err(GrantError::Full(format!("the kernel grant map: {e}")));
                }
            }
        }
        self.bump(|c| c.written += grant.addrs.len() as u64);
        self.remember(
            &owner,
            &grant.name,
            &grant.addrs,
            Some(service.clone()),
            until_ns,
        );
        Ok(())
    }

    fn resolved(&self, client: &ClientInfo, name: &str, addrs: &[IpAddr], ttl: Duration) {
        let Some(owner) = self.owner_of(client) else {
            return;
        };
        let until_ns = clock::boot_ns().saturating_add(duration_ns(ttl));
        self.remember(&owner, name, addrs, None, until_ns);
    }

    fn refused(&self, client: &ClientInfo, refusal: &Refusal) {
        let owner = self.owner_of(client);
        let mut q = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded: a flood of refused queries between two ticks keeps the first ones.
        if q.len() < 4096 {
            q.push(RefusedQuery {
                refusal: refusal.clone(),
                owner,
            });
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
