//! The controller's side of the control socket: binds it safely, answers `stats` from the latest
//! published report, and hands every other request to the controller's loop.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot, watch},
};

use super::{PROTOCOL_VERSION, Request, RequestEnvelope, Response, ResponseEnvelope};
use crate::report::StatsReport;

/// A request the controller's loop must act on, with where to send the answer.
pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
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

/// The answer to one request line.
async fn answer(
    line: &str,
    stats: &watch::Receiver<Arc<StatsReport>>,
    commands: &mpsc::Sender<Command>,
) -> Response {
    let envelope = match serde_json::from_str::<RequestEnvelope>(line) {
        Ok(e) => e,
        Err(e) => return Response::Refused(format!("bad request: {e}")),
    };
    if envelope.version != PROTOCOL_VERSION {
        return Response::Refused(format!(
            "protocol version {} is not spoken here (this controller speaks {PROTOCOL_VERSION}): use the egress binary of the running controller",
            envelope.version
        ));
    }
    match envelope.request {
        Request::Stats => Response::Stats(Box::new(StatsReport::clone(&stats.borrow()))),
        request => {
            let (reply, answer) = oneshot::channel();
            if commands.send(Command { request, reply }).await.is_err() {
                return Response::Refused("the controller is shutting down".into());
            }
            answer
                .await
                .unwrap_or_else(|_| Response::Refused("the controller dropped the request".into()))
        }
    }
}

/// Serves requests until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    stats: watch::Receiver<Arc<StatsReport>>,
    commands: mpsc::Sender<Command>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let stats = stats.clone();
        let commands = commands.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read.take(64 * 1024)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = answer(&line, &stats, &commands).await;
                let envelope = ResponseEnvelope {
                    version: PROTOCOL_VERSION,
                    response,
                };
                let Ok(mut text) = serde_json::to_vec(&envelope) else {
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
