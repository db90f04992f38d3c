//! The DNS proxy end to end on loopback: a small authoritative upstream built on hickory-proto
//! (on 127.0.0.2, so that the proxy's upstream traffic and its clients' are told apart), the
//! proxy on 127.0.0.1, and clients speaking the wire format over UDP and TCP. No root needed
//! (as root, the upstream sockets carry the real SO_MARK).
//!
//! Checked: a covered name is answered and granted with its TTL clamped (both ends); a CNAME
//! chain grants its final addresses with the smallest TTL; a blocked name (and a blocked CNAME
//! target) gets NXDOMAIN with an Extended DNS Error, no grant, and never reaches the upstream;
//! `unlisted = "refuse"` and `"resolve"`; truncation: the proxy retries over TCP, a UDP client
//! too small for the answer gets TC and then the answer over TCP; a failing sink gives SERVFAIL;
//! a dead upstream is skipped for the next; pipelined TCP queries; a DNS alert's block refuses the
//! asker's queries under the registered domain for every type and over TCP, never forwarded.
//! (Over 500 lines: the upstream, the sink, the clients and the cases they serve, in one file
//! because nothing else uses them.)

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use egress::{
    dns::{
        BLOCKED_RCODE, ClientInfo, DnsProxy, Grant, GrantError, GrantSink, ProxyConfig,
        ProxyHandle, ProxyPolicy, Refusal, RefusalReason, Transport, UPSTREAM_MARK,
        tunnel::{Asker, DnsBlockKey},
    },
    policy::Policy,
};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    time::timeout,
};

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// The upstream: a tiny authoritative server for the test zone
// ---------------------------------------------------------------------------------------------

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// The records the upstream serves, by lowercase owner name.
fn zone() -> HashMap<String, Vec<Record>> {
    let mut z: HashMap<String, Vec<Record>> = HashMap::new();
    let mut add = |owner: &str, ttl: u32, data: RData| {
        z.entry(owner.to_string())
            .or_default()
            .push(Record::from_rdata(name(&format!("{owner}.")), ttl, data));
    };
    let a = |o: [u8; 4]| RData::A(A(Ipv4Addr::from(o)));
    let cname = |t: &str| RData::CNAME(CNAME(name(&format!("{t}."))));
    add("api.github.example", 2, a([192, 0, 2, 10]));
    add("api.github.example", 2, a([192, 0, 2, 11]));
    add("long.example", 86_400, a([192, 0, 2, 20]));
    add(
        "v6.example",
        300,
        RData::AAAA(AAAA("2001:db8::20".parse().unwrap())),
    );
    add("www.chain.example", 300, cname("edge.cdn.test"));
    add("edge.cdn.test", 60, cname("e1.cdn.test"));
    add("e1.cdn.test", 120, a([192, 0, 2, 30]));
    add("e1.cdn.test", 90, a([192, 0, 2, 31]));
    add("alias.example", 300, cname("bad.paste.example"));
    add("bad.paste.example", 300, a([192, 0, 2, 40]));
    add("paste.example", 300, a([192, 0, 2, 41]));
    add("unlisted.example", 300, a([192, 0, 2, 50]));
    add("metadata.github.example", 300, a([169, 254, 169, 254]));
    add("metadata.github.example", 300, a([192, 0, 2, 60]));
    for i in 0..100u8 {
        add("big.example", 600, a([198, 51, 100, i]));
    }
    z
}

/// The answer to one query, and its UDP size limit (the query's EDNS size, else 512).
fn respond(zone: &HashMap<String, Vec<Record>>, query: &Message, udp: bool) -> Vec<u8> {
    let mut r = Message::response(query.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = query.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_queries(query.queries.iter().cloned());
    let q = &query.queries[0];
    let mut owner = q.name.to_lowercase().to_ascii();
    owner.pop();
    // Follow CNAMEs within the zone, as an authoritative server for all of it would.
    let mut found = false;
    for _ in 0..8 {
        let Some(records) = zone.get(&owner) else {
            break;
        };
        found = true;
        let mut next = None;
        for rec in records {
            match &rec.data {
                RData::CNAME(t) => {
                    r.add_answer(rec.clone());
                    let mut t = t.0.to_ascii();
                    t.pop();
                    next = Some(t);
                }
                d if d.record_type() == q.query_type => {
                    r.add_answer(rec.clone());
                }
                _ => {}
            }
        }
        match next {
            Some(t) => owner = t,
            None => break,
        }
    }
    if !found {
        r.metadata.response_code = ResponseCode::NXDomain;
    }
    let limit = query
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload()).max(512));
    if let Some(e) = &query.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload().min(1232));
        r.set_edns(edns);
    }
    let bytes = r.to_vec().unwrap();
    if udp && bytes.len() > limit {
        return r.truncate().to_vec().unwrap();
    }
    bytes
}

/// What the upstream saw.
#[derive(Default)]
struct Seen {
    udp: AtomicUsize,
    tcp: AtomicUsize,
    /// Lowercase names asked, in order.
    names: Mutex<Vec<String>>,
    /// The largest EDNS size a query advertised.
    max_edns: AtomicUsize,
}

impl Seen {
    fn asked(&self, n: &str) -> bool {
        self.names.lock().unwrap().iter().any(|x| x == n)
    }
    fn note(&self, q: &Message) {
        let mut n = q.queries[0].name.to_lowercase().to_ascii();
        n.pop();
        self.names.lock().unwrap().push(n);
        if let Some(e) = &q.edns {
            self.max_edns
                .fetch_max(usize::from(e.max_payload()), Ordering::Relaxed);
        }
    }
}

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Seen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn upstream() -> Upstream {
    let udp = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let zone = Arc::new(zone());
    let seen = Arc::new(Seen::default());
    let (z, s) = (Arc::clone(&zone), Arc::clone(&seen));
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let q = Message::from_vec(&buf[..n]).unwrap();
            s.udp.fetch_add(1, Ordering::Relaxed);
            s.note(&q);
            let _ = udp.send_to(&respond(&z, &q, true), from).await;
        }
    });
    let (z, s) = (zone, Arc::clone(&seen));
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                continue;
            };
            let (z, s) = (Arc::clone(&z), Arc::clone(&s));
            tokio::spawn(async move {
                while let Ok(len) = stream.read_u16().await {
                    let mut buf = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let q = Message::from_vec(&buf).unwrap();
                    s.tcp.fetch_add(1, Ordering::Relaxed);
                    s.note(&q);
                    let r = respond(&z, &q, false);
                    let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&r);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        seen,
        tasks: vec![udp_task, tcp_task],
    }
}

// ---------------------------------------------------------------------------------------------
// The sink and the proxy
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Recorder {
    grants: Mutex<Vec<(ClientInfo, Grant)>>,
    refusals: Mutex<Vec<Refusal>>,
    fail: AtomicBool,
    /// Who asks (the kernel's owner record, in production); None: an unknown socket.
    asker: Mutex<Option<Asker>>,
}

impl GrantSink for Recorder {
    async fn grant(&self, client: ClientInfo, grant: Grant) -> Result<(), GrantError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(GrantError::Full("test: the grant map is full".into()));
        }
        self.grants.lock().unwrap().push((client, grant));
        Ok(())
    }

    fn refused(&self, _client: &ClientInfo, refusal: &Refusal) {
        self.refusals.lock().unwrap().push(refusal.clone());
    }

    fn asker(&self, _client: &ClientInfo) -> Option<Asker> {
        *self.asker.lock().unwrap()
    }
}

impl Recorder {
    fn grants_for(&self, n: &str) -> Vec<Grant> {
        self.grants
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, g)| g.name == n)
            .map(|(_, g)| g.clone())
            .collect()
    }
}

const POLICY: &str = r#"
[[service]]
name = "github"
hosts = ["github.example", "*.github.example"]
ports = [443]

[[service]]
name = "cdn"
hosts = ["www.chain.example"]

[[service]]
name = "big"
hosts = ["big.example"]

[[service]]
name = "long"
hosts = ["long.example", "v6.example"]

[[service]]
name = "alias"
hosts = ["alias.example"]

[[block]]
name = "paste"
hosts = ["paste.example", "**.paste.example"]
"#;

struct Setup {
    proxy: Arc<DnsProxy<Recorder>>,
    handle: ProxyHandle,
    upstream: Upstream,
}

impl Setup {
    fn sink(&self) -> &Recorder {
        self.proxy.sink()
    }
}

/// The proxy on 127.0.0.1 in front of a test upstream; `upstreams` go first (e.g. a dead one).
async fn setup(unlisted: &str, upstreams: &[&str]) -> Setup {
    setup_with("", unlisted, upstreams).await
}

/// [`setup`] with `extra` policy text (alerts) after the rules.
async fn setup_with(extra: &str, unlisted: &str, upstreams: &[&str]) -> Setup {
    let up = upstream().await;
    let mut list: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    list.push(format!("\"{}\"", up.addr));
    let text = format!(
        "{POLICY}\n{extra}\n[dns]\nupstream = [{}]\nmin_ttl = \"5s\"\nmax_ttl = \"1h\"\nunlisted = \"{unlisted}\"\n",
        list.join(", ")
    );
    let policy = Policy::parse("test.toml", &text).unwrap_or_else(|e| panic!("{e}"));
    let proxy_policy = ProxyPolicy::new(&policy, || panic!("the policy names its upstreams"))
        .expect("a proxy policy");
    // SO_MARK needs CAP_NET_ADMIN: as root the real mark, else none.
    let root = unsafe { libc::geteuid() } == 0;
    let config = ProxyConfig {
        upstream_mark: root.then_some(UPSTREAM_MARK),
        attempt_timeout: Duration::from_millis(800),
        query_timeout: Duration::from_secs(3),
        max_addresses: 64,
        ..ProxyConfig::default()
    };
    let proxy = DnsProxy::new(config, proxy_policy, Recorder::default());
    let handle = proxy
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("the proxy binds on loopback");
    Setup {
        proxy,
        handle,
        upstream: up,
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

fn query(qname: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    // Fully qualified, as names are on the wire (hickory compares FQDN flags too).
    let fqdn = if qname.ends_with('.') {
        qname.to_string()
    } else {
        format!("{qname}.")
    };
    m.add_query(Query::query(name(&fqdn), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

/// Asks over UDP; returns the reply and its size.
async fn ask_udp(proxy: SocketAddr, q: &Message) -> (Message, usize) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(proxy).await.unwrap();
    s.send(&q.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let n = timeout(WAIT, s.recv(&mut buf))
        .await
        .expect("the proxy answers within 5 s")
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id, "the client's ID comes back");
    assert_eq!(r.metadata.message_type, MessageType::Response);
    assert_eq!(r.queries, q.queries, "the question is echoed");
    (r, n)
}

async fn write_framed(s: &mut TcpStream, q: &Message) {
    let b = q.to_vec().unwrap();
    let mut framed = (b.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&b);
    s.write_all(&framed).await.unwrap();
}

async fn read_framed(s: &mut TcpStream) -> Message {
    let len = timeout(WAIT, s.read_u16())
        .await
        .expect("a TCP reply")
        .unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

async fn ask_tcp(proxy: SocketAddr, q: &Message) -> Message {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    write_framed(&mut s, q).await;
    let r = read_framed(&mut s).await;
    assert_eq!(r.metadata.id, q.metadata.id);
    r
}

fn addrs(r: &Message) -> Vec<IpAddr> {
    r.answers.iter().filter_map(|a| a.data.ip_addr()).collect()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// The Extended DNS Error of a reply: (info code, text).
fn ede(r: &Message) -> Option<(u16, String)> {
    r.edns
        .as_ref()?
        .options()
        .options
        .iter()
        .find_map(|(c, o)| match (u16::from(*c), o) {
            (15, hickory_proto::rr::rdata::opt::EdnsOption::Unknown(_, d)) if d.len() >= 2 => {
                Some((
                    u16::from_be_bytes([d[0], d[1]]),
                    String::from_utf8_lossy(&d[2..]).into_owned(),
                ))
            }
            _ => None,
        })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn covered_names_are_granted_before_the_reply_with_clamped_ttls() {
    let t = setup("resolve", &[]).await;
    let p = t.handle.local_addr;

    // TTL 2 s: granted for min_ttl (5 s); the reply is relayed as the upstream sent it.
    let (r, _) = ask_udp(p, &query("API.GitHub.example.", RecordType::A, Some(1232))).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&r), ips(&["192.0.2.10", "192.0.2.11"]));
    assert_eq!(r.answers[0].ttl, 2);
    let g = t.sink().grants_for("api.github.example");
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(g[0].addrs, ips(&["192.0.2.10", "192.0.2.11"]));
    assert_eq!(g[0].ttl, Duration::from_secs(5));
    assert!(g[0].cnames.is_empty());
    // The rule id of `github`, the first rule of the policy.
    assert_eq!(g[0].services, [1]);
    let (client, _) = t.sink().grants.lock().unwrap()[0];
    assert_eq!(client.transport, Transport::Udp);
    assert_eq!(client.source.ip(), IpAddr::from([127, 0, 0, 1]));

    // TTL one day: granted for max_ttl (1 h), and the client is told 1 h too, so that it does not
    // keep the address longer than its grant.
    let (r, _) = ask_udp(p, &query("long.example", RecordType::A, None)).await;
    assert_eq!(r.answers[0].ttl, 3600);
    let g = t.sink().grants_for("long.example");
    assert_eq!(g[0].ttl, Duration::from_secs(3600));

    // AAAA, over TCP.
    let r = ask_tcp(p, &query("v6.example", RecordType::AAAA, None)).await;
    assert_eq!(addrs(&r), ips(&["2001:db8::20"]));
    let g = t.sink().grants_for("v6.example");
    assert_eq!(g[0].addrs, ips(&["2001:db8::20"]));
    assert_eq!(g[0].ttl, Duration::from_secs(300));

    // Link-local (metadata) addresses are never granted, the others of the answer are.
    let (r, _) = ask_udp(p, &query("metadata.github.example", RecordType::A, None)).await;
    assert_eq!(addrs(&r).len(), 2, "the answer is relayed whole");
    let g = t.sink().grants_for("metadata.github.example");
    assert_eq!(g[0].addrs, ips(&["192.0.2.60"]));

    let c = t.proxy.counters().snapshot();
    assert_eq!(c.grants, 4);
    assert_eq!(c.addresses_never_granted, 1);
    assert_eq!(c.queries_tcp, 1);
}

#[tokio::test]
async fn a_cname_chain_grants_its_final_addresses_with_the_smallest_ttl() {
    let t = setup("resolve", &[]).await;
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("www.chain.example", RecordType::A, Some(1232)),
    )
    .await;
    assert_eq!(r.answers.len(), 4, "two CNAMEs and two addresses relayed");
    let g = t.sink().grants_for("www.chain.example");
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].cnames, ["edge.cdn.test", "e1.cdn.test"]);
    assert_eq!(g[0].addrs, ips(&["192.0.2.30", "192.0.2.31"]));
    // min(300, 60, 120, 90) = 60, within [5 s, 1 h].
    assert_eq!(g[0].ttl, Duration::from_secs(60));
}

#[tokio::test]
async fn blocked_names_get_nxdomain_no_grant_and_never_reach_the_upstream() {
    let t = setup("resolve", &[]).await;
    let p = t.handle.local_addr;
    for n in ["paste.example", "bad.paste.example", "A.B.Paste.Example."] {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
            let (r, _) = ask_udp(p, &query(n, qtype, Some(1232))).await;
            assert_eq!(r.metadata.response_code, BLOCKED_RCODE, "{n} {qtype}");
            assert!(r.answers.is_empty());
            assert_eq!(ede(&r), Some((15, "egress: paste".to_string())));
        }
    }
    // Without EDNS: NXDOMAIN and no OPT record (none may be added to a non-EDNS exchange).
    let r = ask_tcp(p, &query("paste.example", RecordType::A, None)).await;
    assert_eq!(r.metadata.response_code, BLOCKED_RCODE);
    assert!(r.edns.is_none());
    assert!(t.sink().grants.lock().unwrap().is_empty());
    assert!(!t.upstream.seen.asked("paste.example"));
    assert!(!t.upstream.seen.asked("bad.paste.example"));

    // A covered name whose CNAME leads to a blocked one: asked upstream, answered as blocked.
    let (r, _) = ask_udp(p, &query("alias.example", RecordType::A, Some(1232))).await;
    assert_eq!(r.metadata.response_code, BLOCKED_RCODE);
    assert!(r.answers.is_empty());
    assert!(t.sink().grants.lock().unwrap().is_empty());

    let refusals = t.sink().refusals.lock().unwrap().clone();
    assert_eq!(refusals.len(), 11);
    assert_eq!(refusals[0].name, "paste.example");
    assert_eq!(refusals[0].qtype, "A");
    assert_eq!(refusals[0].reason, RefusalReason::Blocked { rule_id: 6 });
    assert_eq!(
        refusals[10].reason,
        RefusalReason::BlockedTarget {
            rule_id: 6,
            target: "bad.paste.example".into()
        }
    );
    let c = t.proxy.counters().snapshot();
    assert_eq!((c.blocked, c.blocked_target, c.grants), (10, 1, 0));
}

#[tokio::test]
async fn unlisted_names_resolve_or_are_refused() {
    let t = setup("resolve", &[]).await;
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("unlisted.example", RecordType::A, None),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&r), ips(&["192.0.2.50"]));
    assert!(
        t.sink().grants.lock().unwrap().is_empty(),
        "nothing granted"
    );
    // A name the upstream does not know: its NXDOMAIN is relayed.
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("nowhere.example", RecordType::A, None),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(ede(&r).is_none());

    let t = setup("refuse", &[]).await;
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("unlisted.example", RecordType::A, Some(1232)),
    )
    .await;
    assert_eq!(r.metadata.response_code, BLOCKED_RCODE);
    assert_eq!(ede(&r), Some((15, "egress: unlisted".to_string())));
    assert!(!t.upstream.seen.asked("unlisted.example"));
    assert_eq!(t.proxy.counters().snapshot().refused_unlisted, 1);
    // Covered names still resolve.
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("long.example", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&r), ips(&["192.0.2.20"]));
    assert_eq!(t.sink().grants_for("long.example").len(), 1);
}

#[tokio::test]
async fn truncated_answers_are_fetched_over_tcp_and_clients_told_to_retry() {
    let t = setup("resolve", &[]).await;
    let p = t.handle.local_addr;
    // A client that takes 65494 bytes (systemd-resolved's stub advertises that): the proxy asks
    // with 1232, the upstream truncates, the proxy asks again over TCP and relays all of it.
    let (r, size) = ask_udp(p, &query("big.example", RecordType::A, Some(65494))).await;
    assert!(!r.metadata.truncation);
    assert_eq!(addrs(&r).len(), 100);
    assert!(size > 1232, "{size}");
    assert_eq!(t.upstream.seen.max_edns.load(Ordering::Relaxed), 1232);
    assert_eq!(t.upstream.seen.tcp.load(Ordering::Relaxed), 1);
    let g = t.sink().grants_for("big.example");
    assert_eq!(g[0].addrs.len(), 64, "at most max_addresses granted");
    let c = t.proxy.counters().snapshot();
    assert_eq!((c.upstream_truncated, c.limit_addresses), (1, 1));

    // A client without EDNS (512 bytes): TC and no records, then the whole answer over TCP.
    let (r, size) = ask_udp(p, &query("big.example", RecordType::A, None)).await;
    assert!(r.metadata.truncation && r.answers.is_empty() && size <= 512);
    let r = ask_tcp(p, &query("big.example", RecordType::A, None)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(addrs(&r).len(), 100);
    let c = t.proxy.counters().snapshot();
    assert_eq!(c.client_truncated, 1);
    // Granted from each complete answer: the EDNS client's, the truncated exchange's (the proxy
    // had the whole answer), and the TCP retry's.
    assert_eq!(t.sink().grants_for("big.example").len(), 3);
}

#[tokio::test]
async fn a_failing_sink_gives_servfail_and_no_answer() {
    let t = setup("resolve", &[]).await;
    t.sink().fail.store(true, Ordering::Relaxed);
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("api.github.example", RecordType::A, None),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(r.answers.is_empty(), "no address without its grant");
    assert_eq!(t.proxy.counters().snapshot().grant_failures, 1);
    // Unlisted names need no grant: they still resolve.
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("unlisted.example", RecordType::A, None),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_and_no_upstream_means_servfail() {
    // 127.0.0.3:9 answers nothing (ICMP port unreachable, or no reply): the next one answers.
    let t = setup("resolve", &["127.0.0.3:9"]).await;
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("long.example", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&r), ips(&["192.0.2.20"]));
    assert!(t.proxy.counters().snapshot().upstream_retries >= 1);

    // Only dead upstreams: SERVFAIL within the query's deadline (3 s here).
    let policy = Policy::parse(
        "dead.toml",
        &format!("{POLICY}\n[dns]\nupstream = [\"127.0.0.3:9\"]\n"),
    )
    .unwrap();
    let proxy = DnsProxy::new(
        ProxyConfig {
            upstream_mark: None,
            query_timeout: Duration::from_secs(2),
            ..ProxyConfig::default()
        },
        ProxyPolicy::new(&policy, || unreachable!()).unwrap(),
        Recorder::default(),
    );
    let handle = proxy.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (r, _) = ask_udp(
        handle.local_addr,
        &query("long.example", RecordType::A, None),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(proxy.counters().snapshot().upstream_failures, 1);
}

#[tokio::test]
async fn pipelined_tcp_queries_are_all_answered() {
    let t = setup("resolve", &[]).await;
    let mut s = TcpStream::connect(t.handle.local_addr).await.unwrap();
    let qs = [
        query("api.github.example", RecordType::A, None),
        query("v6.example", RecordType::AAAA, None),
        query("paste.example", RecordType::A, None),
    ];
    for q in &qs {
        write_framed(&mut s, q).await;
    }
    let mut got: HashMap<u16, Message> = HashMap::new();
    for _ in 0..qs.len() {
        let r = read_framed(&mut s).await;
        got.insert(r.metadata.id, r);
    }
    assert_eq!(
        addrs(&got[&qs[0].metadata.id]),
        ips(&["192.0.2.10", "192.0.2.11"])
    );
    assert_eq!(addrs(&got[&qs[1].metadata.id]), ips(&["2001:db8::20"]));
    assert_eq!(
        got[&qs[2].metadata.id].metadata.response_code,
        BLOCKED_RCODE
    );
    assert_eq!(t.proxy.counters().snapshot().queries_tcp, 3);
}

#[tokio::test]
async fn garbage_gets_formerr_or_nothing() {
    let t = setup("resolve", &[]).await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(t.handle.local_addr).await.unwrap();
    // A header and junk: FORMERR with the same ID.
    s.send(&[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff])
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let n = timeout(WAIT, s.recv(&mut buf)).await.unwrap().unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (0x1234, ResponseCode::FormErr)
    );
    // Less than a header: nothing, and the proxy keeps serving.
    s.send(&[1, 2, 3]).await.unwrap();
    let (r, _) = ask_udp(
        t.handle.local_addr,
        &query("long.example", RecordType::A, None),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(t.proxy.counters().snapshot().malformed, 2);
}

#[tokio::test]
async fn a_dns_alert_block_refuses_every_type_and_tcp_and_never_forwards() {
    let t = setup_with(
        "[[alert]]\nname = \"tun\"\ndns_unique_subdomains = 5\nwindow = \"1m\"\naction = \"block\"\n",
        "resolve",
        &[],
    )
    .await;
    let proxy = t.handle.local_addr;
    // An unknown socket (not steered by the kernel): not counted.
    for i in 0..10 {
        ask_udp(
            proxy,
            &query(&format!("u{i}.tunnel.example"), RecordType::A, None),
        )
        .await;
    }
    assert_eq!(t.proxy.counters().snapshot().tunnel_unknown_asker, 10);
    assert_eq!(t.proxy.tunnel().held(), (0, 0));

    *t.sink().asker.lock().unwrap() = Some(Asker {
        tgid: 7,
        cgroup_id: 9,
    });
    // Five distinct names (in mixed case, as 0x20 resolvers ask): forwarded, the fifth fires.
    for i in 0..5 {
        let n = format!("C{i}.Tunnel.Example");
        ask_udp(proxy, &query(&n, RecordType::TXT, Some(1232))).await;
        assert!(t.upstream.seen.asked(&n.to_lowercase()), "{n} forwarded");
    }
    let (fired, _) = t.proxy.tunnel().take();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].key.text(), "dns:process:7:tunnel.example");
    // Blocked: every type, UDP and TCP, the apex too; never forwarded.
    for (i, qtype) in [
        RecordType::A,
        RecordType::AAAA,
        RecordType::TXT,
        RecordType::NULL,
        RecordType::CNAME,
        RecordType::MX,
    ]
    .into_iter()
    .enumerate()
    {
        let n = format!("b{i}.tunnel.example");
        let (r, _) = ask_udp(proxy, &query(&n, qtype, Some(1232))).await;
        assert_eq!(r.metadata.response_code, BLOCKED_RCODE, "{qtype}");
        assert_eq!(ede(&r), Some((15, "egress: tun".into())), "{qtype}");
        let r = ask_tcp(proxy, &query(&n, qtype, Some(1232))).await;
        assert_eq!(r.metadata.response_code, BLOCKED_RCODE, "{qtype} over TCP");
        assert!(!t.upstream.seen.asked(&n), "{n} never forwarded");
    }
    let (r, _) = ask_udp(proxy, &query("tunnel.example", RecordType::A, None)).await;
    assert_eq!(r.metadata.response_code, BLOCKED_RCODE);
    // Another registered domain is answered (and granted).
    let (r, _) = ask_udp(proxy, &query("api.github.example", RecordType::A, None)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(t.sink().grants_for("api.github.example").len(), 1);
    let refusals = t.sink().refusals.lock().unwrap().clone();
    assert_eq!(refusals.len(), 13);
    assert!(refusals.iter().all(|r| r.reason
        == RefusalReason::Tunnel {
            alert_rule: "tun".into(),
            key: "dns:process:7:tunnel.example".into()
        }));
    assert_eq!(t.proxy.counters().snapshot().refused_tunnel, 13);
    // Another process of the same cgroup is not blocked (per = "process").
    *t.sink().asker.lock().unwrap() = Some(Asker {
        tgid: 8,
        cgroup_id: 9,
    });
    // (The test upstream knows no tunnel.example: NXDOMAIN from it, forwarded, no EDE.)
    let (r, _) = ask_udp(proxy, &query("x.tunnel.example", RecordType::A, Some(1232))).await;
    assert_eq!(ede(&r), None);
    assert!(t.upstream.seen.asked("x.tunnel.example"));
    // Lifted: answered again.
    *t.sink().asker.lock().unwrap() = Some(Asker {
        tgid: 7,
        cgroup_id: 9,
    });
    let key = DnsBlockKey::parse("dns:process:7:tunnel.example")
        .unwrap()
        .unwrap();
    assert!(t.proxy.tunnel().lift(&key, "egress unblock"));
    ask_udp(proxy, &query("y.tunnel.example", RecordType::A, None)).await;
    assert!(t.upstream.seen.asked("y.tunnel.example"));
}
