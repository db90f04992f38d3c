//! Byte-budget blocks (`[[alert]] action = "block"`): set in the kernel's `BLOCKED` map when an
//! alert fires. A process block also covers the processes it creates from then on, and theirs
//! (the fork tracker records them in `BLOCK_TREE`). It is lifted when the cooldown ends, by
//! `egress unblock`, or once the process and everything it created since have exited. When the
//! blocked process exits, its pid is released at once (the kernel may give it to another
//! process) while the block goes on for its descendants. Every tick prunes the tree of
//! processes that have exited, for the same reason.
//!
//! A `per = "executable"` block is a process block on each process running the executable in
//! the enforced cgroup when the alert fires (never the controller itself): each is reported,
//! expires and is lifted as a block of its own (`process:PID`). Processes that start the
//! executable later are not covered; if they go on, the alert fires again after its cooldown.
//!
//! Blocks a previous controller left in the pinned maps are adopted at start: reported, expired
//! and lifted like this controller's own. Every change is an event.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use egress_common::{BLOCK_SCOPE_PROCESS, BlockKey, BlockValue};
use tracing::{error, info};

use super::Controller;
use crate::{
    alerts::AlertKey,
    api::Response,
    events::{BlockEvent, timestamp},
    report::BlockInfo,
    sys::{
        clock,
        proc::{self, ProcSource as _, Procfs},
    },
};

/// The longest an adopted block is taken to last (the kernel may hold "forever").
const ADOPTED_AT_MOST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A block in force.
struct ActiveBlock {
    /// Its key in the kernel (the process scope; the descendants twin goes with it).
    key: BlockKey,
    rule: String,
    until: Instant,
    until_wall: SystemTime,
    /// Live descendants it covers, as of the last tick.
    descendants: usize,
    /// The blocked process has exited; the block goes on for its descendants.
    process_exited: bool,
    /// The executable key whose alert set this process block (`egress unblock
    /// executable:PATH` lifts them all).
    origin: Option<AlertKey>,
    /// When its alert fired (RFC 3339), for the webhook's resolution; None when adopted.
    fired_at: Option<String>,
}

/// The blocks in force: set by this controller, or adopted from the pins.
#[derive(Default)]
pub(super) struct Blocks(HashMap<AlertKey, ActiveBlock>);

impl Blocks {
    /// The blocks in force, for the stats report.
    pub fn report(&self) -> Vec<BlockInfo> {
        self.0
            .iter()
            .map(|(k, b)| BlockInfo {
                key: k.text(),
                rule: b.rule.clone(),
                until: humantime::format_rfc3339_seconds(b.until_wall).to_string(),
                descendants: b.descendants,
                process_exited: b.process_exited,
            })
            .collect()
    }
}

/// The kernel key that blocks `key`; None for keys that cannot be blocked by one kernel key
/// (destinations, cgroups; executables are blocked process by process).
fn block_key(key: &AlertKey) -> Option<BlockKey> {
    match *key {
        AlertKey::Process(p) => Some(BlockKey::process(p, None)),
        AlertKey::ProcessDestination(p, d) => Some(BlockKey::process(p, Some(d))),
        AlertKey::User(u) => Some(BlockKey::user(u)),
        _ => None,
    }
}

/// Whether a process in cgroup `rel` (relative to the cgroup2 `root`, as /proc/PID/cgroup
/// gives it) is at or below the enforced cgroup `enforced`.
fn enforced_cgroup(root: &Path, enforced: &Path, rel: &str) -> bool {
    root.join(rel.trim_start_matches('/')).starts_with(enforced)
}

/// The alert key a kernel block key (either scope) stands for.
fn alert_key(key: &BlockKey) -> AlertKey {
    match (key.is_user(), key.destination()) {
        (true, _) => AlertKey::User(key.tgid),
        (false, None) => AlertKey::Process(key.tgid),
        (false, Some(d)) => AlertKey::ProcessDestination(key.tgid, d),
    }
}

/// What a tick does with `BLOCK_TREE` (process, root) entries: the processes whose entries go
/// (gone, a thread, or no block of their root is in force: a pid the kernel reuses must not
/// inherit a block).
fn stale_entries(
    tree: &[(u32, u32)],
    roots: &HashSet<u32>,
    is_process: impl Fn(u32) -> bool,
) -> Vec<u32> {
    tree.iter()
        .filter(|(pid, root)| !roots.contains(root) || !is_process(*pid))
        .map(|(pid, _)| *pid)
        .collect()
}

/// Descendants in the tree per root (the root's own entry is not one).
fn descendants(tree: &[(u32, u32)]) -> HashMap<u32, usize> {
    let mut n = HashMap::new();
    for (pid, root) in tree {
        if pid != root {
            *n.entry(*root).or_default() += 1;
        }
    }
    n
}

impl BlockEvent {
    /// The event of `key` blocked or unblocked under alert `rule`; a process key names its
    /// process, and `exe` its executable when the caller knows it.
    fn new(
        event: &str,
        key: &AlertKey,
        rule: &str,
        reason: &str,
        until: Option<String>,
        exe: Option<String>,
    ) -> BlockEvent {
        let pid = key.tgid();
        BlockEvent {
            ts: timestamp(SystemTime::now()),
            event: event.into(),
            meta: crate::events::EventMeta::current(),
            key: key.text(),
            rule: rule.into(),
            alert_rule: rule.into(),
            reason: reason.into(),
            until,
            pid,
            exe,
        }
    }
}

impl Controller {
    /// Blocks `key` in the kernel for `dur`, reporting alert `alert_index`: a process, a
    /// process towards one destination, a user, or every process of the enforced cgroup running
    /// an executable (each as a process block). Returns the keys blocked (the processes, for an
    /// executable); none for keys that cannot be blocked (destinations, cgroups, executables
    /// known only by a process name) or when the kernel refused.
    pub(super) fn set_block(
        &mut self,
        key: &AlertKey,
        rule: &str,
        alert_index: usize,
        dur: Duration,
        fired_at: &str,
    ) -> Vec<AlertKey> {
        let keys = match key {
            AlertKey::Executable(name) => name.path().map_or_else(Vec::new, |exe| {
                let me = std::process::id();
                proc::running(exe)
                    .into_iter()
                    .filter(|&pid| pid != me)
                    .filter(|&pid| {
                        proc::cgroup_of(pid).is_some_and(|rel| {
                            enforced_cgroup(&self.target.root, &self.target.cgroup, &rel)
                        })
                    })
                    .map(AlertKey::Process)
                    .collect()
            }),
            k => vec![k.clone()],
        };
        let rule_id = self.policy.compiled.alert_rule_id(alert_index);
        let mut blocked = Vec::new();
        for k in keys {
            let Some(bk) = block_key(&k) else {
                continue;
            };
            if let Err(e) = self
                .dp
                .block(bk, clock::boot_ns() + dur.as_nanos() as u64, rule_id)
            {
                error!(key = %k.text(), error = %format!("{e:#}"), "could not block");
                continue;
            }
            self.blocks.0.insert(
                k.clone(),
                ActiveBlock {
                    key: bk,
                    rule: rule.to_string(),
                    until: Instant::now() + dur,
                    until_wall: SystemTime::now() + dur,
                    descendants: 0,
                    process_exited: false,
                    origin: matches!(key, AlertKey::Executable(_)).then(|| key.clone()),
                    fired_at: Some(fired_at.to_string()),
                },
            );
            blocked.push(k);
        }
        blocked
    }

    /// Takes over the blocks a previous controller left in the pinned maps, named by the
    /// adopted policy: they are reported, and expire and are lifted like this controller's own
    /// (one whose time is up in the kernel is lifted at the first tick).
    pub(super) fn adopt_blocks(&mut self) {
        let names = self.policy.rule_names();
        let now_boot = clock::boot_ns();
        let mut found: HashMap<AlertKey, (BlockKey, BlockValue, bool)> = HashMap::new();
        for (k, v) in self.dp.blocks() {
            let own = k.scope == BLOCK_SCOPE_PROCESS;
            let e = found
                .entry(alert_key(&k))
                .or_insert((k.in_scope(BLOCK_SCOPE_PROCESS), v, own));
            if own {
                (e.1, e.2) = (v, true);
            }
        }
        for (key, (bk, value, own)) in found {
            let left =
                Duration::from_nanos(value.until_ns.saturating_sub(now_boot)).min(ADOPTED_AT_MOST);
            let rule = names.name(value.rule_id);
            info!(key = %key.text(), rule = %rule, remaining = ?left, "adopted a byte-budget block from the pins");
            self.blocks.0.insert(
                key,
                ActiveBlock {
                    key: bk,
                    rule,
                    until: Instant::now() + left,
                    until_wall: SystemTime::now() + left,
                    descendants: 0,
                    // Only the descendants twin is left: the process exited under the last
                    // controller.
                    process_exited: !own,
                    origin: None,
                    fired_at: None,
                },
            );
        }
    }

    /// Reports a block just set (of a process running `exe`, when known).
    pub(super) async fn report_block(
        &mut self,
        key: &AlertKey,
        rule: &str,
        until: Option<String>,
        exe: Option<String>,
    ) {
        // Just blocked: the process is alive, its pid its own.
        let exe = exe.or_else(|| key.tgid().and_then(proc::exe_of));
        let ev = BlockEvent::new("block", key, rule, "over budget", until, exe);
        self.emit(&ev).await;
    }

    /// Releases the pids of blocked processes that exited, prunes the tree, and lifts the
    /// blocks whose cooldown ended or whose process and descendants have all exited.
    pub(super) async fn expire_blocks(&mut self, now: Instant) -> anyhow::Result<()> {
        // Roots first: a root found exited can create nothing more, so the tree read after this
        // holds everything it created.
        for b in self.blocks.0.values_mut() {
            if !b.key.is_user() && !b.process_exited && !Procfs.alive(b.key.tgid) {
                self.dp.release_process(&b.key)?;
                b.process_exited = true;
            }
        }
        let roots: HashSet<u32> = self
            .blocks
            .0
            .values()
            .filter(|b| !b.key.is_user())
            .map(|b| b.key.tgid)
            .collect();
        let tree = self.dp.block_tree();
        if !tree.is_empty() {
            self.dp
                .prune_block_tree(&stale_entries(&tree, &roots, proc::is_process));
        }
        // Read again after pruning: a process created while the first read was checked is in
        // the map now, so a tree found empty here really is (its members could create no more).
        let live = descendants(&self.dp.block_tree());
        let mut due: Vec<(AlertKey, &str)> = Vec::new();
        for (k, b) in &mut self.blocks.0 {
            b.descendants = if b.key.is_user() {
                0
            } else {
                live.get(&b.key.tgid).copied().unwrap_or(0)
            };
            if b.until <= now {
                due.push((k.clone(), "cooldown ended"));
            } else if b.process_exited && b.descendants == 0 {
                due.push((k.clone(), "process exited"));
            }
        }
        for (k, reason) in due {
            self.lift(&k, reason).await?;
        }
        Ok(())
    }

    /// Lifts a block and reports it; false if there was none.
    async fn lift(&mut self, key: &AlertKey, reason: &str) -> anyhow::Result<bool> {
        let Some(b) = self.blocks.0.remove(key) else {
            return Ok(false);
        };
        self.dp.unblock(&b.key)?;
        info!(key = %key.text(), rule = %b.rule, reason, "byte-budget block lifted");
        // A process that exited may have left its pid to another: never named by that one.
        let exe = (!b.process_exited)
            .then(|| key.tgid().and_then(proc::exe_of))
            .flatten();
        let ev = BlockEvent::new("unblock", key, &b.rule, reason, None, exe);
        self.emit(&ev).await;
        // The alert ends with its last block (an executable's alert blocked several processes).
        let alert_key = b.origin.clone().unwrap_or_else(|| key.clone());
        let others = b.origin.is_some() && self.blocks.0.values().any(|o| o.origin == b.origin);
        if !others {
            self.resolve_alert(&b.rule, &alert_key.text(), reason, b.fired_at);
        }
        Ok(true)
    }

    /// `egress unblock KEY`.
    pub(super) async fn unblock_request(&mut self, key: &str) -> Response {
        let key = match AlertKey::parse(key) {
            Ok(k) => k,
            Err(e) => return Response::Refused(e),
        };
        if matches!(key, AlertKey::Executable(_)) {
            let of_exe: Vec<AlertKey> = self
                .blocks
                .0
                .iter()
                .filter(|(_, b)| b.origin.as_ref() == Some(&key))
                .map(|(k, _)| k.clone())
                .collect();
            let mut lifted = Vec::new();
            for k in of_exe {
                match self.lift(&k, "egress unblock").await {
                    Ok(true) => lifted.push(k.text()),
                    Ok(false) => {}
                    Err(e) => {
                        return Response::Refused(format!(
                            "lifting the block on {}: {e:#}",
                            k.text()
                        ));
                    }
                }
            }
            return if lifted.is_empty() {
                Response::Refused(format!("no byte-budget block on {}", key.text()))
            } else {
                Response::Done(format!("unblocked {} ({})", key.text(), lifted.join(", ")))
            };
        }
        match self.lift(&key, "egress unblock").await {
            Ok(true) => Response::Done(format!("unblocked {}", key.text())),
            Ok(false) => Response::Refused(format!("no byte-budget block on {}", key.text())),
            Err(e) => Response::Refused(format!("lifting the block on {}: {e:#}", key.text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_and_alert_keys_map_both_ways_in_either_scope() {
        let keys = [
            AlertKey::Process(41),
            AlertKey::ProcessDestination(41, "198.18.0.2".parse().unwrap()),
            AlertKey::ProcessDestination(41, "fd00:e9e5::2".parse().unwrap()),
            AlertKey::User(1000),
        ];
        for k in keys {
            let bk = block_key(&k).expect("blockable");
            assert_eq!(alert_key(&bk), k);
            let desc = bk.in_scope(egress_common::BLOCK_SCOPE_DESCENDANTS);
            assert_eq!(
                alert_key(&desc),
                k,
                "the descendants twin names the same block"
            );
        }
        assert_eq!(
            block_key(&AlertKey::Destination("198.18.0.2".parse().unwrap())),
            None
        );
        assert_eq!(block_key(&AlertKey::Cgroup(7)), None);
        assert_eq!(
            block_key(&AlertKey::Executable(crate::alerts::ExeName::Path(
                "/usr/bin/curl".into()
            ))),
            None,
            "an executable is blocked process by process"
        );
    }

    #[test]
    fn executable_blocks_cover_the_enforced_cgroup_only() {
        let root = Path::new("/sys/fs/cgroup");
        let exec = Path::new("/sys/fs/cgroup/egress.slice/exec-7");
        assert!(enforced_cgroup(root, root, "/user.slice/x.scope"));
        assert!(enforced_cgroup(root, exec, "/egress.slice/exec-7"));
        assert!(enforced_cgroup(root, exec, "/egress.slice/exec-7/sub"));
        assert!(!enforced_cgroup(root, exec, "/egress.slice/exec-70"));
        assert!(!enforced_cgroup(root, exec, "/user.slice/x.scope"));
    }

    #[test]
    fn the_tree_keeps_live_processes_of_blocks_in_force_only() {
        // Root 10 (blocked) created 11 and 12 (12 has exited); 11 created 13. Root 20's block
        // is gone. 14 is a thread id: not a process.
        let tree = [
            (10, 10),
            (11, 10),
            (12, 10),
            (13, 10),
            (14, 10),
            (20, 20),
            (21, 20),
        ];
        let roots: HashSet<u32> = [10].into();
        let alive = |p: u32| [10, 11, 13, 20, 21].contains(&p);
        let mut stale = stale_entries(&tree, &roots, alive);
        stale.sort_unstable();
        assert_eq!(stale, [12, 14, 20, 21]);
        let kept: Vec<(u32, u32)> = tree
            .iter()
            .copied()
            .filter(|(p, _)| !stale.contains(p))
            .collect();
        assert_eq!(descendants(&kept), HashMap::from([(10, 2)]));
        // The root exited: its own entry goes, its descendants keep the block.
        let alive = |p: u32| [11, 13].contains(&p);
        assert_eq!(stale_entries(&kept, &roots, alive), [10]);
    }
}
