//! The CLI's side of the control socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{PROTOCOL_VERSION, Request, RequestEnvelope, Response, ResponseEnvelope};
use crate::report::{GrantRow, StatsReport, StatusReport};

/// How long a request waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reload waits: reading, compiling and applying a policy with large blocklists
/// (a million entries) takes seconds, more on a loaded host.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request to a running controller. A refusal is an error carrying its reason.
pub fn request(path: &Path, request: Request) -> anyhow::Result<Response> {
    request_within(path, request, ANSWER_TIMEOUT)
}

/// As [`request`], waiting at most `timeout` for the answer.
pub fn request_within(
    path: &Path,
    request: Request,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the controller at {} (is `egress run` running? are you root?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut text = serde_json::to_vec(&RequestEnvelope {
        version: PROTOCOL_VERSION,
        request,
    })?;
    text.push(b'\n');
    (&stream).write_all(&text)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow::anyhow!(
                "the controller at {} did not answer within {} s",
                path.display(),
                timeout.as_secs()
            ),
            _ => anyhow::Error::new(e).context("reading the controller's answer"),
        })?;
    let envelope: ResponseEnvelope =
        serde_json::from_str(&line).with_context(|| format!("bad response: {line}"))?;
    if envelope.version != PROTOCOL_VERSION {
        bail!(
            "the controller speaks protocol version {}, this egress speaks {PROTOCOL_VERSION}: use the egress binary of the running controller",
            envelope.version
        );
    }
    match envelope.response {
        Response::Refused(why) => bail!("controller refused: {why}"),
        r => Ok(r),
    }
}

/// What the controller did, for a request answered with [`Response::Done`].
pub fn done(path: &Path, req: Request) -> anyhow::Result<String> {
    match request(path, req)? {
        Response::Done(message) => Ok(message),
        other => bail!("unexpected response: {other:?}"),
    }
}

pub fn stats(path: &Path) -> anyhow::Result<StatsReport> {
    match request(path, Request::Stats)? {
        Response::Stats(s) => Ok(*s),
        other => bail!("unexpected response to stats: {other:?}"),
    }
}

pub fn status(path: &Path) -> anyhow::Result<StatusReport> {
    match request(path, Request::Status)? {
        Response::Status(s) => Ok(*s),
        other => bail!("unexpected response to status: {other:?}"),
    }
}

/// Live DNS grants; `all`: also the names resolved that nothing approves.
pub fn grants(path: &Path, all: bool) -> anyhow::Result<Vec<GrantRow>> {
    match request(path, Request::Grants { all })? {
        Response::Grants(g) => Ok(g),
        other => bail!("unexpected response to grants: {other:?}"),
    }
}

/// Grants a break-glass exception (a [`Request::Allow`]); the exception as recorded.
pub fn allow(path: &Path, req: Request) -> anyhow::Result<crate::exceptions::Exception> {
    match request(path, req)? {
        Response::Exception(e) => Ok(*e),
        other => bail!("unexpected response to allow: {other:?}"),
    }
}

/// The live break-glass exceptions.
pub fn exceptions(path: &Path) -> anyhow::Result<Vec<crate::exceptions::Exception>> {
    match request(path, Request::Exceptions)? {
        Response::Exceptions(e) => Ok(e),
        other => bail!("unexpected response to exceptions: {other:?}"),
    }
}

/// Reloads (or with `dry_run` describes a reload): what was done and whether enforcement
/// changes. A controller older than the `detail` field answers `Done`: `changed` is then None.
pub fn reload(
    path: &Path,
    policy: Option<String>,
    dry_run: bool,
) -> anyhow::Result<crate::report::ReloadReport> {
    let request = Request::Reload {
        policy,
        dry_run,
        detail: true,
    };
    match super::client::request_within(path, request, RELOAD_TIMEOUT)? {
        Response::Reload(r) => Ok(r),
        Response::Done(message) => Ok(crate::report::ReloadReport {
            dry_run,
            changed: None,
            message,
        }),
        other => bail!("unexpected response to reload: {other:?}"),
    }
}

/// The text of the policy in force.
pub fn policy(path: &Path) -> anyhow::Result<super::PolicyText> {
    match request(path, Request::Policy)? {
        Response::Policy(p) => Ok(p),
        other => bail!("unexpected response to policy: {other:?}"),
    }
}

/// What an `events` stream brings.
pub enum Streamed {
    /// One event line.
    Event(String),
    /// This many events were lost: the follower fell behind.
    Lagged(u64),
}

/// Streams the controller's events to `each` until the controller says it is done (without
/// `follow`), `each` says stop (false), or the connection ends (an error while following: the
/// controller went away).
pub fn events(
    path: &Path,
    request: Request,
    mut each: impl FnMut(Streamed) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the controller at {} (is `egress run` running? are you root?)",
            path.display()
        )
    })?;
    let mut text = serde_json::to_vec(&RequestEnvelope {
        version: PROTOCOL_VERSION,
        request,
    })?;
    text.push(b'\n');
    (&stream).write_all(&text)?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!(
                "the controller at {} closed the stream (it stopped)",
                path.display()
            );
        }
        let envelope: ResponseEnvelope =
            serde_json::from_str(&line).with_context(|| format!("bad response: {line}"))?;
        if envelope.version != PROTOCOL_VERSION {
            bail!(
                "the controller speaks protocol version {}, this egress speaks {PROTOCOL_VERSION}: use the egress binary of the running controller",
                envelope.version
            );
        }
        let more = match envelope.response {
            Response::Event(e) => each(Streamed::Event(e))?,
            Response::Lagged(n) => each(Streamed::Lagged(n))?,
            Response::Done(_) => return Ok(()),
            Response::Refused(why) => bail!("controller refused: {why}"),
            other => bail!("unexpected response to events: {other:?}"),
        };
        if !more {
            return Ok(());
        }
    }
}
