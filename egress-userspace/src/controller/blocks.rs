//! Byte-budget blocks (`[[alert]] action = "block"`): set in the kernel's `BLOCKED` map when an
//! alert fires, lifted when the cooldown ends, when the process exits (its pid must not pass the
//! block on) or by `egress unblock`. Every change is an event.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use egress_common::BlockKey;
use tracing::info;

use super::Controller;
use crate::{
    alerts::AlertKey,
    api::Response,
    events::{BlockEvent, timestamp},
    report::BlockInfo,
    sys::{
        clock,
        proc::{ProcSource as _, Procfs},
    },
};

/// A block in force.
struct ActiveBlock {
    key: BlockKey,
    rule: String,
    until: Instant,
    until_wall: SystemTime,
}

/// The blocks this controller set.
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
            })
            .collect()
    }
}

impl BlockEvent {
    fn new(event: &str, key: &str, rule: &str, reason: &str, until: Option<String>) -> BlockEvent {
        BlockEvent {
            ts: timestamp(SystemTime::now()),
            event: event.into(),
            key: key.into(),
            rule: rule.into(),
            reason: reason.into(),
            until,
        }
    }
}

impl Controller {
    /// Blocks `key` (a process, a process towards one destination, or a user) in the kernel for
    /// `dur`, reporting alert `alert_index`. Destination and cgroup keys cannot be blocked: false.
    pub(super) fn set_block(
        &mut self,
        key: AlertKey,
        rule: &str,
        alert_index: usize,
        dur: Duration,
    ) -> anyhow::Result<bool> {
        let Some(bk) = (match key {
            AlertKey::Process(p) => Some(BlockKey::process(p, None)),
            AlertKey::ProcessDestination(p, d) => Some(BlockKey::process(p, Some(d))),
            AlertKey::User(u) => Some(BlockKey::user(u)),
            _ => None,
        }) else {
            return Ok(false);
        };
        let rule_id = self.policy.compiled.alert_rule_id(alert_index);
        self.dp
            .block(bk, clock::boot_ns() + dur.as_nanos() as u64, rule_id)?;
        self.blocks.0.insert(
            key,
            ActiveBlock {
                key: bk,
                rule: rule.to_string(),
                until: Instant::now() + dur,
                until_wall: SystemTime::now() + dur,
            },
        );
        Ok(true)
    }

    /// Reports a block just set.
    pub(super) async fn report_block(&mut self, key: &str, rule: &str, until: Option<String>) {
        let ev = BlockEvent::new("block", key, rule, "over budget", until);
        self.emit(&ev).await;
    }

    /// Lifts the blocks whose process exited or whose cooldown ended.
    pub(super) async fn expire_blocks(&mut self, now: Instant) -> anyhow::Result<()> {
        let mut due: Vec<(AlertKey, &str)> = Vec::new();
        for (k, b) in &self.blocks.0 {
            if k.tgid().is_some_and(|t| !Procfs.alive(t)) {
                due.push((*k, "process exited"));
            } else if b.until <= now {
                due.push((*k, "cooldown ended"));
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
        let ev = BlockEvent::new("unblock", &key.text(), &b.rule, reason, None);
        self.emit(&ev).await;
        Ok(true)
    }

    /// `egress unblock KEY`.
    pub(super) async fn unblock_request(&mut self, key: &str) -> Response {
        let key = match AlertKey::parse(key) {
            Ok(k) => k,
            Err(e) => return Response::Refused(e),
        };
        match self.lift(&key, "egress unblock").await {
            Ok(true) => Response::Done(format!("unblocked {}", key.text())),
            Ok(false) => Response::Refused(format!("no byte-budget block on {}", key.text())),
            Err(e) => Response::Refused(format!("lifting the block on {}: {e:#}", key.text())),
        }
    }
}
