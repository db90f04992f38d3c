//! What the proxy did, counted: queries by transport, answers by kind, and every limit hit.
//! Relaxed atomics: each counter is read on its own (by status and metrics, later).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The proxy's live counters.
        #[derive(Debug, Default)]
        pub struct DnsCounters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A snapshot of [`DnsCounters`].
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct DnsStats {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl DnsCounters {
            pub fn snapshot(&self) -> DnsStats {
                DnsStats {
                    $($name: self.$name.load(Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Queries received over UDP.
    queries_udp,
    /// Queries received over TCP.
    queries_tcp,
    /// Queries forwarded to an upstream (at least one attempt).
    forwarded,
    /// Answers relayed from an upstream.
    relayed,
    /// Queries answered as blocked: a block covers the name.
    blocked,
    /// Answers replaced by a blocked answer: a block covers a CNAME target.
    blocked_target,
    /// Queries answered as blocked because nothing covers the name (`unlisted = "refuse"`).
    refused_unlisted,
    /// Queries answered as blocked: a DNS alert's block covers the asker and the domain.
    refused_tunnel,
    /// Queries the DNS alerts could not count: the asking socket has no owner (not enforced).
    tunnel_unknown_asker,
    /// Grants recorded by the sink.
    grants,
    /// Grants the sink failed (answered SERVFAIL).
    grant_failures,
    /// Queries no upstream answered in time or at all (answered SERVFAIL).
    upstream_failures,
    /// Upstream attempts that failed (timeout, error, SERVFAIL/REFUSED), the next upstream tried.
    upstream_retries,
    /// UDP answers the upstream truncated, asked again over TCP.
    upstream_truncated,
    /// Datagrams from the upstream that did not answer the question asked (ID, question), ignored.
    upstream_mismatched,
    /// Replies too big for a UDP client, sent truncated (TC) so that it asks over TCP.
    client_truncated,
    /// Queries the proxy could not read (FORMERR, or dropped without a header).
    malformed,
    /// Queries refused because `max_in_flight` were being answered (SERVFAIL).
    limit_in_flight,
    /// TCP connections closed at once because `max_tcp_clients` were open.
    limit_tcp_clients,
    /// Answers with more addresses than `max_addresses` (the rest relayed, not granted).
    limit_addresses,
    /// Addresses left out of grants as never granted (loopback, link-local, ...).
    addresses_never_granted,
}

impl DnsCounters {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
