//! Forwarding a query to the upstreams: each attempt on a socket of its own (a fresh source port
//! and a fresh random ID per exchange, as hickory's own client does "to avoid potential cache
//! poisoning"), marked with [`UPSTREAM_MARK`](super::UPSTREAM_MARK) so that the kernel steering
//! leaves it alone.
//!
//! - A UDP answer is taken only from the upstream the socket is connected to (the kernel drops
//!   other sources) and only when it answers the question asked with the ID sent; anything else
//!   is counted and ignored, and the wait goes on.
//! - A truncated (TC) UDP answer is asked again over TCP to the same upstream. A query that came
//!   over TCP goes over TCP.
//! - An upstream that times out, fails, or answers SERVFAIL, REFUSED or NOTIMP is followed by the
//!   next one (as glibc moves on); when all fail, the last answer there was is relayed, else the
//!   query fails (SERVFAIL). Every attempt fits in the query's overall deadline.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use hickory_proto::op::{Message, Query, ResponseCode};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
    time::{Instant, timeout_at},
};

use super::{ProxyConfig, counters::DnsCounters, message};

/// A reply from an upstream: its bytes (as received, ID included) and a parsed copy.
pub(super) struct Answer {
    pub bytes: Vec<u8>,
    pub message: Message,
}

/// Why a query got no answer at all.
#[derive(Debug, thiserror::Error)]
pub(super) enum ForwardError {
    #[error("no upstream to ask")]
    NoUpstream,
    #[error("no upstream answered within the query's deadline")]
    Deadline,
    #[error("every upstream failed; the last: {0}")]
    Failed(String),
}

/// What one query sends.
pub(super) struct Request<'a> {
    /// The client's query as parsed (its question is what answers must match).
    pub query: &'a Message,
    /// The client's bytes, relayed with a fresh ID.
    pub bytes: &'a [u8],
    pub question: &'a Query,
    /// Ask over TCP from the start (the client asked over TCP).
    pub tcp: bool,
}

/// Asks `upstreams` in order until one answers (see the module documentation).
pub(super) async fn forward(
    config: &ProxyConfig,
    upstreams: &[SocketAddr],
    req: &Request<'_>,
    counters: &DnsCounters,
) -> Result<Answer, ForwardError> {
    if upstreams.is_empty() {
        return Err(ForwardError::NoUpstream);
    }
    let deadline = Instant::now() + config.query_timeout;
    let mut last_answer: Option<Answer> = None;
    let mut last_error = String::new();
    for &upstream in upstreams {
        if Instant::now() >= deadline {
            break;
        }
        let attempt_end = deadline.min(Instant::now() + config.attempt_timeout);
        match attempt(config, upstream, req, attempt_end, counters).await {
            Ok(answer) => {
                let rcode = answer.message.metadata.response_code;
                if matches!(
                    rcode,
                    ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp
                ) {
                    DnsCounters::bump(&counters.upstream_retries);
                    last_error = format!("{upstream}: {rcode}");
                    last_answer = Some(answer);
                    continue;
                }
                return Ok(answer);
            }
            Err(e) => {
                DnsCounters::bump(&counters.upstream_retries);
                tracing::debug!(%upstream, error = %e, "upstream attempt failed");
                last_error = format!("{upstream}: {e}");
            }
        }
    }
    match last_answer {
        Some(a) => Ok(a),
        None if Instant::now() >= deadline => Err(ForwardError::Deadline),
        None => Err(ForwardError::Failed(last_error)),
    }
}

/// One upstream: UDP then TCP on truncation, or TCP alone.
async fn attempt(
    config: &ProxyConfig,
    upstream: SocketAddr,
    req: &Request<'_>,
    end: Instant,
    counters: &DnsCounters,
) -> io::Result<Answer> {
    if !req.tcp {
        let answer = udp_exchange(config, upstream, req, end, counters).await?;
        if !answer.message.metadata.truncation {
            return Ok(answer);
        }
        DnsCounters::bump(&counters.upstream_truncated);
    }
    tcp_exchange(config, upstream, req, end).await
}

/// A socket of the upstream's family, marked, non-blocking, bound to an ephemeral port.
fn marked_socket(upstream: SocketAddr, ty: Type, mark: Option<u32>) -> io::Result<Socket> {
    let protocol = if ty == Type::DGRAM {
        Protocol::UDP
    } else {
        Protocol::TCP
    };
    let socket = Socket::new(Domain::for_address(upstream), ty, Some(protocol))?;
    if let Some(mark) = mark {
        socket.set_mark(mark).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "setting SO_MARK {mark:#x} on an upstream socket (needs CAP_NET_ADMIN): {e}"
                ),
            )
        })?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no answer in time")
}

async fn udp_exchange(
    config: &ProxyConfig,
    upstream: SocketAddr,
    req: &Request<'_>,
    end: Instant,
    counters: &DnsCounters,
) -> io::Result<Answer> {
    let socket = marked_socket(upstream, Type::DGRAM, config.upstream_mark)?;
    let any: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&any.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(upstream).await?;
    let id: u16 = rand::random();
    let bytes = message::upstream_query(req.bytes, req.query, id);
    timeout_at(end, socket.send(&bytes))
        .await
        .map_err(|_| timed_out())??;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = timeout_at(end, socket.recv(&mut buf))
            .await
            .map_err(|_| timed_out())??;
        match Message::from_vec(&buf[..n]) {
            Ok(m) if m.metadata.id == id && message::answers_question(&m, req.question) => {
                return Ok(Answer {
                    bytes: buf[..n].to_vec(),
                    message: m,
                });
            }
            _ => DnsCounters::bump(&counters.upstream_mismatched),
        }
    }
}

async fn tcp_exchange(
    config: &ProxyConfig,
    upstream: SocketAddr,
    req: &Request<'_>,
    end: Instant,
) -> io::Result<Answer> {
    let socket = marked_socket(upstream, Type::STREAM, config.upstream_mark)?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let mut stream: TcpStream = timeout_at(end, socket.connect(upstream))
        .await
        .map_err(|_| timed_out())??;
    let id: u16 = rand::random();
    let bytes = message::upstream_query(req.bytes, req.query, id);
    let framed = frame(&bytes)?;
    let exchange = async {
        stream.write_all(&framed).await?;
        let len = usize::from(stream.read_u16().await?);
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        Ok::<_, io::Error>(buf)
    };
    let buf = timeout_at(end, exchange).await.map_err(|_| timed_out())??;
    match Message::from_vec(&buf) {
        Ok(m) if m.metadata.id == id && message::answers_question(&m, req.question) => Ok(Answer {
            bytes: buf,
            message: m,
        }),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the TCP answer does not answer the question asked",
        )),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
    }
}

/// A message with its two-byte length prefix (RFC 1035 §4.2.2).
pub(super) fn frame(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    Ok(framed)
}

/// How long a TCP client may take to send a whole query once it began one.
pub(super) const TCP_READ_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_sockets_carry_the_mark_or_say_why_not() {
        let upstream: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let mark = super::super::UPSTREAM_MARK;
        for ty in [Type::DGRAM, Type::STREAM] {
            match marked_socket(upstream, ty, Some(mark)) {
                Ok(s) => assert_eq!(s.mark().unwrap(), mark),
                // Without CAP_NET_ADMIN (tests run unprivileged too): the error says so.
                Err(e) => assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}"),
            }
            let s = marked_socket(upstream, ty, None).unwrap();
            assert_eq!(s.mark().unwrap(), 0);
        }
    }

    #[test]
    fn frames_carry_the_length() {
        assert_eq!(frame(&[1, 2, 3]).unwrap(), [0, 3, 1, 2, 3]);
        assert!(frame(&vec![0; 65_536]).is_err());
    }
}
