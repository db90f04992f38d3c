//! Deny and audit events to the webhook (`--webhook-events deny`), rate-limited and batched in
//! bounded memory: a deny flood must neither grow the controller nor flood the receiver.
//!
//! The event pump offers every event to a [`DenyFeed`] without waiting: a bounded channel
//! ([`Limits::queue`] events). A batch starts with the first event after a quiet spell, gathers
//! for [`Limits::gather`], and goes out no sooner than [`Limits::interval`] after the previous
//! one, with at most [`Limits::batch`] events: so at most 100 events per 5 s reach the receiver.
//! What does not fit (the channel full, the batch full, or [`SPOOLED_MAX`] batches already
//! waiting in the spool for a receiver that is down) is dropped and counted: the next batch says
//! how many in `dropped`, and a warning is logged.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, mpsc};
use tracing::warn;

use super::format::{DenyBatch, Outgoing};
use crate::events::JsonEvent;

/// The bounds of the deny feed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Events waiting between the pump and the batcher.
    pub queue: usize,
    /// Events in one batch.
    pub batch: usize,
    /// How long a batch gathers after its first event.
    pub gather: Duration,
    /// The least time between two batches.
    pub interval: Duration,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        queue: 1024,
        batch: 100,
        gather: Duration::from_secs(1),
        interval: Duration::from_secs(5),
    };
}

/// Deny batches the spool holds at most (alerts are always spooled).
pub const SPOOLED_MAX: usize = 100;

/// The pump's side: offers events, never waits.
#[derive(Clone)]
pub struct DenyFeed {
    tx: mpsc::Sender<JsonEvent>,
    dropped: Arc<AtomicU64>,
}

impl DenyFeed {
    /// Hands `event` to the batcher, or counts it dropped when the queue is full.
    pub fn offer(&self, event: JsonEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The batcher's side, and the handle the webhook keeps to flush it at exit.
pub(super) struct Batcher {
    pub flush: Arc<Notify>,
    /// A batch is being gathered.
    pub gathering: Arc<AtomicBool>,
    /// Events dropped so far, in total.
    pub dropped_total: Arc<AtomicU64>,
}

/// Where finished batches go: the spool, counted.
pub(super) trait BatchSink: Send + 'static {
    /// Deny batches waiting in the spool.
    fn spooled_batches(&self) -> usize;
    fn spool(&self, batch: &Outgoing);
}

pub(super) fn start(sink: impl BatchSink, limits: Limits) -> (DenyFeed, Batcher) {
    let (tx, rx) = mpsc::channel(limits.queue);
    let dropped = Arc::new(AtomicU64::new(0));
    let batcher = Batcher {
        flush: Arc::new(Notify::new()),
        gathering: Arc::new(AtomicBool::new(false)),
        dropped_total: Arc::new(AtomicU64::new(0)),
    };
    tokio::spawn(run(
        rx,
        dropped.clone(),
        batcher.flush.clone(),
        batcher.gathering.clone(),
        batcher.dropped_total.clone(),
        sink,
        limits,
    ));
    (DenyFeed { tx, dropped }, batcher)
}

async fn run(
    mut rx: mpsc::Receiver<JsonEvent>,
    dropped: Arc<AtomicU64>,
    flush: Arc<Notify>,
    gathering: Arc<AtomicBool>,
    dropped_total: Arc<AtomicU64>,
    sink: impl BatchSink,
    limits: Limits,
) {
    let mut last_sent: Option<tokio::time::Instant> = None;
    let drop_one = |n: u64| {
        dropped.fetch_add(n, Ordering::Relaxed);
    };
    loop {
        let Some(first) = rx.recv().await else { return };
        gathering.store(true, Ordering::SeqCst);
        let mut events = Vec::with_capacity(limits.batch);
        events.push(first);
        let now = tokio::time::Instant::now();
        let deadline = match last_sent {
            Some(t) => (now + limits.gather).max(t + limits.interval),
            None => now + limits.gather,
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = flush.notified() => break,
                ev = rx.recv() => match ev {
                    Some(e) if events.len() < limits.batch => events.push(e),
                    Some(_) => drop_one(1),
                    None => break,
                },
            }
        }
        let n = events.len() as u64;
        let left_out = dropped.swap(0, Ordering::Relaxed);
        if sink.spooled_batches() >= SPOOLED_MAX {
            // The receiver has been down for a while: these are left out too, and the next
            // batch that is spooled counts them all.
            drop_one(left_out + n);
            warn!(
                events = n,
                spooled = SPOOLED_MAX,
                "the webhook's spool is full of deny batches: deny events dropped"
            );
        } else {
            if left_out > 0 {
                dropped_total.fetch_add(left_out, Ordering::Relaxed);
                warn!(
                    dropped = left_out,
                    total = dropped_total.load(Ordering::Relaxed),
                    "deny events over the webhook's rate limit were dropped (counted in the batch)"
                );
            }
            sink.spool(&Outgoing::Denies(DenyBatch {
                ts: crate::events::timestamp(std::time::SystemTime::now()),
                hostname: crate::events::hostname().to_string(),
                events,
                dropped: left_out,
            }));
        }
        last_sent = Some(tokio::time::Instant::now());
        gathering.store(false, Ordering::SeqCst);
    }
}

/// A [`BatchSink`] over the spool directory.
pub(super) struct SpoolSink {
    pub dir: PathBuf,
    pub wake: Arc<Notify>,
}

impl BatchSink for SpoolSink {
    fn spooled_batches(&self) -> usize {
        super::spooled(&self.dir)
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(super::DENIES_SUFFIX))
            .count()
    }

    fn spool(&self, batch: &Outgoing) {
        super::spool_record(&self.dir, batch, &self.wake);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Memory {
        batches: Arc<Mutex<Vec<DenyBatch>>>,
        full: Arc<AtomicBool>,
    }

    impl BatchSink for Memory {
        fn spooled_batches(&self) -> usize {
            if self.full.load(Ordering::SeqCst) {
                SPOOLED_MAX
            } else {
                0
            }
        }
        fn spool(&self, batch: &Outgoing) {
            if let Outgoing::Denies(b) = batch {
                self.batches.lock().unwrap().push(b.clone());
            }
        }
    }

    fn deny(pid: u32) -> JsonEvent {
        let line = format!(
            r#"{{"ts":"t","event":"deny","pid":{pid},"tid":{pid},"comm":"nc","uid":0,"gid":0,"cgroup_id":1,"hook":"connect4","family":"ipv4","protocol":"tcp","dst":"198.51.100.7","port":25,"v4_mapped":false,"rule":"default","generation":1}}"#
        );
        serde_json::from_str(&line).unwrap()
    }

    const QUEUE: usize = 64;
    const BATCH_MAX: usize = 10;
    const GATHER: Duration = Duration::from_millis(100);
    const INTERVAL: Duration = Duration::from_millis(600);
    const LIMITS: Limits = Limits {
        queue: QUEUE,
        batch: BATCH_MAX,
        gather: GATHER,
        interval: INTERVAL,
    };
    const SLACK: Duration = Duration::from_millis(150);

    #[tokio::test]
    async fn a_flood_is_batched_bounded_and_what_is_left_out_is_counted() {
        let mem = Memory::default();
        let (feed, batcher) = start(mem.clone(), LIMITS);
        // A flood: more than the queue holds, offered at once.
        for pid in 0..(QUEUE as u32 + 500) {
            feed.offer(deny(pid));
        }
        tokio::time::sleep(GATHER + SLACK).await;
        let b = mem.batches.lock().unwrap().clone();
        assert_eq!(b.len(), 1, "one batch after the gathering");
        assert_eq!(b[0].events.len(), BATCH_MAX);
        assert_eq!(b[0].events[0].pid, 0, "the first events are kept");
        assert_eq!(
            b[0].dropped,
            (QUEUE + 500 - BATCH_MAX) as u64,
            "everything else is counted"
        );

        // The next batch waits for the interval, however soon its first event comes.
        feed.offer(deny(7));
        tokio::time::sleep(GATHER + SLACK).await;
        assert_eq!(mem.batches.lock().unwrap().len(), 1, "rate-limited");
        tokio::time::sleep(INTERVAL).await;
        let b = mem.batches.lock().unwrap().clone();
        assert_eq!(b.len(), 2);
        assert_eq!((b[1].events.len(), b[1].dropped), (1, 0));
        assert_eq!(
            batcher.dropped_total.load(Ordering::Relaxed),
            (QUEUE + 500 - BATCH_MAX) as u64
        );
    }

    #[tokio::test]
    async fn a_flush_sends_at_once_and_a_full_spool_drops_and_counts() {
        let mem = Memory::default();
        let (feed, batcher) = start(
            mem.clone(),
            Limits {
                gather: Duration::from_secs(3600),
                ..LIMITS
            },
        );
        feed.offer(deny(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        batcher.flush.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            mem.batches.lock().unwrap().len(),
            1,
            "flushed before GATHER"
        );

        mem.full.store(true, Ordering::SeqCst);
        feed.offer(deny(2));
        feed.offer(deny(3));
        tokio::time::sleep(Duration::from_millis(50)).await;
        batcher.flush.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(mem.batches.lock().unwrap().len(), 1, "nothing spooled");
        mem.full.store(false, Ordering::SeqCst);
        feed.offer(deny(4));
        tokio::time::sleep(Duration::from_millis(50)).await;
        batcher.flush.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = mem.batches.lock().unwrap().clone();
        assert_eq!((b[1].events.len(), b[1].dropped), (1, 2));
    }
}
