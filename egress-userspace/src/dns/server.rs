//! The proxy itself: UDP and TCP listeners on one address and port, and the decision for each
//! query (see the module documentation of `dns` for the order: block, unlisted, forward, chain,
//! grant, reply).
//!
//! TCP clients may pipeline: each query of a connection is answered on its own task and the
//! replies are written in the order they are ready, not the order asked (RFC 7766 §6.2.1.1),
//! each with its own ID.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Instant, SystemTime},
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::Name,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, mpsc},
    task::JoinHandle,
    time::timeout,
};

use super::{
    BLOCKED_RCODE, ClientInfo, Grant, GrantSink, ProxyConfig, Refusal, RefusalReason, Transport,
    counters::DnsCounters,
    message::{self, EDE_BLOCKED},
    resolv,
    tunnel::{Screen, TunnelWatch},
    upstream::{self, Answer, Request, TCP_READ_TIMEOUT, frame},
};
use crate::policy::{DnsSettings, Policy, Unlisted, names::NameIndex, names::NameVerdict};

/// What the proxy needs of a policy: the name index, `[dns]`, the upstreams, the rule names.
#[derive(Debug)]
pub struct ProxyPolicy {
    index: NameIndex,
    dns: DnsSettings,
    upstreams: Vec<SocketAddr>,
    /// By rule index (rule id - 1).
    rule_names: Vec<String>,
    /// The policy's alerts (the DNS ones are counted here).
    alerts: Vec<crate::policy::alert::Alert>,
}

impl ProxyPolicy {
    /// The policy's view for the proxy; its upstreams are `[dns] upstream`, or when it names
    /// none, what `system` returns (called only then).
    pub fn new(
        policy: &Policy,
        system: impl FnOnce() -> io::Result<Vec<SocketAddr>>,
    ) -> io::Result<ProxyPolicy> {
        let upstreams = if policy.dns.upstream.is_empty() {
            system()?
        } else {
            policy.dns.upstream.iter().map(|u| u.0).collect()
        };
        Ok(ProxyPolicy {
            index: NameIndex::new(policy),
            dns: policy.dns.clone(),
            upstreams,
            rule_names: policy.rules.iter().map(|r| r.name.clone()).collect(),
            alerts: policy.alerts.clone(),
        })
    }

    /// [`ProxyPolicy::new`] with the host's resolvers as the default upstreams.
    pub fn with_system_resolvers(policy: &Policy) -> io::Result<ProxyPolicy> {
        ProxyPolicy::new(policy, resolv::system_upstreams)
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    fn rule_name(&self, rule_id: u32) -> &str {
        self.rule_names
            .get(rule_id.wrapping_sub(1) as usize)
            .map_or("unknown", String::as_str)
    }
}

/// The DNS proxy. Shared (`Arc`) between its listener tasks.
pub struct DnsProxy<S> {
    config: ProxyConfig,
    policy: RwLock<Arc<ProxyPolicy>>,
    sink: S,
    counters: DnsCounters,
    /// The DNS alerts: counted before anything else, their blocks refused.
    tunnel: Mutex<TunnelWatch>,
    in_flight: Arc<Semaphore>,
    tcp_clients: Arc<Semaphore>,
}

/// The running listeners; dropping it stops them (queries being answered are dropped too).
pub struct ProxyHandle {
    /// The address and port both listeners are bound to.
    pub local_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The lowercase text of a name, without its trailing dot.
fn name_text(name: &Name) -> String {
    let s = name.to_lowercase().to_ascii();
    s.strip_suffix('.').map(str::to_string).unwrap_or(s)
}

impl<S: GrantSink> DnsProxy<S> {
    pub fn new(config: ProxyConfig, policy: ProxyPolicy, sink: S) -> Arc<DnsProxy<S>> {
        Arc::new(DnsProxy {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            tcp_clients: Arc::new(Semaphore::new(config.max_tcp_clients)),
            config,
            tunnel: Mutex::new(TunnelWatch::new(&policy.alerts, Instant::now())),
            policy: RwLock::new(Arc::new(policy)),
            sink,
            counters: DnsCounters::default(),
        })
    }

    /// Swaps the policy (a reload): queries already being answered finish with the old one.
    /// The DNS alerts start counting again when they changed; their blocks stay.
    pub fn set_policy(&self, policy: ProxyPolicy) {
        {
            let old = self.policy.read().unwrap_or_else(PoisonError::into_inner);
            if crate::policy::alert::alerts_differ(&old.alerts, &policy.alerts) {
                self.tunnel().set_alerts(&policy.alerts, Instant::now());
            }
        }
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
    }

    /// The DNS alerts' state (short critical sections: one query's counting at a time).
    pub fn tunnel(&self) -> std::sync::MutexGuard<'_, TunnelWatch> {
        self.tunnel.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn counters(&self) -> &DnsCounters {
        &self.counters
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Binds UDP and TCP on `listen` (port 0: one free port for both) and serves until the
    /// handle is dropped.
    pub async fn start(self: &Arc<Self>, listen: SocketAddr) -> io::Result<ProxyHandle> {
        let mut tries = 0;
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind(listen).await?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => break (udp, tcp),
                // The UDP port picked for port 0 is taken in TCP: pick another.
                Err(e)
                    if e.kind() == io::ErrorKind::AddrInUse && listen.port() == 0 && tries < 8 =>
                {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let local_addr = udp.local_addr()?;
        let udp_task = tokio::spawn(Arc::clone(self).serve_udp(Arc::new(udp)));
        let tcp_task = tokio::spawn(Arc::clone(self).serve_tcp(tcp));
        Ok(ProxyHandle {
            local_addr,
            tasks: vec![udp_task, tcp_task],
        })
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 65_535];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS proxy: UDP receive failed");
                    continue;
                }
            };
            DnsCounters::bump(&self.counters.queries_udp);
            let bytes = buf[..n].to_vec();
            let client = ClientInfo {
                source: from,
                transport: Transport::Udp,
            };
            match Arc::clone(&self.in_flight).try_acquire_owned() {
                Ok(permit) => {
                    let me = Arc::clone(&self);
                    let socket = Arc::clone(&socket);
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Some(reply) = me.answer(&bytes, client).await {
                            let _ = socket.send_to(&reply, from).await;
                        }
                    });
                }
                Err(_) => {
                    DnsCounters::bump(&self.counters.limit_in_flight);
                    if let Some(reply) = overloaded(&bytes) {
                        let _ = socket.send_to(&reply, from).await;
                    }
                }
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS proxy: TCP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.tcp_clients).try_acquire_owned() else {
                DnsCounters::bump(&self.counters.limit_tcp_clients);
                continue;
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let _permit = permit;
                me.serve_tcp_client(stream, peer).await;
            });
        }
    }

    /// One TCP connection: length-framed queries, answered concurrently, replies in any order.
    async fn serve_tcp_client(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
        let writer = tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                if wr.write_all(&reply).await.is_err() {
                    break;
                }
            }
        });
        let client = ClientInfo {
            source: peer,
            transport: Transport::Tcp,
        };
        loop {
            let Ok(Ok(len)) = timeout(self.config.tcp_idle_timeout, rd.read_u16()).await else {
                break;
            };
            let mut bytes = vec![0u8; usize::from(len)];
            let Ok(Ok(_)) = timeout(TCP_READ_TIMEOUT, rd.read_exact(&mut bytes)).await else {
                break;
            };
            DnsCounters::bump(&self.counters.queries_tcp);
            let tx = tx.clone();
            match Arc::clone(&self.in_flight).try_acquire_owned() {
                Ok(permit) => {
                    let me = Arc::clone(&self);
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Some(reply) = me.answer(&bytes, client).await
                            && let Ok(framed) = frame(&reply)
                        {
                            let _ = tx.send(framed).await;
                        }
                    });
                }
                Err(_) => {
                    DnsCounters::bump(&self.counters.limit_in_flight);
                    if let Some(framed) = overloaded(&bytes).and_then(|r| frame(&r).ok()) {
                        let _ = tx.send(framed).await;
                    }
                }
            }
        }
        // The writer ends once every query of the connection is answered.
        drop(tx);
        let _ = writer.await;
    }

    /// The reply to one query, or `None` to send nothing (not a query at all).
    pub(super) async fn answer(&self, bytes: &[u8], client: ClientInfo) -> Option<Vec<u8>> {
        let query = match Message::from_vec(bytes) {
            Ok(m) if m.metadata.message_type == MessageType::Query => m,
            Ok(_) => {
                DnsCounters::bump(&self.counters.malformed);
                return None;
            }
            Err(_) => {
                DnsCounters::bump(&self.counters.malformed);
                return message::raw_header(bytes)
                    .map(|h| message::header_only_reply(&h, ResponseCode::FormErr));
            }
        };
        if !message::is_query(&query) {
            return Some(message::local_reply(&query, ResponseCode::NotImp, None));
        }
        if query.queries.len() != 1 {
            DnsCounters::bump(&self.counters.malformed);
            return Some(message::local_reply(&query, ResponseCode::FormErr, None));
        }
        let question = query.queries[0].clone();
        let policy = Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner));
        if let Some(reason) = self.screen(&question.name, &client) {
            return Some(self.refuse(&query, &client, &policy, reason));
        }
        let labels: Vec<&[u8]> = question.name.iter().collect();
        let coverage = policy.index.lookup_labels(&labels);
        // A break-glass host exception for the asker: resolved whatever the names say (asked
        // only of a query the policy refuses).
        let mut excepted = None;
        let mut is_excepted = || {
            *excepted.get_or_insert_with(|| self.sink.excepted(&client, &name_text(&question.name)))
        };
        let refusal = match coverage.verdict() {
            NameVerdict::Blocked(hit) => Some(RefusalReason::Blocked {
                rule_id: hit.rule_id(),
            }),
            NameVerdict::Unlisted if policy.dns.unlisted == Unlisted::Refuse => {
                Some(RefusalReason::Unlisted)
            }
            NameVerdict::Approved(_) | NameVerdict::Unlisted => None,
        };
        if let Some(reason) = refusal
            && !is_excepted()
        {
            return Some(self.refuse(&query, &client, &policy, reason));
        }

        DnsCounters::bump(&self.counters.forwarded);
        let request = Request {
            query: &query,
            bytes,
            question: &question,
            tcp: client.transport == Transport::Tcp,
        };
        let Answer {
            bytes: mut reply,
            message: answer,
        } = match upstream::forward(&self.config, &policy.upstreams, &request, &self.counters).await
        {
            Ok(a) => a,
            Err(e) => {
                DnsCounters::bump(&self.counters.upstream_failures);
                tracing::warn!(name = %name_text(&question.name), error = %e, "DNS proxy: SERVFAIL");
                return Some(message::local_reply(&query, ResponseCode::ServFail, None));
            }
        };

        // The chain: a block on any of its names blocks the answer; services on any grant it.
        let chain = message::chain(&question.name, &answer.answers);
        let mut services: Vec<u32> = coverage.services.iter().map(|h| h.rule_id()).collect();
        for target in chain.names.iter().skip(1) {
            let labels: Vec<&[u8]> = target.iter().collect();
            let c = policy.index.lookup_labels(&labels);
            if let Some(b) = c.blocks.first()
                && !is_excepted()
            {
                let reason = RefusalReason::BlockedTarget {
                    rule_id: b.rule_id(),
                    target: name_text(target),
                };
                return Some(self.refuse(&query, &client, &policy, reason));
            }
            for s in &c.services {
                if !services.contains(&s.rule_id()) {
                    services.push(s.rule_id());
                }
            }
        }
        let rcode = answer.metadata.response_code;
        if services.is_empty() && rcode == ResponseCode::NoError && !chain.addrs.is_empty() {
            // Resolved, approved by nothing: a connect to it will be denied, and its event
            // should say which name the address came from.
            let ttl = policy.dns.clamp_ttl(chain.min_ttl.unwrap_or(0));
            self.sink
                .resolved(&client, &name_text(&question.name), &chain.addrs, ttl);
        }
        if rcode == ResponseCode::NoError && !chain.addrs.is_empty() {
            let names = chain.names.iter().map(name_text).collect();
            let mut addrs: Vec<IpAddr> = chain
                .addrs
                .iter()
                .copied()
                .filter(|a| !message::never_granted(*a))
                .collect();
            addrs.truncate(self.config.max_addresses);
            if !addrs.is_empty()
                && let Err(e) = self.sink.except(client, names, addrs).await
            {
                DnsCounters::bump(&self.counters.grant_failures);
                tracing::warn!(name = %name_text(&question.name), error = %e, "DNS proxy: break-glass exception failed, SERVFAIL");
                return Some(message::local_reply(&query, ResponseCode::ServFail, None));
            }
        }
        if !services.is_empty() && rcode == ResponseCode::NoError {
            if let Some(grant) = self.grant_of(&question.name, &chain, services, &policy.dns) {
                if let Err(e) = self.sink.grant(client, grant).await {
                    DnsCounters::bump(&self.counters.grant_failures);
                    tracing::warn!(name = %name_text(&question.name), error = %e, "DNS proxy: grant failed, SERVFAIL");
                    return Some(message::local_reply(&query, ResponseCode::ServFail, None));
                }
                DnsCounters::bump(&self.counters.grants);
            }
            // No client caches an answer longer than its grant lives.
            let max = u32::try_from(policy.dns.max_ttl.as_secs()).unwrap_or(u32::MAX);
            let mut capped = reply.clone();
            if message::cap_ttls(&mut capped, max) {
                reply = capped;
            }
        }
        message::set_id(&mut reply, query.metadata.id);
        DnsCounters::bump(&self.counters.relayed);
        if client.transport == Transport::Udp && reply.len() > message::client_udp_limit(&query) {
            DnsCounters::bump(&self.counters.client_truncated);
            return Some(
                message::truncated_reply(&answer, query.metadata.id)
                    .unwrap_or_else(|| message::local_reply(&query, ResponseCode::ServFail, None)),
            );
        }
        Some(reply)
    }

    /// Counts the query for the DNS alerts; the refusal when one of their blocks covers it.
    /// Every query type and both transports come through here, before the policy's names.
    fn screen(&self, name: &Name, client: &ClientInfo) -> Option<RefusalReason> {
        if !self.tunnel().is_active() {
            return None;
        }
        let Some(asker) = self.sink.asker(client) else {
            // Not an enforced socket (nothing steered it here): nothing to count or block.
            DnsCounters::bump(&self.counters.tunnel_unknown_asker);
            return None;
        };
        let text = name_text(name);
        match self
            .tunnel()
            .observe(asker, &text, Instant::now(), SystemTime::now())
        {
            Screen::Pass => None,
            Screen::Refused { alert_rule, key } => Some(RefusalReason::Tunnel { alert_rule, key }),
        }
    }

    /// The grant of a chain's addresses, bounded; `None` when no address is left to grant.
    fn grant_of(
        &self,
        asked: &Name,
        chain: &message::Chain,
        services: Vec<u32>,
        dns: &DnsSettings,
    ) -> Option<Grant> {
        let mut addrs: Vec<IpAddr> = Vec::with_capacity(chain.addrs.len());
        for &a in &chain.addrs {
            if message::never_granted(a) {
                DnsCounters::bump(&self.counters.addresses_never_granted);
            } else {
                addrs.push(a);
            }
        }
        if addrs.len() > self.config.max_addresses {
            DnsCounters::bump(&self.counters.limit_addresses);
            addrs.truncate(self.config.max_addresses);
        }
        if addrs.is_empty() {
            return None;
        }
        Some(Grant {
            name: name_text(asked),
            cnames: chain.names.iter().skip(1).map(name_text).collect(),
            services,
            addrs,
            ttl: dns.clamp_ttl(chain.min_ttl.unwrap_or(0)),
        })
    }

    /// The blocked answer, counted and reported.
    fn refuse(
        &self,
        query: &Message,
        client: &ClientInfo,
        policy: &ProxyPolicy,
        reason: RefusalReason,
    ) -> Vec<u8> {
        let (counter, rule) = match &reason {
            RefusalReason::Blocked { rule_id } => {
                (&self.counters.blocked, policy.rule_name(*rule_id))
            }
            RefusalReason::BlockedTarget { rule_id, .. } => {
                (&self.counters.blocked_target, policy.rule_name(*rule_id))
            }
            RefusalReason::Unlisted => (&self.counters.refused_unlisted, "unlisted"),
            RefusalReason::Tunnel { alert_rule, .. } => {
                (&self.counters.refused_tunnel, alert_rule.as_str())
            }
        };
        DnsCounters::bump(counter);
        let text = format!("egress: {rule}");
        let question = &query.queries[0];
        let refusal = Refusal {
            name: name_text(&question.name),
            qtype: question.query_type.to_string(),
            reason,
        };
        self.sink.refused(client, &refusal);
        message::local_reply(query, BLOCKED_RCODE, Some((EDE_BLOCKED, &text)))
    }
}

/// SERVFAIL for a query the proxy has no room for, at once: with the question echoed (glibc
/// ignores a reply whose question differs from its query's, and would wait for its timeout),
/// else the header alone.
fn overloaded(bytes: &[u8]) -> Option<Vec<u8>> {
    match Message::from_vec(bytes) {
        Ok(q) if q.metadata.message_type == MessageType::Query => {
            Some(message::local_reply(&q, ResponseCode::ServFail, None))
        }
        Ok(_) => None,
        Err(_) => message::raw_header(bytes)
            .map(|h| message::header_only_reply(&h, ResponseCode::ServFail)),
    }
}
