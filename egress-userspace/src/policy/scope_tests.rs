//! Unit tests of the selector keys and named sets: parsing (each key, sets, errors with their
//! line, column and field). Compiling and evaluating scopes: `compile/scope_tests.rs`.

use std::path::PathBuf;

use super::*;

fn err(text: &str) -> PolicyError {
    Policy::parse("t.toml", text).expect_err("policy should be rejected")
}

fn ok(text: &str) -> Policy {
    Policy::parse("t.toml", text).unwrap_or_else(|e| panic!("policy should parse: {e}"))
}

#[test]
fn each_selector_key_parses_with_where_it_was_written() {
    let p = ok(r#"
[[service]]
name = "backup"
destinations = ["192.0.2.0/24"]
executables = ["/usr/bin/restic"]
users = ["backup", 1001]
groups = ["adm", 4]
cgroups = ["system.slice/backup.service/"]
mode = "audit"
"#);
    let r = &p.rules[0];
    assert!(r.audit);
    let s = &r.selectors;
    assert_eq!(s.executables[0].value, PathBuf::from("/usr/bin/restic"));
    assert_eq!(
        (
            s.executables[0].line,
            s.executables[0].column,
            s.executables[0].field.as_str()
        ),
        (5, 16, "service[1].executables")
    );
    assert_eq!(
        s.users.iter().map(|w| w.value.clone()).collect::<Vec<_>>(),
        [Principal::Name("backup".into()), Principal::Id(1001)]
    );
    assert_eq!(s.users[1].column, 20);
    assert_eq!(
        s.groups.iter().map(|w| w.value.clone()).collect::<Vec<_>>(),
        [Principal::Name("adm".into()), Principal::Id(4)]
    );
    // Normalized: no trailing slash.
    assert_eq!(s.cgroups[0].value, "system.slice/backup.service");
    assert!(p.warnings.is_empty());
}

#[test]
fn no_selector_and_default_mode_is_everyone_enforced() {
    let p = ok("[[block]]\nname = \"b\"\ndestinations = [\"0.0.0.0/0\"]\nmode = \"enforce\"\n");
    assert!(p.rules[0].selectors.is_empty());
    assert!(!p.rules[0].audit);
}

#[test]
fn sets_expand_in_place_deduplicated_and_unused_sets_warn() {
    let p = ok(r#"
[user_sets]
humans = ["alice", "bob", 1001]

[group_sets]
unused = ["adm"]

[executable_sets]
tools = ["/usr/bin/curl", "/usr/bin/wget"]

[cgroup_sets]
backups = ["system.slice/backup.service"]

[[block]]
name = "no-smtp"
destinations = ["0.0.0.0/0"]
ports = [25]
users = ["*humans", "alice", 7]
executables = ["*tools"]
cgroups = ["*backups"]
"#);
    let s = &p.rules[0].selectors;
    assert_eq!(
        s.users
            .iter()
            .map(|w| w.value.to_string())
            .collect::<Vec<_>>(),
        ["alice", "bob", "1001", "7"]
    );
    // A value from a set points at the set's element.
    assert_eq!(
        (s.users[1].line, s.users[1].field.as_str()),
        (3, "user_sets.humans")
    );
    assert_eq!(s.users[3].field, "block[1].users");
    assert_eq!(s.executables.len(), 2);
    assert_eq!(s.cgroups[0].value, "system.slice/backup.service");
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert!(
        p.warnings[0].starts_with(
            "t.toml:6:10: group_sets.unused: the group set `unused` is not referenced"
        ),
        "{}",
        p.warnings[0]
    );
}

#[test]
fn selector_errors_name_line_column_and_field() {
    let base = "[[service]]\nname = \"s\"\ndestinations = [\"10.0.0.0/8\"]\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            "executables = [\"restic\"]",
            "t.toml:4:16: service[1].executables:",
            "not an absolute path",
        ),
        (
            "executables = [7]",
            "t.toml:4:16: service[1].executables:",
            "not a path",
        ),
        (
            "executables = []",
            "t.toml:4:15: service[1].executables:",
            "at least one executable",
        ),
        (
            "users = [\"a b\"]",
            "t.toml:4:10: service[1].users:",
            "not a user name",
        ),
        (
            "users = [-1]",
            "t.toml:4:10: service[1].users:",
            "not an id",
        ),
        (
            "users = [4294967295]",
            "t.toml:4:10: service[1].users:",
            "not a valid uid",
        ),
        (
            "groups = [\"\"]",
            "t.toml:4:11: service[1].groups:",
            "not a group name",
        ),
        (
            "groups = [true]",
            "t.toml:4:11: service[1].groups:",
            "a string (a name or a path) or a numeric id",
        ),
        (
            "cgroups = [\"/sys/fs/cgroup/x\"]",
            "t.toml:4:12: service[1].cgroups:",
            "is absolute",
        ),
        (
            "cgroups = [\"a/../b\"]",
            "t.toml:4:12: service[1].cgroups:",
            "without . or ..",
        ),
        (
            "cgroups = [\"/\"]",
            "t.toml:4:12: service[1].cgroups:",
            "is absolute",
        ),
        (
            "cgroups = [\"//\"]",
            "t.toml:4:12: service[1].cgroups:",
            "is absolute",
        ),
        (
            "cgroups = [\".\"]",
            "t.toml:4:12: service[1].cgroups:",
            "without . or ..",
        ),
        (
            "mode = \"loud\"",
            "t.toml:4:8: service[1].mode:",
            "unknown variant",
        ),
        (
            "users = [\"*nope\"]",
            "t.toml:4:10: service[1].users:",
            "no user set is named `nope`: expected one of [user_sets] (none is defined)",
        ),
    ];
    for (line, prefix, fragment) in cases {
        let e = err(&format!("{base}{line}\n")).to_string();
        assert!(e.starts_with(prefix), "{line}: {e}");
        assert!(e.contains(fragment), "{line}: {e}");
    }
    let deep = vec!["x"; 32].join("/");
    let e = err(&format!("{base}cgroups = [\"{deep}\"]\n")).to_string();
    assert!(e.contains("32 levels deep: at most 31"), "{e}");
    let deepest = vec!["x"; 31].join("/");
    ok(&format!("{base}cgroups = [\"{deepest}\"]\n"));
}

#[test]
fn set_errors_name_the_set_or_the_reference() {
    let rule = "[[service]]\nname = \"s\"\ndestinations = [\"10.0.0.0/8\"]\n";
    // A set referenced from the key of another kind.
    let e = err(&format!(
        "[group_sets]\nops = [\"adm\"]\n\n{rule}users = [\"*ops\"]\n"
    ));
    assert_eq!(e.field, "service[1].users");
    assert_eq!((e.line, e.column), (7, 10));
    assert!(
        e.message
            .contains("`*ops` is a group set ([group_sets]): a set is referenced only from the key of its kind (`groups`)"),
        "{e}"
    );
    // Unknown set, with the names that exist.
    let e = err(&format!(
        "[user_sets]\nhumans = [\"alice\"]\nbots = [1]\n\n{rule}users = [\"*human\"]\n"
    ));
    assert!(
        e.message
            .contains("no user set is named `human`: expected one of [user_sets] (bots, humans)"),
        "{e}"
    );
    // Nested reference.
    let e = err("[user_sets]\na = [\"alice\"]\nb = [\"*a\"]\n");
    assert_eq!((e.line, e.column, e.field.as_str()), (3, 6, "user_sets.b"));
    assert!(e.message.contains("cannot reference another set"), "{e}");
    // Empty set.
    let e = err("[cgroup_sets]\nnone = []\n");
    assert_eq!((e.line, e.field.as_str()), (2, "cgroup_sets.none"));
    assert!(e.message.contains("the cgroup set `none` is empty"), "{e}");
    // A set's values are checked even when unused.
    let e = err("[executable_sets]\nx = [\"bin/x\"]\n");
    assert_eq!(e.field, "executable_sets.x");
    assert!(e.message.contains("not an absolute path"), "{e}");
    // Not a table of lists.
    let e = err("user_sets = 3\n");
    assert_eq!(e.field, "user_sets");
}

#[test]
fn existing_keys_and_errors_are_unchanged_by_selectors() {
    let e = err("[[service]]\nname = \"s\"\nexecutables = [\"/usr/bin/x\"]\n");
    assert!(
        e.message.contains("missing `destinations` and `hosts`"),
        "{e}"
    );
    let e = err("[[service]]\nname = \"s\"\ndestinations = [\"10.0.0.0/8\"]\nuser = [\"x\"]\n");
    assert!(e.message.contains("unknown field `user`"), "{e}");
}
