//! Scopes: who an entry applies to (`executables`, `users`, `groups`, `cgroups`), compiled to
//! the tables the kernel's `SCOPE_*` maps hold. The kernel and `egress explain` resolve a
//! caller's scopes with the same function (`egress_common::resolve_scopes`) over these tables.

use std::{collections::BTreeMap, path::PathBuf};

use egress_common::{
    Caller, ExeKey, SCOPE_KEY_CGROUP, SCOPE_KEY_EXE, SCOPE_KEY_GID, SCOPE_KEY_UID, ScopeBits,
    ScopeTables, resolve_scopes,
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
    /// The scopes `caller` is in; `ancestors[level]` is its cgroup's ancestor at each level
    /// (index 0 the root).
    pub fn resolve(&self, caller: &Caller, ancestors: &[u64]) -> ScopeBits {
        resolve_scopes(self, self.keys, self.cg_levels, caller, |level| {
            ancestors.get(level as usize).copied().unwrap_or(0)
        })
    }
}

const _: () = assert!(
    SCOPE_KEY_EXE == 0 && SCOPE_KEY_UID == 1 && SCOPE_KEY_GID == 2 && SCOPE_KEY_CGROUP == 3
);
