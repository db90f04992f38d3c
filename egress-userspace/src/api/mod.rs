//! The control socket of a running controller (`/run/egress/control.sock` by default): the
//! protocol ([`Request`], [`Response`], versioned envelopes, one JSON object per line each way),
//! the server the controller runs ([`server`]) and the client the CLI uses ([`client`]). Only
//! root can use it (mode 0600 in a 0700 directory).

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
    /// Not done, and why.
    Refused(String),
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
            },
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
