//! Fuzzing of the policy parser and compiler: property tests over structured, mutated and raw
//! policy text, run by `cargo test` like any unit test.
//!
//! Why proptest rather than cargo-fuzz or bolero: it runs on the stable toolchain under plain
//! `cargo test` (no nightly, no sanitizer runtime, no extra tool to install in CI, no root); a run
//! is bounded by a number of cases, not by wall-clock time, so it costs the same on every machine;
//! its seed is fixed, so a failure in CI is the same failure on a laptop; and it shrinks a failing
//! input to a small one. What cargo-fuzz would add, coverage guidance, matters less here: the
//! generators speak the policy schema (every key, valid and invalid values of each, TOML syntax
//! variants), so they reach the validation, the compile step and the evaluator instead of dying in
//! the TOML lexer, and the mutation and token-soup generators cover the lexer and parser.
//!
//! Generators:
//! - [`policy`]`(0)`: policies valid by construction (every key of the schema, v4/v6, /0 /32 /128,
//!   v4-mapped, NAT64 and 6to4 networks, port ranges, units, per/action combinations, `hosts`
//!   patterns beside or instead of `destinations`, `[dns]`, comments, `[[table]]` or inline-array
//!   syntax): they must parse, and compile unless a destination needs more than
//!   `MAX_PORT_RULES` port ranges;
//! - [`wild_policy`]: the same with values replaced by invalid ones, 1%, 4% or 11% of them (host
//!   bits set, /33, netmasks, garbage, ports 0, 65536, reversed or non-numeric, wrong types,
//!   reserved, duplicate and empty names, unknown and repeated keys, sizes and durations out of
//!   range, `action = "block"` per destination, wildcards inside names, labels too long, empty or
//!   with bad characters, addresses as hosts, upstreams by name, `min_ttl` over `max_ttl`, …);
//! - [`crowded_policy`]: many port ranges on a few nested networks, around the limit of a rule set;
//! - mutations of valid policies: bit flips, byte substitutions, truncation, duplicated, deleted
//!   and swapped lines, and insertions of unicode, very long strings and deep nesting;
//! - a soup of TOML and schema tokens, and arbitrary bytes.
//!
//! Properties, for every text ([`check`]): `Policy::parse` does not panic and gives the same
//! result twice; an error has a line and column within the text, a non-empty field and message,
//! and is one line of plain text; a parsed policy holds the invariants parsing promises (canonical
//! destinations, ports within 1..=65535, unique unreserved names, alerts naming existing rules,
//! …); `compile` does not panic and fails exactly when a destination needs more port ranges than
//! fit (counted independently here); the compiled policy decides every sample destination, port
//! and protocol as a naive reading of the policy does ([`reference`]); `explain` and `rule_table`
//! do not panic and agree with `evaluate`; the name matcher covers sample names exactly as the
//! patterns read one by one do, and `explain_name` agrees with it; and `diff::describe` of a
//! policy against itself says
//! "no change" (and of a policy against a mutation of it does not panic).
//! [`generators_reach_every_stage`] checks that the generators get past the parser.
//!
//! Each property runs a fixed number of cases (600 to 4,000) with a fixed seed: about 15 s of one
//! core in all, in a debug build. To fuzz longer:
//! `EGRESS_FUZZ_CASES=100000 EGRESS_FUZZ_SEED=random cargo test -p egress-userspace --lib policy::fuzz`
//! (`EGRESS_FUZZ_CASES` is the number of cases of each property; `EGRESS_FUZZ_SEED` is a number,
//! or `random` for a new seed each run; proptest prints the failing input, shrunk).
//! (Over 500 lines: one cohesive fuzzer, its generators, properties and reference model.)

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use egress_common::{ACTION_ALLOW, ACTION_BLOCK, MAX_NAT64_PREFIXES, MAX_PORT_RULES};
use ipnetwork::IpNetwork;
use proptest::{
    collection::vec,
    option,
    prelude::*,
    sample::{Index, select},
    test_runner::{RngSeed, TestCaseError},
};

use super::{
    Destination, HostPattern, Policy, PolicyError, Protocol, Rule, RuleKind,
    alert::AlertAction,
    compile::{CompileError, CompiledPolicy, Evaluation, Reason},
    content_hash, diff,
    dns::MAX_UPSTREAMS,
    explain::{explain, explain_name, rule_table},
    hosts::{MAX_LABEL_LEN, MAX_NAME_LEN},
    names::NameIndex,
};

/// The file name the fuzzed texts are parsed as.
const FILE: &str = "fuzz.toml";
/// The seed of every property unless `EGRESS_FUZZ_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x6567_7265_7373;

/// A property's configuration: `default_cases` cases (or `EGRESS_FUZZ_CASES`), a fixed seed (or
/// `EGRESS_FUZZ_SEED`), and no regression files (a failure found is kept as a unit test).
fn config(default_cases: u32) -> ProptestConfig {
    let cases = match std::env::var("EGRESS_FUZZ_CASES") {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("EGRESS_FUZZ_CASES={n}: expected a number of cases")),
        Err(_) => default_cases,
    };
    let rng_seed = match std::env::var("EGRESS_FUZZ_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(n) => RngSeed::Fixed(
            n.parse()
                .unwrap_or_else(|_| panic!("EGRESS_FUZZ_SEED={n}: expected a number, or `random`")),
        ),
        Err(_) => RngSeed::Fixed(DEFAULT_SEED),
    };
    ProptestConfig {
        cases,
        rng_seed,
        failure_persistence: None,
        max_shrink_iters: 4096,
        // Milliseconds: a failure is reported even when shrinking it is slow.
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// TOML values
// ---------------------------------------------------------------------------------------------

/// A TOML basic string holding exactly `s`.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `s` as a TOML string: a literal string (`'…'`) where it can be one and `literal` asks for it,
/// else a basic string.
fn toml_str(s: &str, literal: bool) -> String {
    let literal_ok = !s.contains('\'') && !s.chars().any(|c| c.is_control() && c != '\t');
    if literal && literal_ok {
        format!("'{s}'")
    } else {
        quoted(s)
    }
}

/// Strings from `s` as TOML strings, basic or literal.
fn string(s: impl Strategy<Value = String> + 'static) -> BoxedStrategy<String> {
    (s, prop::bool::weighted(0.2))
        .prop_map(|(s, literal)| toml_str(&s, literal))
        .boxed()
}

/// One of `items`, as they are (TOML fragments).
fn one_of(items: &'static [&'static str]) -> BoxedStrategy<String> {
    select(items).prop_map(str::to_string).boxed()
}

/// One of `items` as a TOML string.
fn one_of_strings(items: &'static [&'static str]) -> BoxedStrategy<String> {
    string(select(items).prop_map(str::to_string))
}

/// A TOML array of `elems`, on one line or one element a line (with a trailing comma).
fn array(
    elems: BoxedStrategy<String>,
    len: std::ops::RangeInclusive<usize>,
) -> BoxedStrategy<String> {
    (vec(elems, len), prop::bool::weighted(0.2))
        .prop_map(|(v, multi_line)| {
            if multi_line && !v.is_empty() {
                format!("[\n  {},\n]", v.join(",\n  "))
            } else {
                format!("[{}]", v.join(", "))
            }
        })
        .boxed()
}

/// How often a generator picks an invalid value, per mille: 0 for valid policies.
type Wild = u32;

/// Mostly invalid, for the elements of a list that is invalid already.
const MOSTLY_INVALID: Wild = 300;

/// `valid` values, or `wild` in a thousand from `invalid`.
fn pick<T: std::fmt::Debug + 'static>(
    wild: Wild,
    valid: BoxedStrategy<T>,
    invalid: BoxedStrategy<T>,
) -> BoxedStrategy<T> {
    if wild == 0 {
        valid
    } else {
        prop_oneof![1000 - wild => valid, wild => invalid].boxed()
    }
}

/// A key that does not belong, `wild` / 2 in a thousand.
fn extra_key(
    wild: Wild,
    key: BoxedStrategy<(String, String)>,
) -> BoxedStrategy<Option<(String, String)>> {
    if wild == 0 {
        Just(None).boxed()
    } else {
        option::weighted(f64::from(wild) / 2000.0, key).boxed()
    }
}

/// Values that are not what any key wants, or only by accident.
const WRONG_TYPES: &[&str] = &[
    "1",
    "-1",
    "1.5",
    "true",
    "[]",
    "{}",
    "1979-05-27",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "inf",
    "nan",
    "\"\"",
    "[[1]]",
    "{ a = 1 }",
    "0x10",
];

// ---------------------------------------------------------------------------------------------
// Destinations
// ---------------------------------------------------------------------------------------------

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - len))
    }
}

fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - len))
    }
}

/// IPv4 addresses, clustered (so that networks nest and overlap) and anywhere.
fn v4_addr() -> BoxedStrategy<u32> {
    prop_oneof![
        3 => (
            select(&[0u32, 10, 127, 192, 198, 203, 255][..]),
            prop_oneof![Just(0u32), Just(0x00ff_ffff), 0u32..0x100, 0x1_0000u32..0x1_0100, any::<u32>()],
        )
            .prop_map(|(top, low)| (top << 24) | (low & 0x00ff_ffff)),
        1 => any::<u32>(),
    ]
    .boxed()
}

/// IPv6 addresses: documentation, NAT64 well-known, 6to4, v4-compatible, v4-mapped, link-local,
/// and anywhere.
fn v6_addr() -> BoxedStrategy<u128> {
    prop_oneof![
        3 => (
            select(&[
                0x2001_0db8_u128 << 96,
                0x0064_ff9b_u128 << 96,
                0x2002_u128 << 112,
                0,
                0xffff_u128 << 32,
                0xfe80_u128 << 112,
            ][..]),
            prop_oneof![
                Just(0u128),
                0u128..0x100,
                any::<u32>().prop_map(u128::from),
                any::<u128>().prop_map(|x| x & ((1 << 80) - 1)),
            ],
        )
            .prop_map(|(top, low)| top | low),
        1 => any::<u128>(),
    ]
    .boxed()
}

fn v4_len() -> BoxedStrategy<u8> {
    prop_oneof![Just(0u8), Just(32), 0u8..=32].boxed()
}

fn v6_len() -> BoxedStrategy<u8> {
    prop_oneof![Just(0u8), Just(128), Just(96), 0u8..=128, 96u8..=128].boxed()
}

/// Valid destination text: canonical networks, sometimes a bare address, sometimes padded.
fn dest_text() -> BoxedStrategy<String> {
    let net = prop_oneof![
        (v4_addr(), v4_len(), any::<bool>()).prop_map(|(a, len, bare)| {
            let ip = Ipv4Addr::from(mask4(a, len));
            if len == 32 && bare {
                ip.to_string()
            } else {
                format!("{ip}/{len}")
            }
        }),
        (v6_addr(), v6_len(), any::<bool>()).prop_map(|(a, len, bare)| {
            let ip = Ipv6Addr::from(mask6(a, len));
            if len == 128 && bare {
                ip.to_string()
            } else {
                format!("{ip}/{len}")
            }
        }),
    ];
    (net, select(&["", "", "", " ", "\t"][..]))
        .prop_map(|(n, pad)| format!("{pad}{n}{pad}"))
        .boxed()
}

/// A valid destination value.
fn dest_valid() -> BoxedStrategy<String> {
    string(dest_text())
}

/// Prefix lengths that are not one.
const BAD_LENS: &[&str] = &[
    "33",
    "129",
    "255",
    "256",
    "-1",
    "+8",
    "08",
    " 8",
    "",
    "0x8",
    "1e1",
    "255.0.0.0",
    "255.255.0.255",
    "ffff::",
    "٨",
    "99999999999999999999",
];

/// Destinations that are not, or only by accident.
const BAD_DESTS: &[&str] = &[
    "",
    " ",
    "localhost",
    "1.2.3",
    "1.2.3.4.5",
    "256.0.0.0",
    "01.2.3.4",
    "::g",
    ":::",
    "fe80::1%eth0",
    "[::1]",
    "[::1]:80",
    "1.2.3.4:80",
    "10.0.0.0/8/8",
    "/8",
    "10.0.0.0/",
    "::ffff:1.2.3.4/95",
    "::ffff:0:0/96",
    "::ffff:0:0/95",
    "١٢٣.0.0.0",
    "１.２.３.４",
    "10.0.0.0\n/8",
    "0.0.0.0/0\u{0}",
    "\u{feff}10.0.0.0/8",
    "64:ff9b::10.0.0.1",
    "2002:a00:1::/48",
    "0.0.0.0/32",
    "::/128",
];

/// Any destination value: valid, host bits set, bad prefix lengths, garbage, wrong types.
fn dest_any() -> BoxedStrategy<String> {
    prop_oneof![
        4 => dest_valid(),
        1 => string((v4_addr(), 0u8..32).prop_map(|(a, len)| format!("{}/{len}", Ipv4Addr::from(a)))),
        1 => string((v6_addr(), 0u8..128).prop_map(|(a, len)| format!("{}/{len}", Ipv6Addr::from(a)))),
        1 => string((v4_addr(), select(BAD_LENS)).prop_map(|(a, len)| format!("{}/{len}", Ipv4Addr::from(a)))),
        1 => string((v6_addr(), select(BAD_LENS)).prop_map(|(a, len)| format!("{}/{len}", Ipv6Addr::from(a)))),
        1 => one_of_strings(BAD_DESTS),
        1 => string("\\PC{0,24}"),
        1 => one_of(WRONG_TYPES),
    ]
    .boxed()
}

/// A valid `nat64_prefixes` element: an IPv6 /96 that is not the v4-mapped one.
fn nat64_valid() -> BoxedStrategy<String> {
    prop_oneof![
        Just("64:ff9b::/96".to_string()),
        Just("64:ff9b:1::/96".to_string()),
        v6_addr().prop_map(|a| {
            let mut n = mask6(a, 96);
            if n == 0xffff_u128 << 32 {
                n = 0x0064_ff9b_0001_u128 << 80;
            }
            format!("{}/96", Ipv6Addr::from(n))
        }),
    ]
    .prop_flat_map(|s| string(Just(s)))
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Ports, protocols, names
// ---------------------------------------------------------------------------------------------

fn port_valid() -> BoxedStrategy<String> {
    prop_oneof![
        3 => (1u16..=u16::MAX).prop_map(|p| p.to_string()),
        1 => one_of(&["1", "65535", "53", "80", "443", "0x50", "1_000", "+80"]),
        2 => string(
            (1u16..=u16::MAX, 1u16..=u16::MAX, select(&["-", " - ", "- "][..]))
                .prop_map(|(a, b, dash)| format!("{}{dash}{}", a.min(b), a.max(b)))
        ),
        1 => string((1u16..=u16::MAX, select(&["", " "][..])).prop_map(|(p, pad)| format!("{pad}{p}{pad}"))),
    ]
    .boxed()
}

fn port_invalid() -> BoxedStrategy<String> {
    prop_oneof![
        one_of(&[
            "0",
            "65536",
            "-1",
            "9223372036854775807",
            "-9223372036854775808",
            "4294967296",
            "1.5",
            "[80]",
        ]),
        one_of_strings(&[
            "0",
            "0-5",
            "5-0",
            "65536",
            "1-65536",
            "-",
            "1-",
            "-1",
            "a",
            "",
            " ",
            "1--2",
            "1-2-3",
            "4294967296",
            "4294967297-4294967298",
            "٨٠",
            "80–90",
        ]),
        string(
            (2u16..=u16::MAX, 1u16..=u16::MAX).prop_map(|(a, b)| format!(
                "{}-{}",
                a.max(b),
                a.min(b)
            ))
        ),
        string("[0-9 +-]{0,12}"),
        one_of(WRONG_TYPES),
    ]
    .boxed()
}

fn port_any(wild: Wild) -> BoxedStrategy<String> {
    pick(wild, port_valid(), port_invalid())
}

fn protocol(wild: Wild) -> BoxedStrategy<String> {
    pick(
        wild,
        one_of(&["\"tcp\"", "\"udp\"", "'tcp'", "'udp'"]),
        prop_oneof![
            one_of_strings(&["TCP", "icmp6", "", "tcp ", "Udp", "sctp"]),
            one_of(WRONG_TYPES),
        ]
        .boxed(),
    )
}

/// Rule and alert names: made unique by a suffix when rendered.
const NAMES: &[&str] = &[
    "web",
    "dns",
    "corp-proxy",
    "a",
    "wéb",
    "名前",
    "a b",
    "x.y",
    "\"quoted\"",
    "back\\slash",
    "tab\there",
    "line\nbreak",
    "nul\u{0}",
    "default-ish",
    "🦀",
];

/// A table's name.
#[derive(Debug, Clone)]
enum Name {
    /// A valid name; rendered with a suffix that makes it unique.
    Unique(String),
    /// A TOML fragment, as it is: possibly a duplicate, reserved, empty or not a string.
    Raw(String),
    /// No `name` key.
    Missing,
}

fn name(wild: Wild) -> BoxedStrategy<Name> {
    let base = prop_oneof![
        4 => select(NAMES).prop_map(str::to_string),
        2 => "[a-z][a-z0-9_-]{0,11}",
        1 => "\\PC{1,16}",
        1 => (200usize..2000).prop_map(|n| "n".repeat(n)),
    ]
    .prop_map(Name::Unique)
    .boxed();
    let invalid = prop_oneof![
        3 => one_of_strings(NAMES).prop_map(Name::Raw),
        2 => one_of_strings(&["", "   ", "default", "loopback", "\t"]).prop_map(Name::Raw),
        1 => one_of(WRONG_TYPES).prop_map(Name::Raw),
        1 => Just(Name::Missing),
    ]
    .boxed();
    pick(wild, base, invalid)
}

/// A key no table has, or one given twice.
fn unknown_key() -> BoxedStrategy<(String, String)> {
    (
        one_of(&[
            "port",
            "destination",
            "protocol",
            "name",
            "kind",
            "Name",
            "\"destinations\"",
            "host",
            "ports.x",
            "'services'",
            "é",
        ]),
        prop_oneof![one_of(WRONG_TYPES), dest_valid()],
    )
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Names and [dns]
// ---------------------------------------------------------------------------------------------

/// Labels: a few that recur (so that patterns overlap), random ones, and the longest.
fn label() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(&["example", "com", "api", "www", "github", "a", "s3", "xn--bcher-kva", "_acme-challenge", "x-1"][..])
            .prop_map(str::to_string),
        2 => "[a-z0-9_]([a-z0-9_-]{0,10}[a-z0-9_])?",
        1 => Just("l".repeat(MAX_LABEL_LEN)),
    ]
    .boxed()
}

/// A valid name: labels and a last label that is not numeric; any case, a trailing dot or not.
fn name_text() -> BoxedStrategy<String> {
    (
        vec(label(), 0..=3),
        prop_oneof![Just("com".to_string()), "[a-z][a-z0-9]{0,5}"],
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(mut labels, last, upper, dot)| {
            labels.push(last);
            let mut n = labels.join(".");
            // Keep within RFC 1035 lengths: drop leading labels until it fits with a wildcard.
            while n.len() > MAX_NAME_LEN - 2 {
                n = n.split_once('.').map_or(n.clone(), |(_, r)| r.to_string());
            }
            if upper {
                n = n.to_ascii_uppercase();
            }
            if dot {
                n.push('.');
            }
            n
        })
        .boxed()
}

fn host_valid() -> BoxedStrategy<String> {
    string(
        (select(&["", "", "*.", "**."][..]), name_text())
            .prop_map(|(w, name)| format!("{w}{name}")),
    )
}

fn host_invalid() -> BoxedStrategy<String> {
    prop_oneof![
        one_of_strings(&[
            "",
            ".",
            "*",
            "**",
            "**.",
            "a.*.example.com",
            "*foo.example.com",
            "***.example.com",
            "a..example.com",
            ".example.com",
            "-a.example.com",
            "a-.example.com",
            "a b.example.com",
            "bücher.example",
            "10.0.0.1",
            "2001:db8::1",
            "a.123",
            "example.com..",
            "*.",
            "é",
        ]),
        string((1usize..4).prop_map(|n| format!("{}.com", "a".repeat(MAX_LABEL_LEN + n)))),
        string((0usize..3).prop_map(|n| format!("{}.com", "abcdefgh.".repeat(31 + n)))),
        string("[a-z.*_ -]{0,12}"),
        one_of(WRONG_TYPES),
    ]
    .boxed()
}

fn host_any(wild: Wild) -> BoxedStrategy<String> {
    pick(wild, host_valid(), host_invalid())
}

fn upstream_valid() -> BoxedStrategy<String> {
    string(
        prop_oneof![
            v4_addr().prop_map(|a| Ipv4Addr::from(a.max(1)).to_string()),
            (v4_addr(), 1u16..=u16::MAX)
                .prop_map(|(a, p)| format!("{}:{p}", Ipv4Addr::from(a.max(1)))),
            v6_addr().prop_map(|a| Ipv6Addr::from(a.max(1)).to_string()),
            (v6_addr(), 1u16..=u16::MAX)
                .prop_map(|(a, p)| format!("[{}]:{p}", Ipv6Addr::from(a.max(1)))),
        ]
        .prop_filter("a unicast address", |s| {
            s.parse::<super::Upstream>().is_ok()
        }),
    )
}

fn upstream_invalid() -> BoxedStrategy<String> {
    prop_oneof![
        one_of_strings(&[
            "dns.example.com",
            "10.0.0.2:0",
            "10.0.0.2:65536",
            "0.0.0.0",
            "::",
            "224.0.0.251",
            "",
            "10.0.0.0/8",
            "[::1",
            "::1:53:",
            "1.2.3.4:53:53",
        ]),
        one_of(WRONG_TYPES),
    ]
    .boxed()
}

/// `[dns]`, as an inline table (a top-level key, like the others).
fn dns_table(wild: Wild) -> BoxedStrategy<String> {
    let upstream = pick(
        wild,
        option::of(array(upstream_valid(), 1..=MAX_UPSTREAMS)).boxed(),
        prop_oneof![
            array(
                pick(MOSTLY_INVALID, upstream_valid(), upstream_invalid()),
                0..=3
            )
            .prop_map(Some),
            array(upstream_valid(), MAX_UPSTREAMS + 1..=MAX_UPSTREAMS + 2).prop_map(Some),
            not_an_array().prop_map(Some),
        ]
        .boxed(),
    );
    // min_ttl <= max_ttl, the defaults (60s, 1h) standing in for a key left out.
    let ttls = pick(
        wild,
        (1u32..=7 * 86_400, 1u32..=7 * 86_400, 0u8..4)
            .prop_map(|(a, b, present)| {
                let (lo, hi) = (a.min(b), a.max(b));
                let q = |n: u32| Some(quoted(&format!("{n}s")));
                match present {
                    0 => (q(lo), q(hi)),
                    1 => (q(lo.min(3600)), None),
                    2 => (None, q(hi.max(60))),
                    _ => (None, None),
                }
            })
            .boxed(),
        prop_oneof![
            (1u32..=7 * 86_400, 1u32..=7 * 86_400)
                .prop_filter("unequal", |(a, b)| a != b)
                .prop_map(|(a, b)| (
                    Some(quoted(&format!("{}s", a.max(b)))),
                    Some(quoted(&format!("{}s", a.min(b))))
                )),
            Just((Some(quoted("2h")), None)),
            Just((None, Some(quoted("30s")))),
            (duration(MOSTLY_INVALID), duration(MOSTLY_INVALID))
                .prop_map(|(a, b)| (Some(a), Some(b))),
        ]
        .boxed(),
    );
    let unlisted = option::of(pick(
        wild,
        one_of(&["\"resolve\"", "\"refuse\""]),
        prop_oneof![
            one_of_strings(&["Resolve", "drop", "", "deny"]),
            one_of(WRONG_TYPES)
        ]
        .boxed(),
    ));
    let extra = extra_key(
        wild,
        (
            one_of(&["upstreams", "ttl", "min-ttl", "Unlisted"]),
            one_of(WRONG_TYPES),
        )
            .boxed(),
    );
    (upstream, ttls, unlisted, extra, any::<Index>())
        .prop_map(|(upstream, (min_ttl, max_ttl), unlisted, extra, rotate)| {
            let mut fields = fields(vec![
                ("upstream", upstream),
                ("min_ttl", min_ttl),
                ("max_ttl", max_ttl),
                ("unlisted", unlisted),
            ]);
            fields.extend(extra);
            if !fields.is_empty() {
                let n = rotate.index(fields.len());
                fields.rotate_left(n);
            }
            let kv: Vec<String> = fields.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            format!("{{ {} }}", kv.join(", "))
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Tables and policies
// ---------------------------------------------------------------------------------------------

/// A reference to a rule from an alert's `services`.
#[derive(Debug, Clone)]
enum ServiceRef {
    /// The name of a rule of the policy (by position).
    Rule(Index),
    /// Any TOML fragment, as an element.
    Other(String),
    /// Any TOML fragment, as the whole value.
    Whole(String),
}

/// A `[[service]]`, `[[block]]` or `[[alert]]` table before its name is known.
#[derive(Debug, Clone)]
struct TableSpec {
    key: &'static str,
    name: Name,
    fields: Vec<(String, String)>,
    /// `services` of an alert; `None`: no such key.
    services: Option<Vec<ServiceRef>>,
    /// Where the key list starts (key order does not matter to TOML).
    rotate: Index,
    comment: Option<String>,
}

fn comment() -> BoxedStrategy<Option<String>> {
    option::weighted(
        0.2,
        one_of(&[
            "# c",
            "# é 名前 🦀",
            "#",
            "   # indented",
            "",
            "#\t\"'[[service]]",
        ]),
    )
    .boxed()
}

/// The fields that are present, in order.
fn fields(present: Vec<(&str, Option<String>)>) -> Vec<(String, String)> {
    present
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect()
}

/// A value that is not an array.
fn not_an_array() -> BoxedStrategy<String> {
    prop_oneof![one_of(WRONG_TYPES), dest_valid()].boxed()
}

fn rule_spec(wild: Wild) -> BoxedStrategy<TableSpec> {
    let kind = prop_oneof![3 => Just("service"), 2 => Just("block")];
    // Destinations, hosts or both; neither is invalid.
    let targets = pick(
        wild,
        prop_oneof![
            5 => array(dest_valid(), 1..=6).prop_map(|d| (Some(d), None)),
            2 => (array(dest_valid(), 1..=6), array(host_valid(), 1..=4))
                .prop_map(|(d, h)| (Some(d), Some(h))),
            2 => array(host_valid(), 1..=4).prop_map(|h| (None, Some(h))),
        ]
        .boxed(),
        prop_oneof![
            Just((None, None)),
            array(dest_any(), 0..=6).prop_map(|d| (Some(d), None)),
            not_an_array().prop_map(|d| (Some(d), None)),
            (
                option::of(array(dest_valid(), 1..=2)),
                array(host_any(MOSTLY_INVALID), 0..=4)
            )
                .prop_map(|(d, h)| (d, Some(h))),
            not_an_array().prop_map(|h| (None, Some(h))),
        ]
        .boxed(),
    );
    let ports = pick(
        wild,
        option::of(array(port_valid(), 1..=10)).boxed(),
        prop_oneof![
            array(port_any(MOSTLY_INVALID), 0..=10).prop_map(Some),
            not_an_array().prop_map(Some),
        ]
        .boxed(),
    );
    let protocols = pick(
        wild,
        option::of(array(protocol(0), 1..=3)).boxed(),
        prop_oneof![
            array(protocol(MOSTLY_INVALID), 0..=3).prop_map(Some),
            not_an_array().prop_map(Some),
        ]
        .boxed(),
    );
    let extra = extra_key(wild, unknown_key());
    (
        kind,
        name(wild),
        targets,
        ports,
        protocols,
        extra,
        any::<Index>(),
        comment(),
    )
        .prop_map(
            |(key, name, (destinations, hosts), ports, protocols, extra, rotate, comment)| {
                let mut fields = fields(vec![
                    ("destinations", destinations),
                    ("hosts", hosts),
                    ("ports", ports),
                    ("protocols", protocols),
                ]);
                fields.extend(extra);
                TableSpec {
                    key,
                    name,
                    fields,
                    services: None,
                    rotate,
                    comment,
                }
            },
        )
        .boxed()
}

const SIZE_UNITS: &[&str] = &[
    "", "B", "KB", "kB", "KiB", "MB", "MiB", "GB", "GiB", "TB", "TiB",
];

fn bytes(wild: Wild) -> BoxedStrategy<String> {
    let valid = prop_oneof![
        (1i64..=i64::MAX).prop_map(|n| n.to_string()),
        (1i64..=100_000).prop_map(|n| n.to_string()),
        string(
            (1u32..100_000, select(SIZE_UNITS), select(&["", " "][..]))
                .prop_map(|(n, unit, sp)| format!("{n}{sp}{unit}"))
        ),
        string(
            (1u32..1000, 0u32..10, select(SIZE_UNITS))
                .prop_map(|(n, d, unit)| format!("{n}.{d}{unit}"))
        ),
    ]
    .boxed();
    let invalid = prop_oneof![
        one_of(&["0", "-5", "1.5", "9223372036854775808", "[1]"]),
        one_of_strings(&[
            "0MB",
            "1XB",
            "MiB",
            "1.2.3MB",
            "nan",
            "inf",
            "NaNKB",
            "18446744073709551615",
            "18446744073709551616",
            "1e3",
            "",
            "0.4",
            "99999999999TiB",
            "16777216TiB",
            "-1KB",
            ".",
            ".KB",
            "1 K B",
            "١KB",
        ]),
        string("[0-9.]{0,8}[A-Za-z ]{0,4}"),
        one_of(WRONG_TYPES),
    ]
    .boxed();
    pick(wild, valid, invalid)
}

fn duration(wild: Wild) -> BoxedStrategy<String> {
    let valid = string(prop_oneof![
        (1u32..=604_800).prop_map(|n| format!("{n}s")),
        (1u32..=10_080).prop_map(|n| format!("{n}m")),
        (1u32..=168).prop_map(|n| format!("{n}h")),
        (1u32..=167, 0u32..=9).prop_map(|(h, d)| format!("{h}.{d}h")),
        select(
            &[
                "1s", "604800s", "168h", "10080m", " 5m ", "5 m", "0.5m", "1.0s",
            ][..]
        )
        .prop_map(str::to_string),
    ]);
    let invalid = prop_oneof![
        one_of_strings(&[
            "0s",
            "169h",
            "5",
            "5d",
            "",
            "s",
            "-1s",
            "NaNs",
            "infh",
            "1e9s",
            "1.5.5m",
            "604801s",
            "0.999s",
            "10080.01m",
            "1e-400s",
            "５m",
            "m",
        ]),
        string("[0-9.]{0,8}[smh ]{0,2}"),
        one_of(WRONG_TYPES),
    ]
    .boxed();
    pick(wild, valid.boxed(), invalid)
}

/// `per` and `action` of an alert: `None` is an absent key.
fn per_action(wild: Wild) -> BoxedStrategy<(Option<String>, Option<String>)> {
    const PERS: &[&str] = &[
        "process",
        "destination",
        "process_destination",
        "cgroup",
        "user",
        "executable",
    ];
    let q = |s: &str| Some(quoted(s));
    let valid = prop_oneof![
        (option::of(select(PERS)), option::of(Just("alert")))
            .prop_map(move |(per, action)| (per.and_then(q), action.and_then(q))),
        (
            option::of(select(
                &["process", "process_destination", "user", "executable"][..]
            )),
            Just("block")
        )
            .prop_map(move |(per, action)| (per.and_then(q), q(action))),
    ]
    .boxed();
    let invalid = prop_oneof![
        select(&["destination", "cgroup"][..]).prop_map(move |per| (q(per), q("block"))),
        (
            one_of_strings(&["Process", "", "proc", "process "]),
            option::of(one_of_strings(&["alert", "block"]))
        )
            .prop_map(|(per, action)| (Some(per), action)),
        (
            option::of(select(PERS)),
            one_of_strings(&["deny", "Alert", "", "allow"])
        )
            .prop_map(move |(per, action)| (per.and_then(q), Some(action))),
        (one_of(WRONG_TYPES), one_of(WRONG_TYPES)).prop_map(|(p, a)| (Some(p), Some(a))),
    ]
    .boxed();
    pick(wild, valid, invalid)
}

fn alert_table(wild: Wild) -> BoxedStrategy<TableSpec> {
    let bool_value = pick(
        wild,
        one_of(&["true", "false"]),
        one_of(&["\"true\"", "1", "\"\"", "[true]"]),
    );
    let services = {
        let to_rule = vec(any::<Index>().prop_map(ServiceRef::Rule), 0..=3).boxed();
        let valid = option::of(to_rule.clone()).boxed();
        let invalid = prop_oneof![
            (
                to_rule,
                prop_oneof![
                    one_of_strings(&["nope", "", "default", "loopback"]),
                    one_of(WRONG_TYPES)
                ]
            )
                .prop_map(|(mut v, other)| {
                    v.push(ServiceRef::Other(other));
                    Some(v)
                }),
            not_an_array().prop_map(|s| Some(vec![ServiceRef::Whole(s)])),
        ]
        .boxed();
        pick(wild, valid, invalid)
    };
    let destinations = |wild: Wild| {
        pick(
            wild,
            option::of(array(dest_valid(), 0..=4)).boxed(),
            prop_oneof![
                array(dest_any(), 0..=4).prop_map(Some),
                not_an_array().prop_map(Some)
            ]
            .boxed(),
        )
    };
    let required = |s: BoxedStrategy<String>| {
        if wild == 0 {
            s.prop_map(Some).boxed()
        } else {
            option::weighted(1.0 - f64::from(wild) / 1000.0, s).boxed()
        }
    };
    (
        (
            name(wild),
            required(bytes(wild)),
            required(duration(wild)),
            per_action(wild),
            option::of(duration(wild)),
        ),
        (
            services,
            destinations(wild),
            destinations(wild),
            option::of(bool_value),
            extra_key(wild, unknown_key()),
            any::<Index>(),
            comment(),
        ),
    )
        .prop_map(
            |(
                (name, bytes, window, (per, action), cooldown),
                (services, destinations, exclude, unapproved, extra, rotate, comment),
            )| {
                let mut fields = fields(vec![
                    ("bytes", bytes),
                    ("window", window),
                    ("per", per),
                    ("action", action),
                    ("cooldown", cooldown),
                    ("destinations", destinations),
                    ("exclude_destinations", exclude),
                    ("unapproved_only", unapproved),
                ]);
                fields.extend(extra);
                TableSpec {
                    key: "alert",
                    name,
                    fields,
                    services,
                    rotate,
                    comment,
                }
            },
        )
        .boxed()
}

/// Top-level keys.
fn top(wild: Wild) -> BoxedStrategy<Vec<(String, String)>> {
    let key = |valid: BoxedStrategy<String>, invalid: BoxedStrategy<String>| {
        option::of(pick(wild, valid, invalid)).boxed()
    };
    let mode = key(
        one_of(&["\"enforce\"", "\"audit\""]),
        prop_oneof![
            one_of_strings(&["Enforce", "", "deny", "block"]),
            one_of(WRONG_TYPES)
        ]
        .boxed(),
    );
    let default = key(
        one_of(&["\"deny\"", "\"allow\""]),
        prop_oneof![
            one_of_strings(&["audit", "Deny", "", "block"]),
            one_of(WRONG_TYPES)
        ]
        .boxed(),
    );
    let allow_loopback = key(
        one_of(&["true", "false"]),
        one_of(&["\"true\"", "1", "\"\"", "[true]"]),
    );
    let nat64 = key(
        array(nat64_valid(), 0..=MAX_NAT64_PREFIXES),
        prop_oneof![
            array(
                nat64_valid(),
                MAX_NAT64_PREFIXES + 1..=MAX_NAT64_PREFIXES + 3
            ),
            array(dest_any(), 1..=3),
            one_of_strings(&["64:ff9b::/96"]),
            one_of(&[
                "[\"::ffff:0:0/96\"]",
                "[\"64:ff9b::/64\"]",
                "[\"64:ff9b::1/96\"]",
                "[\"10.0.0.0/8\"]",
                "[\"64:ff9b::\"]",
            ]),
            one_of(WRONG_TYPES),
        ]
        .boxed(),
    );
    let extra = extra_key(
        wild,
        prop_oneof![
            unknown_key(),
            one_of(&["modes", "Mode", "services", "blocks", "alerts", "nat64"])
                .prop_flat_map(|k| one_of(WRONG_TYPES).prop_map(move |v| (k.clone(), v))),
            one_of(&["mode", "default"]).prop_map(|k| (k, "\"audit\"".to_string())),
            Just(("service".to_string(), "1".to_string())),
        ]
        .boxed(),
    );
    let dns = option::of(pick(
        wild,
        dns_table(0),
        prop_oneof![dns_table(MOSTLY_INVALID), one_of(WRONG_TYPES)].boxed(),
    ));
    (
        mode,
        default,
        allow_loopback,
        nat64,
        dns,
        extra,
        any::<Index>(),
    )
        .prop_map(
            |(mode, default, allow_loopback, nat64, dns, extra, rotate)| {
                let mut fields = fields(vec![
                    ("mode", mode),
                    ("default", default),
                    ("allow_loopback", allow_loopback),
                    ("nat64_prefixes", nat64),
                    ("dns", dns),
                ]);
                fields.extend(extra);
                if !fields.is_empty() {
                    let n = rotate.index(fields.len());
                    fields.rotate_left(n);
                }
                fields
            },
        )
        .boxed()
}

/// A rendered policy and what it holds (when valid).
#[derive(Debug, Clone)]
struct Spec {
    text: String,
    services: usize,
    blocks: usize,
    alerts: usize,
}

/// Renders a policy: top-level keys, then the tables as `[[key]]` tables or, with `inline`, as
/// arrays of inline tables.
fn render(
    top: Vec<(String, String)>,
    rules: Vec<TableSpec>,
    alerts: Vec<TableSpec>,
    inline: bool,
) -> Spec {
    let mut text = String::new();
    for (k, v) in &top {
        let _ = writeln!(text, "{k} = {v}");
    }
    // Names first: alerts refer to rules by name.
    let names: Vec<Option<String>> = rules
        .iter()
        .chain(&alerts)
        .enumerate()
        .map(|(i, t)| match &t.name {
            Name::Unique(base) => Some(quoted(&format!("{base}-{i}"))),
            Name::Raw(fragment) => Some(fragment.clone()),
            Name::Missing => None,
        })
        .collect();
    let rule_names: Vec<&String> = names[..rules.len()].iter().flatten().collect();
    let tables: Vec<(&TableSpec, Vec<(String, String)>)> = rules
        .iter()
        .chain(&alerts)
        .zip(&names)
        .map(|(t, name)| {
            let mut fields = t.fields.clone();
            if let Some(name) = name {
                fields.push(("name".into(), name.clone()));
            }
            if let Some(services) = &t.services {
                let whole = services.iter().find_map(|s| match s {
                    ServiceRef::Whole(s) => Some(s.clone()),
                    _ => None,
                });
                let list: Vec<String> = services
                    .iter()
                    .filter_map(|s| match s {
                        ServiceRef::Rule(i) if !rule_names.is_empty() => {
                            Some(i.get(&rule_names).to_string())
                        }
                        ServiceRef::Other(s) => Some(s.clone()),
                        ServiceRef::Rule(_) | ServiceRef::Whole(_) => None,
                    })
                    .collect();
                let value = whole.unwrap_or_else(|| format!("[{}]", list.join(", ")));
                fields.push(("services".into(), value));
            }
            if !fields.is_empty() {
                let n = t.rotate.index(fields.len());
                fields.rotate_left(n);
            }
            (t, fields)
        })
        .collect();
    if inline {
        for key in ["service", "block", "alert"] {
            let items: Vec<String> = tables
                .iter()
                .filter(|(t, _)| t.key == key)
                .map(|(_, fields)| {
                    let kv: Vec<String> =
                        fields.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{{ {} }}", kv.join(", "))
                })
                .collect();
            if !items.is_empty() {
                let _ = writeln!(text, "{key} = [\n  {},\n]", items.join(",\n  "));
            }
        }
    } else {
        for (t, fields) in &tables {
            if let Some(c) = &t.comment {
                let _ = writeln!(text, "{c}");
            }
            let _ = writeln!(text, "\n[[{}]]", t.key);
            for (k, v) in fields {
                let _ = writeln!(text, "{k} = {v}");
            }
        }
    }
    Spec {
        text,
        services: rules.iter().filter(|t| t.key == "service").count(),
        blocks: rules.iter().filter(|t| t.key == "block").count(),
        alerts: alerts.len(),
    }
}

/// Policies from the schema: valid by construction (`wild` 0), or with `wild` values in a
/// thousand invalid.
fn policy(wild: Wild) -> BoxedStrategy<Spec> {
    (
        top(wild),
        vec(rule_spec(wild), 0..=10),
        vec(alert_table(wild), 0..=4),
        prop::bool::weighted(0.25),
    )
        .prop_map(|(top, rules, alerts, inline)| render(top, rules, alerts, inline))
        .boxed()
}

/// Policies with invalid values here and there: one a policy or so (often the only one, so that
/// it is found by the checks after the first), a few, or many.
fn wild_policy() -> BoxedStrategy<Spec> {
    prop_oneof![policy(10), policy(40), policy(110)].boxed()
}

/// Policies whose rules crowd a few nested networks with many ports, around the limit of port
/// ranges one destination's rule set holds.
fn crowded_policy() -> BoxedStrategy<String> {
    const NETWORKS: &[&str] = &[
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.3",
        "10.2.0.0/16",
        "::/0",
        "2001:db8::/32",
        "::ffff:10.1.0.0/112",
    ];
    let port = prop_oneof![
        (1u16..400).prop_map(|p| (p * 3).to_string()),
        (1u16..400, 0u16..6).prop_map(|(p, w)| quoted(&format!("{}-{}", p * 3, p * 3 + w))),
    ];
    let rule = (
        prop_oneof![3 => Just("service"), 1 => Just("block")],
        vec(select(NETWORKS), 1..=3),
        option::weighted(0.9, vec(port, 1..=24)),
    );
    vec(rule, 1..=8)
        .prop_map(|rules| {
            let mut text = String::new();
            for (i, (kind, networks, ports)) in rules.iter().enumerate() {
                let networks: Vec<String> = networks.iter().map(|n| quoted(n)).collect();
                let _ = writeln!(
                    text,
                    "[[{kind}]]\nname = \"r{i}\"\ndestinations = [{}]",
                    networks.join(", ")
                );
                if let Some(ports) = ports {
                    let _ = writeln!(text, "ports = [{}]", ports.join(", "));
                }
            }
            text
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Mutations and raw text
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    DuplicateLine(Index),
    DeleteLine(Index),
    SwapLines(Index, Index),
    Insert(Index, String),
}

/// Tokens of TOML and of the policy schema.
const TOKENS: &[&str] = &[
    "[[service]]\n",
    "[[block]]\n",
    "[[alert]]\n",
    "[service]\n",
    "[service.x]\n",
    "name",
    "destinations",
    "hosts",
    "[dns]\n",
    "dns",
    "upstream",
    "min_ttl",
    "max_ttl",
    "unlisted",
    "\"refuse\"",
    "\"*.example.com\"",
    "\"**.a.b\"",
    "\"10.0.0.2:53\"",
    "ports",
    "protocols",
    "mode",
    "default",
    "allow_loopback",
    "nat64_prefixes",
    "bytes",
    "window",
    "per",
    "action",
    "cooldown",
    "services",
    "exclude_destinations",
    "unapproved_only",
    "service",
    "block",
    "alert",
    " = ",
    "=",
    "\"",
    "'",
    "\"\"\"",
    "'''",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "\r\n",
    "\r",
    " ",
    "\t",
    "#",
    "\"10.0.0.0/8\"",
    "\"0.0.0.0/0\"",
    "\"::/0\"",
    "\"::ffff:1.2.3.4\"",
    "\"64:ff9b::/96\"",
    "80",
    "\"1-2\"",
    "0",
    "65536",
    "-1",
    "\"tcp\"",
    "\"udp\"",
    "\"web\"",
    "\"default\"",
    "true",
    "false",
    "1.5",
    "inf",
    "nan",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "0x10",
    "1_000",
    "\"5m\"",
    "\"100MiB\"",
    "\"block\"",
    "\"process\"",
    "\\",
    "\\u0000",
    "\\U0010FFFF",
    "é",
    "\u{0}",
    "\u{feff}",
    "\u{202e}",
    "𝔘",
];

/// What a mutation inserts: unicode, tokens, very long strings and deep nesting.
fn insertion() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(TOKENS).prop_map(str::to_string),
        1 => "\\PC{1,8}",
        1 => (1usize..20_000).prop_map(|n| "a".repeat(n)),
        1 => (1usize..20_000).prop_map(|n| format!("\"{}\"", "x".repeat(n))),
        1 => (1usize..20_000).prop_map(|n| format!("\"10.0.0.0/{}8\"", "0".repeat(n))),
        1 => (1usize..3000, select(&["[", "{a=", "[[", "a.", "[{a=[", "]", "}"][..]))
            .prop_map(|(n, s)| s.repeat(n)),
    ]
    .boxed()
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (
            any::<Index>(),
            prop_oneof![select(&b"\"'[]{}=\n/-09x ,.#\\\t\r"[..]), any::<u8>()]
        )
            .prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        any::<Index>().prop_map(Mutation::DuplicateLine),
        any::<Index>().prop_map(Mutation::DeleteLine),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<Index>(), insertion()).prop_map(|(i, s)| Mutation::Insert(i, s)),
    ]
    .boxed()
}

/// `text` with `mutations` applied, in order (bytes; invalid UTF-8 becomes U+FFFD).
fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for m in mutations {
        let mut lines: Vec<Vec<u8>> = bytes
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        match m {
            Mutation::FlipBit(i, bit) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] ^= 1 << bit;
            }
            Mutation::SetByte(i, b) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] = *b;
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Mutation::DuplicateLine(i) if !lines.is_empty() => {
                let at = i.index(lines.len());
                let line = lines[at].clone();
                lines.insert(at, line);
                bytes = lines.concat();
            }
            Mutation::DeleteLine(i) if !lines.is_empty() => {
                lines.remove(i.index(lines.len()));
                bytes = lines.concat();
            }
            Mutation::SwapLines(a, b) if !lines.is_empty() => {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
                bytes = lines.concat();
            }
            Mutation::Insert(i, s) => {
                let at = i.index(bytes.len() + 1);
                bytes.splice(at..at, s.bytes());
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// Random addresses and ports to evaluate, besides those taken from the policy.
#[derive(Debug, Clone)]
struct Samples {
    v4: Vec<u32>,
    v6: Vec<u128>,
    ports: Vec<u16>,
}

fn samples() -> BoxedStrategy<Samples> {
    (vec(v4_addr(), 3), vec(v6_addr(), 3), vec(any::<u16>(), 2))
        .prop_map(|(v4, v6, ports)| Samples { v4, v6, ports })
        .boxed()
}

/// What a parse of `text` gave, after every property of it held.
enum Checked {
    Rejected,
    NotCompiled,
    Compiled(Box<(Policy, CompiledPolicy)>),
}

/// Every property of one text: see the module documentation.
fn check(text: &str, samples: &Samples) -> Result<Checked, TestCaseError> {
    let parsed = Policy::parse(FILE, text);
    let again = Policy::parse(FILE, text);
    prop_assert!(parsed == again, "parsing the same text twice differs");
    let policy = match parsed {
        Err(e) => {
            check_error(text, &e)?;
            return Ok(Checked::Rejected);
        }
        Ok(p) => p,
    };
    check_policy(text, &policy)?;
    let too_many = too_many_port_ranges(&policy);
    let compiled = match CompiledPolicy::compile(&policy) {
        Err(e) => {
            check_compile_error(&policy, &e)?;
            prop_assert!(
                too_many,
                "compile failed though every destination's port ranges fit: {e}"
            );
            return Ok(Checked::NotCompiled);
        }
        Ok(c) => c,
    };
    prop_assert!(
        !too_many,
        "compiled though a destination needs more than {MAX_PORT_RULES} port ranges"
    );
    check_compiled(&policy, &compiled, samples)?;
    Ok(Checked::Compiled(Box::new((policy, compiled))))
}

/// A parse error points into the text and says what and where.
fn check_error(text: &str, e: &PolicyError) -> Result<(), TestCaseError> {
    let lines: Vec<&str> = text.split('\n').collect();
    prop_assert_eq!(&e.file, FILE);
    prop_assert!(
        e.line >= 1 && e.line <= lines.len(),
        "line {} is outside the text's {} lines: {}",
        e.line,
        lines.len(),
        e
    );
    let line_chars = lines[e.line - 1].chars().count();
    prop_assert!(
        e.column >= 1 && e.column <= line_chars + 1,
        "column {} is outside line {} ({} characters): {}",
        e.column,
        e.line,
        line_chars,
        e
    );
    prop_assert!(!e.field.is_empty(), "error without a field: {}", e);
    prop_assert!(
        !e.message.trim().is_empty(),
        "error without a message: {}",
        e
    );
    // One line of text: no line break or terminal control from the policy gets through.
    let shown = e.to_string();
    prop_assert!(
        !shown.contains(char::is_control),
        "error is not one line of plain text: {:?}",
        shown
    );
    let head = format!("{FILE}:{}:{}: {}: ", e.line, e.column, e.field);
    prop_assert!(
        shown.starts_with(&head),
        "{} does not start with {}",
        shown,
        head
    );
    Ok(())
}

/// A destination as parsing promises it: canonical, v4-mapped ones stored as IPv4.
fn check_destination(d: &Destination) -> Result<(), TestCaseError> {
    let net = d.network();
    prop_assert_eq!(net.ip(), net.network(), "{} has host bits set", d);
    if let IpNetwork::V6(n) = net {
        prop_assert!(
            n.prefix() < 96 || n.ip().to_ipv4_mapped().is_none(),
            "{} is v4-mapped but kept as IPv6",
            d
        );
    }
    Ok(())
}

/// A host pattern as parsing promises it: lowercase, labels and length within RFC 1035, and the
/// same pattern when its text is parsed again.
fn check_host(h: &HostPattern) -> Result<(), TestCaseError> {
    let suffix = h.suffix();
    prop_assert!(!suffix.is_empty() && !suffix.ends_with('.'), "{}", h);
    prop_assert!(
        !suffix.bytes().any(|b| b.is_ascii_uppercase()),
        "{} is not lowercase",
        h
    );
    prop_assert!(suffix.len() <= MAX_NAME_LEN, "{} is too long", h);
    prop_assert!(
        suffix
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= MAX_LABEL_LEN),
        "{} has a bad label",
        h
    );
    prop_assert!(!suffix.contains('*'), "{} has a wildcard inside", h);
    let again: HostPattern = h
        .to_string()
        .parse()
        .map_err(|e| TestCaseError::fail(format!("{h} does not parse again: {e}")))?;
    prop_assert_eq!(&again, h);
    Ok(())
}

/// Names worth asking the matcher about: each pattern's suffix, one and two labels under it, a
/// look-alike that is not under it, in mixed case and with a trailing dot.
fn sample_names(p: &Policy) -> Vec<String> {
    let mut out = vec!["example.com".to_string(), "nothing.test".to_string()];
    for h in p.rules.iter().flat_map(|r| &r.hosts).take(6) {
        let s = h.suffix();
        out.extend([
            s.to_string(),
            format!("x.{s}"),
            format!("X.y.{}.", s.to_ascii_uppercase()),
            format!("evil{s}"),
        ]);
    }
    out
}

/// What parsing promises about a policy it accepts.
fn check_policy(text: &str, p: &Policy) -> Result<(), TestCaseError> {
    let lines = text.split('\n').count();
    prop_assert_eq!(&p.source, FILE);
    prop_assert_eq!(&p.hash, &content_hash(text));
    prop_assert!(
        p.rules.is_sorted_by_key(|r| r.kind == RuleKind::Block),
        "services do not come first"
    );
    prop_assert!(p.nat64_prefixes.len() <= MAX_NAT64_PREFIXES);
    for n in &p.nat64_prefixes {
        prop_assert_eq!(
            u128::from(*n) & 0xffff_ffff,
            0,
            "{} is not a /96 network",
            n
        );
        prop_assert!(
            n.to_ipv4_mapped().is_none(),
            "{} is the v4-mapped prefix",
            n
        );
    }
    let mut names = HashSet::new();
    let rule_names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
    for name in rule_names
        .iter()
        .copied()
        .chain(p.alerts.iter().map(|a| a.name.as_str()))
    {
        prop_assert!(!name.trim().is_empty(), "empty name");
        prop_assert!(
            name != "default" && name != "loopback",
            "reserved name {}",
            name
        );
        prop_assert!(names.insert(name), "duplicate name {:?}", name);
    }
    for r in &p.rules {
        prop_assert!(
            r.line >= 1 && r.line <= lines,
            "rule line {} of {}",
            r.line,
            lines
        );
        prop_assert!(
            !r.destinations.is_empty() || !r.hosts.is_empty(),
            "rule {} without destinations or hosts",
            r.name
        );
        let mut seen = HashSet::new();
        for h in &r.hosts {
            check_host(h)?;
            prop_assert!(seen.insert(h), "rule {} repeats the pattern {}", r.name, h);
        }
        for d in &r.destinations {
            check_destination(d)?;
        }
        for pr in &r.ports {
            prop_assert!(
                pr.lo() >= 1 && pr.lo() <= pr.hi(),
                "port range {}-{}",
                pr.lo(),
                pr.hi()
            );
        }
        prop_assert!(
            r.protocols.windows(2).all(|w| w[0] < w[1]),
            "protocols not sorted and unique"
        );
    }
    let dns = &p.dns;
    prop_assert!(dns.upstream.len() <= MAX_UPSTREAMS);
    prop_assert!(
        dns.upstream
            .iter()
            .all(|u| u.0.port() != 0 && !u.0.ip().is_unspecified())
    );
    prop_assert!(
        Duration::from_secs(1) <= dns.min_ttl
            && dns.min_ttl <= dns.max_ttl
            && dns.max_ttl <= Duration::from_secs(7 * 86_400),
        "ttls {:?}-{:?}",
        dns.min_ttl,
        dns.max_ttl
    );
    for a in &p.alerts {
        prop_assert!(a.line >= 1 && a.line <= lines, "alert line {}", a.line);
        prop_assert!(a.bytes >= 1 || a.is_dns());
        for d in [a.window, a.cooldown] {
            prop_assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(7 * 86_400),
                "duration {:?}",
                d
            );
        }
        let _ = a.window_text();
        for s in &a.services {
            prop_assert!(rule_names.contains(&s.as_str()), "alert names {:?}", s);
        }
        if a.action == AlertAction::Block {
            prop_assert!(a.per.blockable());
        }
        for d in a.destinations.iter().chain(&a.exclude_destinations) {
            check_destination(d)?;
        }
    }
    Ok(())
}

/// A rule's port ranges, sorted and merged (counted here independently of the compiler).
fn port_range_count(r: &Rule) -> usize {
    if r.ports.is_empty() {
        return 1;
    }
    let mut ranges: Vec<(u32, u32)> = r
        .ports
        .iter()
        .map(|p| (u32::from(p.lo()), u32::from(p.hi())))
        .collect();
    ranges.sort_unstable();
    let mut count = 0;
    let mut end: Option<u32> = None;
    for (lo, hi) in ranges {
        match end {
            Some(e) if lo <= e + 1 => end = Some(e.max(hi)),
            _ => {
                count += 1;
                end = Some(hi);
            }
        }
    }
    count
}

/// Whether some destination of the policy is covered by rules needing more port ranges than a
/// rule set holds. A rule covers a destination network when one of its networks contains it.
fn too_many_port_ranges(p: &Policy) -> bool {
    let contains = |outer: &IpNetwork, inner: &IpNetwork| {
        outer.prefix() <= inner.prefix() && outer.contains(inner.network())
    };
    let networks: HashSet<IpNetwork> = p
        .rules
        .iter()
        .flat_map(|r| r.destinations.iter().map(Destination::network))
        .collect();
    networks.iter().any(|net| {
        let needed: usize = p
            .rules
            .iter()
            .filter(|r| r.destinations.iter().any(|d| contains(&d.network(), net)))
            .map(port_range_count)
            .sum();
        needed > MAX_PORT_RULES
    })
}

/// A compile error is the port-range limit, at a rule's line.
fn check_compile_error(p: &Policy, e: &CompileError) -> Result<(), TestCaseError> {
    prop_assert_eq!(&e.file, &p.source);
    prop_assert!(e.message.contains("port ranges"), "unexpected error: {}", e);
    prop_assert!(
        p.rules.iter().any(|r| r.line == e.line),
        "error line {} is no rule's",
        e.line
    );
    let shown = e.to_string();
    prop_assert!(
        !shown.contains(char::is_control),
        "error is not one line of plain text: {:?}",
        shown
    );
    Ok(())
}

/// The IPv4 address an IPv6 destination carries: 6to4, v4-compatible, NAT64 (well-known and the
/// policy's prefixes).
fn carried_v4(p: &Policy, a: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = a.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if a.segments()[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    let head = u128::from(a) >> 32;
    if head == 0 {
        return (u32::from(tail) > 1).then_some(tail);
    }
    let well_known = 0x0064_ff9b_u128 << 64;
    let mut prefixes = p.nat64_prefixes.iter().map(|n| u128::from(*n) >> 32);
    (head == well_known || prefixes.any(|n| n == head)).then_some(tail)
}

/// The verdict for one address, read from the policy as written: loopback; else the rules whose
/// networks contain the address, a matching block (lowest id first) over a matching service;
/// else the default.
fn reference_one(p: &Policy, dst: IpAddr, port: u16, ipproto: u8) -> Evaluation {
    let judged = match dst {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(dst, IpAddr::V4),
        IpAddr::V4(_) => dst,
    };
    let verdict = |allow, rule_id, reason| Evaluation {
        allow,
        rule_id,
        reason,
        judged,
        carried_v4: None,
        audit_rule: 0,
    };
    if p.allow_loopback && (judged.is_loopback() || judged.is_unspecified()) {
        return verdict(true, egress_common::RULE_LOOPBACK, Reason::Loopback);
    }
    let default_allow = p.default == super::DefaultVerdict::Allow;
    let prefix = p
        .rules
        .iter()
        .flat_map(|r| &r.destinations)
        .map(Destination::network)
        .filter(|n| n.contains(judged))
        .max_by_key(IpNetwork::prefix);
    let Some(prefix) = prefix else {
        return verdict(default_allow, egress_common::RULE_DEFAULT, Reason::Default);
    };
    let covers = |r: &Rule| {
        let tcp_udp =
            ipproto == egress_common::IPPROTO_TCP || ipproto == egress_common::IPPROTO_UDP;
        let protocol = if r.protocols.is_empty() {
            tcp_udp || (r.kind == RuleKind::Block && r.ports.is_empty())
        } else {
            r.protocols.iter().any(|p| protocol_number(*p) == ipproto)
        };
        // Ports are about TCP and UDP: another protocol a rule names matches at any port.
        let port_ok = r.ports.is_empty()
            || !tcp_udp
            || r.ports.iter().any(|pr| pr.lo() <= port && port <= pr.hi());
        protocol && port_ok && r.destinations.iter().any(|d| d.network().contains(judged))
    };
    let first = |kind: RuleKind| {
        p.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.kind == kind && covers(r))
    };
    match first(RuleKind::Block).or_else(|| first(RuleKind::Service)) {
        Some((i, r)) => {
            let rule_id = i as u32 + 1;
            verdict(
                r.kind == RuleKind::Service,
                rule_id,
                Reason::Rule { prefix, rule_id },
            )
        }
        None => verdict(
            default_allow,
            egress_common::RULE_DEFAULT,
            Reason::DefaultInPrefix { prefix },
        ),
    }
}

/// [`reference_one`] for the destination and, for an IPv6 one, the IPv4 address it carries: the
/// IPv4 verdict decides when it denies what the IPv6 one allows.
fn reference(p: &Policy, dst: IpAddr, port: u16, ipproto: u8) -> Evaluation {
    let as_given = reference_one(p, dst, port, ipproto);
    let IpAddr::V6(v6) = as_given.judged else {
        return as_given;
    };
    if as_given.reason == Reason::Loopback {
        return as_given;
    }
    let Some(v4) = carried_v4(p, v6) else {
        return as_given;
    };
    let as_v4 = reference_one(p, IpAddr::V4(v4), port, ipproto);
    let decided = if as_given.allow && !as_v4.allow {
        as_v4
    } else {
        as_given
    };
    Evaluation {
        carried_v4: Some(v4),
        ..decided
    }
}

/// Addresses worth asking about: the edges of the policy's networks and just outside them, the
/// IPv6 forms of its IPv4 networks (v4-mapped, NAT64, 6to4, v4-compatible), loopback, and random.
fn sample_addresses(p: &Policy, samples: &Samples) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = [
        "127.0.0.1",
        "0.0.0.0",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "255.255.255.255",
        "10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
        "::a00:1",
        "2001:db8::1",
    ]
    .iter()
    .map(|s| s.parse().expect("a sample address"))
    .collect();
    let mut v4s: Vec<u32> = samples.v4.clone();
    for d in p.rules.iter().flat_map(|r| &r.destinations).take(6) {
        match d.network() {
            IpNetwork::V4(n) => {
                let first = u32::from(n.network());
                let last = u32::from(n.broadcast());
                v4s.extend([first, last, first.wrapping_sub(1), last.wrapping_add(1)]);
            }
            IpNetwork::V6(n) => {
                let first = u128::from(n.network());
                let last = u128::from(n.broadcast());
                for a in [first, last, first.wrapping_sub(1), last.wrapping_add(1)] {
                    out.push(IpAddr::V6(Ipv6Addr::from(a)));
                }
            }
        }
    }
    let nat64: Vec<u128> = p.nat64_prefixes.iter().map(|n| u128::from(*n)).collect();
    for (i, &a) in v4s.iter().enumerate() {
        let v4 = Ipv4Addr::from(a);
        out.push(IpAddr::V4(v4));
        // One IPv6 form each, in turn, to keep the count down.
        let v6 = match i % 5 {
            0 => u128::from(v4.to_ipv6_mapped()),
            1 => (0x0064_ff9b_u128 << 96) | u128::from(a),
            2 => (0x2002_u128 << 112) | (u128::from(a) << 80) | 1,
            3 => u128::from(a),
            _ => nat64.first().map_or(u128::from(a), |n| n | u128::from(a)),
        };
        out.push(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    out.extend(samples.v6.iter().map(|&a| IpAddr::V6(Ipv6Addr::from(a))));
    out
}

/// The compiled policy: consistent tables, the same verdicts as [`reference`], `explain` and
/// `rule_table` that agree with them, and no change against itself.
fn check_compiled(
    written: &Policy,
    c: &CompiledPolicy,
    samples: &Samples,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(c.services + c.blocks, written.rules.len());
    // The kernel's rules: the policy's own, and the DNS-over-TLS block of a policy with names.
    let enforced = Policy {
        rules: written.enforced_rules().into_owned(),
        ..written.clone()
    };
    let p = &enforced;
    prop_assert_eq!(
        p.rules.len(),
        written.rules.len() + usize::from(written.uses_names())
    );
    prop_assert_eq!(c.rule_names.len(), 1 + p.rules.len() + p.alerts.len());
    for (i, a) in p.alerts.iter().enumerate() {
        prop_assert_eq!(c.rule_name(c.alert_rule_id(i)), a.name.as_str());
    }
    let distinct: HashSet<IpNetwork> = p
        .rules
        .iter()
        .flat_map(|r| r.destinations.iter().map(Destination::network))
        .collect();
    prop_assert_eq!(c.prefix_count(), distinct.len());
    for &set in c.v4.values().chain(c.v6.values()) {
        prop_assert!(
            (set as usize) < c.rulesets.len(),
            "rule set {} is missing",
            set
        );
    }
    for set in &c.rulesets {
        prop_assert!(set.len as usize <= MAX_PORT_RULES);
        for r in &set.rules[..set.len as usize] {
            prop_assert!(r.rule_id >= 1 && r.rule_id as usize <= p.rules.len());
            prop_assert!(r.port_lo <= r.port_hi);
            let kind = p.rules[r.rule_id as usize - 1].kind;
            let action = if kind == RuleKind::Block {
                ACTION_BLOCK
            } else {
                ACTION_ALLOW
            };
            prop_assert_eq!(r.action, action);
        }
    }

    let mut ports: Vec<u16> = vec![0, 1, 53, 80, 443, u16::MAX];
    ports.extend(&samples.ports);
    for pr in p.rules.iter().flat_map(|r| &r.ports).take(3) {
        ports.extend([pr.lo() - 1, pr.lo(), pr.hi(), pr.hi().wrapping_add(1)]);
    }
    const IPPROTOS: [u8; 5] = [
        egress_common::IPPROTO_TCP,
        egress_common::IPPROTO_UDP,
        egress_common::IPPROTO_ICMP,
        egress_common::IPPROTO_ICMPV6,
        132,
    ];
    for (i, &dst) in sample_addresses(p, samples).iter().enumerate() {
        // Three ports and two protocols an address, in turn, to keep the count down.
        for j in 0..3 {
            let port = ports[(i * 3 + j) % ports.len()];
            for k in 0..2 {
                let ipproto = IPPROTOS[(i + j + k) % IPPROTOS.len()];
                let got = c.evaluate(dst, port, ipproto);
                let want = reference(p, dst, port, ipproto);
                prop_assert_eq!(
                    &got,
                    &want,
                    "{} port {} protocol {}: the compiled policy and the policy disagree",
                    dst,
                    port,
                    ipproto
                );
            }
        }
        let protocol = if i % 2 == 0 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let port = ports[i % ports.len()];
        let ex = explain(p, c, dst, port, protocol);
        let ev = c.evaluate(dst, port, protocol_number(protocol));
        prop_assert_eq!(ex.verdict, if ev.allow { "allow" } else { "deny" });
        prop_assert_eq!(ex.rule.as_str(), c.rule_name(ev.rule_id));
        let table = rule_table(c, dst);
        prop_assert!(!table.is_empty());
    }
    let index = NameIndex::new(p);
    prop_assert_eq!(index.patterns(), p.host_patterns());
    for name in sample_names(p) {
        let got = index.lookup(&name);
        let want = |kind: RuleKind| -> Vec<u32> {
            p.rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.kind == kind && r.hosts.iter().any(|h| h.covers(&name)))
                .map(|(i, _)| i as u32)
                .collect()
        };
        let rules =
            |hits: &[super::names::NameHit]| hits.iter().map(|h| h.rule).collect::<Vec<_>>();
        prop_assert_eq!(
            rules(&got.blocks),
            want(RuleKind::Block),
            "blocks of {}",
            name
        );
        prop_assert_eq!(
            rules(&got.services),
            want(RuleKind::Service),
            "services of {}",
            name
        );
        if let Ok(e) = explain_name(p, &name) {
            let verdict = if !got.blocks.is_empty() {
                "blocked"
            } else if !got.services.is_empty() {
                "approved"
            } else {
                "unlisted"
            };
            prop_assert_eq!(e.verdict.as_str(), verdict, "explain of {}", name);
            prop_assert_eq!(e.covered_by.len(), got.blocks.len() + got.services.len());
        }
    }
    prop_assert_eq!(diff::describe(p, c, p, c), "no change\n");
    Ok(())
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => egress_common::IPPROTO_TCP,
        Protocol::Udp => egress_common::IPPROTO_UDP,
        Protocol::Icmp => egress_common::IPPROTO_ICMP,
        Protocol::Icmpv6 => egress_common::IPPROTO_ICMPV6,
    }
}

/// How many of a property's cases got how far: a property whose generator never reaches the
/// compile step tests less than it says.
#[derive(Debug, Default)]
struct Reach(HashMap<&'static str, usize>);

impl Reach {
    fn count(&mut self, c: &Checked) {
        let key = match c {
            Checked::Rejected => "rejected",
            Checked::NotCompiled => "not compiled",
            Checked::Compiled(_) => "compiled",
        };
        *self.0.entry(key).or_default() += 1;
    }
}

proptest! {
    #![proptest_config(config(600))]

    /// Valid policies parse to what they say and compile (or hit the port-range limit).
    #[test]
    fn valid_policies_parse_and_compile(spec in policy(0), samples in samples()) {
        let checked = check(&spec.text, &samples)?;
        let (p, _) = match &checked {
            Checked::Rejected => {
                let e = Policy::parse(FILE, &spec.text).expect_err("rejected");
                return Err(TestCaseError::fail(format!("a valid policy was rejected: {e}\n{}", spec.text)));
            }
            Checked::NotCompiled => return Ok(()),
            Checked::Compiled(pc) => &**pc,
        };
        prop_assert_eq!(p.services().count(), spec.services);
        prop_assert_eq!(p.blocks().count(), spec.blocks);
        prop_assert_eq!(p.alerts.len(), spec.alerts);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Policies from the schema with invalid values here and there.
    #[test]
    fn wild_policies_hold_every_property(spec in wild_policy(), samples in samples()) {
        check(&spec.text, &samples)?;
    }

    /// Valid policies, mutated: the result of each is checked, and diffed against the original.
    #[test]
    fn mutated_policies_hold_every_property(
        spec in policy(0),
        mutations in vec(mutation(), 1..=4),
        samples in samples(),
    ) {
        let text = mutate(&spec.text, &mutations);
        if let Checked::Compiled(b) = check(&text, &samples)? {
            // The original is checked by `valid_policies_parse_and_compile`; here it is only
            // diffed against.
            let a = Policy::parse(FILE, &spec.text).expect("a valid policy");
            if let Ok(ac) = CompiledPolicy::compile(&a) {
                let _ = diff::describe(&a, &ac, &b.0, &b.1);
                let _ = diff::describe(&b.0, &b.1, &a, &ac);
            }
        }
    }

    /// Many port ranges on a few networks: compile fails exactly when one needs too many.
    #[test]
    fn crowded_policies_hold_every_property(text in crowded_policy(), samples in samples()) {
        prop_assert!(!matches!(check(&text, &samples)?, Checked::Rejected), "rejected:\n{}", text);
    }

}

proptest! {
    // Cheap cases: most end in the TOML parser.
    #![proptest_config(config(4000))]

    /// A soup of TOML and schema tokens.
    #[test]
    fn token_soup_holds_every_property(
        tokens in vec(select(TOKENS), 0..=64),
        samples in samples(),
    ) {
        check(&tokens.concat(), &samples)?;
    }

    /// Arbitrary bytes (as UTF-8, invalid sequences replaced).
    #[test]
    fn arbitrary_text_holds_every_property(
        bytes in vec(any::<u8>(), 0..=512),
        samples in samples(),
    ) {
        check(&String::from_utf8_lossy(&bytes), &samples)?;
    }
}

/// The generators reach every stage: valid policies compile, wild and mutated ones are rejected
/// in part and accepted in part. (A generator that never gets past the parser would pass every
/// property and test nothing.)
#[test]
fn generators_reach_every_stage() {
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let samples = Samples {
        v4: vec![],
        v6: vec![],
        ports: vec![],
    };
    let mut reach = |strategy: BoxedStrategy<String>| {
        let mut r = Reach::default();
        for _ in 0..200 {
            let text = strategy.new_tree(&mut runner).expect("a value").current();
            r.count(&check(&text, &samples).expect("every property holds"));
        }
        r.0
    };
    // Valid policies use the newer keys too: hosts (with and without destinations) and [dns].
    let (mut with_hosts, mut hosts_only, mut with_dns) = (0, 0, 0);
    let mut own_runner = TestRunner::deterministic();
    for _ in 0..200 {
        let spec = policy(0)
            .new_tree(&mut own_runner)
            .expect("a value")
            .current();
        let p = Policy::parse(FILE, &spec.text).expect("a valid policy");
        with_hosts += usize::from(p.host_patterns() > 0);
        hosts_only += usize::from(p.rules.iter().any(|r| r.destinations.is_empty()));
        with_dns += usize::from(p.dns != super::DnsSettings::default());
    }
    assert!(
        with_hosts >= 50 && hosts_only >= 30 && with_dns >= 50,
        "hosts {with_hosts}, hosts only {hosts_only}, dns {with_dns} of 200"
    );
    let valid = reach(policy(0).prop_map(|s| s.text).boxed());
    assert!(
        valid.get("compiled").copied().unwrap_or(0) >= 190,
        "{valid:?}"
    );
    let wild = reach(wild_policy().prop_map(|s| s.text).boxed());
    for stage in ["rejected", "compiled"] {
        assert!(wild.get(stage).copied().unwrap_or(0) >= 20, "{wild:?}");
    }
    let crowded = reach(crowded_policy());
    for stage in ["not compiled", "compiled"] {
        assert!(
            crowded.get(stage).copied().unwrap_or(0) >= 20,
            "{crowded:?}"
        );
    }
    let mutated = reach(
        (policy(0), vec(mutation(), 1..=4))
            .prop_map(|(s, m)| mutate(&s.text, &m))
            .boxed(),
    );
    // Most mutations break a policy; some leave it valid (a comment, a string's content).
    assert!(
        mutated.get("rejected").copied().unwrap_or(0) >= 100,
        "{mutated:?}"
    );
    assert!(
        mutated.get("compiled").copied().unwrap_or(0) >= 5,
        "{mutated:?}"
    );
}
