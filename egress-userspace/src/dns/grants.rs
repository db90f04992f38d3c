//! The kernel side of the proxy's grants: [`KernelGrants`] finds which socket asked (sock_diag),
//! its owner (`SOCK_OWNERS`, recorded by the hook that steered the query), and writes the
//! answer's addresses into `GRANTS` for that owner's cgroup before the proxy replies. It also
//! remembers, per cgroup and address, the name they were learned from: deny events carry it
//! (`host`), and `egress grants` lists it ([`grant_rows`]: the kernel's entries, named from
//! what was learned).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use egress_common::{GRANT_SET_BASE, GrantKey, GrantValue, Owner};
use serde::{Deserialize, Serialize};

use super::{ClientInfo, Grant, GrantError, GrantSink, Refusal, Transport};
use crate::{
    datapath::DnsMaps,
    policy::compile::CompiledPolicy,
    report::GrantRow,
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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The same map, read without taking `grants`' lock.
    grants_read: BpfHashMap<MapData, GrantKey, GrantValue>,
    /// Unexpired kernel grants at the last [`KernelGrants::prune`].
    live: AtomicU64,
    owners: BpfHashMap<MapData, u64, Owner>,
    diag: Mutex<SockDiag>,
    /// The proxy's own addresses, by family: the other end of every client socket.
    listen: RwLock<Vec<SocketAddr>>,
    /// Rule id -> (slot, service name) of the services that name `hosts`.
    services: RwLock<HashMap<u32, (u32, String)>>,
    learned: Mutex<BTreeMap<(u64, IpAddr), Learned>>,
    counters: Mutex<GrantCounters>,
    refused: Mutex<Vec<RefusedQuery>>,
    /// The break-glass host exceptions in force, and where their learned addresses go.
    exceptions: RwLock<HostExceptions>,
}

/// The break-glass host exceptions, as the controller last set them.
#[derive(Debug, Default)]
pub struct HostExceptions {
    pub rules: Vec<HostRule>,
    /// The controller's end of [`Learn`] requests.
    pub tx: Option<tokio::sync::mpsc::Sender<Learn>>,
    /// The cgroup2 root the scopes' paths are under (an asker's path is found from it).
    pub root: std::path::PathBuf,
}

/// One host exception: its id, name, scope and end.
#[derive(Debug, Clone)]
pub struct HostRule {
    pub id: u32,
    pub host: String,
    pub scope: crate::exceptions::Scope,
    pub until_ns: u64,
}

/// Addresses a covered asker resolved for host exception `id`: the controller adds them to it
/// (in the kernel) and replies before the proxy answers.
#[derive(Debug)]
pub struct Learn {
    pub id: u32,
    pub addrs: Vec<IpAddr>,
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// How long the proxy waits for the controller to record learned addresses.
const LEARN_TIMEOUT: Duration = Duration::from_secs(2);

impl KernelGrants {
    pub fn new(maps: DnsMaps, policy: &CompiledPolicy) -> std::io::Result<KernelGrants> {
        let sink = KernelGrants {
            grants: Mutex::new(maps.grants),
            grants_read: maps.grants_read,
            live: AtomicU64::new(0),
            owners: maps.owners,
            diag: Mutex::new({
                let mut diag = SockDiag::open()?;
                diag.self_check()?;
                diag
            }),
            listen: RwLock::new(Vec::new()),
            services: RwLock::new(HashMap::new()),
            learned: Mutex::new(BTreeMap::new()),
            counters: Mutex::new(GrantCounters::default()),
            refused: Mutex::new(Vec::new()),
            exceptions: RwLock::new(HostExceptions::default()),
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

    /// The host exceptions in force (the controller calls it after each change).
    pub fn set_exceptions(&self, e: HostExceptions) {
        *self
            .exceptions
            .write()
            .unwrap_or_else(PoisonError::into_inner) = e;
    }

    /// The ids of the live host exceptions naming one of `names` whose scope covers `owner`.
    fn covering(&self, owner: &Owner, names: &[&str]) -> Vec<u32> {
        let exc = self
            .exceptions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let now = clock::boot_ns();
        let mut path = None;
        let mut out = Vec::new();
        for r in &exc.rules {
            if r.until_ns <= now
                || !names
                    .iter()
                    .any(|n| crate::exceptions::host_matches(&r.host, n))
            {
                continue;
            }
            if matches!(r.scope, crate::exceptions::Scope::Cgroup { .. }) && path.is_none() {
                path = Some(cgroup_path_of(&exc.root, owner.tgid));
            }
            let asker = crate::exceptions::Asker {
                tgid: owner.tgid,
                uid: owner.uid,
                cgroup_id: owner.cgroup_id,
                cgroup_path: path.as_ref().and_then(|p| p.as_deref()),
            };
            if crate::exceptions::scope_covers(&r.scope, &asker) {
                out.push(r.id);
            }
        }
        out
    }

    fn has_exceptions(&self) -> bool {
        !self
            .exceptions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .rules
            .is_empty()
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

    /// Every entry of the kernel map, expired ones included (an entry that cannot be read is
    /// skipped: it may have just been deleted).
    pub fn kernel_grants(&self) -> Vec<(GrantKey, GrantValue)> {
        self.grants_read.iter().filter_map(Result::ok).collect()
    }

    /// Unexpired kernel grants now (a walk of the map).
    pub fn live_now(&self, now_ns: u64) -> u64 {
        self.kernel_grants()
            .iter()
            .filter(|(_, v)| v.until_ns > now_ns)
            .count() as u64
    }

    /// Unexpired kernel grants as of the last [`KernelGrants::prune`] (no walk: for every tick's
    /// report).
    pub fn live_at_prune(&self) -> u64 {
        self.live.load(Relaxed)
    }

    /// Forgets what ended before `now_ns`, in the kernel and here; returns how many kernel
    /// entries went.
    pub fn prune(&self, now_ns: u64) -> usize {
        let (expired, live): (Vec<_>, Vec<_>) = self
            .kernel_grants()
            .into_iter()
            .partition(|(_, v)| v.until_ns <= now_ns);
        self.live.store(live.len() as u64, Relaxed);
        if !expired.is_empty() {
            let mut grants = self.grants.lock().unwrap_or_else(PoisonError::into_inner);
            for (k, v) in &expired {
                // Refreshed since it was read: keep it.
                if grants.get(k, 0).is_ok_and(|now| now.until_ns == v.until_ns) {
                    let _ = grants.remove(k);
                }
            }
        }
        self.learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, l| l.until_ns > now_ns);
        expired.len()
    }

    /// The service name of each grant slot of the policy in force.
    fn slot_names(&self) -> HashMap<u32, String> {
        self.services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The rows of `egress grants` (cgroup paths not filled in).
    pub fn rows(&self, all: bool) -> Vec<GrantRow> {
        let now = clock::boot_ns();
        let slots = self.slot_names();
        grant_rows(
            &self.kernel_grants(),
            &self.learned(),
            |slot| slots.get(&slot).cloned(),
            now,
            SystemTime::now(),
            all,
        )
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

/// The rows of `egress grants`: every unexpired kernel grant, named from what was learned (the
/// name, who asked) when that is known, its service from its slot (`service_of`); with `all`,
/// also the names resolved that nothing approved (`granted` false). Sorted by cgroup, name and
/// address; `cgroup_path` is left for the caller. `now_ns` (CLOCK_BOOTTIME) and `wall` are the
/// same instant.
pub fn grant_rows(
    kernel: &[(GrantKey, GrantValue)],
    learned: &[((u64, IpAddr), Learned)],
    service_of: impl Fn(u32) -> Option<String>,
    now_ns: u64,
    wall: SystemTime,
    all: bool,
) -> Vec<GrantRow> {
    let expiry = |until_ns: u64| {
        let left = Duration::from_nanos(until_ns.saturating_sub(now_ns));
        (
            humantime::format_rfc3339_seconds(wall + left).to_string(),
            left.as_secs() + u64::from(left.subsec_nanos() > 0),
        )
    };
    let learned_of: HashMap<(u64, IpAddr), &Learned> =
        learned.iter().map(|(k, l)| (*k, l)).collect();
    let mut rows = Vec::new();
    let mut granted = HashSet::new();
    for (k, v) in kernel.iter().filter(|(_, v)| v.until_ns > now_ns) {
        let key = (k.cgroup_id, egress_common::user::ip_of(k.family, &k.addr));
        granted.insert(key);
        // A name learned without a grant is not what this grant is for.
        let l = learned_of.get(&key).filter(|l| l.service.is_some());
        let (expires, expires_in_secs) = expiry(v.until_ns);
        rows.push(GrantRow {
            name: l.map(|l| l.name.clone()),
            address: key.1,
            cgroup_id: key.0,
            cgroup_path: None,
            service: service_of(v.ruleset & !GRANT_SET_BASE)
                .or_else(|| l.and_then(|l| l.service.clone())),
            granted: true,
            expires,
            expires_in_secs,
            pid: l.map(|l| l.pid),
            comm: l.map(|l| l.comm.clone()),
        });
    }
    if all {
        for (key, l) in learned {
            if l.service.is_some() || l.until_ns <= now_ns || granted.contains(key) {
                continue;
            }
            let (expires, expires_in_secs) = expiry(l.until_ns);
            rows.push(GrantRow {
                name: Some(l.name.clone()),
                address: key.1,
                cgroup_id: key.0,
                cgroup_path: None,
                service: None,
                granted: false,
                expires,
                expires_in_secs,
                pid: Some(l.pid),
                comm: Some(l.comm.clone()),
            });
        }
    }
    rows.sort_by(|a, b| {
        (a.cgroup_id, &a.name, a.address, !a.granted).cmp(&(
            b.cgroup_id,
            &b.name,
            b.address,
            !b.granted,
        ))
    });
    rows
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

    fn asker(&self, client: &ClientInfo) -> Option<super::tunnel::Asker> {
        self.owner_of(client).map(|o| super::tunnel::Asker {
            tgid: o.tgid,
            cgroup_id: o.cgroup_id,
        })
    }

    fn excepted(&self, client: &ClientInfo, name: &str) -> bool {
        if !self.has_exceptions() {
            return false;
        }
        self.owner_of(client)
            .is_some_and(|owner| !self.covering(&owner, &[name]).is_empty())
    }

    async fn except(
        &self,
        client: ClientInfo,
        names: Vec<String>,
        addrs: Vec<IpAddr>,
    ) -> Result<(), GrantError> {
        if !self.has_exceptions() {
            return Ok(());
        }
        let Some(owner) = self.owner_of(&client) else {
            return Ok(());
        };
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let ids = self.covering(&owner, &names);
        if ids.is_empty() {
            return Ok(());
        }
        let tx = self
            .exceptions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .tx
            .clone()
            .ok_or_else(|| GrantError::Failed("no controller records exceptions".into()))?;
        for id in ids {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let learn = Learn {
                id,
                addrs: addrs.clone(),
                reply,
            };
            let fail = |e: String| GrantError::Failed(format!("break-glass exception {id}: {e}"));
            tx.send(learn)
                .await
                .map_err(|_| fail("the controller is gone".into()))?;
            match tokio::time::timeout(LEARN_TIMEOUT, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(fail(e)),
                Ok(Err(_)) => return Err(fail("the controller dropped the request".into())),
                Err(_) => return Err(fail("the controller did not answer in time".into())),
            }
        }
        Ok(())
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

/// The cgroup2 path of process `tgid` under `root` (from /proc), if it can be read.
fn cgroup_path_of(root: &std::path::Path, tgid: u32) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim().trim_start_matches('/')))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn learned(name: &str, service: Option<&str>, until_ns: u64) -> Learned {
        Learned {
            name: name.into(),
            service: service.map(Into::into),
            until_ns,
            pid: 77,
            comm: "curl".into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A kernel grant named from what was learned; one whose name is unknown (made by an earlier
    /// controller); an expired one left out; an unapproved name only under `all`; and an
    /// unapproved name that shadows a live grant never names it.
    #[test]
    fn rows_join_the_kernel_grants_with_what_was_learned() {
        let now = 1000 * SEC;
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let kernel = [
            (
                key_of(5, ip("198.18.0.2")),
                GrantValue {
                    until_ns: now + 299 * SEC + 1,
                    ruleset: GRANT_SET_BASE | 1,
                    _pad: 0,
                },
            ),
            (
                key_of(5, ip("2001:db8::7")),
                GrantValue {
                    until_ns: now + 60 * SEC,
                    ruleset: GRANT_SET_BASE | 9,
                    _pad: 0,
                },
            ),
            (
                key_of(6, ip("198.18.0.3")),
                GrantValue {
                    until_ns: now + 30 * SEC,
                    ruleset: GRANT_SET_BASE | 1,
                    _pad: 0,
                },
            ),
            (
                key_of(5, ip("198.18.0.9")),
                GrantValue {
                    until_ns: now - SEC,
                    ruleset: GRANT_SET_BASE | 1,
                    _pad: 0,
                },
            ),
        ];
        let learned = [
            (
                (5, ip("198.18.0.2")),
                learned("api.example.test", Some("api"), now + 299 * SEC + 1),
            ),
            // Resolved from an unapproved name after it was granted: not this grant's name.
            (
                (6, ip("198.18.0.3")),
                learned("other.example.test", None, now + 40 * SEC),
            ),
            (
                (5, ip("198.18.0.4")),
                learned("other.example.test", None, now + 10 * SEC),
            ),
            (
                (5, ip("198.18.0.5")),
                learned("gone.example.test", None, now - SEC),
            ),
        ];
        let service = |slot: u32| (slot == 1).then(|| "api".to_string());
        let rows = grant_rows(&kernel, &learned, service, now, wall, false);
        let brief: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.cgroup_id,
                    r.name.as_deref(),
                    r.address.to_string(),
                    r.service.as_deref(),
                    r.granted,
                    r.expires_in_secs,
                )
            })
            .collect();
        assert_eq!(
            brief,
            [
                (5, None, "2001:db8::7".into(), None, true, 60),
                (
                    5,
                    Some("api.example.test"),
                    "198.18.0.2".into(),
                    Some("api"),
                    true,
                    300
                ),
                (6, None, "198.18.0.3".into(), Some("api"), true, 30),
            ]
        );
        assert_eq!(rows[1].expires, "2027-01-15T08:04:59Z");
        assert_eq!(
            (rows[1].pid, rows[1].comm.as_deref()),
            (Some(77), Some("curl"))
        );
        assert_eq!((rows[0].pid, rows[0].comm.as_deref()), (None, None));

        let all = grant_rows(&kernel, &learned, service, now, wall, true);
        assert_eq!(all.len(), 4);
        let extra = all.iter().find(|r| !r.granted).unwrap();
        assert_eq!(
            (
                extra.name.as_deref(),
                extra.address,
                extra.service.as_deref()
            ),
            (Some("other.example.test"), ip("198.18.0.4"), None)
        );
    }

    /// `egress grants --json` is read by scripts: the row's keys stay as documented.
    #[test]
    fn a_row_has_the_documented_json_shape() {
        let row = GrantRow {
            name: Some("api.example.test".into()),
            address: ip("198.18.0.2"),
            cgroup_id: 5,
            cgroup_path: Some("/sys/fs/cgroup/app".into()),
            service: Some("api".into()),
            granted: true,
            expires: "2027-01-15T08:05:00Z".into(),
            expires_in_secs: 300,
            pid: Some(77),
            comm: Some("curl".into()),
        };
        assert_eq!(
            serde_json::to_value(&row).unwrap(),
            serde_json::json!({
                "name": "api.example.test", "address": "198.18.0.2", "cgroup_id": 5,
                "cgroup_path": "/sys/fs/cgroup/app", "service": "api", "granted": true,
                "expires": "2027-01-15T08:05:00Z", "expires_in_secs": 300, "pid": 77,
                "comm": "curl"
            })
        );
    }
}
