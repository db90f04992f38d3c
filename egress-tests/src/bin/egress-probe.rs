//! egress-probe: tries outbound calls and prints, per call, one JSON line with the result.
//! A diagnostic for users ("is this destination allowed from here?") and the client that the
//! kernel and end-to-end tests drive. The lines are the types of `egress_tests::probe`.
//! (Over 500 lines: one tool, its operations and their socket-level plumbing.)

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{CommandFactory as _, Parser, error::ErrorKind};
use egress_tests::probe::{CallLine, StormReport, SummaryLine, Verdict};

const OPS: &str = "\
Calls (OP ADDR:PORT [ARGS]), run in order:
  tcp ADDR:PORT                   TCP connect
  udp-connect ADDR:PORT           connected UDP: connect, then send
  udp-sendto ADDR:PORT            unconnected UDP: one sendto
  udp-connect-cmsg ADDR:PORT [--then PATH]
                                  connected UDP, then a sendmsg with a cmsg (IP_TOS or
                                  IPV6_TCLASS) and no address; with --then PATH, after the
                                  connect create PATH.connected and wait for PATH before sending
  udp-lsrr ADDR:PORT              setsockopt(IP_OPTIONS) with a loose source route via ADDR,
                                  then one datagram
  udp-lsrr-cmsg ADDR:PORT         one datagram carrying the same source route as an
                                  IP_RETOPTS cmsg
  setsockopt-large                setsockopt(IP_FREEBIND) with an 8 KiB buffer (the kernel reads
                                  4 bytes): larger than the page a sockopt hook sees
  udp-rthdr [ADDR]:PORT           setsockopt(IPV6_RTHDR) with a segment routing header (type 4)
                                  via ADDR, then one datagram
  socket KIND                     create one socket: raw4, raw6 (SOCK_RAW), ping4, ping6 (ping
                                  sockets), udplite, mptcp, sctp, packet (AF_PACKET)
  ping ADDR:PORT                  one ICMP echo request through an unconnected ping socket
  ping-laundered ADDR:PORT        the same through a ping socket first connected to loopback
                                  (an owner recorded), then disconnected (AF_UNSPEC)
  tcp-send ADDR:PORT BYTES        connect, write BYTES, shut down, wait for the peer to close
  udp-send ADDR:PORT COUNT SIZE   COUNT unconnected datagrams of SIZE payload bytes
  raw-udp ADDR:PORT               one IPv4 UDP datagram through a raw socket (no cgroup hook
                                  sees it)
  packet-udp ADDR:PORT HOW        one IPv4 UDP datagram in an Ethernet frame (broadcast MAC)
                                  through an AF_PACKET socket on the first non-loopback
                                  interface; HOW: ip (sent as ETH_P_IP), alien (the socket's
                                  protocol says 0x1234, the frame carries IPv4), bypass
                                  (PACKET_QDISC_BYPASS)
  dns-udp ADDR:PORT               unconnected UDP: sendto a query-sized datagram, wait for the
                                  answer; the line's \"from\" is where it came from
  dns-udp-connected ADDR:PORT     the same on a connected socket (send, recvfrom); \"peer\" is
                                  getpeername
  dns-udp-marked ADDR:PORT        dns-udp on a socket with SO_MARK 0x65677273 (the proxy's mark)
  dns-tcp ADDR:PORT               TCP: connect, one length-prefixed message, read the answer;
                                  \"peer\" is getpeername
  tcp-send-close ADDR:PORT BYTES  connect, write BYTES, close at once: the kernel sends what is
                                  still in the send buffer after close()
  hold tcp|udp ADDR:PORT N        open N sockets connected to ADDR:PORT (UDP: connect only, no
                                  datagram) and keep them open until `release` or the end;
                                  prints one summary line
  release                         close every held socket
  held-send BYTES                 write BYTES on the first held TCP socket, shut it down, wait
                                  for the peer to close
  flood ADDR:PORT N               N short-lived UDP sockets: socket, connect twice (no
                                  datagram), close; prints one summary line
  tcp-fastopen ADDR:PORT          sendto(MSG_FASTOPEN) with data on a fresh TCP socket: the connect
                                  and the first data in one call
  resolve NAME:PORT               getaddrinfo(NAME) through the C library (its resolv.conf), then
                                  a TCP connect to the first address; \"from\" is that address.
                                  A name that does not resolve: EAI_NONAME, EAI_AGAIN or EAI_FAIL
  dns-query NAME SERVER:PORT      one DNS query (A, or AAAA for a name starting with \"v6.\") over
                                  connected UDP to SERVER; \"from\" is the first address of the answer;
                                  NXDOMAIN, SERVFAIL, REFUSED: the rcode; NODATA: no address
  dns-tunnel DOMAIN SERVER:PORT N QTYPE udp|tcp
                                  N queries shaped like a DNS tunnel's: base32 chunks of a
                                  payload as subdomains, `<b32>.<i>.DOMAIN`, of type QTYPE (A,
                                  AAAA, TXT, NULL, CNAME, MX), one after another, each on a new
                                  socket; prints one summary line of the rcodes (\"ok\": NOERROR)
  resolve-only NAME               getaddrinfo(NAME) only; \"from\" is the first address
  send-fd FD                      write one datagram/segment to inherited descriptor FD
  sleep MS | wait-file PATH       pause (for tests that act between two calls)
  fork CALLS... end               fork a child process that makes CALLS (its lines carry its own
                                  pid) and exits; the parent goes on at once (forks nest)
  wait-children                   wait until every child forked so far has exited
  thread CALLS... end             make CALLS in a new thread of this process, and wait for it
  storm ALLOWED DENIED MS         for MS milliseconds, alternate UDP connects to an address
                                  that must pass and one that must be denied; print the counts:
                                  only EPERM counts as denied, other errors are counted apart

The result is \"ok\" or the errno name: EPERM is a policy deny; ECONNREFUSED means the connect
passed the firewall and reached a closed port.";

/// Tries outbound calls and prints one JSON line per call with its result.
#[derive(Parser, Debug)]
#[command(name = "egress-probe", after_help = OPS)]
struct Cli {
    /// Join this cgroup2 directory first (sockets belong to the cgroup they are made in).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// Repeat each call N times and print one summary line per call instead.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// I/O timeout of tcp-send, in seconds.
    #[arg(long, value_name = "S", default_value_t = 30)]
    timeout: u64,
    /// Pace tcp-send at about BPS bytes per second (default: as fast as possible).
    #[arg(long, value_name = "BPS")]
    rate: Option<u64>,
    /// End a storm early once FILE exists (checked every 1,000 rounds).
    #[arg(long, value_name = "FILE", env = "EGRESS_PROBE_STOP")]
    stop_file: Option<PathBuf>,
    /// The calls: OP ADDR:PORT [ARGS], one after another (see below).
    #[arg(
        value_name = "OP ADDR:PORT [ARGS]",
        required = true,
        trailing_var_arg = true,
        num_args = 1..
    )]
    calls: Vec<String>,
}

/// One call, parsed.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Tcp(SocketAddr),
    UdpConnect(SocketAddr),
    UdpSendto(SocketAddr),
    UdpConnectCmsg(SocketAddr, Option<PathBuf>),
    UdpLsrr(SocketAddr),
    UdpLsrrCmsg(SocketAddr),
    UdpRthdr(SocketAddr),
    Socket(String),
    SetsockoptLarge,
    Ping(SocketAddr),
    PingLaundered(SocketAddr),
    TcpSend(SocketAddr, u64),
    UdpSend(SocketAddr, u64, u64),
    RawUdp(SocketAddr),
    PacketUdp(SocketAddr, String),
    SendFd(i32),
    Resolve(String, Option<u16>),
    TcpFastOpen(SocketAddr),
    DnsQuery(String, SocketAddr),
    DnsTunnel {
        domain: String,
        server: SocketAddr,
        n: u64,
        qtype: u16,
        tcp: bool,
    },
    TcpSendClose(SocketAddr, u64),
    Hold(HoldKind, SocketAddr, u64),
    Release,
    HeldSend(u64),
    Flood(SocketAddr, u64),
    Dns(SocketAddr, DnsHow),
    Sleep(u64),
    WaitFile(PathBuf),
    Storm {
        allowed: SocketAddr,
        denied: SocketAddr,
        ms: u64,
    },
    Fork(Vec<Call>),
    WaitChildren,
    Thread(Vec<Call>),
}

impl Call {
    fn op(&self) -> &'static str {
        match self {
            Call::Tcp(_) => "tcp",
            Call::UdpConnect(_) => "udp-connect",
            Call::UdpSendto(_) => "udp-sendto",
            Call::UdpConnectCmsg(..) => "udp-connect-cmsg",
            Call::UdpLsrr(_) => "udp-lsrr",
            Call::UdpLsrrCmsg(_) => "udp-lsrr-cmsg",
            Call::UdpRthdr(_) => "udp-rthdr",
            Call::Socket(_) => "socket",
            Call::SetsockoptLarge => "setsockopt-large",
            Call::Ping(_) => "ping",
            Call::PingLaundered(_) => "ping-laundered",
            Call::TcpSend(..) => "tcp-send",
            Call::UdpSend(..) => "udp-send",
            Call::RawUdp(_) => "raw-udp",
            Call::PacketUdp(..) => "packet-udp",
            Call::SendFd(_) => "send-fd",
            Call::Resolve(_, Some(_)) => "resolve",
            Call::Resolve(_, None) => "resolve-only",
            Call::DnsQuery(..) => "dns-query",
            Call::DnsTunnel { .. } => "dns-tunnel",
            Call::TcpFastOpen(_) => "tcp-fastopen",
            Call::TcpSendClose(..) => "tcp-send-close",
            Call::Hold(..) => "hold",
            Call::Release => "release",
            Call::HeldSend(_) => "held-send",
            Call::Flood(..) => "flood",
            Call::Dns(_, DnsHow::Udp) => "dns-udp",
            Call::Dns(_, DnsHow::UdpConnected) => "dns-udp-connected",
            Call::Dns(_, DnsHow::UdpMarked) => "dns-udp-marked",
            Call::Dns(_, DnsHow::Tcp) => "dns-tcp",
            Call::Sleep(_) => "sleep",
            Call::WaitFile(_) => "wait-file",
            Call::Storm { .. } => "storm",
            Call::Fork(_) => "fork",
            Call::Thread(_) => "thread",
            Call::WaitChildren => "wait-children",
        }
    }

    /// The destination, as the line shows it (`0.0.0.0:0` for the pauses).
    fn dst(&self) -> SocketAddr {
        match self {
            Call::Tcp(a)
            | Call::UdpConnect(a)
            | Call::UdpSendto(a)
            | Call::UdpConnectCmsg(a, _)
            | Call::UdpLsrr(a)
            | Call::UdpLsrrCmsg(a)
            | Call::UdpRthdr(a)
            | Call::Ping(a)
            | Call::PingLaundered(a)
            | Call::TcpSend(a, _)
            | Call::UdpSend(a, ..)
            | Call::RawUdp(a)
            | Call::PacketUdp(a, _)
            | Call::Dns(a, _)
            | Call::TcpSendClose(a, _)
            | Call::DnsQuery(_, a)
            | Call::TcpFastOpen(a)
            | Call::Hold(_, a, _)
            | Call::Flood(a, _) => *a,
            Call::Storm { allowed, .. } => *allowed,
            Call::DnsTunnel { server, .. } => *server,
            Call::Sleep(_)
            | Call::WaitFile(_)
            | Call::Socket(_)
            | Call::SetsockoptLarge
            | Call::SendFd(_)
            | Call::Resolve(..)
            | Call::Release
            | Call::HeldSend(_)
            | Call::Fork(_)
            | Call::Thread(_)
            | Call::WaitChildren => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

/// Parses the call words into calls.
fn parse_calls(words: &[String]) -> Result<Vec<Call>, String> {
    let mut words = words.iter().peekable();
    let calls = parse_seq(&mut words, false)?;
    match words.next() {
        Some(w) => Err(format!("{w:?} without a `fork` or `thread` before it")),
        None => Ok(calls),
    }
}

/// Parses calls up to the end of the words, or (`in_fork`) up to the `end` of a `fork`, which
/// is consumed.
fn parse_seq<'w>(
    words: &mut std::iter::Peekable<impl Iterator<Item = &'w String>>,
    in_fork: bool,
) -> Result<Vec<Call>, String> {
    let mut calls = Vec::new();
    fn next<'w>(
        words: &mut impl Iterator<Item = &'w String>,
        op: &str,
        what: &str,
    ) -> Result<&'w String, String> {
        words.next().ok_or_else(|| format!("{op}: missing {what}"))
    }
    fn num<'w>(
        words: &mut impl Iterator<Item = &'w String>,
        op: &str,
        what: &str,
    ) -> Result<u64, String> {
        let w = next(words, op, what)?;
        w.parse()
            .map_err(|_| format!("{op}: {what} must be a number, not {w:?}"))
    }
    fn addr<'w>(
        words: &mut impl Iterator<Item = &'w String>,
        op: &str,
    ) -> Result<SocketAddr, String> {
        let w = next(words, op, "ADDR:PORT")?;
        w.parse()
            .map_err(|_| format!("{op}: {w:?} is not ADDR:PORT (IPv6 as [ADDR]:PORT)"))
    }
    while let Some(op) = words.next() {
        let call = match op.as_str() {
            "end" if in_fork => return Ok(calls),
            "end" => return Err("`end` without a `fork` or `thread` before it".into()),
            "fork" => Call::Fork(parse_seq(words, true)?),
            "thread" => Call::Thread(parse_seq(words, true)?),
            "wait-children" => Call::WaitChildren,
            "tcp" => Call::Tcp(addr(words, op)?),
            "udp-connect" => Call::UdpConnect(addr(words, op)?),
            "udp-sendto" => Call::UdpSendto(addr(words, op)?),
            "udp-lsrr" => Call::UdpLsrr(addr(words, op)?),
            "udp-lsrr-cmsg" => Call::UdpLsrrCmsg(addr(words, op)?),
            "udp-rthdr" => Call::UdpRthdr(addr(words, op)?),
            "socket" => Call::Socket(next(words, op, "KIND")?.clone()),
            "setsockopt-large" => Call::SetsockoptLarge,
            "ping" => Call::Ping(addr(words, op)?),
            "ping-laundered" => Call::PingLaundered(addr(words, op)?),
            "udp-connect-cmsg" => {
                let a = addr(words, op)?;
                let then = match words.peek() {
                    Some(w) if w.as_str() == "--then" => {
                        words.next();
                        Some(next(words, op, "PATH")?.into())
                    }
                    _ => None,
                };
                Call::UdpConnectCmsg(a, then)
            }
            "raw-udp" => Call::RawUdp(addr(words, op)?),
            "dns-udp" => Call::Dns(addr(words, op)?, DnsHow::Udp),
            "dns-udp-connected" => Call::Dns(addr(words, op)?, DnsHow::UdpConnected),
            "dns-udp-marked" => Call::Dns(addr(words, op)?, DnsHow::UdpMarked),
            "dns-tcp" => Call::Dns(addr(words, op)?, DnsHow::Tcp),
            "send-fd" => Call::SendFd(num(words, op, "FD")? as i32),
            "packet-udp" => Call::PacketUdp(addr(words, op)?, next(words, op, "HOW")?.clone()),
            "tcp-send" => Call::TcpSend(addr(words, op)?, num(words, op, "BYTES")?),
            "tcp-send-close" => Call::TcpSendClose(addr(words, op)?, num(words, op, "BYTES")?),
            "hold" => {
                let kind = match next(words, op, "tcp|udp")?.as_str() {
                    "tcp" => HoldKind::Tcp,
                    "udp" => HoldKind::Udp,
                    other => return Err(format!("hold: {other:?} is not tcp or udp")),
                };
                Call::Hold(kind, addr(words, op)?, num(words, op, "N")?)
            }
            "release" => Call::Release,
            "resolve" => {
                let w = next(words, op, "NAME:PORT")?;
                let (name, port) = w
                    .rsplit_once(':')
                    .and_then(|(n, p)| Some((n.to_string(), p.parse().ok()?)))
                    .ok_or_else(|| format!("resolve: {w:?} is not NAME:PORT"))?;
                Call::Resolve(name, Some(port))
            }
            "tcp-fastopen" => Call::TcpFastOpen(addr(words, op)?),
            "dns-query" => Call::DnsQuery(next(words, op, "NAME")?.clone(), addr(words, op)?),
            "resolve-only" => Call::Resolve(next(words, op, "NAME")?.clone(), None),
            "dns-tunnel" => {
                let domain = next(words, op, "DOMAIN")?.clone();
                let server = addr(words, op)?;
                let n = num(words, op, "N")?;
                let qtype = match next(words, op, "QTYPE")?.as_str() {
                    "A" => 1,
                    "NULL" => 10,
                    "CNAME" => 5,
                    "MX" => 15,
                    "TXT" => 16,
                    "AAAA" => 28,
                    other => return Err(format!("dns-tunnel: {other:?} is not a query type")),
                };
                let tcp = match next(words, op, "udp|tcp")?.as_str() {
                    "udp" => false,
                    "tcp" => true,
                    other => return Err(format!("dns-tunnel: {other:?} is not udp or tcp")),
                };
                Call::DnsTunnel {
                    domain,
                    server,
                    n,
                    qtype,
                    tcp,
                }
            }
            "held-send" => Call::HeldSend(num(words, op, "BYTES")?),
            "flood" => Call::Flood(addr(words, op)?, num(words, op, "N")?),
            "udp-send" => Call::UdpSend(
                addr(words, op)?,
                num(words, op, "COUNT")?,
                num(words, op, "SIZE")?,
            ),
            "sleep" => Call::Sleep(num(words, op, "MS")?),
            "wait-file" => Call::WaitFile(next(words, op, "PATH")?.into()),
            "storm" => Call::Storm {
                allowed: addr(words, op)?,
                denied: addr(words, op)?,
                ms: num(words, op, "MS")?,
            },
            other => return Err(format!("unknown op {other:?}")),
        };
        calls.push(call);
    }
    if in_fork {
        return Err("`fork` or `thread` without its `end`".into());
    }
    Ok(calls)
}

fn unspecified_for(addr: &SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

/// What `hold` opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldKind {
    Tcp,
    Udp,
}

/// A socket `hold` keeps open.
enum Held {
    Tcp(TcpStream),
    Udp(#[expect(dead_code, reason = "held only to stay open until `release`")] UdpSocket),
}

/// What the calls share.
struct Probe {
    timeout: Duration,
    rate: Option<u64>,
    stop_file: Option<PathBuf>,
    /// The sockets `hold` keeps open, oldest first.
    held: std::sync::Mutex<Vec<Held>>,
}

/// One datagram on a connected socket through sendmsg(2) with no address and one cmsg (IP_TOS,
/// or IPV6_TCLASS on IPv6): the form that reaches the sendmsg hook with no destination.
fn send_with_cmsg(s: &UdpSocket, ipv4: bool) -> io::Result<()> {
    let tos = 0x10_i32.to_ne_bytes();
    if ipv4 {
        send_msg(s, None, libc::IPPROTO_IP, libc::IP_TOS, &tos)
    } else {
        send_msg(s, None, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &tos)
    }
}

/// One datagram through sendmsg(2), to `to` (None: the connected peer), with one cmsg of
/// `level`/`kind` carrying `data` (at most 40 bytes).
fn send_msg(
    s: &UdpSocket,
    to: Option<&SocketAddr>,
    level: libc::c_int,
    kind: libc::c_int,
    data: &[u8],
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let payload = *b"egress-probe";
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let name = to.map(sockaddr);
    // Room for one cmsg of up to 40 bytes, 8-byte aligned.
    let mut control = [0u64; 8];
    assert!(data.len() <= 40, "cmsg data too long");
    // SAFETY: msghdr and cmsghdr are plain C structs; every pointer set here points into buffers
    // that outlive the sendmsg call, and CMSG_* are used as the kernel ABI defines them.
    let rc = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        if let Some((storage, len)) = &name {
            msg.msg_name = std::ptr::from_ref(storage).cast_mut().cast();
            msg.msg_namelen = *len;
        }
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(data.len() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data.len() as u32) as usize;
        std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(cmsg), data.len());
        libc::sendmsg(s.as_raw_fd(), &msg, 0)
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `addr` as a C socket address.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid, and it is large enough for
    // either address family written into it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn setsockopt(
    s: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: value is a live buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An IPv4 loose source route option through `via` (type 0x83, length 7, pointer 4), padded
/// to 8 bytes with END.
fn lsrr_option(via: &SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = via else {
        return Vec::new();
    };
    let mut opt = vec![0x83, 7, 4];
    opt.extend_from_slice(&v4.ip().octets());
    opt.push(0);
    opt
}

/// An IPv6 segment routing header (type 4) with one segment, `via`.
fn srh(via: &SocketAddr) -> Vec<u8> {
    let SocketAddr::V6(v6) = via else {
        return Vec::new();
    };
    // next header (filled by the kernel), hdrlen 2 (24 bytes), type 4, segments left 0, first
    // segment 0, flags 0, tag 0, then the segment.
    let mut h = vec![0, 2, 4, 0, 0, 0, 0, 0];
    h.extend_from_slice(&v6.ip().octets());
    h
}

/// socket(2) of one of the kinds `socket KIND` names.
fn socket_of(kind: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let (family, ty, proto) = match kind {
        "raw4" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP),
        "raw6" => (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_UDP),
        "ping4" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        "ping6" => (libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6),
        "udplite" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
        "mptcp" => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
        "sctp" => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
        "packet" => (libc::AF_PACKET, libc::SOCK_RAW, 0),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown socket kind {other}"),
            ));
        }
    };
    // SAFETY: plain syscall; the fd, if any, is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// One ICMP echo request to `addr` through an unconnected ping socket (`sendto`, which no
/// cgroup hook sees). `launder`: connect the socket to loopback first (the connect hook approves
/// it and records the socket's owner), then dissolve the association with AF_UNSPEC.
fn ping(addr: &SocketAddr, launder: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = socket_of(if addr.is_ipv4() { "ping4" } else { "ping6" })?;
    if launder {
        let lo: SocketAddr = if addr.is_ipv4() {
            "127.0.0.1:0".parse().expect("an address")
        } else {
            "[::1]:0".parse().expect("an address")
        };
        let (storage, len) = sockaddr(&lo);
        // SAFETY: valid sockaddr buffers for the calls' duration.
        unsafe {
            if libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut unspec: libc::sockaddr = std::mem::zeroed();
            unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
            if libc::connect(
                fd.as_raw_fd(),
                &unspec,
                size_of::<libc::sockaddr>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
    }
    // Echo request: type 8 (ICMP) or 128 (ICMPv6), code 0; the kernel fills checksum and id.
    let echo: [u8; 16] = [
        if addr.is_ipv4() { 8 } else { 128 },
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        b'e',
        b'g',
        b'r',
        b'e',
        b's',
        b's',
        0,
        0,
    ];
    let (storage, len) = sockaddr(addr);
    // SAFETY: valid buffers for the call's duration.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            echo.as_ptr().cast(),
            echo.len(),
            0,
            std::ptr::from_ref(&storage).cast(),
            len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn wait_file(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "file never appeared",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Probe {
    fn tcp_send(&self, addr: SocketAddr, total: u64) -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        self.send_on(&mut s, total)
    }

    /// Writes `total` bytes on `s` (paced by `--rate`), shuts it down, and waits for the peer to
    /// close.
    fn send_on(&self, s: &mut TcpStream, total: u64) -> io::Result<()> {
        s.set_write_timeout(Some(self.timeout))?;
        s.set_read_timeout(Some(self.timeout))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let start = Instant::now();
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])?;
            left -= n as u64;
            if let Some(rate) = self.rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64((total - left) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // The peer closes once it has read everything: then every byte has left this host.
        let mut sink = [0u8; 256];
        while s.read(&mut sink)? > 0 {}
        Ok(())
    }

    fn attempt(&self, call: &Call) -> io::Result<()> {
        match call {
            Call::TcpSend(addr, bytes) => self.tcp_send(*addr, *bytes),
            Call::TcpSendClose(addr, bytes) => {
                let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(5))?;
                s.set_write_timeout(Some(self.timeout))?;
                let chunk = vec![0x5au8; 64 * 1024];
                let mut left = *bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
                Ok(())
            }
            Call::Hold(kind, addr, _) => {
                let held = match kind {
                    HoldKind::Tcp => {
                        Held::Tcp(TcpStream::connect_timeout(addr, Duration::from_secs(2))?)
                    }
                    HoldKind::Udp => {
                        let s = UdpSocket::bind(unspecified_for(addr))?;
                        s.connect(addr)?;
                        Held::Udp(s)
                    }
                };
                self.held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(held);
                Ok(())
            }
            Call::Release => {
                self.held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
                Ok(())
            }
            Call::HeldSend(bytes) => {
                let mut held = self
                    .held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let s = held
                    .iter_mut()
                    .find_map(|h| match h {
                        Held::Tcp(s) => Some(s),
                        Held::Udp(_) => None,
                    })
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no held TCP socket"))?;
                self.send_on(s, *bytes)
            }
            Call::Flood(addr, _) => short_lived_udp(addr),
            Call::TcpFastOpen(addr) => tcp_fastopen(*addr),
            // `run` makes its N queries; one alone is the first.
            Call::DnsTunnel {
                domain,
                server,
                qtype,
                tcp,
                ..
            } => dns_rcode(&tunnel_name(domain, 0), *qtype, *server, *tcp, self.timeout),
            Call::DnsQuery(name, server) => {
                let a = dns_query(name, *server, self.timeout)?;
                ANSWER.set((Some(a.to_string()), None));
                Ok(())
            }
            Call::Resolve(name, port) => {
                let addr = resolve(name)?;
                ANSWER.set((Some(addr.to_string()), None));
                match port {
                    Some(p) => {
                        TcpStream::connect_timeout(&SocketAddr::new(addr, *p), self.timeout)?;
                        Ok(())
                    }
                    None => Ok(()),
                }
            }
            Call::UdpSend(addr, count, size) => udp_send(*addr, *count, *size),
            Call::RawUdp(addr) => raw_udp(*addr),
            Call::PacketUdp(addr, how) => packet_udp(*addr, how),
            Call::Dns(addr, how) => dns_exchange(*addr, *how, self.timeout),
            Call::SendFd(fd) => {
                let payload = b"egress-probe inherited";
                // SAFETY: a plain write(2) on a descriptor number; a closed one fails with EBADF.
                let n = unsafe { libc::write(*fd, payload.as_ptr().cast(), payload.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
            Call::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(*ms));
                Ok(())
            }
            Call::WaitFile(path) => wait_file(path),
            Call::Tcp(addr) => TcpStream::connect_timeout(addr, Duration::from_secs(2)).map(drop),
            Call::UdpConnect(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                s.connect(addr)?;
                s.send(b"egress-probe").map(drop)
            }
            Call::UdpSendto(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                s.send_to(b"egress-probe", addr).map(drop)
            }
            Call::Socket(kind) => socket_of(kind).map(drop),
            Call::SetsockoptLarge => {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                let mut value = vec![0u8; 8192];
                value[..4].copy_from_slice(&1i32.to_ne_bytes());
                setsockopt(&s, libc::IPPROTO_IP, libc::IP_FREEBIND, &value)
            }
            Call::Ping(addr) => ping(addr, false),
            Call::PingLaundered(addr) => ping(addr, true),
            Call::UdpLsrr(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                setsockopt(&s, libc::IPPROTO_IP, libc::IP_OPTIONS, &lsrr_option(addr))?;
                s.send_to(b"egress-probe", addr).map(drop)
            }
            Call::UdpLsrrCmsg(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                let opt = lsrr_option(addr);
                send_msg(&s, Some(addr), libc::IPPROTO_IP, libc::IP_RETOPTS, &opt)
            }
            Call::UdpRthdr(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                setsockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_RTHDR, &srh(addr))?;
                s.send_to(b"egress-probe", addr).map(drop)
            }
            Call::UdpConnectCmsg(addr, then) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                s.connect(addr)?;
                if let Some(path) = then {
                    let mut marker = path.clone().into_os_string();
                    marker.push(".connected");
                    std::fs::write(&marker, b"")?;
                    wait_file(path)?;
                }
                send_with_cmsg(&s, addr.is_ipv4())
            }
            Call::WaitChildren => wait_children(),
            Call::Storm { .. } | Call::Fork(_) | Call::Thread(_) => {
                unreachable!("a storm, a fork or a thread is not a single attempt")
            }
        }
    }

    fn storm(&self, allowed: SocketAddr, denied: SocketAddr, ms: u64) -> StormReport {
        let start = Instant::now();
        let end = start + Duration::from_millis(ms);
        let mut r = StormReport {
            op: "storm".into(),
            attempts: 0,
            per_sec: 0.0,
            wrong: 0,
            allowed_ok: 0,
            allowed_denied: 0,
            denied_ok: 0,
            denied_denied: 0,
            errors: BTreeMap::new(),
            pid: std::process::id(),
        };
        let mut rounds = 0u64;
        while Instant::now() < end {
            rounds += 1;
            if rounds.is_multiple_of(1000) && self.stop_file.as_ref().is_some_and(|p| p.exists()) {
                break;
            }
            for (addr, must_pass) in [(allowed, true), (denied, false)] {
                match (Verdict::of(&udp_connect(addr)), must_pass) {
                    (Verdict::Succeeded, true) => r.allowed_ok += 1,
                    (Verdict::Succeeded, false) => r.denied_ok += 1,
                    (Verdict::Denied, true) => r.allowed_denied += 1,
                    (Verdict::Denied, false) => r.denied_denied += 1,
                    // Not a verdict of the firewall (a UDP connect is never refused): counted
                    // apart, so that a broken setup cannot pass for a clean storm.
                    (other, _) => *r.errors.entry(other.name().to_string()).or_default() += 1,
                }
            }
        }
        r.attempts =
            r.allowed_ok + r.allowed_denied + r.denied_ok + r.denied_denied + r.error_count();
        r.wrong = r.allowed_denied + r.denied_ok;
        r.per_sec = (r.attempts as f64 / start.elapsed().as_secs_f64()).round();
        r
    }
}

/// One UDP connect on a fresh socket.
fn udp_connect(addr: SocketAddr) -> io::Result<()> {
    UdpSocket::bind(unspecified_for(&addr))?.connect(addr)
}

fn udp_send(addr: SocketAddr, count: u64, size: u64) -> io::Result<()> {
    let s = UdpSocket::bind(unspecified_for(&addr))?;
    let payload = vec![0xa5u8; size as usize];
    for _ in 0..count {
        s.send_to(&payload, addr)?;
    }
    Ok(())
}

/// One UDP datagram through `socket(AF_INET, SOCK_RAW, IPPROTO_UDP)`: the kernel adds the IP
/// header, we write the UDP header (checksum 0: none, valid for IPv4).
fn raw_udp(addr: SocketAddr) -> io::Result<()> {
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "raw-udp is IPv4 only",
        ));
    };
    let payload = b"egress-probe raw";
    let mut pkt = Vec::with_capacity(8 + payload.len());
    pkt.extend_from_slice(&40000u16.to_be_bytes());
    pkt.extend_from_slice(&v4.port().to_be_bytes());
    pkt.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    pkt.extend_from_slice(&0u16.to_be_bytes());
    pkt.extend_from_slice(payload);
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain syscalls on a socket we own, with buffers that outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        sendto_and_close(
            fd,
            &pkt,
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    }
}

/// How a `dns-*` call reaches its server.
#[derive(Debug, Clone, Copy, PartialEq)]
enum DnsHow {
    Udp,
    UdpConnected,
    UdpMarked,
    Tcp,
}

thread_local! {
    /// (from, peer) of the last `dns-*` call, for its line.
    static ANSWER: std::cell::Cell<(Option<String>, Option<String>)> =
        const { std::cell::Cell::new((None, None)) };
}

/// The proxy's socket mark (`egress_common::DNS_UPSTREAM_MARK`).
const DNS_UPSTREAM_MARK: u32 = 0x6567_7273;

/// One exchange with a DNS server (or whatever answers there): a 12-byte message out, the
/// answer in. Records where the answer came from and, on connected sockets, the peer.
fn dns_exchange(addr: SocketAddr, how: DnsHow, timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let query = [0x12u8, 0x34, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut buf = [0u8; 512];
    match how {
        DnsHow::Tcp => {
            let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let peer = s.peer_addr()?;
            let mut msg = (query.len() as u16).to_be_bytes().to_vec();
            msg.extend_from_slice(&query);
            s.write_all(&msg)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let n = usize::from(u16::from_be_bytes(len)).min(buf.len());
            s.read_exact(&mut buf[..n])?;
            ANSWER.set((None, Some(peer.to_string())));
        }
        DnsHow::Udp | DnsHow::UdpMarked | DnsHow::UdpConnected => {
            let s = UdpSocket::bind(unspecified_for(&addr))?;
            s.set_read_timeout(Some(timeout))?;
            if matches!(how, DnsHow::UdpMarked) {
                let mark = DNS_UPSTREAM_MARK;
                // SAFETY: setsockopt with a pointer to a u32 that outlives the call.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_MARK,
                        (&mark as *const u32).cast(),
                        size_of::<u32>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let peer = if matches!(how, DnsHow::UdpConnected) {
                s.connect(addr)?;
                s.send(&query)?;
                Some(s.peer_addr()?.to_string())
            } else {
                s.send_to(&query, addr)?;
                None
            };
            let (_, from) = s.recv_from(&mut buf)?;
            ANSWER.set((Some(from.to_string()), peer));
        }
    }
    Ok(())
}

/// One sendto(2) of `buf` on `fd` to the address at `addr`, then close(2) of `fd`.
///
/// # Safety
/// `fd` is an open socket the caller owns (closed here); `addr` points to `len` valid bytes.
unsafe fn sendto_and_close(
    fd: libc::c_int,
    buf: &[u8],
    flags: libc::c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> io::Result<()> {
    // SAFETY: as the caller promises; `buf` outlives the call.
    unsafe {
        let n = libc::sendto(fd, buf.as_ptr().cast(), buf.len(), flags, addr, len);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n < 0 { Err(err) } else { Ok(()) }
    }
}

/// TCP Fast Open from the client side: `sendto(MSG_FASTOPEN)` connects and sends in one call
/// (no connect(2) of its own).
fn tcp_fastopen(addr: SocketAddr) -> io::Result<()> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (storage, len) = sockaddr(&addr);
    let data = b"egress-probe fastopen";
    // SAFETY: plain syscalls on a socket we own, with buffers that outlive them.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        sendto_and_close(
            fd,
            data,
            libc::MSG_FASTOPEN,
            std::ptr::from_ref(&storage).cast(),
            len,
        )
    }
}

/// One DNS query for `name` (A; AAAA when the name starts with `v6.`) to `server` over UDP; the
/// first address of the answer. A failed answer is an error named by its rcode.
fn dns_query(name: &str, server: SocketAddr, timeout: Duration) -> io::Result<std::net::IpAddr> {
    let qtype: u16 = if name.starts_with("v6.") { 28 } else { 1 };
    let id: u16 = (std::process::id() as u16) ^ 0x5a5a;
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    // Connected, as resolvers do: a server that is not there answers ECONNREFUSED at once
    // (an ICMP port unreachable), not after the timeout.
    let s = UdpSocket::bind(unspecified_for(&server))?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(server)?;
    s.send(&q)?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    let m = &buf[..n];
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed answer");
    if m.len() < 12 || m[0..2] != id.to_be_bytes() {
        return Err(bad());
    }
    match m[3] & 0x0f {
        0 => {}
        2 => return Err(io::Error::other("SERVFAIL")),
        3 => return Err(io::Error::other("NXDOMAIN")),
        5 => return Err(io::Error::other("REFUSED")),
        r => return Err(io::Error::other(format!("RCODE{r}"))),
    }
    let qd = u16::from_be_bytes([m[4], m[5]]);
    let an = u16::from_be_bytes([m[6], m[7]]);
    // Skips a (possibly compressed) name at `i`.
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let l = *m.get(i)?;
            if l & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            if l == 0 {
                return Some(i + 1);
            }
            i += 1 + l as usize;
        }
    };
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(i).ok_or_else(bad)? + 4;
    }
    for _ in 0..an {
        i = skip_name(i).ok_or_else(bad)?;
        let h = m.get(i..i + 10).ok_or_else(bad)?;
        let (t, len) = (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[8], h[9]]),
        );
        let data = m.get(i + 10..i + 10 + len as usize).ok_or_else(bad)?;
        match (t, data.len()) {
            (1, 4) => return Ok(std::net::IpAddr::from(<[u8; 4]>::try_from(data).unwrap())),
            (28, 16) => return Ok(std::net::IpAddr::from(<[u8; 16]>::try_from(data).unwrap())),
            _ => {}
        }
        i += 10 + len as usize;
    }
    Err(io::Error::other("NODATA"))
}

/// The `i`th name of a tunnel-shaped client: 30 bytes of a random-looking payload (fixed per
/// process) in base32 (48 characters, lowercase), then the sequence number, under `domain`.
fn tunnel_name(domain: &str, i: u64) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let seed = (u64::from(std::process::id()) << 32) ^ i;
    let mut x = (seed | 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    let mut bits: u64 = 0;
    let mut n = 0;
    let mut out = String::with_capacity(64 + domain.len());
    while out.len() < 48 {
        if n < 5 {
            // xorshift64: the payload's next byte.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bits = (bits << 8) | (x & 0xff);
            n += 8;
        }
        n -= 5;
        out.push(ALPHABET[((bits >> n) & 31) as usize] as char);
    }
    format!("{out}.{i}.{domain}")
}

/// One query for `name` of type `qtype` to `server`, over TCP or connected UDP; Ok for NOERROR,
/// else an error named by the rcode.
fn dns_rcode(
    name: &str,
    qtype: u16,
    server: SocketAddr,
    tcp: bool,
    timeout: Duration,
) -> io::Result<()> {
    let id: u16 = (std::process::id() as u16) ^ 0x7e57;
    let mut q = Vec::with_capacity(96);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    let mut buf = vec![0u8; 65_535];
    let n = if tcp {
        let mut s = std::net::TcpStream::connect_timeout(&server, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        s.write_all(&msg)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let n = usize::from(u16::from_be_bytes(len));
        s.read_exact(&mut buf[..n])?;
        n
    } else {
        let s = UdpSocket::bind(unspecified_for(&server))?;
        s.set_read_timeout(Some(timeout))?;
        s.connect(server)?;
        s.send(&q)?;
        s.recv(&mut buf)?
    };
    let m = &buf[..n];
    if m.len() < 12 || m[0..2] != id.to_be_bytes() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed answer",
        ));
    }
    match m[3] & 0x0f {
        0 => Ok(()),
        2 => Err(io::Error::other("SERVFAIL")),
        3 => Err(io::Error::other("NXDOMAIN")),
        5 => Err(io::Error::other("REFUSED")),
        r => Err(io::Error::other(format!("RCODE{r}"))),
    }
}

/// The first address getaddrinfo(3) gives for `name` (the C library's resolver, as every
/// program uses it). Failures carry the EAI_* name as their message.
fn resolve(name: &str) -> io::Result<std::net::IpAddr> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: hints is zeroed POD; getaddrinfo fills `res`, freed below with freeaddrinfo.
    let rc = unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_socktype = libc::SOCK_STREAM;
        libc::getaddrinfo(cname.as_ptr(), std::ptr::null(), &hints, &mut res)
    };
    if rc != 0 {
        let name = match rc {
            libc::EAI_NONAME => "EAI_NONAME",
            libc::EAI_AGAIN => "EAI_AGAIN",
            libc::EAI_FAIL => "EAI_FAIL",
            libc::EAI_NODATA => "EAI_NODATA",
            _ => "EAI_OTHER",
        };
        return Err(io::Error::other(name));
    }
    // SAFETY: getaddrinfo succeeded: `res` is a valid list with at least one entry.
    let addr = unsafe {
        let ai = &*res;
        let a = if ai.ai_family == libc::AF_INET {
            let sin = &*(ai.ai_addr as *const libc::sockaddr_in);
            std::net::IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
        } else {
            let sin6 = &*(ai.ai_addr as *const libc::sockaddr_in6);
            std::net::IpAddr::from(sin6.sin6_addr.s6_addr)
        };
        libc::freeaddrinfo(res);
        a
    };
    Ok(addr)
}

/// One short-lived UDP socket: socket, connect twice (no datagram), close. Plain syscalls: a
/// flood of them should cost as little as it can.
fn short_lived_udp(addr: &SocketAddr) -> io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the fd, if any, is owned (and closed) by `fd`.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // Twice: the second connect finds the owner the first recorded, as a socket in use is looked
    // up again (a map that keeps what is used most would keep these, and drop an idle upload's).
    for _ in 0..2 {
        // SAFETY: a valid sockaddr buffer for the call's duration.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One IPv4 UDP datagram written whole, Ethernet header included, through an AF_PACKET socket:
/// no cgroup hook sees it. The frame goes to the broadcast MAC (the receiving kernel accepts a
/// unicast IP packet in an L2 broadcast) from the namespace's own address `ADDR_A`.
fn packet_udp(addr: SocketAddr, how: &str) -> io::Result<()> {
    const ETH_P_IP: u16 = 0x0800;
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "packet-udp is IPv4 only",
        ));
    };
    let (sll_protocol, bypass) = match how {
        "ip" => (ETH_P_IP, false),
        "alien" => (0x1234, false),
        "bypass" => (ETH_P_IP, true),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("packet-udp HOW: ip, alien or bypass, not {other:?}"),
            ));
        }
    };
    let payload = b"egress-probe packet";
    let udp_len = 8 + payload.len();
    let mut ip = Vec::with_capacity(20 + udp_len);
    ip.extend_from_slice(&[0x45, 0]);
    ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    ip.extend_from_slice(&egress_tests::netns::ADDR_A.octets());
    ip.extend_from_slice(&v4.ip().octets());
    let sum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&40001u16.to_be_bytes());
    ip.extend_from_slice(&v4.port().to_be_bytes());
    ip.extend_from_slice(&(udp_len as u16).to_be_bytes());
    ip.extend_from_slice(&0u16.to_be_bytes());
    ip.extend_from_slice(payload);
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&ip);
    let ifindex = first_non_loopback_interface()?;
    // SAFETY: plain syscalls on a socket we own, with buffers that outlive them.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(sll_protocol.to_be()),
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        if bypass
            && libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
        {
            let err = io::Error::last_os_error();
            libc::close(fd);
            return Err(err);
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = sll_protocol.to_be();
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        sendto_and_close(
            fd,
            &frame,
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    }
}

/// The Internet checksum of an IPv4 header (its checksum field zero).
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The index of the first interface of this network namespace that is not loopback.
fn first_non_loopback_interface() -> io::Result<i32> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed once below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut found = None;
        let mut p = list;
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name);
            if name.to_bytes() != b"lo" {
                found = Some((*p).if_index as i32);
                break;
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no interface but lo"))
    }
}

fn print(out: &mut impl io::Write, line: &impl serde::Serialize) {
    let mut text = serde_json::to_vec(line).expect("a probe line serializes");
    text.push(b'\n');
    let _ = out.write_all(&text);
    let _ = out.flush();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let calls = match parse_calls(&cli.calls) {
        Ok(c) => c,
        Err(e) => Cli::command().error(ErrorKind::InvalidValue, e).exit(),
    };
    if let Some(dir) = &cli.cgroup
        && let Err(e) = egress_tests::cgroup::join(dir)
    {
        eprintln!("egress-probe: joining {}: {e}", dir.display());
        return ExitCode::from(3);
    }
    let probe = Probe {
        timeout: Duration::from_secs(cli.timeout),
        rate: cli.rate,
        stop_file: cli.stop_file,
        held: std::sync::Mutex::new(Vec::new()),
    };
    // Not locked for good: a `thread` call prints too.
    let mut out = io::stdout();
    run(&probe, &calls, cli.count, &mut out);
    ExitCode::SUCCESS
}

/// Makes `calls` in order, printing a line for each.
fn run(probe: &Probe, calls: &[Call], count: Option<u64>, out: &mut impl io::Write) {
    for call in calls {
        let (op, dst) = (call.op().to_string(), call.dst().to_string());
        // Our own pid: a forked child's lines carry the child's.
        let pid = std::process::id();
        match call {
            Call::Storm {
                allowed,
                denied,
                ms,
            } => {
                print(out, &probe.storm(*allowed, *denied, *ms));
                continue;
            }
            Call::DnsTunnel {
                domain,
                server,
                n,
                qtype,
                tcp,
            } => {
                let mut results: BTreeMap<String, u64> = BTreeMap::new();
                for i in 0..*n {
                    let name = tunnel_name(domain, i);
                    let r = dns_rcode(&name, *qtype, *server, *tcp, probe.timeout);
                    *results
                        .entry(Verdict::of(&r).name().to_string())
                        .or_default() += 1;
                }
                print(
                    out,
                    &SummaryLine {
                        op,
                        dst,
                        count: *n,
                        results,
                        pid,
                    },
                );
                continue;
            }
            Call::Fork(sub) => {
                let result = Verdict::of(&fork(|| run(probe, sub, count, out)));
                print(
                    out,
                    &CallLine {
                        op,
                        dst,
                        result,
                        pid,
                        from: None,
                        peer: None,
                    },
                );
                continue;
            }
            Call::Thread(sub) => {
                std::thread::scope(|scope| {
                    scope.spawn(|| run(probe, sub, count, &mut io::stdout()));
                });
                print(
                    out,
                    &CallLine {
                        op,
                        dst,
                        result: Verdict::Succeeded,
                        pid,
                        from: None,
                        peer: None,
                    },
                );
                continue;
            }
            _ => {}
        }
        // `hold` and `flood` carry their own count.
        let count = match call {
            Call::Hold(_, _, n) | Call::Flood(_, n) => Some(*n),
            _ => count,
        };
        match count {
            None => {
                let result = Verdict::of(&probe.attempt(call));
                let (from, peer) = ANSWER.take();
                print(
                    out,
                    &CallLine {
                        op,
                        dst,
                        result,
                        pid,
                        from,
                        peer,
                    },
                );
            }
            Some(count) => {
                let mut results: BTreeMap<String, u64> = BTreeMap::new();
                for _ in 0..count {
                    let r = Verdict::of(&probe.attempt(call));
                    *results.entry(r.name().to_string()).or_default() += 1;
                }
                print(
                    out,
                    &SummaryLine {
                        op,
                        dst,
                        count,
                        results,
                        pid,
                    },
                );
            }
        }
    }
}

/// Forks a child that runs `child` and exits; returns in the parent at once. Every line is
/// flushed as it is printed and only one thread runs at a time (a `thread` call is waited
/// for), so the child starts with nothing half-written and no lock held.
fn fork(child: impl FnOnce()) -> io::Result<()> {
    // SAFETY: no other thread runs; the child only runs our own code, then _exit.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            child();
            // SAFETY: ends the child without running the parent's exit handlers twice.
            unsafe { libc::_exit(0) }
        }
        _ => Ok(()),
    }
}

/// Waits until every child has exited.
fn wait_children() -> io::Result<()> {
    loop {
        // SAFETY: plain waitpid on any child; the status is not needed.
        if unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ECHILD) => Ok(()),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_documented_command_line_parses() {
        let cli = Cli::try_parse_from(words(
            "egress-probe --cgroup /sys/fs/cgroup/x --count 3 --timeout 5 --rate 1000 tcp 127.0.0.2:80 tcp-send [::1]:9 100 sleep 10",
        ))
        .unwrap();
        assert_eq!(
            (cli.cgroup.unwrap(), cli.count, cli.timeout, cli.rate),
            (PathBuf::from("/sys/fs/cgroup/x"), Some(3), 5, Some(1000))
        );
        assert_eq!(
            parse_calls(&cli.calls).unwrap(),
            [
                Call::Tcp("127.0.0.2:80".parse().unwrap()),
                Call::TcpSend("[::1]:9".parse().unwrap(), 100),
                Call::Sleep(10)
            ]
        );
    }

    #[test]
    fn the_socket_holding_calls_parse() {
        assert_eq!(
            parse_calls(&words(
                "hold tcp 127.0.0.2:80 3 hold udp [::1]:9 2 flood 127.0.0.1:9 150000 held-send 100 release"
            ))
            .unwrap(),
            [
                Call::Hold(HoldKind::Tcp, "127.0.0.2:80".parse().unwrap(), 3),
                Call::Hold(HoldKind::Udp, "[::1]:9".parse().unwrap(), 2),
                Call::Flood("127.0.0.1:9".parse().unwrap(), 150_000),
                Call::HeldSend(100),
                Call::Release,
            ]
        );
        assert!(parse_calls(&words("hold sctp 127.0.0.1:1 1")).is_err());
    }

    #[test]
    fn forks_nest_and_end_where_their_end_is() {
        let calls = parse_calls(&words(
            "fork tcp 127.0.0.2:80 fork sleep 5 end end wait-children thread sleep 1 end",
        ))
        .unwrap();
        assert_eq!(
            calls,
            [
                Call::Fork(vec![
                    Call::Tcp("127.0.0.2:80".parse().unwrap()),
                    Call::Fork(vec![Call::Sleep(5)])
                ]),
                Call::WaitChildren,
                Call::Thread(vec![Call::Sleep(1)])
            ]
        );
    }

    #[test]
    fn bad_calls_are_refused() {
        for bad in [
            "tcp",
            "udp-send 127.0.0.1:1 3",
            "fly 127.0.0.1:1",
            "sleep soon",
            "fork sleep 1",
            "sleep 1 end",
            "fork fork end",
            "thread sleep 1",
        ] {
            assert!(parse_calls(&words(bad)).is_err(), "{bad}");
        }
        assert!(
            Cli::try_parse_from(words("egress-probe")).is_err(),
            "a call is required"
        );
    }

    #[test]
    fn lines_read_back_as_the_harness_types() {
        let line = CallLine {
            op: "tcp".into(),
            dst: "127.0.0.1:1".into(),
            result: Verdict::Denied,
            pid: 7,
            from: None,
            peer: None,
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(text.contains(r#""result":"EPERM""#), "{text}");
        assert_eq!(egress_tests::probe::parse_calls(text.as_bytes()), [line]);
    }
}
