//! `egress events`: the running controller's events, kept or live (`--follow`), filtered
//! (`--filter`), as JSON lines or one readable line each.

use std::{io::Write as _, path::Path, time::Duration};

use super::{Output, display};
use crate::{
    api::{
        Request,
        client::{self, Streamed},
    },
    exit::UsageError,
    feed::EventFilter,
};

pub fn events(
    socket: &Path,
    follow: bool,
    since: Option<Duration>,
    filter: &[String],
    output: Output,
) -> anyhow::Result<()> {
    // Checked here too, so that a typo is a usage error before anything is asked.
    EventFilter::parse(filter).map_err(|e| UsageError(e.to_string()))?;
    let request = Request::Events {
        follow,
        since_ms: since.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        filter: filter.to_vec(),
    };
    let mut out = std::io::stdout().lock();
    client::events(socket, request, |item| {
        let line = match item {
            Streamed::Event(line) => match output {
                Output::Json => line,
                Output::Text => display::event_line(&line),
            },
            Streamed::Lagged(n) => {
                eprintln!(
                    "egress: {n} events dropped: this follower fell behind (the controller does not wait for followers)"
                );
                return Ok(true);
            }
        };
        // A closed stdout (`| head`) ends the stream quietly.
        Ok(writeln!(out, "{line}").and_then(|()| out.flush()).is_ok())
    })
}
