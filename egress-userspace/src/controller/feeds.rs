//! The blocklists' feeds, as the controller keeps them: `url` feeds fetched at start and every
//! `refresh` (a good copy that changes re-applies the policy in force atomically with it), the
//! last good copy of every feed cached on disk (`--feed-cache`), and `file` feeds followed with
//! `--watch`. Which copy is good is `policy::feeds`' call; a bad one never replaces a good one.
//!
//! A `url` feed that has never been fetched and has no cached copy does not stop the start: the
//! controller enforces the rest of the policy (refusing to start would leave the host with no
//! enforcement at all over a feed server being down), says so at WARN, in `egress status` and in
//! a `feed` event, and retries every [`RETRY`] until a fetch succeeds.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use super::Controller;
use crate::policy::{
    Policy,
    feeds::{self, Blocklist, FeedSource, FeedStatus, FeedStore},
};

/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the start waits for the first copy of a feed that has none.
const FIRST_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed fetch, the next comes this soon (or at `refresh`, if sooner).
const RETRY: Duration = Duration::from_secs(30);
/// The largest feed body accepted (a 1M-line netset of IPv6 CIDRs is ~45 MB).
const MAX_BODY: usize = 128 << 20;

/// The controller's feed store, chosen once at start (`--feed-cache`): every policy the
/// controller loads (start, reload, adoption) reads its feeds through it.
static STORE: OnceLock<FeedStore> = OnceLock::new();

/// Sets the store (first call wins: one per process).
pub(super) fn set_cache(dir: PathBuf) {
    let _ = STORE.set(FeedStore::new(Some(dir)));
}

/// The controller's feed store (the default cache directory when none was set).
pub(super) fn store() -> FeedStore {
    STORE
        .get()
        .cloned()
        .unwrap_or_else(|| FeedStore::new(Some(PathBuf::from(feeds::DEFAULT_CACHE_DIR))))
}

/// How the fetches of one `url` feed go.
#[derive(Debug, Clone, Default)]
struct FetchState {
    last_success: Option<SystemTime>,
    last_error: Option<String>,
}

/// A fetch's outcome, for the controller's loop.
#[derive(Debug)]
pub(super) enum FeedNews {
    /// A good copy that differs from the cached one was stored: re-apply.
    Changed(String),
    /// The fetch failed or its copy was refused: report (the copy in force stays).
    Failed { name: String, error: String },
}

/// The fetchers of the policy in force's `url` feeds.
pub(super) struct Fetchers {
    state: Arc<Mutex<HashMap<String, FetchState>>>,
    tasks: Vec<(Blocklist, JoinHandle<()>)>,
    tx: mpsc::Sender<FeedNews>,
    client: Option<reqwest::Client>,
}

impl Fetchers {
    pub(super) fn new() -> (Fetchers, mpsc::Receiver<FeedNews>) {
        let (tx, rx) = mpsc::channel(64);
        (
            Fetchers {
                state: Arc::default(),
                tasks: Vec::new(),
                tx,
                client: None,
            },
            rx,
        )
    }

    /// Fetches the `url` feeds of `policy` (a fetcher each; those already running for the same
    /// blocklist go on, those no longer named stop).
    pub(super) fn follow(&mut self, policy: &Policy) {
        let wanted: Vec<&Blocklist> = policy
            .blocklists
            .iter()
            .filter(|b| matches!(b.source, FeedSource::Url(_)))
            .collect();
        self.tasks.retain(|(b, task)| {
            let keep = wanted.contains(&b) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for b in wanted {
            if self.tasks.iter().any(|(have, _)| have == b) {
                continue;
            }
            let client = match self.client() {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "blocklists: cannot build the HTTP client");
                    return;
                }
            };
            let task = tokio::spawn(fetch_loop(
                b.clone(),
                client,
                self.state.clone(),
                self.tx.clone(),
            ));
            self.tasks.push((b.clone(), task));
        }
    }

    fn client(&mut self) -> anyhow::Result<reqwest::Client> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = http_client(FETCH_TIMEOUT)?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// The feeds' statuses, `read` (as the policy in force read them) with the fetches since.
    pub(super) fn statuses(&self, read: &[FeedStatus]) -> Vec<FeedStatus> {
        let state = self.state.lock().expect("feed state lock");
        read.iter()
            .map(|s| {
                let mut s = s.clone();
                if let Some(f) = state.get(&s.name) {
                    if let Some(at) = f.last_success {
                        s.last_success = Some(humantime::format_rfc3339_seconds(at).to_string());
                    }
                    if f.last_success.is_some() || f.last_error.is_some() {
                        s.last_error = f.last_error.clone();
                    }
                }
                s
            })
            .collect()
    }
}

impl Drop for Fetchers {
    fn drop(&mut self) {
        for (_, t) in &self.tasks {
            t.abort();
        }
    }
}

/// The HTTP client: TLS trusting the bundled roots and the system's CA store (`SSL_CERT_FILE`,
/// `SSL_CERT_DIR`), as the webhook's.
fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context as _;
    reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("egress/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client (with the system's CA store)")
}

/// Fetches `url`: the body of a 2xx answer, at most [`MAX_BODY`] bytes.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("fetching {url}: {}", error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("fetching {url}: HTTP {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("fetching {url}: {}", error_chain(&e)))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            return Err(format!("fetching {url}: the body is over {MAX_BODY} bytes"));
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// One fetch of `b`, judged and (when good) stored. `Ok(true)`: the stored copy changed.
async fn fetch_once(client: &reqwest::Client, b: &Blocklist) -> Result<bool, String> {
    let FeedSource::Url(url) = &b.source else {
        return Ok(false);
    };
    let text = fetch(client, url).await?;
    let store = store();
    let (text, changed) = tokio::task::spawn_blocking({
        let b = b.clone();
        move || -> Result<(String, bool), String> {
            let cached = store.cached(&b);
            let last_good = cached
                .as_ref()
                .map(|(t, _)| feeds::parse(b.format, t).len());
            let read = feeds::parse(b.format, &text);
            feeds::check_copy(&text, &read, last_good)
                .map_err(|why| format!("{url}: {why}; the last good copy stays", url = b.source))?;
            let changed = cached.as_ref().is_none_or(|(t, _)| *t != text);
            store
                .store(&b, &text)
                .map_err(|e| format!("caching the copy of {}: {e}", b.source))?;
            Ok((
                if read.rejected > 0 {
                    read.rejects_text()
                } else {
                    String::new()
                },
                changed,
            ))
        }
    })
    .await
    .map_err(|e| format!("judging the copy: {e}"))??;
    if !text.is_empty() {
        warn!(blocklist = %b.name, "blocklist fetched with lines rejected: {text}");
    }
    Ok(changed)
}

async fn fetch_loop(
    b: Blocklist,
    client: reqwest::Client,
    state: Arc<Mutex<HashMap<String, FetchState>>>,
    tx: mpsc::Sender<FeedNews>,
) {
    loop {
        let outcome = fetch_once(&client, &b).await;
        let wait = {
            let mut st = state.lock().expect("feed state lock");
            let s = st.entry(b.name.clone()).or_default();
            match &outcome {
                Ok(_) => {
                    s.last_success = Some(SystemTime::now());
                    s.last_error = None;
                    b.refresh
                }
                Err(e) => {
                    s.last_error = Some(e.clone());
                    b.refresh.min(RETRY)
                }
            }
        };
        let news = match outcome {
            Ok(true) => Some(FeedNews::Changed(b.name.clone())),
            Ok(false) => None,
            Err(error) => Some(FeedNews::Failed {
                name: b.name.clone(),
                error,
            }),
        };
        if let Some(n) = news
            && tx.send(n).await.is_err()
        {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// Before the first policy is loaded: fetches, once and briefly, the `url` feeds of the policy
/// at `path` that have no cached copy yet, so that the start enforces them when their server
/// answers. Failures are logged; the start goes on.
pub(super) async fn prefetch(path: &std::path::Path) {
    // Most policies have no blocklist: they are not parsed twice (a large one takes a while).
    let Ok(files) = crate::policy::fragments::read(path) else {
        return; // The load proper reports the error.
    };
    if !files.iter().any(|f| f.text.contains("blocklist")) {
        return;
    }
    let Ok(policy) = Policy::from_fragments(&path.display().to_string(), &files) else {
        return;
    };
    let store = store();
    let missing: Vec<Blocklist> = policy
        .blocklists
        .into_iter()
        .filter(|b| matches!(b.source, FeedSource::Url(_)) && store.cached(b).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let client = match http_client(FIRST_FETCH_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "blocklists: cannot build the HTTP client");
            return;
        }
    };
    let fetches = missing.into_iter().map(|b| {
        let client = client.clone();
        async move {
            let outcome = fetch_once(&client, &b).await;
            (b, outcome)
        }
    });
    for (b, outcome) in futures_join(fetches).await {
        match outcome {
            Ok(_) => info!(blocklist = %b.name, source = %b.source, "blocklist fetched"),
            Err(e) => warn!(
                blocklist = %b.name,
                error = %e,
                "BLOCKLIST NOT ENFORCED: its feed was never fetched and no copy is cached; the controller starts without it and retries"
            ),
        }
    }
}

/// Runs the futures concurrently, results in order.
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// A `feed` event: a feed's copy was refused or could not be fetched or read, or a new copy was
/// applied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FeedEvent {
    pub ts: String,
    /// `"feed"`.
    pub event: String,
    #[serde(flatten, default)]
    pub meta: crate::events::EventMeta,
    /// The blocklist's name.
    pub blocklist: String,
    /// Its file or URL.
    pub source: String,
    /// `"updated"` (a new copy is in force) or `"failed"` (the copy in force stays).
    pub status: String,
    /// Entries in force after the event.
    pub entries: usize,
    /// What failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl crate::events::EventLine for FeedEvent {
    fn ecs(&self) -> crate::events::ecs::Document {
        let mut d =
            crate::events::ecs::Document::new(self, &self.ts, &self.meta, "event", &self.event);
        d.event.category = vec!["configuration"];
        d.event.type_ = vec!["change"];
        d.event.outcome = Some(if self.error.is_some() {
            "failure"
        } else {
            "success"
        });
        d.message = match &self.error {
            Some(e) => format!("blocklist {} ({}): {e}", self.blocklist, self.source),
            None => format!(
                "blocklist {} ({}) updated: {} entries",
                self.blocklist, self.source, self.entries
            ),
        };
        d
    }
}

impl Controller {
    /// The statuses of the policy in force's feeds, with the fetches since it was applied.
    pub(super) fn feed_statuses(&self) -> Vec<FeedStatus> {
        self.fetchers.statuses(&self.policy.policy.feeds)
    }

    /// Acts on a fetcher's news: re-applies the policy in force with the new copy, or reports
    /// the failure (the copy in force stays).
    pub(super) async fn feed_news(&mut self, news: FeedNews) {
        match news {
            FeedNews::Changed(name) => {
                info!(blocklist = %name, "blocklist feed changed: re-applying the policy");
                self.reapply_feeds(&name).await;
            }
            FeedNews::Failed { name, error } => {
                warn!(blocklist = %name, error = %error, "blocklist feed: the copy in force stays");
                self.feed_event(&name, "failed", Some(error)).await;
            }
        }
    }

    async fn feed_event(&mut self, name: &str, status: &str, error: Option<String>) {
        let Some(s) = self.policy.policy.feeds.iter().find(|s| s.name == name) else {
            return;
        };
        let event = FeedEvent {
            ts: crate::events::timestamp(SystemTime::now()),
            event: "feed".into(),
            meta: crate::events::EventMeta::current(),
            blocklist: name.to_string(),
            source: s.source.clone(),
            status: status.into(),
            entries: s.entries,
            error,
        };
        self.emit(&event).await;
    }

    /// The policy in force, its feeds read again, applied atomically (its own rules as they
    /// were: the policy file is not re-read).
    pub(super) async fn reapply_feeds(&mut self, why: &str) {
        if self.policy.unknown.is_some() {
            return;
        }
        let mut base = self.policy.policy.clone();
        base.rules.retain(|r| r.feed.is_none());
        base.warnings.retain(|w| !w.contains(": blocklist "));
        base.feeds.clear();
        let store = store();
        let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let policy = base.with_feeds(&store)?;
            let compiled = crate::policy::compile::CompiledPolicy::compile(&policy)?;
            Ok((policy, compiled))
        })
        .await;
        let (policy, compiled) = match loaded {
            Ok(Ok(pc)) => pc,
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "re-reading the blocklists failed; the policy in force is unchanged");
                return;
            }
            Err(e) => {
                warn!(error = %e, "re-reading the blocklists failed");
                return;
            }
        };
        let loaded = super::adopt::Loaded {
            origin: self.policy.origin.clone(),
            policy,
            compiled,
        };
        match self.apply(loaded, false).await {
            Ok(o) => {
                info!(
                    "blocklist {why}: {}",
                    o.message.lines().next().unwrap_or_default()
                );
                self.feed_event(why, "updated", None).await;
            }
            Err(e) => {
                warn!(error = %e, "applying the new blocklist copy failed; the policy in force is unchanged")
            }
        }
    }

    /// `--watch`: re-applies when a `file` feed's content changed (its size or time since the
    /// policy in force read it).
    pub(super) async fn watch_feeds(&mut self) {
        if file_stamps(&self.policy.policy) != self.feed_stamps {
            self.reapply_feeds("file changed").await;
            // Once per change, whether it applied or not.
            self.feed_stamps = file_stamps(&self.policy.policy);
        }
    }
}

/// The size and modification time of every `file` feed of `policy`.
pub(super) fn file_stamps(policy: &Policy) -> Vec<Option<(u64, SystemTime)>> {
    policy
        .blocklists
        .iter()
        .filter_map(|b| match &b.source {
            FeedSource::File(p) => Some(
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH))),
            ),
            FeedSource::Url(_) => None,
        })
        .collect()
}
