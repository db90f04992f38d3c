//! The controller's side of the control socket: binds it safely, answers `stats` from the latest
//! published report and `events` from the event feed (streamed by the connection's own task, so
//! that a follower never holds up the controller), and hands every other request to the
//! controller's loop.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot, watch},
};

use super::{PROTOCOL_VERSION, Request, RequestEnvelope, Response, ResponseEnvelope};
use crate::{
    feed::{EventFilter, Feed},
    report::StatsReport,
};

/// A request the controller's loop must act on, with where to send the answer.
pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
    /// Who asked: the socket peer's credentials, from the kernel.
    pub caller: Caller,
}

/// The credentials of a control-socket peer (SO_PEERCRED), as the kernel gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<u32>,
}

/// Binds the socket: creates its directory (0700), refuses to steal the socket of a live
/// controller, replaces a stale one, and makes it 0600. With an admin group (`--admin-group`),
/// the socket is 0660 and its directory 0710, both of that group, so that its members can
/// connect (what each may ask is checked per request, [`crate::exceptions::authorize`]).
pub fn bind(path: &Path, admin_gid: Option<u32>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(gid) = admin_gid {
            // The directory must hold nothing else a group member should not reach: /run/egress,
            // or a directory of its own.
            std::os::unix::fs::chown(dir, Some(0), Some(gid))
                .with_context(|| format!("giving {} to the admin group", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))?;
        } else if dir == Path::new("/run/egress") {
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
    match admin_gid {
        Some(gid) => {
            std::os::unix::fs::chown(path, Some(0), Some(gid))
                .with_context(|| format!("giving {} to the admin group", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        }
        None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?,
    }
    Ok(listener)
}

/// The request of one line, or the refusal to answer it with.
fn read_request(line: &str) -> Result<Request, Response> {
    let envelope = serde_json::from_str::<RequestEnvelope>(line)
        .map_err(|e| Response::Refused(format!("bad request: {e}")))?;
    if envelope.version != PROTOCOL_VERSION {
        return Err(Response::Refused(format!(
            "protocol version {} is not spoken here (this controller speaks {PROTOCOL_VERSION}): use the egress binary of the running controller",
            envelope.version
        )));
    }
    Ok(envelope.request)
}

/// The answer to one request (but `events`).
async fn answer(
    request: Request,
    caller: Caller,
    stats: &watch::Receiver<Arc<StatsReport>>,
    commands: &mpsc::Sender<Command>,
) -> Response {
    match request {
        Request::Stats => Response::Stats(Box::new(StatsReport::clone(&stats.borrow()))),
        request => {
            let (reply, answer) = oneshot::channel();
            let command = Command {
                request,
                reply,
                caller,
            };
            if commands.send(command).await.is_err() {
                return Response::Refused("the controller is shutting down".into());
            }
            answer
                .await
                .unwrap_or_else(|_| Response::Refused("the controller dropped the request".into()))
        }
    }
}

/// Writes one response line; false when the client is gone.
async fn send<W: tokio::io::AsyncWrite + Unpin>(write: &mut W, response: Response) -> bool {
    let envelope = ResponseEnvelope {
        version: PROTOCOL_VERSION,
        response,
    };
    let Ok(mut text) = serde_json::to_vec(&envelope) else {
        return false;
    };
    text.push(b'\n');
    write.write_all(&text).await.is_ok()
}

/// `egress events`: the kept events that pass the filter (those of the last `since_ms` when
/// given), then `Done`; with `follow`, the backlog only when `since_ms` is given, then every
/// later event until the client hangs up. A follower that falls behind is told how many it lost.
async fn stream_events<R, W>(
    feed: &Feed,
    follow: bool,
    since_ms: Option<u64>,
    filter: &[String],
    read: &mut R,
    write: &mut W,
) where
    R: tokio::io::AsyncBufRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let filter = match EventFilter::parse(filter) {
        Ok(f) => f,
        Err(e) => {
            send(write, Response::Refused(e.to_string())).await;
            return;
        }
    };
    let since = since_ms.map(|ms| SystemTime::now() - Duration::from_millis(ms));
    let (backlog, mut live) = feed.subscribe();
    let mut sent = 0usize;
    if !follow || since.is_some() {
        for item in backlog {
            if since.is_none_or(|s| item.at >= s) && filter.matches_line(&item.line) {
                if !send(write, Response::Event(item.line.to_string())).await {
                    return;
                }
                sent += 1;
            }
        }
    }
    if !follow {
        send(
            write,
            Response::Done(format!(
                "{sent} events (the controller keeps the last {})",
                crate::feed::RECENT
            )),
        )
        .await;
        return;
    }
    let mut rest = Vec::new();
    loop {
        tokio::select! {
            r = live.recv() => {
                let response = match r {
                    Ok(item) if filter.matches_line(&item.line) => Response::Event(item.line.to_string()),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Response::Lagged(n),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if !send(write, response).await {
                    return;
                }
            }
            // The client hung up (or wrote something: a follower only listens).
            _ = read.read_until(b'\n', &mut rest) => return,
        }
    }
}

/// Whether process `pid` (a socket peer) has group `gid`, as its primary or a supplementary
/// group (`Groups:` of /proc/PID/status).
fn has_group(caller: &Caller, gid: u32) -> bool {
    if caller.gid == gid {
        return true;
    }
    let Some(pid) = caller.pid else { return false };
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
    })
}

/// Serves requests until the task is dropped. Every request is checked against the peer's
/// credentials (SO_PEERCRED, read once per connection): root may ask anything, members of
/// `admin_gid` what [`crate::exceptions::authorize`] lets them, anyone else nothing.
pub async fn serve(
    listener: UnixListener,
    stats: watch::Receiver<Arc<StatsReport>>,
    commands: mpsc::Sender<Command>,
    feed: Arc<Feed>,
    admin_gid: Option<u32>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // No credentials, no answers (fail closed): the peer is treated as nobody.
        let caller = match stream.peer_cred() {
            Ok(c) => Caller {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid().and_then(|p| u32::try_from(p).ok()),
            },
            Err(_) => Caller {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            },
        };
        let admin = caller.uid != 0 && admin_gid.is_some_and(|g| has_group(&caller, g));
        let stats = stats.clone();
        let commands = commands.clone();
        let feed = feed.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut read = tokio::io::BufReader::new(read.take(64 * 1024));
            let mut line = String::new();
            loop {
                line.clear();
                match read.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let request = read_request(&line).and_then(|r| {
                    crate::exceptions::authorize(&r, caller.uid, admin)
                        .map(|()| r)
                        .map_err(|why| {
                            tracing::warn!(uid = caller.uid, pid = ?caller.pid, "control socket: {why}");
                            Response::Refused(why)
                        })
                });
                let response = match request {
                    Ok(Request::Events {
                        follow,
                        since_ms,
                        filter,
                    }) => {
                        stream_events(&feed, follow, since_ms, &filter, &mut read, &mut write)
                            .await;
                        break;
                    }
                    Ok(request) => answer(request, caller, &stats, &commands).await,
                    Err(refusal) => refusal,
                };
                if !send(&mut write, response).await {
                    break;
                }
            }
        });
    }
}
