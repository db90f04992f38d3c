//! Who is calling, as scopes: the caller's executable (`exec.rs`), real uid and gid, and cgroup
//! ancestry, resolved against the buffer in force's `SCOPE_*` maps with
//! `egress_common::resolve_scopes` (the same function `egress explain` runs). Only a policy
//! with scoped entries (`Config::scope_keys` non-zero) pays for it.

use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_uid_gid};
use egress_common::{
    Caller, Config, ExeKey, SCOPE_KEY_EXE, SCOPE_KEYS, ScopeBits, ScopeTables, resolve_scopes,
};

use crate::{
    exec,
    maps::{
        SCOPE_CG_0, SCOPE_CG_1, SCOPE_DEF, SCOPE_EXE_0, SCOPE_EXE_1, SCOPE_GID_0, SCOPE_GID_1,
        SCOPE_UID_0, SCOPE_UID_1,
    },
};

/// The scope maps of one buffer.
struct Tables {
    buffer: u32,
}

impl ScopeTables for Tables {
    #[inline(always)]
    fn exe(&self, k: &ExeKey) -> Option<&ScopeBits> {
        if self.buffer == 0 {
            unsafe { SCOPE_EXE_0.get(k) }
        } else {
            unsafe { SCOPE_EXE_1.get(k) }
        }
    }
    #[inline(always)]
    fn uid(&self, uid: u32) -> Option<&ScopeBits> {
        if self.buffer == 0 {
            unsafe { SCOPE_UID_0.get(uid) }
        } else {
            unsafe { SCOPE_UID_1.get(uid) }
        }
    }
    #[inline(always)]
    fn gid(&self, gid: u32) -> Option<&ScopeBits> {
        if self.buffer == 0 {
            unsafe { SCOPE_GID_0.get(gid) }
        } else {
            unsafe { SCOPE_GID_1.get(gid) }
        }
    }
    #[inline(always)]
    fn cgroup(&self, id: u64) -> Option<&ScopeBits> {
        if self.buffer == 0 {
            unsafe { SCOPE_CG_0.get(id) }
        } else {
            unsafe { SCOPE_CG_1.get(id) }
        }
    }
    #[inline(always)]
    fn default_of(&self, key: u32) -> Option<&ScopeBits> {
        SCOPE_DEF.get((self.buffer & 1) * SCOPE_KEYS + (key & 3))
    }
}

/// The scopes of the calling task under `cfg`; everyone-only when the policy scopes nothing.
#[inline(always)]
pub fn caller(cfg: &Config) -> ScopeBits {
    if cfg.scope_keys == 0 {
        return ScopeBits::EVERYONE;
    }
    let uid_gid = bpf_get_current_uid_gid();
    let who = Caller {
        exe: if cfg.scope_keys & (1 << SCOPE_KEY_EXE) != 0 {
            exec::current_exe()
        } else {
            ExeKey::default()
        },
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
    };
    let tables = Tables { buffer: cfg.buffer };
    resolve_scopes(
        &tables,
        cfg.scope_keys,
        cfg.scope_cg_levels,
        &who,
        |level| unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) },
    )
}
