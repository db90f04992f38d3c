//! Alert delivery to a webhook (`--webhook URL`): HTTP POST of the alert's JSON, with a timeout,
//! retries with exponential backoff, and a disk spool so that nothing is lost while the receiver
//! is down: every alert is written to the spool first and removed once the webhook took it.
//! Delivery runs in its own task: a slow or dead webhook never blocks enforcement or the event
//! loop.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Default spool directory.
pub const DEFAULT_SPOOL: &str = "/var/lib/egress/spool";

const TIMEOUT: Duration = Duration::from_secs(5);
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// How often the spool is retried while it holds undelivered alerts (doubling up to this).
const MAX_SPOOL_BACKOFF: Duration = Duration::from_secs(30);

/// The sending side, held by the controller.
#[derive(Clone)]
pub struct Webhook {
    spool: PathBuf,
    wake: Arc<Notify>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes one alert to the spool directory (name sorts by time, then sequence).
fn spool_write(dir: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    create_private_dir(dir)?;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!(
        "{ts:024}-{:08}-{}.json",
        SEQ.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    );
    let tmp = dir.join(format!(".{name}.tmp"));
    // Alerts carry command lines, which can hold secrets: owner-only.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// The spool directory, owner-only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn spooled(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Why a delivery failed: worth retrying, or never going to be accepted.
#[derive(Debug)]
enum Failure {
    Retry(anyhow::Error),
    /// The webhook answered 4xx (other than 408/429): this alert will never be accepted.
    Rejected(reqwest::StatusCode),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Retry(e) => write!(f, "{e:#}"),
            Failure::Rejected(s) => write!(f, "rejected with {s}"),
        }
    }
}

async fn post(client: &reqwest::Client, url: &str, body: &[u8]) -> Result<(), Failure> {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| Failure::Retry(anyhow::Error::new(e).context("sending")))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let transient = [
        reqwest::StatusCode::REQUEST_TIMEOUT,
        reqwest::StatusCode::TOO_MANY_REQUESTS,
    ];
    if status.is_client_error() && !transient.contains(&status) {
        return Err(Failure::Rejected(status));
    }
    Err(Failure::Retry(anyhow::anyhow!("webhook answered {status}")))
}

/// POSTs with retries and exponential backoff.
async fn deliver(client: &reqwest::Client, url: &str, body: &[u8]) -> Result<(), Failure> {
    let mut backoff = FIRST_BACKOFF;
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        match post(client, url, body).await {
            Ok(()) => return Ok(()),
            Err(e @ Failure::Rejected(_)) => return Err(e),
            Err(e) => {
                debug!(attempt, error = %e, "webhook delivery failed");
                last = Some(e);
                if attempt < ATTEMPTS {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

impl Webhook {
    /// Starts the delivery task. Alerts already in `spool` (from an earlier run) are sent first.
    pub fn start(url: String, spool: PathBuf) -> anyhow::Result<Webhook> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        create_private_dir(&spool)
            .with_context(|| format!("creating spool {}", spool.display()))?;
        let wake = Arc::new(Notify::new());
        let dir = spool.clone();
        let notify = wake.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                // Every alert is in the spool before anything is sent: oldest first, stop at the
                // first failure and retry later with a growing backoff.
                let mut failed = false;
                for f in spooled(&dir) {
                    let Ok(body) = std::fs::read(&f) else {
                        continue;
                    };
                    match deliver(&client, &url, &body).await {
                        Ok(()) => {
                            let _ = std::fs::remove_file(&f);
                        }
                        Err(Failure::Rejected(status)) => {
                            // Kept for inspection, out of the way of the alerts after it.
                            let dead = dir.join("rejected");
                            let _ = create_private_dir(&dead);
                            let _ =
                                std::fs::rename(&f, dead.join(f.file_name().unwrap_or_default()));
                            warn!(%status, file = %f.display(), "webhook rejected an alert; moved to rejected/");
                        }
                        Err(e) => {
                            warn!(error = %e, spooled = %dir.display(), "webhook unreachable; alerts stay spooled");
                            failed = true;
                            break;
                        }
                    }
                }
                let wait = if failed {
                    backoff = (backoff * 2).min(MAX_SPOOL_BACKOFF);
                    backoff
                } else {
                    backoff = Duration::from_secs(1);
                    MAX_SPOOL_BACKOFF
                };
                let _ = tokio::time::timeout(wait, notify.notified()).await;
            }
        });
        Ok(Webhook {
            spool,
            wake,
            task: Arc::new(task),
        })
    }

    /// Records an alert for delivery; never waits on the network. The alert is on disk before
    /// this returns, so neither a dead webhook nor a crash loses it.
    pub fn send(&self, body: Vec<u8>) {
        if let Err(e) = spool_write(&self.spool, &body) {
            warn!(error = %e, spool = %self.spool.display(), "could not spool an alert");
        }
        self.wake.notify_one();
    }

    /// Gives the delivery task up to `timeout` to empty the spool (at exit). What it could not
    /// send stays spooled for the next run.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !spooled(&self.spool).is_empty() && tokio::time::Instant::now() < deadline {
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_keeps_order_and_only_finished_files() {
        let dir = std::env::temp_dir().join(format!("egress-spool-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for i in 0..5 {
            spool_write(&dir, format!("{{\"n\":{i}}}").as_bytes()).unwrap();
        }
        std::fs::write(dir.join(".partial.json.tmp"), b"x").unwrap();
        let files = spooled(&dir);
        assert_eq!(files.len(), 5);
        let bodies: Vec<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        assert_eq!(
            bodies,
            (0..5).map(|i| format!("{{\"n\":{i}}}")).collect::<Vec<_>>()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
