//! Unit tests of scopes: resolution with a fake host, scope ids and their sharing, the tables
//! and defaults, the port rules' scope, flags and TC mask, and the decision with the caller's
//! scopes (a grid over in/out of scope, block/service, audit/enforce, default allow/deny).

use std::{net::IpAddr, path::Path};

use egress_common::{
    ACTION_BLOCK, Caller, ExeKey, IPPROTO_TCP, PROTO_TCP, PROTO_UDP, RULE_DEFAULT, RULE_F_AUDIT,
    SCOPE_KEY_CGROUP, SCOPE_KEY_EXE, SCOPE_KEY_GID, SCOPE_KEY_UID, ScopeBits,
};

use super::*;
use crate::policy::{Policy, resolve::Resolver};

/// A host with a few users, groups, files and cgroups.
struct Fake;

const RESTIC: ExeKey = ExeKey {
    dev: 1,
    _pad: 0,
    ino: 100,
};
const CURL: ExeKey = ExeKey {
    dev: 1,
    _pad: 0,
    ino: 200,
};

impl Resolver for Fake {
    fn user(&self, name: &str) -> Result<u32, String> {
        match name {
            "backup" => Ok(1001),
            "alice" => Ok(1000),
            _ => Err("no user of that name on this host".into()),
        }
    }
    fn group(&self, name: &str) -> Result<u32, String> {
        match name {
            "adm" => Ok(4),
            _ => Err("no group of that name on this host".into()),
        }
    }
    fn executable(&self, path: &Path) -> Result<ExeKey, String> {
        match path.to_str() {
            // A hard link: the same identity.
            Some("/usr/bin/restic" | "/opt/restic-link") => Ok(RESTIC),
            Some("/usr/bin/curl") => Ok(CURL),
            _ => Err("cannot stat it: No such file or directory (os error 2)".into()),
        }
    }
    fn cgroup(&self, relative: &str) -> Result<u64, String> {
        match relative {
            "system.slice" => Ok(40),
            "system.slice/backup.service" => Ok(50),
            _ => Err("no such cgroup".into()),
        }
    }
}

fn compile_fake(text: &str) -> Result<CompiledPolicy, CompileError> {
    let p = Policy::parse("t.toml", text).unwrap_or_else(|e| panic!("{e}"));
    CompiledPolicy::compile_with(&p, &Fake)
}

fn fake(text: &str) -> CompiledPolicy {
    compile_fake(text).unwrap_or_else(|e| panic!("{e}"))
}

fn bits(ids: &[u32]) -> ScopeBits {
    let mut b = ScopeBits::default();
    for id in ids {
        b.set(*id);
    }
    b
}

#[test]
fn equal_tuples_share_a_scope_id_and_the_tables_are_as_specified() {
    let c = fake(
        r#"
[user_sets]
ops = ["backup", 1000]

[[service]]
name = "s3"
destinations = ["192.0.2.0/24"]
executables = ["/usr/bin/restic"]
users = ["backup"]

[[service]]
name = "s3-too"
destinations = ["198.51.100.0/24"]
users = [1001]
executables = ["/opt/restic-link"]

[[service]]
name = "ops"
destinations = ["203.0.113.0/24"]
users = ["*ops"]

[[service]]
name = "unit"
destinations = ["203.0.113.0/24"]
cgroups = ["system.slice/backup.service", "system.slice"]
groups = ["adm"]

[[service]]
name = "everyone"
destinations = ["10.0.0.0/8"]
"#,
    );
    // Rule ids 1..=5; scope ids: s3 and s3-too share 1 (same file by a hard link, same uid),
    // ops 2, unit 3, everyone 0.
    let scope_of = |rule: u32| {
        c.rulesets
            .iter()
            .flat_map(|s| s.rules[..s.len as usize].iter())
            .find(|r| r.rule_id == rule)
            .map(|r| r.scope)
            .unwrap()
    };
    assert_eq!((1..=5).map(scope_of).collect::<Vec<_>>(), [1, 1, 2, 3, 0]);
    let s = &c.scopes;
    assert_eq!(
        s.keys,
        (1 << SCOPE_KEY_EXE)
            | (1 << SCOPE_KEY_UID)
            | (1 << SCOPE_KEY_GID)
            | (1 << SCOPE_KEY_CGROUP)
    );
    assert_eq!(
        (c.config.scope_keys, c.config.scope_cg_levels),
        (s.keys, s.cg_levels)
    );
    assert_eq!(s.cg_levels, (1 << 1) | (1 << 2));
    // Defaults: bit 0 and the scopes not constraining the key.
    assert_eq!(s.defaults[SCOPE_KEY_EXE as usize], bits(&[0, 2, 3]));
    assert_eq!(s.defaults[SCOPE_KEY_UID as usize], bits(&[0, 3]));
    assert_eq!(s.defaults[SCOPE_KEY_GID as usize], bits(&[0, 1, 2]));
    assert_eq!(s.defaults[SCOPE_KEY_CGROUP as usize], bits(&[0, 1, 2]));
    // exe/uid/gid: the scopes naming the value, or not constraining the key.
    assert_eq!(s.exe.len(), 1);
    assert_eq!(s.exe[&RESTIC], bits(&[0, 1, 2, 3]));
    assert_eq!(s.uid[&1001], bits(&[0, 1, 2, 3]));
    assert_eq!(s.uid[&1000], bits(&[0, 2, 3]));
    assert_eq!(s.gid[&4], bits(&[0, 1, 2, 3]));
    // cgroups: only the scopes naming it.
    assert_eq!(s.cgroup[&50], bits(&[3]));
    assert_eq!(s.cgroup[&40], bits(&[3]));
    assert_eq!(
        s.exe_paths,
        vec![
            ("/usr/bin/restic".into(), RESTIC),
            ("/opt/restic-link".into(), RESTIC)
        ]
    );
    assert_eq!(
        s.cgroup_paths,
        vec![
            ("system.slice/backup.service".to_string(), 50),
            ("system.slice".to_string(), 40)
        ]
    );
    // Resolution: restic run by backup is in scope 1 (and 2: backup is in ops); in
    // backup.service's cgroup without gid 4 it is not in 3.
    let restic_backup = Caller {
        exe: RESTIC,
        uid: 1001,
        gid: 100,
    };
    assert_eq!(s.resolve(&restic_backup, &[1, 40, 50]), bits(&[0, 1, 2]));
    let adm = Caller {
        gid: 4,
        ..restic_backup
    };
    assert_eq!(s.resolve(&adm, &[1, 40, 77]), bits(&[0, 1, 2, 3]));
    let curl_alice = Caller {
        exe: CURL,
        uid: 1000,
        gid: 4,
    };
    assert_eq!(s.resolve(&curl_alice, &[1]), bits(&[0, 2]));
}

#[test]
fn port_rules_carry_scope_flags_and_tc_mask() {
    let c = fake(
        r#"
[[service]]
name = "scoped"
destinations = ["192.0.2.0/24"]
ports = [443]
users = ["backup"]

[[service]]
name = "audit-service"
destinations = ["192.0.2.0/24"]
ports = [80]
mode = "audit"

[[block]]
name = "audit-block"
destinations = ["192.0.2.0/24"]
ports = [25]
mode = "audit"

[[block]]
name = "enforced-block"
destinations = ["192.0.2.0/24"]
ports = [26]

[[service]]
name = "by-name"
hosts = ["s3.example.com"]
ports = [443]
executables = ["/usr/bin/restic"]
mode = "audit"
"#,
    );
    let (_, set) = c.matching_set("192.0.2.1".parse().unwrap()).unwrap();
    let rules = &set.rules[..set.len as usize];
    let by_name = |n: &str| rules.iter().find(|r| c.rule_name(r.rule_id) == n).unwrap();
    let scoped = by_name("scoped");
    assert_eq!((scoped.scope, scoped.flags, scoped.tc_mask), (1, 0, 0));
    let audit_service = by_name("audit-service");
    assert_eq!(
        (
            audit_service.scope,
            audit_service.flags,
            audit_service.tc_mask
        ),
        (0, RULE_F_AUDIT, PROTO_TCP | PROTO_UDP)
    );
    let audit_block = by_name("audit-block");
    assert_eq!((audit_block.flags, audit_block.tc_mask), (RULE_F_AUDIT, 0));
    let enforced = by_name("enforced-block");
    assert_eq!(
        (enforced.flags, enforced.tc_mask),
        (0, PROTO_TCP | PROTO_UDP)
    );
    // The grant's rule set of a `hosts` service carries the same.
    let host = c.host_sets[0].set.rules[0];
    assert_eq!((host.scope, host.flags, host.tc_mask), (2, RULE_F_AUDIT, 0));
    assert_eq!(c.scopes.keys, (1 << SCOPE_KEY_EXE) | (1 << SCOPE_KEY_UID));
}

#[test]
fn unscoped_policies_have_no_scope_keys() {
    let c = fake("[[service]]\nname = \"s\"\ndestinations = [\"10.0.0.0/8\"]\n");
    assert_eq!(
        (c.scopes.keys, c.config.scope_keys, c.config.scope_cg_levels),
        (0, 0, 0)
    );
    assert_eq!(c.scopes.defaults, [ScopeBits::EVERYONE; 4]);
    assert_eq!(
        c.rulesets[0].rules[0].tc_mask,
        c.rulesets[0].rules[0].proto_mask
    );
}

#[test]
fn resolution_errors_name_the_value() {
    let base = "[[service]]\nname = \"s\"\ndestinations = [\"10.0.0.0/8\"]\n";
    let cases = [
        (
            "users = [\"nobody-here\"]",
            "t.toml:4:10: service[1].users: user `nobody-here`: no user",
        ),
        (
            "groups = [1, \"wheel\"]",
            "t.toml:4:14: service[1].groups: group `wheel`: no group",
        ),
        (
            "executables = [\"/usr/bin/gone\"]",
            "t.toml:4:16: service[1].executables: `/usr/bin/gone` cannot stat it",
        ),
        (
            "cgroups = [\"user.slice\"]",
            "t.toml:4:12: service[1].cgroups: cgroup `user.slice`: no such cgroup",
        ),
    ];
    for (line, want) in cases {
        let e = compile_fake(&format!("{base}{line}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "{line}: {e}");
    }
    // From a set: the set's element.
    let e = compile_fake(&format!(
        "[user_sets]\nx = [\"ghost\"]\n{base}users = [\"*x\"]\n"
    ))
    .unwrap_err();
    assert_eq!((e.line, e.column, e.field.as_str()), (2, 6, "user_sets.x"));
}

#[test]
fn icmp_on_a_scoped_entry_is_refused() {
    let e = compile_fake(
        "[[service]]\nname = \"a\"\ndestinations = [\"10.0.0.0/8\"]\n\n[[service]]\nname = \"ping\"\ndestinations = [\"10.0.0.0/8\"]\nprotocols = [\"icmp\"]\nusers = [0]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("t.toml:5: service[2].protocols: icmp on an entry with"),
        "{e}"
    );
    assert!(e.contains("judged at TC"), "{e}");
}

#[test]
fn the_256th_scope_is_refused_naming_its_entry() {
    let mut text = String::new();
    for uid in 0..256u32 {
        text.push_str(&format!(
            "[[service]]\nname = \"s{uid}\"\ndestinations = [\"10.{uid}.0.0/16\"]\nusers = [{uid}]\n\n"
        ));
    }
    let e = compile_fake(&text).unwrap_err();
    assert_eq!(e.line, 255 * 5 + 1);
    assert_eq!(e.field, "service[256]");
    assert!(
        e.message
            .contains("service `s255` needs scope number 256: at most 255"),
        "{e}"
    );
    // 255 distinct scopes fit, and a 256th entry sharing one of them is fine.
    let fits = text.replace("users = [255]", "users = [254]");
    assert_eq!(fake(&fits).scopes.uid.len(), 255);
}

/// The grid: in/out of scope × block/service × audit/enforce × default allow/deny, against
/// `Match::verdict` as the kernel applies it.
#[test]
fn evaluate_as_decides_like_the_kernel_on_a_grid() {
    let dst: IpAddr = "192.0.2.1".parse().unwrap();
    for kind in ["service", "block"] {
        for audit in [false, true] {
            for default in ["allow", "deny"] {
                let text = format!(
                    "default = \"{default}\"\n[[{kind}]]\nname = \"e\"\ndestinations = [\"192.0.2.0/24\"]\nusers = [\"backup\"]\nmode = \"{}\"\n",
                    if audit { "audit" } else { "enforce" }
                );
                let c = fake(&text);
                let caller = |uid| Caller {
                    exe: ExeKey::default(),
                    uid,
                    gid: 0,
                };
                for inside in [true, false] {
                    let scopes = c
                        .scopes
                        .resolve(&caller(if inside { 1001 } else { 1000 }), &[]);
                    assert_eq!(scopes.has(1), inside);
                    let ev = c.evaluate_as(dst, 443, IPPROTO_TCP, &scopes);
                    let default_allow = default == "allow";
                    let block = kind == "block";
                    // What the entry does, written out.
                    let (allow, rule_id, audit_rule) = match (block, audit, inside) {
                        (true, false, true) => (false, 1, 0),
                        // An audit block reports only a call that is let through.
                        (true, true, true) => {
                            (default_allow, RULE_DEFAULT, u32::from(default_allow))
                        }
                        (false, _, true) => (true, 1, 0),
                        (false, true, false) if !default_allow => (true, RULE_DEFAULT, 1),
                        _ => (default_allow, RULE_DEFAULT, 0),
                    };
                    let cell = format!("{kind} audit={audit} default={default} inside={inside}");
                    assert_eq!(
                        (ev.allow, ev.rule_id, ev.audit_rule),
                        (allow, rule_id, audit_rule),
                        "{cell}"
                    );
                    // The same as the shared scan and verdict.
                    let (_, set) = c.matching_set(dst).unwrap();
                    let v = set
                        .first_match::<false>(443, IPPROTO_TCP, &scopes)
                        .verdict(default_allow);
                    assert_eq!(
                        (v.allow, v.rule_id, v.audit_rule),
                        (allow, rule_id, audit_rule),
                        "{cell}"
                    );
                    // No scope at all: `evaluate` is the caller in no scope.
                    if !inside {
                        assert_eq!(c.evaluate(dst, 443, IPPROTO_TCP), ev, "{cell}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_scoped_block_refuses_only_in_scope_callers_and_scoped_services_fall_through() {
    let c = fake(
        r#"
[[service]]
name = "restic-s3"
destinations = ["192.0.2.0/24"]
executables = ["/usr/bin/restic"]

[[service]]
name = "web"
destinations = ["0.0.0.0/0"]
ports = [443]

[[block]]
name = "no-curl"
destinations = ["192.0.2.0/24"]
executables = ["/usr/bin/curl"]
"#,
    );
    let dst: IpAddr = "192.0.2.9".parse().unwrap();
    let who = |exe| {
        c.scopes.resolve(
            &Caller {
                exe,
                uid: 0,
                gid: 0,
            },
            &[],
        )
    };
    let name = |e: &Evaluation| c.rule_name(e.rule_id).to_string();
    let restic = c.evaluate_as(dst, 22, IPPROTO_TCP, &who(RESTIC));
    assert_eq!((restic.allow, name(&restic)), (true, "restic-s3".into()));
    let curl = c.evaluate_as(dst, 443, IPPROTO_TCP, &who(CURL));
    assert_eq!((curl.allow, name(&curl)), (false, "no-curl".into()));
    // Another program: past the scoped service, to the unscoped one, then the default.
    let other = ExeKey { ino: 9, ..CURL };
    let web = c.evaluate_as(dst, 443, IPPROTO_TCP, &who(other));
    assert_eq!((web.allow, name(&web)), (true, "web".into()));
    let ssh = c.evaluate_as(dst, 22, IPPROTO_TCP, &who(other));
    assert_eq!((ssh.allow, name(&ssh)), (false, "default".into()));
    assert!(matches!(ssh.reason, Reason::DefaultInPrefix { .. }));
    let (_, set) = c.matching_set(dst).unwrap();
    assert_eq!(set.rules[0].action, ACTION_BLOCK);
}

#[test]
fn check_warns_where_an_unscoped_service_undoes_a_scoped_one() {
    let scoped = "default = \"deny\"\n[[service]]\nname = \"s3-for-restic\"\ndestinations = [\"192.0.2.0/24\"]\nports = [443]\nusers = [\"backup\"]\n";
    assert!(fake(scoped).scope_overlaps().is_empty());
    let undone = format!(
        "{scoped}[[service]]\nname = \"web\"\ndestinations = [\"192.0.0.0/16\"]\nports = [\"80-443\"]\n"
    );
    let w = fake(&undone).scope_overlaps();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("`s3-for-restic` is scoped, but service `web`"),
        "{w:?}"
    );
    assert!(w[0].contains("192.0.2.0/24"), "{w:?}");
    // Other ports, or a block: nothing undone.
    for other in [
        "[[service]]\nname = \"web\"\ndestinations = [\"192.0.0.0/16\"]\nports = [80]\n",
        "[[block]]\nname = \"web\"\ndestinations = [\"192.0.0.0/16\"]\nports = [443]\n",
    ] {
        assert!(
            fake(&format!("{scoped}{other}"))
                .scope_overlaps()
                .is_empty(),
            "{other}"
        );
    }
    // An unscoped audit service allows everyone too; a scoped audit one narrows nothing yet.
    let audit_open = format!(
        "{scoped}[[service]]\nname = \"web\"\ndestinations = [\"192.0.0.0/16\"]\nports = [443]\nmode = \"audit\"\n"
    );
    assert_eq!(fake(&audit_open).scope_overlaps().len(), 1);
    let audit_scoped = undone.replace(
        "users = [\"backup\"]\n",
        "users = [\"backup\"]\nmode = \"audit\"\n",
    );
    assert!(fake(&audit_scoped).scope_overlaps().is_empty());
}
