//! Reading what a controller wrote: its JSON event lines (`--events FILE`), typed where the
//! controller has a type for them ([`JsonEvent`] for deny and audit, [`AlertEvent`]), and the
//! report of `exec --report`.

use std::path::Path;

use egress::{alerts::AlertEvent, events::JsonEvent, report::StatsReport};

/// The fields every deny and audit event carries (the events contract of the README;
/// `schema_version` and `hostname` are on every event of every kind).
pub const CONTRACT_FIELDS: [&str; 13] = [
    "ts",
    "event",
    "schema_version",
    "hostname",
    "pid",
    "comm",
    "uid",
    "cgroup_id",
    "hook",
    "protocol",
    "dst",
    "port",
    "rule",
];

/// Every line of the file as JSON (none when the file does not exist yet); panics on a line that
/// is not JSON.
pub fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The events of kind `kind` (`"block"`, `"reload"`, …).
pub fn of_kind(path: &Path, kind: &str) -> Vec<serde_json::Value> {
    lines(path)
        .into_iter()
        .filter(|v| v["event"] == kind)
        .collect()
}

/// Every line, each of which must be a deny or audit event.
pub fn decisions(path: &Path) -> Vec<JsonEvent> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("event line is not a JSON event ({e}): {l}"))
        })
        .collect()
}

/// The alert events.
pub fn alerts(path: &Path) -> Vec<AlertEvent> {
    of_kind(path, "alert")
        .into_iter()
        .map(|v| {
            serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("bad alert ({e}): {v}"))
        })
        .collect()
}

/// Checks that every line carries every [`CONTRACT_FIELDS`] field.
pub fn assert_contract_fields(path: &Path) {
    for v in lines(path) {
        for field in CONTRACT_FIELDS {
            assert!(v.get(field).is_some(), "event lacks `{field}`: {v}");
        }
    }
}

/// The report `egress exec --report FILE` wrote.
pub fn report(path: &Path) -> StatsReport {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the report {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the report is not a StatsReport ({e}): {text}"))
}
