//! Pod selectors: `pods = { namespace = "payments", labels = { app = "api" } }` on a
//! `[[service]]` or `[[block]]` (or a list of such tables: any of them matches). A pod matches
//! a selector when it is in that namespace (when one is given) and carries every listed label
//! with that value. Built on the cgroup scope: the kernel matches a caller by its cgroup's
//! ancestors, and the pod-level cgroup of each matching pod (which kubelet creates before any
//! container of the pod) is written into the `SCOPE_CG` table by the controller as pods come and
//! go (`CompiledScopes::pod_entries`), so nothing about Kubernetes reaches the kernel but cgroup
//! ids.
//!
//! Parsing checks the shape (Kubernetes' syntax for namespaces, label keys and values); which
//! pods match is known only on a node, from the pod watch.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::{
    PolicyError, Written,
    error::{Entry, Source},
};

/// One pod selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodSelector {
    /// The pod's namespace; `None`: any.
    pub namespace: Option<String>,
    /// Labels the pod must carry, each with this value (all of them).
    pub labels: BTreeMap<String, String>,
}

impl PodSelector {
    /// Whether a pod in `namespace` with `labels` matches.
    pub fn matches(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self
                .labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

impl std::fmt::Display for PodSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        match &self.namespace {
            Some(ns) => write!(f, "namespace {ns}")?,
            None => f.write_str("any namespace")?,
        }
        if !labels.is_empty() {
            write!(f, ", labels {}", labels.join(","))?;
        }
        Ok(())
    }
}

/// `pods` as the TOML schema reads it: one table, or a list of tables (read as a TOML value:
/// serde's untagged enums do not combine with spans).
pub(super) type RawPods = toml::Value;

/// One selector table, once `pods` is known to be a table or a list of them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPodSelector {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// A DNS-1123 label: what a namespace name is (at most 63 characters of `[a-z0-9-]`, starting
/// and ending with an alphanumeric).
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A label name, or the name part of a key: at most 63 characters of `[A-Za-z0-9-_.]`, starting
/// and ending with an alphanumeric.
fn label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain of at most 253 characters.
fn label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => {
            prefix.len() <= 253 && prefix.split('.').all(dns_label) && label_name(name)
        }
        None => label_name(s),
    }
}

/// A label value: empty, or a label name.
fn label_value(s: &str) -> bool {
    s.is_empty() || label_name(s)
}

/// The validated `pods` of one entry, each with where it was written.
pub(super) fn pod_selectors(
    src: Source<'_>,
    entry: Entry,
    raw: Option<Spanned<RawPods>>,
) -> Result<Vec<Written<PodSelector>>, PolicyError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let field = entry.field("pods");
    let at = raw.span().start;
    const EXPECTED: &str = "expected a table such as { namespace = \"payments\", labels = { app = \"api\" } }, or a list of them";
    let tables = match raw.into_inner() {
        t @ toml::Value::Table(_) => vec![t],
        toml::Value::Array(ts) => ts,
        other => {
            return Err(src.error(
                at,
                field,
                format!("a {} is not a pod selector: {EXPECTED}", other.type_str()),
            ));
        }
    };
    if tables.is_empty() {
        return Err(src.error(
            at,
            field,
            "an empty list selects no pod: expected a table such as { namespace = \"payments\", labels = { app = \"api\" } } (omit `pods` for everyone)".into(),
        ));
    }
    let mut out: Vec<Written<PodSelector>> = Vec::new();
    for t in tables {
        let raw: RawPodSelector = t.try_into().map_err(|e: toml::de::Error| {
            src.error(
                at,
                field.clone(),
                format!("{}: {EXPECTED}", e.message().trim()),
            )
        })?;
        let mut sel = PodSelector::default();
        if let Some(ns) = raw.namespace {
            let ns_at = at;
            if !dns_label(&ns) {
                return Err(src.error(
                    ns_at,
                    field.clone(),
                    format!(
                        "`{ns}` is not a namespace name: expected lowercase letters, digits and `-`, at most 63, such as \"payments\""
                    ),
                ));
            }
            sel.namespace = Some(ns);
        }
        if let Some(labels) = raw.labels {
            let l_at = at;
            for (k, v) in labels {
                if !label_key(&k) {
                    return Err(src.error(
                        l_at,
                        field.clone(),
                        format!(
                            "`{k}` is not a label key: expected [prefix/]name, the name at most 63 of [A-Za-z0-9-_.] such as \"app\" or \"app.kubernetes.io/name\""
                        ),
                    ));
                }
                if !label_value(&v) {
                    return Err(src.error(
                        l_at,
                        field.clone(),
                        format!(
                            "`{v}` (label `{k}`) is not a label value: expected at most 63 of [A-Za-z0-9-_.], starting and ending with a letter or digit"
                        ),
                    ));
                }
                sel.labels.insert(k, v);
            }
        }
        if sel == PodSelector::default() {
            return Err(src.error(
                at,
                field.clone(),
                "a selector with neither `namespace` nor `labels` selects every pod: say which (omit `pods` for everyone, pods or not)".into(),
            ));
        }
        if !out.iter().any(|w| w.value == sel) {
            let (line, column) = src.line_col(at);
            out.push(Written {
                value: sel,
                line,
                column,
                field: field.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_matches_its_namespace_and_every_label() {
        let sel = PodSelector {
            namespace: Some("payments".into()),
            labels: [("app".to_string(), "api".to_string())].into(),
        };
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "api".to_string()),
            ("tier".to_string(), "web".to_string()),
        ]
        .into();
        assert!(sel.matches("payments", &labels));
        assert!(!sel.matches("default", &labels));
        assert!(!sel.matches("payments", &BTreeMap::new()));
        let other: BTreeMap<String, String> = [("app".to_string(), "worker".to_string())].into();
        assert!(!sel.matches("payments", &other));
        let any_ns = PodSelector {
            namespace: None,
            ..sel.clone()
        };
        assert!(any_ns.matches("default", &labels));
    }

    fn parse(text: &str) -> Result<crate::policy::Policy, String> {
        crate::policy::Policy::parse("pods.toml", text).map_err(|e| e.to_string())
    }

    const SERVICE: &str = "[[service]]\nname = \"api\"\ndestinations = [\"192.0.2.0/24\"]\n";

    #[test]
    fn pods_parse_as_one_table_or_a_list_and_bad_ones_name_their_line() {
        let p = parse(&format!(
            "{SERVICE}pods = {{ namespace = \"payments\", labels = {{ app = \"api\" }} }}\n"
        ))
        .unwrap();
        assert_eq!(p.rules[0].selectors.pods.len(), 1);
        assert_eq!(
            p.rules[0].selectors.pods[0].value.namespace.as_deref(),
            Some("payments")
        );
        let p = parse(&format!(
            "{SERVICE}pods = [{{ namespace = \"a\" }}, {{ labels = {{ tier = \"web\" }} }}, {{ namespace = \"a\" }}]\n"
        ))
        .unwrap();
        assert_eq!(p.rules[0].selectors.pods.len(), 2, "duplicates dropped");
        for (bad, want) in [
            ("pods = { namespace = \"Pay\" }", "not a namespace name"),
            ("pods = { labels = { \"a b\" = \"x\" } }", "not a label key"),
            ("pods = { labels = { app = \"-x\" } }", "not a label value"),
            ("pods = {}", "selects every pod"),
            ("pods = []", "selects no pod"),
            ("pods = { name = \"x\" }", "unknown field"),
        ] {
            let err = parse(&format!("{SERVICE}{bad}\n")).unwrap_err();
            assert!(
                err.contains("pods.toml:4:8: service[1].pods"),
                "{bad}: {err}"
            );
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn pod_scopes_compile_to_entries_for_the_matching_pods_cgroups() {
        let p = parse(&format!(
            "{SERVICE}pods = {{ namespace = \"payments\", labels = {{ app = \"api\" }} }}\n[[block]]\nname = \"no-db\"\ndestinations = [\"198.51.100.0/24\"]\npods = {{ labels = {{ app = \"api\" }} }}\n"
        ))
        .unwrap();
        let c = crate::policy::compile::CompiledPolicy::compile(&p).unwrap();
        assert_eq!(c.scopes.keys, 1 << egress_common::SCOPE_KEY_CGROUP);
        assert_eq!(c.scopes.pod_scopes.len(), 2);
        assert!(
            c.scopes.cgroup.is_empty(),
            "no pod is known at compile time"
        );
        let api: BTreeMap<String, String> = [("app".to_string(), "api".to_string())].into();
        let other: BTreeMap<String, String> = [("app".to_string(), "db".to_string())].into();
        let (entries, levels) = c.scopes.pod_entries([
            ("payments", &api, 100, 3),
            ("default", &api, 200, 2),
            ("payments", &other, 300, 3),
        ]);
        assert_eq!(levels, (1 << 2) | (1 << 3));
        let service = c.scopes.pod_scopes[0].0;
        let block = c.scopes.pod_scopes[1].0;
        assert!(entries[&100].has(service) && entries[&100].has(block));
        assert!(!entries[&200].has(service) && entries[&200].has(block));
        assert!(!entries.contains_key(&300));
        // A caller in pod 100's cgroup (level 3) is in both scopes; in pod 300 in neither.
        let with = c.scopes.with_pods(&entries, levels);
        let caller = egress_common::Caller::default();
        let bits = with.resolve(&caller, &[1, 10, 20, 100, 101]);
        assert!(bits.has(service) && bits.has(block));
        let bits = with.resolve(&caller, &[1, 10, 20, 300, 301]);
        assert!(!bits.has(service) && !bits.has(block));
    }

    #[test]
    fn an_entry_naming_cgroups_and_pods_is_refused() {
        let p = parse(&format!(
            "{SERVICE}cgroups = [\"system.slice\"]\npods = {{ namespace = \"a\" }}\n"
        ))
        .unwrap();
        let err = crate::policy::compile::CompiledPolicy::compile(&p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("either `cgroups` or `pods`"), "{err}");
    }

    #[test]
    fn kubernetes_name_syntax_is_checked() {
        assert!(dns_label("payments") && dns_label("a-1") && !dns_label("Pay") && !dns_label("-a"));
        assert!(label_key("app") && label_key("app.kubernetes.io/name") && !label_key("/x"));
        assert!(!label_key("a b") && !label_key(&"x".repeat(64)));
        assert!(label_value("") && label_value("v1.2_3") && !label_value("-v"));
    }
}
