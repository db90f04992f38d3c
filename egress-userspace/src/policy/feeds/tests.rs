use std::net::IpAddr;

use super::*;
use crate::policy::{Policy, compile::CompiledPolicy};

fn nets(read: &FeedEntries) -> Vec<String> {
    read.nets.iter().map(ToString::to_string).collect()
}

#[test]
fn netset_reads_addresses_cidrs_ipv6_and_skips_comments() {
    let text = "# firehol\n; also a comment\n\n192.0.2.7\n198.51.100.0/24 # trailing\n2001:db8::/32\n::ffff:203.0.113.0/120\n10.1.2.3/8\n";
    let read = parse(FeedFormat::Netset, text);
    assert_eq!(read.rejected, 0, "{:?}", read.first_rejects);
    assert_eq!(
        nets(&read),
        [
            "10.0.0.0/8",
            "192.0.2.7/32",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "2001:db8::/32"
        ],
        "host bits masked, v4-mapped read as IPv4, sorted v4 first"
    );
    assert_eq!(read.entry_lines, 5);
}

#[test]
fn netset_rejects_bad_lines_with_their_numbers_and_counts_duplicates() {
    let text = "192.0.2.1\nnot-an-address\n192.0.2.1\n10.0.0.0/33\n10.0.0.0/255.0.0.0\n192.0.2.9 extra words\n2001:db8::/129\n192.0.2.2\n192.0.2.3\n192.0.2.4\n192.0.2.5\n192.0.2.6\n";
    let read = parse(FeedFormat::Netset, text);
    assert_eq!(read.rejected, 5);
    assert_eq!(read.duplicates, 1);
    assert_eq!(read.nets.len(), 6);
    let lines: Vec<usize> = read.first_rejects.iter().map(|r| r.line).collect();
    assert_eq!(lines, [2, 4, 5, 6, 7]);
    assert!(
        read.rejects_text()
            .starts_with("5 lines rejected (line 2: `not-an-address`")
    );
    // More entries than rejects: the copy is acceptable.
    assert_eq!(check_copy(text, &read, None), Ok(()));
}

#[test]
fn spamhaus_drop_keeps_the_sbl_id_as_label() {
    let text = "; Spamhaus DROP List 2024/01/01\n; Last-Modified: x\n1.10.16.0/20 ; SBL256894\n2.56.192.0/22 ; SBL459831\n5.0.0.0/33 ; SBL1\n223.254.0.0/16\n";
    let read = parse(FeedFormat::SpamhausDrop, text);
    assert_eq!(
        nets(&read),
        ["1.10.16.0/20", "2.56.192.0/22", "223.254.0.0/16"]
    );
    assert_eq!(read.rejected, 1);
    assert_eq!(read.first_rejects[0].line, 5);
    let d: Destination = "1.10.16.0/20".parse().unwrap();
    assert_eq!(read.labels.get(&d).map(String::as_str), Some("SBL256894"));
    assert_eq!(read.labels.len(), 2);
}

#[test]
fn tor_exits_read_exit_addresses_only() {
    let text = "@type tordnsel 1.0\nDownloaded 2024-01-01 00:00:00\nExitNode 0011BD2485AD45D984EC4159C88FC066E5E3300E\nPublished 2024-01-01 10:00:00\nLastStatus 2024-01-01 11:00:00\nExitAddress 192.0.2.10 2024-01-01 11:03:04\nExitNode 0111\nExitAddress 198.51.100.20 2024-01-01 11:03:04\nExitAddress bogus 2024-01-01\n";
    let read = parse(FeedFormat::TorExits, text);
    assert_eq!(nets(&read), ["192.0.2.10/32", "198.51.100.20/32"]);
    // `Downloaded` is no line of the format, and a bad ExitAddress is rejected.
    assert_eq!(read.rejected, 2, "{:?}", read.first_rejects);
    assert_eq!(read.first_rejects[0].line, 2);
    assert_eq!(read.first_rejects[1].line, 9);
}

#[test]
fn hosts_reads_names_and_the_hosts_file_form() {
    let text = "# StevenBlack-like\n127.0.0.1 localhost\n::1 localhost ip6-localhost\n0.0.0.0 0.0.0.0\n0.0.0.0 ads.example.com tracker.example.net # inline\nEVIL.example.org.\nevil.example.org\n*.wild.example\nnot a name here\nbad..name\n0.0.0.0\n";
    let read = parse(FeedFormat::Hosts, text);
    let hosts: Vec<String> = read.hosts.iter().map(ToString::to_string).collect();
    assert_eq!(
        hosts,
        [
            "ads.example.com",
            "tracker.example.net",
            "evil.example.org",
            "*.wild.example"
        ],
        "local names skipped, lowercased, deduplicated"
    );
    assert_eq!(read.duplicates, 1);
    assert_eq!(read.rejected, 3, "{:?}", read.first_rejects);
    let lines: Vec<usize> = read.first_rejects.iter().map(|r| r.line).collect();
    assert_eq!(lines, [9, 10, 11]);
}

#[test]
fn a_copy_that_is_not_a_feed_is_refused_as_a_whole() {
    let html = "<!DOCTYPE html>\n<html><body>192.0.2.1</body></html>\n";
    let read = parse(FeedFormat::Netset, html);
    assert!(check_copy(html, &read, None).unwrap_err().contains("HTML"));
    let junk = "hello\nworld\n192.0.2.1\n";
    let read = parse(FeedFormat::Netset, junk);
    assert!(
        check_copy(junk, &read, None)
            .unwrap_err()
            .contains("mostly unparseable")
    );
    let empty = "# nothing today\n";
    let read = parse(FeedFormat::Netset, empty);
    assert_eq!(
        check_copy(empty, &read, None),
        Ok(()),
        "empty, nothing before"
    );
    assert!(
        check_copy(empty, &read, Some(3))
            .unwrap_err()
            .contains("no entry")
    );
    assert_eq!(check_copy(empty, &read, Some(0)), Ok(()));
}

#[test]
fn the_most_specific_entry_is_the_one_reported() {
    let read = parse(
        FeedFormat::Netset,
        "10.0.0.0/8\n10.1.0.0/16\n10.1.2.3\n2001:db8::/32\n2001:db8:1::/48\n",
    );
    let at =
        |s: &str| matching_net(&read.nets, s.parse::<IpAddr>().unwrap()).map(|d| d.to_string());
    assert_eq!(at("10.1.2.3").as_deref(), Some("10.1.2.3/32"));
    assert_eq!(at("10.1.2.4").as_deref(), Some("10.1.0.0/16"));
    assert_eq!(at("10.200.0.1").as_deref(), Some("10.0.0.0/8"));
    assert_eq!(at("::ffff:10.1.2.3").as_deref(), Some("10.1.2.3/32"));
    assert_eq!(at("11.0.0.1"), None);
    assert_eq!(at("2001:db8:1::5").as_deref(), Some("2001:db8:1::/48"));
    assert_eq!(at("2001:db8:2::5").as_deref(), Some("2001:db8::/32"));
    assert_eq!(at("2001:db9::1"), None);
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "egress-feeds-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn policy_with(dir: &Path, table: &str) -> Policy {
    let text = format!(
        "default = \"allow\"\n[[service]]\nname = \"web\"\ndestinations = [\"0.0.0.0/0\", \"::/0\"]\nports = [443, 80]\n\n[[blocklist]]\nname = \"bad\"\n{table}\n"
    );
    let file = dir.join("policy.toml");
    std::fs::write(&file, &text).unwrap();
    Policy::load(&file).unwrap()
}

#[test]
fn policy_keys_parse_with_relative_files_and_errors_name_the_field() {
    let dir = temp_dir("keys");
    let p = policy_with(
        &dir,
        "file = \"feeds/x.netset\"\nformat = \"netset\"\nports = [443]\nprotocols = [\"tcp\"]",
    );
    let b = &p.blocklists[0];
    assert_eq!(b.source, FeedSource::File(dir.join("feeds/x.netset")));
    assert_eq!(b.ports.len(), 1);
    assert_eq!(b.line, 7);
    let bad = |table: &str| {
        let text = format!(
            "[[block]]\nname = \"x\"\ndestinations = [\"192.0.2.1\"]\n\n[[blocklist]]\nname = \"bad\"\n{table}\n"
        );
        Policy::parse("p.toml", &text).unwrap_err().to_string()
    };
    assert_eq!(
        bad("format = \"netset\""),
        "p.toml:5:1: blocklist[1]: missing `file` or `url`: expected where the feed is read from"
    );
    assert!(
        bad("file = \"a\"\nurl = \"https://x.example/a\"\nformat = \"netset\"")
            .starts_with("p.toml:8:7: blocklist[1].url: both")
    );
    assert!(
        bad("url = \"ftp://x.example/a\"\nformat = \"netset\"")
            .starts_with("p.toml:7:7: blocklist[1].url: `ftp://x.example/a` is not")
    );
    assert!(
        bad("file = \"a\"\nformat = \"csv\"")
            .starts_with("p.toml:8:10: blocklist[1].format: unknown variant `csv`"),
        "{}",
        bad("file = \"a\"\nformat = \"csv\"")
    );
    assert!(
        bad("file = \"a\"\nformat = \"netset\"\nrefresh = \"1h\"")
            .contains("blocklist[1].refresh: a `file` feed")
    );
    assert!(
        bad("url = \"https://x.example/a\"\nformat = \"netset\"\nrefresh = \"500ms\"")
            .contains("blocklist[1].refresh: ")
    );
    assert!(
        bad("file = \"a\"\nformat = \"hosts\"\nports = [443]")
            .contains("blocklist[1].ports: a `hosts` feed")
    );
    let e = bad("file = \"a\"\nformat = \"netset\"\ncolour = 1");
    assert!(
        e.starts_with("p.toml:9:1: blocklist[1].colour: unknown field `colour`"),
        "{e}"
    );
    let dup = "[[block]]\nname = \"x\"\ndestinations = [\"192.0.2.1\"]\n[[blocklist]]\nname = \"x\"\nfile = \"a\"\nformat = \"netset\"\n";
    assert!(
        Policy::parse("p.toml", dup)
            .unwrap_err()
            .to_string()
            .contains("p.toml:5:8: blocklist[1].name: duplicate name `x`")
    );
    let url = Policy::parse("p.toml", "[[blocklist]]\nname = \"u\"\nurl = \"http://127.0.0.1:8080/drop.txt\"\nformat = \"spamhaus-drop\"\nrefresh = \"30s\"\n").unwrap();
    assert_eq!(url.blocklists[0].refresh, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_feed_is_a_block_that_beats_services_and_keeps_its_ports() {
    let dir = temp_dir("compile");
    std::fs::write(
        dir.join("f.netset"),
        "203.0.113.0/24\n198.51.100.7\n2001:db8:bad::/48\n",
    )
    .unwrap();
    let p = policy_with(
        &dir,
        "file = \"f.netset\"\nformat = \"netset\"\nports = [443]",
    );
    let p = p.with_feeds(&FeedStore::default()).unwrap();
    assert_eq!(p.feeds[0].entries, 3);
    let c = CompiledPolicy::compile(&p).unwrap();
    let verdict = |dst: &str, port: u16| {
        let e = c.evaluate_as(
            dst.parse().unwrap(),
            port,
            egress_common::IPPROTO_TCP,
            &egress_common::ScopeBits::EVERYONE,
        );
        (e.allow, c.rule_name(e.rule_id).to_string())
    };
    assert_eq!(
        verdict("203.0.113.9", 443),
        (false, "bad".into()),
        "feed beats the service"
    );
    assert_eq!(
        verdict("203.0.113.9", 80),
        (true, "web".into()),
        "feed only for its ports"
    );
    assert_eq!(verdict("198.51.100.7", 443), (false, "bad".into()));
    assert_eq!(verdict("198.51.100.8", 443), (true, "web".into()));
    assert_eq!(verdict("2001:db8:bad::1", 443), (false, "bad".into()));
    let id = c.rule_names.iter().position(|n| n == "bad").unwrap() as u32;
    assert_eq!(
        c.feed_entry(id, "203.0.113.9".parse().unwrap()),
        Some(("203.0.113.0/24".into(), None))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_file_keeps_the_last_good_copy_and_none_at_all_is_an_error() {
    let dir = temp_dir("fallback");
    let feed = dir.join("f.netset");
    let store = FeedStore::new(Some(dir.join("cache")));
    let p = policy_with(&dir, "file = \"f.netset\"\nformat = \"netset\"");
    // No file, no cache: the policy cannot load, and says which feed and file.
    let e = p.clone().with_feeds(&store).unwrap_err().to_string();
    assert!(
        e.contains("policy.toml:7: blocklist bad: cannot read"),
        "{e}"
    );
    assert!(e.contains("no last good copy"), "{e}");
    std::fs::write(&feed, "192.0.2.1\n192.0.2.2\n").unwrap();
    let good = p.clone().with_feeds(&store).unwrap();
    assert_eq!(good.feeds[0].entries, 2);
    assert!(!good.feeds[0].from_cache);
    // HTML where the feed was: the cached copy is used, and that is said.
    std::fs::write(&feed, "<html>oops</html>\n").unwrap();
    let kept = p.clone().with_feeds(&store).unwrap();
    assert_eq!(kept.feeds[0].entries, 2);
    assert!(kept.feeds[0].from_cache);
    assert!(
        kept.feeds[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("HTML")
    );
    assert!(
        kept.warnings
            .iter()
            .any(|w| w.contains("the last good copy is used"))
    );
    // Emptied: refused too.
    std::fs::write(&feed, "# empty\n").unwrap();
    assert_eq!(p.clone().with_feeds(&store).unwrap().feeds[0].entries, 2);
    // Removed: the cached copy.
    std::fs::remove_file(&feed).unwrap();
    assert_eq!(p.clone().with_feeds(&store).unwrap().feeds[0].entries, 2);
    // Without a cache (`egress check`), a bad copy is an error.
    std::fs::write(&feed, "<html>oops</html>\n").unwrap();
    let e = p
        .clone()
        .with_feeds(&FeedStore::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTML"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_url_feed_loads_from_its_cache_or_empty() {
    let dir = temp_dir("url");
    let store = FeedStore::new(Some(dir.join("cache")));
    let p = policy_with(&dir, "url = \"http://127.0.0.1:1/f\"\nformat = \"netset\"");
    let none = p.clone().with_feeds(&store).unwrap();
    assert_eq!(none.feeds[0].entries, 0);
    assert!(
        none.feeds[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("never fetched")
    );
    store.store(&p.blocklists[0], "192.0.2.5\n").unwrap();
    let cached = p.with_feeds(&store).unwrap();
    assert_eq!(cached.feeds[0].entries, 1);
    assert_eq!(cached.feeds[0].last_error, None);
    assert!(cached.feeds[0].last_success.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hosts_feeds_block_names_through_the_name_matcher() {
    let dir = temp_dir("hosts");
    std::fs::write(dir.join("h.txt"), "0.0.0.0 evil.example.com\n").unwrap();
    let p = policy_with(&dir, "file = \"h.txt\"\nformat = \"hosts\"");
    let p = p.with_feeds(&FeedStore::default()).unwrap();
    assert!(p.uses_names());
    let index = crate::policy::names::NameIndex::new(&p);
    match index.lookup("evil.example.com").verdict() {
        crate::policy::names::NameVerdict::Blocked(hit) => {
            assert_eq!(p.rules[hit.rule as usize].name, "bad");
        }
        other => panic!("not blocked: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 1M-line netset: read and compiled in reasonable time (the tight bound is checked in
/// release by the e2e test; debug builds are ~10x slower).
#[test]
fn a_million_line_netset_parses() {
    let mut text = String::with_capacity(16 << 20);
    for i in 0..1_000_000u32 {
        let a = 0x0b00_0000u32 + i * 4;
        text.push_str(&std::net::Ipv4Addr::from(a).to_string());
        text.push_str("/31\n");
    }
    let t = std::time::Instant::now();
    let read = parse(FeedFormat::Netset, &text);
    let took = t.elapsed();
    assert_eq!(read.nets.len(), 1_000_000);
    assert_eq!(read.rejected, 0);
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn the_name_entry_covering_a_name_is_found_without_a_scan() {
    let read = parse(
        FeedFormat::Hosts,
        "evil.example.com\n*.one.example\n**.deep.example\n",
    );
    let b = Blocklist {
        name: "names".into(),
        source: FeedSource::File("/x".into()),
        format: FeedFormat::Hosts,
        refresh: DEFAULT_REFRESH,
        ports: Vec::new(),
        protocols: Vec::new(),
        line: 1,
        file: "p.toml".into(),
    };
    let rule = rule(&b, &read);
    let info = rule.feed.unwrap();
    let at = |n: &str| info.host_entry_of(n);
    assert_eq!(at("EVIL.example.com.").as_deref(), Some("evil.example.com"));
    assert_eq!(at("sub.evil.example.com"), None);
    assert_eq!(at("a.one.example").as_deref(), Some("*.one.example"));
    assert_eq!(at("a.b.one.example"), None);
    assert_eq!(at("x.y.z.deep.example").as_deref(), Some("**.deep.example"));
    assert_eq!(at("deep.example"), None);
    assert_eq!(at("other.example"), None);
}
