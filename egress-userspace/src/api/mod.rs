//! The control socket of a running controller (`/run/egress/control.sock` by default): the
//! protocol ([`Request`], [`Response`], versioned envelopes, one JSON object per line each way),
//! the server the controller runs ([`server`]) and the client the CLI uses ([`client`]). Only
//! root can use it (mode 0600 in a 0700 directory), unless `egress run --admin-group` lets a
//! group in (mode 0660): every request is then checked against the peer's credentials
//! (`crate::exceptions::authorize`).

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::report::{GrantRow, StatsReport, StatusReport};

pub const DEFAULT_SOCKET: &str = "/run/egress/control.sock";

/// Bumped whenever a request or response changes shape incompatibly. A peer speaking another
/// version is refused with a message saying so, never misread. Additions keep it: a new request
/// (an older controller answers it with a refusal naming the unknown request) and a new field
/// that may be absent (`#[serde(default)]`, so older peers' messages still read), so that the
/// CLI of an upgraded package still talks to the controller it replaced until that restarts.
pub const PROTOCOL_VERSION: u32 = 1;

/// What the CLI asks of the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Per-process totals (`egress stats`, `egress top`).
    Stats,
    /// Lift a byte-budget block (`egress unblock KEY`).
    Unblock { key: String },
    /// Re-read the policy, or switch to `policy`, and apply it atomically (`egress reload`).
    Reload {
        #[serde(default)]
        policy: Option<String>,
        #[serde(default)]
        dry_run: bool,
        /// Answer with [`Response::Reload`] (whether anything changes) rather than
        /// [`Response::Done`]; an older controller ignores it and answers `Done`.
        #[serde(default)]
        detail: bool,
    },
    /// Controller and enforcement state (`egress status`).
    Status,
    /// Exit the controller (`egress stop`, after it removed the pins).
    Stop,
    /// Live DNS grants (`egress grants`); `all`: also the names resolved that nothing approves.
    Grants {
        #[serde(default)]
        all: bool,
    },
    /// The events the controller keeps (`egress events`), answered by [`Response::Event`] lines
    /// and a closing [`Response::Done`]; with `follow`, then every later one until the client
    /// hangs up (and [`Response::Lagged`] when it fell behind), with no `Done`.
    Events {
        /// Also stream the events that come later.
        #[serde(default)]
        follow: bool,
        /// Only events of the last this many milliseconds (with `follow`, the backlog is
        /// sent only when this is given).
        #[serde(default)]
        since_ms: Option<u64>,
        /// `KEY=VALUE` conditions, all of which must hold (see `crate::feed::EventFilter`).
        #[serde(default)]
        filter: Vec<String>,
    },
    /// The text of the policy in force (`egress explain` without `--policy`).
    Policy,
    /// Grant a break-glass exception (`egress allow`), answered by [`Response::Exception`].
    /// Exactly one of `pid`, `cgroup`, `user`. Who asks is the socket peer's uid (SO_PEERCRED),
    /// never a field of the request.
    Allow {
        /// An address or CIDR.
        dest: String,
        /// A port or range (`443`, `8000-8080`); absent: every port.
        #[serde(default)]
        port: Option<String>,
        /// `tcp`, `udp`, `icmp`, `icmpv6`; absent: every protocol.
        #[serde(default)]
        protocol: Option<String>,
        #[serde(default)]
        pid: Option<u32>,
        /// A cgroup2 directory (absolute, or relative to the cgroup2 root).
        #[serde(default)]
        cgroup: Option<String>,
        /// A user name or uid.
        #[serde(default)]
        user: Option<String>,
        /// How long, in seconds.
        for_secs: u64,
        reason: String,
    },
    /// End break-glass exception `id` now (`egress revoke ID`).
    Revoke { id: u32 },
    /// The live break-glass exceptions (`egress grants`), answered by [`Response::Exceptions`].
    Exceptions,
}

/// The controller's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Stats(Box<StatsReport>),
    Status(Box<StatusReport>),
    Grants(Vec<GrantRow>),
    /// Done; what was done, for people.
    Done(String),
    /// One event line, as the events file has it (answers [`Request::Events`]).
    Event(String),
    /// This many events were dropped because the follower fell behind.
    Lagged(u64),
    /// The policy in force (answers [`Request::Policy`]).
    Policy(PolicyText),
    /// How a reload went or would go (answers [`Request::Reload`] with `detail`).
    Reload(crate::report::ReloadReport),
    /// Not done, and why.
    Refused(String),
    /// The exception granted (answers [`Request::Allow`]).
    Exception(Box<crate::exceptions::Exception>),
    /// The live break-glass exceptions (answers [`Request::Exceptions`]).
    Exceptions(Vec<crate::exceptions::Exception>),
}

/// The policy in force as text: its files as they read when it was applied (one, or the
/// fragments of a policy directory in the order they merge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyText {
    /// Where it comes from (a path, or the embedded default's name).
    pub source: String,
    /// Its content hash (as `egress status` shows it).
    pub hash: String,
    /// Each file's name and text.
    pub files: Vec<crate::policy::Fragment>,
    /// Where the controller keeps the last good copies of its blocklists' feeds (`url` feeds
    /// are read from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed_cache: Option<std::path::PathBuf>,
}

/// A request on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub version: u32,
    pub request: Request,
}

/// A response on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub version: u32,
    pub response: Response,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        for request in [
            Request::Stats,
            Request::Status,
            Request::Stop,
            Request::Grants { all: true },
            Request::Unblock {
                key: "process:7".into(),
            },
            Request::Reload {
                policy: Some("/etc/egress/p.toml".into()),
                dry_run: true,
                detail: true,
            },
            Request::Events {
                follow: true,
                since_ms: Some(300_000),
                filter: vec!["pid=7".into(), "rule=default".into()],
            },
            Request::Policy,
            Request::Allow {
                dest: "192.0.2.7".into(),
                port: Some("443".into()),
                protocol: Some("tcp".into()),
                pid: None,
                cgroup: Some("/sys/fs/cgroup/app".into()),
                user: None,
                for_secs: 900,
                reason: "ticket 123".into(),
            },
            Request::Revoke { id: 7 },
            Request::Exceptions,
        ] {
            let text = serde_json::to_string(&RequestEnvelope {
                version: PROTOCOL_VERSION,
                request: request.clone(),
            })
            .unwrap();
            let back: RequestEnvelope = serde_json::from_str(&text).unwrap();
            assert_eq!(back.request, request, "{text}");
        }
        let r = Response::Stats(Box::default());
        let text = serde_json::to_string(&ResponseEnvelope {
            version: PROTOCOL_VERSION,
            response: r.clone(),
        })
        .unwrap();
        assert_eq!(
            serde_json::from_str::<ResponseEnvelope>(&text)
                .unwrap()
                .response,
            r
        );
    }

    /// An older CLI's reload (no `detail`) still reads; an events request needs only its name.
    #[test]
    fn new_request_fields_may_be_absent() {
        let e: RequestEnvelope =
            serde_json::from_str(r#"{"version":1,"request":{"cmd":"reload","dry_run":true}}"#)
                .unwrap();
        assert_eq!(
            e.request,
            Request::Reload {
                policy: None,
                dry_run: true,
                detail: false
            }
        );
        let e: RequestEnvelope =
            serde_json::from_str(r#"{"version":1,"request":{"cmd":"events"}}"#).unwrap();
        assert_eq!(
            e.request,
            Request::Events {
                follow: false,
                since_ms: None,
                filter: vec![]
            }
        );
        let line = r#"{"event":"deny","pid":7}"#;
        let text = serde_json::to_string(&Response::Event(line.into())).unwrap();
        assert_eq!(text, r#"{"event":"{\"event\":\"deny\",\"pid\":7}"}"#);
    }

    /// The wire form of the grants request, as an older or newer peer writes it.
    #[test]
    fn the_grants_request_reads_with_and_without_all() {
        let e: RequestEnvelope =
            serde_json::from_str(r#"{"version":1,"request":{"cmd":"grants"}}"#).unwrap();
        assert_eq!(e.request, Request::Grants { all: false });
        let text = serde_json::to_string(&Request::Grants { all: true }).unwrap();
        assert_eq!(text, r#"{"cmd":"grants","all":true}"#);
    }
}
