//! Who an entry applies to, as written: the `executables`, `users`, `groups` and `cgroups` keys
//! of `[[service]]` and `[[block]]`, and the named sets (`[executable_sets]`, `[user_sets]`,
//! `[group_sets]`, `[cgroup_sets]`) they may reference as `"*NAME"`.
//!
//! Parsing checks the shape of each value (an absolute path, a name or an id, a relative cgroup
//! path) and expands set references, so a [`Rule`](super::Rule) holds plain values, each with
//! the place it was written (for the errors of resolution at compile time: an unknown user, a
//! missing file). Nothing here touches the host: names, files and cgroups are resolved by
//! [`super::resolve`] when the policy is compiled.
//!
//! A set is referenced only from the key of its own kind (one name space per kind, so `*ops`
//! in `users` can never pick up a group set by mistake), sets hold values only (no nested
//! references), an empty set is an error and an unused one a warning.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use super::{
    PolicyError,
    error::{Entry, Source},
};

/// The deepest cgroup a selector may name: the hooks look up the caller's ancestors at levels
/// 1..=31 (`Config::scope_cg_levels` is a u32; the root, level 0, is everyone).
pub const MAX_CGROUP_LEVEL: usize = 31;

/// A user or group as written: a name (resolved through NSS at compile time) or a numeric id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Name(String),
    Id(u32),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Name(n) => f.write_str(n),
            Principal::Id(i) => write!(f, "{i}"),
        }
    }
}

/// A selector value and where it was written: the entry's key, or the element of a set it came
/// from (`user_sets.humans`), so that an error of resolution points at the very value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written<T> {
    pub value: T,
    /// 1-based line and column of the value in its file.
    pub line: usize,
    pub column: usize,
    /// `service[2].users`, or `user_sets.humans` for a value from a set.
    pub field: String,
}

/// An entry's selectors, sets expanded, duplicates dropped, in file order. All empty: the entry
/// applies to everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selectors {
    /// Absolute paths, matched by the identity (device, inode) of the file they name.
    pub executables: Vec<Written<PathBuf>>,
    pub users: Vec<Written<Principal>>,
    /// The caller's real primary gid only (supplementary groups are not matched).
    pub groups: Vec<Written<Principal>>,
    /// Paths relative to the cgroup2 root, normalized (`system.slice/backup.service`): that
    /// cgroup and everything below it.
    pub cgroups: Vec<Written<String>>,
    /// Pod selectors (`pods`): the pod-level cgroups of the pods on this node that match one,
    /// followed as pods come and go.
    pub pods: Vec<Written<super::pods::PodSelector>>,
}

impl Selectors {
    /// No selector: the entry applies to everyone.
    pub fn is_empty(&self) -> bool {
        self.executables.is_empty()
            && self.users.is_empty()
            && self.groups.is_empty()
            && self.cgroups.is_empty()
            && self.pods.is_empty()
    }
}

/// One element of a selector list or a set, as written: a string or an integer.
#[derive(Debug, Clone)]
pub(super) enum RawValue {
    Str(String),
    Int(u64),
}

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = RawValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (a name or a path) or a numeric id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawValue, E> {
                u64::try_from(v).map(RawValue::Int).map_err(|_| {
                    E::custom(format!("{v} is not an id: expected 0-4294967294 or a name"))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
                Ok(RawValue::Int(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValue, E> {
                Ok(RawValue::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A selector list or set as the TOML schema reads it.
pub(super) type RawList = Spanned<Vec<Spanned<RawValue>>>;

/// The four selector keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Executables,
    Users,
    Groups,
    Cgroups,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Executables, Kind::Users, Kind::Groups, Kind::Cgroups];

    /// The key in a `[[service]]` or `[[block]]`.
    fn key(self) -> &'static str {
        match self {
            Kind::Executables => "executables",
            Kind::Users => "users",
            Kind::Groups => "groups",
            Kind::Cgroups => "cgroups",
        }
    }

    /// The top-level table of its sets.
    fn sets_key(self) -> &'static str {
        match self {
            Kind::Executables => "executable_sets",
            Kind::Users => "user_sets",
            Kind::Groups => "group_sets",
            Kind::Cgroups => "cgroup_sets",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Executables => "executable",
            Kind::Users => "user",
            Kind::Groups => "group",
            Kind::Cgroups => "cgroup",
        }
    }
}

/// A validated value of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Path(PathBuf),
    Principal(Principal),
    Cgroup(String),
}

/// The shape of one value of `kind` (nothing is resolved here), or what was expected.
fn value(kind: Kind, raw: &RawValue) -> Result<Value, String> {
    match (kind, raw) {
        (Kind::Executables, RawValue::Str(s)) => {
            if !s.starts_with('/') {
                return Err(format!(
                    "`{s}` is not an absolute path: expected a path such as \"/usr/bin/restic\" (or \"*NAME\" for an executable set)"
                ));
            }
            if s.contains('\0') {
                return Err("a path cannot hold a NUL byte".into());
            }
            Ok(Value::Path(PathBuf::from(s)))
        }
        (Kind::Executables, RawValue::Int(i)) => Err(format!(
            "{i} is not a path: expected an absolute path string such as \"/usr/bin/restic\""
        )),
        (Kind::Users | Kind::Groups, RawValue::Int(i)) => {
            let what = if kind == Kind::Users { "uid" } else { "gid" };
            match u32::try_from(*i) {
                Ok(id) if id != u32::MAX => Ok(Value::Principal(Principal::Id(id))),
                _ => Err(format!(
                    "{i} is not a valid {what}: expected 0-4294967294 (4294967295 is (uid_t)-1, no one)"
                )),
            }
        }
        (Kind::Users | Kind::Groups, RawValue::Str(s)) => {
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c == ':' || c == '/') {
                return Err(format!(
                    "`{s}` is not a {} name: expected a name such as \"backup\" (no spaces, `:` or `/`), a numeric id, or \"*NAME\" for a {} set",
                    kind.noun(),
                    kind.noun()
                ));
            }
            Ok(Value::Principal(Principal::Name(s.clone())))
        }
        (Kind::Cgroups, RawValue::Str(s)) => cgroup_path(s).map(Value::Cgroup),
        (Kind::Cgroups, RawValue::Int(i)) => Err(format!(
            "{i} is not a cgroup path: expected a path relative to the cgroup2 root, such as \"system.slice/backup.service\""
        )),
    }
}

/// A cgroup path relative to the cgroup2 root, normalized: components joined by one `/`.
fn cgroup_path(s: &str) -> Result<String, String> {
    const EXPECTED: &str =
        "expected a path relative to the cgroup2 root, such as \"system.slice/backup.service\"";
    if s.starts_with('/') {
        return Err(format!(
            "`{s}` is absolute: {EXPECTED} (the root is found in /proc/mounts; it is not written)"
        ));
    }
    let parts: Vec<&str> = s.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(format!(
            "`{s}` names the root, which holds every process: {EXPECTED} (omit `cgroups` for everyone)"
        ));
    }
    if let Some(bad) = parts.iter().find(|p| **p == "." || **p == "..") {
        return Err(format!("`{s}` holds `{bad}`: {EXPECTED}, without . or .."));
    }
    if s.contains('\0') {
        return Err("a path cannot hold a NUL byte".into());
    }
    if parts.len() > MAX_CGROUP_LEVEL {
        return Err(format!(
            "`{s}` is {} levels deep: at most {MAX_CGROUP_LEVEL} are supported",
            parts.len()
        ));
    }
    Ok(parts.join("/"))
}

/// The name of a set a value references (`"*NAME"`), if it is a reference.
fn reference(raw: &RawValue) -> Option<&str> {
    match raw {
        RawValue::Str(s) => s.strip_prefix('*'),
        RawValue::Int(_) => None,
    }
}

/// One named set: its values, where it was written, whether an entry used it.
#[derive(Debug)]
struct Set {
    values: Vec<Written<Value>>,
    offset: usize,
    used: bool,
}

/// The four top-level set tables, as the TOML schema reads them.
#[derive(Debug, Default)]
pub(super) struct RawSets {
    pub executable_sets: BTreeMap<String, RawList>,
    pub user_sets: BTreeMap<String, RawList>,
    pub group_sets: BTreeMap<String, RawList>,
    pub cgroup_sets: BTreeMap<String, RawList>,
}

/// The validated sets of a policy, by kind and name.
#[derive(Debug)]
pub(super) struct Sets {
    by_kind: [BTreeMap<String, Set>; 4],
}

fn index(kind: Kind) -> usize {
    Kind::ALL
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is listed")
}

impl Sets {
    /// Validates every set: non-empty, values of its kind, no references.
    pub(super) fn new(src: Source<'_>, raw: RawSets) -> Result<Sets, PolicyError> {
        let mut by_kind: [BTreeMap<String, Set>; 4] = Default::default();
        let tables = [
            raw.executable_sets,
            raw.user_sets,
            raw.group_sets,
            raw.cgroup_sets,
        ];
        for (kind, table) in Kind::ALL.into_iter().zip(tables) {
            for (name, list) in table {
                let field = format!("{}.{name}", kind.sets_key());
                let offset = list.span().start;
                if name.is_empty() || name.starts_with('*') || name.contains(char::is_whitespace) {
                    return Err(src.error(
                        offset,
                        field,
                        format!(
                            "`{name}` is not a usable set name: expected a name such as \"humans\", referenced as \"*humans\""
                        ),
                    ));
                }
                if list.get_ref().is_empty() {
                    return Err(src.error(
                        offset,
                        field,
                        format!(
                            "the {} set `{name}` is empty: expected at least one value",
                            kind.noun()
                        ),
                    ));
                }
                let mut values = Vec::new();
                for v in list.into_inner() {
                    let at = v.span().start;
                    if let Some(inner) = reference(v.get_ref()) {
                        return Err(src.error(
                            at,
                            field,
                            format!(
                                "`*{inner}`: a set cannot reference another set: list its values here"
                            ),
                        ));
                    }
                    let value =
                        value(kind, v.get_ref()).map_err(|m| src.error(at, field.clone(), m))?;
                    values.push(written(src, at, &field, value));
                }
                by_kind[index(kind)].insert(
                    name,
                    Set {
                        values,
                        offset,
                        used: false,
                    },
                );
            }
        }
        Ok(Sets { by_kind })
    }

    /// The values of one selector key of an entry: its own, and those of the sets it
    /// references, deduplicated in order.
    fn expand(
        &mut self,
        src: Source<'_>,
        entry: Entry,
        kind: Kind,
        list: RawList,
    ) -> Result<Vec<Written<Value>>, PolicyError> {
        let field = entry.field(kind.key());
        if list.get_ref().is_empty() {
            return Err(src.error(
                list.span().start,
                field,
                format!(
                    "expected at least one {} (omit `{}` for everyone)",
                    kind.noun(),
                    kind.key()
                ),
            ));
        }
        let mut out: Vec<Written<Value>> = Vec::new();
        let mut push = |w: Written<Value>| {
            if !out.iter().any(|o| o.value == w.value) {
                out.push(w);
            }
        };
        for v in list.into_inner() {
            let at = v.span().start;
            let Some(name) = reference(v.get_ref()) else {
                let value =
                    value(kind, v.get_ref()).map_err(|m| src.error(at, field.clone(), m))?;
                push(written(src, at, &field, value));
                continue;
            };
            if let Some(set) = self.by_kind[index(kind)].get_mut(name) {
                set.used = true;
                set.values.iter().cloned().for_each(&mut push);
                continue;
            }
            let elsewhere = Kind::ALL
                .into_iter()
                .find(|k| self.by_kind[index(*k)].contains_key(name));
            let message = match elsewhere {
                Some(other) => format!(
                    "`*{name}` is a {} set ([{}]): a set is referenced only from the key of its kind (`{}`)",
                    other.noun(),
                    other.sets_key(),
                    other.key()
                ),
                None => {
                    let names: Vec<&str> = self.by_kind[index(kind)]
                        .keys()
                        .map(String::as_str)
                        .collect();
                    format!(
                        "no {} set is named `{name}`: expected one of [{}] ({})",
                        kind.noun(),
                        kind.sets_key(),
                        if names.is_empty() {
                            "none is defined".to_string()
                        } else {
                            names.join(", ")
                        }
                    )
                }
            };
            return Err(src.error(at, field, message));
        }
        Ok(out)
    }

    /// An entry's selectors, from its four optional keys.
    pub(super) fn selectors(
        &mut self,
        src: Source<'_>,
        entry: Entry,
        lists: [Option<RawList>; 4],
    ) -> Result<Selectors, PolicyError> {
        let mut s = Selectors::default();
        for (kind, list) in Kind::ALL.into_iter().zip(lists) {
            let Some(list) = list else { continue };
            for w in self.expand(src, entry, kind, list)? {
                let Written {
                    value,
                    line,
                    column,
                    field,
                } = w;
                match value {
                    Value::Path(p) => s.executables.push(Written {
                        value: p,
                        line,
                        column,
                        field,
                    }),
                    Value::Principal(p) if kind == Kind::Users => s.users.push(Written {
                        value: p,
                        line,
                        column,
                        field,
                    }),
                    Value::Principal(p) => s.groups.push(Written {
                        value: p,
                        line,
                        column,
                        field,
                    }),
                    Value::Cgroup(c) => s.cgroups.push(Written {
                        value: c,
                        line,
                        column,
                        field,
                    }),
                }
            }
        }
        Ok(s)
    }

    /// Warnings for the sets no entry referenced (`file:line:column: field: message`).
    pub(super) fn unused(&self, src: Source<'_>) -> Vec<String> {
        let mut out = Vec::new();
        for kind in Kind::ALL {
            for (name, set) in &self.by_kind[index(kind)] {
                if !set.used {
                    out.push(
                        src.error(
                            set.offset,
                            format!("{}.{name}", kind.sets_key()),
                            format!(
                                "the {} set `{name}` is not referenced by any service or block",
                                kind.noun()
                            ),
                        )
                        .to_string(),
                    );
                }
            }
        }
        out
    }
}

fn written(src: Source<'_>, offset: usize, field: &str, value: Value) -> Written<Value> {
    let (line, column) = src.line_col(offset);
    Written {
        value,
        line,
        column,
        field: field.to_string(),
    }
}
