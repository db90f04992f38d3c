//! The name matcher: which `[[service]]` and `[[block]]` tables cover a DNS name through their
//! `hosts`, for the DNS proxy (on every query and every name of a CNAME chain) and for
//! `egress explain NAME`. Pure: built from a [`Policy`], no I/O.
//!
//! The index is a trie of labels read right to left (`com` → `example` → `api`), so a lookup
//! costs one hash probe per label of the name, whatever the number of patterns (10k patterns
//! and more: tested). Each node, the suffix spelled by the path to it, holds the patterns that
//! end there: exact names, `*.` (exactly one label more) and `**.` (one or more labels more).
//! Walking a name collects, at each suffix, the `**.` patterns while at least one label is left,
//! the `*.` patterns when exactly one is, and at the end of the name the exact ones.
//!
//! Blocks win: a name any block covers is blocked, whatever services cover it too (as a block
//! wins over a service for addresses, whatever the prefix lengths). Among services, all are
//! reported in file order; the first is the one events name.

use std::collections::HashMap;

use super::{Policy, RuleKind};

/// One pattern that covers a name: its rule and the pattern's place in the rule's `hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameHit {
    /// Index in [`Policy::rules`].
    pub rule: u32,
    /// Index in the rule's `hosts`.
    pub pattern: u32,
    pub kind: RuleKind,
}

impl NameHit {
    /// The rule id events and the kernel maps use (`CompiledPolicy::rule_names` numbering).
    pub fn rule_id(&self) -> u32 {
        self.rule + 1
    }
}

/// Every rule that covers a name, one hit per rule (its first matching pattern), in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    pub blocks: Vec<NameHit>,
    pub services: Vec<NameHit>,
}

/// What the policy says about a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameVerdict<'a> {
    /// A block covers it (the first in file order).
    Blocked(NameHit),
    /// No block does; these services do (at least one, in file order).
    Approved(&'a [NameHit]),
    /// Nothing covers it: `[dns] unlisted` decides.
    Unlisted,
}

impl Coverage {
    pub fn verdict(&self) -> NameVerdict<'_> {
        if let Some(b) = self.blocks.first() {
            NameVerdict::Blocked(*b)
        } else if self.services.is_empty() {
            NameVerdict::Unlisted
        } else {
            NameVerdict::Approved(&self.services)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.services.is_empty()
    }
}

#[derive(Debug, Default)]
struct Node {
    /// Next label to the left (lowercase) -> node index.
    children: HashMap<Box<[u8]>, u32>,
    exact: Vec<NameHit>,
    one_label: Vec<NameHit>,
    any_labels: Vec<NameHit>,
}

/// The index of every `hosts` pattern of a policy.
#[derive(Debug)]
pub struct NameIndex {
    /// Node 0 is the root (the empty suffix).
    nodes: Vec<Node>,
    patterns: usize,
}

impl NameIndex {
    pub fn new(policy: &Policy) -> NameIndex {
        let mut index = NameIndex {
            nodes: vec![Node::default()],
            patterns: 0,
        };
        for (r, rule) in policy.rules.iter().enumerate() {
            for (p, pattern) in rule.hosts.iter().enumerate() {
                let hit = NameHit {
                    rule: r as u32,
                    pattern: p as u32,
                    kind: rule.kind,
                };
                let mut at = 0usize;
                for label in pattern.labels_reversed() {
                    let next = index.nodes.len() as u32;
                    let child = *index.nodes[at]
                        .children
                        .entry(label.as_bytes().into())
                        .or_insert(next);
                    if child == next {
                        index.nodes.push(Node::default());
                    }
                    at = child as usize;
                }
                let node = &mut index.nodes[at];
                match pattern.wildcard() {
                    super::hosts::Wildcard::Exact => node.exact.push(hit),
                    super::hosts::Wildcard::OneLabel => node.one_label.push(hit),
                    super::hosts::Wildcard::AnyLabels => node.any_labels.push(hit),
                }
                index.patterns += 1;
            }
        }
        index
    }

    /// How many patterns the index holds.
    pub fn patterns(&self) -> usize {
        self.patterns
    }

    /// The rules covering a name given as text (any case; one trailing dot ignored).
    pub fn lookup(&self, name: &str) -> Coverage {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return Coverage::default();
        }
        let labels: Vec<&[u8]> = name.split('.').map(str::as_bytes).collect();
        self.lookup_labels(&labels)
    }

    /// The rules covering a name given as its labels, leftmost first, as they are on the wire
    /// (any bytes, any case: a label holding a `.` is one label, as DNS has it).
    pub fn lookup_labels(&self, labels: &[&[u8]]) -> Coverage {
        let mut hits: Vec<NameHit> = Vec::new();
        let mut node = &self.nodes[0];
        let mut lower: Vec<u8> = Vec::with_capacity(64);
        let mut reached_end = true;
        for (consumed, label) in labels.iter().rev().enumerate() {
            // `node` is the suffix of the `consumed` rightmost labels; `label` and those left of
            // it remain.
            if consumed > 0 {
                hits.extend_from_slice(&node.any_labels);
                if consumed + 1 == labels.len() {
                    hits.extend_from_slice(&node.one_label);
                }
            }
            lower.clear();
            lower.extend(label.iter().map(u8::to_ascii_lowercase));
            match node.children.get(lower.as_slice()) {
                Some(&next) => node = &self.nodes[next as usize],
                None => {
                    reached_end = false;
                    break;
                }
            }
        }
        if reached_end && !labels.is_empty() {
            hits.extend_from_slice(&node.exact);
        }
        // One hit per rule, its first pattern; rules in file order within each kind.
        hits.sort_unstable();
        hits.dedup_by_key(|h| h.rule);
        let (blocks, services) = hits.into_iter().partition(|h| h.kind == RuleKind::Block);
        Coverage { blocks, services }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::{collection::vec, prelude::*, sample::select};

    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::parse("t.toml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn names(p: &Policy, c: &Coverage) -> (Vec<String>, Vec<String>) {
        let n = |hits: &[NameHit]| {
            hits.iter()
                .map(|h| p.rules[h.rule as usize].name.clone())
                .collect()
        };
        (n(&c.blocks), n(&c.services))
    }

    const POLICY: &str = r#"
[[service]]
name = "github"
hosts = ["github.com", "*.github.com", "**.githubusercontent.com"]
ports = [443]

[[service]]
name = "apex-only"
hosts = ["example.com"]

[[service]]
name = "one-label"
hosts = ["*.example.com"]

[[service]]
name = "any-labels"
hosts = ["**.example.com", "*.example.com"]

[[block]]
name = "paste"
hosts = ["pastebin.com", "**.pastebin.com"]

[[service]]
name = "paste-api"
hosts = ["api.pastebin.com"]
"#;

    #[test]
    fn exact_one_label_and_any_labels() {
        let p = policy(POLICY);
        let idx = NameIndex::new(&p);
        assert_eq!(idx.patterns(), 10);
        let svc = |name: &str| names(&p, &idx.lookup(name)).1;
        assert_eq!(svc("github.com"), ["github"]);
        assert_eq!(svc("api.github.com"), ["github"]);
        assert!(svc("a.api.github.com").is_empty(), "*. is one label");
        assert!(svc("evilgithub.com").is_empty(), "whole labels only");
        assert!(
            svc("githubusercontent.com").is_empty(),
            "**. leaves the apex out"
        );
        assert_eq!(svc("raw.githubusercontent.com"), ["github"]);
        assert_eq!(svc("a.b.c.githubusercontent.com"), ["github"]);
        assert_eq!(svc("example.com"), ["apex-only"]);
        assert_eq!(svc("www.example.com"), ["one-label", "any-labels"]);
        assert_eq!(svc("a.www.example.com"), ["any-labels"]);
        assert!(svc("com").is_empty());
        assert!(svc("").is_empty());
        assert!(svc(".").is_empty());
    }

    #[test]
    fn case_and_trailing_dot_do_not_matter() {
        let p = policy(POLICY);
        let idx = NameIndex::new(&p);
        for name in ["API.GitHub.com", "api.github.com.", "Api.Github.Com."] {
            assert_eq!(names(&p, &idx.lookup(name)).1, ["github"], "{name}");
        }
        // Wire labels: bytes, any case.
        let c = idx.lookup_labels(&[b"RAW", b"GitHubUserContent", b"COM"]);
        assert_eq!(names(&p, &c).1, ["github"]);
        // A label holding a dot is one label, not two.
        let c = idx.lookup_labels(&[b"a.b", b"example", b"com"]);
        assert_eq!(names(&p, &c).1, ["one-label", "any-labels"]);
    }

    #[test]
    fn blocks_win_over_services() {
        let p = policy(POLICY);
        let idx = NameIndex::new(&p);
        let c = idx.lookup("api.pastebin.com");
        assert_eq!(
            names(&p, &c),
            (vec!["paste".to_string()], vec!["paste-api".to_string()])
        );
        match c.verdict() {
            NameVerdict::Blocked(h) => {
                assert_eq!(p.rules[h.rule as usize].name, "paste");
                assert_eq!(h.kind, RuleKind::Block);
                assert_eq!(
                    p.rules[h.rule as usize].hosts[h.pattern as usize].to_string(),
                    "**.pastebin.com"
                );
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            idx.lookup("pastebin.com").verdict(),
            NameVerdict::Blocked(_)
        ));
        assert!(
            matches!(idx.lookup("github.com").verdict(), NameVerdict::Approved(s) if s.len() == 1)
        );
        assert_eq!(idx.lookup("nothing.test").verdict(), NameVerdict::Unlisted);
    }

    #[test]
    fn rule_ids_follow_the_compiled_numbering() {
        let p = policy(POLICY);
        let c = super::super::compile::CompiledPolicy::compile(&p).unwrap();
        let idx = NameIndex::new(&p);
        let hit = idx.lookup("pastebin.com").blocks[0];
        assert_eq!(c.rule_name(hit.rule_id()), "paste");
        let hit = idx.lookup("github.com").services[0];
        assert_eq!(c.rule_name(hit.rule_id()), "github");
    }

    #[test]
    fn ten_thousand_patterns_stay_fast() {
        // Built directly: parsing 10k tables of TOML in a debug build takes far longer than the
        // index does.
        let mut p = policy("");
        p.rules = (0..10_000)
            .map(|i| {
                let host = match i % 3 {
                    0 => format!("svc{i}.example.com"),
                    1 => format!("*.tenant{i}.example.net"),
                    _ => format!("**.zone{i}.example.org"),
                };
                super::super::Rule {
                    kind: if i % 10 == 0 {
                        RuleKind::Block
                    } else {
                        RuleKind::Service
                    },
                    name: format!("r{i}"),
                    destinations: Vec::new(),
                    hosts: vec![host.parse().unwrap()],
                    ports: Vec::new(),
                    protocols: Vec::new(),
                    line: i + 1,
                    selectors: Default::default(),
                    audit: false,
                    feed: None,
                }
            })
            .collect();
        let idx = NameIndex::new(&p);
        assert_eq!(idx.patterns(), 10_000);
        let queries: Vec<String> = (0..100_000)
            .map(|i| match i % 4 {
                0 => format!("svc{}.example.com", i % 10_000),
                1 => format!("a.tenant{}.example.net", i % 10_000),
                2 => format!("a.b.c.zone{}.example.org", i % 10_000),
                _ => format!("miss{i}.example.com"),
            })
            .collect();
        let start = Instant::now();
        let covered = queries.iter().filter(|q| !idx.lookup(q).is_empty()).count();
        let took = start.elapsed();
        // Only names whose pattern index matches the kind rotation are covered: each of the first
        // three shapes is covered for a third of the indices.
        assert!(covered > 20_000, "{covered}");
        // A linear scan of 10k patterns per query would take minutes in a debug build; the trie
        // takes well under a second for 100k queries even there.
        assert!(took.as_secs_f64() < 5.0, "100k lookups took {took:?}");
    }

    /// Labels from a small alphabet, so that generated names and patterns overlap often.
    fn label() -> impl Strategy<Value = String> {
        select(&["a", "b", "c", "example", "com", "Com", "x-1", "_s"][..]).prop_map(str::to_string)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

        /// The index agrees with [`HostPattern::covers`] read pattern by pattern, blocks apart.
        #[test]
        fn index_agrees_with_each_pattern(
            rules in vec((prop::bool::ANY, vec((0u8..3, vec(label(), 1..=3)), 1..=3)), 1..=8),
            queries in vec(vec(label(), 0..=5), 1..=12),
        ) {
            let mut text = String::new();
            for (i, (block, hosts)) in rules.iter().enumerate() {
                let hosts: Vec<String> = hosts
                    .iter()
                    .map(|(w, labels)| {
                        let w = ["", "*.", "**."][*w as usize];
                        format!("\"{w}{}\"", labels.join("."))
                    })
                    .collect();
                text.push_str(&format!(
                    "[[{}]]\nname = \"r{i}\"\nhosts = [{}]\n",
                    if *block { "block" } else { "service" },
                    hosts.join(", ")
                ));
            }
            let p = policy(&text);
            let idx = NameIndex::new(&p);
            for q in &queries {
                let name = q.join(".");
                let got = idx.lookup(&name);
                let want = |kind: RuleKind| -> Vec<u32> {
                    p.rules
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.kind == kind && r.hosts.iter().any(|h| h.covers(&name)))
                        .map(|(i, _)| i as u32)
                        .collect()
                };
                let rules_of = |hits: &[NameHit]| hits.iter().map(|h| h.rule).collect::<Vec<_>>();
                prop_assert_eq!(rules_of(&got.blocks), want(RuleKind::Block), "{}", name);
                prop_assert_eq!(rules_of(&got.services), want(RuleKind::Service), "{}", name);
                for h in got.blocks.iter().chain(&got.services) {
                    let r = &p.rules[h.rule as usize];
                    // The hit is the rule's first pattern that covers the name.
                    let first = r.hosts.iter().position(|x| x.covers(&name));
                    prop_assert_eq!(Some(h.pattern as usize), first, "{}", name);
                }
            }
        }
    }
}
