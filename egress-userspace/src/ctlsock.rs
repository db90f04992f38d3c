//! The local control socket of a running controller (`/run/egress/control.sock` by default):
//! one JSON request per line, one JSON response per line. Only root can use it (mode 0600 in a
//! 0700 directory).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
};

use crate::{accounting::ProcTotals, datapath::Stats};

pub const DEFAULT_SOCKET: &str = "/run/egress/control.sock";

/// What `egress stats` shows, and what `egress exec --report` writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsReport {
    /// RFC 3339 time of the reading.
    pub generated_at: String,
    /// The policy in force.
    pub policy: String,
    pub mode: String,
    /// Per process, highest rate first, each with its destinations.
    pub processes: Vec<ProcTotals>,
    /// Datapath counters.
    pub counters: Stats,
    /// Deny (and audit) events by deciding rule, as received by this controller.
    pub denies_by_rule: BTreeMap<String, u64>,
    /// Alerts raised, by alert rule.
    #[serde(default)]
    pub alerts_by_rule: BTreeMap<String, u64>,
    /// Byte-budget blocks in force.
    #[serde(default)]
    pub blocks: Vec<BlockInfo>,
    /// The Prometheus series of this reading (label assignment kept stable by the controller).
    #[serde(skip)]
    pub series: crate::metrics::MetricSeries,
}

/// A byte-budget block in force.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BlockInfo {
    pub key: String,
    pub rule: String,
    pub until: String,
}

pub type SharedReport = Arc<Mutex<StatsReport>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Stats,
    /// Lift a byte-budget block (`egress unblock KEY`).
    Unblock {
        key: String,
    },
    /// Re-read the policy, or switch to `policy`, and apply it atomically (`egress reload`).
    Reload {
        #[serde(default)]
        policy: Option<String>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Controller and enforcement state (`egress status`).
    Status,
    /// Exit the controller (`egress stop`, after it removed the pins).
    Stop,
}

/// A request the controller's main loop must act on, with where to send the answer.
pub struct Command {
    pub request: Request,
    pub reply: tokio::sync::oneshot::Sender<Response>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<StatsReport>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            error: None,
            stats: None,
            message: Some(message.into()),
            status: None,
        }
    }
    pub fn err(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            stats: None,
            message: None,
            status: None,
        }
    }
}

/// Binds the socket: creates its directory (0700), refuses to steal the socket of a live
/// controller, replaces a stale one, and makes it 0600.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if dir == Path::new("/run/egress") {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another egress controller is running on {} (use --socket for a second one)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    report: SharedReport,
    commands: tokio::sync::mpsc::Sender<Command>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let report = report.clone();
        let commands = commands.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read.take(64 * 1024)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Stats) => Response {
                        ok: true,
                        error: None,
                        stats: Some(report.lock().expect("report lock").clone()),
                        message: None,
                        status: None,
                    },
                    Ok(request) => {
                        let (reply, answer) = tokio::sync::oneshot::channel();
                        if commands.send(Command { request, reply }).await.is_err() {
                            Response::err("the controller is shutting down")
                        } else {
                            answer.await.unwrap_or_else(|_| {
                                Response::err("the controller dropped the request")
                            })
                        }
                    }
                    Err(e) => Response::err(format!("bad request: {e}")),
                };
                let Ok(mut text) = serde_json::to_vec(&resp) else {
                    break;
                };
                text.push(b'\n');
                if write.write_all(&text).await.is_err() {
                    break;
                }
            }
        });
    }
}

use tokio::io::AsyncReadExt as _;

/// Sends one request to a running controller.
pub fn request(path: &Path, req: &Request) -> anyhow::Result<Response> {
    let stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the controller at {} (is `egress run` running? are you root?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = &stream;
    let mut text = serde_json::to_vec(req)?;
    text.push(b'\n');
    w.write_all(&text)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let resp: Response =
        serde_json::from_str(&line).with_context(|| format!("bad response: {line}"))?;
    if !resp.ok {
        bail!("controller refused: {}", resp.error.unwrap_or_default());
    }
    Ok(resp)
}

pub fn fetch_stats(path: &Path) -> anyhow::Result<StatsReport> {
    request(path, &Request::Stats)?
        .stats
        .context("response without stats")
}

pub fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
