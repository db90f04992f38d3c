//! Break-glass exceptions (`egress allow`): a time-limited grant of one destination (address or
//! CIDR, or a host name whose addresses the scope resolves through the DNS proxy, see
//! `dns::grants`), optionally one port range and protocol, to one process, cgroup or user, with
//! a reason and the uid of who granted it. This module owns what an exception is, how a request is
//! validated, how the live exceptions become `EXCEPTIONS` entries (pure, [`compile`]), and the
//! metadata file a restarted controller (and `egress grants` without one) reads back. The
//! kernel side is `egress-ebpf/src/exception.rs`; the controller's (grant, revoke, expiry,
//! events) is `controller/exceptions.rs`.
//!
//! Scopes: `--pid N` is that process and its threads (keyed by tgid), not its children (a
//! child gets its own pid; grant its cgroup to cover a process tree); `--cgroup DIR` is that
//! cgroup and every cgroup below it; `--user U` is every process whose real uid is U.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use egress_common::{
    EXC_CGROUP, EXC_ENTRIES, EXC_ID_MASK, EXC_MAX_CG_LEVEL, EXC_PROCESS, EXC_USER, ExceptionEntry,
    ExceptionList, PROTO_ICMP, PROTO_ICMPV6, PROTO_OTHER, PROTO_TCP, PROTO_UDP, addr_halves,
    exception_scope, proto_bit,
};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::policy::{Destination, PortRange, Protocol};

/// The longest `--for` a controller accepts unless `egress run --max-exception` says otherwise.
pub const DEFAULT_MAX_FOR: Duration = Duration::from_secs(24 * 3600);

/// Whom an exception covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Scope {
    /// One process (tgid) and its threads.
    Process { pid: u32 },
    /// A cgroup (by inode, at `level` below the root) and everything below it.
    Cgroup { path: String, id: u64, level: u32 },
    /// Every process of one real uid.
    User {
        uid: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Process { pid } => write!(f, "pid:{pid}"),
            Scope::Cgroup { path, .. } => write!(f, "cgroup:{path}"),
            Scope::User {
                name: Some(name), ..
            } => write!(f, "user:{name}"),
            Scope::User { uid, .. } => write!(f, "user:{uid}"),
        }
    }
}

impl Scope {
    /// Its `EXCEPTIONS` key.
    pub fn key(&self) -> u64 {
        match self {
            Scope::Process { pid } => exception_scope(EXC_PROCESS, u64::from(*pid)),
            Scope::Cgroup { id, .. } => exception_scope(EXC_CGROUP, *id),
            Scope::User { uid, .. } => exception_scope(EXC_USER, u64::from(*uid)),
        }
    }
}

/// One live exception, as `egress grants`/`status` list it and the metadata file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exception {
    /// What `egress revoke ID` takes.
    pub id: u32,
    /// The destination, canonical (`10.0.0.0/8`, `192.0.2.7/32`); empty for a host exception.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dest: String,
    /// A host exception: the name (lowercase, no trailing dot). The scope's answers for it
    /// through the DNS proxy add `addresses`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The addresses learned for `host` while the exception lasts (each an entry in the
    /// kernel, ending with the exception).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The port range (`443`, `8000-8080`); `null`: every port.
    #[serde(default)]
    pub port: Option<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`; `null`: every protocol.
    #[serde(default)]
    pub protocol: Option<String>,
    pub scope: Scope,
    pub reason: String,
    /// Who granted it: the uid of the control socket's peer (from the kernel, never from the
    /// client), and its name when NSS knows it.
    pub by_uid: u32,
    #[serde(default)]
    pub by_user: Option<String>,
    /// When it was granted and when it ends (RFC 3339, seconds).
    pub granted: String,
    pub until: String,
    /// When it ends in CLOCK_BOOTTIME nanoseconds (the kernel's clock for it).
    pub until_ns: u64,
}

impl Exception {
    /// What it opens, for people: the destination, or the host and the addresses learned.
    pub fn what(&self) -> String {
        what(&self.dest, self.host.as_deref(), &self.addresses)
    }
}

/// `dest`, or `host NAME (learned: A, B)` / `host NAME (nothing learned yet)`.
pub fn what(dest: &str, host: Option<&str>, addresses: &[String]) -> String {
    match host {
        None => dest.to_string(),
        Some(h) if addresses.is_empty() => format!("host {h} (nothing resolved yet)"),
        Some(h) => format!("host {h} ({})", addresses.join(", ")),
    }
}

/// A request to grant, as it comes from the control socket, before it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask<'a> {
    pub dest: &'a str,
    pub port: Option<&'a str>,
    pub protocol: Option<&'a str>,
    pub for_secs: u64,
    pub reason: &'a str,
}

/// What an exception opens: an address or CIDR, or a host name resolved through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Dest(Destination),
    Host(String),
}

/// What an [`Ask`] means, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub target: Target,
    pub port: Option<PortRange>,
    pub protocol: Option<Protocol>,
    pub duration: Duration,
    pub reason: String,
}

/// Checks a request's destination, port, protocol, duration (positive, at most `max`) and
/// reason. A name (not an address or CIDR) is a host exception: its name is checked here.
pub fn check(ask: &Ask<'_>, max: Duration) -> Result<Checked, String> {
    let target = match ask.dest.parse::<Destination>() {
        Ok(d) => Target::Dest(d),
        Err(_) if looks_like_name(ask.dest) => Target::Host(normalize_host(ask.dest)?),
        Err(e) => return Err(format!("dest: {e}")),
    };
    let protocol = match ask.protocol {
        None => None,
        Some(p) => Some(parse_protocol(p)?),
    };
    let port = match ask.port {
        None => None,
        Some(p) => {
            let r: PortRange = p.parse().map_err(|e| format!("--port: {e}"))?;
            if let Some(proto) = protocol
                && !proto.has_ports()
            {
                return Err(format!(
                    "--port: protocol {} has no ports: drop --port, or use tcp or udp",
                    ask.protocol.unwrap_or_default()
                ));
            }
            Some(r)
        }
    };
    if ask.for_secs == 0 {
        return Err("--for: an exception must last at least one second".into());
    }
    let duration = Duration::from_secs(ask.for_secs);
    if duration > max {
        return Err(format!(
            "--for: {} is longer than this controller allows ({}; `egress run --max-exception` sets it)",
            humantime::format_duration(duration),
            humantime::format_duration(max)
        ));
    }
    let reason = ask.reason.trim();
    if reason.is_empty() {
        return Err(
            "--reason: say why (a ticket, an incident): it is recorded in the event".into(),
        );
    }
    if reason.len() > 512 || reason.chars().any(char::is_control) {
        return Err("--reason: at most 512 bytes of text, without control characters".into());
    }
    Ok(Checked {
        target,
        port,
        protocol,
        duration,
        reason: reason.to_string(),
    })
}

/// `tcp`, `udp`, `icmp`, `icmpv6`, as the policy's `protocols`.
pub fn parse_protocol(p: &str) -> Result<Protocol, String> {
    match p.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "icmp" => Ok(Protocol::Icmp),
        "icmpv6" => Ok(Protocol::Icmpv6),
        other => Err(format!(
            "--protocol: `{other}` is not a protocol: expected tcp, udp, icmp or icmpv6"
        )),
    }
}

/// A host name as a host exception keeps it: lowercase, without the trailing dot; refused with
/// a message when it is not a DNS name (a pattern such as `*.example.com` included).
pub fn normalize_host(s: &str) -> Result<String, String> {
    let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let bad = |why: &str| Err(format!("`{s}` is not a host name: {why}"));
    if name.is_empty() || name.len() > 253 {
        return bad("a DNS name has 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each label has 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("letters, digits, `-` and `_` only (no patterns: one exact name)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label does not start or end with `-`");
        }
    }
    Ok(name)
}

/// True when a query for `asked` (as the proxy has it: any case, maybe a trailing dot) is for
/// the host exception of `host` (normalized): one exact name, case-insensitive.
pub fn host_matches(host: &str, asked: &str) -> bool {
    asked.trim_end_matches('.').eq_ignore_ascii_case(host)
}

/// Who asked the proxy: the owner the hooks recorded for the asking socket, and its cgroup's
/// path when known.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    pub tgid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub cgroup_path: Option<&'a Path>,
}

/// True when `scope` covers the asker: its process (tgid), its real uid, or its cgroup or an
/// ancestor of it (as the kernel looks the cgroup scopes up).
pub fn scope_covers(scope: &Scope, asker: &Asker<'_>) -> bool {
    match scope {
        Scope::Process { pid } => asker.tgid == *pid,
        Scope::User { uid, .. } => asker.uid == *uid,
        Scope::Cgroup { path, id, .. } => {
            asker.cgroup_id == *id
                || asker
                    .cgroup_path
                    .is_some_and(|p| p.starts_with(Path::new(path)))
        }
    }
}

fn looks_like_name(s: &str) -> bool {
    s.contains(|c: char| c.is_ascii_alphabetic()) && !s.contains(':') && !s.contains('/')
}

/// A `--for` value: `15m`, `1h30m`, `90s` (humantime).
pub fn parse_for(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}): expected e.g. 15m, 2h, 90s"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("`{s}`: an exception must last at least one second"));
    }
    Ok(d)
}

/// The CLOCK_BOOTTIME instant `d` after `now_ns`, saturating.
pub fn until_ns(now_ns: u64, d: Duration) -> u64 {
    now_ns.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// True when the exception has ended at CLOCK_BOOTTIME `now_ns` (what the kernel checks: a
/// slot counts while `until_ns > now`).
pub fn expired(e: &Exception, now_ns: u64) -> bool {
    e.until_ns <= now_ns
}

/// The `EXCEPTIONS` entries of the exceptions in force: scope key -> its exceptions (at most
/// `EXC_ENTRIES` a scope: more is refused, naming the scope), and the cgroup levels `--cgroup`
/// exceptions sit at (`Config::exc_cg_levels`).
pub type Entries = BTreeMap<u64, ExceptionList>;

/// The prefix `net` as big-endian halves and masks, in the 16-byte layout of the hooks (IPv4
/// in the first 4 bytes).
fn net_entry(net: IpNetwork) -> (u8, [u64; 4]) {
    let mut addr = [0u8; 16];
    let (family, bits) = match net.network() {
        std::net::IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            (4, u32::from(net.prefix()))
        }
        std::net::IpAddr::V6(a) => {
            addr.copy_from_slice(&a.octets());
            (6, u32::from(net.prefix()))
        }
    };
    let mask = if bits == 0 {
        0u128
    } else {
        u128::MAX << (128 - bits)
    };
    let (hi, lo) = addr_halves(&addr);
    (family, [hi, lo, (mask >> 64) as u64, mask as u64])
}

pub fn compile(list: &[Exception]) -> Result<(Entries, u32), String> {
    let mut out = Entries::new();
    let mut levels = 0u32;
    for e in list {
        let dests: Vec<Destination> = if e.host.is_some() {
            e.addresses
                .iter()
                .map(|a| a.parse())
                .collect::<Result<_, _>>()
                .map_err(|m| format!("exception {}: {m}", e.id))?
        } else {
            vec![
                e.dest
                    .parse()
                    .map_err(|m| format!("exception {}: {m}", e.id))?,
            ]
        };
        let port = match &e.port {
            Some(p) => Some(
                p.parse::<PortRange>()
                    .map_err(|m| format!("exception {}: {m}", e.id))?,
            ),
            None => None,
        };
        let protocol = match &e.protocol {
            Some(p) => Some(parse_protocol(p).map_err(|m| format!("exception {}: {m}", e.id))?),
            None => None,
        };
        let proto_mask = match protocol {
            Some(p) => proto_bit(p.ipproto()),
            None => PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 | PROTO_OTHER,
        };
        let (port_lo, port_hi) = port.map_or((0, u16::MAX), |r| (r.lo(), r.hi()));
        match &e.scope {
            Scope::Cgroup { level, id, .. } => {
                if *level > EXC_MAX_CG_LEVEL {
                    return Err(format!(
                        "exception {}: the cgroup is {level} levels deep; at most {EXC_MAX_CG_LEVEL} are supported",
                        e.id
                    ));
                }
                if *id > EXC_ID_MASK {
                    return Err(format!(
                        "exception {}: cgroup id {id} is out of range",
                        e.id
                    ));
                }
                levels |= 1 << level;
            }
            Scope::Process { .. } | Scope::User { .. } => {}
        }
        for dest in dests {
            let (family, [net_hi, net_lo, mask_hi, mask_lo]) = net_entry(dest.network());
            let entry = ExceptionEntry {
                net_hi,
                net_lo,
                mask_hi,
                mask_lo,
                until_ns: e.until_ns,
                id: e.id,
                port_lo,
                port_hi,
                family,
                proto_mask,
                _pad: [0; 6],
            };
            let scope = out.entry(e.scope.key()).or_default();
            let Some(free) = scope.entries.iter_mut().find(|x| x.until_ns == 0) else {
                return Err(format!(
                    "{} already has {EXC_ENTRIES} live exceptions: revoke one first (`egress grants` lists them)",
                    e.scope
                ));
            };
            *free = entry;
        }
    }
    Ok((out, levels))
}

/// Where a controller with pins keeps its exceptions' metadata (reason, who, scope): beside its
/// state file, so that a restarted controller and `egress grants` without one read it back.
pub fn file_for(state_path: &Path) -> PathBuf {
    state_path.with_extension("exceptions.json")
}

/// What the metadata file holds: the live exceptions and the last id given (ids are never
/// reused, so that an event's id names one exception for good).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub last_id: u32,
    #[serde(default)]
    pub exceptions: Vec<Exception>,
}

/// The record in `path` (empty when it is missing or unreadable).
pub fn read(path: &Path) -> Record {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes `record` to `path` (0600, replaced atomically).
pub fn write(path: &Path, record: &Record) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(record)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Who may do what over the control socket: root everything; a member of the admin group
/// (`egress run --admin-group`) the read-only requests and `allow`/`revoke`; anyone else
/// nothing. The peer's uid and groups come from the kernel (SO_PEERCRED, /proc).
pub fn authorize(request: &crate::api::Request, uid: u32, admin: bool) -> Result<(), String> {
    use crate::api::Request as R;
    if uid == 0 {
        return Ok(());
    }
    let what = match request {
        R::Stats
        | R::Status
        | R::Grants { .. }
        | R::Events { .. }
        | R::Policy
        | R::Exceptions
        | R::Allow { .. }
        | R::Revoke { .. } => {
            if admin {
                return Ok(());
            }
            return Err(format!(
                "permission denied: uid {uid} is neither root nor in the controller's admin group (`egress run --admin-group`)"
            ));
        }
        R::Unblock { .. } => "unblock",
        R::Reload { .. } => "reload",
        R::Stop => "stop",
    };
    Err(format!(
        "permission denied: `{what}` is for root only (uid {uid} may read the state and grant or revoke exceptions at most)"
    ))
}

#[cfg(test)]
mod tests;
