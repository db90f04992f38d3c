use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::policy::alert::{Alert, AlertAction, AlertPer, DnsThresholds};

fn dns_alert(name: &str, th: DnsThresholds, per: AlertPer, action: AlertAction) -> Alert {
    Alert {
        name: name.into(),
        bytes: 0,
        window: Duration::from_secs(60),
        per,
        action,
        cooldown: Duration::from_secs(60),
        services: Vec::new(),
        destinations: Vec::new(),
        exclude_destinations: Vec::new(),
        unapproved_only: false,
        dns: Some(th),
        line: 1,
    }
}

fn unique(n: u64) -> DnsThresholds {
    DnsThresholds {
        unique_subdomains: Some(n),
        min_queries: 20,
        ..Default::default()
    }
}

const P1: Asker = Asker {
    tgid: 100,
    cgroup_id: 7,
};
const P2: Asker = Asker {
    tgid: 200,
    cgroup_id: 7,
};

fn ask(w: &mut TunnelWatch, who: Asker, name: &str, at: Instant) -> Screen {
    w.observe(who, name, at, SystemTime::now())
}

#[test]
fn registered_domains_follow_the_public_suffix_list() {
    for (name, domain, sub) in [
        ("a.b.example.com", "example.com", "a.b"),
        ("example.com", "example.com", ""),
        ("example.com.", "example.com", ""),
        ("x.y.example.co.uk", "example.co.uk", "x.y"),
        ("www.bbc.co.uk", "bbc.co.uk", "www"),
        // Private suffixes: each github.io site is its own registered domain.
        ("foo.alice.github.io", "alice.github.io", "foo"),
        ("d1.s3.amazonaws.com", "d1.s3.amazonaws.com", ""),
        // Unknown top-level domains count under their last two labels.
        ("mfrgg.0.t.example.test", "example.test", "mfrgg.0.t"),
        // A public suffix itself, or one label, counts under itself.
        ("co.uk", "co.uk", ""),
        ("localhost", "localhost", ""),
    ] {
        assert_eq!(split(name), (domain, sub), "{name}");
    }
}

#[test]
fn entropy_in_bits_per_character_without_dots() {
    assert_eq!(entropy(""), 0.0);
    assert_eq!(entropy("www"), 0.0);
    assert!((entropy("ab") - 1.0).abs() < 1e-9);
    assert!((entropy("ab.cd") - 2.0).abs() < 1e-9);
    // Base32 of random-looking bytes: close to its 5 bits a character.
    let b32 = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwey3e";
    assert!(entropy(b32) > 4.0, "{}", entropy(b32));
    // Names people use stay low.
    for n in ["www", "mail", "api", "cdn", "static"] {
        assert!(entropy(n) < 2.6, "{n}: {}", entropy(n));
    }
}

#[test]
fn unique_subdomains_fire_at_the_threshold_and_not_before() {
    let t0 = Instant::now();
    let mut w = TunnelWatch::new(
        &[dns_alert(
            "tun",
            unique(10),
            AlertPer::Process,
            AlertAction::Alert,
        )],
        t0,
    );
    for i in 0..9 {
        assert_eq!(
            ask(&mut w, P1, &format!("n{i}.t.example.test"), t0),
            Screen::Pass
        );
        // The same names again, and in other cases (0x20), make no new ones.
        ask(&mut w, P1, &format!("N{i}.T.Example.TEST"), t0);
    }
    assert!(w.take().0.is_empty());
    ask(&mut w, P1, "n9.t.example.test", t0);
    let (fired, _) = w.take();
    assert_eq!(fired.len(), 1);
    let f = &fired[0];
    assert_eq!(f.unique_subdomains, 10);
    assert_eq!(f.key.text(), "dns:process:100:example.test");
    assert_eq!(f.reasons, vec!["dns_unique_subdomains"]);
    assert_eq!(f.queries, 19);
    assert_eq!(f.samples.len(), 5);
    assert_eq!(f.samples.last().unwrap(), "n9.t.example.test");
    // Within the cooldown it does not fire again.
    for i in 10..30 {
        ask(&mut w, P1, &format!("n{i}.t.example.test"), t0);
    }
    assert!(w.take().0.is_empty());
}

#[test]
fn the_window_slides_and_other_domains_and_processes_count_apart() {
    let t0 = Instant::now();
    let mut w = TunnelWatch::new(
        &[dns_alert(
            "tun",
            unique(10),
            AlertPer::Process,
            AlertAction::Alert,
        )],
        t0,
    );
    // 6 names now, 6 more after the window: never 10 within one.
    for i in 0..6 {
        ask(&mut w, P1, &format!("a{i}.example.test"), t0);
        // Other domains and other processes are their own keys.
        ask(&mut w, P1, &format!("b{i}.other.test"), t0);
        ask(&mut w, P2, &format!("c{i}.example.test"), t0);
    }
    let later = t0 + Duration::from_secs(61);
    for i in 6..12 {
        ask(&mut w, P1, &format!("a{i}.example.test"), later);
    }
    assert!(w.take().0.is_empty());
    // 4 more within the window of the last 6: 10.
    for i in 12..16 {
        ask(
            &mut w,
            P1,
            &format!("a{i}.example.test"),
            later + Duration::from_secs(1),
        );
    }
    let (fired, _) = w.take();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].unique_subdomains, 10);
}

#[test]
fn per_cgroup_adds_the_processes_of_a_cgroup_up() {
    let t0 = Instant::now();
    let mut w = TunnelWatch::new(
        &[dns_alert(
            "tun",
            unique(10),
            AlertPer::Cgroup,
            AlertAction::Alert,
        )],
        t0,
    );
    for i in 0..5 {
        ask(&mut w, P1, &format!("p{i}.example.test"), t0);
        ask(&mut w, P2, &format!("q{i}.example.test"), t0);
    }
    let (fired, _) = w.take();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].key.text(), "dns:cgroup:7:example.test");
    assert_eq!(fired[0].asker, P2);
}

#[test]
fn name_bytes_and_entropy_thresholds() {
    let t0 = Instant::now();
    let bytes = DnsThresholds {
        bytes: Some(1000),
        min_queries: 20,
        ..Default::default()
    };
    let ent = DnsThresholds {
        entropy_millibits: Some(3500),
        min_queries: 5,
        ..Default::default()
    };
    let mut w = TunnelWatch::new(
        &[
            dns_alert("bytes", bytes, AlertPer::Process, AlertAction::Alert),
            dns_alert("entropy", ent, AlertPer::Process, AlertAction::Alert),
        ],
        t0,
    );
    // The same plain name over and over: bytes add up, entropy stays low.
    let name = "www.example.com"; // 15 bytes
    for _ in 0..66 {
        ask(&mut w, P1, name, t0);
    }
    assert!(w.take().0.is_empty());
    ask(&mut w, P1, name, t0);
    let (fired, _) = w.take();
    assert_eq!(fired.len(), 1);
    assert_eq!(
        (fired[0].alert_rule.as_str(), fired[0].dns_bytes),
        ("bytes", 1005)
    );
    assert_eq!(fired[0].entropy, 0.0);
    // High-entropy names: fire once 5 were seen, not before.
    let names = [
        "mfrggzdfmztwq2lk.example.org",
        "nnwg23tpobyxe43u.example.org",
        "ov3ho6dzpjqwey3e.example.org",
        "gmzdgnbvgy3tqojq.example.org",
    ];
    for n in names {
        ask(&mut w, P2, n, t0);
    }
    assert!(w.take().0.is_empty());
    ask(&mut w, P2, "mjzxi5dbnbsxe3lp.example.org", t0);
    let (fired, _) = w.take();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].alert_rule, "entropy");
    assert_eq!(fired[0].reasons, vec!["dns_entropy"]);
    assert!(fired[0].entropy >= 3.5, "{}", fired[0].entropy);
}

#[test]
fn a_block_refuses_that_asker_and_domain_until_it_ends_or_is_lifted() {
    let t0 = Instant::now();
    let mut w = TunnelWatch::new(
        &[dns_alert(
            "tun",
            unique(5),
            AlertPer::Process,
            AlertAction::Block,
        )],
        t0,
    );
    for i in 0..5 {
        assert_eq!(
            ask(&mut w, P1, &format!("x{i}.example.test"), t0),
            Screen::Pass
        );
    }
    let (fired, _) = w.take();
    assert_eq!(fired[0].block_for, Some(Duration::from_secs(60)));
    let refused = Screen::Refused {
        alert_rule: "tun".into(),
        key: "dns:process:100:example.test".into(),
    };
    // Any name of the domain, the apex included, in any case.
    for n in ["x9.example.test", "example.test", "A.B.EXAMPLE.TEST."] {
        assert_eq!(ask(&mut w, P1, n, t0), refused, "{n}");
    }
    // Another domain, another process: answered.
    assert_eq!(ask(&mut w, P1, "www.example.org", t0), Screen::Pass);
    assert_eq!(ask(&mut w, P2, "x1.example.test", t0), Screen::Pass);
    assert_eq!(w.blocks(t0).len(), 1);
    assert_eq!(w.stats().refused, 3);
    // The cooldown ends it.
    w.sweep(t0 + Duration::from_secs(61));
    let (_, lifted) = w.take();
    assert_eq!(lifted.len(), 1);
    assert_eq!(lifted[0].reason, "cooldown ended");
    assert_eq!(
        ask(&mut w, P1, "x9.example.test", t0 + Duration::from_secs(61)),
        Screen::Pass
    );
    // Fired again after the cooldown; lifted by hand.
    let t1 = t0 + Duration::from_secs(62);
    for i in 20..30 {
        ask(&mut w, P1, &format!("x{i}.example.test"), t1);
    }
    assert_eq!(w.take().0.len(), 1);
    let key = DnsBlockKey::parse("dns:process:100:Example.Test")
        .unwrap()
        .unwrap();
    assert!(w.lift(&key, "egress unblock"));
    assert!(!w.lift(&key, "egress unblock"));
    assert_eq!(ask(&mut w, P1, "x9.example.test", t1), Screen::Pass);
    assert_eq!(w.take().1[0].reason, "egress unblock");
}

#[test]
fn a_cgroup_block_covers_every_process_of_the_cgroup() {
    let t0 = Instant::now();
    let mut w = TunnelWatch::new(
        &[dns_alert(
            "tun",
            unique(4),
            AlertPer::Cgroup,
            AlertAction::Block,
        )],
        t0,
    );
    for i in 0..4 {
        ask(&mut w, P1, &format!("y{i}.example.test"), t0);
    }
    assert!(matches!(
        ask(&mut w, P2, "www.example.test", t0),
        Screen::Refused { .. }
    ));
    let other = Asker {
        tgid: 300,
        cgroup_id: 8,
    };
    assert_eq!(ask(&mut w, other, "www.example.test", t0), Screen::Pass);
}

#[test]
fn keys_parse_and_print() {
    for s in ["dns:process:41:example.test", "dns:cgroup:9:example.co.uk"] {
        assert_eq!(DnsBlockKey::parse(s).unwrap().unwrap().text(), s);
    }
    assert!(DnsBlockKey::parse("process:41").is_none());
    for bad in [
        "dns:process:x:a.b",
        "dns:user:1:a.b",
        "dns:process:1:",
        "dns:process:1",
    ] {
        assert!(DnsBlockKey::parse(bad).unwrap().is_err(), "{bad}");
    }
}

#[test]
fn state_is_bounded_under_a_flood_of_unique_names() {
    let t0 = Instant::now();
    let mut w = TunnelWatch::new(
        &[dns_alert(
            "tun",
            unique(300),
            AlertPer::Process,
            AlertAction::Alert,
        )],
        t0,
    );
    // One key: never more than its cap, however many names.
    for i in 0..5000 {
        ask(&mut w, P1, &format!("{i:08x}.example.test"), t0);
    }
    assert_eq!(w.held(), (1, 300));
    assert!(w.stats().names_evicted >= 4700);
    // Many keys: never more than MAX_KEYS; the least recently seen go.
    for i in 0..(MAX_KEYS + 500) {
        let who = Asker {
            tgid: 1000 + i as u32,
            cgroup_id: 7,
        };
        ask(
            &mut w,
            who,
            &format!("a.d{i}.test"),
            t0 + Duration::from_millis(i as u64),
        );
    }
    let (keys, names) = w.held();
    assert!(keys <= MAX_KEYS && keys > MAX_KEYS - MAX_KEYS / 8, "{keys}");
    assert!(names <= MAX_NAMES);
    assert!(w.stats().keys_evicted >= 500);
    // Idle keys go once their window passed.
    w.sweep(t0 + Duration::from_secs(120));
    assert_eq!(w.held(), (0, 0));
}

#[test]
fn without_dns_alerts_nothing_is_counted() {
    let t0 = Instant::now();
    let mut byte_alert = dns_alert("bytes", unique(5), AlertPer::Process, AlertAction::Alert);
    byte_alert.dns = None;
    byte_alert.bytes = 100;
    let mut w = TunnelWatch::new(&[byte_alert], t0);
    assert!(!w.is_active());
    for i in 0..100 {
        assert_eq!(
            ask(&mut w, P1, &format!("{i}.example.test"), t0),
            Screen::Pass
        );
    }
    assert_eq!(w.held(), (0, 0));
}
