//! Unit tests of the compile step and of `evaluate`: nested and overlapping prefixes, ranges,
//! blocks over services, embedded IPv4, ICMP. One suite, kept whole (over 500 lines).

use std::net::IpAddr;

use egress_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::*;
use crate::policy::Policy;

fn compile(text: &str) -> CompiledPolicy {
    let p = Policy::parse("t.toml", text).unwrap_or_else(|e| panic!("{e}"));
    CompiledPolicy::compile(&p).unwrap_or_else(|e| panic!("{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// (allowed, deciding rule name)
fn verdict(c: &CompiledPolicy, dst: &str, port: u16, proto: u8) -> (bool, String) {
    let e = c.evaluate(ip(dst), port, proto);
    (e.allow, c.rule_name(e.rule_id).to_string())
}

fn v(allow: bool, rule: &str) -> (bool, String) {
    (allow, rule.to_string())
}

#[test]
fn empty_policy_is_the_default_verdict() {
    let c = compile("allow_loopback = false\n");
    assert!(c.v4.is_empty() && c.v6.is_empty() && c.rulesets.is_empty());
    assert_eq!(
        verdict(&c, "192.0.2.1", 80, IPPROTO_TCP),
        v(false, "default")
    );
    let c = compile("default = \"allow\"\n");
    assert_eq!(
        verdict(&c, "2001:db8::1", 80, IPPROTO_UDP),
        v(true, "default")
    );
}

#[test]
fn config_reflects_policy() {
    let c = compile("mode = \"audit\"\ndefault = \"allow\"\nallow_loopback = false\n");
    assert_eq!(
        c.config,
        Config {
            mode: MODE_AUDIT,
            default_verdict: DEFAULT_ALLOW,
            allow_loopback: 0,
            generation: 1,
            // The `[sockets]` defaults: raw and other protocols refused, pings judged.
            sockets: [
                egress_common::SOCK_DENY,
                egress_common::SOCK_POLICY,
                egress_common::SOCK_DENY,
                egress_common::SOCK_DENY
            ],
            ..Config::default()
        }
    );
}

#[test]
fn slash_zero_32_and_128() {
    let c = compile(
        r#"allow_loopback = false
[[service]]
name = "all-v4-web"
destinations = ["0.0.0.0/0"]
ports = [443]
[[service]]
name = "one-host"
destinations = ["192.0.2.7/32"]
[[service]]
name = "all-v6-dns"
destinations = ["::/0"]
ports = [53]
[[service]]
name = "one-v6"
destinations = ["2001:db8::7/128"]
protocols = ["udp"]
"#,
    );
    assert_eq!(
        c.v4.keys().copied().collect::<Vec<_>>(),
        vec![(0, 0), (0xc000_0207, 32)]
    );
    assert_eq!(c.v6.len(), 2);
    assert_eq!(
        verdict(&c, "8.8.8.8", 443, IPPROTO_TCP),
        v(true, "all-v4-web")
    );
    assert_eq!(verdict(&c, "8.8.8.8", 80, IPPROTO_TCP), v(false, "default"));
    assert_eq!(
        verdict(&c, "192.0.2.7", 22, IPPROTO_TCP),
        v(true, "one-host")
    );
    // The /32 inherits the /0's rules. When several services approve, the first in file order
    // is the one reported.
    assert_eq!(
        verdict(&c, "192.0.2.7", 443, IPPROTO_UDP),
        v(true, "all-v4-web")
    );
    assert_eq!(
        verdict(&c, "192.0.2.8", 22, IPPROTO_TCP),
        v(false, "default")
    );
    assert_eq!(
        verdict(&c, "2001:db8::7", 9999, IPPROTO_UDP),
        v(true, "one-v6")
    );
    assert_eq!(
        verdict(&c, "2001:db8::7", 9999, IPPROTO_TCP),
        v(false, "default")
    );
    assert_eq!(
        verdict(&c, "2001:db8::7", 53, IPPROTO_TCP),
        v(true, "all-v6-dns")
    );
    assert_eq!(
        verdict(&c, "2001:db8::8", 53, IPPROTO_UDP),
        v(true, "all-v6-dns")
    );
}

#[test]
fn narrower_service_does_not_beat_broader_block() {
    let c = compile(
        r#"allow_loopback = false
[[service]]
name = "narrow-allow"
destinations = ["203.0.113.5/32", "2001:db8:1::5/128"]
[[block]]
name = "broad-block"
destinations = ["203.0.113.0/24", "2001:db8::/32"]
"#,
    );
    assert_eq!(
        verdict(&c, "203.0.113.5", 443, IPPROTO_TCP),
        v(false, "broad-block")
    );
    assert_eq!(
        verdict(&c, "2001:db8:1::5", 443, IPPROTO_TCP),
        v(false, "broad-block")
    );
    assert_eq!(
        verdict(&c, "203.0.113.6", 443, IPPROTO_TCP),
        v(false, "broad-block")
    );
}

#[test]
fn block_with_ports_only_blocks_those_ports() {
    let c = compile(
        r#"[[service]]
name = "net"
destinations = ["10.0.0.0/8"]
[[block]]
name = "smtp"
destinations = ["10.1.0.0/16"]
ports = [25]
protocols = ["tcp"]
"#,
    );
    assert_eq!(verdict(&c, "10.1.2.3", 25, IPPROTO_TCP), v(false, "smtp"));
    assert_eq!(verdict(&c, "10.1.2.3", 25, IPPROTO_UDP), v(true, "net"));
    assert_eq!(verdict(&c, "10.1.2.3", 26, IPPROTO_TCP), v(true, "net"));
    assert_eq!(verdict(&c, "10.2.2.3", 25, IPPROTO_TCP), v(true, "net"));
}

#[test]
fn nested_services_with_different_ports_both_apply() {
    // LPM alone would return only the /16 and lose the /8's port 443.
    let c = compile(
        r#"[[service]]
name = "wide-https"
destinations = ["10.0.0.0/8"]
ports = [443]
[[service]]
name = "narrow-http"
destinations = ["10.1.0.0/16"]
ports = [80]
"#,
    );
    assert_eq!(
        verdict(&c, "10.1.2.3", 443, IPPROTO_TCP),
        v(true, "wide-https")
    );
    assert_eq!(
        verdict(&c, "10.1.2.3", 80, IPPROTO_TCP),
        v(true, "narrow-http")
    );
    assert_eq!(
        verdict(&c, "10.2.2.3", 80, IPPROTO_TCP),
        v(false, "default")
    );
}

#[test]
fn siblings_do_not_leak_rules() {
    let c = compile(
        r#"[[service]]
name = "a"
destinations = ["10.0.0.0/16"]
ports = [1]
[[service]]
name = "b"
destinations = ["10.1.0.0/16"]
ports = [2]
[[service]]
name = "c"
destinations = ["10.1.5.0/24"]
ports = [3]
[[service]]
name = "d"
destinations = ["10.2.0.0/16"]
ports = [4]
"#,
    );
    assert_eq!(verdict(&c, "10.1.5.1", 2, IPPROTO_TCP), v(true, "b"));
    assert_eq!(verdict(&c, "10.1.5.1", 3, IPPROTO_TCP), v(true, "c"));
    assert_eq!(verdict(&c, "10.1.5.1", 1, IPPROTO_TCP), v(false, "default"));
    assert_eq!(verdict(&c, "10.2.0.1", 2, IPPROTO_TCP), v(false, "default"));
    assert_eq!(verdict(&c, "10.2.0.1", 3, IPPROTO_TCP), v(false, "default"));
    assert_eq!(verdict(&c, "10.2.0.1", 4, IPPROTO_TCP), v(true, "d"));
}

#[test]
fn port_ranges_are_inclusive_and_merged() {
    let c = compile(
        r#"[[service]]
name = "r"
destinations = ["10.0.0.0/8"]
ports = [8000, "8001-8080", "8070-8090", 9000]
"#,
    );
    let (_, set) = c.matching_set(ip("10.0.0.1")).unwrap();
    let ranges: Vec<(u16, u16)> = set.rules[..set.len as usize]
        .iter()
        .map(|r| (r.port_lo, r.port_hi))
        .collect();
    assert_eq!(ranges, vec![(8000, 8090), (9000, 9000)]);
    for (port, allow) in [
        (7999, false),
        (8000, true),
        (8090, true),
        (8091, false),
        (9000, true),
        (9001, false),
    ] {
        assert_eq!(
            c.evaluate(ip("10.0.0.1"), port, IPPROTO_TCP).allow,
            allow,
            "port {port}"
        );
    }
}

#[test]
fn protocols_are_respected_and_blocks_without_protocols_block_everything() {
    let c = compile(
        r#"[[service]]
name = "udp-only"
destinations = ["10.0.0.0/8"]
protocols = ["udp"]
[[block]]
name = "all-protos"
destinations = ["10.9.0.0/16"]
"#,
    );
    assert_eq!(
        verdict(&c, "10.0.0.1", 53, IPPROTO_UDP),
        v(true, "udp-only")
    );
    assert_eq!(
        verdict(&c, "10.0.0.1", 53, IPPROTO_TCP),
        v(false, "default")
    );
    // ICMP is covered by a block without protocols and ports, whatever port the sockaddr had.
    assert_eq!(verdict(&c, "10.9.0.1", 0, 1), v(false, "all-protos"));
    assert_eq!(verdict(&c, "10.9.0.1", 7, 1), v(false, "all-protos"));
    assert_eq!(verdict(&c, "10.0.0.1", 0, 1), v(false, "default"));
}

#[test]
fn a_block_with_ports_is_about_tcp_and_udp_only() {
    let c = compile(
        r#"default = "allow"
[[block]]
name = "smtp"
destinations = ["10.0.0.0/8"]
ports = [25]
"#,
    );
    assert_eq!(verdict(&c, "10.0.0.1", 25, IPPROTO_TCP), v(false, "smtp"));
    assert_eq!(verdict(&c, "10.0.0.1", 25, IPPROTO_UDP), v(false, "smtp"));
    // An ICMP connect() whose sockaddr happens to carry port 25 is not "port 25".
    assert_eq!(verdict(&c, "10.0.0.1", 25, 1), v(true, "default"));
}

#[test]
fn v4_mapped_destinations_are_judged_as_ipv4() {
    let c = compile(
        r#"allow_loopback = false
[[service]]
name = "v4net"
destinations = ["192.0.2.0/24"]
[[block]]
name = "v6-everything"
destinations = ["::/0"]
"#,
    );
    // The v6 block does not apply to ::ffff:192.0.2.1: it is the IPv4 address 192.0.2.1.
    assert_eq!(
        verdict(&c, "::ffff:192.0.2.1", 443, IPPROTO_TCP),
        v(true, "v4net")
    );
    assert_eq!(verdict(&c, "192.0.2.1", 443, IPPROTO_TCP), v(true, "v4net"));
    assert_eq!(
        verdict(&c, "::ffff:198.51.100.1", 443, IPPROTO_TCP),
        v(false, "default")
    );
    assert_eq!(
        verdict(&c, "2001:db8::1", 443, IPPROTO_TCP),
        v(false, "v6-everything")
    );
    assert_eq!(
        c.evaluate(ip("::ffff:192.0.2.1"), 1, IPPROTO_TCP).judged,
        ip("192.0.2.1")
    );
}

#[test]
fn loopback_shortcut_and_its_absence() {
    let on = compile("[[block]]\nname = \"b\"\ndestinations = [\"127.0.0.0/8\", \"::1\"]\n");
    for dst in [
        "127.0.0.1",
        "127.9.9.9",
        "::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "::",
    ] {
        assert_eq!(
            verdict(&on, dst, 80, IPPROTO_TCP),
            v(true, "loopback"),
            "{dst}"
        );
    }
    let off = compile(
        "allow_loopback = false\n[[block]]\nname = \"b\"\ndestinations = [\"127.0.0.0/8\", \"::1\"]\n",
    );
    for dst in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
        assert_eq!(verdict(&off, dst, 80, IPPROTO_TCP), v(false, "b"), "{dst}");
    }
}

#[test]
fn identical_rule_lists_share_a_rule_set() {
    let c = compile(
        r#"[[service]]
name = "many"
destinations = ["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24", "2001:db8::/48"]
ports = [443]
"#,
    );
    assert_eq!(c.prefix_count(), 4);
    assert_eq!(c.rulesets.len(), 1);
}

#[test]
fn blocks_are_ordered_before_services_in_each_set() {
    let c = compile(
        r#"[[service]]
name = "s"
destinations = ["10.0.0.0/8"]
[[block]]
name = "b"
destinations = ["10.0.0.0/8"]
ports = [22]
"#,
    );
    let (_, set) = c.matching_set(ip("10.1.1.1")).unwrap();
    assert_eq!(set.len, 2);
    assert_eq!(set.rules[0].action, ACTION_BLOCK);
    assert_eq!(set.rules[1].action, ACTION_ALLOW);
    assert_eq!(set.rules[0].scope, 0);
}

#[test]
fn too_many_port_rules_is_a_clear_error() {
    let ports: Vec<String> = (0..(MAX_PORT_RULES as u16 + 1))
        .map(|i| (1000 + i * 2).to_string())
        .collect();
    let text = format!(
        "[[service]]\nname = \"wide\"\ndestinations = [\"10.0.0.0/8\"]\nports = [{}]\n",
        ports.join(",")
    );
    let p = Policy::parse("t.toml", &text).unwrap();
    let e = CompiledPolicy::compile(&p).unwrap_err();
    assert_eq!(e.prefix, "10.0.0.0/8");
    assert_eq!(e.line, 1);
    assert!(
        e.to_string()
            .starts_with("t.toml:1: destination 10.0.0.0/8: "),
        "{e}"
    );
    assert!(
        e.to_string().contains("wide") && e.to_string().contains("at most 64"),
        "{e}"
    );
}

#[test]
fn too_many_port_rules_names_the_rules_on_one_line() {
    // Found by the fuzzer (`policy/fuzz.rs`): rule names may hold any character, and the error
    // quoted them as they were.
    let ports: Vec<String> = (0..(MAX_PORT_RULES as u16 + 1))
        .map(|i| (1000 + i * 2).to_string())
        .collect();
    let text = format!(
        "[[service]]\nname = \"wide\\nopen\"\ndestinations = [\"10.0.0.0/8\"]\nports = [{}]\n",
        ports.join(",")
    );
    let p = Policy::parse("t.toml", &text).unwrap();
    assert_eq!(p.rules[0].name, "wide\nopen");
    let e = CompiledPolicy::compile(&p).unwrap_err().to_string();
    assert!(e.contains("(wide\\nopen)"), "{e}");
    assert!(!e.contains(char::is_control), "{e:?}");
}

#[test]
fn hundred_thousand_prefixes_compile() {
    let mut dests = Vec::with_capacity(100_000);
    let mut x: u32 = 0x0a00_0000;
    for i in 0..100_000u32 {
        // Non-contiguous /24s and /28s.
        x = x.wrapping_add(0x0001_0300 + (i % 7) * 0x100);
        let len = if i % 3 == 0 { 28 } else { 24 };
        let mask = u32::MAX << (32 - len);
        dests.push(format!("\"{}/{len}\"", std::net::Ipv4Addr::from(x & mask)));
    }
    dests.sort();
    dests.dedup();
    let text = format!(
        "[[service]]\nname = \"big\"\ndestinations = [{}]\nports = [443]\n",
        dests.join(",")
    );
    let c = compile(&text);
    assert!(c.v4.len() > 99_000, "{}", c.v4.len());
    assert!(c.rulesets.len() <= 2);
    assert_eq!(verdict(&c, "10.0.0.1", 443, IPPROTO_TCP).1, "default");
}

#[test]
fn ipv6_carrying_ipv4_is_judged_as_both() {
    let c = compile(
        "default = \"allow\"\nnat64_prefixes = [\"fd00:64::/96\"]\n[[block]]\nname = \"b4\"\ndestinations = [\"198.51.100.0/24\"]\n[[block]]\nname = \"b6\"\ndestinations = [\"2002:cb00:7100::/40\"]\n",
    );
    assert_eq!(c.config.nat64_count, 1);
    for dst in [
        "64:ff9b::198.51.100.7",
        "fd00:64::198.51.100.7",
        "2002:c633:6407::1",
        "::198.51.100.7",
    ] {
        assert_eq!(verdict(&c, dst, 443, IPPROTO_TCP), v(false, "b4"), "{dst}");
    }
    // An IPv6 block still decides as IPv6 even when the carried IPv4 address is allowed.
    assert_eq!(
        verdict(&c, "2002:cb00:7107::1", 443, IPPROTO_TCP),
        v(false, "b6")
    );
    for dst in [
        "64:ff9b::203.0.113.7",
        "fd00:65::198.51.100.7",
        "2001:db8::198.51.100.7",
        "::ffff:203.0.113.7",
    ] {
        assert_eq!(
            verdict(&c, dst, 443, IPPROTO_TCP),
            v(true, "default"),
            "{dst}"
        );
    }
    // :: and ::1 are not v4-compatible addresses.
    assert_eq!(c.evaluate(ip("::1"), 1, IPPROTO_TCP).carried_v4, None);
    assert_eq!(c.evaluate(ip("::"), 1, IPPROTO_TCP).carried_v4, None);
}

#[test]
fn icmp_is_approved_only_by_name_and_blocked_by_every_block() {
    use egress_common::IPPROTO_ICMP;
    let c = compile(
        "[[service]]\nname = \"web-and-ping\"\ndestinations = [\"10.0.0.0/8\"]\nprotocols = [\"tcp\", \"icmp\"]\nports = [443]\n[[service]]\nname = \"any-web\"\ndestinations = [\"192.0.2.0/24\"]\n[[block]]\nname = \"bad\"\ndestinations = [\"10.9.0.0/16\"]\n",
    );
    assert_eq!(
        verdict(&c, "10.1.1.1", 0, IPPROTO_ICMP),
        v(true, "web-and-ping")
    );
    assert_eq!(
        verdict(&c, "10.1.1.1", 7, IPPROTO_ICMP),
        v(true, "web-and-ping")
    );
    assert_eq!(
        verdict(&c, "10.1.1.1", 443, IPPROTO_TCP),
        v(true, "web-and-ping")
    );
    assert_eq!(
        verdict(&c, "10.1.1.1", 80, IPPROTO_TCP),
        v(false, "default")
    );
    // A service without `protocols` approves TCP and UDP, not ICMP.
    assert_eq!(
        verdict(&c, "192.0.2.1", 0, IPPROTO_ICMP),
        v(false, "default")
    );
    // A block without protocols or ports covers ICMP too.
    assert_eq!(verdict(&c, "10.9.1.1", 0, IPPROTO_ICMP), v(false, "bad"));
}

#[test]
fn a_policy_with_names_blocks_dns_over_tls_and_one_without_does_not() {
    let base = "[[service]]\nname = \"all\"\ndestinations = [\"0.0.0.0/0\", \"::/0\"]\n";
    let plain = compile(base);
    assert_eq!(
        verdict(&plain, "192.0.2.1", 853, IPPROTO_TCP),
        v(true, "all")
    );
    let named = compile(&format!(
        "{base}[[service]]\nname = \"gh\"\nhosts = [\"github.com\"]\nports = [443]\n"
    ));
    assert_eq!(
        verdict(&named, "192.0.2.1", 853, IPPROTO_TCP),
        v(false, "dns-over-tls")
    );
    assert_eq!(
        verdict(&named, "2001:db8::1", 853, IPPROTO_UDP),
        v(false, "dns-over-tls")
    );
    assert_eq!(
        verdict(&named, "192.0.2.1", 443, IPPROTO_TCP),
        v(true, "all")
    );
    // Counted as the policy wrote them: the synthesized block is not one of its rules.
    assert_eq!((named.services, named.blocks), (2, 0));
    // The name is reserved.
    let e = Policy::parse(
        "t.toml",
        "[[block]]\nname = \"dns-over-tls\"\ndestinations = [\"10.0.0.0/8\"]\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("dns-over-tls"), "{e}");
}
