//! The DNS proxy of approved services by name (issue 11): it answers the queries of enforced
//! processes, and before it replies with the addresses of a name a service covers, it hands them
//! to a [`GrantSink`] (the kernel grant map: [`grants::KernelGrants`]), so that the first
//! connect after the answer already finds its grant.
//!
//! One home per concern:
//! - this file: the sink ([`GrantSink`], [`ClientInfo`], [`Grant`], [`Refusal`]), the proxy's
//!   configuration ([`ProxyConfig`]) and the one socket mark of its upstream traffic
//!   ([`UPSTREAM_MARK`]);
//! - `server`: the UDP and TCP listeners and the decision for each query ([`DnsProxy`]);
//! - `upstream`: forwarding (UDP, TCP on truncation, timeouts, the next upstream on failure);
//! - `message`: the wire format (replies of the proxy's own, the CNAME chain, TTL caps);
//! - `resolv`: the system's resolvers, the default upstreams;
//! - `counters`: what happened, limits hit included;
//! - `tunnel`: the DNS alerts (tunnel and covert-channel detection), counted per asker and
//!   registered domain before anything else is decided, and their blocks.
//!
//! Decisions, for a query of name N (matched by `policy::names`, blocks first):
//! - with DNS alerts in the policy, the query is counted for its asker (the socket's owner) and
//!   N's registered domain, whatever its type and transport; if a DNS alert's block covers them,
//!   it is answered with [`BLOCKED_RCODE`], never forwarded;
//! - a block covers N: answered by the proxy with [`BLOCKED_RCODE`], never forwarded;
//! - nothing covers N and `[dns] unlisted = "refuse"`: the same (no DNS tunnelling through the
//!   upstream);
//! - otherwise forwarded. In the answer, the CNAME chain linked to the question is followed;
//!   if a block covers any name of it the answer is replaced by [`BLOCKED_RCODE`]. If services
//!   cover names of it (N first), the final A/AAAA addresses are granted with the chain's
//!   smallest TTL clamped to `[min_ttl, max_ttl]`, **before** the reply is sent; if the sink
//!   fails, the client gets SERVFAIL (fail closed: never an answer without its grant, never
//!   NXDOMAIN for an internal failure, which clients would cache as "no such name").
//!
//! **Why NXDOMAIN for a refused name, not REFUSED.** Both say "no" to the client; they differ in
//! what clients do next. REFUSED reads as a server problem: glibc moves to the next nameserver
//! and retries (every nameserver is steered to this proxy, so that only multiplies the queries)
//! and getaddrinfo ends in EAI_AGAIN, "temporary failure", which applications retry in loops;
//! musl stops its search list on it. NXDOMAIN is a final answer: getaddrinfo fails at once with
//! EAI_NONAME, nothing is retried, and both A and AAAA lookups end the same way (what we want for
//! a blocked name, and no partial answer). It is what RPZ firewalls and DNS filters answer, and
//! what Firefox's DoH canary (`use-application-dns.net`) needs to keep DoH off. What it loses,
//! telling "blocked" from "does not exist", is given back by an Extended DNS Error (RFC 8914,
//! code 15 "Blocked", with the rule's name) on EDNS queries, and by the sink's [`Refusal`]
//! report. No SOA is attached, so resolvers do not cache the denial (RFC 2308 §5): a policy that
//! approves the name later takes effect at once.
//!
//! Break-glass host exceptions (`egress allow NAME`): a query for the name from a process the
//! exception covers is forwarded even where a block or `unlisted = "refuse"` would refuse it
//! ([`GrantSink::excepted`]), and every answer's addresses are offered to
//! [`GrantSink::except`], which adds them to the exceptions that cover the asker and name the
//! question or a CNAME target of it.
//!
//! Bounded: at most [`ProxyConfig::max_in_flight`] queries are being answered at once (beyond,
//! SERVFAIL at once), [`ProxyConfig::max_tcp_clients`] TCP connections, and
//! [`ProxyConfig::max_addresses`] addresses granted per answer; each limit hit is counted.

mod counters;
pub mod grants;
mod message;
pub mod resolv;
mod server;
pub mod tunnel;
mod upstream;

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

pub use counters::{DnsCounters, DnsStats};
pub use server::{DnsProxy, ProxyHandle, ProxyPolicy};

use hickory_proto::op::ResponseCode;

/// The socket mark (SO_MARK) of every socket the proxy opens towards an upstream. The kernel
/// steering of DNS to the proxy (the sock_addr hooks) leaves sockets with this mark alone, or
/// the proxy's own queries would loop back into it: defined once, in egress-common. Setting
/// SO_MARK needs CAP_NET_ADMIN, which the controller has (it runs as root).
pub const UPSTREAM_MARK: u32 = egress_common::DNS_UPSTREAM_MARK;

/// The answer to a query the policy refuses (a blocked name; an unlisted one under `unlisted =
/// "refuse"`). See the module documentation for why NXDOMAIN.
pub const BLOCKED_RCODE: ResponseCode = ResponseCode::NXDomain;

/// How a query reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

/// Who asked. A placeholder: the source address and port the query came from. The kernel
/// steering will identify the socket (cgroup, pid) behind it; then this is where that goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInfo {
    pub source: SocketAddr,
    pub transport: Transport,
}

/// What a sink is asked to grant: the addresses a covered name resolved to, for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The name asked (lowercase, no trailing dot).
    pub name: String,
    /// The CNAME targets followed to the addresses, in order (lowercase, no trailing dot).
    pub cnames: Vec<String>,
    /// The rule ids (`CompiledPolicy::rule_names` numbering) of the services covering the chain,
    /// the asked name's first: the first is the one events name.
    pub services: Vec<u32>,
    /// The final A/AAAA addresses (v4-mapped as IPv4), at most `max_addresses`, none of them
    /// loopback, link-local, multicast or unspecified (never granted, whatever the name).
    pub addrs: Vec<IpAddr>,
    /// The chain's smallest TTL, clamped to `[min_ttl, max_ttl]`.
    pub ttl: Duration,
}

/// A sink could not record a grant: the client gets SERVFAIL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// No room left (a full grant map, a cgroup over its quota).
    #[error("no room for the grant: {0}")]
    Full(String),
    #[error("{0}")]
    Failed(String),
}

/// Why a query was answered by the proxy instead of resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalReason {
    /// A block covers the asked name.
    Blocked { rule_id: u32 },
    /// A block covers a CNAME target of the answer.
    BlockedTarget { rule_id: u32, target: String },
    /// Nothing covers the name and `unlisted = "refuse"`.
    Unlisted,
    /// A DNS alert's block covers the asker and the name's registered domain (`key`, as
    /// `egress unblock` takes it).
    Tunnel { alert_rule: String, key: String },
}

/// A query answered with [`BLOCKED_RCODE`], for the `"dns"` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub name: String,
    /// The query type, as text (`A`, `AAAA`, `TXT`, ...).
    pub qtype: String,
    pub reason: RefusalReason,
}

/// Where the proxy records what it learns. `grant` is awaited before the reply is sent.
pub trait GrantSink: Send + Sync + 'static {
    /// Records that `client` may reach `grant.addrs` for `grant.ttl`. An error makes the reply
    /// SERVFAIL.
    fn grant(
        &self,
        client: ClientInfo,
        grant: Grant,
    ) -> impl Future<Output = Result<(), GrantError>> + Send;

    /// The process that asked (for the DNS alerts), when the sink can tell. Default: unknown.
    fn asker(&self, client: &ClientInfo) -> Option<tunnel::Asker> {
        let _ = client;
        None
    }

    /// Told of every query the policy refused (before the reply is sent). Default: nothing.
    fn refused(&self, client: &ClientInfo, refusal: &Refusal) {
        let _ = (client, refusal);
    }

    /// Told of an answer no service covers (relayed, nothing granted): `name` resolved to
    /// `addrs`, which deny events can then name. Default: nothing.
    fn resolved(&self, client: &ClientInfo, name: &str, addrs: &[IpAddr], ttl: Duration) {
        let _ = (client, name, addrs, ttl);
    }

    /// True when a break-glass host exception covering `client` names `name`: the proxy then
    /// resolves it although the policy refuses it. Default: none.
    fn excepted(&self, client: &ClientInfo, name: &str) -> bool {
        let _ = (client, name);
        false
    }

    /// Told of every answer with addresses (`names`: the asked name, then its CNAME targets):
    /// the addresses become exception entries of the host exceptions that cover `client` and
    /// name one of `names`, before the reply is sent. An error makes the reply SERVFAIL.
    /// Default: nothing.
    fn except(
        &self,
        client: ClientInfo,
        names: Vec<String>,
        addrs: Vec<IpAddr>,
    ) -> impl Future<Output = Result<(), GrantError>> + Send {
        let _ = (client, names, addrs);
        async { Ok(()) }
    }
}

impl<T: GrantSink> GrantSink for std::sync::Arc<T> {
    fn grant(
        &self,
        client: ClientInfo,
        grant: Grant,
    ) -> impl Future<Output = Result<(), GrantError>> + Send {
        (**self).grant(client, grant)
    }

    fn asker(&self, client: &ClientInfo) -> Option<tunnel::Asker> {
        (**self).asker(client)
    }

    fn refused(&self, client: &ClientInfo, refusal: &Refusal) {
        (**self).refused(client, refusal);
    }

    fn resolved(&self, client: &ClientInfo, name: &str, addrs: &[IpAddr], ttl: Duration) {
        (**self).resolved(client, name, addrs, ttl);
    }

    fn excepted(&self, client: &ClientInfo, name: &str) -> bool {
        (**self).excepted(client, name)
    }

    fn except(
        &self,
        client: ClientInfo,
        names: Vec<String>,
        addrs: Vec<IpAddr>,
    ) -> impl Future<Output = Result<(), GrantError>> + Send {
        (**self).except(client, names, addrs)
    }
}

/// How the proxy runs. The policy's `[dns]` table says what it resolves; this says how.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// SO_MARK of the upstream sockets: [`UPSTREAM_MARK`]. `None` leaves them unmarked, only for
    /// tests without CAP_NET_ADMIN: with the kernel steering in place the queries would loop.
    pub upstream_mark: Option<u32>,
    /// How long one upstream has to answer one attempt.
    pub attempt_timeout: Duration,
    /// How long a query may take in all, over every upstream tried; then SERVFAIL. Below the
    /// 5 s a glibc client waits, so that it hears SERVFAIL rather than a timeout.
    pub query_timeout: Duration,
    /// Queries answered at once; beyond, SERVFAIL at once.
    pub max_in_flight: usize,
    /// TCP connections at once; beyond, a new one is closed at once.
    pub max_tcp_clients: usize,
    /// A TCP connection with no query for this long is closed (RFC 7766 suggests seconds).
    pub tcp_idle_timeout: Duration,
    /// Addresses granted per answer (GCP caps 32 per family); the rest are relayed, not granted.
    pub max_addresses: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            upstream_mark: Some(UPSTREAM_MARK),
            attempt_timeout: Duration::from_millis(1500),
            query_timeout: Duration::from_millis(4000),
            max_in_flight: 1024,
            max_tcp_clients: 256,
            tcp_idle_timeout: Duration::from_secs(10),
            max_addresses: 64,
        }
    }
}
