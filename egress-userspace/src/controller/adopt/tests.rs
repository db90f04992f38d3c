use egress_common::{DEFAULT_DENY, MODE_ENFORCE};

use super::*;

const ENFORCE: &str = "mode = \"enforce\"\nallow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\n[[block]]\nname = \"old-block\"\ndestinations = [\"127.0.0.3\"]\n";

fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("egress-adopt-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A record as a controller that applied `loaded` as generation `generation` writes it.
fn record(loaded: &Loaded, generation: u32) -> State {
    State {
        policy: loaded.policy.source.clone(),
        policy_path: loaded.origin.file().map(Path::to_path_buf),
        policy_hash: loaded.policy.hash.clone(),
        feeds_hash: loaded.policy.feeds_hash.clone(),
        generation,
        mode: loaded.policy.mode.to_string(),
        default: loaded.policy.default.to_string(),
        ..State::default()
    }
}

fn kernel(loaded: &Loaded, generation: u32) -> Config {
    Config {
        generation,
        ..loaded.compiled.config
    }
}

#[test]
fn the_recorded_file_with_its_hash_is_the_policy_in_force() {
    let d = tmpdir("same");
    let loaded = Loaded::load(Some(&file(&d, "p.toml", ENFORCE))).unwrap();
    let adopted = Adopted::new(
        Pinned::recall(Some(record(&loaded, 3))),
        &kernel(&loaded, 3),
    );
    assert_eq!(adopted.unknown, None);
    assert_eq!(adopted.policy.hash, loaded.policy.hash);
    assert_eq!(adopted.compiled.rule_name(2), "old-block");
    assert_eq!(adopted.origin, loaded.origin);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_changed_or_vanished_file_leaves_a_stand_in_with_the_kernels_mode_and_recorded_hash() {
    let d = tmpdir("changed");
    let path = file(&d, "p.toml", ENFORCE);
    let loaded = Loaded::load(Some(&path)).unwrap();
    let rec = record(&loaded, 1);
    for change in [
        Some("mode = \"audit\"\ndefault = \"allow\"\n"),
        None, // removed
    ] {
        match change {
            Some(text) => std::fs::write(&path, text).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
        let pinned = Pinned::recall(Some(rec.clone()));
        assert!(pinned.policy.is_err());
        let adopted = Adopted::new(pinned, &kernel(&loaded, 1));
        assert!(adopted.unknown.is_some());
        // Never the embedded default, never the file's new content: what the kernel holds.
        assert_eq!(adopted.policy.mode, Mode::Enforce);
        assert_eq!(adopted.policy.default, DefaultVerdict::Deny);
        assert!(!adopted.policy.allow_loopback);
        assert_eq!(adopted.policy.hash, loaded.policy.hash);
        assert!(adopted.policy.rules.is_empty());
        assert_eq!(adopted.origin, Origin::File(path.clone()));
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_record_of_another_generation_says_nothing_of_the_kernels() {
    let d = tmpdir("generation");
    let loaded = Loaded::load(Some(&file(&d, "p.toml", ENFORCE))).unwrap();
    let adopted = Adopted::new(
        Pinned::recall(Some(record(&loaded, 1))),
        &kernel(&loaded, 2),
    );
    assert!(adopted.unknown.is_some());
    assert_eq!(
        adopted.policy.hash, "",
        "the hash of generation 1 is not generation 2's"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn no_record_is_unrecorded_and_the_kernel_still_decides() {
    let config = Config {
        generation: 4,
        mode: MODE_ENFORCE,
        default_verdict: DEFAULT_DENY,
        ..Config::default()
    };
    let adopted = Adopted::new(Pinned::recall(None), &config);
    assert_eq!(adopted.origin, Origin::Unrecorded);
    assert_eq!(adopted.policy.mode, Mode::Enforce);
    assert_eq!(adopted.policy.hash, "");
    assert!(adopted.unknown.is_some());
}

#[test]
fn the_embedded_default_is_read_back_when_recorded() {
    let loaded = Loaded::load(None).unwrap();
    let rec = record(&loaded, 1);
    assert_eq!(rec.policy_path, None);
    let adopted = Adopted::new(Pinned::recall(Some(rec)), &kernel(&loaded, 1));
    assert_eq!(adopted.unknown, None);
    assert_eq!(adopted.origin, Origin::Embedded);
}

#[test]
fn a_record_older_than_policy_path_names_its_file_in_policy() {
    let d = tmpdir("old-record");
    let loaded = Loaded::load(Some(&file(&d, "p.toml", ENFORCE))).unwrap();
    let rec = State {
        policy_path: None,
        ..record(&loaded, 1)
    };
    let adopted = Adopted::new(Pinned::recall(Some(rec)), &kernel(&loaded, 1));
    assert_eq!(adopted.unknown, None);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_switch_is_notable_for_another_file_or_a_weaker_mode_or_default() {
    let d = |source, mode: &str, default: &str| Described {
        source,
        hash: "",
        mode: mode.into(),
        default: default.into(),
    };
    let old = d("/a.toml", "enforce", "deny");
    assert!(notable(&old, &d("/a.toml", "enforce", "deny")).is_empty());
    assert_eq!(
        notable(&old, &d("/b.toml", "enforce", "deny")),
        ["another policy"]
    );
    assert_eq!(
        notable(&old, &d("/a.toml", "audit", "deny")),
        ["weaker mode"]
    );
    assert_eq!(
        notable(&old, &d("/a.toml", "enforce", "allow")),
        ["weaker default"]
    );
    let weak = d("/a.toml", "audit", "allow");
    assert!(
        notable(&weak, &d("/a.toml", "enforce", "deny")).is_empty(),
        "stronger is fine"
    );
}
