//! Alert delivery to a webhook (`--webhook URL`): HTTP POST with a timeout, retries with
//! exponential backoff, and a disk spool so that nothing is lost while the receiver is down:
//! everything is written to the spool first and removed once the webhook took it. Delivery runs
//! in its own task: a slow or dead webhook never blocks enforcement or the event loop.
//!
//! - `format.rs`: what is sent and in which shape (`--webhook-format generic|alertmanager|slack`);
//! - `config.rs`: headers (`--webhook-header`, `--webhook-header-file`) and the HMAC-SHA256
//!   signature of the body (`--webhook-secret-file`, header `X-Egress-Signature`);
//! - `denies.rs`: deny events too (`--webhook-events deny`), rate-limited and batched.
//!
//! TLS trusts the bundled Mozilla roots and the system's CA store (`/etc/ssl/certs`, or
//! `SSL_CERT_FILE` / `SSL_CERT_DIR`), so a receiver behind a corporate CA is reached.

pub mod config;
pub mod denies;
pub mod format;

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
use tracing::{debug, info, warn};

pub use self::{
    config::Header,
    denies::DenyFeed,
    format::{Format, Outgoing},
};

/// Default spool directory.
pub const DEFAULT_SPOOL: &str = "/var/lib/egress/spool";

const TIMEOUT: Duration = Duration::from_secs(5);
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// How often the spool is retried while it holds undelivered alerts (doubling up to this).
const MAX_SPOOL_BACKOFF: Duration = Duration::from_secs(30);

/// Where the webhook is.
#[derive(Debug, Clone)]
pub enum Url {
    /// `--webhook URL`.
    Given(String),
    /// `--webhook-url-file FILE`: read once at start, a private file.
    File(PathBuf),
}

/// What the webhook sends, and how (`--webhook*`).
#[derive(Debug, Clone)]
pub struct Config {
    pub url: Url,
    pub spool: PathBuf,
    pub format: Format,
    /// Extra headers, from the command line and the header file.
    pub headers: Vec<Header>,
    /// Headers from this file too (read once at start).
    pub header_file: Option<PathBuf>,
    /// Sign the body with the key in this file (read once at start).
    pub secret_file: Option<PathBuf>,
    /// Send alerts (and their resolutions).
    pub alerts: bool,
    /// Send deny and audit events, batched.
    pub denies: bool,
}

/// What every request carries.
struct Request {
    url: String,
    format: Format,
    headers: reqwest::header::HeaderMap,
    secret: Option<Vec<u8>>,
}

/// The sending side, held by the controller.
#[derive(Clone)]
pub struct Webhook {
    spool: PathBuf,
    wake: Arc<Notify>,
    task: Arc<tokio::task::JoinHandle<()>>,
    format: Format,
    alerts: bool,
    denies: Option<Arc<denies::Batcher>>,
    feed: Option<DenyFeed>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The file-name ending of spooled deny batches (counted against [`denies::SPOOLED_MAX`]).
const DENIES_SUFFIX: &str = "-denies.json";

/// Spools `record` and wakes the delivery task; a failure is logged (nothing else can be done).
fn spool_record(dir: &Path, record: &Outgoing, wake: &Notify) {
    let body = serde_json::to_vec(record).expect("serializing to memory cannot fail");
    let suffix = match record {
        Outgoing::Denies(_) => DENIES_SUFFIX,
        _ => ".json",
    };
    if let Err(e) = spool_write(dir, &body, suffix) {
        warn!(error = %e, spool = %dir.display(), "could not spool a webhook record");
    }
    wake.notify_one();
}

/// Writes one record to the spool directory (name sorts by time, then sequence).
fn spool_write(dir: &Path, body: &[u8], suffix: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    create_private_dir(dir)?;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!(
        "{ts:024}-{:08}-{}{suffix}",
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

async fn post(client: &reqwest::Client, req: &Request, body: &[u8]) -> Result<(), Failure> {
    let mut builder = client
        .post(&req.url)
        .header("content-type", "application/json")
        .headers(req.headers.clone());
    if let Some(key) = &req.secret {
        builder = builder.header(config::SIGNATURE_HEADER, config::signature(key, body));
    }
    let resp = builder
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
async fn deliver(client: &reqwest::Client, req: &Request, body: &[u8]) -> Result<(), Failure> {
    let mut backoff = FIRST_BACKOFF;
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        match post(client, req, body).await {
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

/// The HTTP client: a timeout, and TLS trusting the bundled roots and the system's store.
fn client() -> anyhow::Result<reqwest::Client> {
    // reqwest loads the same store itself (and skips what it cannot parse); read here to say
    // what is trusted, once.
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        warn!(error = %e, "reading the system's CA store for the webhook");
    }
    info!(
        system_cas = native.certs.len(),
        "webhook TLS trusts the bundled roots and the system's CA store"
    );
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .context("building the HTTP client (with the system's CA store)")
}

/// Moves a spool file out of the way of the records after it, kept for inspection.
fn reject(dir: &Path, f: &Path, why: &str) {
    let dead = dir.join("rejected");
    let _ = create_private_dir(&dead);
    let _ = std::fs::rename(f, dead.join(f.file_name().unwrap_or_default()));
    warn!(file = %f.display(), "webhook: {why}; moved to rejected/");
}

impl Webhook {
    /// Reads the secret and header files (an error names the file), then starts the delivery
    /// task. Records already in the spool (from an earlier run) are sent first.
    pub fn start(cfg: Config) -> anyhow::Result<Webhook> {
        let mut headers = reqwest::header::HeaderMap::new();
        let from_file = match &cfg.header_file {
            Some(f) => config::read_header_file(f)?,
            None => Vec::new(),
        };
        for (name, value) in cfg.headers.iter().cloned().chain(from_file) {
            headers.append(name, value);
        }
        let secret = cfg
            .secret_file
            .as_deref()
            .map(config::read_secret_file)
            .transpose()?;
        let url = match &cfg.url {
            Url::Given(u) => u.clone(),
            Url::File(f) => config::read_url_file(f)?,
        };
        let client = client()?;
        let spool = cfg.spool.clone();
        create_private_dir(&spool)
            .with_context(|| format!("creating spool {}", spool.display()))?;
        let wake = Arc::new(Notify::new());
        let dir = spool.clone();
        let notify = wake.clone();
        let req = Request {
            url,
            format: cfg.format,
            headers,
            secret,
        };
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                // Every record is in the spool before anything is sent: oldest first, stop at
                // the first failure and retry later with a growing backoff.
                let mut failed = false;
                for f in spooled(&dir) {
                    let Ok(record) = std::fs::read(&f) else {
                        continue;
                    };
                    let Some(out) = Outgoing::from_spool(&record) else {
                        reject(&dir, &f, "a spool file that is not a webhook record");
                        continue;
                    };
                    let Some(body) = out.render(req.format) else {
                        // Not sent in this format (a resolution in the generic format).
                        let _ = std::fs::remove_file(&f);
                        continue;
                    };
                    match deliver(&client, &req, &body).await {
                        Ok(()) => {
                            let _ = std::fs::remove_file(&f);
                        }
                        Err(Failure::Rejected(status)) => {
                            reject(&dir, &f, &format!("rejected with {status}"));
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
        let (feed, denies) = if cfg.denies {
            let (feed, batcher) = denies::start(
                denies::SpoolSink {
                    dir: spool.clone(),
                    wake: wake.clone(),
                },
                denies::Limits::DEFAULT,
            );
            (Some(feed), Some(Arc::new(batcher)))
        } else {
            (None, None)
        };
        Ok(Webhook {
            spool,
            wake,
            task: Arc::new(task),
            format: cfg.format,
            alerts: cfg.alerts,
            denies,
            feed,
        })
    }

    /// Records an alert or its resolution for delivery; never waits on the network. It is on
    /// disk before this returns, so neither a dead webhook nor a crash loses it. Nothing is
    /// recorded when alerts are not sent (`--webhook-events deny`) or the format does not send
    /// this (resolutions in the generic format).
    pub fn send(&self, record: &Outgoing) {
        if !self.alerts || record.render(self.format).is_none() {
            return;
        }
        spool_record(&self.spool, record, &self.wake);
    }

    /// Whether resolutions are sent (the format has them, and alerts are sent).
    pub fn sends_resolutions(&self) -> bool {
        self.alerts && self.format != Format::Generic
    }

    /// Where the event pump hands deny events (`--webhook-events deny`).
    pub fn deny_feed(&self) -> Option<DenyFeed> {
        self.feed.clone()
    }

    /// Gives the delivery task up to `timeout` to empty the spool (at exit), the deny batch
    /// being gathered included. What it could not send stays spooled for the next run.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(d) = &self.denies
            && d.gathering.load(Ordering::SeqCst)
        {
            d.flush.notify_one();
            while d.gathering.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        while !spooled(&self.spool).is_empty() && tokio::time::Instant::now() < deadline {
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.task.abort();
        if let Some(d) = &self.denies {
            let total = d.dropped_total.load(Ordering::Relaxed);
            if total > 0 {
                info!(
                    dropped = total,
                    "deny events left out of the webhook's batches (rate limit)"
                );
            }
        }
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
            spool_write(&dir, format!("{{\"n\":{i}}}").as_bytes(), ".json").unwrap();
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
