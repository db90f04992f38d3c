//! Scopes: who an entry applies to (`executables`, `users`, `groups`, `cgroups`), compiled to
//! the tables the kernel's `SCOPE_*` maps hold. The kernel and `egress explain` resolve a
//! caller's scopes with the same function (`egress_common::resolve_scopes`) over these tables.
//!
//! A scope is the canonical tuple (sorted sets of executables' identities, uids, gids, cgroup
//! ids) of an entry with at least one selector; entries with equal tuples share its id
//! (1..=255; 0 is everyone). Within a key any value matches, across keys all must: so the table
//! of a key maps each value to the scopes naming it *or not constraining that key*, and a value
//! no scope names gets the key's default, the scopes not constraining it. For cgroups a value
//! maps to the scopes naming it only (the caller's ancestors are ORed, then the default).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use egress_common::{
    Caller, ExeKey, MAX_SCOPES, SCOPE_KEY_CGROUP, SCOPE_KEY_EXE, SCOPE_KEY_GID, SCOPE_KEY_UID,
    ScopeBits, ScopeTables, resolve_scopes,
};

use super::{
    Principal, Protocol, Rule, RuleKind, Written, compile::CompileError, error::one_line,
    pods::PodSelector, resolve::Resolver,
};

/// The scope tables of one policy: what the `SCOPE_EXE`, `SCOPE_UID`, `SCOPE_GID`, `SCOPE_CG`
/// and `SCOPE_DEF` maps of a buffer hold, and the `Config` fields that go with them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledScopes {
    /// `Config::scope_keys`: bits `1 << SCOPE_KEY_*` of the keys any scope constrains (0: no
    /// entry is scoped).
    pub keys: u32,
    /// `Config::scope_cg_levels`: bit n set when a `cgroups` selector sits at level n.
    pub cg_levels: u32,
    pub exe: BTreeMap<ExeKey, ScopeBits>,
    pub uid: BTreeMap<u32, ScopeBits>,
    pub gid: BTreeMap<u32, ScopeBits>,
    /// cgroup id (the directory's inode on cgroup2) -> the scopes naming it.
    pub cgroup: BTreeMap<u64, ScopeBits>,
    /// Per key (`SCOPE_KEY_*`): the scopes a value missing from the key's table admits.
    pub defaults: [ScopeBits; 4],
    /// The executables the policy names, with the identity each had when compiled (events and
    /// `--watch` use them).
    pub exe_paths: Vec<(PathBuf, ExeKey)>,
    /// The cgroups the policy names (relative to the cgroup2 root), with their ids.
    pub cgroup_paths: Vec<(String, u64)>,
    /// The scopes that select pods (`pods`), with their selectors (any matches): the pod-level
    /// cgroups of the matching pods join the `cgroup` table as pods come and go
    /// ([`CompiledScopes::pod_entries`]). Until then no pod is in them.
    pub pod_scopes: Vec<(u32, Vec<PodSelector>)>,
}

impl ScopeTables for CompiledScopes {
    fn exe(&self, k: &ExeKey) -> Option<&ScopeBits> {
        self.exe.get(k)
    }
    fn uid(&self, uid: u32) -> Option<&ScopeBits> {
        self.uid.get(&uid)
    }
    fn gid(&self, gid: u32) -> Option<&ScopeBits> {
        self.gid.get(&gid)
    }
    fn cgroup(&self, id: u64) -> Option<&ScopeBits> {
        self.cgroup.get(&id)
    }
    fn default_of(&self, key: u32) -> Option<&ScopeBits> {
        self.defaults.get(key as usize)
    }
}

impl CompiledScopes {
    /// The `cgroup` table entries and cgroup levels of the pods `pods` (namespace, labels, the
    /// pod-level cgroup's id and level): each matching pod's cgroup admits the scopes whose
    /// selectors it matches. Pure: the controller feeds it from the pod watch.
    pub fn pod_entries<'a>(
        &self,
        pods: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>, u64, u32)>,
    ) -> (BTreeMap<u64, ScopeBits>, u32) {
        let mut entries: BTreeMap<u64, ScopeBits> = BTreeMap::new();
        let mut levels = 0u32;
        if self.pod_scopes.is_empty() {
            return (entries, levels);
        }
        for (namespace, labels, cgroup, level) in pods {
            for (id, selectors) in &self.pod_scopes {
                if selectors.iter().any(|s| s.matches(namespace, labels)) {
                    entries.entry(cgroup).or_default().set(*id);
                    if (1..32).contains(&level) {
                        levels |= 1 << level;
                    }
                }
            }
        }
        (entries, levels)
    }

    /// These tables with the pods' entries (from [`CompiledScopes::pod_entries`]) added: what
    /// a buffer is filled with while pods are known.
    pub fn with_pods(&self, entries: &BTreeMap<u64, ScopeBits>, levels: u32) -> CompiledScopes {
        let mut out = self.clone();
        for (cgroup, bits) in entries {
            out.cgroup.entry(*cgroup).or_default().or(bits);
        }
        out.cg_levels |= levels;
        out
    }

    /// The scopes `caller` is in; `ancestors[level]` is its cgroup's ancestor at each level
    /// (index 0 the root).
    pub fn resolve(&self, caller: &Caller, ancestors: &[u64]) -> ScopeBits {
        resolve_scopes(self, self.keys, self.cg_levels, caller, |level| {
            ancestors.get(level as usize).copied().unwrap_or(0)
        })
    }
}

/// One scope: the resolved selector values of an entry, canonically sorted (empty: the key is
/// not constrained).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Tuple {
    exes: BTreeSet<ExeKey>,
    uids: BTreeSet<u32>,
    gids: BTreeSet<u32>,
    cgroups: BTreeSet<u64>,
    pods: BTreeSet<PodSelector>,
}

impl Tuple {
    /// Whether the scope constrains key `SCOPE_KEY_*`.
    fn constrains(&self, key: u32) -> bool {
        match key {
            SCOPE_KEY_EXE => !self.exes.is_empty(),
            SCOPE_KEY_UID => !self.uids.is_empty(),
            SCOPE_KEY_GID => !self.gids.is_empty(),
            _ => !self.cgroups.is_empty() || !self.pods.is_empty(),
        }
    }
}

/// The field path of a rule (`service[2]`), as parse errors name it: services come first in
/// `rules`, then blocks, each in file order.
fn entry_of(rules: &[Rule], i: usize) -> String {
    let kind = rules[i].kind;
    let index = rules[..i].iter().filter(|r| r.kind == kind).count() + 1;
    format!("{}[{index}]", kind.as_str())
}

/// An error about the value `w` of a selector.
fn value_error<T>(file: &str, w: &Written<T>, message: String) -> CompileError {
    CompileError {
        file: file.to_string(),
        line: w.line,
        column: w.column,
        prefix: String::new(),
        field: one_line(&w.field),
        message: one_line(&message),
    }
}

/// A user or group as an id: numeric ids as written, names through `lookup`.
fn principal_id(
    file: &str,
    w: &Written<Principal>,
    noun: &str,
    lookup: impl Fn(&str) -> Result<u32, String>,
) -> Result<u32, CompileError> {
    match &w.value {
        Principal::Id(id) => Ok(*id),
        Principal::Name(n) => {
            lookup(n).map_err(|m| value_error(file, w, format!("{noun} `{n}`: {m}")))
        }
    }
}

/// The scope id of each rule of `rules` (0: everyone), and the tables of the scopes. `file`
/// names the policy in errors. An entry whose selectors do not resolve (an unknown user, a
/// missing executable or cgroup) is an error at the value's file:line:column and field.
pub fn compile_scopes(
    file: &str,
    rules: &[Rule],
    resolver: &dyn Resolver,
) -> Result<(Vec<u32>, CompiledScopes), CompileError> {
    let mut ids: BTreeMap<Tuple, u32> = BTreeMap::new();
    let mut tuples: Vec<Tuple> = Vec::new();
    let mut scope_of = Vec::with_capacity(rules.len());
    let mut out = CompiledScopes::default();
    for (i, rule) in rules.iter().enumerate() {
        let sel = &rule.selectors;
        if sel.is_empty() {
            scope_of.push(0);
            continue;
        }
        let rule_error = |field: &str, message: String| CompileError {
            file: file.to_string(),
            line: rule.line,
            column: 0,
            prefix: String::new(),
            field: format!("{}{field}", entry_of(rules, i)),
            message: one_line(&message),
        };
        if let Some(p) = rule
            .protocols
            .iter()
            .find(|p| matches!(p, Protocol::Icmp | Protocol::Icmpv6))
        {
            return Err(rule_error(
                ".protocols",
                format!(
                    "{p} on an entry with `executables`, `users`, `groups` or `cgroups` is not supported: ping echoes are also judged at TC, which cannot tell who sent them. Put {p} in an entry for everyone"
                ),
            ));
        }
        if let (Some(c), false) = (sel.cgroups.first(), sel.pods.is_empty()) {
            return Err(value_error(
                file,
                c,
                "an entry names either `cgroups` or `pods`, not both: a pod is a cgroup, and both would have to hold at once (split the entry)".into(),
            ));
        }
        let mut t = Tuple {
            pods: sel.pods.iter().map(|w| w.value.clone()).collect(),
            ..Tuple::default()
        };
        for w in &sel.executables {
            let key = resolver
                .executable(&w.value)
                .map_err(|m| value_error(file, w, format!("`{}` {m}", w.value.display())))?;
            t.exes.insert(key);
            if !out.exe_paths.iter().any(|(p, _)| *p == w.value) {
                out.exe_paths.push((w.value.clone(), key));
            }
        }
        for w in &sel.users {
            t.uids
                .insert(principal_id(file, w, "user", |n| resolver.user(n))?);
        }
        for w in &sel.groups {
            t.gids
                .insert(principal_id(file, w, "group", |n| resolver.group(n))?);
        }
        for w in &sel.cgroups {
            let id = resolver
                .cgroup(&w.value)
                .map_err(|m| value_error(file, w, format!("cgroup `{}`: {m}", w.value)))?;
            t.cgroups.insert(id);
            out.cg_levels |= 1 << w.value.split('/').count();
            if !out.cgroup_paths.iter().any(|(p, _)| *p == w.value) {
                out.cgroup_paths.push((w.value.clone(), id));
            }
        }
        let id = match ids.get(&t) {
            Some(id) => *id,
            None => {
                let id = tuples.len() as u32 + 1;
                if id as usize >= MAX_SCOPES {
                    return Err(rule_error(
                        "",
                        format!(
                            "{} `{}` needs scope number {id}: at most {} distinct combinations of executables, users, groups and cgroups fit; share selectors (sets) between entries",
                            rule.kind.as_str(),
                            rule.name,
                            MAX_SCOPES - 1
                        ),
                    ));
                }
                ids.insert(t.clone(), id);
                tuples.push(t);
                id
            }
        };
        scope_of.push(id);
    }
    fill_tables(&mut out, &tuples);
    out.pod_scopes = (1u32..)
        .zip(&tuples)
        .filter(|(_, t)| !t.pods.is_empty())
        .map(|(id, t)| (id, t.pods.iter().cloned().collect()))
        .collect();
    Ok((scope_of, out))
}

/// The per-key tables and defaults of `tuples` (scope id = index + 1).
fn fill_tables(out: &mut CompiledScopes, tuples: &[Tuple]) {
    let ids = || (1u32..).zip(tuples);
    for key in [
        SCOPE_KEY_EXE,
        SCOPE_KEY_UID,
        SCOPE_KEY_GID,
        SCOPE_KEY_CGROUP,
    ] {
        let mut free = ScopeBits::EVERYONE;
        for (id, t) in ids() {
            if t.constrains(key) {
                out.keys |= 1 << key;
            } else {
                free.set(id);
            }
        }
        out.defaults[key as usize] = free;
    }
    let with = |default: ScopeBits, id: u32, table: &mut ScopeBits| {
        if *table == ScopeBits::default() {
            *table = default;
        }
        table.set(id);
    };
    for (id, t) in ids() {
        for k in &t.exes {
            with(
                out.defaults[SCOPE_KEY_EXE as usize],
                id,
                out.exe.entry(*k).or_default(),
            );
        }
        for u in &t.uids {
            with(
                out.defaults[SCOPE_KEY_UID as usize],
                id,
                out.uid.entry(*u).or_default(),
            );
        }
        for g in &t.gids {
            with(
                out.defaults[SCOPE_KEY_GID as usize],
                id,
                out.gid.entry(*g).or_default(),
            );
        }
        for c in &t.cgroups {
            out.cgroup.entry(*c).or_default().set(id);
        }
    }
}

/// Whether any entry of `rules` is scoped (for `explain`'s note).
pub fn any_scoped(rules: &[Rule]) -> bool {
    rules.iter().any(|r| !r.selectors.is_empty())
}

/// The kinds of rules in `rules` that are scoped, for messages.
pub fn scoped_names(rules: &[Rule]) -> Vec<String> {
    rules
        .iter()
        .filter(|r| !r.selectors.is_empty())
        .map(|r| {
            format!(
                "{} `{}`",
                if r.kind == RuleKind::Block {
                    "block"
                } else {
                    "service"
                },
                r.name
            )
        })
        .collect()
}

const _: () = assert!(
    SCOPE_KEY_EXE == 0 && SCOPE_KEY_UID == 1 && SCOPE_KEY_GID == 2 && SCOPE_KEY_CGROUP == 3
);
