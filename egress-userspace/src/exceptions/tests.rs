use std::time::Duration;

use egress_common::{
    EXC_CGROUP, EXC_ENTRIES, EXC_PROCESS, EXC_USER, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    addr_halves, exception_scope,
};

use super::*;
use crate::api::Request;

fn ask<'a>(dest: &'a str, port: Option<&'a str>, protocol: Option<&'a str>) -> Ask<'a> {
    Ask {
        dest,
        port,
        protocol,
        for_secs: 900,
        reason: "ticket 123",
    }
}

fn exc(id: u32, dest: &str, scope: Scope, until_ns: u64) -> Exception {
    Exception {
        id,
        dest: dest.parse::<Destination>().unwrap().to_string(),
        host: None,
        addresses: Vec::new(),
        port: None,
        protocol: None,
        scope,
        reason: "r".into(),
        by_uid: 0,
        by_user: None,
        granted: String::new(),
        until: String::new(),
        until_ns,
    }
}

#[test]
fn requests_are_checked_field_by_field() {
    let max = DEFAULT_MAX_FOR;
    let c = check(&ask("192.0.2.7", Some("443"), Some("TCP")), max).unwrap();
    assert_eq!(c.target, Target::Dest("192.0.2.7".parse().unwrap()));
    assert_eq!(c.port.unwrap().to_string(), "443");
    assert_eq!(c.protocol, Some(Protocol::Tcp));
    assert_eq!(c.duration, Duration::from_secs(900));
    let c = check(&ask("10.1.0.0/16", Some("8000-8080"), None), max).unwrap();
    assert_eq!(c.port.unwrap().to_string(), "8000-8080");
    // v4-mapped is the IPv4 address it reaches.
    let c = check(&ask("::ffff:192.0.2.7", None, None), max).unwrap();
    assert_eq!(c.target, Target::Dest("192.0.2.7/32".parse().unwrap()));

    // A name is a host exception, kept lowercase without its trailing dot.
    let c = check(&ask("Vendor.Example.COM.", Some("443"), None), max).unwrap();
    assert_eq!(c.target, Target::Host("vendor.example.com".into()));
    let e = check(&ask("*.example.com", None, None), max).unwrap_err();
    assert!(e.contains("not a host name"), "{e}");
    let e = check(&ask("bad..example.com", None, None), max).unwrap_err();
    assert!(e.contains("not a host name"), "{e}");
    let e = check(&ask("10.1.2.3/8", None, None), max).unwrap_err();
    assert!(e.starts_with("dest:"), "{e}");
    let e = check(&ask("10.0.0.0/8", Some("0"), None), max).unwrap_err();
    assert!(e.contains("--port") && e.contains("port 0"), "{e}");
    let e = check(&ask("10.0.0.0/8", Some("90-80"), None), max).unwrap_err();
    assert!(e.contains("reversed"), "{e}");
    let e = check(&ask("10.0.0.0/8", Some("80"), Some("icmp")), max).unwrap_err();
    assert!(e.contains("no ports"), "{e}");
    let e = check(&ask("10.0.0.0/8", None, Some("sctp")), max).unwrap_err();
    assert!(e.contains("--protocol"), "{e}");
    let mut a = ask("10.0.0.0/8", None, None);
    a.for_secs = 0;
    assert!(check(&a, max).unwrap_err().contains("--for"));
    a.for_secs = 24 * 3600 + 1;
    let e = check(&a, max).unwrap_err();
    assert!(
        e.contains("longer than") && e.contains("--max-exception"),
        "{e}"
    );
    a.for_secs = 24 * 3600;
    assert!(check(&a, max).is_ok(), "exactly the maximum is allowed");
    a.for_secs = 3600;
    assert!(
        check(&a, Duration::from_secs(600)).is_err(),
        "a configured maximum"
    );
    let mut a = ask("10.0.0.0/8", None, None);
    a.reason = "   ";
    assert!(check(&a, max).unwrap_err().contains("--reason"));
    a.reason = "line\nbreak";
    assert!(check(&a, max).unwrap_err().contains("control"));
}

#[test]
fn durations_parse_as_people_write_them() {
    assert_eq!(parse_for("15m").unwrap(), Duration::from_secs(900));
    assert_eq!(parse_for("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_for(" 90s ").unwrap(), Duration::from_secs(90));
    assert!(parse_for("15").unwrap_err().contains("not a duration"));
    assert!(
        parse_for("500ms")
            .unwrap_err()
            .contains("at least one second")
    );
    assert!(parse_for("soon").is_err());
}

/// The 16-byte address field of `ip`, as the hooks pass it, and its family.
fn dst(ip: &str) -> (u8, u64, u64) {
    let mut a = [0u8; 16];
    let family = match ip.parse::<std::net::IpAddr>().unwrap() {
        std::net::IpAddr::V4(v) => {
            a[..4].copy_from_slice(&v.octets());
            4
        }
        std::net::IpAddr::V6(v) => {
            a.copy_from_slice(&v.octets());
            6
        }
    };
    let (hi, lo) = addr_halves(&a);
    (family, hi, lo)
}

/// What the kernel answers for scope `key`, destination `ip`, `port`, `proto` at `now`.
fn kernel(entries: &Entries, key: u64, now: u64, ip: &str, port: u16, proto: u8) -> Option<u32> {
    let (family, hi, lo) = dst(ip);
    entries.get(&key)?.allows(now, family, hi, lo, port, proto)
}

#[test]
fn expiry_is_the_kernel_comparison_and_saturates() {
    let until = until_ns(1_000, Duration::from_secs(2));
    assert_eq!(until, 2_000_001_000);
    let e = exc(1, "10.0.0.1", Scope::Process { pid: 7 }, until);
    assert!(!expired(&e, until - 1));
    assert!(
        expired(&e, until),
        "the kernel honours an entry while until_ns > now"
    );
    assert_eq!(until_ns(u64::MAX - 5, Duration::from_secs(1)), u64::MAX);
    // The shared check the hooks run.
    let (entries, _) = compile(&[e]).unwrap();
    let key = exception_scope(EXC_PROCESS, 7);
    assert_eq!(
        kernel(&entries, key, until - 1, "10.0.0.1", 80, IPPROTO_TCP),
        Some(1)
    );
    assert_eq!(
        kernel(&entries, key, until, "10.0.0.1", 80, IPPROTO_TCP),
        None
    );
}

#[test]
fn entries_are_keyed_by_scope_and_match_their_prefix_only() {
    let list = [
        exc(1, "192.0.2.0/24", Scope::Process { pid: 42 }, 100),
        exc(
            2,
            "2001:db8::/32",
            Scope::Cgroup {
                path: "/sys/fs/cgroup/a/b".into(),
                id: 9001,
                level: 2,
            },
            100,
        ),
        exc(
            3,
            "0.0.0.0/0",
            Scope::User {
                uid: 1000,
                name: None,
            },
            100,
        ),
        exc(
            4,
            "::/0",
            Scope::User {
                uid: 1000,
                name: None,
            },
            100,
        ),
    ];
    let (entries, levels) = compile(&list).unwrap();
    assert_eq!(levels, 1 << 2);
    assert_eq!(entries.len(), 3);
    let pid = exception_scope(EXC_PROCESS, 42);
    let cg = exception_scope(EXC_CGROUP, 9001);
    let user = exception_scope(EXC_USER, 1000);
    let tcp = IPPROTO_TCP;
    assert_eq!(kernel(&entries, pid, 0, "192.0.2.0", 1, tcp), Some(1));
    assert_eq!(kernel(&entries, pid, 0, "192.0.2.255", 1, tcp), Some(1));
    assert_eq!(kernel(&entries, pid, 0, "192.0.3.0", 1, tcp), None);
    assert_eq!(kernel(&entries, pid, 0, "192.0.1.255", 1, tcp), None);
    assert_eq!(
        kernel(&entries, pid, 0, "::ffff:192.0.2.1", 1, tcp),
        None,
        "the v6 family"
    );
    assert_eq!(kernel(&entries, cg, 0, "2001:db8:ffff::1", 1, tcp), Some(2));
    assert_eq!(kernel(&entries, cg, 0, "2001:db9::1", 1, tcp), None);
    assert_eq!(
        kernel(&entries, cg, 0, "32.1.13.184", 1, tcp),
        None,
        "the v4 family"
    );
    assert_eq!(
        kernel(&entries, user, 0, "203.0.113.9", 1, tcp),
        Some(3),
        "/0"
    );
    assert_eq!(
        kernel(&entries, user, 0, "2001:db8::1", 1, tcp),
        Some(4),
        "::/0"
    );
    // Another scope's key holds nothing of these.
    assert_eq!(
        kernel(
            &entries,
            exception_scope(EXC_PROCESS, 1000),
            0,
            "203.0.113.9",
            1,
            tcp
        ),
        None
    );
    assert_eq!(
        kernel(
            &entries,
            exception_scope(EXC_USER, 42),
            0,
            "192.0.2.1",
            1,
            tcp
        ),
        None
    );
    // A /128 and a /32.
    let (entries, _) = compile(&[
        exc(5, "2001:db8::7", Scope::Process { pid: 1 }, 100),
        exc(6, "198.51.100.7", Scope::Process { pid: 1 }, 100),
    ])
    .unwrap();
    let k = exception_scope(EXC_PROCESS, 1);
    assert_eq!(kernel(&entries, k, 0, "2001:db8::7", 1, tcp), Some(5));
    assert_eq!(kernel(&entries, k, 0, "2001:db8::6", 1, tcp), None);
    assert_eq!(kernel(&entries, k, 0, "198.51.100.7", 1, tcp), Some(6));
    assert_eq!(kernel(&entries, k, 0, "198.51.100.6", 1, tcp), None);
}

#[test]
fn ports_and_protocols_narrow_an_exception() {
    let mut e = exc(5, "10.0.0.0/8", Scope::Process { pid: 1 }, 1_000);
    e.port = Some("8000-8080".into());
    e.protocol = Some("tcp".into());
    let mut wide = exc(6, "10.0.0.0/8", Scope::Process { pid: 1 }, 1_000);
    wide.port = Some("53".into());
    wide.protocol = Some("udp".into());
    let (entries, _) = compile(&[e, wide]).unwrap();
    let k = exception_scope(EXC_PROCESS, 1);
    let ip = "10.1.2.3";
    assert_eq!(kernel(&entries, k, 0, ip, 8000, IPPROTO_TCP), Some(5));
    assert_eq!(kernel(&entries, k, 0, ip, 8080, IPPROTO_TCP), Some(5));
    assert_eq!(kernel(&entries, k, 0, ip, 7999, IPPROTO_TCP), None);
    assert_eq!(kernel(&entries, k, 0, ip, 8081, IPPROTO_TCP), None);
    assert_eq!(
        kernel(&entries, k, 0, ip, 8000, IPPROTO_UDP),
        None,
        "another protocol"
    );
    assert_eq!(
        kernel(&entries, k, 0, ip, 53, IPPROTO_UDP),
        Some(6),
        "the second one"
    );
    assert_eq!(kernel(&entries, k, 0, ip, 53, IPPROTO_TCP), None);
    let (entries, _) = compile(&[exc(7, "10.0.0.0/8", Scope::Process { pid: 1 }, 1_000)]).unwrap();
    for (port, proto) in [
        (1, IPPROTO_TCP),
        (65535, IPPROTO_UDP),
        (0, IPPROTO_ICMP),
        (0, 132),
    ] {
        assert_eq!(
            kernel(&entries, k, 0, ip, port, proto),
            Some(7),
            "{port}/{proto}"
        );
    }
}

#[test]
fn a_scope_holds_a_bounded_number_of_exceptions() {
    let list: Vec<Exception> = (0..=EXC_ENTRIES as u32)
        .map(|i| {
            exc(
                i + 1,
                &format!("10.0.{i}.0/24"),
                Scope::Process { pid: 1 },
                100,
            )
        })
        .collect();
    let e = compile(&list).unwrap_err();
    assert!(e.contains("pid:1") && e.contains("revoke one first"), "{e}");
    let (entries, _) = compile(&list[..EXC_ENTRIES]).unwrap();
    let k = exception_scope(EXC_PROCESS, 1);
    for i in 0..EXC_ENTRIES as u32 {
        assert_eq!(
            kernel(&entries, k, 0, &format!("10.0.{i}.9"), 1, IPPROTO_TCP),
            Some(i + 1)
        );
    }
    // Other scopes do not count against each other.
    let spread: Vec<Exception> = (0..16u32)
        .map(|i| exc(i + 1, "10.0.0.0/8", Scope::Process { pid: i + 1 }, 100))
        .collect();
    assert_eq!(compile(&spread).unwrap().0.len(), 16);
}

#[test]
fn deep_cgroups_are_refused() {
    let e = exc(
        1,
        "10.0.0.1",
        Scope::Cgroup {
            path: "/x".into(),
            id: 1,
            level: 40,
        },
        100,
    );
    assert!(compile(&[e]).unwrap_err().contains("levels deep"));
}

#[test]
fn the_metadata_file_round_trips() {
    let dir = std::env::temp_dir().join(format!("egress-exc-{}", std::process::id()));
    let path = file_for(&dir.join("x.state.json"));
    assert!(path.to_string_lossy().ends_with("x.state.exceptions.json"));
    let record = Record {
        last_id: 9,
        exceptions: vec![exc(3, "10.0.0.0/8", Scope::Process { pid: 1 }, 5)],
    };
    write(&path, &record).unwrap();
    assert_eq!(read(&path), record);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(read(&dir.join("missing.json")), Record::default());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_admin_group_may_read_and_grant_but_nothing_else() {
    let allow = Request::Allow {
        dest: "10.0.0.1".into(),
        port: None,
        protocol: None,
        pid: Some(1),
        cgroup: None,
        user: None,
        for_secs: 60,
        reason: "r".into(),
    };
    let reads = [
        Request::Stats,
        Request::Status,
        Request::Grants { all: false },
        Request::Policy,
        Request::Exceptions,
        Request::Events {
            follow: false,
            since_ms: None,
            filter: vec![],
        },
    ];
    let root_only = [
        Request::Stop,
        Request::Unblock { key: "1".into() },
        Request::Reload {
            policy: None,
            dry_run: false,
            detail: false,
        },
    ];
    for r in reads
        .iter()
        .chain([&allow, &Request::Revoke { id: 1 }])
        .chain(&root_only)
    {
        assert!(authorize(r, 0, false).is_ok(), "root: {r:?}");
        let e = authorize(r, 1000, false).unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
    }
    for r in reads.iter().chain([&allow, &Request::Revoke { id: 1 }]) {
        assert!(authorize(r, 1000, true).is_ok(), "admin member: {r:?}");
    }
    for r in &root_only {
        let e = authorize(r, 1000, true).unwrap_err();
        assert!(e.contains("root only"), "{e}");
    }
}

/// One exact name, case and trailing dot aside; nothing else (no suffix, no parent, no label
/// glued on).
#[test]
fn host_exceptions_match_one_exact_name() {
    let host = normalize_host("Vendor.Example.com").unwrap();
    assert!(host_matches(&host, "vendor.example.com"));
    assert!(host_matches(&host, "VENDOR.example.COM."));
    assert!(!host_matches(&host, "x.vendor.example.com"));
    assert!(!host_matches(&host, "example.com"));
    assert!(!host_matches(&host, "vendor.example.com.evil.test"));
    assert!(!host_matches(&host, "avendor.example.com"));
    assert!(normalize_host("-x.test").unwrap_err().contains("`-`"));
    assert!(normalize_host(&format!("{}.test", "a".repeat(64))).is_err());
}

/// A scope covers its process (tgid), its uid, or its cgroup and the cgroups below it, and no
/// one else (a sibling cgroup whose path merely starts with the same characters included).
#[test]
fn host_exception_scopes_cover_only_their_askers() {
    let cg = Scope::Cgroup {
        path: "/sys/fs/cgroup/app".into(),
        id: 42,
        level: 1,
    };
    let asker = |tgid, uid, id, path: Option<&'static str>| Asker {
        tgid,
        uid,
        cgroup_id: id,
        cgroup_path: path.map(Path::new),
    };
    assert!(scope_covers(&cg, &asker(1, 1000, 42, None)));
    assert!(scope_covers(
        &cg,
        &asker(1, 1000, 43, Some("/sys/fs/cgroup/app/worker"))
    ));
    assert!(!scope_covers(
        &cg,
        &asker(1, 1000, 44, Some("/sys/fs/cgroup/app2"))
    ));
    assert!(!scope_covers(&cg, &asker(1, 1000, 44, None)));
    let pid = Scope::Process { pid: 77 };
    assert!(scope_covers(&pid, &asker(77, 0, 1, None)));
    assert!(!scope_covers(&pid, &asker(78, 0, 1, None)));
    let user = Scope::User {
        uid: 1000,
        name: None,
    };
    assert!(scope_covers(&user, &asker(5, 1000, 1, None)));
    assert!(!scope_covers(&user, &asker(5, 1001, 1, None)));
}

/// A host exception compiles to one entry per learned address (none before any), with its id,
/// ports and end; more addresses than a scope holds are refused.
#[test]
fn host_exceptions_compile_their_learned_addresses() {
    let scope = Scope::Process { pid: 9 };
    let mut e = exc(5, "192.0.2.1", scope.clone(), 1000);
    e.dest = String::new();
    e.host = Some("vendor.example.com".into());
    e.port = Some("443".into());
    let (entries, _) = compile(std::slice::from_ref(&e)).unwrap();
    assert!(
        entries
            .get(&scope.key())
            .is_none_or(|l| l.entries.iter().all(|x| x.until_ns == 0))
    );
    e.addresses = vec!["198.51.100.7".into(), "2001:db8::7".into()];
    let (entries, _) = compile(std::slice::from_ref(&e)).unwrap();
    let live: Vec<_> = entries[&scope.key()]
        .entries
        .iter()
        .filter(|x| x.until_ns != 0)
        .copied()
        .collect();
    assert_eq!(live.len(), 2);
    assert!(
        live.iter()
            .all(|x| x.id == 5 && x.until_ns == 1000 && x.port_lo == 443 && x.port_hi == 443)
    );
    assert_eq!((live[0].family, live[1].family), (4, 6));
    assert_eq!(
        (live[0].mask_hi, live[1].mask_lo),
        (0xffff_ffff_0000_0000, u64::MAX)
    );
    e.addresses = (1..=9).map(|i| format!("198.51.100.{i}")).collect();
    assert!(compile(&[e]).unwrap_err().contains("live exceptions"));
}
