//! Real-kernel tests of DNS steering and grants, below the proxy: the hooks rewrite a query's
//! destination to the proxy's address (here a plain echo server the test runs), the answer's
//! source and the socket's peer read as the server the process asked, the proxy's own marked
//! sockets and other namespaces are left alone; and a grant approves one address for one
//! cgroup, with the service's ports, until it expires.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use egress::{
    datapath::{Datapath, DnsSteering},
    policy::{
        Policy,
        compile::{CompiledPolicy, HostSet},
    },
    sys::clock::boot_ns,
};
use egress_common::{
    ACTION_ALLOW, GRANT_SET_BASE, GrantKey, GrantValue, PROTO_TCP, PortRule, RuleSet,
};
use egress_tests::{
    LoopNs, Probe, TestCgroup,
    Verdict::{Denied, Refused, Succeeded},
    in_netns,
    probe::CallLine,
};

const POLICY: &str = r#"
mode = "enforce"
allow_loopback = false
"#;

/// Where the stand-in proxy listens.
const PROXY_PORT: u16 = 5353;

/// A UDP and TCP echo server on 127.0.0.1 and ::1, port `PROXY_PORT`, in `ns`: what the
/// steered queries reach. Counts what it answered; stops when dropped.
struct Echo {
    answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(ns: &LoopNs) -> Echo {
        let answered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for ip in ["127.0.0.1", "::1"] {
            let addr: SocketAddr = (ip.parse::<std::net::IpAddr>().unwrap(), PROXY_PORT).into();
            let (udp, tcp) = in_netns(ns, move || {
                (
                    UdpSocket::bind(addr).unwrap(),
                    TcpListener::bind(addr).unwrap(),
                )
            });
            udp.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let (a, s) = (answered.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            tcp.set_nonblocking(true).unwrap();
            let (a, s) = (answered.clone(), stop.clone());
            thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut c, _)) => {
                            c.set_nonblocking(false).unwrap();
                            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                            let mut len = [0u8; 2];
                            if c.read_exact(&mut len).is_ok() {
                                let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                                if c.read_exact(&mut msg).is_ok() {
                                    let _ = c.write_all(&len);
                                    let _ = c.write_all(&msg);
                                    a.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        Echo { answered, stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `SO_NETNS_COOKIE` of namespace `ns`.
fn netns_cookie(ns: &LoopNs) -> u64 {
    in_netns(ns, || {
        egress::sys::sockdiag::netns_cookie().expect("SO_NETNS_COOKIE")
    })
}

fn load(policy: CompiledPolicy, cg: &TestCgroup) -> Datapath {
    let mut dp = Datapath::load(&policy).expect("loading the datapath (root)");
    dp.attach(cg.path()).unwrap();
    dp
}

fn steering(ns: &LoopNs) -> DnsSteering {
    DnsSteering {
        v4: Ipv4Addr::LOCALHOST,
        v6: Ipv6Addr::LOCALHOST,
        port: PROXY_PORT,
        port6: PROXY_PORT,
        netns_cookie: netns_cookie(ns),
    }
}

fn run(ns: &LoopNs, cg: &TestCgroup, args: &[&str]) -> Vec<CallLine> {
    Probe::new().netns(ns).cgroup(cg).args(args).run()
}

#[test]
fn queries_are_steered_and_answers_show_the_server_asked() {
    let ns = LoopNs::new();
    let cg = TestCgroup::new();
    let echo = Echo::start(&ns);
    let p = Policy::parse("t.toml", POLICY).unwrap();
    let mut dp = load(CompiledPolicy::compile(&p).unwrap(), &cg);
    dp.set_dns(Some(steering(&ns))).unwrap();
    // 10.53.0.1 has no route in this namespace: only steering can answer.
    let lines = run(
        &ns,
        &cg,
        &[
            "dns-udp",
            "10.53.0.1:53",
            "dns-udp-connected",
            "10.53.0.1:53",
            "dns-tcp",
            "10.53.0.1:53",
            "dns-udp",
            "[fd53::1]:53",
            "dns-udp",
            "[::ffff:10.53.0.1]:53",
            "dns-tcp",
            "[fd53::1]:53",
        ],
    );
    let got: Vec<_> = lines
        .iter()
        .map(|l| (l.result.clone(), l.from.as_deref(), l.peer.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (Succeeded, Some("10.53.0.1:53"), None),
            (Succeeded, Some("10.53.0.1:53"), Some("10.53.0.1:53")),
            (Succeeded, None, Some("10.53.0.1:53")),
            (Succeeded, Some("[fd53::1]:53"), None),
            (Succeeded, Some("[::ffff:10.53.0.1]:53"), None),
            (Succeeded, None, Some("[fd53::1]:53")),
        ],
        "{lines:#?}"
    );
    assert_eq!(echo.answered.load(Ordering::Relaxed), 6);
    assert!(dp.stats().unwrap().dns_steered >= 6);

    // Not steered: the proxy's own marked sockets (they are judged like any other: default
    // deny here), and other ports.
    let lines = run(
        &ns,
        &cg,
        &[
            "dns-udp-marked",
            "10.53.0.1:53",
            "dns-udp",
            "10.53.0.1:5300",
        ],
    );
    let got: Vec<_> = lines.iter().map(|l| l.result.clone()).collect();
    assert_eq!(got, [Denied, Denied], "{lines:#?}");

    // A socket of another namespace (the proxy's loopback is not its own): not steered.
    dp.set_dns(Some(DnsSteering {
        netns_cookie: 1,
        ..steering(&ns)
    }))
    .unwrap();
    let lines = run(&ns, &cg, &["dns-udp", "10.53.0.1:53"]);
    assert_eq!(lines[0].result, Denied, "{lines:#?}");
    // Steering off: judged by the policy.
    dp.set_dns(None).unwrap();
    let lines = run(&ns, &cg, &["dns-udp", "10.53.0.1:53"]);
    assert_eq!(lines[0].result, Denied, "{lines:#?}");
    assert_eq!(echo.answered.load(Ordering::Relaxed), 6);
}

/// A policy that uses names blocks DNS over TLS (port 853) even where its address rules
/// approve it: names resolve through the proxy or not at all. Without names the policy decides.
#[test]
fn a_policy_with_names_blocks_dns_over_tls() {
    let ns = LoopNs::new();
    let base = "mode = \"enforce\"\nallow_loopback = false\n[[service]]\nname = \"lo\"\ndestinations = [\"127.0.0.0/8\"]\n";
    let verdicts = |policy: &str| {
        let cg = TestCgroup::new();
        let compiled = CompiledPolicy::compile(&Policy::parse("t.toml", policy).unwrap()).unwrap();
        let mut dp = load(compiled.clone(), &cg);
        let mut ring = dp.take_events().unwrap();
        let v: Vec<egress_tests::Verdict> = run(
            &ns,
            &cg,
            &["tcp", "127.0.0.2:853", "udp-sendto", "127.0.0.2:853"],
        )
        .into_iter()
        .map(|l| l.result)
        .collect();
        let mut rules = Vec::new();
        while let Some(ev) = ring.try_next() {
            rules.push(compiled.rule_name(ev.rule_id).to_string());
        }
        (v, rules)
    };
    assert_eq!(
        verdicts(base),
        (vec![Refused, Succeeded], vec![]),
        "approved by address"
    );
    let with_names = format!("{base}[dns]\nunlisted = \"refuse\"\n");
    assert_eq!(
        verdicts(&with_names),
        (
            vec![Denied, Denied],
            vec!["dns-over-tls".to_string(), "dns-over-tls".to_string()]
        )
    );
}

#[test]
fn a_grant_approves_one_address_for_one_cgroup_with_the_services_ports_until_it_expires() {
    let ns = LoopNs::new();
    let cg = TestCgroup::new();
    let other = TestCgroup::new();
    let p = Policy::parse("t.toml", POLICY).unwrap();
    let mut compiled = CompiledPolicy::compile(&p).unwrap();
    let mut set = RuleSet {
        len: 1,
        ..RuleSet::default()
    };
    set.rules[0] = PortRule {
        port_lo: 8080,
        port_hi: 8080,
        proto_mask: PROTO_TCP,
        action: ACTION_ALLOW,
        rule_id: 1,
        ..PortRule::default()
    };
    compiled.host_sets = vec![HostSet {
        rule_id: 1,
        slot: 7,
        set,
    }];
    let mut dp = load(compiled, &cg);
    dp.attach(other.path()).unwrap();
    dp.set_dns(Some(steering(&ns))).unwrap();
    let grant = |cgroup_id: u64, last: u8, until_ns: u64| {
        (
            GrantKey {
                cgroup_id,
                family: 4,
                _pad: [0; 7],
                addr: [127, 0, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            },
            GrantValue {
                until_ns,
                ruleset: GRANT_SET_BASE | 7,
                _pad: 0,
            },
        )
    };
    let later = boot_ns() + 60_000_000_000;
    let (k, v) = grant(cg.id(), 2, later);
    dp.grant(k, v).unwrap();
    let (k, v) = grant(cg.id(), 3, boot_ns() - 1);
    dp.grant(k, v).unwrap();
    let verdicts = |cg: &TestCgroup, args: &[&str]| -> Vec<egress_tests::Verdict> {
        run(&ns, cg, args).into_iter().map(|l| l.result).collect()
    };
    assert_eq!(
        verdicts(
            &cg,
            &[
                "tcp",
                "127.0.0.2:8080",
                "tcp",
                "127.0.0.2:9090",
                "udp-sendto",
                "127.0.0.2:8080",
                "tcp",
                "127.0.0.3:8080",
                "tcp",
                "127.0.0.4:8080",
            ]
        ),
        [Refused, Denied, Denied, Denied, Denied],
        "granted: the service's port and protocol only; expired and ungranted: denied"
    );
    assert_eq!(
        verdicts(&other, &["tcp", "127.0.0.2:8080"]),
        [Denied],
        "another cgroup that did not resolve the name"
    );
    assert_eq!(dp.prune_grants(boot_ns()).unwrap(), 1, "the expired one");
    assert_eq!(dp.grants().unwrap().len(), 1);
    // A block on the address wins over the grant.
    let blocked = Policy::parse(
        "t.toml",
        "mode = \"enforce\"\nallow_loopback = false\n[[block]]\nname = \"b\"\ndestinations = [\"127.0.0.2\"]\n",
    )
    .unwrap();
    let mut compiled = CompiledPolicy::compile(&blocked).unwrap();
    compiled.host_sets = vec![HostSet {
        rule_id: 1,
        slot: 7,
        set,
    }];
    dp.reload(&compiled).unwrap();
    assert_eq!(verdicts(&cg, &["tcp", "127.0.0.2:8080"]), [Denied]);
}
